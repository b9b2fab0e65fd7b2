/* cpu.h — the CPU backend's kernels, one file per op family. */
#ifndef SJ_CPU_H
#define SJ_CPU_H

#include "../ops/backend.h"

/* Every file here is compiled once per ISA level (core/isa.h): its symbols
 * carry the level's suffix. Code compiled once reaches them through the
 * table (sj_cpu_backend()) or SJ_ISA_PICK. */
#define sj_cpu_table SJ_ISA(sj_cpu_table)
#define sj_cpu_staged_table SJ_ISA(sj_cpu_staged_table)
#define sj_cpu_adamw SJ_ISA(sj_cpu_adamw)
#define sj_cpu_sumsq_into SJ_ISA(sj_cpu_sumsq_into)
#define sj_cpu_clip_scale SJ_ISA(sj_cpu_clip_scale)
#define sj_cpu_lion SJ_ISA(sj_cpu_lion)
#define sj_cpu_sgd SJ_ISA(sj_cpu_sgd)
#define sj_cpu_adafactor SJ_ISA(sj_cpu_adafactor)
#define sj_cpu_muon_momentum SJ_ISA(sj_cpu_muon_momentum)
#define sj_cpu_muon_normalize SJ_ISA(sj_cpu_muon_normalize)
#define sj_cpu_muon_apply SJ_ISA(sj_cpu_muon_apply)
#define sj_cpu_sumsq SJ_ISA(sj_cpu_sumsq)
#define sj_cpu_attention_backward SJ_ISA(sj_cpu_attention_backward)
#define sj_cpu_attention_forward SJ_ISA(sj_cpu_attention_forward)
#define sj_cpu_cross_entropy_backward SJ_ISA(sj_cpu_cross_entropy_backward)
#define sj_cpu_cross_entropy_forward SJ_ISA(sj_cpu_cross_entropy_forward)
#define sj_cpu_add SJ_ISA(sj_cpu_add)
#define sj_cpu_copy SJ_ISA(sj_cpu_copy)
#define sj_cpu_fill SJ_ISA(sj_cpu_fill)
#define sj_cpu_mix_backward SJ_ISA(sj_cpu_mix_backward)
#define sj_cpu_mix_forward SJ_ISA(sj_cpu_mix_forward)
#define sj_cpu_pair_heads_backward SJ_ISA(sj_cpu_pair_heads_backward)
#define sj_cpu_pair_heads_forward SJ_ISA(sj_cpu_pair_heads_forward)
#define sj_cpu_embedding_backward SJ_ISA(sj_cpu_embedding_backward)
#define sj_cpu_gather_rows_forward SJ_ISA(sj_cpu_gather_rows_forward)
#define sj_cpu_gather_rows_backward SJ_ISA(sj_cpu_gather_rows_backward)
#define sj_cpu_embedding_forward SJ_ISA(sj_cpu_embedding_forward)
#define sj_cpu_gemm SJ_ISA(sj_cpu_gemm)
#define sj_cpu_gemm_isa SJ_ISA(sj_cpu_gemm_isa)
#define sj_cpu_gemm_reference SJ_ISA(sj_cpu_gemm_reference)
#define sj_cpu_matmul SJ_ISA(sj_cpu_matmul)
#define sj_cpu_qk_norm_backward SJ_ISA(sj_cpu_qk_norm_backward)
#define sj_cpu_qk_norm_forward SJ_ISA(sj_cpu_qk_norm_forward)
#define sj_cpu_rmsnorm_backward SJ_ISA(sj_cpu_rmsnorm_backward)
#define sj_cpu_rmsnorm_forward SJ_ISA(sj_cpu_rmsnorm_forward)
#define sj_cpu_rope_backward SJ_ISA(sj_cpu_rope_backward)
#define sj_cpu_rope_forward SJ_ISA(sj_cpu_rope_forward)
#define sj_cpu_swiglu_backward SJ_ISA(sj_cpu_swiglu_backward)
#define sj_cpu_swiglu_forward SJ_ISA(sj_cpu_swiglu_forward)
#define sj_cpu_scan_forward SJ_ISA(sj_cpu_scan_forward)
#define sj_cpu_scan_backward SJ_ISA(sj_cpu_scan_backward)
#define sj_cpu_conv1d_silu_forward SJ_ISA(sj_cpu_conv1d_silu_forward)
#define sj_cpu_conv1d_silu_backward SJ_ISA(sj_cpu_conv1d_silu_backward)
#define sj_cpu_ssd_prep_forward SJ_ISA(sj_cpu_ssd_prep_forward)
#define sj_cpu_ssd_prep_backward SJ_ISA(sj_cpu_ssd_prep_backward)
#define sj_cpu_ssd_skip_forward SJ_ISA(sj_cpu_ssd_skip_forward)
#define sj_cpu_ssd_skip_backward SJ_ISA(sj_cpu_ssd_skip_backward)
#define sj_cpu_gated_rmsnorm_forward SJ_ISA(sj_cpu_gated_rmsnorm_forward)
#define sj_cpu_gated_rmsnorm_backward SJ_ISA(sj_cpu_gated_rmsnorm_backward)
#define sj_cpu_linear_prep_forward SJ_ISA(sj_cpu_linear_prep_forward)
#define sj_cpu_linear_prep_backward SJ_ISA(sj_cpu_linear_prep_backward)
#define sj_cpu_linear_norm_forward SJ_ISA(sj_cpu_linear_norm_forward)
#define sj_cpu_linear_norm_backward SJ_ISA(sj_cpu_linear_norm_backward)

