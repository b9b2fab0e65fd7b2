/* common.cuh — shared by every cuda/*.cu: the bound context (stream,
 * scratch, GEMM workspace), error recording (the first failure on a thread
 * is kept, with file and line, until sync() reports it), element types. */
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include "sj_cuda.h"

extern "C" sj_status sj_fail(sj_status code, const char *fmt, ...);

struct sj_cuda_ctx {
    cudaStream_t stream;
    void *scratch;            /* reductions' partials; used in stream order */
    size_t scratch_bytes;
    void *workspace;          /* cuBLASLt */
    size_t workspace_bytes;
};

/* Scratch: reduction partials and attention row sums (batches are chunked to
 * fit). Workspace: cuBLASLt; 8 MiB measured as fast as 32 at our shapes. */
enum { SJ_CUDA_SCRATCH = 4 << 20, SJ_CUDA_WORKSPACE = 8 << 20 };

sj_cuda_ctx *sj_cuda_cur(void);
/* Record an error (the first one wins); what names the call. */
void sj_cuda_error(const char *what, const char *detail, const char *file, int line);
bool sj_cuda_has_error(void);

static inline cudaStream_t sj_stream(void) { return sj_cuda_cur()->stream; }

#define CUDA_CHECK(call)                                                          \
    do {                                                                          \
        cudaError_t _e = (call);                                                  \
        if (_e != cudaSuccess)                                                    \
            sj_cuda_error(#call, cudaGetErrorString(_e), __FILE__, __LINE__);     \
    } while (0)
/* After every launch: configuration errors show here, faults at sync(). */
#define LAUNCH_CHECK(name) CUDA_CHECK(cudaGetLastError())

/* ---- element types: f32, bf16 or f16 in memory, f32 in registers ------ */
typedef __nv_bfloat16 bf16;
typedef __half f16;
static __device__ __forceinline__ float tof(float x) { return x; }
static __device__ __forceinline__ float tof(bf16 x) { return __bfloat162float(x); }
static __device__ __forceinline__ float tof(f16 x) { return __half2float(x); }
/* fp16 has no loss scaling here, so an overflow must not poison the step:
 * values past +-65504 become the largest finite half, never inf (a NaN fails
 * the comparison and stays NaN). bf16 has f32's range and needs no clamp. */
#define SJ_F16_MAX 65504.0f
static __device__ __forceinline__ float clamp_f16(float x) {
    return fabsf(x) > SJ_F16_MAX ? copysignf(SJ_F16_MAX, x) : x;
}
/* The global clip's gradient scale, as csrc/cpu/adamw.c's; *update = false
 * when the norm is not finite (the step only zeroes). */
static __device__ __forceinline__ float sj_clip_scale(const sj_optim_hp *hp, bool *update) {
    const double norm = sqrt(hp->sumsq);
    *update = isfinite(norm);
    return hp->clip > 0 ? fminf(1.0f, (float)(hp->clip / (norm + 1e-6))) : 1.0f;
}

template <class T> static __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 fromf<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 fromf<f16>(float x) { return __float2half_rn(clamp_f16(x)); }

/* dst = v, or dst += v (accumulating in f32, rounding once). */
template <class T> static __device__ __forceinline__ void put(T *dst, float v, int accum) {
    *dst = fromf<T>(accum ? tof(*dst) + v : v);
}

/* The gated FFN's activation of the gate (SJ_FFN_*): silu (SwiGLU) or relu^2;
 * the same expressions as csrc/cpu/swiglu.c. FAST: silu through the SFU's
 * exp and divide (the fused GEMM epilogue, which rounds to 16 bits next). */
template <bool FAST = false>
static __device__ __forceinline__ float gate_act(float g, int act) {
    if (act == SJ_FFN_RELU2) { const float p = fmaxf(g, 0.0f); return p * p; }
    return FAST ? __fdividef(g, 1.0f + __expf(-g)) : g / (1.0f + expf(-g));
}
/* act(g) into *a, and d act / d g. */
static __device__ __forceinline__ float gate_act_grad(float g, int act, float *a) {
    if (act == SJ_FFN_RELU2) { const float p = fmaxf(g, 0.0f); *a = p * p; return 2.0f * p; }
    const float s = 1.0f / (1.0f + expf(-g));
    *a = g * s;
    return s * (1.0f + g * (1.0f - s));
}

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
/* Block-wide sum/max in a fixed order (deterministic); blockDim.x % 32 == 0,
 * at most 1024 threads; every thread gets the result. */
template <bool MAX> static __device__ float block_reduce(float v) {
    __shared__ float part[32];
    __shared__ float result;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();   /* part[] may still be read by a previous call */
    if (lane == 0) part[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? part[lane] : (MAX ? -INFINITY : 0.0f);
        x = MAX ? warp_max(x) : warp_sum(x);
        if (lane == 0) result = x;
    }
    __syncthreads();
    return result;
}

/* ---- 16-byte vectors: VEC elements of T in one uint4, f32 in registers --
 * Memory-bound kernels move 16 bytes per thread per access (LDG.E.128 /
 * STG.E.128); they take the vector path only when the row length is a
 * multiple of VEC and every pointer is 16-byte aligned (vec_ok), and keep
 * the scalar kernel as the fallback and reference. */
template <class T> struct vec16 { enum { N = 16 / (int)sizeof(T) }; };
template <class T> static __device__ __forceinline__ void unpack16(float *f, uint4 u);
template <> __device__ __forceinline__ void unpack16<float>(float *f, uint4 u) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
template <> __device__ __forceinline__ void unpack16<bf16>(float *f, uint4 u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);          /* lower address = lower half */
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void unpack16<f16>(float *f, uint4 u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 v = __half22float2(*reinterpret_cast<const __half2 *>(&w[i]));
        f[2 * i] = v.x;                                   /* lower address = lower half */
        f[2 * i + 1] = v.y;
    }
}
template <class T> static __device__ __forceinline__ uint4 pack16(const float *f);
template <> __device__ __forceinline__ uint4 pack16<float>(const float *f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
}
/* Two 16-bit values in one register, lo at the lower address / column
 * (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32; the f16 one clamped first). */
