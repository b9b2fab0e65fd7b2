/* scan.cu — the scan (causal linear attention with a per-head decay;
 * Mamba-2's SSD) on the GPU, forward and backward, the same sums as
 * csrc/cpu/scan.c in the token-serial recurrent form: the simplest correct
 * kernel, kept as the reference a chunked tensor-core kernel is to be
 * tested against. State in f32 whatever the input type; no O(T^2) memory.
 * Forward: one block per (b, h); thread i owns columns i, i + 128, i + 256
 * of the (dk, dv) state S in local memory: S = exp(a_t) S + k_t v_t^T, y_t =
 * scale S^T q_t. Backward: one block per (b, group) (its dq and dk are its
 * own: no atomics, the same bits every run), its heads in turn; pass 1
 * forward for dq_t = scale S_t dy_t, pass 2 backward with R_t = q_t dy_t^T +
 * exp(a_{t+1}) R_{t+1} for dk_t = scale R_t v_t, dv_t = scale R_t^T k_t and
 * da_t = sum_{u>=t} (y_u . dy_u - k_u . dk_u).
 * Bound: latency of the per-token step (T serial steps per block); not
 * measured. */
#include "common.cuh"
#include "kernels.h"

enum { SCAN_THREADS = 128, SCAN_COLS = 3, SCAN_WARPS = SCAN_THREADS / 32 };

template <class T>
static __global__ void scan_zero_k(T *x, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fromf<T>(0.0f);
}

/* y: (B*T, H*dv); qk, v: rows of ld_qk, ld_v; a: (B*T, H) or NULL. DK >= dk. */
template <class T, int DK>
static __global__ void __launch_bounds__(SCAN_THREADS)
scan_fwd_k(T *y, const T *qk, const T *v, const T *a, sj_scan_dims d, float scale) {
    __shared__ float qs[DK], ks[DK];
    __shared__ float decay;
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H, g = h / (d.H / d.G), tid = threadIdx.x;
    float S[SCAN_COLS][DK];
#pragma unroll
    for (int c = 0; c < SCAN_COLS; c++)
        for (int e = 0; e < d.dk; e++) S[c][e] = 0.0f;
    for (int t = 0; t < d.T; t++) {
        const int64_t r = (int64_t)b * d.T + t;
        __syncthreads();   /* the previous token's reads of qs, ks are done */
        for (int e = tid; e < d.dk; e += SCAN_THREADS) {
            qs[e] = tof(qk[r * d.ld_qk + d.q_off + (int64_t)g * d.dk + e]);
            ks[e] = tof(qk[r * d.ld_qk + d.k_off + (int64_t)g * d.dk + e]);
        }
        if (tid == 0) decay = a ? expf(tof(a[r * d.H + h])) : 1.0f;
        __syncthreads();
#pragma unroll
        for (int c = 0; c < SCAN_COLS; c++) {
            const int p = tid + c * SCAN_THREADS;
            if (p >= d.dv) continue;
            const float vp = tof(v[r * d.ld_v + d.v_off + (int64_t)h * d.dv + p]);
            float acc = 0.0f;
            for (int e = 0; e < d.dk; e++) {
                S[c][e] = decay * S[c][e] + ks[e] * vp;
                acc += qs[e] * S[c][e];
            }
            y[r * d.H * d.dv + (int64_t)h * d.dv + p] = fromf<T>(scale * acc);
        }
    }
}

/* out[e] = sum over the block's threads of part(e) for e < dk, through
 * red (SCAN_WARPS, DK) in a fixed order; every thread calls it. */
template <int DK, class F>
static __device__ void scan_rows_sum(float (*red)[DK], int dk, F part) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    for (int e = 0; e < dk; e++) {
        const float s = warp_sum(part(e));
        if (lane == 0) red[w][e] = s;
    }
    __syncthreads();
}

