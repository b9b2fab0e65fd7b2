/* attention.cu — causal self-attention, MHA and GQA, optionally within a
 * sliding window (attention.cuh), forward and backward, flash-style:
 * scores live in registers a tile at a time with an online softmax; only
 * the log-sum-exp of each row is kept (B, H, T), and backward recomputes
 * the probabilities. No (T, T) matrix ever reaches memory.
 *
 * Two implementations, the simple one the reference for the fast one:
 *  - simple (any head_dim <= 256, f32, bf16 or f16): one warp per row, lanes
 *    over the head dimension, keys in order. Used for the f32 (parity) mode.
 *  - tensor cores (bf16 or f16, any head_dim a multiple of 8 up to 128, in
 *    a tile of the next multiple of 16, zero-padded): mma.sync m16n8k16
 *    (16-bit in, f32 accumulate; one template: the type names only the
 *    instruction and the f32 -> 16-bit packing, f16 clamped), 64-row
 *    tiles, 4 warps x 16 rows, FlashAttention-2 style forward. Backward
 *    in two kernels so that nothing is reduced with atomics
 *    (deterministic): one per key tile computes dK and dV over every query
 *    head of its KV group, one per query tile computes dQ.
 * Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.bf16 and
 * .f16 alike):
 * g = lane / 4, t = lane % 4; A: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
 * (g+8, 2t+8..)}; B: {(k = 2t..2t+1, n = g), (k = 2t+8.., n = g)};
 * C: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
 * Bound: tensor-core rate (mma.sync bf16/f16, f32 accumulate). Done so far for
 * speed: D = rowsum(dO*O) computed once per backward (attn_rowdot_k, it was
 * recomputed with 2-byte loads for every (key tile, query tile) pair), the
 * dK/dV kernel's Q/dO stream double-buffered with cp.async, the heaviest
 * causal query tiles scheduled first.
 * Fragments come from shared memory through ldmatrix (.trans for the
 * row-major B operands V, dO, Q, K of the second products); tiles stream
 * through two cp.async buffers; fragments that stay the same across a
 * kernel's loop (Q, dO in dQ; K, V in dK/dV) are loaded once; only the
 * diagonal tile and the tiles the window's edge crosses are masked, and
 * tiles wholly outside the window are never visited. On Hopper, head_dim
 * 64 runs attention_sm90.cu's wgmma kernels instead (the same tiles and
 * bits; forward 1.5x, backward 1.3x faster); SMEDJAN_ATTENTION=mma keeps
 * these. */
#include "attention.cuh"
#include "common.cuh"
#include "kernels.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int variant = -1;
extern "C" void sj_cuda_set_attention_variant(int v) { variant = v; }
static int get_variant(void) {
    if (variant < 0) {
        const char *e = getenv("SMEDJAN_ATTENTION");
        variant = e && !strcmp(e, "simple") ? 1 : e && !strcmp(e, "mma") ? 2 : 0;
    }
    return variant;
}

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* ======================= simple kernels (reference) ===================== */

// One warp per query row (b, h, t); lane holds dims lane + 32 j.
// out: (B, T, H*hd); lse: (B, H, T); qkv: (B, T, (H+2KV)*hd)
template <class T, int NP>
static __global__ void fwd_simple(T *out, float *lse, const T *qkv, int B, int T_, int H, int KV,
                                  int hd, int window) {
    const int64_t row = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= (int64_t)B * H * T_) return;
    const int t = (int)(row % T_), h = (int)((row / T_) % H), b = (int)(row / ((int64_t)T_ * H));
    const int64_t rs = (int64_t)(H + 2 * KV) * hd;
    const int grp = H / KV;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const T *q = base + (int64_t)t * rs + h * hd;
    const T *k0 = base + (H + h / grp) * hd, *v0 = base + (H + KV + h / grp) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float qr[NP], o[NP];
#pragma unroll
    for (int j = 0; j < NP; j++) {
        int d = lane + 32 * j;
        qr[j] = d < hd ? tof(q[d]) : 0.f;
        o[j] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int s = attn::first_key(t, window); s <= t; s++) {
        const T *k = k0 + (int64_t)s * rs, *v = v0 + (int64_t)s * rs;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < NP; j++) { int d = lane + 32 * j; if (d < hd) dot += qr[j] * tof(k[d]); }
        const float sc = scale * warp_sum(dot);
        const float mn = fmaxf(m, sc), corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < NP; j++) { int d = lane + 32 * j; if (d < hd) o[j] = o[j] * corr + p * tof(v[d]); }
        m = mn;
    }
    T *orow = out + ((int64_t)b * T_ + t) * H * hd + h * hd;
#pragma unroll
    for (int j = 0; j < NP; j++) { int d = lane + 32 * j; if (d < hd) orow[d] = fromf<T>(o[j] / l); }
    if (lane == 0) lse[((int64_t)b * H + h) * T_ + t] = m + logf(l);
}

// dQ, one warp per query row. dqkv: (B, T, (H+2KV)*hd) q part (+)=
template <class T, int NP>
static __global__ void bwd_dq_simple(T *dqkv, const T *dout, const T *qkv, const T *out,
                                     const float *lse, int B, int T_, int H, int KV, int hd,
                                     int window, int accum) {
    const int64_t row = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= (int64_t)B * H * T_) return;
    const int t = (int)(row % T_), h = (int)((row / T_) % H), b = (int)(row / ((int64_t)T_ * H));
    const int64_t rs = (int64_t)(H + 2 * KV) * hd;
    const int grp = H / KV;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const T *q = base + (int64_t)t * rs + h * hd;
    const T *k0 = base + (H + h / grp) * hd, *v0 = base + (H + KV + h / grp) * hd;
    const T *go = dout + ((int64_t)b * T_ + t) * H * hd + h * hd;
    const T *o = out + ((int64_t)b * T_ + t) * H * hd + h * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float qr[NP], gr[NP], dq[NP], D = 0.f;
