/* elementwise.cu — fill, dtype conversion, residual add and gradient copy
 * (each with a factor: axpy), the column-slice mix (value mix) and paired
 * heads; the same expressions as csrc/cpu/elementwise.c. Memory-bound
 * one-pass kernels (grid-stride); fusing them into their neighbours is
 * milestone-2 work.
 *
 * add, copy and the f32 / bf16 / f16 conversions take a 16-byte vector path
 * when their pointers are 16-byte aligned (the elements past the last full
 * vector go through the scalar loop). Bound: memory bandwidth, each byte
 * read and written once: add 6 B/element in bf16 (small preset's residual,
 * 8.4 M elements: 50 MB -> ~17 us at 3 TB/s; scalar measured ~24 us), copy
 * 4 B/element (6 with accum). mix and pair_heads go 16 bytes at a time when
 * their rows, slices and heads are whole vectors, else one element at a
 * time (not yet measured). */
#include "common.cuh"
#include "kernels.h"

/* Vector body over [0, nv * VEC), then the scalar tail [nv * VEC, n) by
 * the first threads. */
template <class T>
static __global__ void __launch_bounds__(256) add_vec(T *out, const T *a, const T *b, int64_t n,
                                                      float b_scale) {
    constexpr int V = vec16<T>::N;
    const int64_t nv = n / V, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = t0; i < nv; i += stride) {
        float x[V], y[V];
        load_vec(x, a + i * V);
        load_vec(y, b + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) x[k] += b_scale * y[k];
        store_vec(out + i * V, x, 0);
    }
    for (int64_t i = nv * V + t0; i < n; i += stride) out[i] = fromf<T>(tof(a[i]) + b_scale * tof(b[i]));
}

template <class T>
static __global__ void __launch_bounds__(256) copy_vec(T *dst, const T *src, int64_t n, float scale,
                                                       int accum) {
    constexpr int V = vec16<T>::N;
    const int64_t nv = n / V, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = t0; i < nv; i += stride) {
        if (!accum && scale == 1.0f) { st16(dst + i * V, ld16(src + i * V)); continue; }
        float x[V];
        load_vec(x, src + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) x[k] *= scale;
        store_vec(dst + i * V, x, accum);
    }
    for (int64_t i = nv * V + t0; i < n; i += stride) put(dst + i, scale * tof(src[i]), accum);
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
static __global__ void add_k(T *out, const T *a, const T *b, int64_t n, float b_scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = fromf<T>(tof(a[i]) + b_scale * tof(b[i]));
}

template <class T>
static __global__ void copy_k(T *dst, const T *src, int64_t n, float scale, int accum) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        put(dst + i, scale * tof(src[i]), accum);
}

/* V elements at p as f32: one 16-byte vector, or (V == 1) one element. */
template <int V, class T> static __device__ __forceinline__ void load_v(float *f, const T *p) {
    if constexpr (V == 1) f[0] = tof(*p);
    else load_vec(f, p);
}
template <int V, class T> static __device__ __forceinline__ void store_v(T *p, float *f, int accum) {
    if constexpr (V == 1) put(p, f[0], accum);
    else store_vec(p, f, accum);
}

/* Paired heads, V elements per step (hd % V == 0). Forward: unit u is out's
 * elements [uV, uV + V): pair p = u / (hd/V) (row r, out head j: p = r *
 * n_heads/2 + j) reads in heads 2j and 2j+1 of row r, at 2 p hd. */
template <class T, int V>
static __global__ void __launch_bounds__(256) pair_heads_fwd_k(T *out, const T *in, int64_t units,
                                                               int hd) {
    const int HV = hd / V;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = u / HV;
        const T *a = in + 2 * p * hd + (u - p * HV) * V;
        float x[V], y[V];
        load_v<V>(x, a);
        load_v<V>(y, a + hd);
#pragma unroll
        for (int k = 0; k < V; k++) x[k] = 0.5f * (x[k] + y[k]);
        store_v<V>(out + u * V, x, 0);
    }
}

/* Backward: unit u is din's elements [uV, uV + V) of head q = u / (hd/V)
 * (= row * n_heads + h), whose gradient is half of dout's head q / 2. */
