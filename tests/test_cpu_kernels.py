"""The CPU backend's kernels, called one at a time through the kernel hook
(`_C.cuda_op(name, "cpu", ...)`, every build), against the float64
references that the CUDA kernels meet too (tests/cuda_ref.py). Outputs start
poisoned (NaN), so an element a kernel forgets to write fails; accumulating
kernels start from random values that must survive."""
import numpy as np
import pytest

from smedjan import _C
import cuda_ref as ref
from cuda_ref import poison, rel_err

TOL = 1e-6   # f32 against float64


def op(name, arrays, ints=(), floats=()):
    return _C.cuda_op(name, "cpu", arrays, tuple(int(i) for i in ints), tuple(float(f) for f in floats))


def close(got, want, what):
    e = rel_err(got, want)
    assert e < TOL, f"{what} [cpu]: relative error {e:.3e}"


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


def test_cuda_dtypes_need_a_cuda_build():
    if _C.cuda_info()["compiled"]:
        pytest.skip("built with CUDA")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.cuda_op("add", "bf16", {}, (), ())
