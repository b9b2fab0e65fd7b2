/* swiglu.cu — h = silu(gate) * up over fused [gate | up] rows, and its
 * backward; same expressions as csrc/cpu/swiglu.c, f32 in registers. */
#include "common.cuh"
#include "kernels.h"

// h: (N, F); gu: (N, 2F)
template <class T>
static __global__ void swiglu_fwd_k(T *h, const T *gu, int64_t N, int F) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * F;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / F, c = i % F;
        float g = tof(gu[r * 2 * F + c]), u = tof(gu[r * 2 * F + F + c]);
        h[i] = fromf<T>(g / (1.0f + expf(-g)) * u);
    }
}

// dgu: (N, 2F) (+)=; dh: (N, F)
template <class T>
static __global__ void swiglu_bwd_k(T *dgu, const T *dh, const T *gu, int64_t N, int F,
                                    int accum) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * F;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / F, c = i % F;
        float g = tof(gu[r * 2 * F + c]), u = tof(gu[r * 2 * F + F + c]), d = tof(dh[i]);
        float s = 1.0f / (1.0f + expf(-g)), silu = g * s;
        put(dgu + r * 2 * F + c, d * u * s * (1.0f + g * (1.0f - s)), accum);
        put(dgu + r * 2 * F + F + c, d * silu, accum);
    }
}

#define SJ_CU_SWIGLU(T, TY)                                                               \
extern "C" void sj_cuda_swiglu_forward_##T(void *h, const void *gu, int N, int F) {       \
    int64_t n = (int64_t)N * F;                                                           \
    if (n <= 0) return;                                                                   \
    swiglu_fwd_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>((TY *)h, (const TY *)gu, N, F); \
    LAUNCH_CHECK("swiglu_forward");                                                       \
}                                                                                         \
extern "C" void sj_cuda_swiglu_backward_##T(void *dgu, const void *dh, const void *gu,    \
                                            int N, int F, int accum) {                    \
    int64_t n = (int64_t)N * F;                                                           \
    if (n <= 0) return;                                                                   \
    swiglu_bwd_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>((TY *)dgu, (const TY *)dh, \
                                                                   (const TY *)gu, N, F, accum); \
    LAUNCH_CHECK("swiglu_backward");                                                      \
}
SJ_CU_SWIGLU(f32, float)
SJ_CU_SWIGLU(bf16, bf16)
