/* adamw.cu — AdamW over a range of the flat buffers in one pass: f32 master weights
 * and moments, the bf16 or f16 compute copy written alongside (f16 clamped
 * by fromf), gradients zeroed unless the step's own (they die with it).
 * Clip scale, skip-on-non-finite, lr and bias corrections are computed per
 * thread from the scalars in device memory (set before each replay), with
 * the expressions of csrc/cpu/adamw.c. Bandwidth-bound: 4 f32 reads,
 * 4 f32 writes (+1 bf16/f16) per parameter. */
#include "common.cuh"
#include "kernels.h"

template <class T>
static __global__ void adamw_k(float *p, T *p_act, float *g, int zero_grads, float *m,
                               float *v, int64_t n, float lr_mult, float wd,
                               const sj_optim_hp *hp) {
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const float lr = hp->lr * lr_mult, b1 = hp->beta1, b2 = hp->beta2, eps = hp->eps;
    const float step = (float)hp->step;
    const float bc1 = 1.0f - powf(b1, step), bc2_sqrt = sqrtf(1.0f - powf(b2, step));
    const float step_size = lr / bc1;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (update) {
            float gi = g[i] * scale, pi = p[i];
            pi *= 1.0f - lr * wd;
            float mi = m[i] + (1.0f - b1) * (gi - m[i]);
            float vi = v[i] * b2 + (1.0f - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            pi = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
            p[i] = pi;
            if (p_act) p_act[i] = fromf<T>(pi);
        }
        if (zero_grads) g[i] = 0.0f;
    }
}

#define SJ_CU_ADAMW(T, TY)                                                                  \
extern "C" void sj_cuda_adamw_##T(float *p, void *p_act, float *g, int zero_grads, float *m, \
                                  float *v, int64_t n, float lr_mult, float wd,             \
                                  const sj_optim_hp *hp) {                                  \
    if (n <= 0) return;                                                                     \
    adamw_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>(p, (TY *)p_act, g, zero_grads, \
                                                              m, v, n, lr_mult, wd, hp);    \
    LAUNCH_CHECK("adamw");                                                                  \
}
SJ_CU_ADAMW(f32, float)
SJ_CU_ADAMW(bf16, bf16)
SJ_CU_ADAMW(f16, f16)
