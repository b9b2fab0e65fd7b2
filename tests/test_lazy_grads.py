"""Gradients exist only once something needs them. A model made for forward
passes (evaluation, generation) holds its parameters and nothing for
gradients; the first backward, optimizer step or read of `grads` brings them
into being, zeroed, and from then on they behave exactly as if they had always
been there: a backward accumulates, zero_grad zeros, a move carries them.
A Trainer step on a model without them keeps its own in its activation
arena, where backward frees room, and they die with the update.
Each holds on the CPU and through the device code path ('cpu-staged')."""
import numpy as np
import pytest

import cuda_ref
import smedjan
from smedjan.checkpoint import load_checkpoint, model_from_checkpoint, restore, save_checkpoint

CFG = smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64)
DEVICES = ["cpu", "cpu-staged"]


def model(device="cpu", seed=3):
    return smedjan.Model(CFG, seed=seed, device=device)


def batch(seed, B=3, T=21, V=300):
    r = np.random.default_rng(seed)
    return (r.integers(0, V, (B, T)).astype(np.int32),
            r.integers(0, V, (B, T)).astype(np.int32))


def param_bytes(m):
    return 4 * m.n_params        # fp32 on the CPU: no separate compute copy


def grad_bytes(m):
    return 4 * m.n_params


