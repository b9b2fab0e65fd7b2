/* rmsnorm.cu — RMSNorm forward and backward, one warp per row, f32 sums.
 * The weight gradient is reduced in two fixed-order passes (partial sums
 * per chunk of rows into scratch, then the chunks in order): deterministic,
 * no atomics. Same expressions as csrc/cpu/rmsnorm.c.
 *
 * Two versions: the scalar kernels (any C, the reference) and the vector
 * kernels (C a multiple of 16 bytes' worth of elements, C <= 6 * 32 * VEC,
 * 16-byte aligned pointers), which the launchers pick when they can.
 * Bound: memory bandwidth. Forward reads x once and writes out once
 * (4*N*C bytes in bf16: 64 MB at N=32768, C=512 -> ~21 us at 3 TB/s).
 * Backward is ONE pass that reads x and dout once, writes dx once (reads
 * it too when accumulating) and leaves per-block dw partials in scratch:
 * 6*N*C bytes, 48 MB for the small preset's 32768 x 256 -> ~16 us at 3 TB/s,
 * where the scalar pair (dx kernel + dw re-read) measured ~285 us on an H100. */
#include "common.cuh"
#include "kernels.h"

// out, x: (N, C); rstd: (N); w: (C)
template <class T>
static __global__ void rms_fwd_k(T *out, float *rstd, const T *x, const T *w, int N, int C,
                                 float eps) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= N) return;
    const T *xr = x + r * C;
    float ss = 0.f;
    for (int c = lane; c < C; c += 32) { float v = tof(xr[c]); ss += v * v; }
    ss = warp_sum(ss);
    const float rs = 1.0f / sqrtf(ss / C + eps);
    if (lane == 0) rstd[r] = rs;
    for (int c = lane; c < C; c += 32) out[r * C + c] = fromf<T>(tof(xr[c]) * rs * tof(w[c]));
}

// dx: (N, C) (+)=; dout: (N, C)
template <class T>
static __global__ void rms_bwd_dx_k(T *dx, const T *dout, const T *x, const T *w,
                                    const float *rstd, int N, int C, int accum) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= N) return;
    const T *xr = x + r * C, *g = dout + r * C;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int c = lane; c < C; c += 32) dot += tof(g[c]) * tof(w[c]) * tof(xr[c]);
    dot = warp_sum(dot);
    const float k = dot * rs * rs * rs / C;
    for (int c = lane; c < C; c += 32)
        put(dx + r * C + c, tof(g[c]) * tof(w[c]) * rs - k * tof(xr[c]), accum);
}

// part: (n_chunks, C) = per chunk of rows, sum of dout * x * rstd
template <class T>
static __global__ void rms_bwd_dw_part_k(float *part, const T *dout, const T *x,
                                         const float *rstd, int N, int C, int rows_per) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= C) return;
    const int r0 = chunk * rows_per, r1 = min(N, r0 + rows_per);
    float s = 0.f;
    for (int r = r0; r < r1; r++) s += tof(dout[(int64_t)r * C + c]) * tof(x[(int64_t)r * C + c]) * rstd[r];
    part[(int64_t)chunk * C + c] = s;
}

// dw: (C) (+)= sum of the chunks, in chunk order
static __global__ void rms_bwd_dw_sum_k(float *dw, const float *part, int n_chunks, int C,
                                        int dw_accum) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
    for (int k = 0; k < n_chunks; k++) s += part[(int64_t)k * C + c];
    dw[c] = dw_accum ? dw[c] + s : s;
}


/* ======================= vector kernels (fast path) ===================== */

/* Lane `lane` of a warp owns elements [(lane + 32 j) * VEC, +VEC) of a row,
 * j < NV; NV * 32 * VEC >= C. */

// out, x: (N, C); rstd: (N); w: (C). 8 warps per block, one row per warp.
template <class T, int NV>
static __global__ void __launch_bounds__(256) rms_fwd_vec(T *out, float *rstd, const T *x,
                                                          const T *w, int N, int C, float eps) {
    constexpr int V = vec16<T>::N;
    const int r = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= N) return;
    const T *xr = x + (int64_t)r * C;
    float xv[NV][V], ss = 0.f;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = (lane + 32 * j) * V;
        if (c < C) load_vec(xv[j], xr + c);
        else
