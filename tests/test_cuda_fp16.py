"""The CUDA fp16 mode ("fp16 with clamped casts"): fp16 activations and
compute copy of the weights, f32 master weights, optimizer state and
accumulation, as bf16; every cast to fp16 clamps to +-65504, so an overflow
gives the largest finite half, never inf (NaN stays NaN). No loss scaling.

The kernels in fp16 are tested against the float64 references with the
other dtypes (tests/test_cuda.py, DTYPES: kernels, graph replay == eager,
the fused-residual plan, logits through DLPack, the model near fp32);
here: training like bf16, the clamp at every kind of writer, moves and the
inference engine.
GPU tests skip without a GPU; the CPU-side tests (dtype names, errors) run
everywhere."""
import math

import numpy as np
import pytest

import smedjan
from conftest import rel_err, text_batches
from smedjan import _C
import cuda_ref as ref
import test_cuda
from test_cuda import host, op

gpu = pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")
F16_MAX = 65504.0


# ---- everywhere: the dtype's name ------------------------------------------------

CFG = smedjan.Config.custom(32, 1, 2, vocab_size=50, max_seq_len=16)


def test_fp16_on_the_cpu_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="dtype fp16 is not available on the CPU"):
        smedjan.Model(CFG, dtype="fp16")
    with pytest.raises(ValueError, match="dtype float16 is not available|dtype fp16 is not available"):
        smedjan.Model(CFG, dtype="float16")


def test_an_unknown_dtype_names_the_three_valid_ones():
    for dev in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=r"dtype must be 'fp32', 'bf16' or 'fp16', got 'fp8'"):
            smedjan.Model(CFG, device=dev, dtype="fp8")
    m = smedjan.Model(CFG)
    with pytest.raises(ValueError, match=r"'fp32', 'bf16' or 'fp16'"):
        m.to("cpu", "half-precision")
    assert m.device == "cpu" and m.dtype == "fp32"


def test_the_kernel_hook_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match=r"dtype must be 'cpu', 'fp32', 'bf16' or 'fp16', got 'f16'"):
        _C.cuda_op("add", "f16", {}, (), ())


