"""The residual add lives in the projection GEMM (matmul_add), the residual
stream's gradient is one buffer shared by every layer (no copies), RoPE
and SwiGLU ride the projections that feed them (matmul_rope,
matmul_swiglu: no separate pass, and a forward-only run never keeps the
gate/up product): the planned tape says so, it never plans more memory
than the unfused one, and it computes exactly what the unfused tape
computes (on the CPU, bit for bit: the fused ops there are the GEMM then
the elementwise kernel), with every lever and through the device code
path ('cpu-staged'), poisoned arena included.

The reference is the same model planned with SMEDJAN_UNFUSED=1 (tests only):
matmul + add, rope and swiglu as their own ops, and no storage shared in
place but the loss's; SMEDJAN_UNFUSED=add plans that tape's rope in place."""
import numpy as np
import pytest

import smedjan
from test_levers import CFG, batch, model

MODES = {"forward": 0, "loss": 1, "train": 2}


def census(m, B, T, mode="train"):
    return m._h.plan_census(B, T, MODES[mode])


def unfused(monkeypatch, fn, how="1"):
    """fn() with plans recorded as the reference (plans are cached: planned here, kept)."""
    monkeypatch.setenv("SMEDJAN_UNFUSED", how)
    try:
        return fn()
    finally:
        monkeypatch.delenv("SMEDJAN_UNFUSED")


@pytest.mark.parametrize("name", ["small", "medium"])
def test_residuals_are_one_gemm_and_rope_and_swiglu_ride_their_projections(name):
    m = smedjan.Model(name)
    L = m.config.n_layers
    c = census(m, 2, 64)
    assert c["nodes"]["add"] == 0 and c["nodes"]["matmul_add"] == 2 * L, c
    # backward: every residual gradient is dy itself (no copy kernel)
    assert c["in_place"]["matmul_add"] == 2 * L, c
    assert c["in_place"]["cross_entropy"] == 0, c   # the host path keeps the logits apart
    # the QKV product is rotated and the gate/up product gated as they are
    # made, one node each per layer, in training and inference alike
    for mode in ("train", "forward", "loss"):
        f = census(m, 2, 64, mode)["nodes"]
        assert f["matmul_rope"] == f["matmul_swiglu"] == L, f
        assert f["rope"] == f["swiglu"] == f["matmul"] - 1 == 0, f   # the LM head's matmul


def test_cheap_recompute_keeps_swiglu_apart():
    """It drops SwiGLU's output and redoes it from the kept gate/up product,
    which a fused node would only give back by redoing the GEMM."""
    c = census(model(cheap_recompute=True), 4, 33)["nodes"]
    L = CFG.n_layers
    assert c["matmul_rope"] == c["swiglu"] == L and c["matmul_swiglu"] == 0, c


def test_checkpointing_recomputes_in_place_too(monkeypatch):
    c = census(model(gradient_checkpointing=True), 4, 33)
    assert c["in_place"]["matmul_add"] == 2 * CFG.n_layers, c
    # the reference tape's rope: forward, recompute and backward in place
    c = unfused(monkeypatch, lambda: census(model(gradient_checkpointing=True), 4, 33), "add")
    assert c["in_place"]["rope"] == 3 * CFG.n_layers, c


def test_the_device_path_also_overwrites_the_logits_with_their_gradient():
    c = census(model(device="cpu-staged"), 4, 33)
    assert c["in_place"]["cross_entropy"] == 1 and c["in_place"]["matmul_add"] == 2 * CFG.n_layers, c


def test_the_reference_is_the_unfused_tape(monkeypatch):
    m = model()
    c = unfused(monkeypatch, lambda: census(m, 4, 33))
    assert c["nodes"]["matmul_add"] == 0 and c["nodes"]["add"] == 2 * CFG.n_layers, c
    assert not any(c["in_place"].values()), c
    # matmul + add, planned in place: the add's backward hands dy to the residual
    c = unfused(monkeypatch, lambda: census(m, 4, 33), "add")
    assert c["in_place"]["add"] == 2 * CFG.n_layers and c["in_place"]["rope"] == 2 * CFG.n_layers, c


@pytest.mark.parametrize("levers", [{}, dict(gradient_checkpointing=True),
                                    dict(fp16_activations=True), dict(fused_ce=True)],
                         ids=["plain", "ckpt", "fp16", "fused_ce"])
@pytest.mark.parametrize("name", ["small", "medium"])
def test_fusions_never_plan_more_memory(name, levers, monkeypatch):
    m = smedjan.Model(name)
    m.set_levers(**levers)
    for mode in (["forward", "loss", "backward"] if not levers else ["backward"]):
        ref = unfused(monkeypatch, lambda: m.plan_memory(4, 128, mode))
        got = m.plan_memory(4, 128, mode)
        assert got["arena_bytes"] <= ref["arena_bytes"], (mode, got, ref)
        assert got["kept_bytes"] <= ref["kept_bytes"], (mode, got, ref)


