/* elementwise.cu — fill, dtype conversion, residual add and gradient copy.
 * Memory-bound one-pass kernels (grid-stride); fusing them into their
 * neighbours is milestone-2 work.
 *
 * add, copy and the f32 / bf16 / f16 conversions take a 16-byte vector path
 * when their pointers are 16-byte aligned (the elements past the last full
 * vector go through the scalar loop). Bound: memory bandwidth, each byte
 * read and written once: add 6 B/element in bf16 (small preset's residual,
 * 8.4 M elements: 50 MB -> ~17 us at 3 TB/s; scalar measured ~24 us), copy
 * 4 B/element (6 with accum). */
#include "common.cuh"
#include "kernels.h"

/* Vector body over [0, nv * VEC), then the scalar tail [nv * VEC, n) by
 * the first threads. */
template <class T>
static __global__ void __launch_bounds__(256) add_vec(T *out, const T *a, const T *b, int64_t n) {
    constexpr int V = vec16<T>::N;
    const int64_t nv = n / V, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = t0; i < nv; i += stride) {
        float x[V], y[V];
        load_vec(x, a + i * V);
        load_vec(y, b + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) x[k] += y[k];
        store_vec(out + i * V, x, 0);
    }
    for (int64_t i = nv * V + t0; i < n; i += stride) out[i] = fromf<T>(tof(a[i]) + tof(b[i]));
}

template <class T>
static __global__ void __launch_bounds__(256) copy_vec(T *dst, const T *src, int64_t n, int accum) {
    constexpr int V = vec16<T>::N;
    const int64_t nv = n / V, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = t0; i < nv; i += stride) {
        if (!accum) { st16(dst + i * V, ld16(src + i * V)); continue; }
        float x[V];
        load_vec(x, src + i * V);
        store_vec(dst + i * V, x, 1);
    }
    for (int64_t i = nv * V + t0; i < n; i += stride) put(dst + i, tof(src[i]), accum);
}

/* 8 elements per step: two 16-byte f32 vectors, one 16-bit (bf16/f16) vector. */
template <class D, class S>
static __global__ void __launch_bounds__(256) convert_vec(D *dst, const S *src, int64_t n) {
    const int64_t nv = n / 8, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = t0; i < nv; i += stride) {
        float x[8];
#pragma unroll
        for (int k = 0; k < 8; k += vec16<S>::N) load_vec(x + k, src + i * 8 + k);
#pragma unroll
        for (int k = 0; k < 8; k += vec16<D>::N) store_vec(dst + i * 8 + k, x + k, 0);
    }
    for (int64_t i = nv * 8 + t0; i < n; i += stride) dst[i] = fromf<D>(tof(src[i]));
}

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

/* Any pair of f32, bf16, f16 (narrowing to f16 clamps, in fromf/pack16):
 * the f32 master weights to the compute copy, logits and activations out,
 * the f32 tape's fp16 activation storage. */
template <class D, class S>
static void convert_as(void *dst, const void *src, int64_t n) {
    cudaStream_t s = sj_stream();
    if (aligned16(dst) && aligned16(src))
        convert_vec<<<sj_blocks(n / 8 + 1, 256, 8192), 256, 0, s>>>((D *)dst, (const S *)src, n);
    else
        convert_k<<<sj_blocks(n, 256, 4096), 256, 0, s>>>((D *)dst, (const S *)src, n);
}
template <class D>
static bool convert_to(void *dst, const void *src, sj_dtype st, int64_t n) {
    switch (st) {
    case SJ_F32: convert_as<D, float>(dst, src, n); return true;
    case SJ_BF16: convert_as<D, bf16>(dst, src, n); return true;
    case SJ_F16: convert_as<D, f16>(dst, src, n); return true;
    default: return false;
    }
}

extern "C" void sj_cuda_convert(void *dst, sj_dtype dt, const void *src, sj_dtype st, int64_t n) {
    if (n <= 0) return;
    if (dt == st) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sj_dtype_size(dt), cudaMemcpyDeviceToDevice, sj_stream()));
        return;
    }
    const bool ok = dt == SJ_F32 ? convert_to<float>(dst, src, st, n)
                  : dt == SJ_BF16 ? convert_to<bf16>(dst, src, st, n)
                  : dt == SJ_F16 ? convert_to<f16>(dst, src, st, n) : false;
    if (!ok) { sj_cuda_error("convert", "unsupported dtype pair", __FILE__, __LINE__); return; }
    LAUNCH_CHECK("convert");
}

#define SJ_CU_EW(T, TY)                                                                  \
extern "C" void sj_cuda_add_##T(void *out, const void *a, const void *b, int64_t n) {    \
    if (n <= 0) return;                                                                  \
    if (aligned16(out) && aligned16(a) && aligned16(b)) {                                \
        add_vec<<<sj_blocks(n / vec16<TY>::N + 1, 256, 8192), 256, 0, sj_stream()>>>(     \
            (TY *)out, (const TY *)a, (const TY *)b, n);                                 \
        LAUNCH_CHECK("add");                                                             \
        return;                                                                          \
    }                                                                                    \
    add_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)out, (const TY *)a,     \
                                                             (const TY *)b, n);          \
    LAUNCH_CHECK("add");                                                                 \
}                                                                                        \
extern "C" void sj_cuda_copy_##T(void *dst, const void *src, int64_t n, int accum) {     \
    if (n <= 0) return;                                                                  \
    if (aligned16(dst) && aligned16(src)) {                                              \
        copy_vec<<<sj_blocks(n / vec16<TY>::N + 1, 256, 8192), 256, 0, sj_stream()>>>(    \
            (TY *)dst, (const TY *)src, n, accum);                                       \
        LAUNCH_CHECK("copy");                                                            \
        return;                                                                          \
    }                                                                                    \
    copy_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)dst, (const TY *)src,  \
                                                              n, accum);                 \
    LAUNCH_CHECK("copy");                                                                \
}
SJ_CU_EW(f32, float)
SJ_CU_EW(bf16, bf16)
SJ_CU_EW(f16, f16)