template <class T, int V>
static __global__ void __launch_bounds__(256) pair_heads_bwd_k(T *din, const T *dout, int64_t units,
                                                               int hd, int accum) {
    const int HV = hd / V;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t q = u / HV;
        float d[V];
        load_v<V>(d, dout + q / 2 * hd + (u - q * HV) * V);
#pragma unroll
        for (int k = 0; k < V; k++) d[k] *= 0.5f;
        store_v<V>(din + u * V, d, accum);
    }
}

template <class T>
static void pair_heads(T *dst, const T *src, int N, int n_heads, int hd, int accum, bool bwd) {
    constexpr int V = vec16<T>::N;
    const int64_t n = (int64_t)N * (bwd ? n_heads : n_heads / 2) * hd;
    if (n <= 0) return;
    cudaStream_t s = sj_stream();
    const bool vec = hd % V == 0 && aligned16(dst) && aligned16(src);
    const int64_t units = vec ? n / V : n;
    const unsigned g = sj_blocks(units, 256, 8192);
    if (bwd && vec) pair_heads_bwd_k<T, V><<<g, 256, 0, s>>>(dst, src, units, hd, accum);
    else if (bwd) pair_heads_bwd_k<T, 1><<<g, 256, 0, s>>>(dst, src, units, hd, accum);
    else if (vec) pair_heads_fwd_k<T, V><<<g, 256, 0, s>>>(dst, src, units, hd);
    else pair_heads_fwd_k<T, 1><<<g, 256, 0, s>>>(dst, src, units, hd);
    LAUNCH_CHECK(bwd ? "pair_heads_backward" : "pair_heads_forward");
}

/* Mix over columns [lo, lo + cols) of each row of ld (the whole row, or
 * just the slice [c0, c0 + w) when nothing off it changes), V columns per
 * step: ld, lo, cols, c0 and w are multiples of V, so a step is wholly on or
 * off the slice. */
template <class T, int V>
static __global__ void __launch_bounds__(256) mix_fwd_k(T *out, const T *x, const T *y, int64_t units,
                                                        int ld, int lo, int cols, int c0, int w,
                                                        float a) {
    const int CV = cols / V;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = u / CV;
        const int c = lo + (int)(u - r * CV) * V;
        const int64_t k = r * ld + c;
        float xv[V];
        load_v<V>(xv, x + k);
        if (c >= c0 && c < c0 + w) {
            float yv[V];
            load_v<V>(yv, y + k);
#pragma unroll
            for (int i = 0; i < V; i++) xv[i] = (1.0f - a) * xv[i] + a * yv[i];
        }
        store_v<V>(out + k, xv, 0);
    }
}

/* dy before dx: dx may be dout. Off the slice dy is written only when it
 * is overwritten (zeros), dx only when it is not dout. */
template <class T, int V>
static __global__ void __launch_bounds__(256) mix_bwd_k(T *dx, T *dy, const T *dout, int64_t units,
                                                        int ld, int lo, int cols, int c0, int w,
                                                        float a, int accum_x, int accum_y) {
    const int CV = cols / V;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = u / CV;
        const int c = lo + (int)(u - r * CV) * V;
        const int64_t k = r * ld + c;
        const bool on = c >= c0 && c < c0 + w;
        float d[V], v[V];
        load_v<V>(d, dout + k);
        if (dy && (on || !accum_y)) {
#pragma unroll
            for (int i = 0; i < V; i++) v[i] = on ? a * d[i] : 0.0f;
            store_v<V>(dy + k, v, accum_y);
        }
        if (dx && (on || dx != dout)) {
#pragma unroll
            for (int i = 0; i < V; i++) v[i] = on ? (1.0f - a) * d[i] : d[i];
            store_v<V>(dx + k, v, accum_x);
        }
    }
}

template <class T>
static void mix_forward(T *out, const T *x, const T *y, int N, int ld, int c0, int w, float a) {
    constexpr int V = vec16<T>::N;
    const int lo = out == x ? c0 : 0, cols = out == x ? w : ld;
    const int64_t n = (int64_t)N * cols;
    if (n <= 0) return;
    const bool vec = ld % V == 0 && c0 % V == 0 && w % V == 0 && aligned16(out) && aligned16(x) &&
                     aligned16(y);
    const int64_t units = vec ? n / V : n;
    if (vec)
        mix_fwd_k<T, V><<<sj_blocks(units, 256, 8192), 256, 0, sj_stream()>>>(out, x, y, units, ld, lo,
                                                                             cols, c0, w, a);
    else
        mix_fwd_k<T, 1><<<sj_blocks(units, 256, 8192), 256, 0, sj_stream()>>>(out, x, y, units, ld, lo,
                                                                             cols, c0, w, a);
    LAUNCH_CHECK("mix_forward");
}

