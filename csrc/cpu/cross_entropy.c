/* cross_entropy.c — fused softmax cross-entropy with an ignore index.
 * Forward keeps only each row's log-sum-exp; backward rebuilds the softmax
 * from it, so no probability matrix is stored. */
#include "cpu.h"
#include <math.h>

typedef struct {
    float *losses, *lse, *dlogits; const float *logits; const void *targets; sj_dtype t;
    int V, ld, ignore, accum; float scale;
} ce_job;

static void fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const ce_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->logits + r * j->ld;
        float m = -INFINITY, sum = 0.f;
        for (int v = 0; v < j->V; v++) m = x[v] > m ? x[v] : m;
#pragma omp simd reduction(+:sum)
        for (int v = 0; v < j->V; v++) sum += expf(x[v] - m);
        float lse = m + logf(sum);
        int64_t tgt = sj_token_at(j->targets, j->t, r);
        j->lse[r] = lse;
        j->losses[r] = tgt == j->ignore ? 0.f : lse - x[tgt];
    }
}

// losses, lse: (N); logits: (N, ld), V of each row read; targets: (N)
void sj_cpu_cross_entropy_forward(float *losses, float *lse, const void *logits,
                                  const void *targets, sj_dtype tok_dtype, int N, int V,
                                  int ld, int ignore_index) {
    ce_job j = { losses, lse, NULL, logits, targets, tok_dtype, V, ld, ignore_index, 0, 0 };
    sj_parallel_for(N, 4, fwd_rows, &j);
}

static void bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const ce_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->logits + r * j->ld;
        float *d = j->dlogits + r * j->ld;
        int64_t tgt = sj_token_at(j->targets, j->t, r);
        float s = tgt == j->ignore ? 0.f : j->scale, lse = j->lse[r];
        if (j->accum) {
            for (int v = 0; v < j->V; v++) d[v] += s * expf(x[v] - lse);
        } else {
#pragma omp simd
            for (int v = 0; v < j->V; v++) d[v] = s * expf(x[v] - lse);
        }
        if (tgt != j->ignore) d[tgt] -= s;
    }
}

// dlogits: (N, ld) (+)=, V of each row written
void sj_cpu_cross_entropy_backward(void *dlogits, const void *logits, const float *lse,
                                   const void *targets, sj_dtype tok_dtype, int N, int V,
                                   int ld, int ignore_index, const float *scale, int accum) {
    ce_job j = { NULL, (float *)lse, dlogits, logits, targets, tok_dtype, V, ld, ignore_index,
                 accum, *scale };
    sj_parallel_for(N, 4, bwd_rows, &j);
}
