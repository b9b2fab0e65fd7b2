"""Memory levers change how much memory a step needs, never what it computes:
gradient checkpointing gives bit-identical gradients, the fused LM-head loss
gives the unfused loss and gradients (up to fp32 summation order of the head's
weight gradient), gradient accumulation gives the big batch's update, and a
memory limit refuses a run before its activations are allocated. Each holds
on the CPU and through the device code path ('cpu-staged'), poisoned arena
included."""
import numpy as np
import pytest

import smedjan
from conftest import max_rel_err

# An aligned vocabulary: a vocabulary off a multiple of 64 takes the fused head
# (lm_head_ce) by default, which keeps nothing of the head from forward to backward.
CFG = smedjan.Config.custom(64, 3, 4, 2, vocab_size=320, max_seq_len=64)


def model(device="cpu", seed=3, cfg=CFG, **levers):
    m = smedjan.Model(cfg, seed=seed, device=device)
    r = np.random.default_rng(seed)
    for v in m.params.values():       # norm gains away from 1.0: their grads must be right
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    m.set_levers(**levers)
    return m


def batch(seed, B=4, T=33, V=300):
    r = np.random.default_rng(seed)
    x = r.integers(0, V, (B, T)).astype(np.int32)
    y = r.integers(0, V, (B, T)).astype(np.int32)
    y[0, :5] = -1                     # ignored targets count nowhere
    return x, y


RECOMPUTE = ["gradient_checkpointing", "cheap_recompute"]


@pytest.mark.parametrize("lever", RECOMPUTE)
@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
def test_checkpointing_gives_bit_identical_loss_and_grads(device, lever):
    x, y = batch(1)
    a, b = model(device), model(device, **{lever: True})
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)


# Every architecture option at once: tensors read across layers (the
# embedding, layer 0's v) must survive the blocks that recompute.
MIXED = smedjan.Config.custom(64, 3, 4, 2, vocab_size=320, max_seq_len=64, window=[6, 0, 6],
                              qk_norm=["weighted", "plain", "none"], ffn=["relu2", "swiglu", "relu2"],
                              paired_heads=True, value_mix=0.25, embed_skip=0.2, tied_head=False,
                              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16})


@pytest.mark.parametrize("cfg", [CFG, MIXED], ids=["plain", "mixed"])
@pytest.mark.parametrize("lever", RECOMPUTE)
def test_checkpointing_with_a_poisoned_arena(monkeypatch, lever, cfg):
    monkeypatch.setenv("SMEDJAN_POISON", "1")   # a stale read of a dropped activation is NaN
    x, y = batch(2)
    a, b = model(cfg=cfg), model(cfg=cfg, **{lever: True})
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)
    assert np.isfinite(b.flat_grads).all()


def test_checkpointing_frees_well_over_half_of_kept_activations():
    a, b = model(), model(gradient_checkpointing=True)
    pa, pb = a.plan_memory(8, 64), b.plan_memory(8, 64)
    assert pb["kept_bytes"] < 0.5 * pa["kept_bytes"], (pa, pb)
    assert pb["arena_bytes"] < pa["arena_bytes"], (pa, pb)


def test_cheap_recompute_drops_the_norm_and_swiglu_outputs():
    # Per layer and token a layer keeps 2 C + (H + 2 KV) hd + C + C + 2 F + F
    # values (x, norm out, qkv, attention out, x + attn, norm out, gate|up,
    # SwiGLU out) and each norm's 1 / rms; cheap recompute drops the norm
    # outputs and 1 / rms (redone together) and SwiGLU's output.
    a, b = model(), model(cheap_recompute=True)
    B, T, c = 8, 64, a.config
    pa, pb = a.plan_memory(B, T), b.plan_memory(B, T)
    dropped = 4 * B * T * (c.n_layers * (2 * (c.dim + 1) + c.ffn_dim) + c.dim + 1)   # + final norm
    assert pa["kept_bytes"] - pb["kept_bytes"] == dropped, (pa, pb, dropped)
    assert pb["arena_bytes"] < pa["arena_bytes"], (pa, pb)
    assert b.levers["cheap_recompute"] and not b.levers["gradient_checkpointing"]


@pytest.mark.parametrize("lever", RECOMPUTE)
def test_checkpointed_training_is_bit_identical(lever):
    a, b = model(seed=5), model(seed=5)
    ta = smedjan.Trainer(a, lr=3e-3, warmup=1, steps=6)
    tb = smedjan.Trainer(b, lr=3e-3, warmup=1, steps=6, **{lever: True})
    for i in range(4):
        x, y = batch(10 + i)
        assert ta.step(x, y) == tb.step(x, y), i
    np.testing.assert_array_equal(a.flat_params, b.flat_params)