#pragma unroll
            for (int i = 0; i < V; i++) xv[j][i] = 0.f;
#pragma unroll
        for (int i = 0; i < V; i++) ss += xv[j][i] * xv[j][i];
    }
    ss = warp_sum(ss);
    const float rs = 1.0f / sqrtf(ss / C + eps);
    if (lane == 0) rstd[r] = rs;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = (lane + 32 * j) * V;
        if (c >= C) continue;
        float wv[V], y[V];
        load_vec(wv, w + c);
#pragma unroll
        for (int i = 0; i < V; i++) y[i] = xv[j][i] * rs * wv[i];
        store_vec(out + (int64_t)r * C + c, y, 0);
    }
}

/* Warps per backward block: 8 while the registers allow two blocks per SM,
 * 4 for wider rows (NV = 3 needs ~160 registers: 3 blocks of 4 warps fit,
 * where one block of 8 would). */
static constexpr __host__ __device__ int rms_bwd_warps(int nv) { return nv <= 2 ? 8 : 4; }

// dx: (N, C) (+)=; part: (gridDim.x, C) = per block, sum over its rows of dout * x * rstd.
// Block b owns rows [b * rows_per, (b + 1) * rows_per); warp k of it rows k, k + W, ...
// (W warps per block). The next row's x and dout are loaded before the current row is
// finished (two rows of loads in flight per warp). Dynamic shared memory: W * C floats.
template <class T, int NV>
static __global__ void __launch_bounds__(rms_bwd_warps(NV) * 32) rms_bwd_vec(T *dx, float *part, const T *dout,
                                                          const T *x, const T *w,
                                                          const float *rstd, int N, int C,
                                                          int rows_per, int accum) {
    constexpr int V = vec16<T>::N, W = rms_bwd_warps(NV);
    extern __shared__ __align__(16) float red[];   /* [W][C] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint4 wu[NV];
    float dwp[NV][V];
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = (lane + 32 * j) * V;
        wu[j] = c < C ? ld16(w + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int i = 0; i < V; i++) dwp[j][i] = 0.f;
    }
    const int r1 = (int)min((int64_t)N, ((int64_t)blockIdx.x + 1) * rows_per);
    int r = (int)blockIdx.x * rows_per + warp;
    uint4 xu[NV], gu[NV];
    float rs = 0.f;
    if (r < r1) {
#pragma unroll
        for (int j = 0; j < NV; j++) {
            const int c = (lane + 32 * j) * V;
            xu[j] = c < C ? ld16(x + (int64_t)r * C + c) : make_uint4(0, 0, 0, 0);
            gu[j] = c < C ? ld16(dout + (int64_t)r * C + c) : make_uint4(0, 0, 0, 0);
        }
        rs = rstd[r];
    }
    while (r < r1) {
        const int rn = r + W;
        uint4 xn[NV], gn[NV];
        float rsn = 0.f;
        if (rn < r1) {
#pragma unroll
            for (int j = 0; j < NV; j++) {
                const int c = (lane + 32 * j) * V;
                xn[j] = c < C ? ld16(x + (int64_t)rn * C + c) : make_uint4(0, 0, 0, 0);
                gn[j] = c < C ? ld16(dout + (int64_t)rn * C + c) : make_uint4(0, 0, 0, 0);
            }
            rsn = rstd[rn];
        }
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < NV; j++) {
            float xv[V], gv[V], wv[V];
            unpack16<T>(xv, xu[j]); unpack16<T>(gv, gu[j]); unpack16<T>(wv, wu[j]);
#pragma unroll
            for (int i = 0; i < V; i++) dot += gv[i] * wv[i] * xv[i];
        }
        dot = warp_sum(dot);
        const float k = dot * rs * rs * rs / C;
#pragma unroll
        for (int j = 0; j < NV; j++) {
            const int c = (lane + 32 * j) * V;
            if (c >= C) continue;
            float xv[V], gv[V], wv[V], y[V];
            unpack16<T>(xv, xu[j]); unpack16<T>(gv, gu[j]); unpack16<T>(wv, wu[j]);
#pragma unroll
            for (int i = 0; i < V; i++) {
                y[i] = gv[i] * wv[i] * rs - k * xv[i];
                dwp[j][i] += gv[i] * xv[i] * rs;
            }
            store_vec(dx + (int64_t)r * C + c, y, accum);
        }
#pragma unroll
        for (int j = 0; j < NV; j++) { xu[j] = xn[j]; gu[j] = gn[j]; }
        rs = rsn;
        r = rn;
    }
    /* the block's W warp partials, summed in warp order */
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int c = (lane + 32 * j) * V;
        if (c >= C) continue;
#pragma unroll
        for (int i = 0; i < V; i += 4)
            *reinterpret_cast<float4 *>(red + warp * C + c + i) =
                make_float4(dwp[j][i], dwp[j][i + 1], dwp[j][i + 2], dwp[j][i + 3]);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += W * 32) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < W; k++) s += red[k * C + c];
        part[(int64_t)blockIdx.x * C + c] = s;
    }
}

