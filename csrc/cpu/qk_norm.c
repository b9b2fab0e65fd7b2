/* qk_norm.c — per-head RMSNorm of q and k (Qwen3's q_norm and k_norm,
 * before RoPE), forward and backward: each q head's hd values x become
 * x * rstd * wq, each k head's x * rstd * wk, rstd = 1/sqrt(mean(x^2) + eps)
 * per head; v heads pass through. wq = wk = NULL: no gain ("plain").
 * Same expressions as csrc/cpu/rmsnorm.c, per head instead of per row. */
#include "cpu.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *out, *rstd; const float *qkv, *wq, *wk; int H, KV, hd; float eps;
} fwd_job;

static void fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fwd_job *j = ctx;
    const int hd = j->hd, n_norm = j->H + j->KV, row = (n_norm + j->KV) * hd;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = j->qkv + r * row;
        float *yr = j->out + r * row;
        for (int h = 0; h < n_norm; h++) {
            const float *x = xr + h * hd, *w = h < j->H ? j->wq : j->wk;
            float *y = yr + h * hd;
            float ss = 0.f;
#pragma omp simd reduction(+:ss)
            for (int c = 0; c < hd; c++) ss += x[c] * x[c];
            const float rs = 1.0f / sqrtf(ss / hd + j->eps);
            j->rstd[r * n_norm + h] = rs;
            if (w) for (int c = 0; c < hd; c++) y[c] = x[c] * rs * w[c];
            else for (int c = 0; c < hd; c++) y[c] = x[c] * rs;
        }
        if (yr != xr) memcpy(yr + n_norm * hd, xr + n_norm * hd, sizeof(float) * j->KV * hd);
    }
}

// out, qkv: (N, (H + 2*KV)*hd); rstd: (N, H + KV); wq, wk: (hd) or NULL
void sj_cpu_qk_norm_forward(void *out, float *rstd, const void *qkv, const void *wq,
                            const void *wk, int N, int H, int KV, int hd, float eps) {
    fwd_job j = { out, rstd, qkv, wq, wk, H, KV, hd, eps };
    sj_parallel_for(N, 4, fwd_rows, &j);
}

typedef struct {
    float *dqkv, *dwq, *dwk; const float *dout, *qkv, *wq, *wk, *rstd;
    int N, H, KV, hd, accum, dw_accum;
} bwd_job;

static void bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const bwd_job *j = ctx;
    const int hd = j->hd, n_norm = j->H + j->KV, row = (n_norm + j->KV) * hd;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = j->qkv + r * row, *gr = j->dout + r * row;
        float *dxr = j->dqkv + r * row;
        for (int h = 0; h < n_norm; h++) {
            const float *x = xr + h * hd, *g = gr + h * hd, *w = h < j->H ? j->wq : j->wk;
            float *dx = dxr + h * hd;
            const float rs = j->rstd[r * n_norm + h];
            float dot = 0.f;
            if (w) {
#pragma omp simd reduction(+:dot)
                for (int c = 0; c < hd; c++) dot += g[c] * w[c] * x[c];
            } else {
#pragma omp simd reduction(+:dot)
                for (int c = 0; c < hd; c++) dot += g[c] * x[c];
            }
            const float k = dot * rs * rs * rs / hd;
            for (int c = 0; c < hd; c++) {
                float v = g[c] * (w ? w[c] : 1.0f) * rs - k * x[c];
                dx[c] = j->accum ? dx[c] + v : v;
            }
        }
        /* dv = dout; in place (dqkv is dout, accum 0) it is already there */
        const float *gv = gr + n_norm * hd;
        float *dv = dxr + n_norm * hd;
        if (j->accum) for (int c = 0; c < j->KV * hd; c++) dv[c] += gv[c];
        else if (dv != gv) memcpy(dv, gv, sizeof(float) * j->KV * hd);
    }
}

/* The gains' gradients as one range of 2*hd channels (dwq's, then dwk's),
 * split by channel, rows and heads summed in order: no races, no scratch,
 * and the same result whatever the thread count. */
static void bwd_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const bwd_job *j = ctx;
    const int hd = j->hd, n_norm = j->H + j->KV, row = (n_norm + j->KV) * hd;
    for (int kv = 0; kv < 2; kv++) {   /* 0: q heads into dwq; 1: k heads into dwk */
        float *dw = kv ? j->dwk : j->dwq;
        const int lo = (int)(c0 > kv * hd ? c0 - kv * hd : 0);
        const int hi = (int)(c1 < (kv + 1) * hd ? c1 - kv * hd : hd);
        if (!dw || lo >= hi) continue;
        const int h0 = kv ? j->H : 0, h1 = kv ? n_norm : j->H;
        if (!j->dw_accum) for (int c = lo; c < hi; c++) dw[c] = 0.0f;
        for (int64_t r = 0; r < j->N; r++)
            for (int h = h0; h < h1; h++) {
                const float *x = j->qkv + r * row + h * hd, *g = j->dout + r * row + h * hd;
                const float rs = j->rstd[r * n_norm + h];
                for (int c = lo; c < hi; c++) dw[c] += g[c] * x[c] * rs;
            }
    }
}

// dqkv: (N, (H + 2*KV)*hd) (+)=; dwq, dwk: (hd) (+)=, or NULL (plain)
void sj_cpu_qk_norm_backward(void *dqkv, float *dwq, float *dwk, const void *dout,
                             const void *qkv, const void *wq, const void *wk,
                             const float *rstd, int N, int H, int KV, int hd, int accum,
                             int dw_accum) {
    bwd_job j = { dqkv, dwq, dwk, dout, qkv, wq, wk, rstd, N, H, KV, hd, accum, dw_accum };
    /* the gains first: dqkv may be dout itself (in place), which dx overwrites */
    if (dwq || dwk) sj_parallel_for(2 * (int64_t)hd, 8, bwd_cols, &j);
    sj_parallel_for(N, 4, bwd_rows, &j);
}