#pragma unroll
    for (int j = 0; j < NP; j++) {
        int d = lane + 32 * j;
        qr[j] = d < hd ? tof(q[d]) : 0.f;
        gr[j] = d < hd ? tof(go[d]) : 0.f;
        D += d < hd ? gr[j] * tof(o[d]) : 0.f;
        dq[j] = 0.f;
    }
    D = warp_sum(D);
    const float L = lse[((int64_t)b * H + h) * T_ + t];
    for (int s = attn::first_key(t, window); s <= t; s++) {
        const T *k = k0 + (int64_t)s * rs, *v = v0 + (int64_t)s * rs;
        float qk = 0.f, gv = 0.f;
#pragma unroll
        for (int j = 0; j < NP; j++) {
            int d = lane + 32 * j;
            if (d < hd) { qk += qr[j] * tof(k[d]); gv += gr[j] * tof(v[d]); }
        }
        const float p = expf(scale * warp_sum(qk) - L);
        const float ds = p * (warp_sum(gv) - D) * scale;
#pragma unroll
        for (int j = 0; j < NP; j++) { int d = lane + 32 * j; if (d < hd) dq[j] += ds * tof(k[d]); }
    }
    T *dqr = dqkv + (int64_t)b * T_ * rs + (int64_t)t * rs + h * hd;
#pragma unroll
    for (int j = 0; j < NP; j++) { int d = lane + 32 * j; if (d < hd) put(dqr + d, dq[j], accum); }
}

// dK, dV, one warp per key row (b, kv head, s), over every query head of the group.
template <class T, int NP>
static __global__ void bwd_dkv_simple(T *dqkv, const T *dout, const T *qkv, const T *out,
                                      const float *lse, int B, int T_, int H, int KV, int hd,
                                      int window, int accum) {
    const int64_t row = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= (int64_t)B * KV * T_) return;
    const int s = (int)(row % T_), g = (int)((row / T_) % KV), b = (int)(row / ((int64_t)T_ * KV));
    const int64_t rs = (int64_t)(H + 2 * KV) * hd;
    const int grp = H / KV;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const T *k = base + (int64_t)s * rs + (H + g) * hd, *v = base + (int64_t)s * rs + (H + KV + g) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float kr[NP], vr[NP], dk[NP], dv[NP];
#pragma unroll
    for (int j = 0; j < NP; j++) {
        int d = lane + 32 * j;
        kr[j] = d < hd ? tof(k[d]) : 0.f;
        vr[j] = d < hd ? tof(v[d]) : 0.f;
        dk[j] = dv[j] = 0.f;
    }
    const int t_end = window > 0 && s + window < T_ ? s + window : T_;   /* queries that see key s */
    for (int h = g * grp; h < (g + 1) * grp; h++)
        for (int t = s; t < t_end; t++) {
            const T *q = base + (int64_t)t * rs + h * hd;
            const T *go = dout + ((int64_t)b * T_ + t) * H * hd + h * hd;
            const T *o = out + ((int64_t)b * T_ + t) * H * hd + h * hd;
            float qk = 0.f, gv = 0.f, D = 0.f;
#pragma unroll
            for (int j = 0; j < NP; j++) {
                int d = lane + 32 * j;
                if (d < hd) {
                    float gd = tof(go[d]);
                    qk += tof(q[d]) * kr[j]; gv += gd * vr[j]; D += gd * tof(o[d]);
                }
            }
            const float p = expf(scale * warp_sum(qk) - lse[((int64_t)b * H + h) * T_ + t]);
            const float ds = p * (warp_sum(gv) - warp_sum(D)) * scale;
#pragma unroll
            for (int j = 0; j < NP; j++) {
                int d = lane + 32 * j;
                if (d < hd) { dk[j] += ds * tof(q[d]); dv[j] += p * tof(go[d]); }
            }
        }
    T *dkr = dqkv + (int64_t)b * T_ * rs + (int64_t)s * rs + (H + g) * hd;
    T *dvr = dqkv + (int64_t)b * T_ * rs + (int64_t)s * rs + (H + KV + g) * hd;
#pragma unroll
    for (int j = 0; j < NP; j++) {
        int d = lane + 32 * j;
        if (d < hd) { put(dkr + d, dk[j], accum); put(dvr + d, dv[j], accum); }
    }
}

/* ================= tensor-core kernels (bf16 or f16) ==================== */

/* Not volatile: the compiler may interleave the mma with fragment loads.
 * The element type only names the instruction; fragments, layouts and the
 * f32 accumulators are the same for .bf16 and .f16. */
