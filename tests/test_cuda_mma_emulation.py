"""A lane-by-lane NumPy port (float64) of the tensor-core attention kernels in
cuda/attention.cu, with the PTX ISA's mma.m16n8k16 fragment layouts: checks
their index, mask, sliding-window tile skipping (cuda/attention.cuh),
online-softmax and fragment-reuse logic on any machine, GPU or not. Keep it in step with the kernels (same names, same loops); the
GPU tests check the kernels themselves."""
import math
import numpy as np
import pytest
import cuda_ref as ref
from conftest import rel_err

L = np.arange(32); G = L >> 2; Tt = L & 3
LOG2E = 1.4426950408889634

# The fragment layouts as the PTX ISA defines them (what the mma consumes).
def frag_a_ptx(sm, base, ld):
    q = base + G * ld + 2 * Tt
    return np.stack([np.stack([sm[q], sm[q + 1]], -1), np.stack([sm[q + 8 * ld], sm[q + 8 * ld + 1]], -1),
                     np.stack([sm[q + 8], sm[q + 9]], -1), np.stack([sm[q + 8 * ld + 8], sm[q + 8 * ld + 9]], -1)], 1)
def frag_bt_ptx(sm, base, ld):
    q = base + G * ld + 2 * Tt
    return np.stack([sm[q], sm[q + 1]], -1), np.stack([sm[q + 8], sm[q + 9]], -1)
def frag_b_ptx(sm, base, ld):
    q = base + 2 * Tt * ld + G
    return np.stack([sm[q], sm[q + ld]], -1), np.stack([sm[q + 8 * ld], sm[q + 9 * ld]], -1)
# ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l
# receives row l/4, columns 2(l%4), +1 of each (.trans: rows 2(l%4), +1 of column l/4).
def ldsm_x4(sm, addr):
    return np.stack([np.stack([sm[addr[8 * i + G] + 2 * Tt], sm[addr[8 * i + G] + 2 * Tt + 1]], -1)
                     for i in range(4)], 1)
def ldsm_x4_trans(sm, addr):
    return np.stack([np.stack([sm[addr[8 * i + 2 * Tt] + G], sm[addr[8 * i + 2 * Tt + 1] + G]], -1)
                     for i in range(4)], 1)
# The kernels' fragment loads (same lane addresses as cuda/attention.cu).
def frag_a(sm, base, ld):
    return ldsm_x4(sm, base + ((L & 7) + (L & 8)) * ld + (L >> 4) * 8)
def frag_bt2(sm, base, ld):
    r = ldsm_x4(sm, base + ((L & 7) + (L >> 4) * 8) * ld + (L & 8))
    return (r[:, 0], r[:, 1]), (r[:, 2], r[:, 3])
def frag_b2(sm, base, ld):
    r = ldsm_x4_trans(sm, base + ((L & 7) + (L & 8)) * ld + (L >> 4) * 8)
    return (r[:, 0], r[:, 1]), (r[:, 2], r[:, 3])

def c_to_a(c0, c1):
    return np.stack([c0[:, 0:2], c0[:, 2:4], c1[:, 0:2], c1[:, 2:4]], 1)
