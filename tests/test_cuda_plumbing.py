"""The device code path without a GPU: the CPU kernels behind it ("cpu-staged":
token inputs staged into the arena as int32 with their sorted row order, the
loss gradient written over the logits in place, loss scale and AdamW
hyper-parameters read from backend memory, per-row losses copied back) give
bit-for-bit the results of the plain CPU path."""
import numpy as np
import pytest

import smedjan


def pair(seed=0, **kw):
    cfg = smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64)
    return (smedjan.Model(cfg, seed=seed, device="cpu"),
            smedjan.Model(cfg, seed=seed, device="cpu-staged"))


def batch(seed, B=3, T=21, V=300):
    r = np.random.default_rng(seed)
    x = r.integers(0, V, (B, T)).astype(np.int32)
    y = r.integers(0, V, (B, T)).astype(np.int32)
    return x, y


def test_staged_forward_loss_and_grads_are_bitwise_equal():
    a, b = pair()
    assert b.device == "cpu-staged"
    x, y = batch(1)
    y[0, :4] = -1
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    assert a.loss(x, y) == b.loss(x, y)
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)


def test_staged_uint16_tokens():
    a, b = pair()
    x, y = batch(2)
    assert a.loss(x.astype(np.uint16), y.astype(np.uint16)) == b.loss(x.astype(np.uint16), y.astype(np.uint16))


def test_staged_training_is_bitwise_equal():
    a, b = pair(seed=4)
    ta = smedjan.Trainer(a, lr=3e-3, warmup=2, steps=8, clip=0.5)
    tb = smedjan.Trainer(b, lr=3e-3, warmup=2, steps=8, clip=0.5)
    for i in range(6):
        x, y = batch(10 + i)
        assert ta.step(x, y) == tb.step(x, y), i
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    np.testing.assert_array_equal(ta.exp_avg_sq, tb.exp_avg_sq)


def test_staged_plans_for_several_shapes_and_modes():
    a, b = pair()
    for B, T in ((1, 5), (2, 64), (4, 7), (1, 5)):
        x, y = batch(B * T, B, T)
        np.testing.assert_array_equal(a.forward(x), b.forward(x))
        assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)


def test_move_between_cpu_and_staged_keeps_state():
    a, _ = pair()
    tr = smedjan.Trainer(a, lr=1e-3, steps=5)
    x, y = batch(3)
    tr.step(x, y)
    p = a.flat_params.copy()
    m = tr.exp_avg.copy()
    a.to("cpu-staged")
    np.testing.assert_array_equal(a.flat_params, p)
    tr.step(x, y)                       # moments followed the model
    a.to("cpu")
    assert not np.array_equal(a.flat_params, p) and not np.array_equal(tr.exp_avg, m)


def test_move_is_refused_while_views_are_alive():
    a, _ = pair()
    keep = a.params["layers.0.wq"]
    h = a._h
    with pytest.raises(BufferError, match="views"):
        h.to("cpu-staged")
    del keep


def test_poisoned_staged_arena_gives_the_same_results(monkeypatch):
    monkeypatch.setenv("SMEDJAN_POISON", "1")
    a, b = pair(seed=2)
    x, y = batch(5)
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)