template <class T, int DK>
static __global__ void __launch_bounds__(SCAN_THREADS)
scan_bwd_k(T *dqk, T *dv, T *da, const T *dy, const T *qk, const T *v, const T *a, const T *y,
           sj_scan_dims d, float scale, int accum_a) {
    __shared__ float qs[DK], ks[DK], red[SCAN_WARPS][DK];
    __shared__ float decay;
    const int b = blockIdx.x / d.G, g = blockIdx.x % d.G, per = d.H / d.G, tid = threadIdx.x;
    float S[SCAN_COLS][DK];
    for (int h = g * per; h < (g + 1) * per; h++) {
        const int64_t ho = (int64_t)h * d.dv;
        /* pass 1: forward, dq_t = scale S_t dy_t */
#pragma unroll
        for (int c = 0; c < SCAN_COLS; c++)
            for (int e = 0; e < d.dk; e++) S[c][e] = 0.0f;
        for (int t = 0; t < d.T; t++) {
            const int64_t r = (int64_t)b * d.T + t;
            __syncthreads();
            for (int e = tid; e < d.dk; e += SCAN_THREADS)
                ks[e] = tof(qk[r * d.ld_qk + d.k_off + (int64_t)g * d.dk + e]);
            if (tid == 0) decay = a ? expf(tof(a[r * d.H + h])) : 1.0f;
            __syncthreads();
            float dyp[SCAN_COLS];
#pragma unroll
            for (int c = 0; c < SCAN_COLS; c++) {
                const int p = tid + c * SCAN_THREADS;
                dyp[c] = 0.0f;
                if (p >= d.dv) continue;
                const float vp = tof(v[r * d.ld_v + d.v_off + ho + p]);
                dyp[c] = tof(dy[r * d.H * d.dv + ho + p]);
                for (int e = 0; e < d.dk; e++) S[c][e] = decay * S[c][e] + ks[e] * vp;
            }
            scan_rows_sum<DK>(red, d.dk, [&](int e) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < SCAN_COLS; c++) s += S[c][e] * dyp[c];
                return s;
            });
            if (dqk)
                for (int e = tid; e < d.dk; e += SCAN_THREADS) {
                    float s = 0.0f;
#pragma unroll
                    for (int w = 0; w < SCAN_WARPS; w++) s += red[w][e];
                    put(dqk + r * d.ld_qk + d.q_off + (int64_t)g * d.dk + e, scale * s, 1);
                }
        }
        /* pass 2: backward, R_t = q_t dy_t^T + exp(a_{t+1}) R_{t+1} */
#pragma unroll
        for (int c = 0; c < SCAN_COLS; c++)
            for (int e = 0; e < d.dk; e++) S[c][e] = 0.0f;
        float later = 1.0f, running = 0.0f;   /* exp(a_{t+1}); sum of dc over u > t */
        for (int t = d.T - 1; t >= 0; t--) {
            const int64_t r = (int64_t)b * d.T + t;
            __syncthreads();
            for (int e = tid; e < d.dk; e += SCAN_THREADS) {
                qs[e] = tof(qk[r * d.ld_qk + d.q_off + (int64_t)g * d.dk + e]);
                ks[e] = tof(qk[r * d.ld_qk + d.k_off + (int64_t)g * d.dk + e]);
            }
            if (tid == 0) decay = a ? expf(tof(a[r * d.H + h])) : 1.0f;
            __syncthreads();
            float vpc[SCAN_COLS], ydy = 0.0f;
#pragma unroll
            for (int c = 0; c < SCAN_COLS; c++) {
                const int p = tid + c * SCAN_THREADS;
                vpc[c] = 0.0f;
                if (p >= d.dv) continue;
                const float dyp = tof(dy[r * d.H * d.dv + ho + p]);
                vpc[c] = tof(v[r * d.ld_v + d.v_off + ho + p]);
                ydy += tof(y[r * d.H * d.dv + ho + p]) * dyp;
                float acc = 0.0f;
                for (int e = 0; e < d.dk; e++) {
                    S[c][e] = later * S[c][e] + qs[e] * dyp;
                    acc += S[c][e] * ks[e];
                }
                if (dv) put(dv + r * d.ld_v + d.v_off + ho + p, scale * acc, 1);
            }
            scan_rows_sum<DK>(red, d.dk, [&](int e) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < SCAN_COLS; c++) s += S[c][e] * vpc[c];
                return s;
            });
            float kdk = 0.0f;
            for (int e = tid; e < d.dk; e += SCAN_THREADS) {
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < SCAN_WARPS; w++) s += red[w][e];
                s *= scale;
                kdk += ks[e] * s;
                if (dqk) put(dqk + r * d.ld_qk + d.k_off + (int64_t)g * d.dk + e, s, 1);
            }
            const float dc = block_reduce<false>(ydy - kdk);
            running += dc;
            if (tid == 0 && da) put(da + r * d.H + h, running, accum_a);
            later = decay;
        }
    }
}

