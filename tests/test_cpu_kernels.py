"""The CPU backend's kernels, called one at a time through the kernel hook
(`_C.cuda_op(name, "cpu", ...)`, every build), against the float64
references that the CUDA kernels meet too (tests/cuda_ref.py). Outputs start
poisoned (NaN), so an element a kernel forgets to write fails; accumulating
kernels start from random values that must survive."""
import numpy as np
import pytest

from smedjan import _C
import cuda_ref as ref
from conftest import rel_err
from cuda_ref import poison

TOL = 1e-6   # f32 against float64


def op(name, arrays, ints=(), floats=()):
    return _C.cuda_op(name, "cpu", arrays, tuple(int(i) for i in ints), tuple(float(f) for f in floats))


def close(got, want, what, tol=TOL):
    e = rel_err(got, want)
    assert e < tol, f"{what} [cpu]: relative error {e:.3e}"


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("act", ["swiglu", "relu2"])
def test_swiglu_kernels(act, rng):
    N, F = 13, 40
    gu, dh = rnd(rng, N, 2 * F, scale=2.0), rnd(rng, N, F)
    k = ref.FFN[act]
    h = op("swiglu_forward", {"h": poison((N, F)), "gu": gu}, (N, F, k))["h"]
    close(h, ref.swiglu_fwd(gu, F, act), f"{act} forward")
    for accum in (0, 1):
        d0 = rnd(rng, N, 2 * F) if accum else poison((N, 2 * F))
        got = op("swiglu_backward", {"dgu": d0, "dh": dh, "gu": gu}, (N, F, accum, k))["dgu"]
        close(got, ref.swiglu_bwd(dh, gu, F, act) + (np.float64(d0) if accum else 0), f"{act} backward")


def test_add_and_copy_kernels(rng):
    n = 1001
    a, b = rnd(rng, n), rnd(rng, n)
    close(op("add", {"out": poison(n), "a": a, "b": b}, (n,))["out"], np.float64(a) + b, "add")
    close(op("copy", {"dst": poison(n), "src": a}, (n, 0))["dst"], a, "copy")
    close(op("copy", {"dst": b, "src": a}, (n, 1))["dst"], np.float64(a) + b, "copy accum")


def test_add_and_copy_take_a_factor(rng):
    """axpy: out = x + s y, and its backward dy (+)= s dout."""
    n, s = 1001, -0.35
    a, b = rnd(rng, n), rnd(rng, n)
    close(op("add", {"out": poison(n), "a": a, "b": b}, (n,), (s,))["out"], np.float64(a) + s * b, "axpy")
    close(op("copy", {"dst": poison(n), "src": a}, (n, 0), (s,))["dst"], s * np.float64(a), "scale")
    close(op("copy", {"dst": b, "src": a}, (n, 1), (s,))["dst"], s * np.float64(a) + b, "scale accum")


