"""The MoE kernels on the GPU (cuda/moe.cu): each against float64 NumPy
references and the CPU kernels through the same harness, and whole MoE
models against the PyTorch reference that loops over experts (fp32 at the
CPU's tolerances, bf16 within 2e-2)."""
import numpy as np
import pytest
import torch

import smedjan
from smedjan import _C
import cuda_ref as ref
from test_moe import TorchMoE, batch, moe_config, perturb_router
from conftest import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")]

TOL = {"cpu": 1e-5, "fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
DTYPES = ["fp32", "bf16", "fp16"]
N, E, K, C, F = 37, 6, 2, 48, 40   # odd sizes: partial tiles everywhere


def rnd(rng, *shape, scale=1.0, dtype="fp32"):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return x if dtype == "cpu" else ref.round_to(x, dtype)


def round_to(x, dtype):
    return np.asarray(x, np.float32) if dtype == "cpu" else ref.round_to(x, dtype)


def op(name, dtype, arrays, ints=(), floats=()):
    return _C.cuda_op(name, dtype, arrays, tuple(int(i) for i in ints), tuple(float(f) for f in floats))


def close(got, want, dtype, what, tol=None):
    e = rel_err(got, want)
    assert e < (tol or TOL[dtype]), f"{what} [{dtype}]: relative error {e:.3e}"


def record_of(logits, **route):
    """The CPU kernel's routing record of logits (f32 slots holding int32 bits)."""
    n_rec = N * E + 3 * N * K + E + 1
    out = op("moe_route_forward", "cpu",
                 {"weights": np.zeros(N * K, np.float32), "record": np.zeros(n_rec, np.float32),
                  "logits": logits, "bias": np.zeros(E, np.float32),
                  "stats": np.zeros(2 + E, np.float32)},
                 (N, E, K, route.get("router", 0), route.get("norm_topk", 0), 0, 0))
    return out


def views(record):
    i = record[N * E:].view(np.int32)
    return (record[:N * E].reshape(N, E), i[:N * K].reshape(N, K), i[N * K:N * K + E + 1],
            i[N * K + E + 1:2 * N * K + E + 1], i[2 * N * K + E + 1:])


@pytest.mark.parametrize("router,norm", [(0, 0), (0, 1), (1, 1)], ids=["softmax", "norm_topk", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_the_reference(dtype, router, norm):
    rng = np.random.default_rng(0)
    logits = rnd(rng, N, E, scale=2.0, dtype=dtype)
    bias = rnd(rng, E, scale=0.05, dtype=dtype) if router else np.zeros(E, np.float32)
    n_rec = N * E + 3 * N * K + E + 1
    got = op("moe_route_forward", dtype,
                 {"weights": ref.poison(N * K), "record": ref.poison(n_rec), "logits": logits,
                  "bias": bias, "stats": ref.poison(2 + E)}, (N, E, K, router, norm, 0, int(router)))
    s, experts, w, offsets, slot, row = ref.moe_route(logits, K, "sigmoid" if router else "softmax",
                                                      bool(norm), bias if router else None)
    scores, g_exp, g_off, g_slot, g_row = views(got["record"])
    assert np.array_equal(g_exp, experts) and np.array_equal(g_off, offsets)
    assert np.array_equal(g_slot, slot) and np.array_equal(g_row, row)
    close(scores, s, "fp32", "scores", 1e-5)
    close(got["weights"], w, dtype, "weights")
    assert np.array_equal(got["stats"][2:], np.bincount(experts.ravel(), minlength=E))
    q = s / s.sum(-1, keepdims=True) if router else s
    aux = E / N ** 2 * (np.bincount(experts.ravel(), minlength=E) * q.sum(0)).sum()
    lg = np.asarray(logits, np.float64)
    z = np.mean((lg.max(-1) + np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1))) ** 2)
    close(got["stats"][:2], [aux, z], "fp32", "aux and z", 1e-5)


@pytest.mark.parametrize("router", [0, 1], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_backward_matches_the_cpu_kernel(dtype, router):
    rng = np.random.default_rng(1)
    logits = rnd(rng, N, E, scale=2.0, dtype=dtype)
    fwd = record_of(logits, router=router, norm_topk=1)
    dweights = rnd(rng, N * K, dtype=dtype)
    weights = round_to(fwd["weights"], dtype)
    arrays = {"dlogits": rnd(rng, N * E, dtype=dtype), "bias_master": np.zeros(E, np.float32),
              "dweights": dweights, "logits": logits, "weights": weights, "record": fwd["record"],
              "stats": fwd["stats"]}
    for accum in (0, 1):
        ints = (N, E, K, router, 1, accum, int(router))
        floats = (0.3, 0.05, 0.01)
        want = op("moe_route_backward", "cpu", dict(arrays), ints, floats)
        got = op("moe_route_backward", dtype, dict(arrays), ints, floats)
        close(got["dlogits"], want["dlogits"], dtype, f"dlogits accum={accum}")
        assert np.array_equal(got["bias_master"], want["bias_master"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_and_unpermute_forward_and_backward(dtype):
    rng = np.random.default_rng(2)
    fwd = record_of(rnd(rng, N, E, scale=2.0))
    rec = fwd["record"]
    _, _, _, slot, row = views(rec)
    x = rnd(rng, N, C, dtype=dtype)
    got = op("moe_permute_forward", dtype, {"xp": ref.poison(N * K * C), "x": x, "record": rec},
                 (N, E, K, C))
    assert np.array_equal(got["xp"].reshape(-1, C), x[slot // K])
    dxp = rnd(rng, N * K, C, dtype=dtype)
    for accum in (0, 1):
        dx0 = rnd(rng, N, C, dtype=dtype)
        got = op("moe_permute_backward", dtype, {"dx": dx0.copy(), "dxp": dxp, "record": rec},
                     (N, E, K, C, accum))
        want = dxp[row].reshape(N, K, C).astype(np.float64).sum(1) + (dx0 if accum else 0)
        close(got["dx"], want, dtype, f"permute dx accum={accum}")
    w = round_to(fwd["weights"], dtype)
    yp = rnd(rng, N * K, C, dtype=dtype)
    got = op("moe_unpermute_forward", dtype,
                 {"y": ref.poison(N * C), "yp": yp, "weights": w, "record": rec}, (N, E, K, C))
    want = (yp[row].reshape(N, K, C).astype(np.float64) * w.reshape(N, K, 1)).sum(1)
    close(got["y"], want, dtype, "unpermute y")
    dy = rnd(rng, N, C, dtype=dtype)
    for accum in (0, 1):
        dyp0, dw0 = rnd(rng, N * K, C, dtype=dtype), rnd(rng, N * K, dtype=dtype)
        got = op("moe_unpermute_backward", dtype,
                     {"dyp": dyp0.copy(), "dweights": dw0.copy(), "dy": dy, "yp": yp, "weights": w,
                      "record": rec}, (N, E, K, C, accum, accum))
        want_dyp = (w[slot, None] * dy[slot // K]).astype(np.float64) + (dyp0 if accum else 0)
        want_dw = (dy.astype(np.float64)[np.arange(N * K) // K] * yp[row]).sum(-1) + (dw0 if accum else 0)
        close(got["dyp"], want_dyp, dtype, f"unpermute dyp accum={accum}")
        close(got["dweights"], want_dw, dtype, f"unpermute dweights accum={accum}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matmul_forward_dx_and_wgrad(dtype):
    rng = np.random.default_rng(3)
    fwd = record_of(rnd(rng, N, E, scale=3.0))
    rec = fwd["record"]
    offsets = views(rec)[2]
    x = rnd(rng, N * K, C, dtype=dtype)
    w = rnd(rng, E, 2 * F, C, scale=0.2, dtype=dtype)
    for accum in (0, 1):
        y0 = rnd(rng, N * K, 2 * F, dtype=dtype)
        got = op("moe_matmul", dtype, {"y": y0.copy(), "x": x, "w": w, "record": rec},
                     (N, E, K, 2 * F, C, 1, accum))
        want = ref.moe_grouped_matmul(x, w, offsets) + (y0 if accum else 0)
        close(got["y"], want, dtype, f"forward accum={accum}")
    dy = rnd(rng, N * K, 2 * F, dtype=dtype)
    got = op("moe_matmul", dtype, {"y": ref.poison(N * K * C), "x": dy, "w": w, "record": rec},
                 (N, E, K, C, 2 * F, 0, 0))
    close(got["y"], ref.moe_grouped_matmul(dy, w, offsets, trans_b=False), dtype, "dx")
    for accum in (0, 1):
        dw0 = rng.standard_normal(E * 2 * F * C).astype(np.float32)
        got = op("moe_matmul_wgrad", dtype, {"dw": dw0.copy(), "dy": dy, "x": x, "record": rec},
                     (N, E, K, 2 * F, C, accum))
        want = np.stack([dy[offsets[e]:offsets[e + 1]].astype(np.float64).T @ x[offsets[e]:offsets[e + 1]]
                         for e in range(E)]).ravel() + (dw0 if accum else 0)
        close(got["dw"], want, dtype, f"wgrad accum={accum}")


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_model_matches_torch_on_the_gpu(dtype, router):
    cfg = moe_config(router, bias_update_rate=0.0)
    m = smedjan.Model(cfg, seed=0)
    perturb_router(m, 2.0)   # wide margins: bf16 rounding flips no token's choice
    tok, tgt = batch(cfg)
    tm = TorchMoE(cfg, m)
    want_logits = tm.forward(torch.from_numpy(tok).long()).detach().numpy()
    tl = tm.loss(torch.from_numpy(tok).long(), torch.from_numpy(tgt).long())
    tl.backward()
    m.to("cuda", dtype)
    got_logits = m.forward(tok)
    loss = m.loss(tok, tgt, backward=True)
    tol, gtol = (1e-5, 1e-4) if dtype == "fp32" else (2e-2, 2e-2)
    assert rel_err(got_logits, want_logits) < tol
    assert abs(loss - tl.item()) < tol * abs(tl.item())
    m.to("cpu")
    for name, g in m.grads.items():
        if name.endswith("router_bias"):
            continue
        # bf16: the router's and the gains' gradients sum many rounded
        # products into few values: twice the bar, as test_cuda_architectures
        loose = 2 if dtype == "bf16" and (g.ndim == 1 or name.endswith("router")) else 1
        e = rel_err(g, tm.named(name).grad.numpy())
        assert e < gtol * loose, (name, e)


def test_moe_train_steps_on_the_gpu_match_the_cpu():
    cfg = moe_config("sigmoid", bias_update_rate=0.001)
    tok, tgt = batch(cfg, B=4, T=16)
    runs = []
    for device in ("cpu", "cuda"):
        m = smedjan.Model(cfg, seed=0, device=device, dtype="fp32")
        tr = smedjan.Trainer(m, lr=3e-3, steps=10)
        runs.append(([tr.step(tok, tgt).loss for _ in range(3)], m))
    (cl, cm), (gl, gm) = runs
    np.testing.assert_allclose(gl, cl, rtol=1e-4)
    gm.to("cpu")
    np.testing.assert_allclose(gm.params["layers.1.moe.router_bias"], cm.params["layers.1.moe.router_bias"])
    assert gm.moe_stats["load"] == cm.moe_stats["load"]
