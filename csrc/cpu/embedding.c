/* embedding.c — token embedding forward (gather) and backward (scatter-add). */
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