template <class T> static __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float lo, float hi) {
    __half2 v = __floats2half2_rn(clamp_f16(lo), clamp_f16(hi));
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint4 pack16<bf16>(const float *f) {
    return make_uint4(pack2<bf16>(f[0], f[1]), pack2<bf16>(f[2], f[3]), pack2<bf16>(f[4], f[5]),
                      pack2<bf16>(f[6], f[7]));
}
template <> __device__ __forceinline__ uint4 pack16<f16>(const float *f) {
    return make_uint4(pack2<f16>(f[0], f[1]), pack2<f16>(f[2], f[3]), pack2<f16>(f[4], f[5]),
                      pack2<f16>(f[6], f[7]));
}
static __device__ __forceinline__ uint4 ld16(const void *p) { return *reinterpret_cast<const uint4 *>(p); }
static __device__ __forceinline__ void st16(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }
/* VEC elements at p (16-byte aligned) into f, as f32. */
template <class T> static __device__ __forceinline__ void load_vec(float *f, const T *p) {
    unpack16<T>(f, ld16(p));
}
/* p[0..VEC) = f, or += f (f32 sum, one rounding) when accum. */
template <class T> static __device__ __forceinline__ void store_vec(T *p, float *f, int accum) {
    if (accum) {
        float o[vec16<T>::N];
        unpack16<T>(o, ld16(p));
#pragma unroll
        for (int i = 0; i < vec16<T>::N; i++) f[i] += o[i];
    }
    st16(p, pack16<T>(f));
}
static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

static inline unsigned sj_blocks(int64_t n, int threads, int64_t cap = 1 << 16) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > cap ? cap : b);
}

/* Each op file defines its kernels as templates and exports f32, bf16 and f16
 * instances with C linkage under these names. */
#define SJ_CU_NAME(op, T) sj_cuda_##op##_##T
