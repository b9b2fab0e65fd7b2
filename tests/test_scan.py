"""The chunked scan (csrc/cpu/scan.c) against its definition: a step-by-step
recurrent loop in PyTorch, S_t = exp(a_t) S_{t-1} + k_t v_t^T, y_t = scale S_t^T q_t,
forward to 1e-5 and every gradient (autograd through the loop) to 1e-4, for chunk
sizes that do and do not divide T, T = 1, T = 37, head groups and no decay."""
import numpy as np
import pytest
import torch

from smedjan import _C


def recurrent(q, k, v, a, scale):
    """q, k: (B, T, G, dk); v: (B, T, H, dv); a: (B, T, H) or None -> y (B, T, H, dv)."""
    B, T, H, dv = v.shape
    G, dk = q.shape[2], q.shape[3]
    S = torch.zeros(B, H, dk, dv, dtype=q.dtype)
    ys = []
    for t in range(T):
        qh = q[:, t].repeat_interleave(H // G, dim=1)   # (B, H, dk)
        kh = k[:, t].repeat_interleave(H // G, dim=1)
        decay = torch.exp(a[:, t])[..., None, None] if a is not None else 1.0
        S = decay * S + kh[..., :, None] * v[:, t][..., None, :]
        ys.append(scale * torch.einsum("bhk,bhkv->bhv", qh, S))
    return torch.stack(ys, dim=1)


def dims(B, T, H, G, dk, dv, chunk, ld_qk, q_off, k_off, ld_v, v_off):
    return [B, T, H, G, dk, dv, ld_qk, q_off, k_off, ld_v, v_off, chunk]


def run_case(B, T, H, G, dk, dv, chunk, decay=True, fused=False, seed=0, scale=0.7):
    """fused: q, k and v as slices of one (N, G dk + G dk + H dv) row (linear
    attention's projection); else q and k of an (N, 2 G dk + 3) row (Mamba-2's
    xBC with a pad) and v on its own."""
    g = np.random.default_rng(seed)
    N = B * T
    if fused:
        ld_qk = 2 * G * dk + H * dv
        q_off, k_off, v_off, ld_v = 0, G * dk, 2 * G * dk, ld_qk
    else:
        ld_qk = 3 + 2 * G * dk
        k_off, q_off, v_off, ld_v = 3, 3 + G * dk, 0, H * dv
    qk = g.standard_normal((N, ld_qk)).astype(np.float32) * 0.5
    v = qk if fused else g.standard_normal((N, ld_v)).astype(np.float32)
    a = -np.abs(g.standard_normal((N, H))).astype(np.float32) * 0.3
    dy = g.standard_normal((N, H * dv)).astype(np.float32)
    d = dims(B, T, H, G, dk, dv, chunk, ld_qk, q_off, k_off, ld_v, v_off)
    no_a = 0 if decay else 1
    f = _C.cuda_op("scan_forward", "cpu", {"y": np.full((N, H * dv), np.nan, np.float32), "qk": qk, "v": v, "a": a},
                   d + [no_a], [scale])
    # reference with autograd
    tqk = torch.tensor(qk, dtype=torch.float64, requires_grad=True)
    tv = tqk if fused else torch.tensor(v, dtype=torch.float64, requires_grad=True)
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    rows = tqk.view(B, T, ld_qk)
    q = rows[..., q_off:q_off + G * dk].reshape(B, T, G, dk)
    k = rows[..., k_off:k_off + G * dk].reshape(B, T, G, dk)
    vv = tv.view(B, T, ld_v)[..., v_off:v_off + H * dv].reshape(B, T, H, dv)
    y = recurrent(q, k, vv, ta.view(B, T, H) if decay else None, scale)
    want = y.reshape(N, H * dv)
    err = np.abs(f["y"].reshape(N, H * dv) - want.detach().numpy()).max() / max(1.0, np.abs(want.detach().numpy()).max())
    assert err < 1e-5, f"forward: relative error {err:.2e}"
    (want * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    if not fused:   # overwriting (accum 0) poisoned buffers
        b = _C.cuda_op("scan_backward", "cpu",
                       {"dqk": np.full_like(qk, np.nan), "dv": np.full_like(v, np.nan),
                        "da": np.full_like(a, np.nan), "dy": dy, "qk": qk, "v": v, "a": a,
                        "y": f["y"]},
                       d + [no_a, 0, 0, 0], [scale])
        got_qk = b["dqk"]
    else:   # the harness hands the one row's gradient apart as dqk and dv: their sum
        b = _C.cuda_op("scan_backward", "cpu",
                       {"dqk": np.zeros_like(qk), "dv": np.zeros_like(v), "da": np.zeros_like(a),
                        "dy": dy, "qk": qk, "v": v, "a": a, "y": f["y"]}, d + [no_a, 1, 1, 1], [scale])
        got_qk = b["dqk"] + b["dv"]
    checks = [("dqk", got_qk, tqk.grad)]
    if not fused:
        checks.append(("dv", b["dv"], tv.grad))
    if decay:
        checks.append(("da", b["da"], ta.grad))
    for name, got, ref in checks:
        ref = ref.numpy().reshape(-1)
        got = got.reshape(-1)
        # floor: at T = 1, da is 0 exactly; q.dq - k.dk leaves rounding
        rel = np.abs(got - ref).max() / max(1e-2, np.abs(ref).max())
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"
    return f, b, (qk, v, a, dy, d, no_a, f["y"])


@pytest.mark.parametrize("T,chunk", [(16, 4), (37, 8), (37, 64), (1, 4), (5, 5), (13, 1)])
def test_scan_matches_recurrent_loop(T, chunk):
    run_case(2, T, 4, 2, 8, 6, chunk)


def test_scan_without_decay():
    run_case(2, 19, 2, 1, 5, 7, 4, decay=False)


def test_scan_shared_qk_over_all_heads():
    run_case(1, 23, 6, 1, 16, 8, 8)


def test_scan_on_one_fused_qkv_row():
    run_case(2, 21, 3, 3, 4, 4, 8, fused=True)


def test_scan_result_does_not_depend_on_chunk_size():
    outs = [run_case(1, 29, 2, 2, 4, 4, c, seed=3)[0]["y"] for c in (1, 3, 7, 29, 64)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)


def test_scan_backward_accumulates():
    f, b, (qk, v, a, dy, d, no_a, y) = run_case(1, 11, 2, 1, 4, 3, 4, seed=5)
    g = np.random.default_rng(9)
    base = {k: g.standard_normal(x.shape).astype(np.float32) for k, x in (("dqk", qk), ("dv", v), ("da", a))}
    acc = _C.cuda_op("scan_backward", "cpu", {**{k: x.copy() for k, x in base.items()},
                                              "dy": dy, "qk": qk, "v": v, "a": a, "y": y},
                     d + [no_a, 1, 1, 1], [0.7])
    for k in base:
        np.testing.assert_allclose(acc[k].reshape(base[k].shape), base[k] + b[k].reshape(base[k].shape),
                                   rtol=1e-5, atol=1e-5)