#define SJ_MMA16816(TY, PTX)                                                                     \
    template <> __device__ __forceinline__ void mma16816<TY>(float c[4], const uint32_t a[4],     \
                                                             uint32_t b0, uint32_t b1) {          \
        asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 {%0,%1,%2,%3}, "          \
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                           \
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                     \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                     \
    }
template <class T>
static __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
SJ_MMA16816(bf16, "bf16")
SJ_MMA16816(f16, "f16")
#undef SJ_MMA16816
template <class T> static __device__ __forceinline__ uint32_t ld32(const T *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

/* ldmatrix: four 8 x 8 16-bit matrices from shared memory in one instruction;
 * lanes 8i..8i+7 give the row addresses of matrix i (16-byte aligned).
 * Plain: lane l receives row l/4, columns 2(l%4), +1 of each matrix (an
 * mma A/B fragment register); .trans: rows 2(l%4), +1 of column l/4. */
template <class T>
static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const T *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
template <class T>
static __device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const T *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
/* A fragment of the 16 x 16 block at p (row-major, row stride ld):
 * matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in the order a0..a3. */
template <class T>
static __device__ __forceinline__ void frag_a(uint32_t a[4], const T *p, int ld, int lane) {
    ldsm_x4(a, p + ((lane & 7) + (lane & 8)) * ld + (lane >> 4) * 8);
}
/* B fragments of two adjacent n-blocks (n 0-7 -> b[0], b[1]; n 8-15 ->
 * b[2], b[3]) over 16 k, when B^T is stored row-major: B[k][n] = p[n*ld + k]. */
template <class T>
static __device__ __forceinline__ void frag_bt2(uint32_t b[4], const T *p, int ld, int lane) {
    ldsm_x4(b, p + ((lane & 7) + (lane >> 4) * 8) * ld + (lane & 8));
}
/* The same two n-blocks when B itself is row-major: B[k][n] = p[k*ld + n]. */
template <class T>
static __device__ __forceinline__ void frag_b2(uint32_t b[4], const T *p, int ld, int lane) {
    ldsm_x4_trans(b, p + ((lane & 7) + (lane & 8)) * ld + (lane >> 4) * 8);
}
/* Probabilities (C fragments of n-blocks 2kk, 2kk+1) as the A fragment of the next product. */
template <class T>
static __device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack2<T>(c0[0], c0[1]);
    a[1] = pack2<T>(c0[2], c0[3]);
    a[2] = pack2<T>(c1[0], c1[1]);
    a[3] = pack2<T>(c1[2], c1[3]);
}

/* 64 rows of hd elements from global (row stride rs elements) into shared
 * memory (row stride HD + 8: the 8 rows an ldmatrix reads fall in
 * different banks) with cp.async, 16 bytes a copy, bypassing registers
 * and L1; rows past T_ and columns past hd (a head dim padded to the
 * tile's HD) are zero-filled by a source size of 0. Complete
 * after cp_async_wait_all + a barrier. */
static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
static __device__ __forceinline__ void cp_async_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
static __device__ __forceinline__ void cp_async_wait_all(void) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
template <class T, int HD>
static __device__ __forceinline__ void load_tile_async(T *sm, const T *g, int64_t rs, int r0,
                                                       int T_, int hd) {
    constexpr int VPR = HD / 8, LD = HD + 8;
    for (int i = threadIdx.x; i < 64 * VPR; i += blockDim.x) {
        const int r = i / VPR, c = (i % VPR) * 8;
        const bool ok = r0 + r < T_ && c < hd;
        /* a zero-size copy reads nothing; the address stays a valid one */
        cp_async16(sm + r * LD + c, g + (ok ? (int64_t)(r0 + r) * rs + c : 0), ok);
    }
}

template <int HD> static constexpr __host__ __device__ int rowdot_lanes(void) { return HD <= 32 ? 4 : HD <= 64 ? 8 : 16; }

/* D[b][h][t] = rowsum(dO * O) of every query row, once per backward (the
 * tiles used to recompute it for every key tile). dout, out: (B, T, H*hd);
 * L lanes per row (HD / 8 rounded up to a power of two: aligned groups),
 * 16-byte loads, lanes past hd / 8 idle. */
template <class T, int HD>
static __global__ void __launch_bounds__(256) attn_rowdot_k(float *D, const T *dout,
                                                            const T *out, int T_, int H, int hd,
                                                            int64_t n_rows) {
    constexpr int L = rowdot_lanes<HD>();
    const int64_t gid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, row = gid / L;
    const int part = (int)(gid % L);
    float d = 0.f;
    if (row < n_rows && part * 8 < hd) {
        float a[8], o[8];
        load_vec(a, dout + row * hd + part * 8);
        load_vec(o, out + row * hd + part * 8);
#pragma unroll
        for (int k = 0; k < 8; k++) d += a[k] * o[k];
    }
#pragma unroll
    for (int off = L / 2; off; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
    if (row < n_rows && part == 0) {
        const int64_t h = row % H, bt = row / H, t = bt % T_, b = bt / T_;
        D[(b * H + h) * T_ + t] = d;
    }
}

/* lse (in log2 units) and D of 64 query rows (from attn_rowdot_k). */
static __device__ __forceinline__ void load_rowstats(float *Ls, float *Ds, const float *Dg,
                                                     const float *Lg, int q0, int T_) {
    const int r = threadIdx.x, q = q0 + r;
    if (r < 64) {
        Ds[r] = q < T_ ? Dg[q] : 0.f;
        Ls[r] = q < T_ ? Lg[q] * LOG2E : 0.f;
    }
}

/* Shared memory (bytes) of each kernel: tiles of 64 rows x (HD + 8). */
/* 16-bit elements (bf16 or f16): the sizes do not depend on which. */
template <int HD> static constexpr size_t tile_bytes(void) { return 64 * (HD + 8) * 2; }
template <int HD> static constexpr size_t fwd_smem(void) { return 4 * tile_bytes<HD>(); }
template <int HD> static constexpr size_t dq_smem(void) { return 6 * tile_bytes<HD>() + 2 * 64 * sizeof(float); }
template <int HD> static constexpr size_t dkv_smem(void) { return 6 * tile_bytes<HD>() + 4 * 64 * sizeof(float); }

// grid (ceil(T/64), B*H), 128 threads, fwd_smem<HD>() dynamic shared memory.
// Each warp owns 16 query rows; K and V tiles stream through two buffers
// (tile kt+1 is copied with cp.async while tile kt computes), from the
// first tile the window reaches. Only the diagonal tile and those the
// window's edge crosses need a mask (attn::tile_unmasked).
template <class T, int HD>
static __global__ void __launch_bounds__(128) fwd_mma(T *out, float *lse, const T *qkv,
                                                      int T_, int H, int KV, int hd, int window) {
    constexpr int LD = HD + 8, NK = HD / 16, ND = HD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T *Kb = (T *)smem, *Vb = Kb + 2 * 64 * LD;
    /* the last query tiles see the most keys: start them first */
    const int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
    const int64_t rs = (int64_t)(H + 2 * KV) * hd, orow = (int64_t)H * hd;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const T *Qg = base + h * hd, *Kg = base + (H + kvh) * hd, *Vg = base + (H + KV + kvh) * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = qt * 64 + warp * 16 + g, r1 = r0 + 8;
    const int kt0 = attn::first_key_tile(qt, window), n_kt = min(qt * 64 + 63, T_ - 1) / 64 + 1;
    load_tile_async<T, HD>(Kb + (kt0 & 1) * 64 * LD, Kg, rs, kt0 * 64, T_, hd);
    load_tile_async<T, HD>(Vb + (kt0 & 1) * 64 * LD, Vg, rs, kt0 * 64, T_, hd);
    cp_async_commit();
    uint32_t qa[NK][4];
#pragma unroll
    for (int kc = 0; kc < NK; kc++) {
        const int c = kc * 16 + 2 * t;
        const bool lo = kc * 16 < hd, hi = kc * 16 + 8 < hd;   /* past hd: the zero pad */
        qa[kc][0] = lo && r0 < T_ ? ld32(Qg + (int64_t)r0 * rs + c) : 0u;
        qa[kc][1] = lo && r1 < T_ ? ld32(Qg + (int64_t)r1 * rs + c) : 0u;
        qa[kc][2] = hi && r0 < T_ ? ld32(Qg + (int64_t)r0 * rs + c + 8) : 0u;
        qa[kc][3] = hi && r1 < T_ ? ld32(Qg + (int64_t)r1 * rs + c + 8) : 0u;
    }
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const float sl2 = LOG2E / sqrtf((float)hd);
    for (int kt = kt0; kt < n_kt; kt++) {
        /* tile kt landed (this thread's copies; the barrier: everyone's), and
         * every warp is done with tile kt-1, whose buffer is refilled next */
        cp_async_wait_all();
        __syncthreads();
        if (kt + 1 < n_kt) {
            const int nb = (kt + 1) & 1;
            load_tile_async<T, HD>(Kb + nb * 64 * LD, Kg, rs, (kt + 1) * 64, T_, hd);
            load_tile_async<T, HD>(Vb + nb * 64 * LD, Vg, rs, (kt + 1) * 64, T_, hd);
        }
        cp_async_commit();
        const T *Ks = Kb + (kt & 1) * 64 * LD, *Vs = Vb + (kt & 1) * 64 * LD;
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < NK; kc++)
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                uint32_t kb[4];
                frag_bt2(kb, Ks + j * 8 * LD + kc * 16, LD, lane);
                mma16816<T>(s[j], qa[kc], kb[0], kb[1]);
                mma16816<T>(s[j + 1], qa[kc], kb[2], kb[3]);
            }
        /* keys after a row (or past T_) or before its window */
        const bool masked = !attn::tile_unmasked(qt, kt, window);
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kt * 64 + j * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                float v = s[j][e] * sl2;
                if (masked && !(attn::visible(row, key, window) && key < T_)) v = -INFINITY;
                s[j][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* a row that has seen no key yet (past T_, or its window starts in
         * a later tile) keeps m = -inf, l = 0, o = 0 */
        const float z0 = mn0 == -INFINITY ? 0.f : mn0, z1 = mn1 == -INFINITY ? 0.f : mn1;
        const float c0 = exp2f(m0 - z0), c1 = exp2f(m1 - z1);
        float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            s[j][0] = exp2f(s[j][0] - z0); s[j][1] = exp2f(s[j][1] - z0);
            s[j][2] = exp2f(s[j][2] - z1); s[j][3] = exp2f(s[j][3] - z1);
            ls0 += s[j][0] + s[j][1];
            ls1 += s[j][2] + s[j][3];
        }
        l0 = l0 * c0 + ls0;
        l1 = l1 * c1 + ls1;
        m0 = mn0; m1 = mn1;
#pragma unroll
        for (int dn = 0; dn < ND; dn++) { o[dn][0] *= c0; o[dn][1] *= c0; o[dn][2] *= c1; o[dn][3] *= c1; }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[4];
            c_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                uint32_t vb[4];
                frag_b2(vb, Vs + kk * 16 * LD + dn * 8, LD, lane);
                mma16816<T>(o[dn], pa, vb[0], vb[1]);
                mma16816<T>(o[dn + 1], pa, vb[2], vb[3]);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    T *O = out + (int64_t)b * T_ * orow + h * hd;
#pragma unroll
    for (int dn = 0; dn < ND; dn++) {
        const int c = dn * 8 + 2 * t;
        if (dn * 8 >= hd) break;
        if (r0 < T_) *reinterpret_cast<uint32_t *>(O + (int64_t)r0 * orow + c) = pack2<T>(o[dn][0] * i0, o[dn][1] * i0);
        if (r1 < T_) *reinterpret_cast<uint32_t *>(O + (int64_t)r1 * orow + c) = pack2<T>(o[dn][2] * i1, o[dn][3] * i1);
    }
    if (t == 0) {
        float *L = lse + ((int64_t)b * H + h) * T_;
        if (r0 < T_) L[r0] = m0 * LN2 + logf(l0);
        if (r1 < T_) L[r1] = m1 * LN2 + logf(l1);
    }
}

// dK, dV of 64 keys of one KV head over all its query heads and the query
// tiles that see them (attn::last_query_tile). grid (ceil(T/64), B*KV), 128 threads, dkv_smem<HD>() dynamic shared memory.
// K and V stay in shared memory and their A fragments in registers; the
// (head, query tile) steps stream Q and dO through two buffers: step i+1's
// tiles are copied with cp.async while step i computes (one barrier per
// step). D: (B, H, T) from attn_rowdot_k. Bound: tensor-core rate
// (mma.sync); 2.5x the forward's FLOPs.
template <class T, int HD>
static __global__ void __launch_bounds__(128) bwd_dkv_mma(T *dqkv, const T *dout,
                                                          const T *qkv, const float *D,
                                                          const float *lse, int T_, int H,
                                                          int KV, int hd, int window, int accum) {
    constexpr int LD = HD + 8, NK = HD / 16, ND = HD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T *Ks = (T *)smem, *Vs = Ks + 64 * LD, *Qb = Vs + 64 * LD, *dOb = Qb + 2 * 64 * LD;
    float *Lb = (float *)(dOb + 2 * 64 * LD), *Db = Lb + 2 * 64;
    const int kt = blockIdx.x, b = blockIdx.y / KV, kvh = blockIdx.y % KV, grp = H / KV;
    const int64_t rs = (int64_t)(H + 2 * KV) * hd, orow = (int64_t)H * hd;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kr0 = kt * 64 + warp * 16 + g, kr1 = kr0 + 8;
    load_tile_async<T, HD>(Ks, base + (H + kvh) * hd, rs, kt * 64, T_, hd);
    load_tile_async<T, HD>(Vs, base + (H + KV + kvh) * hd, rs, kt * 64, T_, hd);
    const float scale = 1.0f / sqrtf((float)hd), sl2 = scale * LOG2E;
    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;
    /* steps: i = (h - h_first) * n_qt + (qt - kt), qt in [kt, last_query_tile] */
    const int n_qt = attn::last_query_tile(kt, (T_ + 63) / 64, window) - kt + 1, n_steps = grp * n_qt;
    /* issue step i's Q, dO tiles (cp.async) and row statistics into buffer i & 1 */
    auto issue = [&](int i) {
        const int h = kvh * grp + i / n_qt, qt = kt + i % n_qt, bf = i & 1;
        load_tile_async<T, HD>(Qb + bf * 64 * LD, base + h * hd, rs, qt * 64, T_, hd);
        load_tile_async<T, HD>(dOb + bf * 64 * LD, dout + (int64_t)b * T_ * orow + h * hd, orow, qt * 64, T_, hd);
        load_rowstats(Lb + bf * 64, Db + bf * 64, D + ((int64_t)b * H + h) * T_,
                      lse + ((int64_t)b * H + h) * T_, qt * 64, T_);
    };
    issue(0);
    cp_async_commit();
    /* this warp's 16 keys: the same every step, kept in registers when
     * they fit (at HD 128 dK, dV alone take 128 registers) */
    constexpr bool HOIST = HD <= 64;
    uint32_t ka[NK][4], va[NK][4];
    for (int i = 0; i < n_steps; i++) {
        const int qt = kt + i % n_qt, bf = i & 1;
        /* step i's copies (and K, V) done by this thread; the barrier makes
         * everyone's visible and ends step i-1's reads of buffer (i+1) & 1 */
        cp_async_wait_all();
        __syncthreads();
        if (i + 1 < n_steps) issue(i + 1);
        cp_async_commit();
        if (HOIST && i == 0)
#pragma unroll
            for (int kc = 0; kc < NK; kc++) {
                frag_a(ka[kc], Ks + warp * 16 * LD + kc * 16, LD, lane);
                frag_a(va[kc], Vs + warp * 16 * LD + kc * 16, LD, lane);
            }
        const T *Qs = Qb + bf * 64 * LD, *dOs = dOb + bf * 64 * LD;
        const float *Ls = Lb + bf * 64, *Ds = Db + bf * 64;
        float st[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[j][e] = dp[j][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < NK; kc++) {
            if (!HOIST) {
                frag_a(ka[kc], Ks + warp * 16 * LD + kc * 16, LD, lane);
                frag_a(va[kc], Vs + warp * 16 * LD + kc * 16, LD, lane);
            }
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                uint32_t fb[4];
                frag_bt2(fb, Qs + j * 8 * LD + kc * 16, LD, lane);
                mma16816<T>(st[j], ka[kc], fb[0], fb[1]);          // S^T = K Q^T
                mma16816<T>(st[j + 1], ka[kc], fb[2], fb[3]);
                frag_bt2(fb, dOs + j * 8 * LD + kc * 16, LD, lane);
                mma16816<T>(dp[j], va[kc], fb[0], fb[1]);          // dP^T = V dO^T
                mma16816<T>(dp[j + 1], va[kc], fb[2], fb[3]);
            }
        }
        /* only the diagonal tile has queries before a key, and those the
         * window's edge crosses queries past it; rows past T_ (zero Q, dO,
         * L, D) give p = 1 against zero vectors: adds nothing */
        const bool masked = !attn::tile_unmasked(qt, kt, window);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qq = j * 8 + 2 * t + (e & 1), q = qt * 64 + qq;
                const int key = e < 2 ? kr0 : kr1;
                const float p = masked && !(attn::visible(q, key, window) && q < T_ && key < T_)
                                    ? 0.f : exp2f(st[j][e] * sl2 - Ls[qq]);
                st[j][e] = p;
                dp[j][e] = p * (dp[j][e] - Ds[qq]);   // dS^T (without the scale)
            }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[4], sa[4];
            c_to_a<T>(pa, st[2 * kk], st[2 * kk + 1]);
            c_to_a<T>(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                uint32_t fb[4];
                frag_b2(fb, dOs + kk * 16 * LD + dn * 8, LD, lane);
                mma16816<T>(dv[dn], pa, fb[0], fb[1]);             // dV += P^T dO
                mma16816<T>(dv[dn + 1], pa, fb[2], fb[3]);
                frag_b2(fb, Qs + kk * 16 * LD + dn * 8, LD, lane);
                mma16816<T>(dk[dn], sa, fb[0], fb[1]);             // dK += dS^T Q
                mma16816<T>(dk[dn + 1], sa, fb[2], fb[3]);
            }
        }
    }
    T *dK = dqkv + (int64_t)b * T_ * rs + (H + kvh) * hd;
    T *dV = dqkv + (int64_t)b * T_ * rs + (H + KV + kvh) * hd;
