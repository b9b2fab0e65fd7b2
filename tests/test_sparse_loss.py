"""The sparse loss runs the final norm, LM head and cross-entropy only at the
label positions (targets not ignored), gathered from the residual stream and
padded to a label bucket; it computes the dense loss restricted to those
positions: the same loss value and every gradient within 1e-6 relative in
f32, whatever the mask, head, loss path or recompute lever, on the CPU and
through the device code path ('cpu-staged'). Training with it gives the dense
run's weights, and a few planned shapes serve batches of any label count."""
import argparse

import numpy as np
import pytest

import smedjan
from smedjan.argtypes import ascending_sizes
from smedjan.sweep import expand, kind_of
from conftest import rel_err

B, T = 3, 16                 # 48 positions
BUCKETS = [4, 8, 16]         # 16 is the largest: above it, multiples of 16


def config(vocab=517, tied=True):
    # 517: an odd vocabulary, whose head runs at a padded stride
    return smedjan.Config.custom(32, 2, 4, 2, vocab_size=vocab, max_seq_len=64,
                                 tied_head=tied)


def model(cfg, device="cpu", **levers):
    m = smedjan.Model(cfg, seed=7, device=device)
    r = np.random.default_rng(1)
    for v in m.params.values():       # norm gains away from 1.0: their grads must be right
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    m.set_levers(**levers)
    return m


def labelled(mask, seed=0, V=517):
    """Tokens and targets with `mask` positions labelled, the rest -1."""
    r = np.random.default_rng(seed)
    x = r.integers(0, V, (B, T)).astype(np.int32)
    y = r.integers(0, V, (B, T)).astype(np.int32)
    y[~mask] = -1
    return x, y


def mask_of(kind, seed=0):
    r = np.random.default_rng(seed)
    m = np.zeros(B * T, bool)
    count = {"one_label": 1, "on_a_bucket": 16, "above_the_largest": 21, "all": B * T}.get(kind)
    if count is None:                     # random, about 40% (SFT-like)
        m = r.random(B * T) < 0.4
    else:
        m[r.choice(B * T, count, replace=False)] = True
    return m.reshape(B, T)


def assert_same_loss_and_grads(dense, sparse, x, y):
    ld = dense.loss(x, y, backward=True)
    ls = sparse.loss(x, y, backward=True)
    assert abs(ls - ld) <= 1e-6 * abs(ld), (ls, ld)
    for name in dense.grads:
        gd, gs = dense.grads[name], sparse.grads[name]
        assert rel_err(gs, gd) <= 1e-6, f"{name}: relative error {rel_err(gs, gd):.2e}"