template <class T>
static void scan_zero(T *x, int64_t n) {
    scan_zero_k<T><<<(unsigned)((n + 255) / 256), 256, 0, sj_stream()>>>(x, n);
    LAUNCH_CHECK("scan_backward (zero)");
}

/* The state's rows per thread column (a multiple that holds dk), 0 if none. */
static int scan_dk(const sj_scan_dims *d) {
    if (d->dv > SCAN_THREADS * SCAN_COLS) return 0;
    return d->dk <= 64 ? 64 : d->dk <= 128 ? 128 : d->dk <= 256 ? 256 : 0;
}

template <class T>
static void scan_forward(T *y, const T *qk, const T *v, const T *a, const sj_scan_dims *d,
                         float scale) {
    if (d->B <= 0 || d->T <= 0) return;
    const unsigned nb = (unsigned)(d->B * d->H);
    cudaStream_t s = sj_stream();
    switch (scan_dk(d)) {
    case 64: scan_fwd_k<T, 64><<<nb, SCAN_THREADS, 0, s>>>(y, qk, v, a, *d, scale); break;
    case 128: scan_fwd_k<T, 128><<<nb, SCAN_THREADS, 0, s>>>(y, qk, v, a, *d, scale); break;
    case 256: scan_fwd_k<T, 256><<<nb, SCAN_THREADS, 0, s>>>(y, qk, v, a, *d, scale); break;
    default: sj_cuda_error("scan_forward", "dk above 256 or dv above 384", __FILE__, __LINE__); return;
    }
    LAUNCH_CHECK("scan_forward");
}

template <class T>
static void scan_backward(T *dqk, T *dv, T *da, const T *dy, const T *qk, const T *v, const T *a,
                          const T *y, const sj_scan_dims *d, float scale, int accum_qk,
                          int accum_v, int accum_a) {
    if (d->B <= 0 || d->T <= 0) return;
    const int64_t N = (int64_t)d->B * d->T;
    if (dqk && !accum_qk) scan_zero(dqk, N * d->ld_qk);
    if (dv && !accum_v) scan_zero(dv, N * d->ld_v);
    if (!a) da = nullptr;
    const unsigned nb = (unsigned)(d->B * d->G);
    cudaStream_t s = sj_stream();
#define SJ_SCAN_BWD(DK)                                                                   \
    scan_bwd_k<T, DK><<<nb, SCAN_THREADS, 0, s>>>(dqk, dv, da, dy, qk, v, a, y, *d, scale, \
                                                  accum_a)
    switch (scan_dk(d)) {
    case 64: SJ_SCAN_BWD(64); break;
    case 128: SJ_SCAN_BWD(128); break;
    case 256: SJ_SCAN_BWD(256); break;
    default: sj_cuda_error("scan_backward", "dk above 256 or dv above 384", __FILE__, __LINE__); return;
    }
#undef SJ_SCAN_BWD
    LAUNCH_CHECK("scan_backward");
}

#define SJ_CU_SCAN(T, TY)                                                                   \
extern "C" void sj_cuda_scan_forward_##T(void *y, const void *qk, const void *v,           \
                                         const void *a, const sj_scan_dims *d, float scale) { \
    scan_forward((TY *)y, (const TY *)qk, (const TY *)v, (const TY *)a, d, scale);          \
}                                                                                           \
extern "C" void sj_cuda_scan_backward_##T(void *dqk, void *dv, void *da, const void *dy,   \
                                          const void *qk, const void *v, const void *a,    \
                                          const void *y, const sj_scan_dims *d,            \
                                          float scale, int accum_qk, int accum_v,          \
                                          int accum_a) {                                   \
    scan_backward((TY *)dqk, (TY *)dv, (TY *)da, (const TY *)dy, (const TY *)qk,            \
                  (const TY *)v, (const TY *)a, (const TY *)y, d, scale, accum_qk, accum_v, \
                  accum_a);                                                                 \
}
SJ_CU_SCAN(f32, float)
SJ_CU_SCAN(bf16, bf16)
SJ_CU_SCAN(f16, f16)