#pragma unroll
    for (int dn = 0; dn < ND; dn++) {
        const int c = dn * 8 + 2 * t;
        if (dn * 8 >= hd) break;
        if (kr0 < T_) {
            put(dK + (int64_t)kr0 * rs + c, dk[dn][0] * scale, accum);
            put(dK + (int64_t)kr0 * rs + c + 1, dk[dn][1] * scale, accum);
            put(dV + (int64_t)kr0 * rs + c, dv[dn][0], accum);
            put(dV + (int64_t)kr0 * rs + c + 1, dv[dn][1], accum);
        }
        if (kr1 < T_) {
            put(dK + (int64_t)kr1 * rs + c, dk[dn][2] * scale, accum);
            put(dK + (int64_t)kr1 * rs + c + 1, dk[dn][3] * scale, accum);
            put(dV + (int64_t)kr1 * rs + c, dv[dn][2], accum);
            put(dV + (int64_t)kr1 * rs + c + 1, dv[dn][3], accum);
        }
    }
}

// dQ of 64 query rows of one head. grid (ceil(T/64), B*H), 128 threads,
// dq_smem<HD>() dynamic shared memory. Q and dO fragments stay in
// registers; K and V tiles stream through two buffers like the forward,
// over the same key tiles.
template <class T, int HD>
static __global__ void __launch_bounds__(128) bwd_dq_mma(T *dqkv, const T *dout,
                                                         const T *qkv, const float *D,
                                                         const float *lse, int T_, int H,
                                                         int KV, int hd, int window, int accum) {
    constexpr int LD = HD + 8, NK = HD / 16, ND = HD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T *Qs = (T *)smem, *dOs = Qs + 64 * LD, *Kb = dOs + 64 * LD, *Vb = Kb + 2 * 64 * LD;
    float *Ls = (float *)(Vb + 2 * 64 * LD), *Ds = Ls + 64;
    /* the last query tiles see the most keys: start them first */
    const int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
    const int64_t rs = (int64_t)(H + 2 * KV) * hd, orow = (int64_t)H * hd;
    const T *base = qkv + (int64_t)b * T_ * rs;
    const T *Kg = base + (H + kvh) * hd, *Vg = base + (H + KV + kvh) * hd;
    const T *dOg = dout + (int64_t)b * T_ * orow + h * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int lr0 = warp * 16 + g, lr1 = lr0 + 8, r0 = qt * 64 + lr0, r1 = qt * 64 + lr1;
    const int kt0 = attn::first_key_tile(qt, window), n_kt = min(qt * 64 + 63, T_ - 1) / 64 + 1;
    load_tile_async<T, HD>(Qs, base + h * hd, rs, qt * 64, T_, hd);
    load_tile_async<T, HD>(dOs, dOg, orow, qt * 64, T_, hd);
    load_tile_async<T, HD>(Kb + (kt0 & 1) * 64 * LD, Kg, rs, kt0 * 64, T_, hd);
    load_tile_async<T, HD>(Vb + (kt0 & 1) * 64 * LD, Vg, rs, kt0 * 64, T_, hd);
    cp_async_commit();
    load_rowstats(Ls, Ds, D + ((int64_t)b * H + h) * T_, lse + ((int64_t)b * H + h) * T_, qt * 64, T_);
    const float scale = 1.0f / sqrtf((float)hd), sl2 = scale * LOG2E;
    float dq[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;
    /* this warp's 16 query rows: the same every tile (in registers when they fit) */
    constexpr bool HOIST = HD <= 64;
    uint32_t qa[NK][4], oa[NK][4];
    for (int kt = kt0; kt < n_kt; kt++) {
        cp_async_wait_all();
        __syncthreads();
        if (kt + 1 < n_kt) {
            const int nb = (kt + 1) & 1;
            load_tile_async<T, HD>(Kb + nb * 64 * LD, Kg, rs, (kt + 1) * 64, T_, hd);
            load_tile_async<T, HD>(Vb + nb * 64 * LD, Vg, rs, (kt + 1) * 64, T_, hd);
        }
        cp_async_commit();
        if (HOIST && kt == kt0)
#pragma unroll
            for (int kc = 0; kc < NK; kc++) {
                frag_a(qa[kc], Qs + warp * 16 * LD + kc * 16, LD, lane);
                frag_a(oa[kc], dOs + warp * 16 * LD + kc * 16, LD, lane);
            }
        const T *Ks = Kb + (kt & 1) * 64 * LD, *Vs = Vb + (kt & 1) * 64 * LD;
        float s[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < NK; kc++) {
            if (!HOIST) {
                frag_a(qa[kc], Qs + warp * 16 * LD + kc * 16, LD, lane);
                frag_a(oa[kc], dOs + warp * 16 * LD + kc * 16, LD, lane);
            }
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                uint32_t fb[4];
                frag_bt2(fb, Ks + j * 8 * LD + kc * 16, LD, lane);
                mma16816<T>(s[j], qa[kc], fb[0], fb[1]);           // S = Q K^T
                mma16816<T>(s[j + 1], qa[kc], fb[2], fb[3]);
                frag_bt2(fb, Vs + j * 8 * LD + kc * 16, LD, lane);
                mma16816<T>(dp[j], oa[kc], fb[0], fb[1]);          // dP = dO V^T
                mma16816<T>(dp[j + 1], oa[kc], fb[2], fb[3]);
            }
        }
        /* only the diagonal tile has keys after a row, and those the
         * window's edge crosses keys before it; rows past T_ have zero dO,
         * L and D: dS = 0 there */
        const bool masked = !attn::tile_unmasked(qt, kt, window);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kt * 64 + j * 8 + 2 * t + (e & 1);
                const int lr = e < 2 ? lr0 : lr1, row = e < 2 ? r0 : r1;
                const float p = masked && !(attn::visible(row, key, window) && key < T_ && row < T_)
                                    ? 0.f : exp2f(s[j][e] * sl2 - Ls[lr]);
                s[j][e] = p * (dp[j][e] - Ds[lr]);           // dS (without the scale)
            }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t sa[4];
            c_to_a<T>(sa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                uint32_t fb[4];
                frag_b2(fb, Ks + kk * 16 * LD + dn * 8, LD, lane);
                mma16816<T>(dq[dn], sa, fb[0], fb[1]);             // dQ += dS K
                mma16816<T>(dq[dn + 1], sa, fb[2], fb[3]);
            }
        }
    }
    T *dQ = dqkv + (int64_t)b * T_ * rs + h * hd;
