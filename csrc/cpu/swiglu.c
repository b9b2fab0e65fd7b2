/* swiglu.c — the gated FFN activation, h = act(gate) * up over a fused
 * [gate | up] row (act: silu for SwiGLU, relu^2; SJ_FFN_*). */
#include "cpu.h"
#include <math.h>

typedef struct { float *h, *dgu; const float *gu, *dh; int F, act, accum; } sw_job;

static void fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const sw_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->gu + r * 2 * j->F, *u = g + j->F;
        float *h = j->h + r * j->F;
        if (j->act == SJ_FFN_RELU2)
            for (int c = 0; c < j->F; c++) { const float a = g[c] > 0.0f ? g[c] : 0.0f; h[c] = a * a * u[c]; }
        else
            for (int c = 0; c < j->F; c++) h[c] = g[c] / (1.0f + expf(-g[c])) * u[c];
    }
}

// h: (N, F); gu: (N, 2F)
void sj_cpu_swiglu_forward(void *h, const void *gu, int N, int F, int act) {
    sw_job j = { h, NULL, gu, NULL, F, act, 0 };
    sj_parallel_for(N, 8, fwd_rows, &j);
}

static void bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const sw_job *j = ctx;
    const int relu2 = j->act == SJ_FFN_RELU2;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->gu + r * 2 * j->F, *u = g + j->F, *dh = j->dh + r * j->F;
        float *dg = j->dgu + r * 2 * j->F, *du = dg + j->F;
        for (int c = 0; c < j->F; c++) {
            float a, da;   /* act(gate) and its derivative */
            if (relu2) {
                const float p = g[c] > 0.0f ? g[c] : 0.0f;
                a = p * p;
                da = 2.0f * p;
            } else {
                const float s = 1.0f / (1.0f + expf(-g[c]));
                a = g[c] * s;
                da = s * (1.0f + g[c] * (1.0f - s));
            }
            const float vg = dh[c] * u[c] * da, vu = dh[c] * a;
            dg[c] = j->accum ? dg[c] + vg : vg;
            du[c] = j->accum ? du[c] + vu : vu;
        }
    }
}

// dgu: (N, 2F) (+)=; dh: (N, F)
void sj_cpu_swiglu_backward(void *dgu, const void *dh, const void *gu, int N, int F, int act,
                            int accum) {
    sw_job j = { NULL, dgu, gu, dh, F, act, accum };
    sj_parallel_for(N, 8, bwd_rows, &j);
}