@pytest.mark.parametrize("how", ["1", "add"], ids=["unfused", "add_in_place"])
@pytest.mark.parametrize("levers", [{}, dict(gradient_checkpointing=True),
                                    dict(fp16_activations=True),
                                    dict(fp16_activations=True, gradient_checkpointing=True),
                                    dict(fused_ce=True, ce_rows=7)],
                         ids=["plain", "ckpt", "fp16", "fp16_ckpt", "fused_ce"])
@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
def test_fused_tape_equals_the_reference_bit_for_bit(device, levers, how, monkeypatch):
    monkeypatch.setenv("SMEDJAN_POISON", "1")    # a read of storage nobody wrote is NaN
    x, y = batch(1)
    a, b = model(device=device, **levers), model(device=device, **levers)
    la = unfused(monkeypatch, lambda: a.loss(x, y, backward=True), how)
    lb = b.loss(x, y, backward=True)
    assert la == lb and np.isfinite(lb), (la, lb)
    np.testing.assert_array_equal(b.flat_grads, a.flat_grads)
    assert np.isfinite(b.flat_grads).all()
    np.testing.assert_array_equal(b.forward(x), unfused(monkeypatch, lambda: a.forward(x), how))


@pytest.mark.parametrize("B,T", [(1, 1), (1, 3), (3, 5), (2, 33)])
@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
def test_forward_only_runs_equal_the_reference_at_every_size(device, B, T, monkeypatch):
    """The unfused pair behind matmul_swiglu runs in chunks of rows (at most
    half of them): one row, odd counts and a last short chunk give the
    reference's logits and loss bit for bit."""
    monkeypatch.setenv("SMEDJAN_POISON", "1")
    x, y = batch(2, B=B, T=T)
    a, b = model(device=device), model(device=device)
    np.testing.assert_array_equal(b.forward(x), unfused(monkeypatch, lambda: a.forward(x)))
    # one row of at most 5 tokens: every target ignored, both losses NaN (a mean of none)
    np.testing.assert_array_equal(b.loss(x, y), unfused(monkeypatch, lambda: a.loss(x, y)))


def test_medium_preset_loss_and_grads_equal_the_reference(monkeypatch):
    cfg = smedjan.Config.preset("medium", vocab_size=512)
    x, y = batch(2, B=2, T=24, V=512)
    a, b = model(cfg=cfg, seed=1), model(cfg=cfg, seed=1)
    la = unfused(monkeypatch, lambda: a.loss(x, y, backward=True))
    lb = b.loss(x, y, backward=True)
    assert abs(la - lb) <= 1e-6 * abs(la), (la, lb)
    err = np.abs(b.flat_grads - a.flat_grads).max() / np.abs(a.flat_grads).max()
    assert err <= 1e-6, err


def test_fused_training_with_grad_accum_equals_the_reference(monkeypatch):
    """Several optimizer steps, micro-batches accumulating into the same
    gradients (accumulate flags and shared storage must agree)."""
    a, b = model(seed=5), model(seed=5)
    ta = smedjan.Trainer(a, lr=3e-3, warmup=1, steps=6, grad_accum=2)
    tb = smedjan.Trainer(b, lr=3e-3, warmup=1, steps=6, grad_accum=2)
    for i in range(3):
        x, y = batch(10 + i)
        ra = unfused(monkeypatch, lambda: ta.step(x, y))
        rb = tb.step(x, y)
        assert ra == rb, (i, ra, rb)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_place_rules_where_each_one_binds(seed):
    """A small tape (csrc/ops/gradcheck.c) where x = qk_norm(x0) feeds two
    ropes, their sum feeds a third and a matmul_add: the first rope may not
    overwrite x (the second still reads it), only one of the add's inputs may
    take dy, the other rope's input gradient then accumulates; qk_norm may
    not overwrite x0 (its backward reads it) but its backward writes x0's
    gradient over x's; then a value mix and an axpy. As planned and with
    nothing shared, output and gradients agree bit for bit."""
    from smedjan import _C
    diff, in_place = _C.tape_inplace_check(seed)
    assert diff == 0.0, diff
    # forward: rope(x) #2, rope(z), mix; backward: axpy, mix, rope(z), rope #2, add,
    # matmul_add, qk_norm
    assert in_place == dict(in_place, rope=4, add=1, matmul_add=1, mix=2, axpy=1, qk_norm=1), in_place
    assert sum(in_place.values()) == 10, in_place