// dw: (C) (+)= sum over the n partial rows of part (n, C), in a fixed order:
// thread (tx, ty) of a 32 x 8 block sums rows ty, ty + 8, ... of column
// blockIdx.x * 32 + tx, then the 8 sums are added in ty order.
static __global__ void __launch_bounds__(256) rms_dw_reduce_k(float *dw, const float *part,
                                                              int n, int C, int dw_accum) {
    __shared__ float sh[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, c = blockIdx.x * 32 + tx;
    float s = 0.f;
    if (c < C)
        for (int k = ty; k < n; k += 8) s += part[(int64_t)k * C + c];
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) t += sh[k][tx];
        dw[c] = dw_accum ? dw[c] + t : t;
    }
}

extern "C" void sj_cuda_dw_reduce(float *dw, const float *part, int n, int C, int dw_accum) {
    rms_dw_reduce_k<<<(C + 31) / 32, 256, 0, sj_stream()>>>(dw, part, n, C, dw_accum);
    LAUNCH_CHECK("weight gradient reduction");
}

/* Vectors per lane for a row of C elements; 0 = no vector kernel (then the
 * scalar one runs). At most 6: the backward's dw block reduction keeps
 * up to 8 * C floats in shared memory (<= 48 KB: C <= 1536). */
template <class T>
static int rms_nv(int C, const void *a, const void *b, const void *c, const void *d) {
    constexpr int V = vec16<T>::N;
    if (C <= 0 || C % V || !aligned16(a) || !aligned16(b) || !aligned16(c) || !aligned16(d)) return 0;
    const int nv = (C + 32 * V - 1) / (32 * V);
    return nv <= 4 ? nv : nv <= 6 ? 6 : 0;
}

template <class T>
static bool rms_forward_vec(T *out, float *rstd, const T *x, const T *w, int N, int C, float eps) {
    const unsigned g = (unsigned)((N + 7) / 8);
    cudaStream_t s = sj_stream();
    switch (rms_nv<T>(C, out, x, w, x)) {
    case 1: rms_fwd_vec<T, 1><<<g, 256, 0, s>>>(out, rstd, x, w, N, C, eps); break;
    case 2: rms_fwd_vec<T, 2><<<g, 256, 0, s>>>(out, rstd, x, w, N, C, eps); break;
    case 3: rms_fwd_vec<T, 3><<<g, 256, 0, s>>>(out, rstd, x, w, N, C, eps); break;
    case 4: rms_fwd_vec<T, 4><<<g, 256, 0, s>>>(out, rstd, x, w, N, C, eps); break;
    case 6: rms_fwd_vec<T, 6><<<g, 256, 0, s>>>(out, rstd, x, w, N, C, eps); break;
    default: return false;
    }
    LAUNCH_CHECK("rmsnorm_forward");
    return true;
}

