/* cpu.h — the CPU backend's kernels, one file per op family. */
#ifndef SJ_CPU_H
#define SJ_CPU_H

#include "../ops/backend.h"

/* General strided GEMM: C = op(A) op(B) (+ C if accum); lda/ldb/ldc are row
 * strides of the stored (untransposed) matrices. Multi-threaded. */
void sj_cpu_gemm(float *C, int ldc, const float *A, int lda, int transA,
                 const float *B, int ldb, int transB, int M, int N, int K, int accum);
/* The simplest correct GEMM (serial, double accumulation): the reference
 * the fast one is tested against. */
void sj_cpu_gemm_reference(float *C, int ldc, const float *A, int lda, int transA,
                           const float *B, int ldb, int transB, int M, int N, int K,
                           int accum);

void sj_cpu_matmul(float *C, const float *A, const float *B, int M, int N, int K,
                   int transA, int transB, int accum);
void sj_cpu_embedding_forward(float *out, const void *tok, sj_dtype tok_dtype,
                              const float *emb, int N, int C);
void sj_cpu_embedding_backward(float *demb, const float *dout, const void *tok,
                               sj_dtype tok_dtype, int N, int C);
void sj_cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w,
                            int N, int C, float eps);
void sj_cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x,
                             const float *w, const float *rstd, int N, int C, int accum);
void sj_cpu_rope_forward(float *out, const float *in, int B, int T, int n_heads,
                         int n_rot, int hd, int pos0, float theta);
void sj_cpu_rope_backward(float *din, const float *dout, int B, int T, int n_heads,
                          int n_rot, int hd, int pos0, float theta, int accum);
void sj_cpu_attention_forward(float *out, float *lse, const float *qkv,
                              int B, int T, int H, int KV, int hd);
void sj_cpu_attention_backward(float *dqkv, const float *dout, const float *qkv,
                               const float *out, const float *lse,
                               int B, int T, int H, int KV, int hd, int accum);
void sj_cpu_swiglu_forward(float *h, const float *gu, int N, int F);
void sj_cpu_swiglu_backward(float *dgu, const float *dh, const float *gu, int N, int F,
                            int accum);
void sj_cpu_add(float *out, const float *a, const float *b, int64_t n);
void sj_cpu_copy(float *dst, const float *src, int64_t n, int accum);
void sj_cpu_fill(float *x, float value, int64_t n);
void sj_cpu_cross_entropy_forward(float *losses, float *lse, const float *logits,
                                  const void *targets, sj_dtype tok_dtype, int N, int V,
                                  int ignore_index);
void sj_cpu_cross_entropy_backward(float *dlogits, const float *logits, const float *lse,
                                   const void *targets, sj_dtype tok_dtype, int N, int V,
                                   int ignore_index, float scale, int accum);
double sj_cpu_sumsq(const float *x, int64_t n);
void sj_cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, int64_t n_decay,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int64_t step);


#endif