def test_bench_cli_accepts_fp16_and_reports_the_engine_error_on_the_cpu(capsys):
    from smedjan.cli import main
    rc = main(["bench", "--size", "tiny", "--device", "cpu", "--dtype", "fp16", "--iters", "1",
               "--warmup", "0", "--batch-size", "1", "--seq-len", "8", "--decode-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "invalid choice" not in err, err
    assert "dtype fp16 is not available on the CPU" in err, err


# ---- on the GPU: the model ---------------------------------------------------------

def make(shape, dtype, seed=0):
    """tests/test_cuda.py's model, tokens and targets, on the GPU."""
    return test_cuda.make(shape, "cuda", dtype, seed)


def train(text_bytes, dtype, steps, graphs=True):
    cfg = smedjan.Config.custom(128, 2, 4, 2, vocab_size=256, max_seq_len=128)
    m = smedjan.Model(cfg, seed=3, device="cuda", dtype=dtype)
    m._h.set_graphs(graphs)
    tr = smedjan.Trainer(m, lr=3e-3, min_lr=3e-4, warmup=3, steps=steps, clip=0.5)
    return m, [tuple(tr.step(x, y)) for x, y in text_batches(text_bytes, 4, 64, steps)]


@gpu
@pytest.mark.gpu
def test_fp16_training_decreases_the_loss_like_bf16(text_bytes):
    _, h16 = train(text_bytes, "fp16", 12)
    _, hb = train(text_bytes, "bf16", 12)
    l16, lb = [r[0] for r in h16], [r[0] for r in hb]
    assert all(math.isfinite(x) for r in h16 for x in r), h16
    assert np.mean(l16[-3:]) < 0.9 * l16[0], l16
    for i, (a, b) in enumerate(zip(l16, lb)):
        assert abs(a - b) <= 2e-2 * b, (i, a, b)


# ---- on the GPU: the clamp -----------------------------------------------------------

@gpu
@pytest.mark.gpu
def test_fp16_casts_clamp_to_the_largest_finite_half():
    """Each kind of fp16 writer: the conversion from f32 (the upload), an
    elementwise kernel, a cuBLASLt GEMM and AdamW's compute copy give
    +-65504 where the value overflows, and keep NaN."""
    a = np.array([1e6, -1e6, 60000, -60000, np.nan, 1.5, 65519, 70000], np.float32)
    b = np.array([0, 0, 60000, -60000, 1, 2, 0, 0], np.float32)
    got = op("copy", "fp16", {"dst": np.zeros(8, np.float32), "src": a}, (8, 0))["dst"]
    np.testing.assert_array_equal(got, [F16_MAX, -F16_MAX, 60000, -60000, np.nan, 1.5, F16_MAX, F16_MAX])
    got = op("add", "fp16", {"out": ref.poison(8), "a": a, "b": b}, (8,))["out"]
    np.testing.assert_array_equal(got, [F16_MAX, -F16_MAX, F16_MAX, -F16_MAX, np.nan, 3.5, F16_MAX, F16_MAX])
    M, N, K = 16, 24, 32
    A = np.full((M, K), 300.0, np.float32)
    A[1] = -300.0
    A[2] = 0.5
    B = np.full((N, K), 300.0, np.float32)            # 32 * 300 * 300 = 2.88e6 per element
    for name, arrays, ints in (("matmul", {"C": ref.poison((M, N)), "A": A, "B": B}, (M, N, K, 0, 1, 0, 0)),
                               ("matmul_add", {"D": ref.poison((M, N)), "C": np.full((M, N), 4.0, np.float32),
                                               "A": A, "B": B}, (M, N, K, 0, 1, 0))):
        out = op(name, "fp16", arrays, ints)
        C = out["C" if name == "matmul" else "D"].reshape(M, N)
        assert np.all(np.isfinite(C)), name
        np.testing.assert_array_equal(C[0], F16_MAX)
        np.testing.assert_array_equal(C[1], -F16_MAX)
        assert np.all(C[2] == 4800 + 4 * (name == "matmul_add")), (name, C[2])   # exact in fp16
    p = np.array([1e6, -1e6, 3.0, 1e5], np.float32)
    z = np.zeros(4, np.float32)
    out = op("adamw", "fp16", {"p": p, "p_act": ref.poison(4), "g": z, "m": z, "v": z},
             (4, 0, 1, 1), (1e-3, 0.9, 0.95, 1e-8, 0.0, 0.0))
    np.testing.assert_array_equal(out["p"], p)
    np.testing.assert_array_equal(out["p_act"], [F16_MAX, -F16_MAX, 3.0, F16_MAX])


@gpu
@pytest.mark.gpu
def test_an_overflowing_embedding_row_gives_finite_logits_loss_and_gradients():
    """One embedding row scaled to ~1e6: its compute copy, the residual
    stream and the tied head's logits would overflow fp16; clamped, the
    logits saturate at 65504 and everything stays finite."""
    m, tokens, targets = make("mha", "fp16")
    t = int(tokens[0, 5])
    e = m.params["tok_emb"].numpy()
    e[t] *= 1e6 / np.sqrt(np.mean(e[t] ** 2))
    m.params["tok_emb"][:] = e
    logits = m.forward(tokens)
    assert np.all(np.isfinite(logits)), np.argwhere(~np.isfinite(logits))[:5]
    assert np.abs(logits).max() == F16_MAX         # it did overflow, and was clamped
    loss = m.loss(tokens, targets, backward=True)
    assert math.isfinite(loss)
    for name, g in m.grads.items():
        assert np.all(np.isfinite(host(g))), name


# ---- on the GPU: moves, DLPack, the inference engine ---------------------------------

@gpu
@pytest.mark.gpu
def test_to_cuda_fp16_keeps_the_weights_and_moves_back():
    m, tokens, _ = make("gqa", "fp32")
    want = m.forward(tokens)
    p = host(m.flat_params).copy()
    m.to("cuda", "fp16")
    assert m.device == "cuda" and m.dtype == "fp16"
    np.testing.assert_array_equal(host(m.flat_params), p)   # f32 master weights, untouched
    assert rel_err(m.forward(tokens), want) < 2e-2
    m.to("cpu")
    assert m.dtype == "fp32"
    np.testing.assert_array_equal(m.flat_params, p)
    m.to("cuda")                                             # default: bf16
    assert m.dtype == "bf16"


@gpu
@pytest.mark.gpu
def test_fp16_logits_go_to_torch_as_float16():
    torch = pytest.importorskip("torch")
    m, tokens, _ = make("mha", "fp16")
    d = m.forward_device(tokens)
    assert d.dtype == "float16"
    t = torch.from_dlpack(d)
    assert t.is_cuda and t.dtype == torch.float16
    np.testing.assert_array_equal(t.float().cpu().numpy(), m.forward(tokens))
    np.testing.assert_array_equal(d.numpy().astype(np.float32), m.forward(tokens))


@gpu
@pytest.mark.gpu
def test_an_fp16_model_decodes_on_the_gpu_engine_in_bf16():
    """The GPU inference engine has fp32 and bf16 weights; from an fp16
    model it reads the f32 master weights, as from any model."""
    from smedjan.infer import from_model
    m16, tokens, _ = make("mha", "fp16")
    mb, _, _ = make("mha", "bf16")
    a = from_model(m16, device="cuda")
    b = from_model(mb, device="cuda")
    assert a.mode == "bf16"
    pa, pb = np.empty((16, 97), np.float32), np.empty((16, 97), np.float32)
    a._h.prefill(tokens[0], pa)
    b._h.prefill(tokens[0], pb)
    np.testing.assert_array_equal(pa, pb)
    from smedjan.generate import generate
    out = list(generate(m16, tokens[0, :4].tolist(), 5, temperature=0))
    assert len(out) == 5