template <class T>
static void mix_backward(T *dx, T *dy, const T *dout, int N, int ld, int c0, int w, float a,
                         int accum_x, int accum_y) {
    constexpr int V = vec16<T>::N;
    const bool whole = (dx && dx != dout) || (dy && !accum_y);
    const int lo = whole ? 0 : c0, cols = whole ? ld : w;
    const int64_t n = (int64_t)N * cols;
    if (n <= 0 || (!dx && !dy)) return;
    const bool vec = ld % V == 0 && c0 % V == 0 && w % V == 0 && aligned16(dx) && aligned16(dy) &&
                     aligned16(dout);
    const int64_t units = vec ? n / V : n;
    if (vec)
        mix_bwd_k<T, V><<<sj_blocks(units, 256, 8192), 256, 0, sj_stream()>>>(
            dx, dy, dout, units, ld, lo, cols, c0, w, a, accum_x, accum_y);
    else
        mix_bwd_k<T, 1><<<sj_blocks(units, 256, 8192), 256, 0, sj_stream()>>>(
            dx, dy, dout, units, ld, lo, cols, c0, w, a, accum_x, accum_y);
    LAUNCH_CHECK("mix_backward");
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
extern "C" void sj_cuda_add_##T(void *out, const void *a, const void *b, int64_t n,      \
                                float b_scale) {                                         \
    if (n <= 0) return;                                                                  \
    if (aligned16(out) && aligned16(a) && aligned16(b)) {                                \
        add_vec<<<sj_blocks(n / vec16<TY>::N + 1, 256, 8192), 256, 0, sj_stream()>>>(     \
            (TY *)out, (const TY *)a, (const TY *)b, n, b_scale);                        \
        LAUNCH_CHECK("add");                                                             \
        return;                                                                          \
    }                                                                                    \
    add_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)out, (const TY *)a,     \
                                                             (const TY *)b, n, b_scale); \
    LAUNCH_CHECK("add");                                                                 \
}                                                                                        \
extern "C" void sj_cuda_copy_##T(void *dst, const void *src, int64_t n, float scale,     \
                                 int accum) {                                            \
    if (n <= 0) return;                                                                  \
    if (aligned16(dst) && aligned16(src)) {                                              \
        copy_vec<<<sj_blocks(n / vec16<TY>::N + 1, 256, 8192), 256, 0, sj_stream()>>>(    \
            (TY *)dst, (const TY *)src, n, scale, accum);                                \
        LAUNCH_CHECK("copy");                                                            \
        return;                                                                          \
    }                                                                                    \
    copy_k<<<sj_blocks(n, 256, 4096), 256, 0, sj_stream()>>>((TY *)dst, (const TY *)src,  \
                                                              n, scale, accum);          \
    LAUNCH_CHECK("copy");                                                                \
}                                                                                        \
extern "C" void sj_cuda_pair_heads_forward_##T(void *out, const void *in, int N,          \
                                               int n_heads, int hd) {                    \
    pair_heads((TY *)out, (const TY *)in, N, n_heads, hd, 0, false);                     \
}                                                                                        \
extern "C" void sj_cuda_pair_heads_backward_##T(void *din, const void *dout, int N,       \
                                                int n_heads, int hd, int accum) {        \
    pair_heads((TY *)din, (const TY *)dout, N, n_heads, hd, accum, true);                \
}                                                                                        \
extern "C" void sj_cuda_mix_forward_##T(void *out, const void *x, const void *y, int N,   \
                                        int ld, int c0, int w, float a) {                \
    mix_forward((TY *)out, (const TY *)x, (const TY *)y, N, ld, c0, w, a);               \
}                                                                                        \
extern "C" void sj_cuda_mix_backward_##T(void *dx, void *dy, const void *dout, int N,     \
                                         int ld, int c0, int w, float a, int accum_x,    \
                                         int accum_y) {                                  \
    mix_backward((TY *)dx, (TY *)dy, (const TY *)dout, N, ld, c0, w, a, accum_x, accum_y); \
}
SJ_CU_EW(f32, float)
SJ_CU_EW(bf16, bf16)
SJ_CU_EW(f16, f16)
