"""CPU backend kernels, called one at a time through the kernel hook
(`_C.cuda_op` with dtype "cpu"), against the float64 references of
tests/cuda_ref.py: fresh random inputs, poisoned outputs."""
import numpy as np
import pytest

from smedjan import _C
import cuda_ref as ref
from cuda_ref import poison, rel_err

TOL = 1e-5


def op(name, arrays, ints=(), floats=()):
    return _C.cuda_op(name, "cpu", arrays, tuple(int(i) for i in ints), tuple(float(f) for f in floats))


def close(got, want, what, tol=TOL):
    e = rel_err(got, want)
    assert e < tol, f"{what}: relative error {e:.3e}"


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


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