#pragma unroll
    for (int dn = 0; dn < ND; dn++) {
        const int c = dn * 8 + 2 * t;
        if (dn * 8 >= hd) break;
        if (r0 < T_) {
            put(dQ + (int64_t)r0 * rs + c, dq[dn][0] * scale, accum);
            put(dQ + (int64_t)r0 * rs + c + 1, dq[dn][1] * scale, accum);
        }
        if (r1 < T_) {
            put(dQ + (int64_t)r1 * rs + c, dq[dn][2] * scale, accum);
            put(dQ + (int64_t)r1 * rs + c + 1, dq[dn][3] * scale, accum);
        }
    }
}

/* ============================== launchers =============================== */

template <class T, int HD>
static void set_smem(void) {
    CUDA_CHECK(cudaFuncSetAttribute(fwd_mma<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)fwd_smem<HD>()));
    CUDA_CHECK(cudaFuncSetAttribute(bwd_dkv_mma<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dkv_smem<HD>()));
    CUDA_CHECK(cudaFuncSetAttribute(bwd_dq_mma<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dq_smem<HD>()));
}
template <class T> static void set_smem_all(void) {
    set_smem<T, 32>(); set_smem<T, 48>(); set_smem<T, 64>(); set_smem<T, 80>();
    set_smem<T, 96>(); set_smem<T, 112>(); set_smem<T, 128>();
}
extern "C" void sj_cuda_attention_init(void) { set_smem_all<bf16>(); set_smem_all<f16>(); }