@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
@pytest.mark.parametrize("rows", [0, 7, 1000])
def test_fused_ce_equals_the_unfused_loss_and_grads(device, rows):
    x, y = batch(3)
    a, b = model(device), model(device, fused_ce=True, ce_rows=rows)
    la, lb = a.loss(x, y), b.loss(x, y)
    assert abs(la - lb) <= 1e-6 * abs(la), (la, lb)
    la, lb = a.loss(x, y, backward=True), b.loss(x, y, backward=True)
    assert abs(la - lb) <= 1e-6 * abs(la), (la, lb)
    for name in a.grads:
        err = max_rel_err(b.grads[name], a.grads[name])
        assert err < 1e-5, (name, err)


def test_fused_ce_never_plans_the_full_logits():
    V, B, T = 4096, 8, 64                         # a vocabulary that dominates, as in practice
    cfg = smedjan.Config.custom(64, 2, 4, 2, vocab_size=V, max_seq_len=64)
    a, b = smedjan.Model(cfg), smedjan.Model(cfg)
    b.set_levers(fused_ce=True, ce_rows=64)
    pa, pb = a.plan_memory(B, T), b.plan_memory(B, T)
    logits = B * T * V * 4
    # unfused: the logits and their gradient at once; fused: one (64, V) chunk
    assert pa["arena_bytes"] - pb["arena_bytes"] >= 1.5 * logits, (pa, pb, logits)
    assert pb["arena_bytes"] < logits, (pb, logits)


