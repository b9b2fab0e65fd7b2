/* embedding.cu — row gathers. gather_rows (the sparse loss's label rows):
 * one block per gathered row, its scatter back writes distinct rows of dx,
 * so no atomics either way. Token embedding: gather forward; backward as a
 * deterministic segmented sum. The host hands over, after the N token ids,
 * the row indices stably sorted by id (see backend.h), so each id's rows are
 * one contiguous run summed in a fixed order by one block: no atomics, the
 * same bits every run. */
#include "common.cuh"
#include "kernels.h"

// out: (N, C) = emb[tok]; tok: (N) int32 on device
template <class T>
static __global__ void emb_fwd_k(T *out, const int32_t *tok, const T *emb, int N, int C) {
    const int64_t r = blockIdx.x;
    const int64_t t = tok[r];
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[r * C + c] = emb[t * C + c];
}

// demb: (V, C) +=; dout: (N, C); tok: (N) ids then (N) rows sorted by id
template <class T>
static __global__ void emb_bwd_k(float *demb, const T *dout, const int32_t *tok, int N, int C) {
    const int32_t *order = tok + N;
    const int i = blockIdx.x;
    const int32_t id = tok[order[i]];
    if (i > 0 && tok[order[i - 1]] == id) return;   /* not the start of a run */
    int end = i + 1;
    while (end < N && tok[order[end]] == id) end++;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;   /* 4 loads in flight */
        int j = i;
        for (; j + 3 < end; j += 4) {
            s0 += tof(dout[(int64_t)order[j] * C + c]);
            s1 += tof(dout[(int64_t)order[j + 1] * C + c]);
            s2 += tof(dout[(int64_t)order[j + 2] * C + c]);
            s3 += tof(dout[(int64_t)order[j + 3] * C + c]);
        }
        for (; j < end; j++) s0 += tof(dout[(int64_t)order[j] * C + c]);
        demb[(int64_t)id * C + c] += (s0 + s1) + (s2 + s3);
    }
}

// out: (R, C) = x[idx] (zero rows where idx < 0); x: (N, C); idx: (R) int32
template <class T>
static __global__ void gather_rows_k(T *out, const T *x, const int32_t *idx, int C) {
    const int64_t r = blockIdx.x, src = idx[r];
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        out[r * C + c] = src < 0 ? fromf<T>(0.0f) : x[src * C + c];
}

// dx: (N, C) (+)= dout rows at rows idx (padding skipped); dout: (R, C)
template <class T>
static __global__ void scatter_rows_k(T *dx, const T *dout, const int32_t *idx, int C, int accum) {
    const int64_t r = blockIdx.x, dst = idx[r];
    if (dst < 0) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        put(dx + dst * C + c, tof(dout[r * C + c]), accum);
}

static void bad_tokens(void) {
    sj_cuda_error("embedding", "device token tensors must be int32", __FILE__, __LINE__);
}

#define SJ_CU_EMB(T, TY)                                                                    \
extern "C" void sj_cuda_embedding_forward_##T(void *out, const void *tok, sj_dtype td,      \
                                              const void *emb, int N, int C) {              \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    emb_fwd_k<<<N, 128, 0, sj_stream()>>>((TY *)out, (const int32_t *)tok, (const TY *)emb, N, C); \
    LAUNCH_CHECK("embedding_forward");                                                      \
}                                                                                           \
extern "C" void sj_cuda_embedding_backward_##T(float *demb, const void *dout, const void *tok, \
                                               sj_dtype td, int N, int C) {                 \
    if (td != SJ_I32) { bad_tokens(); return; }                                             \
    if (N <= 0) return;                                                                     \
    emb_bwd_k<<<N, 128, 0, sj_stream()>>>(demb, (const TY *)dout, (const int32_t *)tok, N, C); \
    LAUNCH_CHECK("embedding_backward");                                                     \
}                                                                                           \
extern "C" void sj_cuda_gather_rows_forward_##T(void *out, const void *x, const int32_t *idx, \
                                                int R, int C) {                             \
    if (R <= 0) return;                                                                     \
    gather_rows_k<<<R, 128, 0, sj_stream()>>>((TY *)out, (const TY *)x, idx, C);           \
    LAUNCH_CHECK("gather_rows_forward");                                                    \
}                                                                                           \
extern "C" void sj_cuda_gather_rows_backward_##T(void *dx, const void *dout, const int32_t *idx, \
                                                 int N, int R, int C, int accum) {          \
    if (!accum) CUDA_CHECK(cudaMemsetAsync(dx, 0, sizeof(TY) * (size_t)N * C, sj_stream())); \
    if (R <= 0) return;                                                                     \
    scatter_rows_k<<<R, 128, 0, sj_stream()>>>((TY *)dx, (const TY *)dout, idx, C, accum);  \
    LAUNCH_CHECK("gather_rows_backward");                                                   \
}
SJ_CU_EMB(f32, float)
SJ_CU_EMB(bf16, bf16)
SJ_CU_EMB(f16, f16)