/* General strided GEMM: C = op(A) op(B) (+ C if accum); lda/ldb/ldc are row
 * strides of the stored (untransposed) matrices. Multi-threaded. */
typedef void sj_cpu_gemm_fn(float *C, int ldc, const float *A, int lda, int transA,
                            const float *B, int ldb, int transB, int M, int N, int K, int accum);
sj_cpu_gemm_fn sj_cpu_gemm;
SJ_ISA_EXTERN(sj_cpu_gemm_fn, sj_cpu_gemm);
/* The simplest correct GEMM (serial, double accumulation): the reference
 * the fast one is tested against. */
sj_cpu_gemm_fn sj_cpu_gemm_reference;
SJ_ISA_EXTERN(sj_cpu_gemm_fn, sj_cpu_gemm_reference);
/* The microkernel's ISA ("avx512", "avx2" or "portable"), for benchmark reports. */
extern const char *const sj_cpu_gemm_isa;
SJ_ISA_EXTERN(const char *const, sj_cpu_gemm_isa);

void sj_cpu_matmul(float *C, const float *A, const float *B, int M, int N, int K,
                   int transA, int transB, int accum);
/* The table's kernels: activations are `void *` of act dtype (f32 here). */
void sj_cpu_embedding_forward(void *out, const void *tok, sj_dtype tok_dtype,
                              const void *emb, int N, int C);
void sj_cpu_embedding_backward(float *demb, const void *dout, const void *tok,
                               sj_dtype tok_dtype, int N, int C);
void sj_cpu_gather_rows_forward(void *out, const void *x, const int32_t *idx, int R, int C);
void sj_cpu_gather_rows_backward(void *dx, const void *dout, const int32_t *idx, int N, int R,
                                 int C, int accum);
void sj_cpu_rmsnorm_forward(void *out, float *rstd, const void *x, const void *w,
                            int N, int C, float eps);
void sj_cpu_rmsnorm_backward(void *dx, float *dw, const void *dout, const void *x,
                             const void *w, const float *rstd, int N, int C, int accum,
                             int dw_accum);
void sj_cpu_qk_norm_forward(void *out, float *rstd, const void *qkv, const void *wq,
                            const void *wk, int N, int H, int KV, int hd, float eps);
void sj_cpu_qk_norm_backward(void *dqkv, float *dwq, float *dwk, const void *dout,
                             const void *qkv, const void *wq, const void *wk,
                             const float *rstd, int N, int H, int KV, int hd, int accum,
                             int dw_accum);
void sj_cpu_rope_forward(void *out, const void *in, int B, int T, int n_heads,
                         int n_rot, int hd, int pos0, const sj_rope *rope);
void sj_cpu_rope_backward(void *din, const void *dout, int B, int T, int n_heads,
                          int n_rot, int hd, int pos0, const sj_rope *rope, int accum);
void sj_cpu_attention_forward(void *out, float *lse, const void *qkv,
                              int B, int T, int H, int KV, int hd, int window);
void sj_cpu_attention_backward(void *dqkv, const void *dout, const void *qkv,
                               const void *out, const float *lse,
                               int B, int T, int H, int KV, int hd, int window, int accum);
void sj_cpu_swiglu_forward(void *h, const void *gu, int N, int F, int act);
void sj_cpu_swiglu_backward(void *dgu, const void *dh, const void *gu, int N, int F, int act,
                            int accum);
void sj_cpu_add(void *out, const void *a, const void *b, int64_t n, float b_scale);
void sj_cpu_copy(void *dst, const void *src, int64_t n, float scale, int accum);
void sj_cpu_fill(float *x, float value, int64_t n);
void sj_cpu_mix_forward(void *out, const void *x, const void *y, int N, int ld, int c0, int w,
                        float a);
void sj_cpu_mix_backward(void *dx, void *dy, const void *dout, int N, int ld, int c0, int w,
                         float a, int accum_x, int accum_y);
