/* cross_entropy.cu — fused softmax cross-entropy. Forward: one block per
 * row, max then sum of exp over the vocabulary in f32, keeps only the row's
 * log-sum-exp and loss. Backward: writes dlogits = scale * (softmax -
 * onehot) straight from the logits and lse (no probability matrix, no
 * second pass over a gradient); it may overwrite the logits in place, since
 * each thread reads an element before writing that same element. The
 * scale is read from device memory, so a captured graph uses this step's.
 *
 * Rows are ld elements apart (ld >= V; the model keeps ld a multiple of 64,
 * so an odd vocabulary such as GPT-2's 50257 stays on the fast path).
 *
 * Fast path (ld a multiple of 16 bytes' worth of elements, aligned logits;
 * the last V % 8 elements of a row one per thread): the forward reads each row ONCE with an online max/sum (each thread keeps
 * a running max and a sum rescaled when the max grows; the block merges the
 * (max, sum) pairs in a fixed order), 16-byte loads, four in flight per
 * thread; the backward reads and writes each row once, 16 bytes at a time.
 * Bound: memory bandwidth. Logits 32768 x 8192 bf16 = 512 MB: forward
 * ~0.17 ms at 3 TB/s (the two-pass scalar kernel measured 0.57 ms), backward
 * 1 GB moved, ~0.35 ms (measured 0.79 ms scalar). */
#include "common.cuh"
#include "kernels.h"

/* (m, s) += (m2, s2): s * e^m + s2 * e^m2 = S * e^M. An empty side has
 * m = -inf and s = 0. */
static __device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) return;   /* both empty */
    s = (m == -INFINITY ? 0.f : s * expf(m - M)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - M));
    m = M;
}

// losses, lse: (N); logits: (N, ld); targets: (N) int32. 256 threads per row.
template <class T>
static __global__ void __launch_bounds__(256) ce_fwd_vec(float *losses, float *lse, const T *logits,
                                                         const int32_t *tgt, int V, int ld,
                                                         int ignore) {
    constexpr int VE = vec16<T>::N, U = 4;
    const int64_t r = blockIdx.x;
    const T *x = logits + r * ld;
    const int nv = V / VE;
    float m = -INFINITY, s = 0.f;
    for (int k0 = threadIdx.x; k0 < nv; k0 += U * 256) {
        uint4 u[U];
#pragma unroll
        for (int j = 0; j < U; j++)
            if (k0 + j * 256 < nv) u[j] = ld16(x + (int64_t)(k0 + j * 256) * VE);
#pragma unroll
        for (int j = 0; j < U; j++) {
            if (k0 + j * 256 >= nv) continue;
            float f[VE], mx = -INFINITY;
            unpack16<T>(f, u[j]);
#pragma unroll
            for (int e = 0; e < VE; e++) mx = fmaxf(mx, f[e]);
            if (mx > m) { s = m == -INFINITY ? 0.f : s * expf(m - mx); m = mx; }
            if (m == -INFINITY) continue;   /* every value so far is -inf */
#pragma unroll
            for (int e = 0; e < VE; e++) s += expf(f[e] - m);
        }
    }
    if (threadIdx.x < V - nv * VE) {   /* the row's tail */
        const float f = tof(x[nv * VE + threadIdx.x]);
        if (f > m) { s = m == -INFINITY ? 0.f : s * expf(m - f); m = f; }
        if (m != -INFINITY) s += expf(f - m);
    }
    /* merge: lanes by xor butterfly (the same tree in every run), then the
     * 8 warps in order */
#pragma unroll
    for (int o = 16; o; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    __shared__ float pm[8], ps[8];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { pm[w] = m; ps[w] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = pm[0], S = ps[0];
        for (int k = 1; k < 8; k++) lse_merge(M, S, pm[k], ps[k]);
        const float l = M + logf(S);
        const int t = tgt[r];
        lse[r] = l;
        losses[r] = t == ignore ? 0.f : l - tof(x[t]);
    }
}

// dlogits: (N, ld) (+)=, may alias logits when !accum (each thread reads its
// vectors before writing them). 256 threads per row.
template <class T>
static __global__ void __launch_bounds__(256) ce_bwd_vec(T *dlogits, const T *logits,
                                                         const float *lse, const int32_t *tgt,
                                                         int V, int ld, int ignore,
                                                         const float *scale, int accum) {
    constexpr int VE = vec16<T>::N, U = 4;
    const int64_t r = blockIdx.x;
    const int t = tgt[r];
    const float s = t == ignore ? 0.f : *scale, l = lse[r];
    const T *x = logits + r * ld;
    T *d = dlogits + r * ld;
    const int nv = V / VE;
    for (int k0 = threadIdx.x; k0 < nv; k0 += U * 256) {
        uint4 u[U];
#pragma unroll
        for (int j = 0; j < U; j++)
            if (k0 + j * 256 < nv) u[j] = ld16(x + (int64_t)(k0 + j * 256) * VE);
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int k = k0 + j * 256;
            if (k >= nv) continue;
            float f[VE];
            unpack16<T>(f, u[j]);
#pragma unroll
            for (int e = 0; e < VE; e++) {
                f[e] = s * expf(f[e] - l);
                if (k * VE + e == t) f[e] -= s;
            }
            store_vec(d + (int64_t)k * VE, f, accum);
        }
    }
    if (threadIdx.x < V - nv * VE) {   /* the row's tail */
        const int v = nv * VE + threadIdx.x;
        float g = s * expf(tof(x[v]) - l);
        if (v == t) g -= s;
        put(d + v, g, accum);
    }
}