def mma(c, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for j in range(2):
        A[G, 2 * Tt + j] = a[:, 0, j]; A[G + 8, 2 * Tt + j] = a[:, 1, j]
        A[G, 2 * Tt + 8 + j] = a[:, 2, j]; A[G + 8, 2 * Tt + 8 + j] = a[:, 3, j]
        B[2 * Tt + j, G] = b0[:, j]; B[2 * Tt + 8 + j, G] = b1[:, j]
    D = A @ B
    c[:, 0] += D[G, 2 * Tt]; c[:, 1] += D[G, 2 * Tt + 1]; c[:, 2] += D[G + 8, 2 * Tt]; c[:, 3] += D[G + 8, 2 * Tt + 1]

# cuda/attention.cuh: which (query, key) pairs and 64-row tiles a window keeps.
TILE = 64
def visible(q, k, window):
    return (k <= q) & ((window == 0) | (q - k < window))
def first_key(q, window):
    return q - window + 1 if window > 0 and q >= window else 0
def tile_unmasked(qt, kt, window):
    return kt < qt and (window == 0 or (qt - kt) * TILE + TILE - 1 < window)
def first_key_tile(qt, window):
    return first_key(qt * TILE, window) // TILE
def last_query_tile(kt, n_qt, window):
    last = n_qt - 1 if window == 0 else (kt * TILE + TILE - 1 + window - 1) // TILE
    return min(last, n_qt - 1)

def load_tile(g, r0, T, HD):   # g: (T, HD) rows -> smem flat (64*LD)
    LD = HD + 8
    sm = np.zeros((64, LD))
    n = max(0, min(64, T - r0))
    sm[:n, :HD] = g[r0:r0 + n]
    return sm.reshape(-1)

def fwd(qkv, B, T, H, KV, HD, window=0):
    x = qkv.reshape(B, T, H + 2 * KV, HD)
    out = np.full((B, T, H, HD), np.nan); lse = np.full((B, H, T), np.nan)
    LD = HD + 8; NK = HD // 16; ND = HD // 8
    for b in range(B):
        for h in range(H):
            kvh = h // (H // KV)
            for qt in range((T + 63) // 64):
                n_kt = min(qt * 64 + 63, T - 1) // 64 + 1
                for warp in range(4):
                    r0 = qt * 64 + warp * 16 + G; r1 = r0 + 8
                    qa = []
                    for kc in range(NK):
                        c = kc * 16 + 2 * Tt
                        def ld(r, cc):
                            ok = r < T
                            rr = np.where(ok, r, 0)
                            return np.where(ok[:, None], np.stack([x[b, rr, h, cc], x[b, rr, h, cc + 1]], -1), 0)
                        qa.append(np.stack([ld(r0, c), ld(r1, c), ld(r0, c + 8), ld(r1, c + 8)], 1))
                    o = np.zeros((ND, 32, 4)); m0 = np.full(32, -np.inf); m1 = m0.copy(); l0 = np.zeros(32); l1 = l0.copy()
                    sl2 = LOG2E / math.sqrt(HD)
                    for kt in range(first_key_tile(qt, window), n_kt):
                        Ks = load_tile(x[b, :, H + kvh], kt * 64, T, HD); Vs = load_tile(x[b, :, H + KV + kvh], kt * 64, T, HD)
                        s = np.zeros((8, 32, 4))
                        for kc in range(NK):
                            for j in range(0, 8, 2):
                                (b0, b1), (b2, b3) = frag_bt2(Ks, j * 8 * LD + kc * 16, LD)
                                mma(s[j], qa[kc], b0, b1); mma(s[j + 1], qa[kc], b2, b3)
                        masked = not tile_unmasked(qt, kt, window)
                        mx0 = np.full(32, -np.inf); mx1 = mx0.copy()
                        for j in range(8):
                            for e in range(4):
                                key = kt * 64 + j * 8 + 2 * Tt + (e & 1); row = r0 if e < 2 else r1
                                v = s[j][:, e] * sl2
                                if masked: v = np.where(visible(row, key, window) & (key < T), v, -np.inf)
                                s[j][:, e] = v
                                if e < 2: mx0 = np.maximum(mx0, v)
                                else: mx1 = np.maximum(mx1, v)
                        def quadmax(v):
                            v = np.maximum(v, v[L ^ 1]); return np.maximum(v, v[L ^ 2])
                        mx0, mx1 = quadmax(mx0), quadmax(mx1)
                        mn0 = np.maximum(m0, mx0); mn1 = np.maximum(m1, mx1)
                        z0 = np.where(mn0 == -np.inf, 0, mn0); z1 = np.where(mn1 == -np.inf, 0, mn1)
                        c0 = np.exp2(m0 - z0); c1 = np.exp2(m1 - z1)
                        ls0 = 0; ls1 = 0
                        for j in range(8):
                            s[j][:, 0] = np.exp2(s[j][:, 0] - z0); s[j][:, 1] = np.exp2(s[j][:, 1] - z0)
                            s[j][:, 2] = np.exp2(s[j][:, 2] - z1); s[j][:, 3] = np.exp2(s[j][:, 3] - z1)
                            ls0 = ls0 + s[j][:, 0] + s[j][:, 1]; ls1 = ls1 + s[j][:, 2] + s[j][:, 3]
                        l0 = l0 * c0 + ls0; l1 = l1 * c1 + ls1; m0, m1 = mn0, mn1
                        o[:, :, 0] *= c0; o[:, :, 1] *= c0; o[:, :, 2] *= c1; o[:, :, 3] *= c1
                        for kk in range(4):
                            pa = c_to_a(s[2 * kk], s[2 * kk + 1])
                            for dn in range(0, ND, 2):
                                (b0, b1), (b2, b3) = frag_b2(Vs, kk * 16 * LD + dn * 8, LD)
                                mma(o[dn], pa, b0, b1); mma(o[dn + 1], pa, b2, b3)
                    l0 = l0 + l0[L ^ 1]; l0 = l0 + l0[L ^ 2]; l1 = l1 + l1[L ^ 1]; l1 = l1 + l1[L ^ 2]
                    for dn in range(ND):
                        c = dn * 8 + 2 * Tt
                        for (r, a_, b_, l) in ((r0, 0, 1, l0), (r1, 2, 3, l1)):
                            ok = r < T
                            out[b, r[ok], h, c[ok]] = o[dn][ok, a_] / l[ok]
                            out[b, r[ok], h, c[ok] + 1] = o[dn][ok, b_] / l[ok]
                    for (r, m, l) in ((r0, m0, l0), (r1, m1, l1)):
                        ok = (r < T) & (Tt == 0)
                        lse[b, h, r[ok]] = m[ok] * math.log(2) + np.log(l[ok])
    return out.reshape(B, T, H * HD), lse

def rowdot(dout, out, B, T, H, HD):
    """attn_rowdot_k: D[b, h, t] = rowsum(dO * O); thread `part` of a row's HD/8
    sums elements [8 part, 8 part + 8), then a butterfly over the HD/8 lanes."""
    do = dout.reshape(B * T * H, HD // 8, 8); oo = out.reshape(B * T * H, HD // 8, 8)
    parts = (do * oo).sum(-1)                       # (rows, HD/8): one per lane
    L = HD // 8; off = L // 2
    while off:                                      # xor butterfly within aligned groups
        parts = parts + parts[:, np.arange(L) ^ off]; off //= 2
    rows = np.arange(B * T * H); h = rows % H; t = (rows // H) % T; b = rows // (H * T)
    D = np.full((B, H, T), np.nan)
    D[b, h, t] = parts[:, 0]
    return D

def rowstats(D_row, lse_row, q0, T):
    Ls = np.zeros(64); Ds = np.zeros(64)
    for r in range(64):
        q = q0 + r
        if q < T:
            Ds[r] = D_row[q]; Ls[r] = lse_row[q] * LOG2E
    return Ls, Ds

def bwd(dout, qkv, out, lse, B, T, H, KV, HD, window=0):
    x = qkv.reshape(B, T, H + 2 * KV, HD); do = dout.reshape(B, T, H, HD); oo = out.reshape(B, T, H, HD)
    d = np.full((B, T, H + 2 * KV, HD), np.nan)
    LD = HD + 8; NK = HD // 16; ND = HD // 8; grp = H // KV
    scale = 1 / math.sqrt(HD); sl2 = scale * LOG2E
    D = rowdot(dout, out, B, T, H, HD)
    for b in range(B):
        for kvh in range(KV):       # dkv kernel
            for kt in range((T + 63) // 64):
                Ks = load_tile(x[b, :, H + kvh], kt * 64, T, HD); Vs = load_tile(x[b, :, H + KV + kvh], kt * 64, T, HD)
                for warp in range(4):
                    kr0 = kt * 64 + warp * 16 + G; kr1 = kr0 + 8
                    dk = np.zeros((ND, 32, 4)); dv = np.zeros((ND, 32, 4))
                    n_qt = last_query_tile(kt, (T + 63) // 64, window) - kt + 1
                    for i in range(grp * n_qt):    # steps (head, query tile), double-buffered
                        h = kvh * grp + i // n_qt; qt = kt + i % n_qt
                        if True:   # (the kernel's step body; indentation kept)
                            Qs = load_tile(x[b, :, h], qt * 64, T, HD); dOs = load_tile(do[b, :, h], qt * 64, T, HD)
                            Ls, Ds = rowstats(D[b, h], lse[b, h], qt * 64, T)
                            st = np.zeros((8, 32, 4)); dp = np.zeros((8, 32, 4))
                            for kc in range(NK):
                                ka = frag_a(Ks, warp * 16 * LD + kc * 16, LD); va = frag_a(Vs, warp * 16 * LD + kc * 16, LD)
                                for j in range(0, 8, 2):
                                    (b0, b1), (b2, b3) = frag_bt2(Qs, j * 8 * LD + kc * 16, LD)
                                    mma(st[j], ka, b0, b1); mma(st[j + 1], ka, b2, b3)
                                    (b0, b1), (b2, b3) = frag_bt2(dOs, j * 8 * LD + kc * 16, LD)
                                    mma(dp[j], va, b0, b1); mma(dp[j + 1], va, b2, b3)
                            masked = not tile_unmasked(qt, kt, window)
                            for j in range(8):
                                for e in range(4):
                                    qq = j * 8 + 2 * Tt + (e & 1); q = qt * 64 + qq; key = kr0 if e < 2 else kr1
                                    keep = visible(q, key, window) & (q < T) & (key < T) if masked else True
                                    p = np.where(keep, np.exp2(st[j][:, e] * sl2 - Ls[qq]), 0)
                                    st[j][:, e] = p; dp[j][:, e] = p * (dp[j][:, e] - Ds[qq])
                            for kk in range(4):
                                pa = c_to_a(st[2 * kk], st[2 * kk + 1]); sa = c_to_a(dp[2 * kk], dp[2 * kk + 1])
                                for dn in range(0, ND, 2):
                                    (b0, b1), (b2, b3) = frag_b2(dOs, kk * 16 * LD + dn * 8, LD)
                                    mma(dv[dn], pa, b0, b1); mma(dv[dn + 1], pa, b2, b3)
                                    (b0, b1), (b2, b3) = frag_b2(Qs, kk * 16 * LD + dn * 8, LD)
                                    mma(dk[dn], sa, b0, b1); mma(dk[dn + 1], sa, b2, b3)
                    for dn in range(ND):
                        c = dn * 8 + 2 * Tt
                        for (kr, i0, i1) in ((kr0, 0, 1), (kr1, 2, 3)):
                            ok = kr < T
                            d[b, kr[ok], H + kvh, c[ok]] = dk[dn][ok, i0] * scale
                            d[b, kr[ok], H + kvh, c[ok] + 1] = dk[dn][ok, i1] * scale
                            d[b, kr[ok], H + KV + kvh, c[ok]] = dv[dn][ok, i0]
                            d[b, kr[ok], H + KV + kvh, c[ok] + 1] = dv[dn][ok, i1]
        for h in range(H):          # dq kernel
            kvh = h // grp
            for qt in range((T + 63) // 64):
                Qs = load_tile(x[b, :, h], qt * 64, T, HD); dOs = load_tile(do[b, :, h], qt * 64, T, HD)
                Ls, Ds = rowstats(D[b, h], lse[b, h], qt * 64, T)
                n_kt = min(qt * 64 + 63, T - 1) // 64 + 1
                for warp in range(4):
                    lr0 = warp * 16 + G; lr1 = lr0 + 8; r0 = qt * 64 + lr0; r1 = qt * 64 + lr1
                    dq = np.zeros((ND, 32, 4))
                    for kt in range(first_key_tile(qt, window), n_kt):
                        Ks = load_tile(x[b, :, H + kvh], kt * 64, T, HD); Vs = load_tile(x[b, :, H + KV + kvh], kt * 64, T, HD)
                        s = np.zeros((8, 32, 4)); dp = np.zeros((8, 32, 4))
                        for kc in range(NK):
                            qa = frag_a(Qs, warp * 16 * LD + kc * 16, LD); oa = frag_a(dOs, warp * 16 * LD + kc * 16, LD)
                            for j in range(0, 8, 2):
                                (b0, b1), (b2, b3) = frag_bt2(Ks, j * 8 * LD + kc * 16, LD)
                                mma(s[j], qa, b0, b1); mma(s[j + 1], qa, b2, b3)
                                (b0, b1), (b2, b3) = frag_bt2(Vs, j * 8 * LD + kc * 16, LD)
                                mma(dp[j], oa, b0, b1); mma(dp[j + 1], oa, b2, b3)
                        masked = not tile_unmasked(qt, kt, window)
                        for j in range(8):
                            for e in range(4):
                                key = kt * 64 + j * 8 + 2 * Tt + (e & 1)
                                lr = lr0 if e < 2 else lr1; row = r0 if e < 2 else r1
                                keep = visible(row, key, window) & (key < T) & (row < T) if masked else True
                                p = np.where(keep, np.exp2(s[j][:, e] * sl2 - Ls[lr]), 0)
                                s[j][:, e] = p * (dp[j][:, e] - Ds[lr])
                        for kk in range(4):
                            sa = c_to_a(s[2 * kk], s[2 * kk + 1])
                            for dn in range(0, ND, 2):
                                (b0, b1), (b2, b3) = frag_b2(Ks, kk * 16 * LD + dn * 8, LD)
                                mma(dq[dn], sa, b0, b1); mma(dq[dn + 1], sa, b2, b3)
                    for dn in range(ND):
                        c = dn * 8 + 2 * Tt
                        for (r, i0, i1) in ((r0, 0, 1), (r1, 2, 3)):
                            ok = r < T
                            d[b, r[ok], h, c[ok]] = dq[dn][ok, i0] * scale
                            d[b, r[ok], h, c[ok] + 1] = dq[dn][ok, i1] * scale
    return d.reshape(B, T, -1)


@pytest.mark.parametrize("shape", [(1, 100, 2, 1, 32, 0), (1, 70, 1, 1, 64, 0), (1, 20, 2, 2, 128, 0),
                                   (2, 9, 3, 3, 32, 0),
                                   # windows: inside a tile, across tiles, T - 1, longer than T
                                   (1, 200, 2, 1, 32, 5), (1, 200, 1, 1, 32, 70), (1, 150, 1, 1, 64, 149),
                                   (1, 100, 2, 2, 32, 1000)],
                         ids=lambda s: "B%dT%dH%dKV%dhd%dw%d" % s)
def test_mma_attention_logic_matches_float64(shape):
    B, T, H, KV, HD, window = shape
    rng = np.random.default_rng(sum(shape))
    qkv = rng.standard_normal((B, T, (H + 2 * KV) * HD))
    o, l = fwd(qkv, B, T, H, KV, HD, window)
    ro, rl = ref.attention_fwd(qkv, B, T, H, KV, HD, window)
    assert rel_err(o, ro) < 1e-12 and rel_err(l, rl) < 1e-12
    dout = rng.standard_normal((B, T, H * HD))
    d = bwd(dout, qkv, o, l, B, T, H, KV, HD, window)
    assert not np.isnan(d).any(), "an element of dqkv was never written"
    assert rel_err(d, ref.attention_bwd(dout, qkv, B, T, H, KV, HD, window)) < 1e-12


def test_ldmatrix_fragments_are_the_ptx_fragments():
    """The kernels' ldmatrix lane addresses deliver exactly the mma fragments."""
    LD = 72
    sm = np.random.default_rng(1).standard_normal(64 * LD)
    for base in (0, 16 * LD + 16, 40 * LD + 8):
        np.testing.assert_array_equal(frag_a(sm, base, LD), frag_a_ptx(sm, base, LD))
        for two, one, step in ((frag_bt2, frag_bt_ptx, 8 * LD), (frag_b2, frag_b_ptx, 8)):
            (b0, b1), (b2, b3) = two(sm, base, LD)
            for got, want in zip((b0, b1, b2, b3), one(sm, base, LD) + one(sm, base + step, LD)):
                np.testing.assert_array_equal(got, want)