void sj_cpu_pair_heads_forward(void *out, const void *in, int N, int n_heads, int hd);
void sj_cpu_pair_heads_backward(void *din, const void *dout, int N, int n_heads, int hd,
                                int accum);
void sj_cpu_cross_entropy_forward(float *losses, float *lse, const void *logits,
                                  const void *targets, sj_dtype tok_dtype, int N, int V,
                                  int ld, int ignore_index);
void sj_cpu_cross_entropy_backward(void *dlogits, const void *logits, const float *lse,
                                   const void *targets, sj_dtype tok_dtype, int N, int V,
                                   int ld, int ignore_index, const float *scale, int accum);
double sj_cpu_sumsq(const float *x, int64_t n);
void sj_cpu_sumsq_into(double *out, const float *x, int64_t n);
/* The global clip's gradient scale; *update = 0 when the norm is not finite. */
float sj_cpu_clip_scale(const sj_optim_hp *hp, int *update);
void sj_cpu_adamw(float *p, void *p_act, float *g, int zero_grads, float *m, float *v,
                  int64_t n, float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_lion(float *p, void *p_act, float *g, int zero_grads, float *m, int64_t n,
                 float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_sgd(float *p, void *p_act, float *g, int zero_grads, float *buf, int64_t n,
                float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_adafactor(float *p, void *p_act, float *g, int zero_grads, float *row, float *col,
                      int64_t rows, int64_t cols, float lr_mult, float wd, double *sums,
                      const sj_optim_hp *hp);
void sj_cpu_muon_momentum(float *u, float *buf, float *g, int zero_grads, int64_t n,
                          const sj_optim_hp *hp);
void sj_cpu_muon_normalize(void *x, const float *u, int64_t n, const double *sumsq, float eps);
void sj_cpu_muon_apply(float *p, void *p_act, const void *o, int64_t n, float lr_mult,
                       float ratio, float wd, const sj_optim_hp *hp);

/* scan.c, ssm.c: the chunked scan and Mamba-2's pieces (backend.h). */
void sj_cpu_scan_forward(void *y, const void *qk, const void *v, const void *a,
                         const sj_scan_dims *d, float scale);
void sj_cpu_scan_backward(void *dqk, void *dv, void *da, const void *dy, const void *qk,
                          const void *v, const void *a, const void *y, const sj_scan_dims *d,
                          float scale, int accum_qk, int accum_v, int accum_a);
void sj_cpu_conv1d_silu_forward(void *out, const void *x, const void *w, const void *bias,
                                int B, int T, int ld, int off, int W, int K);
void sj_cpu_conv1d_silu_backward(void *dx, float *dw, float *dbias, const void *dout,
                                 const void *x, const void *w, const void *bias, int B, int T,
                                 int ld, int off, int W, int K, int accum, int dw_accum);
void sj_cpu_ssd_prep_forward(void *v, void *a, const void *x, const void *dt_raw, const void *p,
                             int N, int H, int P, int ldx, int ld, int off);
void sj_cpu_ssd_prep_backward(void *dx, void *ddt_raw, float *dp, const void *dv, const void *da,
                              const void *x, const void *dt_raw, const void *p, int N, int H,
                              int P, int ldx, int ld, int off, int accum_x, int accum_dt,
                              int dw_accum);
void sj_cpu_ssd_skip_forward(void *out, const void *y, const void *x, const void *D, int N,
                             int H, int P, int ldx);
void sj_cpu_ssd_skip_backward(void *dy, void *dx, float *dD, const void *dout, const void *x,
                              const void *D, int N, int H, int P, int ldx, int accum_y,
                              int accum_x, int dw_accum);
void sj_cpu_gated_rmsnorm_forward(void *out, float *rstd, const void *y, const void *z,
                                  const void *w, int N, int Din, int G, int ld, int off, float eps);
void sj_cpu_gated_rmsnorm_backward(void *dy, void *dz, float *dw, const void *dout, const void *y,
                                   const void *z, const void *w, const float *rstd, int N, int Din,
                                   int G, int ld, int off, int accum_y, int accum_z, int dw_accum);
void sj_cpu_linear_prep_forward(void *u, void *a, const void *p, int N, int H, int hd, int feature,
                                int normalize);
void sj_cpu_linear_prep_backward(void *dp, const void *du, const void *da, const void *p, int N,
                                 int H, int hd, int feature, int normalize, int accum);
void sj_cpu_linear_norm_forward(void *out, const void *y, int N, int H, int hd, float eps);
void sj_cpu_linear_norm_backward(void *dy, const void *dout, const void *y, int N, int H, int hd,
                                 float eps, int accum);

#endif
