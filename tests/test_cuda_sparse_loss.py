"""The sparse loss on CUDA: the final norm, LM head and loss at the label
rows only equal the dense loss restricted to them (loss and every gradient;
fp32 within 1e-5 as the CUDA fp32 mode meets the CPU, bf16 within 2e-2 as one
kernel rounding once), eagerly and through the captured train step, and a
captured step replays for batches of different label counts in one bucket,
each seeing its own label rows. Skipped without a GPU (tests/cuda_ref.py)."""
import numpy as np
import pytest

import smedjan
import cuda_ref as ref
from conftest import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")]

TOL = {"fp32": 1e-5, "bf16": 2e-2}
B, T = 4, 64                       # 256 positions
BUCKETS = [32, 64, 128]            # above 128: multiples of 128
HEADS = {"matmul_ce": (256, False), "fused_ce": (256, True), "odd_vocab": (517, False)}


def model(head, dtype, tied=True, **levers):
    vocab, fused = HEADS[head]
    cfg = smedjan.Config.custom(128, 2, 4, 2, vocab_size=vocab, max_seq_len=128, tied_head=tied)
    m = smedjan.Model(cfg, seed=3, device="cuda", dtype=dtype)
    r = np.random.default_rng(1)
    for n, v in m.params.items():
        if len(v.shape) == 1:       # norm gains away from 1.0 (whole writes refresh the copy)
            m.params[n][:] = r.uniform(0.5, 1.5, v.shape).astype(np.float32)
    m.set_levers(fused_ce=fused, **levers)
    return m


def batch(labels, vocab, seed):
    """Tokens and targets with `labels` positions labelled (random), the rest -1."""
    r = np.random.default_rng(seed)
    x = r.integers(0, vocab, (B, T)).astype(np.int32)
    y = r.integers(0, vocab, (B, T)).astype(np.int32)
    keep = np.zeros(B * T, bool)
    keep[r.choice(B * T, labels, replace=False)] = True
    y[~keep.reshape(B, T)] = -1
    return x, y


def host(x):
    return np.asarray(x)   # DeviceTensors copied to the host


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("labels", [1, 64, 150, 256], ids=["one", "on_a_bucket", "above", "all"])
def test_sparse_loss_equals_the_dense_loss_and_grads_on_gpu(dtype, head, tied, labels):
    dense = model(head, dtype, tied)
    sparse = model(head, dtype, tied, sparse_loss=True, label_bucket_sizes=BUCKETS)
    x, y = batch(labels, HEADS[head][0], seed=labels)
    ld, ls = dense.loss(x, y, backward=True), sparse.loss(x, y, backward=True)
    assert abs(ls - ld) <= TOL[dtype] * abs(ld), (ls, ld)
    for name in dense.grads:
        e = rel_err(host(sparse.grads[name]), host(dense.grads[name]))
        assert e < TOL[dtype], f"{name} [{dtype}]: relative error {e:.3e}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_sparse_training_through_the_captured_step_gives_the_dense_weights(dtype, head):
    dense = model(head, dtype)
    sparse = model(head, dtype, sparse_loss=True, label_bucket_sizes=BUCKETS)
    td = smedjan.Trainer(dense, lr=3e-3, warmup=2, steps=20)
    ts = smedjan.Trainer(sparse, lr=3e-3, warmup=2, steps=20)
    counts = np.random.default_rng(7).integers(1, B * T + 1, 20)
    for i, n in enumerate(counts):
        x, y = batch(int(n), HEADS[head][0], seed=100 + i)
        rd, rs = td.step(x, y), ts.step(x, y)
        assert abs(rs.loss - rd.loss) <= TOL[dtype] * abs(rd.loss), (i, rs.loss, rd.loss)
    e = rel_err(host(sparse.flat_params), host(dense.flat_params))
    assert e < TOL[dtype], f"weights [{dtype}]: relative error {e:.3e}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_captured_step_replays_for_two_label_counts_in_one_bucket(dtype):
    """40 and 60 labels both take the 64-row bucket: one plan, captured once
    and replayed, whose label rows and targets are copied in at each replay:
    every step equals an eager model's bit for bit, and its loss a dense
    model's trained alongside."""
    graph = model("matmul_ce", dtype, sparse_loss=True, label_bucket_sizes=BUCKETS)
    eager = model("matmul_ce", dtype, sparse_loss=True, label_bucket_sizes=BUCKETS)
    eager._h.set_graphs(False)
    dense = model("matmul_ce", dtype)
    tg, te, td = (smedjan.Trainer(m, lr=3e-3, warmup=1, steps=8) for m in (graph, eager, dense))
    for i in range(8):
        x, y = batch(40 if i % 2 else 60, 256, seed=200 + i)
        rg, re, rd = tg.step(x, y), te.step(x, y), td.step(x, y)
        assert tuple(rg) == tuple(re), (i, rg, re)
        assert abs(rg.loss - rd.loss) <= TOL[dtype] * abs(rd.loss), (i, rg.loss, rd.loss)
    np.testing.assert_array_equal(host(graph.flat_params), host(eager.flat_params))
    plans = graph._h.plans()
    assert [p[3] for p in plans["cached"]] == [64] and plans["recorded"] == 1, plans