/* The tensor-core kernels take every head_dim that is a multiple of 8 up to
 * 128: a tile of the next multiple of 16 (at least 32), the columns past
 * head_dim zero in shared memory and never stored. */
static bool use_mma(int B, int H, int KV, int hd) {
    return get_variant() != 1 && hd % 8 == 0 && hd >= 8 && hd <= 128 &&
           (int64_t)B * H <= 65535 && (int64_t)B * KV <= 65535;
}
static int mma_tile(int hd) { return hd <= 32 ? 32 : (hd + 15) / 16 * 16; }
#define SJ_MMA_DISPATCH(hd, CALL)                          \
    switch (mma_tile(hd)) {                                \
    case 32: CALL(32); break;                              \
    case 48: CALL(48); break;                              \
    case 64: CALL(64); break;                              \
    case 80: CALL(80); break;                              \
    case 96: CALL(96); break;                              \
    case 112: CALL(112); break;                            \
    default: CALL(128); break;                             \
    }

static void bad_hd(int hd) {
    char d[64];
    snprintf(d, sizeof d, "head_dim %d not supported (at most 256)", hd);
    sj_cuda_error("attention", d, __FILE__, __LINE__);
}

template <class T>
static void forward_simple(T *out, float *lse, const T *qkv, int B, int T_, int H, int KV, int hd,
                           int window) {
    const unsigned grid = (unsigned)(((int64_t)B * H * T_ + 7) / 8);
    cudaStream_t s = sj_stream();
    if (hd <= 32) fwd_simple<T, 1><<<grid, 256, 0, s>>>(out, lse, qkv, B, T_, H, KV, hd, window);
    else if (hd <= 64) fwd_simple<T, 2><<<grid, 256, 0, s>>>(out, lse, qkv, B, T_, H, KV, hd, window);
    else if (hd <= 128) fwd_simple<T, 4><<<grid, 256, 0, s>>>(out, lse, qkv, B, T_, H, KV, hd, window);
    else if (hd <= 256) fwd_simple<T, 8><<<grid, 256, 0, s>>>(out, lse, qkv, B, T_, H, KV, hd, window);
    else { bad_hd(hd); return; }
    LAUNCH_CHECK("attention_forward (simple)");
}

