"""Float64 NumPy references for the CUDA kernels, and the helpers the GPU
tests share: bf16 rounding, poisoned outputs, relative errors, GPU presence."""
import math
import shutil
import subprocess

import numpy as np

import smedjan


def gpu_present() -> bool:
    """A CUDA GPU on this machine, whether or not smedjan was built for it
    (so that a GPU with a CPU-only build fails loudly instead of skipping)."""
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return r.returncode == 0 and "GPU" in r.stdout
    return smedjan.cuda_available()


def bf16_round(x):
    """Round float32 to the nearest bf16 (ties to even), kept as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def f16_round(x):
    """Round float32 to the nearest fp16 as the CUDA fp16 mode does: clamped
    to +-65504 first (never inf; NaN stays NaN), kept as float32."""
    x = np.clip(np.asarray(x, np.float32), -65504.0, 65504.0)
    return x.astype(np.float16).astype(np.float32)


def round_to(x, dtype):
    """x as the compute dtype ("fp32", "bf16", "fp16") holds it, as float32."""
    return {"fp32": lambda v: np.asarray(v, np.float32), "bf16": bf16_round, "fp16": f16_round}[dtype](x)


def poison(shape):
    return np.full(shape, np.nan, np.float32)


# ---- references (float64) ----------------------------------------------------

def matmul(A, B, tA, tB):
    A, B = np.float64(A), np.float64(B)
    return (A.T if tA else A) @ (B.T if tB else B)


def rmsnorm_fwd(x, w, eps):
    x = np.float64(x)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * rstd * w, rstd[:, 0]


def rmsnorm_bwd(dout, x, w, rstd):
    x, g = np.float64(x), np.float64(dout)
    r = rstd[:, None]
    C = x.shape[1]
    dot = (g * w * x).sum(-1, keepdims=True)
    dx = g * w * r - dot * r ** 3 / C * x
    dw = (g * x * r).sum(0)
    return dx, dw


def rope_freqs(hd, theta):
    """Plain RoPE's inverse frequencies, the f32 values smedjan's table holds."""
    e = np.float32(2 * np.arange(hd // 2)) / np.float32(hd)
    return (np.float32(1.0) / np.float32(np.float64(theta) ** np.float64(e))).astype(np.float32)


def rope_angles(T, pos0, inv_freq):
    pos = np.float32(pos0 + np.arange(T))
    return np.float64(pos[:, None] * np.float32(inv_freq)[None, :])   # (T, half), rounded as the kernel does


def rope(x, B, T, n_heads, n_rot, hd, pos0, inv_freq, mscale=1.0, inverse=False):
    """Rotate-half RoPE with cos and sin scaled by mscale; inverse: the
    backward, mscale times the rotation by -angle."""
    x = np.float64(x).reshape(B, T, n_heads, hd)
    a = rope_angles(T, pos0, inv_freq)[None, :, None, :]
    m = np.float64(np.float32(mscale))
    c, s = np.cos(a) * m, np.sin(a) * m * (-1 if inverse else 1)
    y = x.copy()
    h = hd // 2
    x1, x2 = x[:, :, :n_rot, :h], x[:, :, :n_rot, h:]
    y[:, :, :n_rot, :h] = x1 * c - x2 * s
    y[:, :, :n_rot, h:] = x2 * c + x1 * s
    return y.reshape(B, T, n_heads * hd)


def mla_pack(q, kv, kpe, B, T, H, dn, dr, dv, inv_freq, mscale=1.0):
    """MLA's heads as attention's qkv (B, T, 3 H (dn+dr)): q heads (q_nope,
    rot(q_pe)), k heads (k_nope, rot(k_pe)) with k_pe shared, v heads (v, 0)."""
    hq = dn + dr
    q = np.float64(q).reshape(B, T, H, hq)
    kv = np.float64(kv).reshape(B, T, H, dn + dv)
    out = np.zeros((B, T, 3, H, hq))
    out[:, :, 0, :, :dn] = q[..., :dn]
    out[:, :, 0, :, dn:] = rope(q[..., dn:], B, T, H, H, dr, 0, inv_freq, mscale).reshape(B, T, H, dr)
    out[:, :, 1, :, :dn] = kv[..., :dn]
    out[:, :, 1, :, dn:] = rope(kpe, B, T, 1, 1, dr, 0, inv_freq, mscale).reshape(B, T, 1, dr)
    out[:, :, 2, :, :dv] = kv[..., dn:]
    return out.reshape(B, T, 3 * H * hq)


def mla_pack_backward(dout, B, T, H, dn, dr, dv, inv_freq, mscale=1.0):
    """(dq, dkv, dkpe) of mla_pack from its output's gradient."""
    hq = dn + dr
    g = np.float64(dout).reshape(B, T, 3, H, hq)
    dq = g[:, :, 0].copy()
    dq[..., dn:] = rope(g[:, :, 0, :, dn:], B, T, H, H, dr, 0, inv_freq, mscale, inverse=True).reshape(B, T, H, dr)
    dkv = np.concatenate([g[:, :, 1, :, :dn], g[:, :, 2, :, :dv]], axis=-1)
    dkpe = rope(g[:, :, 1, :, dn:], B, T, H, H, dr, 0, inv_freq, mscale, inverse=True).reshape(B, T, H, dr).sum(2)
    return dq.reshape(B, T, H * hq), dkv.reshape(B, T, H * (dn + dv)), dkpe


