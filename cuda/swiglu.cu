/* swiglu.cu — the gated FFN activation, h = act(gate) * up over fused
 * [gate | up] rows (act: silu or relu^2, SJ_FFN_*, gate_act in common.cuh),
 * and its backward; same expressions as csrc/cpu/swiglu.c, f32 in registers.
 *
 * Fast path (F a multiple of 16 bytes' worth of elements, aligned tensors):
 * one thread per VEC columns of a row, 16-byte loads and stores, 32-bit
 * index arithmetic when it fits. Bound: memory bandwidth. Forward reads gu
 * and writes h: 6 * N * F bytes in bf16 (small preset N=32768, F=768:
 * 151 MB -> ~50 us at 3 TB/s; the scalar kernel measured ~90 us).
 * Backward reads gu and dh, writes dgu: 10 * N * F bytes (252 MB -> ~84 us;
 * measured ~111 us scalar), +4 N F when accumulating. */
#include "common.cuh"
#include "kernels.h"

// h: (N, F); gu: (N, 2F); FV = F / VEC; total = N * FV
template <class T, class I>
static __global__ void __launch_bounds__(256) swiglu_fwd_vec(T *h, const T *gu, I total, int FV,
                                                             int act) {
    constexpr int V = vec16<T>::N;
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x) {
        const I r = i / FV, c = (i - r * FV) * V;
        const int64_t F = (int64_t)FV * V;
        float g[V], u[V], y[V];
        load_vec(g, gu + r * 2 * F + c);
        load_vec(u, gu + r * 2 * F + F + c);
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = gate_act(g[k], act) * u[k];
        store_vec(h + (int64_t)i * V, y, 0);
    }
}

// dgu: (N, 2F) (+)=; dh: (N, F)
template <class T, class I>
static __global__ void __launch_bounds__(256) swiglu_bwd_vec(T *dgu, const T *dh, const T *gu,
                                                             I total, int FV, int act, int accum) {
    constexpr int V = vec16<T>::N;
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x) {
        const I r = i / FV, c = (i - r * FV) * V;
        const int64_t F = (int64_t)FV * V;
        float g[V], u[V], d[V], dg[V], du[V];
        load_vec(g, gu + r * 2 * F + c);
        load_vec(u, gu + r * 2 * F + F + c);
        load_vec(d, dh + (int64_t)i * V);
#pragma unroll
        for (int k = 0; k < V; k++) {
            float a;
            const float da = gate_act_grad(g[k], act, &a);
            dg[k] = d[k] * u[k] * da;
            du[k] = d[k] * a;
        }
        store_vec(dgu + r * 2 * F + c, dg, accum);
        store_vec(dgu + r * 2 * F + F + c, du, accum);
    }
}

template <class T>
static bool swiglu_fast(T *dst, const T *dh, const T *gu, int N, int F, int act, int accum, bool bwd) {
    constexpr int V = vec16<T>::N;
    if (F % V || !aligned16(dst) || !aligned16(gu) || (dh && !aligned16(dh))) return false;
    const int FV = F / V;
    const int64_t total = (int64_t)N * FV;
    const unsigned g = sj_blocks(total, 256, 1 << 14);
    cudaStream_t s = sj_stream();
    const bool i32 = (int64_t)N * 2 * F < INT32_MAX;
    if (!bwd && i32) swiglu_fwd_vec<T, int><<<g, 256, 0, s>>>(dst, gu, (int)total, FV, act);
    else if (!bwd) swiglu_fwd_vec<T, int64_t><<<g, 256, 0, s>>>(dst, gu, total, FV, act);
    else if (i32) swiglu_bwd_vec<T, int><<<g, 256, 0, s>>>(dst, dh, gu, (int)total, FV, act, accum);
    else swiglu_bwd_vec<T, int64_t><<<g, 256, 0, s>>>(dst, dh, gu, total, FV, act, accum);
    LAUNCH_CHECK(bwd ? "swiglu_backward" : "swiglu_forward");
    return true;
}

// h: (N, F); gu: (N, 2F)
template <class T>
static __global__ void swiglu_fwd_k(T *h, const T *gu, int64_t N, int F, int act) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * F;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / F, c = i % F;
        float g = tof(gu[r * 2 * F + c]), u = tof(gu[r * 2 * F + F + c]);
        h[i] = fromf<T>(gate_act(g, act) * u);
    }
}

// dgu: (N, 2F) (+)=; dh: (N, F)
template <class T>
static __global__ void swiglu_bwd_k(T *dgu, const T *dh, const T *gu, int64_t N, int F,
                                    int act, int accum) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * F;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / F, c = i % F;
        float g = tof(gu[r * 2 * F + c]), u = tof(gu[r * 2 * F + F + c]), d = tof(dh[i]);
        float a;
        const float da = gate_act_grad(g, act, &a);
        put(dgu + r * 2 * F + c, d * u * da, accum);
        put(dgu + r * 2 * F + F + c, d * a, accum);
    }
}

#define SJ_CU_SWIGLU(T, TY)                                                               \
extern "C" void sj_cuda_swiglu_forward_##T(void *h, const void *gu, int N, int F, int act) { \
    int64_t n = (int64_t)N * F;                                                           \
    if (n <= 0) return;                                                                   \
    if (swiglu_fast((TY *)h, (const TY *)NULL, (const TY *)gu, N, F, act, 0, false)) return; \
    swiglu_fwd_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>((TY *)h, (const TY *)gu, N, F, \
                                                                   act);                  \
    LAUNCH_CHECK("swiglu_forward");                                                       \
}                                                                                         \
extern "C" void sj_cuda_swiglu_backward_##T(void *dgu, const void *dh, const void *gu,    \
                                            int N, int F, int act, int accum) {           \
    int64_t n = (int64_t)N * F;                                                           \
    if (n <= 0) return;                                                                   \
    if (swiglu_fast((TY *)dgu, (const TY *)dh, (const TY *)gu, N, F, act, accum, true)) return; \
    swiglu_bwd_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>((TY *)dgu, (const TY *)dh, \
                                                                   (const TY *)gu, N, F, act, accum); \
    LAUNCH_CHECK("swiglu_backward");                                                      \
}
SJ_CU_SWIGLU(f32, float)
SJ_CU_SWIGLU(bf16, bf16)
SJ_CU_SWIGLU(f16, f16)