template <class T>
static void backward_simple(T *dqkv, const T *dout, const T *qkv, const T *out, const float *lse,
                            int B, int T_, int H, int KV, int hd, int window, int accum) {
    const unsigned gq = (unsigned)(((int64_t)B * H * T_ + 7) / 8), gk = (unsigned)(((int64_t)B * KV * T_ + 7) / 8);
    cudaStream_t s = sj_stream();
#define SJ_BWD_SIMPLE(NP)                                                                        \
    bwd_dq_simple<T, NP><<<gq, 256, 0, s>>>(dqkv, dout, qkv, out, lse, B, T_, H, KV, hd, window, \
                                            accum);                                              \
    LAUNCH_CHECK("attention_backward dq (simple)");                                              \
    bwd_dkv_simple<T, NP><<<gk, 256, 0, s>>>(dqkv, dout, qkv, out, lse, B, T_, H, KV, hd, window, \
                                             accum);                                              \
    LAUNCH_CHECK("attention_backward dkv (simple)");
    if (hd <= 32) { SJ_BWD_SIMPLE(1) }
    else if (hd <= 64) { SJ_BWD_SIMPLE(2) }
    else if (hd <= 128) { SJ_BWD_SIMPLE(4) }
    else if (hd <= 256) { SJ_BWD_SIMPLE(8) }
    else bad_hd(hd);
#undef SJ_BWD_SIMPLE
}

template <class T, int HD>
static void forward_mma(T *out, float *lse, const T *qkv, int B, int T_, int H, int KV, int hd,
                        int window) {
    fwd_mma<T, HD><<<dim3((T_ + 63) / 64, B * H), 128, fwd_smem<HD>(), sj_stream()>>>(out, lse, qkv, T_, H, KV,
                                                                                      hd, window);
    LAUNCH_CHECK("attention_forward (mma)");
}

/* The Hopper backward of head_dim 64 (attention_sm90.cu); 0 where it does not apply. */
static int backward_sm90(bf16 *d, const bf16 *go, const bf16 *x, const float *D, const float *lse,
                         int B, int T_, int H, int KV, int hd, int window, int accum) {
    return get_variant() == 0 &&
           sj_cuda_attention_backward_sm90_bf16(d, go, x, D, lse, B, T_, H, KV, hd, window, accum);
}
static int backward_sm90(f16 *d, const f16 *go, const f16 *x, const float *D, const float *lse,
                         int B, int T_, int H, int KV, int hd, int window, int accum) {
    return get_variant() == 0 &&
           sj_cuda_attention_backward_sm90_f16(d, go, x, D, lse, B, T_, H, KV, hd, window, accum);
}