def attention_mask(T, window=0):
    """(T, T): query t sees key s <= t, and with window > 0 only t - window < s."""
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    return (s <= t) & ((t - s < window) if window > 0 else True)


def attention_fwd(qkv, B, T, H, KV, hd, window=0):
    x = np.float64(qkv).reshape(B, T, H + 2 * KV, hd)
    q, k, v = x[:, :, :H], x[:, :, H:H + KV], x[:, :, H + KV:]
    k = np.repeat(k, H // KV, axis=2)
    v = np.repeat(v, H // KV, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    s = np.where(attention_mask(T, window), s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    lse = (m + np.log(l))[..., 0]                         # (B, H, T)
    out = np.einsum("bhts,bshd->bthd", p / l, v).reshape(B, T, H * hd)
    return out, lse


def attention_bwd(dout, qkv, B, T, H, KV, hd, window=0):
    x = np.float64(qkv).reshape(B, T, H + 2 * KV, hd)
    q, k, v = x[:, :, :H], x[:, :, H:H + KV], x[:, :, H + KV:]
    g = H // KV
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(hd)
    s = np.where(attention_mask(T, window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    do = np.float64(dout).reshape(B, T, H, hd)
    dv = np.einsum("bhts,bthd->bshd", p, do)
    dp = np.einsum("bthd,bshd->bhts", do, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    dq = np.einsum("bhts,bshd->bthd", ds, kr)
    dk = np.einsum("bhts,bthd->bshd", ds, q)
    dk = dk.reshape(B, T, KV, g, hd).sum(3)
    dv = dv.reshape(B, T, KV, g, hd).sum(3)
    return np.concatenate([dq, dk, dv], axis=2).reshape(B, T, (H + 2 * KV) * hd)


FFN = {"swiglu": 0, "relu2": 1}   # SJ_FFN_*: the gated activation's kind


def swiglu_fwd(gu, F, act="swiglu"):
    """act(gate) * up: silu (SwiGLU) or relu^2."""
    gu = np.float64(gu)
    g, u = gu[:, :F], gu[:, F:]
    return (g / (1 + np.exp(-g)) if act == "swiglu" else np.maximum(g, 0) ** 2) * u


def swiglu_bwd(dh, gu, F, act="swiglu"):
    gu, dh = np.float64(gu), np.float64(dh)
    g, u = gu[:, :F], gu[:, F:]
    if act == "swiglu":
        s = 1 / (1 + np.exp(-g))
        a, da = g * s, s * (1 + g * (1 - s))
    else:
        p = np.maximum(g, 0)
        a, da = p * p, 2 * p
    return np.concatenate([dh * u * da, dh * a], axis=1)


def pair_heads_fwd(x, n_heads, hd):
    """(N, n_heads*hd) -> (N, n_heads/2*hd): head j = (head 2j + head 2j+1) / 2."""
    x = np.float64(x).reshape(len(x), n_heads // 2, 2, hd)
    return x.mean(2).reshape(len(x), -1)


def pair_heads_bwd(dout, n_heads, hd):
    d = np.float64(dout).reshape(len(dout), n_heads // 2, 1, hd) / 2
    return np.repeat(d, 2, axis=2).reshape(len(dout), n_heads * hd)


def mix_fwd(x, y, c0, w, a):
    """x with columns [c0, c0+w) of each row blended: (1 - a) x + a y."""
    out = np.float64(x).copy()
    out[:, c0:c0 + w] = (1 - a) * out[:, c0:c0 + w] + a * np.float64(y)[:, c0:c0 + w]
    return out


def mix_bwd(dout, c0, w, a):
    """(dx, dy): dx = dout off the slice, (1 - a) dout on it; dy = a dout on
    the slice, zero off it."""
    dx, dy = np.float64(dout).copy(), np.zeros(np.shape(dout))
    dy[:, c0:c0 + w] = a * dx[:, c0:c0 + w]
    dx[:, c0:c0 + w] *= 1 - a
    return dx, dy


def gather_rows_fwd(x, idx):
    """Rows idx of x; a zero row where idx < 0 (padding)."""
    x = np.float64(x)
    return np.where((idx >= 0)[:, None], x[np.maximum(idx, 0)], 0.0)


def gather_rows_bwd(dout, idx, N, dx0=None):
    """dout's rows scattered back to rows idx of an (N, C) gradient (added
    into dx0 when given, else every other row zero); padding skipped."""
    dx = np.zeros((N, dout.shape[1])) if dx0 is None else np.float64(dx0).copy()
    keep = idx >= 0
    dx[idx[keep]] += np.float64(dout)[keep]
    return dx


def cross_entropy(logits, targets, ignore):
    x = np.float64(logits)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    rows = np.arange(len(targets))
    t = np.where(targets == ignore, 0, targets)
    loss = np.where(targets == ignore, 0.0, lse - x[rows, t])
    return loss, lse


def cross_entropy_bwd(logits, lse, targets, ignore, scale):
    x = np.float64(logits)
    s = np.where(targets == ignore, 0.0, scale)[:, None]
    d = s * np.exp(x - lse[:, None])
    rows = np.arange(len(targets))
    keep = targets != ignore
    d[rows[keep], targets[keep]] -= scale
    return d


def adamw(p, g, m, v, n_decay, lr, b1, b2, eps, wd, clip, step):
    p, g, m, v = (np.float64(a) for a in (p, g, m, v))
    sumsq = float((g * g).sum())
    norm = math.sqrt(sumsq)
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    g = g * scale
    p = p.copy()
    p[:n_decay] *= 1 - lr * wd
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    p -= lr / bc1 * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p, m, v, sumsq


def _qk_gains(wq, wk, H, KV, hd):
    """(H + KV, hd): wq for every q head, then wk for every k head; ones when plain."""
    if wq is None:
        return np.ones((H + KV, hd))
    return np.concatenate([np.tile(np.float64(wq), (H, 1)), np.tile(np.float64(wk), (KV, 1))])


def qk_norm_fwd(qkv, wq, wk, H, KV, hd, eps):
    """Per-head RMSNorm of the q and k heads of qkv (N, (H + 2 KV) hd), v heads
    unchanged; wq = wk = None: no gain. -> out (N, (H + 2 KV) hd), rstd (N, H + KV)."""
    N = qkv.shape[0]
    x = np.float64(qkv).reshape(N, H + 2 * KV, hd)
    qk = x[:, :H + KV]
    rstd = 1.0 / np.sqrt((qk * qk).mean(-1) + eps)
    out = x.copy()
    out[:, :H + KV] = qk * rstd[..., None] * _qk_gains(wq, wk, H, KV, hd)
    return out.reshape(N, -1), rstd


def qk_norm_bwd(dout, qkv, wq, wk, rstd, H, KV, hd):
    """-> dqkv (N, (H + 2 KV) hd) (dv = dout), dwq (hd), dwk (hd); the last two
    None when plain."""
    N = qkv.shape[0]
    x = np.float64(qkv).reshape(N, H + 2 * KV, hd)[:, :H + KV]
    g = np.float64(dout).reshape(N, H + 2 * KV, hd)
    gq, r, w = g[:, :H + KV], np.float64(rstd).reshape(N, H + KV, 1), _qk_gains(wq, wk, H, KV, hd)
    dot = (gq * w * x).sum(-1, keepdims=True)
    dx = g.copy()
    dx[:, :H + KV] = gq * w * r - dot * r ** 3 / hd * x
    dw = gq * x * r
    if wq is None:
        return dx.reshape(N, -1), None, None
    return dx.reshape(N, -1), dw[:, :H].sum((0, 1)), dw[:, H:].sum((0, 1))


def moe_route(logits, k, router="softmax", norm_topk=False, bias=None):
    """Scores (N, E), chosen experts (N, k) best first (ties: the lower
    expert), weights (N, k), and the permutation's offsets (E + 1), slot
    (N k: permuted row -> choice t k + j, stable by expert) and row (its inverse)."""
    l = np.asarray(logits, np.float64)
    N, E = l.shape
    if router == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-l))
    else:
        s = np.exp(l - l.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    pick = s + (0.0 if bias is None else np.asarray(bias, np.float64))
    experts = np.argsort(-pick, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(s, experts, -1)
    if router == "sigmoid" or norm_topk:
        w /= w.sum(-1, keepdims=True)
    flat = experts.ravel()
    slot = np.argsort(flat, kind="stable")
    row = np.empty_like(slot)
    row[slot] = np.arange(slot.size)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))])
    return s, experts, w, offsets, slot, row


def moe_grouped_matmul(x, w, offsets, trans_b=True):
    """y rows of expert e = x rows @ W_e^T (trans_b; w: (E, n, K)) or @ W_e (w: (E, K, n))."""
    x = np.asarray(x, np.float64)
    E = len(offsets) - 1
    n = w.shape[1] if trans_b else w.shape[2]
    y = np.zeros((x.shape[0], n))
    for e in range(E):
        a, b = offsets[e], offsets[e + 1]
        y[a:b] = x[a:b] @ (w[e].T if trans_b else w[e])
    return y


def scan_fwd(qk, v, a, B, T, H, G, dk, dv, ld_qk, q_off, k_off, ld_v, v_off, scale):
    """The scan's definition, a loop over time: S = exp(a_t) S + k_t v_t^T,
    y_t = scale S^T q_t per head (q and k of group h // (H // G)); a None: no decay."""
    qk = np.asarray(qk, np.float64).reshape(B, T, ld_qk)
    v = np.asarray(v, np.float64).reshape(B, T, ld_v)
    y = np.zeros((B, T, H, dv))
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            S = np.zeros((dk, dv))
            for t in range(T):
                q = qk[b, t, q_off + g * dk:q_off + (g + 1) * dk]
                k = qk[b, t, k_off + g * dk:k_off + (g + 1) * dk]
                decay = np.exp(np.float64(a.reshape(B, T, H)[b, t, h])) if a is not None else 1.0
                S = decay * S + np.outer(k, v[b, t, v_off + h * dv:v_off + (h + 1) * dv])
                y[b, t, h] = scale * (q @ S)
    return y.reshape(B * T, H * dv)
