/* elementwise.cu — fill, dtype conversion, residual add and gradient copy.
 * Memory-bound one-pass kernels (grid-stride); fusing them into their
 * neighbours is milestone-2 work. */
#include "common.cuh"
#include "kernels.h"
#include <cuda_fp16.h>

static __global__ void fill_k(float *x, float v, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = v;
}

template <class D, class S>
static __global__ void convert_k(D *dst, const S *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = fromf<D>(tof(src[i]));
}

/* fp16 activations: f32 <-> IEEE half storage. Narrowing clamps to the half
 * range (+-65504) so a stored activation never becomes inf; NaN stays NaN. */
static __global__ void f32_to_f16_k(__half *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = src[i];
        dst[i] = __float2half_rn(v != v ? v : fminf(fmaxf(v, -65504.0f), 65504.0f));
    }
}
static __global__ void f16_to_f32_k(float *dst, const __half *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __half2float(src[i]);
}

template <class T>
static __global__ void add_k(T *out, const T *a, const T *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = fromf<T>(tof(a[i]) + tof(b[i]));
}

template <class T>
static __global__ void copy_k(T *dst, const T *src, int64_t n, int accum) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        put(dst + i, tof(src[i]), accum);
}

extern "C" void sj_cuda_fill(float *x, float value, int64_t n) {
    if (n <= 0) return;
    fill_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>(x, value, n);
    LAUNCH_CHECK("fill");
}

extern "C" void sj_cuda_convert(void *dst, sj_dtype dt, const void *src, sj_dtype st, int64_t n) {
    if (n <= 0) return;
    unsigned g = sj_blocks(n, 256, 4096);
    cudaStream_t s = sj_stream();
    if (dt == SJ_BF16 && st == SJ_F32) convert_k<<<g, 256, 0, s>>>((bf16 *)dst, (const float *)src, n);
    else if (dt == SJ_F32 && st == SJ_BF16) convert_k<<<g, 256, 0, s>>>((float *)dst, (const bf16 *)src, n);
    else if (dt == SJ_F16 && st == SJ_F32) f32_to_f16_k<<<g, 256, 0, s>>>((__half *)dst, (const float *)src, n);
    else if (dt == SJ_F32 && st == SJ_F16) f16_to_f32_k<<<g, 256, 0, s>>>((float *)dst, (const __half *)src, n);
    else if (dt == st) { CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sj_dtype_size(dt), cudaMemcpyDeviceToDevice, s)); return; }
    else { sj_cuda_error("convert", "unsupported dtype pair", __FILE__, __LINE__); return; }
    LAUNCH_CHECK("convert");
}

#define SJ_CU_EW(T, TY)                                                                  \
extern "C" void sj_cuda_add_##T(void *out, const void *a, const void *b, int64_t n) {    \
    if (n <= 0) return;                                                                  \
    add_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)out, (const TY *)a,     \
                                                             (const TY *)b, n);          \
    LAUNCH_CHECK("add");                                                                 \
}                                                                                        \
extern "C" void sj_cuda_copy_##T(void *dst, const void *src, int64_t n, int accum) {     \
    if (n <= 0) return;                                                                  \
    copy_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)dst, (const TY *)src,  \
                                                              n, accum);                 \
    LAUNCH_CHECK("copy");                                                                \
}
SJ_CU_EW(f32, float)
SJ_CU_EW(bf16, bf16)