template <class T>
static bool ce_vec_ok(int ld, const void *a, const void *b) {
    return ld > 0 && ld % vec16<T>::N == 0 && aligned16(a) && aligned16(b);
}

// losses, lse: (N); logits: (N, ld); targets: (N) int32
template <class T>
static __global__ void ce_fwd_k(float *losses, float *lse, const T *logits, const int32_t *tgt,
                                int V, int ld, int ignore) {
    const int64_t r = blockIdx.x;
    const T *x = logits + r * ld;
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

// dlogits: (N, ld) (+)=, may alias logits when !accum
template <class T>
static __global__ void ce_bwd_k(T *dlogits, const T *logits, const float *lse,
                                const int32_t *tgt, int V, int ld, int ignore,
                                const float *scale, int accum) {
    const int64_t r = blockIdx.x;
    const int t = tgt[r];
    const float s = t == ignore ? 0.f : *scale, l = lse[r];
    const T *x = logits + r * ld;
    T *d = dlogits + r * ld;
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
                                                  sj_dtype td, int N, int V, int ld,        \
                                                  int ignore) {                             \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    if (ce_vec_ok<TY>(ld, logits, logits)) {                                                \
        ce_fwd_vec<<<N, 256, 0, sj_stream()>>>(losses, lse, (const TY *)logits,             \
                                               (const int32_t *)targets, V, ld, ignore);    \
        LAUNCH_CHECK("cross_entropy_forward");                                              \
        return;                                                                             \
    }                                                                                       \
    ce_fwd_k<<<N, 512, 0, sj_stream()>>>(losses, lse, (const TY *)logits,                   \
                                         (const int32_t *)targets, V, ld, ignore);          \
    LAUNCH_CHECK("cross_entropy_forward");                                                  \
}                                                                                           \
extern "C" void sj_cuda_cross_entropy_backward_##T(void *dlogits, const void *logits,       \
                                                   const float *lse, const void *targets,   \
                                                   sj_dtype td, int N, int V, int ld,       \
                                                   int ignore, const float *scale,          \
                                                   int accum) {                             \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    if (ce_vec_ok<TY>(ld, logits, dlogits)) {                                               \
        ce_bwd_vec<<<N, 256, 0, sj_stream()>>>((TY *)dlogits, (const TY *)logits, lse,      \
                                               (const int32_t *)targets, V, ld, ignore,     \
                                               scale, accum);                               \
        LAUNCH_CHECK("cross_entropy_backward");                                             \
        return;                                                                             \
    }                                                                                       \
    ce_bwd_k<<<N, 512, 0, sj_stream()>>>((TY *)dlogits, (const TY *)logits, lse,            \
                                         (const int32_t *)targets, V, ld, ignore, scale,    \
                                         accum);                                            \
    LAUNCH_CHECK("cross_entropy_backward");                                                 \
}
SJ_CU_CE(f32, float)
SJ_CU_CE(bf16, bf16)
SJ_CU_CE(f16, f16)
