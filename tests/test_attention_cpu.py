"""The CPU attention kernels, full causal and within a sliding window, against
the float64 reference of tests/cuda_ref.py, run through the kernel hook
(`_C.cuda_op` with dtype "cpu": the CPU backend's own kernel, in every build)."""
import numpy as np
import pytest

from smedjan import _C
import cuda_ref as ref
from conftest import rel_err
from cuda_ref import poison

B, T, H, KV, hd = 2, 41, 4, 2, 16
W = (H + 2 * KV) * hd
WINDOWS = [1, 3, 17, T - 1, T, 0]   # shorter than T, the edges T-1 and T, 0: full causal


@pytest.fixture
def qkv():
    return np.random.default_rng(7).standard_normal((B, T, W)).astype(np.float32)


@pytest.mark.parametrize("window", WINDOWS)
def test_cpu_attention_forward_matches_the_reference(window, qkv):
    got = _C.cuda_op("attention_forward", "cpu", {"out": poison((B, T, H * hd)), "lse": poison((B, H, T)),
                                                  "qkv": qkv}, (B, T, H, KV, hd, window), ())
    out, lse = ref.attention_fwd(qkv, B, T, H, KV, hd, window)
    assert rel_err(got["out"], out) < 1e-5, f"out, window {window}: {rel_err(got['out'], out):.3e}"
    assert rel_err(got["lse"], lse) < 1e-5, f"lse, window {window}: {rel_err(got['lse'], lse):.3e}"


def test_a_window_of_one_attends_to_itself_only(qkv):
    """Each row's output is its own value vector; lse is its own scaled score."""
    got = _C.cuda_op("attention_forward", "cpu", {"out": poison((B, T, H * hd)), "lse": poison((B, H, T)),
                                                  "qkv": qkv}, (B, T, H, KV, hd, 1), ())
    x = np.float64(qkv).reshape(B, T, H + 2 * KV, hd)
    q, k, v = x[:, :, :H], np.repeat(x[:, :, H:H + KV], H // KV, axis=2), np.repeat(x[:, :, H + KV:], H // KV, axis=2)
    np.testing.assert_allclose(got["out"].reshape(B, T, H, hd), v, rtol=1e-6, atol=1e-6)
    own_score = (q * k).sum(-1).transpose(0, 2, 1) / np.sqrt(hd)   # (B, H, T)
    np.testing.assert_allclose(got["lse"].reshape(B, H, T), own_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("accum", [0, 1])
def test_cpu_attention_backward_matches_the_reference(window, accum, qkv):
    rng = np.random.default_rng(window + 100 * accum)
    f = _C.cuda_op("attention_forward", "cpu", {"out": poison((B, T, H * hd)), "lse": poison((B, H, T)),
                                                "qkv": qkv}, (B, T, H, KV, hd, window), ())
    dout = rng.standard_normal((B, T, H * hd)).astype(np.float32)
    d0 = rng.standard_normal((B, T, W)).astype(np.float32) if accum else poison((B, T, W))
    got = _C.cuda_op("attention_backward", "cpu", {"dqkv": d0, "dout": dout, "qkv": qkv, "out": f["out"],
                                                   "lse": f["lse"]}, (B, T, H, KV, hd, window, accum), ())
    want = ref.attention_bwd(dout, qkv, B, T, H, KV, hd, window) + (np.float64(d0) if accum else 0)
    e = rel_err(got["dqkv"], want)
    assert e < 1e-5, f"dqkv, window {window}, accum {accum}: relative error {e:.3e}"