MASKS = ["one_label", "on_a_bucket", "above_the_largest", "all", "random"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
def test_sparse_loss_equals_the_dense_loss_and_grads(mask, tied, device):
    cfg = config(tied=tied)
    x, y = labelled(mask_of(mask, seed=len(mask)))
    dense = model(cfg, device)
    sparse = model(cfg, device, sparse_loss=True, label_bucket_sizes=BUCKETS)
    assert_same_loss_and_grads(dense, sparse, x, y)


@pytest.mark.parametrize("path", ["fused_ce", "matmul_ce_aligned", "matmul_ce_odd_vocab"])
@pytest.mark.parametrize("lever", [None, "gradient_checkpointing", "cheap_recompute"])
def test_sparse_loss_on_every_head_path_and_recompute_lever(monkeypatch, path, lever):
    """The fused head (lm_head_ce, which an odd vocabulary takes by default)
    and the head GEMM + cross-entropy, on an aligned vocabulary and on the
    odd one packed (SMEDJAN_VOCAB_ALIGN=1); with recompute levers on."""
    if path == "matmul_ce_odd_vocab":
        monkeypatch.setenv("SMEDJAN_VOCAB_ALIGN", "1")
    cfg = config(vocab=512 if path == "matmul_ce_aligned" else 517)
    levers = dict(fused_ce=path == "fused_ce", ce_rows=5)
    if lever:
        levers[lever] = True
    x, y = labelled(mask_of("random", seed=3), V=cfg.vocab_size)
    dense = model(cfg, **levers)
    sparse = model(cfg, **levers, sparse_loss=True, label_bucket_sizes=BUCKETS)
    assert_same_loss_and_grads(dense, sparse, x, y)
    nodes = sparse._h.plan_census(B, T, 2, int((y != -1).sum()))["nodes"]
    assert nodes["gather_rows"] == 1
    assert nodes["lm_head_ce" if path == "fused_ce" else "cross_entropy"] == 1


def test_sparse_loss_with_a_poisoned_arena(monkeypatch):
    """Padding rows and the rows no label names are never read stale."""
    monkeypatch.setenv("SMEDJAN_POISON", "1")
    cfg = config()
    x, y = labelled(mask_of("above_the_largest", seed=4))
    for device in ("cpu", "cpu-staged"):
        dense = model(cfg, device)
        sparse = model(cfg, device, sparse_loss=True, label_bucket_sizes=BUCKETS)
        assert_same_loss_and_grads(dense, sparse, x, y)
        assert np.isfinite(sparse.flat_grads).all()


def test_sparse_loss_honours_the_ignore_index_and_accumulation_denominator():
    cfg = config()
    x, y = labelled(mask_of("random", seed=5))
    y[y == -1] = -100
    dense, sparse = model(cfg), model(cfg, sparse_loss=True)
    for kw in (dict(ignore_index=-100), dict(ignore_index=-100, denom=40)):
        ld, ls = dense.loss(x, y, **kw), sparse.loss(x, y, **kw)
        assert abs(ls - ld) <= 1e-6 * abs(ld), (kw, ls, ld)


@pytest.mark.parametrize("device", ["cpu", "cpu-staged"])
def test_training_with_the_sparse_loss_gives_the_dense_weights(device):
    cfg = config(tied=False)
    dense = model(cfg, device)
    sparse = model(cfg, device, sparse_loss=True, label_bucket_sizes=BUCKETS)
    td = smedjan.Trainer(dense, lr=3e-3, warmup=2, steps=20)
    ts = smedjan.Trainer(sparse, lr=3e-3, warmup=2, steps=20)
    for i in range(20):
        x, y = labelled(mask_of(MASKS[i % len(MASKS)], seed=100 + i), seed=100 + i)
        rd, rs = td.step(x, y), ts.step(x, y)
        assert abs(rs.loss - rd.loss) <= 1e-6 * abs(rd.loss), (i, rs.loss, rd.loss)
        assert rs.tokens == rd.tokens
    assert rel_err(sparse.flat_params, dense.flat_params) <= 1e-6
    for name in dense.params:
        assert rel_err(sparse.params[name], dense.params[name]) <= 1e-6, name


def test_label_buckets_keep_the_planned_shapes_few():
    """Batches of every label count reuse one plan per bucket: 1..48 labels
    with buckets 4, 8, 16 take 4, 8, 16, 32 or 48 rows (above 16, multiples
    of 16, at most B*T)."""
    m = model(config(), sparse_loss=True, label_bucket_sizes=[8, 16, 32])
    tr = smedjan.Trainer(m, lr=1e-3, steps=60)
    r = np.random.default_rng(9)
    seen = set()
    for i in range(40):
        mask = np.zeros(B * T, bool)
        mask[r.choice(B * T, int(r.integers(1, B * T + 1)), replace=False)] = True
        tr.step(*labelled(mask.reshape(B, T), seed=i))
        seen |= {p[3] for p in m._h.plans()["cached"]}
    assert seen <= {8, 16, 32, 48}, seen
    assert m._h.plans()["recorded"] == len(seen)   # each shape recorded once, then reused


@pytest.mark.parametrize("buckets,labels,rows", [
    ([4, 8, 16], 1, 4), ([4, 8, 16], 8, 8), ([4, 8, 16], 9, 16), ([4, 8, 16], 17, 32),
    ([4, 8, 16], 48, 48), ([4, 8, 16], 0, 4),
    ([], 10, 64), ([], 64, 64), ([], 65, 128), ([], 150, 160)])
def test_label_rows_are_the_bucket_that_holds_the_labels(buckets, labels, rows):
    Bn, Tn = (3, 16) if buckets else (4, 40)
    m = model(config(), sparse_loss=True, label_bucket_sizes=buckets)
    mask = np.zeros(Bn * Tn, bool)
    mask[:labels] = True
    r = np.random.default_rng(0)
    x = r.integers(0, 517, (Bn, Tn)).astype(np.int32)
    y = np.where(mask.reshape(Bn, Tn), x, -1).astype(np.int32)
    loss = m.loss(x, y)
    assert np.isnan(loss) if labels == 0 else np.isfinite(loss)
    assert [p[3] for p in m._h.plans()["cached"]] == [rows]


def test_sparse_plans_a_smaller_arena():
    cfg = config(vocab=4096)
    dense = model(cfg)
    sparse = model(cfg, sparse_loss=True, label_bucket_sizes=[64, 128])
    pd = dense.plan_memory(4, 64)
    assert sparse.plan_memory(4, 64)["arena_bytes"] == pd["arena_bytes"]   # worst case: all labelled
    few = sparse.plan_memory(4, 64, labels=100)
    assert few["arena_bytes"] < pd["arena_bytes"] - 4 * 128 * cfg.vocab_size, (few, pd)


def test_levers_report_and_validate_the_label_buckets():
    m = model(config())
    lv = m.set_levers(sparse_loss=True, label_bucket_sizes=[64, 128, 256, 512])
    assert lv["sparse_loss"] and lv["label_bucket_sizes"] == [64, 128, 256, 512]
    for bad, msg in (([128, 64], "ascending"), ([64, 64], "ascending"), ([0, 8], "positive"),
                     ([-4], "positive"), (list(range(1, 18)), "at most 16")):
        with pytest.raises(ValueError, match=f"label_bucket_sizes.*{msg}"):
            m.set_levers(label_bucket_sizes=bad)
    with pytest.raises(TypeError, match="label_bucket_sizes"):
        m.set_levers(label_bucket_sizes="64,128")
    assert m.levers["label_bucket_sizes"] == [64, 128, 256, 512]   # a refusal changes nothing
    t = smedjan.Trainer(m, steps=2, sparse_loss=False, label_bucket_sizes=[])
    assert not t.model.levers["sparse_loss"] and t.model.levers["label_bucket_sizes"] == []


def test_command_line_and_sweep_take_the_label_buckets():
    assert ascending_sizes("64,128,256,512") == [64, 128, 256, 512]
    for bad in ("64,32", "0,8", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            ascending_sizes(bad)
    rows = expand({"sparse_loss": [False, True], "label_bucket_sizes": [64, 128, 256, 512]})
    assert [r["label_bucket_sizes"] for r in rows] == [[64, 128, 256, 512]] * 2
    assert kind_of(rows[1]) == "small_sparse_lbl64_512"
    rows = expand({"label_bucket_sizes": [[32, 64], [64, 128]]})
    assert [r["label_bucket_sizes"] for r in rows] == [[32, 64], [64, 128]]
