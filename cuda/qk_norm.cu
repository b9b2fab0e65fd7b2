/* qk_norm.cu — per-head RMSNorm of q and k (Qwen3's q_norm and k_norm,
 * before RoPE), forward and backward; same expressions as
 * csrc/cpu/qk_norm.c. One warp per (row, head), the head's hd <= 256 values
 * in registers (lane l holds elements l, l + 32, ...), f32 sums: each
 * element is read once and written once, in place or not (a warp reads its
 * whole head before it writes any of it). The gains' gradients: per-block
 * partial sums in scratch, then the blocks summed in a fixed order
 * (sj_cuda_dw_reduce): deterministic, no atomics.
 * Bound: memory bandwidth (forward 2, backward 3 bytes moved per byte of
 * qkv); not yet measured. */
#include "common.cuh"
#include "kernels.h"

enum { QKN_WARPS = 8, QKN_MAX_HD = 256 };

// out, qkv: (N, (H + 2*KV)*hd); rstd: (N, H + KV); wq, wk: (hd) or NULL.
// Warp k of block b takes item (row, head) = b * QKN_WARPS + k; hd <= 32 * NV.
template <class T, int NV>
static __global__ void __launch_bounds__(QKN_WARPS * 32)
qk_norm_fwd_k(T *out, float *rstd, const T *qkv, const T *wq, const T *wk, int N, int H, int KV,
              int hd, float eps) {
    const int n_heads = H + 2 * KV, n_norm = H + KV, lane = threadIdx.x & 31;
    const int64_t item = (int64_t)blockIdx.x * QKN_WARPS + (threadIdx.x >> 5);
    if (item >= (int64_t)N * n_heads) return;
    const int64_t r = item / n_heads;
    const int h = (int)(item % n_heads);
    const T *x = qkv + item * hd;
    T *y = out + item * hd;
    if (h >= n_norm) {   /* v: copied, unless in place */
        if (y != x)
            for (int c = lane; c < hd; c += 32) y[c] = x[c];
        return;
    }
    const T *w = h < H ? wq : wk;
    float xv[NV], ss = 0.f;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = lane + 32 * j;
        xv[j] = c < hd ? tof(x[c]) : 0.f;
        ss += xv[j] * xv[j];
    }
    ss = warp_sum(ss);
    const float rs = 1.0f / sqrtf(ss / hd + eps);
    if (lane == 0) rstd[r * n_norm + h] = rs;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = lane + 32 * j;
        if (c < hd) y[c] = fromf<T>(w ? xv[j] * rs * tof(w[c]) : xv[j] * rs);
    }
}

// dqkv: (N, (H + 2*KV)*hd) (+)=; dout, qkv: (N, (H + 2*KV)*hd); rstd: (N, H + KV).
// part: (2, gridDim.x, hd), [0] for the q heads, [1] for the k heads: per
// block, the sum over its heads of dout * x * rstd; NULL when there are no gains.
// Block b owns rows [b * rows_per, (b + 1) * rows_per) and their (row, head)
// items; warp k of it items k, k + QKN_WARPS, ... (v heads too: dv = dout).
template <class T, int NV>
static __global__ void __launch_bounds__(QKN_WARPS * 32)
qk_norm_bwd_k(T *dqkv, float *part, const T *dout, const T *qkv, const T *wq, const T *wk,
              const float *rstd, int N, int H, int KV, int hd, int rows_per, int accum) {
    __shared__ float red[QKN_WARPS][2][QKN_MAX_HD];
    const int n_heads = H + 2 * KV, n_norm = H + KV;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t r0 = (int64_t)blockIdx.x * rows_per;
    const int64_t n_items = (min((int64_t)N, r0 + rows_per) - r0) * n_heads;
    float dwq[NV], dwk[NV];
#pragma unroll
    for (int j = 0; j < NV; j++) dwq[j] = dwk[j] = 0.f;
    for (int64_t i = warp; i < n_items; i += QKN_WARPS) {
        const int64_t r = r0 + i / n_heads, off = (r0 * n_heads + i) * hd;
        const int h = (int)(i % n_heads);
        const T *g = dout + off, *x = qkv + off;
        T *dx = dqkv + off;
        if (h >= n_norm) {   /* dv = dout; in place (accum 0) it is already there */
            if (accum || dx != g)
                for (int c = lane; c < hd; c += 32) put(dx + c, tof(g[c]), accum);
            continue;
        }
        const T *w = h < H ? wq : wk;
        const float rs = rstd[r * n_norm + h];
        float xv[NV], gv[NV], wv[NV], dot = 0.f;
#pragma unroll
        for (int j = 0; j < NV; j++) {
            const int c = lane + 32 * j;
            xv[j] = c < hd ? tof(x[c]) : 0.f;
            gv[j] = c < hd ? tof(g[c]) : 0.f;
            wv[j] = c < hd && w ? tof(w[c]) : 1.f;
            dot += gv[j] * wv[j] * xv[j];
        }
        dot = warp_sum(dot);
        const float k = dot * rs * rs * rs / hd;
#pragma unroll
        for (int j = 0; j < NV; j++) {
            const int c = lane + 32 * j;
            if (c >= hd) continue;
            put(dx + c, gv[j] * wv[j] * rs - k * xv[j], accum);
            if (h < H) dwq[j] += gv[j] * xv[j] * rs;
            else dwk[j] += gv[j] * xv[j] * rs;
        }
    }
    if (!part) return;
    /* the block's warp partials, summed in warp order */
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = lane + 32 * j;
        if (c < hd) { red[warp][0][c] = dwq[j]; red[warp][1][c] = dwk[j]; }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < 2 * hd; c += QKN_WARPS * 32) {
        const int which = c / hd, cc = c % hd;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < QKN_WARPS; k++) s += red[k][which][cc];
        part[((int64_t)which * gridDim.x + blockIdx.x) * hd + cc] = s;
    }
}

