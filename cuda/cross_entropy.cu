/* cross_entropy.cu — fused softmax cross-entropy. Forward: one block per
 * row, max then sum of exp over the vocabulary in f32, keeps only the row's
 * log-sum-exp and loss. Backward: writes dlogits = scale * (softmax -
 * onehot) straight from the logits and lse (no probability matrix, no
 * second pass over a gradient); it may overwrite the logits in place, since
 * each thread reads an element before writing that same element. The
 * scale is read from device memory, so a captured graph uses this step's. */
#include "common.cuh"
#include "kernels.h"

// losses, lse: (N); logits: (N, V); targets: (N) int32
template <class T>
static __global__ void ce_fwd_k(float *losses, float *lse, const T *logits, const int32_t *tgt,
                                int V, int ignore) {
    const int64_t r = blockIdx.x;
    const T *x = logits + r * V;
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, tof(x[v]));
    m = block_reduce<true>(m);
    float s = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(tof(x[v]) - m);
    s = block_reduce<false>(s);
    if (threadIdx.x == 0) {
        const float l = m + logf(s);
        const int t = tgt[r];
        lse[r] = l;
        losses[r] = t == ignore ? 0.f : l - tof(x[t]);
    }
}

// dlogits: (N, V) (+)=, may alias logits when !accum
template <class T>
static __global__ void ce_bwd_k(T *dlogits, const T *logits, const float *lse,
                                const int32_t *tgt, int V, int ignore, const float *scale,
                                int accum) {
    const int64_t r = blockIdx.x;
    const int t = tgt[r];
    const float s = t == ignore ? 0.f : *scale, l = lse[r];
    const T *x = logits + r * V;
    T *d = dlogits + r * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float g = s * expf(tof(x[v]) - l);
        if (v == t) g -= s;
        put(d + v, g, accum);
    }
}

static void bad_tokens(void) {
    sj_cuda_error("cross_entropy", "device target tensors must be int32", __FILE__, __LINE__);
}

#define SJ_CU_CE(T, TY)                                                                     \
extern "C" void sj_cuda_cross_entropy_forward_##T(float *losses, float *lse,                \
                                                  const void *logits, const void *targets,  \
                                                  sj_dtype td, int N, int V, int ignore) {  \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    ce_fwd_k<<<N, 512, 0, sj_stream()>>>(losses, lse, (const TY *)logits,                   \
                                         (const int32_t *)targets, V, ignore);              \
    LAUNCH_CHECK("cross_entropy_forward");                                                  \
}                                                                                           \
extern "C" void sj_cuda_cross_entropy_backward_##T(void *dlogits, const void *logits,       \
                                                   const float *lse, const void *targets,   \
                                                   sj_dtype td, int N, int V, int ignore,   \
                                                   const float *scale, int accum) {         \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    ce_bwd_k<<<N, 512, 0, sj_stream()>>>((TY *)dlogits, (const TY *)logits, lse,            \
                                         (const int32_t *)targets, V, ignore, scale, accum); \
    LAUNCH_CHECK("cross_entropy_backward");                                                 \
}
SJ_CU_CE(f32, float)
SJ_CU_CE(bf16, bf16)
