/* adamw.c — AdamW over the flat buffers (PyTorch's formulation, decoupled
 * weight decay on [0, n_decay) only) and the global squared norm. */
#include "cpu.h"
#include <math.h>

typedef struct {
    float *p, *m, *v; const float *g; int64_t n_decay;
    float lr, b1, b2, eps, wd, gs, bc1, bc2_sqrt;
} adamw_job;

static void adamw_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const adamw_job *j = ctx;
    const float step_size = j->lr / j->bc1;
    for (int64_t i = i0; i < i1; i++) {
        float g = j->g[i] * j->gs, p = j->p[i];
        if (i < j->n_decay) p *= 1.0f - j->lr * j->wd;
        float m = j->m[i] + (1.0f - j->b1) * (g - j->m[i]);
        float v = j->v[i] * j->b2 + (1.0f - j->b2) * g * g;
        j->m[i] = m;
        j->v[i] = v;
        j->p[i] = p - step_size * m / (sqrtf(v) / j->bc2_sqrt + j->eps);
    }
}

// p, g, m, v: (n); step is 1-based
void sj_cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, int64_t n_decay,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int64_t step) {
    adamw_job j = { p, m, v, g, n_decay, lr, beta1, beta2, eps, weight_decay, grad_scale,
                    1.0f - powf(beta1, (float)step), sqrtf(1.0f - powf(beta2, (float)step)) };
    sj_parallel_for(n, 1 << 14, adamw_range, &j);
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