def held(m):
    return m.memory()["bytes"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_fresh_model_holds_only_its_parameters(device):
    m = model(device)
    assert held(m) == param_bytes(m), (held(m), param_bytes(m))
    assert m.memory()["peak_bytes"] == param_bytes(m)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_loss_without_backward_never_make_gradients(device):
    m = model(device)
    x, y = batch(1)
    m.forward(x)
    m.loss(x, y)
    arena, _ = m._h.plan_bytes(3, 21, 0)
    arena_loss, _ = m._h.plan_bytes(3, 21, 1)
    assert held(m) == param_bytes(m) + arena + arena_loss   # the two plans' arenas, no more
    assert m.memory()["peak_bytes"] == held(m)               # no gradients, not even for a moment


def test_forward_plan_counts_no_gradients():
    m = model()
    for mode in ("forward", "loss"):
        p = m.plan_memory(2, 32, mode)
        assert p["fixed_bytes"] == param_bytes(m), (mode, p)
    n = m.n_params
    assert m.plan_memory(2, 32, "backward")["fixed_bytes"] == 2 * 4 * n     # params, grads
    assert m.plan_memory(2, 32, "train", grad_accum=2)["fixed_bytes"] == 4 * 4 * n  # + AdamW m, v
    step = m.plan_memory(2, 32, "train")                 # the step's gradients: in its arena
    assert step["fixed_bytes"] == 3 * 4 * n and step["arena_bytes"] >= 4 * n, step


@pytest.mark.parametrize("device", DEVICES)
def test_the_first_backward_makes_the_same_gradients_as_eager_ones(device):
    x, y = batch(2)
    lazy, eager = model(device), model(device)
    eager.flat_grads                                  # made (zeroed) before any backward
    before = held(lazy)
    assert lazy.loss(x, y, backward=True) == eager.loss(x, y, backward=True)
    assert held(lazy) - before >= grad_bytes(lazy)    # the gradients (and the train arena)
    np.testing.assert_array_equal(lazy.flat_grads, eager.flat_grads)
    assert np.abs(lazy.flat_grads).sum() > 0
    once = eager.flat_grads.copy()
    lazy.loss(x, y, backward=True)                    # a second backward accumulates
    eager.loss(x, y, backward=True)
    np.testing.assert_array_equal(lazy.flat_grads, eager.flat_grads)
    np.testing.assert_allclose(lazy.flat_grads, 2 * once, rtol=2e-5, atol=1e-8)


def test_the_first_backward_matches_finite_differences():
    m = model(seed=5)
    x, y = batch(3, B=2, T=8)
    m.loss(x, y, backward=True)
    g = m.flat_grads.copy()
    p = m.flat_params
    eps = 1e-2
    for i in np.argsort(-np.abs(g))[:5]:              # the largest: above fp32 noise
        old = p[i]
        p[i] = old + eps
        up = m.loss(x, y)
        p[i] = old - eps
        down = m.loss(x, y)
        p[i] = old
        fd = (up - down) / (2 * eps)
        assert abs(fd - g[i]) <= 2e-2 * abs(g[i]) + 1e-4, (i, fd, g[i])


@pytest.mark.parametrize("device", DEVICES)
def test_reading_grads_on_a_fresh_model_gives_zeros(device):
    m = model(device)
    g = m.grads["layers.1.wq"]
    assert g.shape == m.params["layers.1.wq"].shape
    assert not np.asarray(g).any() and not m.flat_grads.any()
    assert held(m) == param_bytes(m) + grad_bytes(m)
    assert m.grads["tok_emb"].base is not None        # views of the one flat buffer


def test_zero_grad_on_a_fresh_model_is_fine_and_allocates_nothing():
    m = model()
    m.zero_grad()
    assert held(m) == param_bytes(m)
    assert not m.flat_grads.any()
    x, y = batch(4)
    m.loss(x, y, backward=True)
    assert m.flat_grads.any()
    m.zero_grad()
    assert not m.flat_grads.any()


@pytest.mark.parametrize("levers", [{}, dict(gradient_checkpointing=True), dict(fused_ce=True),
                                    dict(cheap_recompute=True), dict(fp16_activations=True)],
                         ids=["plain", "ckpt", "fused_ce", "cheap", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_steps_from_a_fresh_model_like_from_eager_gradients(device, levers):
    """Bit for bit, with every lever: the fresh model's steps keep their own
    gradients in their arena (each parameter's first writer overwrites what
    activations left in its bytes, later writers add); the other's add into
    the gradients it holds."""
    lazy, eager = model(device, seed=4), model(device, seed=4)
    eager.flat_grads
    for m in (lazy, eager):
        m.set_levers(**levers)
    ta = smedjan.Trainer(lazy, lr=3e-3, warmup=1, steps=6, clip=0.5)
    tb = smedjan.Trainer(eager, lr=3e-3, warmup=1, steps=6, clip=0.5)
    for i in range(3):
        x, y = batch(10 + i)
        assert ta.step(x, y) == tb.step(x, y), i
    np.testing.assert_array_equal(lazy.flat_params, eager.flat_params)
    assert not lazy._h.holds()[0] and eager._h.holds()[0]
    assert held(lazy) < held(eager)


@pytest.mark.parametrize("device", DEVICES)
def test_a_train_step_holds_no_gradients_and_plans_its_peak_to_the_byte(device):
    m = model(device, seed=8)
    x, y = batch(9)
    plan = m.plan_memory(3, 21, "train")
    tr = smedjan.Trainer(m, lr=1e-3, warmup=0, steps=4)
    tr.step(x, y)
    tr.step(x, y)
    assert not m._h.holds()[0]
    assert m.memory()["peak_bytes"] == held(m) == plan["peak_bytes"], (m.memory(), plan)
    assert not m.flat_grads.any()                        # asked for: zeros, as after any step
    loss_a, _, _ = tr.step(x, y)                         # from now on added into the model's
    assert np.isfinite(loss_a) and not m.flat_grads.any()


@pytest.mark.parametrize("levers", [{}, dict(gradient_checkpointing=True), dict(fused_ce=True),
                                    dict(cheap_recompute=True), dict(fp16_activations=True)],
                         ids=["plain", "ckpt", "fused_ce", "cheap", "fp16"])
@pytest.mark.parametrize("name", ["small", "medium"])
def test_a_steps_gradients_ride_in_room_that_backward_frees(name, levers):
    """Never more than the backward arena and the gradients apart; without
    levers (every activation kept), most of the gradients cost nothing."""
    m = smedjan.Model(name)
    m.set_levers(**levers)
    step = m.plan_memory(4, 128, "train")["arena_bytes"]
    apart = m.plan_memory(4, 128, "backward")["arena_bytes"] + grad_bytes(m)
    assert step <= apart, (step, apart)
    if not levers:
        assert step - (apart - grad_bytes(m)) < grad_bytes(m) / 4, (step, apart)


def test_an_optimizer_step_before_any_backward_sees_zero_gradients():
    lazy, eager = model(seed=6), model(seed=6)
    eager.flat_grads
    ta = smedjan.Trainer(lazy, lr=1e-2, warmup=0, steps=4, weight_decay=0.1)
    tb = smedjan.Trainer(eager, lr=1e-2, warmup=0, steps=4, weight_decay=0.1)
    assert ta.optimizer_step() == tb.optimizer_step()
    np.testing.assert_array_equal(lazy.flat_params, eager.flat_params)


@pytest.mark.parametrize("with_grads", [False, True])
def test_a_move_carries_gradients_only_if_they_exist(with_grads):
    m = model()
    x, y = batch(5)
    if with_grads:
        m.loss(x, y, backward=True)
    g = m.flat_grads.copy() if with_grads else None
    p = m.flat_params.copy()
    m.to("cpu-staged")
    assert held(m) == param_bytes(m) + (grad_bytes(m) if with_grads else 0)
    m.to("cpu")
    assert held(m) == param_bytes(m) + (grad_bytes(m) if with_grads else 0)
    np.testing.assert_array_equal(m.flat_params, p)
    if with_grads:
        np.testing.assert_array_equal(m.flat_grads, g)
    else:
        assert not m.flat_grads.any()


@pytest.mark.parametrize("with_grads", [False, True])
def test_checkpoint_round_trip_with_and_without_gradients(tmp_path, with_grads):
    m = model(seed=7)
    tr = smedjan.Trainer(m, lr=3e-3, warmup=1, steps=4)
    x, y = batch(6)
    if with_grads:
        tr.step(x, y)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count)
    m2 = model_from_checkpoint(p)                     # weights only: nothing for gradients
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)
    assert held(m2) == param_bytes(m2)
    np.testing.assert_array_equal(m2.forward(x), m.forward(x))
    m3 = model(seed=99)
    tr3 = smedjan.Trainer(m3, lr=3e-3, warmup=1, steps=4)
    restore(load_checkpoint(p), m3, tr3)
    assert tr3.step(x, y) == tr.step(x, y)            # resumes bit for bit
    np.testing.assert_array_equal(m3.flat_params, m.flat_params)


def test_memory_limit_counts_the_gradients_a_backward_would_make():
    m = model()
    x, y = batch(7)
    arena, _ = m._h.plan_bytes(3, 21, 2)
    peak = param_bytes(m) + grad_bytes(m) + arena
    m.set_levers(memory_limit=peak - 1)
    with pytest.raises(MemoryError, match="over the limit"):
        m.loss(x, y, backward=True)
    assert held(m) == param_bytes(m)                  # refused before the gradients came
    m.set_levers(memory_limit=peak)                   # exactly enough: runs
    assert np.isfinite(m.loss(x, y, backward=True))
    assert m.memory()["peak_bytes"] == peak


# ---- CUDA: the same, and a captured train step sees the final gradient pointer

needs_gpu = pytest.mark.skipif(not cuda_ref.gpu_present(), reason="no CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_forward_holds_no_gradients(dtype):
    m = smedjan.Model(CFG, seed=3, device="cuda", dtype=dtype)
    n = m.n_params
    params = 4 * n      # the f32 master (a bf16 model makes its compute copy when it trains)
    assert held(m) == params
    x, _ = batch(8)
    m.forward_device(x)
    arena, _ = m._h.plan_bytes(3, 21, 0)
    assert held(m) == params + arena and m.memory()["peak_bytes"] == held(m)
    m.to("cpu")                                        # nothing to stage for gradients
    assert held(m) == 4 * n
    m.to("cuda", dtype)
    assert held(m) == params
    assert not m.flat_grads.numpy().any()              # made, zeroed, on first read
    assert held(m) == params + 4 * n


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_train_steps_from_a_fresh_model_like_from_eager_gradients(graphs):
    lazy = smedjan.Model(CFG, seed=4, device="cuda", dtype="bf16")
    eager = smedjan.Model(CFG, seed=4, device="cuda", dtype="bf16")
    eager.flat_grads
    for m in (lazy, eager):
        m._h.set_graphs(graphs)
    ta = smedjan.Trainer(lazy, lr=3e-3, warmup=1, steps=8, clip=0.5)
    tb = smedjan.Trainer(eager, lr=3e-3, warmup=1, steps=8, clip=0.5)
    for i in range(4):                                 # eager first step, then the captured graph
        x, y = batch(20 + i)
        assert ta.step(x, y) == tb.step(x, y), i
    np.testing.assert_array_equal(lazy.flat_params.numpy(), eager.flat_params.numpy())
    assert not lazy._h.holds()[0] and held(lazy) < held(eager)   # its own: in each step's arena


def test_a_move_keeps_the_attached_tokenizer():
    m = smedjan.Model("tiny")
    m.tokenizer = tok = object()
    m.to("cpu-staged")
    assert m.tokenizer is tok
