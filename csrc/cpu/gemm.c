/* gemm.c — CPU GEMM. For now the simple blocked, threaded version; the
 * reference stays as the one the fast path is tested against. */
#include "cpu.h"

#define AT(X, ld, tr, i, k) ((tr) ? (X)[(int64_t)(k) * (ld) + (i)] : (X)[(int64_t)(i) * (ld) + (k)])

void sj_cpu_gemm_reference(float *C, int ldc, const float *A, int lda, int transA,
                           const float *B, int ldb, int transB, int M, int N, int K,
                           int accum) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = accum ? C[(int64_t)i * ldc + j] : 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)AT(A, lda, transA, i, k) * (double)AT(B, ldb, transB, k, j);
            C[(int64_t)i * ldc + j] = (float)acc;
        }
}

typedef struct {
    float *C; const float *A, *B; int ldc, lda, ldb, transA, transB, M, N, K, accum;
} gemm_job;

static void gemm_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const gemm_job *g = ctx;
    for (int64_t i = r0; i < r1; i++) {
        float *c = g->C + i * g->ldc;
        if (!g->accum) for (int j = 0; j < g->N; j++) c[j] = 0.f;
        for (int k = 0; k < g->K; k++) {
            float a = AT(g->A, g->lda, g->transA, i, k);
            if (!g->transB) {
                const float *b = g->B + (int64_t)k * g->ldb;
                for (int j = 0; j < g->N; j++) c[j] += a * b[j];
            } else {
                for (int j = 0; j < g->N; j++) c[j] += a * g->B[(int64_t)j * g->ldb + k];
            }
        }
    }
}

void sj_cpu_gemm(float *C, int ldc, const float *A, int lda, int transA,
                 const float *B, int ldb, int transB, int M, int N, int K, int accum) {
    gemm_job g = { C, A, B, ldc, lda, ldb, transA, transB, M, N, K, accum };
    sj_parallel_for(M, 4, gemm_rows, &g);
}

void sj_cpu_matmul(float *C, const float *A, const float *B, int M, int N, int K,
                   int transA, int transB, int accum) {
    sj_cpu_gemm(C, N, A, transA ? M : K, transA, B, transB ? K : N, transB, M, N, K, accum);
}