template <class T>
static bool rms_backward_vec(T *dx, float *dw, const T *dout, const T *x, const T *w,
                             const float *rstd, int N, int C, int accum, int dw_accum) {
    const int nv = rms_nv<T>(C, dx, dout, x, w);
    if (!nv) return false;
    sj_cuda_ctx *ctx = sj_cuda_cur();
    /* 32 rows per block: ~1000 blocks at N=32768, several
     * waves; fewer, longer blocks only when the partials would not fit. */
    const int64_t max_blocks = (int64_t)(ctx->scratch_bytes / (sizeof(float) * (size_t)C));
    if (max_blocks < 1) return false;
    int rows_per = 32;
    if ((N + rows_per - 1) / rows_per > max_blocks)
        rows_per = (int)(((N + max_blocks - 1) / max_blocks + 7) / 8 * 8);
    const unsigned nb = (unsigned)((N + rows_per - 1) / rows_per);
    float *part = (float *)ctx->scratch;
    cudaStream_t s = sj_stream();
#define SJ_RMS_BWD(NV)                                                                            \
    rms_bwd_vec<T, NV><<<nb, rms_bwd_warps(NV) * 32, rms_bwd_warps(NV) * (size_t)C * sizeof(float), \
                         s>>>(dx, part, dout, x, w, rstd, N, C, rows_per, accum)
    switch (nv) {
    case 1: SJ_RMS_BWD(1); break;
    case 2: SJ_RMS_BWD(2); break;
    case 3: SJ_RMS_BWD(3); break;
    case 4: SJ_RMS_BWD(4); break;
    default: SJ_RMS_BWD(6); break;
    }
#undef SJ_RMS_BWD
    LAUNCH_CHECK("rmsnorm_backward (vector)");
    sj_cuda_dw_reduce(dw, part, (int)nb, C, dw_accum);
    return true;
}

template <class T>
static void rms_backward(T *dx, float *dw, const T *dout, const T *x, const T *w,
                         const float *rstd, int N, int C, int accum, int dw_accum) {
    if (N <= 0) return;
    if (rms_backward_vec(dx, dw, dout, x, w, rstd, N, C, accum, dw_accum)) return;
    cudaStream_t s = sj_stream();
    rms_bwd_dx_k<<<sj_blocks(N, 8, 1 << 30), 256, 0, s>>>(dx, dout, x, w, rstd, N, C, accum);
    LAUNCH_CHECK("rmsnorm_backward dx");
    sj_cuda_ctx *ctx = sj_cuda_cur();
    int max_chunks = (int)(ctx->scratch_bytes / (sizeof(float) * (size_t)C));
    if (max_chunks > 512) max_chunks = 512;
    if (max_chunks < 1) { sj_cuda_error("rmsnorm_backward", "dim too large for scratch", __FILE__, __LINE__); return; }
    int rows_per = (N + max_chunks - 1) / max_chunks;
    if (rows_per < 32) rows_per = 32;
    const int n_chunks = (N + rows_per - 1) / rows_per;
    float *part = (float *)ctx->scratch;
    rms_bwd_dw_part_k<<<dim3((C + 127) / 128, n_chunks), 128, 0, s>>>(part, dout, x, rstd, N, C, rows_per);
    LAUNCH_CHECK("rmsnorm_backward dw partials");
    rms_bwd_dw_sum_k<<<(C + 127) / 128, 128, 0, s>>>(dw, part, n_chunks, C, dw_accum);
    LAUNCH_CHECK("rmsnorm_backward dw");
}

#define SJ_CU_RMS(T, TY)                                                                    \
extern "C" void sj_cuda_rmsnorm_forward_##T(void *out, float *rstd, const void *x,          \
                                            const void *w, int N, int C, float eps) {       \
    if (N <= 0) return;                                                                     \
    if (rms_forward_vec((TY *)out, rstd, (const TY *)x, (const TY *)w, N, C, eps)) return;  \
    rms_fwd_k<<<sj_blocks(N, 8, 1 << 30), 256, 0, sj_stream()>>>((TY *)out, rstd, (const TY *)x, \
                                                                 (const TY *)w, N, C, eps); \
    LAUNCH_CHECK("rmsnorm_forward");                                                        \
}                                                                                           \
extern "C" void sj_cuda_rmsnorm_backward_##T(void *dx, float *dw, const void *dout,         \
                                             const void *x, const void *w, const float *rstd, \
                                             int N, int C, int accum, int dw_accum) {       \
    rms_backward((TY *)dx, dw, (const TY *)dout, (const TY *)x, (const TY *)w, rstd, N, C,   \
                 accum, dw_accum);                                                          \
}
SJ_CU_RMS(f32, float)
SJ_CU_RMS(bf16, bf16)
SJ_CU_RMS(f16, f16)