template <class T, int HD>
static void backward_mma(T *dqkv, const T *dout, const T *qkv, const T *out,
                         const float *lse, int B, int T_, int H, int KV, int hd, int window,
                         int accum) {
    /* D = rowsum(dO * O) lives in scratch, (Bc, H, T) floats: batches in
     * chunks of Bc that fit (one chunk at the usual sizes: 16 x 12 x 1024
     * floats are 0.8 MB of the 16 MB). */
    sj_cuda_ctx *ctx = sj_cuda_cur();
    const int64_t per_b = (int64_t)H * T_ * sizeof(float);
    const int Bc = (int)min((int64_t)B, (int64_t)(ctx->scratch_bytes / per_b));
    if (Bc < 1 || !ctx->scratch) {
        backward_simple(dqkv, dout, qkv, out, lse, B, T_, H, KV, hd, window, accum);
        return;
    }
    float *D = (float *)ctx->scratch;
    const int64_t rs = (int64_t)(H + 2 * KV) * hd, orow = (int64_t)H * hd;
    cudaStream_t s = sj_stream();
    for (int b0 = 0; b0 < B; b0 += Bc) {
        const int nb = min(Bc, B - b0);
        const int64_t q_off = (int64_t)b0 * T_ * rs, o_off = (int64_t)b0 * T_ * orow;
        const int64_t n_rows = (int64_t)nb * T_ * H;
        attn_rowdot_k<T, HD><<<sj_blocks(n_rows * rowdot_lanes<HD>(), 256, 1 << 30), 256, 0, s>>>(
            D, dout + o_off, out + o_off, T_, H, hd, n_rows);
        LAUNCH_CHECK("attention_backward rowdot");
        if (hd == 64 && backward_sm90(dqkv + q_off, dout + o_off, qkv + q_off, D,
                                      lse + (int64_t)b0 * H * T_, nb, T_, H, KV, hd, window, accum))
            continue;
        bwd_dkv_mma<T, HD><<<dim3((T_ + 63) / 64, nb * KV), 128, dkv_smem<HD>(), s>>>(
            dqkv + q_off, dout + o_off, qkv + q_off, D, lse + (int64_t)b0 * H * T_, T_, H, KV, hd,
            window, accum);
        LAUNCH_CHECK("attention_backward dkv (mma)");
        bwd_dq_mma<T, HD><<<dim3((T_ + 63) / 64, nb * H), 128, dq_smem<HD>(), s>>>(
            dqkv + q_off, dout + o_off, qkv + q_off, D, lse + (int64_t)b0 * H * T_, T_, H, KV, hd,
            window, accum);
        LAUNCH_CHECK("attention_backward dq (mma)");
    }
}

extern "C" void sj_cuda_attention_forward_f32(void *out, float *lse, const void *qkv, int B,
                                              int T_, int H, int KV, int hd, int window) {
    if ((int64_t)B * T_ <= 0) return;
    forward_simple((float *)out, lse, (const float *)qkv, B, T_, H, KV, hd, window);
}
extern "C" void sj_cuda_attention_backward_f32(void *dqkv, const void *dout, const void *qkv,
                                               const void *out, const float *lse, int B, int T_,
                                               int H, int KV, int hd, int window, int accum) {
    if ((int64_t)B * T_ <= 0) return;
    backward_simple((float *)dqkv, (const float *)dout, (const float *)qkv, (const float *)out,
                    lse, B, T_, H, KV, hd, window, accum);
}
/* 16-bit modes: tensor cores where the head_dim fits a tile (use_mma),
 * else simple; on Hopper the forward of head_dim 64 is wgmma's
 * (attention_sm90.cu, the same bits). */
static int forward_sm90(bf16 *o, float *lse, const bf16 *x, int B, int T_, int H, int KV, int hd,
                        int window) {
    return get_variant() == 0 && sj_cuda_attention_forward_sm90_bf16(o, lse, x, B, T_, H, KV, hd, window);
}
static int forward_sm90(f16 *o, float *lse, const f16 *x, int B, int T_, int H, int KV, int hd,
                        int window) {
    return get_variant() == 0 && sj_cuda_attention_forward_sm90_f16(o, lse, x, B, T_, H, KV, hd, window);
}
template <class T>
static void forward_16(T *o, float *lse, const T *x, int B, int T_, int H, int KV, int hd, int window) {
    if ((int64_t)B * T_ <= 0) return;
    if (!use_mma(B, H, KV, hd)) { forward_simple(o, lse, x, B, T_, H, KV, hd, window); return; }
    if (hd == 64 && forward_sm90(o, lse, x, B, T_, H, KV, hd, window)) return;
#define SJ_FWD(HD) forward_mma<T, HD>(o, lse, x, B, T_, H, KV, hd, window)
    SJ_MMA_DISPATCH(hd, SJ_FWD)
#undef SJ_FWD
}
template <class T>
static void backward_16(T *d, const T *go, const T *x, const T *o, const float *lse, int B,
                        int T_, int H, int KV, int hd, int window, int accum) {
    if ((int64_t)B * T_ <= 0) return;
    if (!use_mma(B, H, KV, hd)) { backward_simple(d, go, x, o, lse, B, T_, H, KV, hd, window, accum); return; }
#define SJ_BWD(HD) backward_mma<T, HD>(d, go, x, o, lse, B, T_, H, KV, hd, window, accum)
    SJ_MMA_DISPATCH(hd, SJ_BWD)
#undef SJ_BWD
}
#define SJ_CU_ATTN16(T, TY)                                                                     \
extern "C" void sj_cuda_attention_forward_##T(void *out, float *lse, const void *qkv, int B,    \
                                              int T_, int H, int KV, int hd, int window) {      \
    forward_16((TY *)out, lse, (const TY *)qkv, B, T_, H, KV, hd, window);                      \
}                                                                                               \
extern "C" void sj_cuda_attention_backward_##T(void *dqkv, const void *dout, const void *qkv,   \
                                               const void *out, const float *lse, int B,        \
                                               int T_, int H, int KV, int hd, int window,       \
                                               int accum) {                                     \
    backward_16((TY *)dqkv, (const TY *)dout, (const TY *)qkv, (const TY *)out, lse, B, T_, H,  \
                KV, hd, window, accum);                                                         \
}
SJ_CU_ATTN16(bf16, bf16)
SJ_CU_ATTN16(f16, f16)
