/* rmsnorm.cu — RMSNorm forward and backward, one warp per row, f32 sums.
 * The weight gradient is reduced in two fixed-order passes (partial sums
 * per chunk of rows into scratch, then the chunks in order): deterministic,
 * no atomics. Same expressions as csrc/cpu/rmsnorm.c. */
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

// dw: (C) += sum of the chunks, in chunk order
static __global__ void rms_bwd_dw_sum_k(float *dw, const float *part, int n_chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
    for (int k = 0; k < n_chunks; k++) s += part[(int64_t)k * C + c];
    dw[c] += s;
}

template <class T>
static void rms_backward(T *dx, float *dw, const T *dout, const T *x, const T *w,
                         const float *rstd, int N, int C, int accum) {
    if (N <= 0) return;
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
    rms_bwd_dw_sum_k<<<(C + 127) / 128, 128, 0, s>>>(dw, part, n_chunks, C);
    LAUNCH_CHECK("rmsnorm_backward dw");
}

#define SJ_CU_RMS(T, TY)                                                                    \
extern "C" void sj_cuda_rmsnorm_forward_##T(void *out, float *rstd, const void *x,          \
                                            const void *w, int N, int C, float eps) {       \
    if (N <= 0) return;                                                                     \
    rms_fwd_k<<<sj_blocks(N, 8, 1 << 30), 256, 0, sj_stream()>>>((TY *)out, rstd, (const TY *)x, \
                                                                 (const TY *)w, N, C, eps); \
    LAUNCH_CHECK("rmsnorm_forward");                                                        \
}                                                                                           \
extern "C" void sj_cuda_rmsnorm_backward_##T(void *dx, float *dw, const void *dout,         \
                                             const void *x, const void *w, const float *rstd, \
                                             int N, int C, int accum) {                     \
    rms_backward((TY *)dx, dw, (const TY *)dout, (const TY *)x, (const TY *)w, rstd, N, C,   \
                 accum);                                                                    \
}
SJ_CU_RMS(f32, float)
SJ_CU_RMS(bf16, bf16)