@pytest.mark.parametrize("accum", [0, 1])
def test_pair_heads_kernels(accum, rng):
    N, H, hd = 11, 6, 5
    x, dout = rnd(rng, N, H * hd), rnd(rng, N, H // 2 * hd)
    out = op("pair_heads_forward", {"out": poison((N, H // 2 * hd)), "in": x}, (N, H, hd))["out"]
    close(out, ref.pair_heads_fwd(x, H, hd), "pair_heads forward")
    d0 = rnd(rng, N, H * hd) if accum else poison((N, H * hd))
    din = op("pair_heads_backward", {"din": d0, "dout": dout}, (N, H, hd, accum))["din"]
    close(din, ref.pair_heads_bwd(dout, H, hd) + (np.float64(d0) if accum else 0), "pair_heads backward")


MIX = (13, 24, 8, 4, 0.3)   # N, ld, c0, w, a: the v columns of a (q | k | v) row


@pytest.mark.parametrize("in_place", [False, True])
def test_mix_forward_kernel(in_place, rng):
    N, ld, c0, w, a = MIX
    x, y = rnd(rng, N, ld), rnd(rng, N, ld)
    out = op("mix_forward", {"out": poison((N, ld)), "x": x, "y": y}, (N, ld, c0, w, in_place), (a,))
    close(out["out"], ref.mix_fwd(x, y, c0, w, a), "mix forward")


@pytest.mark.parametrize("accum_x,accum_y", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("how", ["apart", "dx_in_dout", "no_dy"])
def test_mix_backward_kernel(accum_x, accum_y, how, rng):
    """dx off the slice is dout; dy off the slice is zero when overwritten and
    untouched when accumulated into; dx may be dout itself (the tape shares
    it when dx is first written), dy may be absent."""
    N, ld, c0, w, a = MIX
    if how == "dx_in_dout" and accum_x:
        pytest.skip("dx shares dout's storage only when it overwrites")
    dout = rnd(rng, N, ld)
    dx0 = rnd(rng, N, ld) if accum_x else poison((N, ld))
    dy0 = rnd(rng, N, ld) if accum_y or how == "no_dy" else poison((N, ld))
    got = op("mix_backward", {"dx": dx0, "dy": dy0, "dout": dout},
             (N, ld, c0, w, accum_x, accum_y, how == "dx_in_dout", how == "no_dy"), (a,))
    dx, dy = ref.mix_bwd(dout, c0, w, a)
    close(got["dx"], dx + (np.float64(dx0) if accum_x else 0), "mix dx")
    if how == "no_dy":
        assert np.array_equal(got["dy"], dy0.ravel())
    else:
        close(got["dy"], dy + (np.float64(dy0) if accum_y else 0), "mix dy")


def test_cuda_dtypes_need_a_cuda_build():
    if _C.cuda_info()["compiled"]:
        pytest.skip("built with CUDA")
    with pytest.raises(RuntimeError, match="has no CUDA backend"):
        _C.cuda_op("add", "bf16", {}, (), ())


def qk_norm_inputs(rng, N, H, KV, hd):
    qkv = (rng.standard_normal((N, (H + 2 * KV) * hd)) * 2.0).astype(np.float32)
    wq, wk = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
    return qkv, wq, wk


@pytest.mark.parametrize("hd", [64, 96, 128])
@pytest.mark.parametrize("weighted", [1, 0], ids=["weighted", "plain"])
@pytest.mark.parametrize("in_place", [0, 1], ids=["apart", "out_is_qkv"])
def test_qk_norm_forward_normalizes_q_and_k_heads_and_copies_v(hd, weighted, in_place, rng):
    N, H, KV, eps = 37, 4, 2, 1e-6
    qkv, wq, wk = qk_norm_inputs(rng, N, H, KV, hd)
    f = op("qk_norm_forward", {"out": poison(qkv.shape), "rstd": poison(N * (H + KV)), "qkv": qkv,
                               "wq": wq, "wk": wk}, (N, H, KV, hd, weighted, in_place), (eps,))
    out, rstd = ref.qk_norm_fwd(qkv, wq if weighted else None, wk if weighted else None, H, KV, hd, eps)
    got = f["out"].reshape(N, -1)
    close(got, out, "qk_norm out")
    close(f["rstd"], rstd, "qk_norm rstd")
    np.testing.assert_array_equal(got[:, (H + KV) * hd:], qkv[:, (H + KV) * hd:])


@pytest.mark.parametrize("hd", [64, 96, 128])
@pytest.mark.parametrize("weighted", [1, 0], ids=["weighted", "plain"])
@pytest.mark.parametrize("accum,dw_accum,in_place", [(0, 0, 0), (1, 1, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)])
def test_qk_norm_backward_matches_the_reference(hd, weighted, accum, dw_accum, in_place, rng):
    """dqkv overwritten or added into (or written over dout, in place); the
    gains' gradients likewise; v's gradient is dout."""
    N, H, KV, eps = 37, 4, 2, 1e-6
    qkv, wq, wk = qk_norm_inputs(rng, N, H, KV, hd)
    f = op("qk_norm_forward", {"out": poison(qkv.shape), "rstd": poison(N * (H + KV)), "qkv": qkv,
                               "wq": wq, "wk": wk}, (N, H, KV, hd, weighted, 0), (eps,))
    dout = rng.standard_normal(qkv.shape).astype(np.float32)
    dx0 = rng.standard_normal(qkv.shape).astype(np.float32) if accum else poison(qkv.shape)
    dwq0, dwk0 = rng.standard_normal(hd).astype(np.float32), rng.standard_normal(hd).astype(np.float32)
    b = op("qk_norm_backward", {"dqkv": dx0, "dwq": dwq0, "dwk": dwk0, "dout": dout, "qkv": qkv,
                                "wq": wq, "wk": wk, "rstd": f["rstd"]},
           (N, H, KV, hd, weighted, accum, dw_accum, in_place))
    dx, dwq, dwk = ref.qk_norm_bwd(dout, qkv, wq if weighted else None, wk if weighted else None,
                                   f["rstd"], H, KV, hd)
    close(b["dqkv"].reshape(N, -1), dx + (np.float64(dx0) if accum else 0), "qk_norm dqkv")
    if weighted:
        close(b["dwq"], dwq + (dwq0 if dw_accum else 0), "qk_norm dwq")
        close(b["dwk"], dwk + (dwk0 if dw_accum else 0), "qk_norm dwk")
    else:   # no gains: their gradients are not touched
        np.testing.assert_array_equal(b["dwq"], dwq0)
        np.testing.assert_array_equal(b["dwk"], dwk0)


def label_rows(rng, N, R, n_pad):
    """R - n_pad distinct rows of N in random order, then n_pad padding
    entries (-1) scattered among them: the sparse loss's gather indices."""
    idx = np.concatenate([rng.choice(N, R - n_pad, replace=False), -np.ones(n_pad, np.int64)])
    return rng.permutation(idx).astype(np.int32)


@pytest.mark.parametrize("accum", [0, 1])
def test_gather_rows_kernels(accum, rng):
    """Forward copies the indexed rows (zeros for padding); backward puts
    each dout row back at its row of dx, zeroing the rest unless it adds,
    and a padding entry never touches dx (its dout row is poison here)."""
    N, R, C = 57, 24, 40
    idx = label_rows(rng, N, R, 5)
    x = rnd(rng, N, C)
    out = op("gather_rows_forward", {"out": poison((R, C)), "x": x, "idx": idx}, (R, C))["out"]
    np.testing.assert_array_equal(out.reshape(R, C), ref.gather_rows_fwd(x, idx))
    dout = rnd(rng, R, C)
    dout[idx < 0] = np.nan
    dx0 = rnd(rng, N, C) if accum else poison((N, C))
    got = op("gather_rows_backward", {"dx": dx0, "dout": dout, "idx": idx}, (N, R, C, accum))["dx"]
    close(got, ref.gather_rows_bwd(dout, idx, N, dx0 if accum else None), "gather_rows backward")
