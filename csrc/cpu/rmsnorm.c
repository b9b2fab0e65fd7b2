/* rmsnorm.c — RMSNorm forward and backward: y = x * rstd * w with
 * rstd = 1/sqrt(mean(x^2) + eps), accumulated in double per row. */
#include "cpu.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *out, *rstd; const float *x, *w; int C; float eps;
} fwd_job;

static void fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fwd_job *j = ctx;
    const int C = j->C;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * C;
        float *y = j->out + r * C;
        float ss = 0.f;
#pragma omp simd reduction(+:ss)
        for (int c = 0; c < C; c++) ss += x[c] * x[c];
        float rs = 1.0f / sqrtf(ss / C + j->eps);
        j->rstd[r] = rs;
        for (int c = 0; c < C; c++) y[c] = x[c] * rs * j->w[c];
    }
}

// out, x: (N, C); rstd: (N); w: (C)
void sj_cpu_rmsnorm_forward(void *out, float *rstd, const void *x, const void *w,
                            int N, int C, float eps) {
    fwd_job j = { out, rstd, x, w, C, eps };
    sj_parallel_for(N, 16, fwd_rows, &j);
}

typedef struct {
    float *dx, *dw; const float *dout, *x, *w, *rstd; int N, C, accum, dw_accum;
} bwd_job;

static void bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const bwd_job *j = ctx;
    const int C = j->C;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * C, *g = j->dout + r * C;
        float *dx = j->dx + r * C;
        float rs = j->rstd[r], dot = 0.f;
#pragma omp simd reduction(+:dot)
        for (int c = 0; c < C; c++) dot += g[c] * j->w[c] * x[c];
        float k = dot * rs * rs * rs / C;
        for (int c = 0; c < C; c++) {
            float v = g[c] * j->w[c] * rs - k * x[c];
            dx[c] = j->accum ? dx[c] + v : v;
        }
    }
}

/* dw is split by channel, rows summed in order: no races, no scratch, and
 * the same result whatever the thread count. */
static void bwd_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const bwd_job *j = ctx;
    if (!j->dw_accum) for (int64_t c = c0; c < c1; c++) j->dw[c] = 0.0f;
    for (int64_t r = 0; r < j->N; r++) {
        const float *x = j->x + r * j->C, *g = j->dout + r * j->C;
        float rs = j->rstd[r];
        for (int64_t c = c0; c < c1; c++) j->dw[c] += g[c] * x[c] * rs;
    }
}

// dx: (N, C) (+)=; dw: (C) (+)=
void sj_cpu_rmsnorm_backward(void *dx, float *dw, const void *dout, const void *x,
                             const void *w, const float *rstd, int N, int C, int accum,
                             int dw_accum) {
    bwd_job j = { dx, dw, dout, x, w, rstd, N, C, accum, dw_accum };
    sj_parallel_for(N, 16, bwd_rows, &j);
    sj_parallel_for(C, 16, bwd_cols, &j);
}
