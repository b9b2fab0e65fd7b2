"""The scan and the Mamba-2 / linear attention pieces on the GPU (cuda/scan.cu,
cuda/ssm.cu): the scan's forward against its definition (a loop over time,
tests/cuda_ref.py), every backward and piece against the CPU kernels (which
tests/test_scan.py, test_mamba2.py and test_linear.py hold to PyTorch): fp32 to
1e-5 (forward) and 1e-4 (gradients), bf16 within 2e-2; both mixers train on the
GPU as on the CPU; GPU generation refuses them by name."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
import cuda_ref as ref
from conftest import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")]

TOL = {"fp32": 1e-5, "bf16": 2e-2}
GRAD_TOL = {"fp32": 1e-4, "bf16": 2e-2}

# (B, T, H, G, dk, dv, chunk, fused, decay): groups, T = 1 and 37, dv past one
# thread's column (128) and dk in each kernel bucket (64, 128, 256)
SHAPES = [(2, 37, 4, 2, 8, 6, 8, False, True), (1, 1, 2, 1, 16, 16, 4, False, True),
          (2, 21, 3, 3, 8, 9, 8, True, False), (1, 19, 2, 1, 128, 200, 64, False, True),
          (1, 9, 2, 2, 256, 64, 16, False, True), (1, 13, 2, 2, 32, 33, 4, True, True)]


def scan_case(shape, seed=0):
    B, T, H, G, dk, dv, chunk, fused, decay = shape
    g = np.random.default_rng(seed)
    N = B * T
    if fused:
        ld_qk = ld_v = 2 * G * dk + H * dv
        q_off, k_off, v_off = 0, G * dk, 2 * G * dk
    else:
        ld_qk, ld_v = 3 + 2 * G * dk, H * dv
        k_off, q_off, v_off = 3, 3 + G * dk, 0
    qk = (g.standard_normal((N, ld_qk)) * 0.3).astype(np.float32)
    v = qk if fused else g.standard_normal((N, ld_v)).astype(np.float32)
    a = (-np.abs(g.standard_normal((N, H))) * 0.3).astype(np.float32)
    dy = g.standard_normal((N, H * dv)).astype(np.float32)
    dims = [B, T, H, G, dk, dv, ld_qk, q_off, k_off, ld_v, v_off, chunk]
    return dict(qk=qk, v=v, a=a, dy=dy, dims=dims, no_a=0 if decay else 1, fused=fused,
                ref=(B, T, H, G, dk, dv, ld_qk, q_off, k_off, ld_v, v_off))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_scan_forward_matches_the_recurrent_loop(shape, dtype):
    c = scan_case(shape)
    qk, v, a = (ref.round_to(c[k], dtype) for k in ("qk", "v", "a"))
    got = _C.cuda_op("scan_forward", dtype, {"y": ref.poison(c["dy"].shape), "qk": qk, "v": v, "a": a},
                     c["dims"] + [c["no_a"]], [0.7])["y"]
    want = ref.scan_fwd(qk, v, None if c["no_a"] else a, *c["ref"], 0.7)
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("accum", [0, 1])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_scan_backward_matches_the_cpu(shape, dtype, accum):
    c = scan_case(shape, seed=1)
    ins = {k: ref.round_to(c[k], dtype) for k in ("qk", "v", "a", "dy")}
    y = _C.cuda_op("scan_forward", "cpu", {"y": np.zeros_like(c["dy"]), "qk": ins["qk"], "v": ins["v"],
                                           "a": ins["a"]}, c["dims"] + [c["no_a"]], [0.7])["y"]
    ins["y"] = ref.round_to(y, dtype)
    r = np.random.default_rng(2)
    start = {k: ref.round_to(r.standard_normal(c[x].shape).astype(np.float32), dtype) if accum
             else np.zeros_like(c[x]) for k, x in (("dqk", "qk"), ("dv", "v"), ("da", "a"))}
    flags = c["dims"] + [c["no_a"], accum, 1 if c["fused"] else accum, accum]
    want = _C.cuda_op("scan_backward", "cpu", {**{k: x.copy() for k, x in start.items()}, **ins}, flags, [0.7])
    got = _C.cuda_op("scan_backward", dtype, {**{k: x.copy() for k, x in start.items()}, **ins}, flags, [0.7])
    for k in ("dqk", "dv") + (() if c["no_a"] else ("da",)):
        assert rel_err(got[k], want[k]) < GRAD_TOL[dtype], k


def pieces(seed=0):
    """(op, arrays, ints, floats, outputs) of every piece, forward and backward
    (accum 1: outputs start from random values that must be added to)."""
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s).astype(np.float32)
    B, T, N = 2, 7, 14
    H, P, ld, ldx = 3, 4, 40, 20           # Mamba-2: z (12) | xBC (20) | dt at 32 .. 34 of rows of 40
    cases = [
        ("conv1d_silu_forward", dict(out=f(N, 20), x=f(N, ld), w=f(20, 4), bias=f(20)), [B, T, ld, 12, 20, 4], [],
         ("out",)),
        ("ssd_prep_forward", dict(v=f(N, H * P), a=f(N, H), x=f(N, ldx), dt_raw=f(N, ld), p=f(2 * H)),
         [N, H, P, ldx, ld, 32], [], ("v", "a")),
        ("ssd_skip_forward", dict(out=f(N, H * P), y=f(N, H * P), x=f(N, ldx), D=f(H)), [N, H, P, ldx], [],
         ("out",)),
        ("gated_rmsnorm_forward", dict(out=f(N, 12), rstd=f(N, 2), y=f(N, 12), z=f(N, ld), w=f(12)),
         [N, 12, 2, ld, 0], [1e-5], ("out", "rstd")),
        ("linear_prep_forward", dict(u=f(N, 2 * 12 + 3 * 5), a=f(N, 3), p=f(N, 3 * 12 + 3)),
         [N, 3, 4, 1, 1], [], ("u", "a")),
        ("linear_norm_forward", dict(out=f(N, 12), y=np.abs(f(N, 3 * 5)) + 0.5), [N, 3, 4], [1e-5], ("out",)),
    ]
    for accum in (0, 1):
        cases += [
            ("conv1d_silu_backward", dict(dx=f(N, ld), dw=f(20, 4), dbias=f(20), dout=f(N, 20), x=f(N, ld),
                                          w=f(20, 4), bias=f(20)), [B, T, ld, 12, 20, 4, accum, accum], [],
             ("dx", "dw", "dbias")),
            ("ssd_prep_backward", dict(dx=f(N, ldx), ddt_raw=f(N, ld), dp=f(2 * H), dv=f(N, H * P), da=f(N, H),
                                       x=f(N, ldx), dt_raw=f(N, ld), p=f(2 * H)),
             [N, H, P, ldx, ld, 32, accum, accum, accum], [], ("dx", "ddt_raw", "dp")),
            ("ssd_skip_backward", dict(dy=f(N, H * P), dx=f(N, ldx), dD=f(H), dout=f(N, H * P), x=f(N, ldx),
                                       D=f(H)), [N, H, P, ldx, accum, accum, accum], [], ("dy", "dx", "dD")),
            ("gated_rmsnorm_backward", dict(dy=f(N, 12), dz=f(N, ld), dw=f(12), dout=f(N, 12), y=f(N, 12),
                                            z=f(N, ld), w=f(12), rstd=np.abs(f(N, 2)) + 0.5),
             [N, 12, 2, ld, 0, accum, accum, accum], [], ("dy", "dz", "dw")),
            ("linear_prep_backward", dict(dp=f(N, 3 * 12 + 3), du=f(N, 2 * 12 + 3 * 5), da=f(N, 3),
                                          p=f(N, 3 * 12 + 3)), [N, 3, 4, 1, 1, accum], [], ("dp",)),
            ("linear_norm_backward", dict(dy=f(N, 3 * 5), dout=f(N, 12), y=np.abs(f(N, 3 * 5)) + 0.5),
             [N, 3, 4, accum], [1e-5], ("dy",)),
        ]
    return cases


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_piece_matches_the_cpu(dtype):
    for op, arrays, ints, floats, outputs in pieces():
        ins = {k: ref.round_to(x, dtype) for k, x in arrays.items()}
        want = _C.cuda_op(op, "cpu", {k: x.copy() for k, x in ins.items()}, ints, floats)
        got = _C.cuda_op(op, dtype, {k: x.copy() for k, x in ins.items()}, ints, floats)
        tol = (TOL if op.endswith("forward") else GRAD_TOL)[dtype]
        for k in outputs:
            assert rel_err(got[k], want[k]) < tol, f"{op} {k}"


MIXERS = {"mamba2": dict(mixer="mamba2", ffn="none", ssm={"d_state": 16, "head_dim": 16, "n_groups": 2,
                                                          "chunk_size": 8}),
          "linear": dict(mixer="linear", linear={"feature": "elu1", "normalize": True, "decay": "gated"}),
          "hybrid": dict(mixer=["mamba2", "mamba2", "attention"], ffn=["none", "none", "swiglu"],
                         ssm={"d_state": 16, "head_dim": 16})}


@pytest.mark.parametrize("kind", MIXERS)
def test_mixers_train_on_the_gpu_as_on_the_cpu(kind):
    cfg = smedjan.Config.custom(64, 3, 4, vocab_size=97, max_seq_len=64, **MIXERS[kind])
    cpu = smedjan.Model(cfg, seed=0)
    r = np.random.default_rng(0)
    x = r.integers(0, 97, (2, 21)).astype(np.int32)
    y = r.integers(0, 97, (2, 21)).astype(np.int32)
    want_logits = cpu.forward(x)
    want_loss = cpu.loss(x, y, backward=True)
    want_grads = cpu.flat_grads.copy()
    for dtype in ("fp32", "bf16"):
        gpu = smedjan.Model(cfg, seed=0, device="cuda", dtype=dtype)
        assert rel_err(gpu.forward(x), want_logits) < TOL[dtype]
        loss = gpu.loss(x, y, backward=True)
        assert abs(loss - want_loss) < TOL[dtype] * 10 * abs(want_loss)
        assert rel_err(gpu.flat_grads.numpy(), want_grads) < {"fp32": 1e-4, "bf16": 5e-2}[dtype]
    gpu = smedjan.Model(cfg, seed=0, device="cuda", dtype="bf16")
    tr = smedjan.Trainer(gpu, lr=3e-3)
    text = (np.arange(25 * 8, dtype=np.int32) * 7 % 23)[None, :]
    first = gpu.loss(text[:, :-1], text[:, 1:])
    for _ in range(30):
        tr.step(text[:, :-1], text[:, 1:])
    assert gpu.loss(text[:, :-1], text[:, 1:]) < 0.5 * first


def test_gpu_generation_refuses_the_scan_mixers_by_name():
    from smedjan.infer import InferenceModel
    cfg = smedjan.Config.custom(64, 2, 4, vocab_size=97, max_seq_len=64, **MIXERS["mamba2"])
    with pytest.raises(ValueError, match="mamba2 layers: GPU generation is not built yet"):
        InferenceModel.from_model(smedjan.Model(cfg, seed=0), device="cuda")
