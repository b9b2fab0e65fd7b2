/* adamw.c — AdamW over a range of the flat buffers (PyTorch's formulation,
 * decoupled weight decay; moments stored as sj_state, see cpu.h), the
 * global clip's scale and squared norms. */
#include "cpu.h"
#include <math.h>

typedef struct {
    float *p, *g;
    sj_state m, v;
    int64_t n;
    float lr, b1, b2, eps, wd, gs, bc1, bc2_sqrt; int update, zero_grads;
    const sj_optim_hp *hp;
} adamw_job;

/* blocks [c0, c1) of SJ_Q8_BLOCK elements */
static void adamw_blocks(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const adamw_job *j = ctx;
    const float step_size = j->lr / j->bc1;
    for (int64_t c = c0; c < c1 && j->update; c++) {
        const int64_t i0 = c * SJ_Q8_BLOCK;
        const int cnt = (int)SJ_MIN(SJ_Q8_BLOCK, j->n - i0);
        float mbuf[SJ_Q8_BLOCK], vbuf[SJ_Q8_BLOCK];
        float *m = sj_cpu_state_load(&j->m, i0, cnt, mbuf), *v = sj_cpu_state_load(&j->v, i0, cnt, vbuf);
        for (int k = 0; k < cnt; k++) {
            const int64_t i = i0 + k;
            float g = j->g[i] * j->gs, p = j->p[i];
            p *= 1.0f - j->lr * j->wd;
            float mk = m[k] + (1.0f - j->b1) * (g - m[k]);
            float vk = v[k] * j->b2 + (1.0f - j->b2) * g * g;
            m[k] = mk;
            v[k] = vk;
            j->p[i] = p - step_size * mk / (sqrtf(vk) / j->bc2_sqrt + j->eps);
        }
        sj_cpu_state_store(&j->m, i0, cnt, m, j->hp);
        sj_cpu_state_store(&j->v, i0, cnt, v, j->hp);
    }
    if (j->zero_grads)   /* consumed */
        for (int64_t i = c0 * SJ_Q8_BLOCK; i < SJ_MIN(c1 * SJ_Q8_BLOCK, j->n); i++) j->g[i] = 0.0f;
}

float sj_cpu_clip_scale(const sj_optim_hp *hp, int *update) {
    const double norm = sqrt(hp->sumsq);
    /* PyTorch's clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)); a
     * NaN/Inf norm would poison every weight, so that step only zeroes. */
    *update = isfinite(norm);
    return hp->clip > 0 ? fminf(1.0f, (float)(hp->clip / (norm + 1e-6))) : 1.0f;
}

// p, g, m, v: (n); p_act unused (f32 compute is the master copy itself)
void sj_cpu_adamw(float *p, void *p_act, float *g, int zero_grads, sj_state m, sj_state v,
                  int64_t n, float lr_mult, float wd, const sj_optim_hp *hp) {
    (void)p_act;
    int update;
    const float scale = sj_cpu_clip_scale(hp, &update), step = (float)hp->step;
    adamw_job j = { p, g, m, v, n, hp->lr * lr_mult, hp->beta1, hp->beta2, hp->eps, wd, scale,
                    1.0f - powf(hp->beta1, step), sqrtf(1.0f - powf(hp->beta2, step)), update,
                    zero_grads, hp };
    sj_parallel_for(SJ_CDIV(n, SJ_Q8_BLOCK), 64, adamw_blocks, &j);
}

enum { SUMSQ_PARTS = 64 };
typedef struct { const float *x; int64_t n; double part[SUMSQ_PARTS]; } sumsq_job;

static void sumsq_parts(void *ctx, int64_t p0, int64_t p1, int tid) {
    (void)tid;
    sumsq_job *j = ctx;
    int64_t per = SJ_CDIV(j->n, SUMSQ_PARTS);
    for (int64_t p = p0; p < p1; p++) {
        double s = 0.0;
        for (int64_t i = p * per; i < SJ_MIN((p + 1) * per, j->n); i++) s += (double)j->x[i] * j->x[i];
        j->part[p] = s;
    }
}

/* A fixed number of parts summed in order: the same bits for any thread count. */
double sj_cpu_sumsq(const float *x, int64_t n) {
    sumsq_job j = { x, n, {0} };
    sj_parallel_for(SUMSQ_PARTS, 1, sumsq_parts, &j);
    double s = 0.0;
    for (int p = 0; p < SUMSQ_PARTS; p++) s += j.part[p];
    return s;
}

void sj_cpu_sumsq_into(double *out, const float *x, int64_t n) { *out = sj_cpu_sumsq(x, n); }
