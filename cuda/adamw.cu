/* adamw.cu — AdamW over a range of the flat buffers in one pass: f32 master weights,
 * moments stored f32, bf16 or 8-bit (ostate.cuh: decoded, updated in f32,
 * coded back), the bf16 or f16 compute copy written alongside (f16 clamped
 * by fromf), gradients zeroed unless the step's own (they die with it).
 * Clip scale, skip-on-non-finite, lr and bias corrections are computed per
 * thread from the scalars in device memory (set before each replay), with
 * the expressions of csrc/cpu/adamw.c. Bandwidth-bound: 4 f32 reads,
 * 4 f32 writes (+1 bf16/f16) per parameter with f32 state; bf16 state
 * saves 4 bytes each way, 8-bit 6 (its codes' binary search and block max
 * not yet timed). */
#include "common.cuh"
#include "kernels.h"
#include "ostate.cuh"

template <class T>
static __global__ void __launch_bounds__(SJ_Q8_BLOCK)
adamw_k(float *p, T *p_act, float *g, int zero_grads, sj_state m, sj_state v, int64_t n,
        float lr_mult, float wd, const sj_optim_hp *hp) {
    __shared__ sj_state_maps sm;
    if (m.dtype == SJ_STATE_Q8) sj_state_maps_load(&sm);
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const float lr = hp->lr * lr_mult, b1 = hp->beta1, b2 = hp->beta2, eps = hp->eps;
    const float step = (float)hp->step;
    const float bc1 = 1.0f - powf(b1, step), bc2_sqrt = sqrtf(1.0f - powf(b2, step));
    const float step_size = lr / bc1;
    for (int64_t base = blockIdx.x * (int64_t)SJ_Q8_BLOCK; base < n;
         base += (int64_t)gridDim.x * SJ_Q8_BLOCK) {
        const int64_t i = base + threadIdx.x;
        const bool in = i < n;
        if (update) {   /* the same for every thread: the stores' barriers are safe */
            float mi = 0.0f, vi = 0.0f;
            if (in) {
                const float gi = g[i] * scale, m0 = sj_state_load(m, &sm, i);
                float pi = p[i];
                pi *= 1.0f - lr * wd;
                mi = m0 + (1.0f - b1) * (gi - m0);
                vi = sj_state_load(v, &sm, i) * b2 + (1.0f - b2) * gi * gi;
                pi = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
                p[i] = pi;
                if (p_act) p_act[i] = fromf<T>(pi);
            }
            sj_state_store(m, &sm, base, i, in, mi, hp);
            sj_state_store(v, &sm, base, i, in, vi, hp);
        }
        if (zero_grads && in) g[i] = 0.0f;
    }
}

#define SJ_CU_ADAMW(T, TY)                                                                  \
extern "C" void sj_cuda_adamw_##T(float *p, void *p_act, float *g, int zero_grads,          \
                                  sj_state m, sj_state v, int64_t n, float lr_mult,         \
                                  float wd, const sj_optim_hp *hp) {                        \
    if (n <= 0) return;                                                                     \
    adamw_k<<<sj_blocks(n, SJ_Q8_BLOCK, 8192), SJ_Q8_BLOCK, 0, sj_stream()>>>(              \
        p, (TY *)p_act, g, zero_grads, m, v, n, lr_mult, wd, hp);                           \
    LAUNCH_CHECK("adamw");                                                                  \
}
SJ_CU_ADAMW(f32, float)
SJ_CU_ADAMW(bf16, bf16)
SJ_CU_ADAMW(f16, f16)
