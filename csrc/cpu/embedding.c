/* embedding.c — row gathers: the token embedding (forward gather, backward
 * scatter-add) and gather_rows (the sparse loss's label rows). */
#include "cpu.h"
#include <string.h>

typedef struct { float *out; const void *tok; sj_dtype t; const float *emb; int C; } fwd_job;

static void fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fwd_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        memcpy(j->out + r * j->C, j->emb + sj_token_at(j->tok, j->t, r) * j->C,
               sizeof(float) * j->C);
}

// out: (N, C); emb: (V, C)
void sj_cpu_embedding_forward(void *out, const void *tok, sj_dtype tok_dtype,
                              const void *emb, int N, int C) {
    fwd_job j = { out, tok, tok_dtype, emb, C };
    sj_parallel_for(N, 64, fwd_rows, &j);
}

typedef struct { float *demb; const float *dout; const void *tok; sj_dtype t; int N, C; } bwd_job;

/* Threads split the channels, not the rows: two rows with the same token
 * would otherwise race; the row order per channel stays fixed. */
static void bwd_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const bwd_job *j = ctx;
    for (int64_t r = 0; r < j->N; r++) {
        float *d = j->demb + sj_token_at(j->tok, j->t, r) * j->C;
        const float *g = j->dout + r * j->C;
        for (int64_t c = c0; c < c1; c++) d[c] += g[c];
    }
}

// demb: (V, C) +=; dout: (N, C)
void sj_cpu_embedding_backward(float *demb, const void *dout, const void *tok,
                               sj_dtype tok_dtype, int N, int C) {
    bwd_job j = { demb, dout, tok, tok_dtype, N, C };
    sj_parallel_for(C, 16, bwd_cols, &j);
}

typedef struct { float *dst; const float *src; const int32_t *idx; int C, accum; } rows_job;

static void gather_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const rows_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        float *o = j->dst + r * j->C;
        if (j->idx[r] < 0) memset(o, 0, sizeof(float) * j->C);
        else memcpy(o, j->src + (int64_t)j->idx[r] * j->C, sizeof(float) * j->C);
    }
}

/* Threads split dout's rows: their targets are distinct rows of dx. */
static void scatter_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const rows_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        if (j->idx[r] < 0) continue;   /* padding: its dout row is never read */
        float *d = j->dst + (int64_t)j->idx[r] * j->C;
        const float *g = j->src + r * j->C;
        if (j->accum) for (int c = 0; c < j->C; c++) d[c] += g[c];
        else memcpy(d, g, sizeof(float) * j->C);
    }
}

// out: (R, C) = x[idx] (zeros where idx < 0); x: (N, C); idx: (R) int32
void sj_cpu_gather_rows_forward(void *out, const void *x, const int32_t *idx, int R, int C) {
    rows_job j = { out, x, idx, C, 0 };
    sj_parallel_for(R, 64, gather_range, &j);
}

// dx: (N, C) (+)= dout scattered to rows idx; dout: (R, C)
void sj_cpu_gather_rows_backward(void *dx, const void *dout, const int32_t *idx, int N, int R,
                                 int C, int accum) {
    if (!accum) sj_cpu_fill(dx, 0.0f, (int64_t)N * C);
    rows_job j = { dx, dout, idx, C, accum };
    sj_parallel_for(R, 64, scatter_range, &j);
}