/* Values per lane for a head of hd; 0: hd is too large. */
static int qkn_nv(int hd) { return hd <= 64 ? 2 : hd <= 128 ? 4 : hd <= QKN_MAX_HD ? 8 : 0; }

template <class T>
static void qk_norm_forward(T *out, float *rstd, const T *qkv, const T *wq, const T *wk, int N,
                            int H, int KV, int hd, float eps) {
    if (N <= 0 || hd <= 0) return;
    const unsigned g = (unsigned)(((int64_t)N * (H + 2 * KV) + QKN_WARPS - 1) / QKN_WARPS);
    cudaStream_t s = sj_stream();
    switch (qkn_nv(hd)) {
    case 2: qk_norm_fwd_k<T, 2><<<g, QKN_WARPS * 32, 0, s>>>(out, rstd, qkv, wq, wk, N, H, KV, hd, eps); break;
    case 4: qk_norm_fwd_k<T, 4><<<g, QKN_WARPS * 32, 0, s>>>(out, rstd, qkv, wq, wk, N, H, KV, hd, eps); break;
    case 8: qk_norm_fwd_k<T, 8><<<g, QKN_WARPS * 32, 0, s>>>(out, rstd, qkv, wq, wk, N, H, KV, hd, eps); break;
    default: sj_cuda_error("qk_norm_forward", "head_dim above 256", __FILE__, __LINE__); return;
    }
    LAUNCH_CHECK("qk_norm_forward");
}

template <class T>
static void qk_norm_backward(T *dqkv, float *dwq, float *dwk, const T *dout, const T *qkv,
                             const T *wq, const T *wk, const float *rstd, int N, int H, int KV,
                             int hd, int accum, int dw_accum) {
    if (N <= 0 || hd <= 0) return;
    if (!qkn_nv(hd)) { sj_cuda_error("qk_norm_backward", "head_dim above 256", __FILE__, __LINE__); return; }
    sj_cuda_ctx *ctx = sj_cuda_cur();
    /* About 1024 blocks (one wave of 8-warp blocks on an H100), fewer when
     * their partials would not fit the scratch. */
    float *part = dwq ? (float *)ctx->scratch : nullptr;
    const int64_t max_blocks = part ? (int64_t)(ctx->scratch_bytes / (2 * sizeof(float) * (size_t)hd)) : 1024;
    if (max_blocks < 1) { sj_cuda_error("qk_norm_backward", "no scratch for the gains' partials", __FILE__, __LINE__); return; }
    const int64_t target = max_blocks < 1024 ? max_blocks : 1024;
    const int rows_per = (int)((N + target - 1) / target);
    const unsigned nb = (unsigned)((N + rows_per - 1) / rows_per);
    cudaStream_t s = sj_stream();
#define SJ_QKN_BWD(NV)                                                                        \
    qk_norm_bwd_k<T, NV><<<nb, QKN_WARPS * 32, 0, s>>>(dqkv, part, dout, qkv, wq, wk, rstd, N, H, \
                                                       KV, hd, rows_per, accum)
    switch (qkn_nv(hd)) {
    case 2: SJ_QKN_BWD(2); break;
    case 4: SJ_QKN_BWD(4); break;
    default: SJ_QKN_BWD(8); break;
    }
#undef SJ_QKN_BWD
    LAUNCH_CHECK("qk_norm_backward");
    if (!part) return;
    sj_cuda_dw_reduce(dwq, part, (int)nb, hd, dw_accum);
    sj_cuda_dw_reduce(dwk, part + (size_t)nb * hd, (int)nb, hd, dw_accum);
}

#define SJ_CU_QKN(T, TY)                                                                      \
extern "C" void sj_cuda_qk_norm_forward_##T(void *out, float *rstd, const void *qkv,         \
                                            const void *wq, const void *wk, int N, int H,     \
                                            int KV, int hd, float eps) {                      \
    qk_norm_forward((TY *)out, rstd, (const TY *)qkv, (const TY *)wq, (const TY *)wk, N, H,   \
                    KV, hd, eps);                                                             \
}                                                                                             \
extern "C" void sj_cuda_qk_norm_backward_##T(void *dqkv, float *dwq, float *dwk,             \
                                             const void *dout, const void *qkv,               \
                                             const void *wq, const void *wk,                  \
                                             const float *rstd, int N, int H, int KV, int hd, \
                                             int accum, int dw_accum) {                       \
    qk_norm_backward((TY *)dqkv, dwq, dwk, (const TY *)dout, (const TY *)qkv, (const TY *)wq, \
                     (const TY *)wk, rstd, N, H, KV, hd, accum, dw_accum);                    \
}
SJ_CU_QKN(f32, float)
SJ_CU_QKN(bf16, bf16)
SJ_CU_QKN(f16, f16)
