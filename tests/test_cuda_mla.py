"""The mla mixer on CUDA: its two layout kernels (mla_pack, head_slice)
against a float64 reference, in fp32, bf16 and fp16 (and the CPU kernels
against the same reference, in every build); whole-model training on the
GPU equal to the CPU (fp32 1e-5, bf16 near it); GPU generation refused by
name. Skipped without a GPU, except the CPU kernel checks."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
import cuda_ref as ref
from conftest import rel_err
from cuda_ref import poison, round_to

gpu = [pytest.mark.gpu, pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")]
DTYPES = ["cpu"] + [pytest.param(d, marks=gpu) for d in ("fp32", "bf16", "fp16")]
TOL = {"cpu": 1e-5, "fp32": 1e-5, "bf16": 1.5e-2, "fp16": 1.5e-2}
SIZES = dict(q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
THETA = 10000.0


def rnd(rng, *shape, dtype):
    return round_to(rng.standard_normal(shape).astype(np.float32), "fp32" if dtype == "cpu" else dtype)


def op(name, dtype, arrays, ints, floats=()):
    return _C.cuda_op(name, dtype, arrays, tuple(int(i) for i in ints), tuple(floats))


def close(got, want, dtype, what):
    e = rel_err(got, want)
    assert e < TOL[dtype], f"{what} [{dtype}]: relative error {e:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,dn,dr,dv", [(2, 37, 4, 12, 8, 10), (1, 5, 3, 0, 16, 16), (2, 9, 2, 32, 64, 24)])
def test_mla_pack_kernels(dtype, B, T, H, dn, dr, dv):
    rng = np.random.default_rng(B * 1000 + T * 10 + H)
    N, hq = B * T, dn + dr
    q, kv, kpe = rnd(rng, N, H * hq, dtype=dtype), rnd(rng, N, H * (dn + dv), dtype=dtype), rnd(rng, N, dr, dtype=dtype)
    ints = (B, T, H, dn, dr, dv)
    got = op("mla_pack_forward", dtype, {"out": poison((N, 3 * H * hq)), "q": q, "kv": kv, "kpe": kpe},
             ints, (THETA,))["out"]
    inv = ref.rope_freqs(dr, THETA)
    close(got, ref.mla_pack(q, kv, kpe, B, T, H, dn, dr, dv, inv).reshape(N, -1), dtype, "mla_pack forward")
    dout = rnd(rng, N, 3 * H * hq, dtype=dtype)
    want = ref.mla_pack_backward(dout, B, T, H, dn, dr, dv, inv)
    for accum in (0, 1):
        start = [rnd(rng, *w.shape, dtype=dtype) if accum else poison(w.shape) for w in want]
        got = op("mla_pack_backward", dtype, {"dq": start[0], "dkv": start[1], "dkpe": start[2], "dout": dout},
                 ints + (accum, accum, accum, 0), (THETA,))
        for k, (name, w) in enumerate(zip(("dq", "dkv", "dkpe"), want)):
            close(got[name].reshape(w.shape), w + (np.float64(start[k]) if accum else 0), dtype,
                  f"mla_pack backward {name} accum={accum}")
    # a gradient nobody needs is left out (NULL): the others still come
    got = op("mla_pack_backward", dtype, {"dq": poison(want[0].shape), "dkv": poison(want[1].shape),
                                          "dkpe": poison(want[2].shape), "dout": dout},
             ints + (0, 0, 0, 1 | 4), (THETA,))
    close(got["dkv"].reshape(want[1].shape), want[1], dtype, "mla_pack backward dkv alone")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accum", [0, 1])
def test_head_slice_kernels(dtype, accum):
    rng = np.random.default_rng(7 + accum)
    N, H, hd_in, hd_out = 53, 5, 20, 13
    x = rnd(rng, N, H * hd_in, dtype=dtype)
    got = op("head_slice_forward", dtype, {"out": poison((N, H * hd_out)), "in": x}, (N, H, hd_in, hd_out))["out"]
    close(got, x.reshape(N, H, hd_in)[..., :hd_out].reshape(N, -1), dtype, "head_slice forward")
    dout = rnd(rng, N, H * hd_out, dtype=dtype)
    d0 = rnd(rng, N, H * hd_in, dtype=dtype) if accum else poison((N, H * hd_in))
    want = np.zeros((N, H, hd_in))
    want[..., :hd_out] = dout.reshape(N, H, hd_out)
    got = op("head_slice_backward", dtype, {"din": d0, "dout": dout}, (N, H, hd_in, hd_out, accum))["din"]
    close(got, want.reshape(N, -1) + (np.float64(d0) if accum else 0), dtype, "head_slice backward")


def hybrid(seed=0):
    cfg = smedjan.Config.custom(64, 3, 4, vocab_size=97, max_seq_len=128, mla=SIZES,
                                mixer=["mla", "attention", "mla"])
    return smedjan.Model(cfg, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype, tol_logits, tol_grads", [("fp32", 1e-5, 1e-4), ("bf16", 2e-2, 2e-2)])
def test_mla_training_on_the_gpu_matches_the_cpu(dtype, tol_logits, tol_grads):
    """The CPU model is the reference here: tests/test_mla.py holds it to a
    PyTorch definition at 1e-5 / 1e-4."""
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 97, (2, 70)).astype(np.int32)
    targets = rng.integers(0, 97, (2, 70)).astype(np.int32)
    cpu, gpu = hybrid(), hybrid().to("cuda", dtype=dtype)
    assert rel_err(np.asarray(gpu.forward(tokens)), cpu.forward(tokens)) < tol_logits
    lc = cpu.loss(tokens, targets, backward=True)
    lg = gpu.loss(tokens, targets, backward=True)
    assert abs(lg - lc) / abs(lc) < tol_logits, (lg, lc)
    for name, g in cpu.grads.items():
        e = rel_err(np.asarray(gpu.grads[name]), g)
        loose = 2 if dtype == "bf16" and g.ndim == 1 else 1   # gains sum over every row
        assert e < tol_grads * loose, (name, e)


@pytest.mark.gpu
@pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")
def test_mla_trainer_steps_on_the_gpu_are_repeatable_and_learn():
    from smedjan import Trainer
    rng = np.random.default_rng(12)
    tokens = rng.integers(0, 97, (4, 64)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)

    def run():
        m = hybrid().to("cuda", dtype="bf16")
        tr = Trainer(m, lr=3e-3, min_lr=3e-4, warmup=2, steps=12)
        losses = [tr.step(tokens, targets).loss for _ in range(12)]
        return losses, np.array(np.asarray(m.flat_params))

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2 and np.array_equal(p1, p2)
    assert l1[-1] < l1[0]


@pytest.mark.gpu
@pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")
def test_mla_gpu_generation_is_refused_by_name():
    from smedjan.infer import InferenceModel
    with pytest.raises(ValueError, match="mla layers: GPU generation is not built yet"):
        InferenceModel.from_model(hybrid(), device="cuda")


def test_mla_through_the_device_code_path_equals_the_cpu_bitwise():
    """No GPU needed: the CPU kernels behind the device code path
    ("cpu-staged": staged inputs, in-place loss gradient, the train step's
    arena gradients) give the CPU's results bit for bit for an mla stack."""
    cfg = hybrid().config
    rng = np.random.default_rng(13)
    tokens = rng.integers(0, 97, (2, 30)).astype(np.int32)
    targets = rng.integers(0, 97, (2, 30)).astype(np.int32)
    a, b = smedjan.Model(cfg, seed=0), smedjan.Model(cfg, seed=0, device="cpu-staged")
    np.testing.assert_array_equal(a.forward(tokens), b.forward(tokens))
    assert a.loss(tokens, targets, backward=True) == b.loss(tokens, targets, backward=True)
    np.testing.assert_array_equal(a.flat_grads, b.flat_grads)
    ta, tb = smedjan.Trainer(a, lr=1e-3, steps=4), smedjan.Trainer(b, lr=1e-3, steps=4)
    for _ in range(3):
        assert ta.step(tokens, targets).loss == tb.step(tokens, targets).loss
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