def test_fused_ce_matches_torch():
    torch = pytest.importorskip("torch")
    from torch_ref import TorchLlama
    m = model(fused_ce=True, ce_rows=10)
    ref = TorchLlama(CFG)
    ref.load_from(m)
    x, y = batch(4)
    loss = m.loss(x, y, backward=True)
    tl = ref.loss(torch.from_numpy(x).long(), torch.from_numpy(y).long())
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5 * abs(tl.item()), (loss, tl.item())
    for name, g in m.grads.items():
        err = max_rel_err(g, ref.named(name).grad.numpy())
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("n", [2, 4])
def test_grad_accum_equals_the_big_batch(n):
    x, y = batch(6, B=8)
    y[5, 3:9] = -1                      # uneven counts per micro-batch
    a, b = model(seed=7), model(seed=7)
    ta = smedjan.Trainer(a, lr=1e-3, steps=5, clip=0.0)
    tb = smedjan.Trainer(b, lr=1e-3, steps=5, clip=0.0, grad_accum=n)
    la = a.loss(x, y, backward=True)
    g_big = a.flat_grads.copy()
    a.zero_grad()
    count = int(np.count_nonzero(y != -1))
    lb = sum(b.loss(x[i * 8 // n:(i + 1) * 8 // n], y[i * 8 // n:(i + 1) * 8 // n],
                    backward=True, denom=count) for i in range(n))
    assert abs(la - lb) < 1e-6 * abs(la), (la, lb)
    err = max_rel_err(b.flat_grads, g_big)
    assert err < 1e-5, err
    b.zero_grad()
    ra, rb = ta.step(x, y), tb.step(x, y)
    assert abs(ra.loss - rb.loss) < 1e-6 * abs(ra.loss), (ra, rb)
    assert abs(ra.grad_norm - rb.grad_norm) < 1e-5 * ra.grad_norm, (ra, rb)
    assert max_rel_err(b.flat_params, a.flat_params) < 1e-6


def test_grad_accum_refuses_a_batch_that_does_not_split():
    tr = smedjan.Trainer(model(), steps=2, grad_accum=3)
    x, y = batch(1, B=4)
    with pytest.raises(ValueError, match="grad_accum=3"):
        tr.step(x, y)


def test_all_levers_together_train_like_none():
    a, b = model(seed=9), model(seed=9)
    ta = smedjan.Trainer(a, lr=2e-3, steps=4)
    tb = smedjan.Trainer(b, lr=2e-3, steps=4, gradient_checkpointing=True, fused_ce=True,
                         grad_accum=2)
    for i in range(3):
        x, y = batch(20 + i)
        ra, rb = ta.step(x, y), tb.step(x, y)
        assert abs(ra.loss - rb.loss) < 1e-5 * abs(ra.loss), (i, ra, rb)
    assert max_rel_err(b.flat_params, a.flat_params) < 1e-5


def test_memory_limit_refuses_before_allocating_with_the_planned_figure():
    m = model()
    plan = m.plan_memory(8, 64)
    tr = smedjan.Trainer(m, steps=2, memory_limit=plan["peak_bytes"] - 1)
    before = m.memory()["bytes"]
    x, y = batch(1, B=8, T=64)
    with pytest.raises(MemoryError, match=r"plans a peak of [\d.]+ MiB.*over the limit"):
        tr.step(x, y)
    assert m.memory()["bytes"] == before           # nothing was allocated for it
    m.set_levers(memory_limit=plan["peak_bytes"])  # exactly enough: runs
    assert np.isfinite(tr.step(x, y).loss)
    assert m.memory()["peak_bytes"] <= plan["peak_bytes"]


def test_levers_are_reported_and_validated():
    m = model(gradient_checkpointing=True)
    assert m.levers["gradient_checkpointing"] is True and m.levers["fused_ce"] is False
    assert m.levers["cheap_recompute"] is False and m.levers["cast_on_use"] is False
    assert m.set_levers(cast_on_use=True)["cast_on_use"] is True   # fp32: nothing to drop
    assert m.memory()["bytes"] == model().memory()["bytes"]
    with pytest.raises(ValueError):
        m.set_levers(ce_rows=-1)
    with pytest.raises(ValueError):
        smedjan.Trainer(m, grad_accum=0)


def _token_file(tmp_path):
    from smedjan.data import write_tokens
    path = str(tmp_path / "d.tok")
    write_tokens(path, [np.random.default_rng(0).integers(0, 300, 30_000)], dtype="uint16")
    return path


def test_train_cli_takes_every_lever_flag(tmp_path, capsys):
    from smedjan.cli import main
    data = _token_file(tmp_path)
    rc = main(["train", "--data", data, "--vocab-size", "300", "--size", "custom", "--dim", "64",
               "--layers", "2", "--heads", "4", "--batch-size", "2", "--seq-len", "32",
               "--steps", "3", "--warmup", "1", "--val-fraction", "0", "--grad-accum", "2",
               "--gradient-checkpointing", "--cheap-recompute", "--fused-ce", "--memory-limit",
               "1GiB"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batch 2 x accum 2 x seq 32" in out and "step 3: loss" in out


def test_train_cli_memory_limit_refuses_with_the_planned_figure(tmp_path, capsys):
    from smedjan.cli import main
    data = _token_file(tmp_path)
    rc = main(["train", "--data", data, "--vocab-size", "300", "--size", "custom", "--dim", "64",
               "--layers", "2", "--heads", "4", "--batch-size", "16", "--seq-len", "64",
               "--steps", "2", "--memory-limit", "1MiB"])
    err = capsys.readouterr().err
    assert rc == 1 and "plans a peak of" in err and "MiB" in err, err


def test_train_cli_fp16_activations(tmp_path, capsys):
    from smedjan.cli import main
    rc = main(["train", "--data", _token_file(tmp_path), "--vocab-size", "300", "--size",
               "custom", "--dim", "64", "--layers", "2", "--heads", "4", "--steps", "2",
               "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--val-fraction", "0",
               "--fp16-activations"])
    assert rc == 0 and "step 2: loss" in capsys.readouterr().out


@pytest.mark.parametrize("ckpt", [False, True])
def test_fp16_activations_keep_the_loss_and_nearly_the_grads(ckpt):
    x, y = batch(8)
    a, b = model(), model(fp16_activations=True, gradient_checkpointing=ckpt)
    # forward reads the f32 originals: the loss is bit-identical
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    for name in a.grads:
        err = max_rel_err(b.grads[name], a.grads[name])
        assert err < 2e-2, (name, err)         # fp16 storage: ~3 significant digits
    assert not np.array_equal(a.flat_grads, b.flat_grads)   # it did store halves


def test_fp16_activations_halve_the_kept_activations():
    a, b = model(), model(fp16_activations=True)
    pa, pb = a.plan_memory(8, 64), b.plan_memory(8, 64)
    assert pb["kept_bytes"] < 0.6 * pa["kept_bytes"], (pa, pb)


def test_fp16_activations_through_the_device_path_poisoned(monkeypatch):
    monkeypatch.setenv("SMEDJAN_POISON", "1")
    x, y = batch(9)
    a, b = model(fp16_activations=True), model("cpu-staged", fp16_activations=True)
    assert a.loss(x, y, backward=True) == b.loss(x, y, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)
    assert np.isfinite(a.flat_grads).all()
