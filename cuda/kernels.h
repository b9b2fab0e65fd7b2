/* kernels.h — the CUDA launchers that fill the backend tables (backend.cu),
 * one f32, one bf16 and one f16 instance per op, with the signatures of backend.h.
 * C linkage; C++ only. */
#pragma once
#include "sj_cuda.h"

#define SJ_CU_DECLARE(T)                                                                  \
extern "C" {                                                                              \
void sj_cuda_matmul_##T(void *C, int ldc, const void *A, int lda, const void *B, int ldb, \
                        int M, int N, int K, int transA, int transB, int accum,           \
                        int c_f32);                                                       \
void sj_cuda_matmul_add_##T(void *D, const void *C, const void *A, const void *B, int M,  \
                            int N, int K, int transA, int transB);                        \
void sj_cuda_embedding_forward_##T(void *out, const void *tok, sj_dtype tok_dtype,        \
                                   const void *emb, int N, int C);                        \
void sj_cuda_embedding_backward_##T(float *demb, const void *dout, const void *tok,       \
                                    sj_dtype tok_dtype, int N, int C);                    \
void sj_cuda_gather_rows_forward_##T(void *out, const void *x, const int32_t *idx, int R,  \
                                     int C);                                              \
void sj_cuda_gather_rows_backward_##T(void *dx, const void *dout, const int32_t *idx,      \
                                      int N, int R, int C, int accum);                    \
void sj_cuda_rmsnorm_forward_##T(void *out, float *rstd, const void *x, const void *w,    \
                                 int N, int C, float eps);                                \
void sj_cuda_rmsnorm_backward_##T(void *dx, float *dw, const void *dout, const void *x,   \
                                  const void *w, const float *rstd, int N, int C,         \
                                  int accum, int dw_accum);                               \
void sj_cuda_qk_norm_forward_##T(void *out, float *rstd, const void *qkv, const void *wq, \
                                 const void *wk, int N, int H, int KV, int hd, float eps); \
void sj_cuda_qk_norm_backward_##T(void *dqkv, float *dwq, float *dwk, const void *dout,    \
                                  const void *qkv, const void *wq, const void *wk,         \
                                  const float *rstd, int N, int H, int KV, int hd,         \
                                  int accum, int dw_accum);                               \
void sj_cuda_rope_forward_##T(void *out, const void *in, int B, int T_, int n_heads,      \
                              int n_rot, int hd, int pos0, const sj_rope *rope);          \
void sj_cuda_rope_backward_##T(void *din, const void *dout, int B, int T_, int n_heads,   \
                               int n_rot, int hd, int pos0, const sj_rope *rope,          \
                               int accum);                                                \
void sj_cuda_attention_forward_##T(void *out, float *lse, const void *qkv, int B, int T_, \
                                   int H, int KV, int hd, int window);                    \
void sj_cuda_attention_backward_##T(void *dqkv, const void *dout, const void *qkv,        \
                                    const void *out, const float *lse, int B, int T_,     \
                                    int H, int KV, int hd, int window, int accum);        \
void sj_cuda_swiglu_forward_##T(void *h, const void *gu, int N, int F, int act);          \
int sj_cuda_matmul_swiglu_##T(void *h, void *gu, const void *x, const void *w, int N,     \
                              int F, int K, int act);                                     \
int sj_cuda_matmul_rope_##T(void *out, const void *x, const void *w, int B, int T_,       \
                            int n_heads, int n_rot, int hd, int K, const sj_rope *rope);  \
void sj_cuda_swiglu_backward_##T(void *dgu, const void *dh, const void *gu, int N, int F, \
                                 int act, int accum);                                     \
void sj_cuda_add_##T(void *out, const void *a, const void *b, int64_t n, float b_scale);  \
void sj_cuda_copy_##T(void *dst, const void *src, int64_t n, float scale, int accum);     \
void sj_cuda_mla_pack_forward_##T(void *out, const void *q, const void *kv, const void *kpe,  \
                                  int B, int T_, int H, int dn, int dr, int dv,             \
                                  const sj_rope *rope);                                     \
void sj_cuda_mla_pack_backward_##T(void *dq, void *dkv, void *dkpe, const void *dout, int B,  \
                                   int T_, int H, int dn, int dr, int dv,                   \
                                   const sj_rope *rope, int accum_q, int accum_kv,          \
                                   int accum_kpe);                                          \
void sj_cuda_head_slice_forward_##T(void *out, const void *in, int N, int H, int hd_in,      \
                                    int hd_out);                                            \
void sj_cuda_head_slice_backward_##T(void *din, const void *dout, int N, int H, int hd_in,   \
                                     int hd_out, int accum);                                \
void sj_cuda_pair_heads_forward_##T(void *out, const void *in, int N, int n_heads, int hd); \
void sj_cuda_pair_heads_backward_##T(void *din, const void *dout, int N, int n_heads,     \
                                     int hd, int accum);                                  \
void sj_cuda_mix_forward_##T(void *out, const void *x, const void *y, int N, int ld,      \
                             int c0, int w, float a);                                     \
void sj_cuda_mix_backward_##T(void *dx, void *dy, const void *dout, int N, int ld,        \
                              int c0, int w, float a, int accum_x, int accum_y);          \
void sj_cuda_cross_entropy_forward_##T(float *losses, float *lse, const void *logits,     \
                                       const void *targets, sj_dtype tok_dtype, int N,    \
                                       int V, int ld, int ignore_index);                  \
void sj_cuda_cross_entropy_backward_##T(void *dlogits, const void *logits,                \
                                        const float *lse, const void *targets,            \
                                        sj_dtype tok_dtype, int N, int V, int ld,         \
                                        int ignore_index, const float *scale, int accum); \
void sj_cuda_moe_route_forward_##T(void *weights, float *record, const void *logits,       \
                                   const void *bias, int N, int E, int k,                 \
                                   const sj_moe_route *route);                            \
void sj_cuda_moe_route_backward_##T(void *dlogits, float *bias_master, const void *dweights, \
                                    const void *logits, const void *weights,              \
                                    const float *record, int N, int E, int k,             \
                                    const sj_moe_route *route, int accum);                \
void sj_cuda_moe_permute_forward_##T(void *xp, const void *x, const float *record, int N,  \
                                     int E, int k, int C);                                \
void sj_cuda_moe_permute_backward_##T(void *dx, const void *dxp, const float *record,      \
                                      int N, int E, int k, int C, int accum);             \
void sj_cuda_moe_unpermute_forward_##T(void *y, const void *yp, const void *weights,       \
                                       const float *record, int N, int E, int k, int C);  \
void sj_cuda_moe_unpermute_backward_##T(void *dyp, void *dweights, const void *dy,         \
                                        const void *yp, const void *weights,              \
                                        const float *record, int N, int E, int k, int C,  \
                                        int accum_yp, int accum_w);                       \
void sj_cuda_moe_matmul_##T(void *y, const void *x, const void *w, const float *record,    \
                            int N, int E, int k, int n, int K, int transB, int accum);    \
void sj_cuda_moe_matmul_wgrad_##T(float *dw, const void *dy, const void *x,                \
                                  const float *record, int N, int E, int k, int n, int K, \
                                  int accum);                                             \
void sj_cuda_adamw_##T(float *p, void *p_act, float *g, int zero_grads, sj_state m,       \
                       sj_state v, int64_t n, float lr_mult, float wd,                      \
                       const sj_optim_hp *hp);                                            \
void sj_cuda_lion_##T(float *p, void *p_act, float *g, int zero_grads, sj_state m, int64_t n, \
                      float lr_mult, float wd, const sj_optim_hp *hp);                    \
void sj_cuda_sgd_##T(float *p, void *p_act, float *g, int zero_grads, sj_state buf,       \
                     int64_t n, float lr_mult, float wd, const sj_optim_hp *hp);          \
void sj_cuda_adafactor_##T(float *p, void *p_act, float *g, int zero_grads, float *row,   \
                           float *col, int64_t rows, int64_t cols, float lr_mult,         \
                           float wd, double *sums, const sj_optim_hp *hp);                \
void sj_cuda_muon_normalize_##T(void *x, const float *u, int64_t n, const double *sumsq,  \
                                float eps);                                               \
void sj_cuda_muon_apply_##T(float *p, void *p_act, const void *o, int64_t n,              \
                            float lr_mult, float ratio, float wd, const sj_optim_hp *hp); \
void sj_cuda_scan_forward_##T(void *y, const void *qk, const void *v, const void *a,      \
                              const sj_scan_dims *d, float scale);                        \
void sj_cuda_scan_backward_##T(void *dqk, void *dv, void *da, const void *dy,             \
                               const void *qk, const void *v, const void *a,              \
                               const void *y, const sj_scan_dims *d, float scale,         \
                               int accum_qk, int accum_v, int accum_a);                   \
void sj_cuda_conv1d_silu_forward_##T(void *out, const void *x, const void *w,             \
                                     const void *bias, int B, int T_, int ld, int off,    \
                                     int W, int K);                                       \
void sj_cuda_conv1d_silu_backward_##T(void *dx, float *dw, float *dbias, const void *dout, \
                                      const void *x, const void *w, const void *bias,     \
                                      int B, int T_, int ld, int off, int W, int K,       \
                                      int accum, int dw_accum);                           \
void sj_cuda_ssd_prep_forward_##T(void *v, void *a, const void *x, const void *dt_raw,    \
                                  const void *p, int N, int H, int P, int ldx, int ld,    \
                                  int off);                                               \
void sj_cuda_ssd_prep_backward_##T(void *dx, void *ddt_raw, float *dp, const void *dv,    \
                                   const void *da, const void *x, const void *dt_raw,     \
                                   const void *p, int N, int H, int P, int ldx, int ld,   \
                                   int off, int accum_x, int accum_dt, int dw_accum);     \
void sj_cuda_ssd_skip_forward_##T(void *out, const void *y, const void *x, const void *D, \
                                  int N, int H, int P, int ldx);                          \
void sj_cuda_ssd_skip_backward_##T(void *dy, void *dx, float *dD, const void *dout,       \
                                   const void *x, const void *D, int N, int H, int P,     \
                                   int ldx, int accum_y, int accum_x, int dw_accum);      \
void sj_cuda_gated_rmsnorm_forward_##T(void *out, float *rstd, const void *y,             \
                                       const void *z, const void *w, int N, int Din,      \
                                       int G, int ld, int off, float eps);                \
void sj_cuda_gated_rmsnorm_backward_##T(void *dy, void *dz, float *dw, const void *dout,  \
                                        const void *y, const void *z, const void *w,      \
                                        const float *rstd, int N, int Din, int G, int ld, \
                                        int off, int accum_y, int accum_z, int dw_accum); \
void sj_cuda_linear_prep_forward_##T(void *u, void *a, const void *p, int N, int H,       \
                                     int hd, int feature, int normalize);                 \
void sj_cuda_linear_prep_backward_##T(void *dp, const void *du, const void *da,           \
                                      const void *p, int N, int H, int hd, int feature,   \
                                      int normalize, int accum);                          \
void sj_cuda_linear_norm_forward_##T(void *out, const void *y, int N, int H, int hd,      \
                                     float eps);                                          \
void sj_cuda_linear_norm_backward_##T(void *dy, const void *dout, const void *y, int N,   \
                                      int H, int hd, float eps, int accum);               \
}

SJ_CU_DECLARE(f32)
SJ_CU_DECLARE(bf16)
SJ_CU_DECLARE(f16)

extern "C" {
void sj_cuda_fill(float *x, float value, int64_t n);
void sj_cuda_convert(void *dst, sj_dtype dst_dtype, const void *src, sj_dtype src_dtype,
                     int64_t n);
void sj_cuda_sumsq(double *out, const float *x, int64_t n);
void sj_cuda_muon_momentum(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
                           const sj_optim_hp *hp);
/* The Hopper attention (head_dim 64); 0 where it does not apply. */
int sj_cuda_attention_forward_sm90_bf16(void *out, float *lse, const void *qkv, int B, int T_,
                                        int H, int KV, int hd, int window);
int sj_cuda_attention_forward_sm90_f16(void *out, float *lse, const void *qkv, int B, int T_,
                                       int H, int KV, int hd, int window);
int sj_cuda_attention_backward_sm90_bf16(void *dqkv, const void *dout, const void *qkv,
                                         const float *D, const float *lse, int B, int T_, int H,
                                         int KV, int hd, int window, int accum);
int sj_cuda_attention_backward_sm90_f16(void *dqkv, const void *dout, const void *qkv,
                                        const float *D, const float *lse, int B, int T_, int H,
                                        int KV, int hd, int window, int accum);
/* dw: (C) (+)= the sum over the n rows of part: (n, C), in a fixed order
 * (rmsnorm.cu; every norm's weight gradient). */
void sj_cuda_dw_reduce(float *dw, const float *part, int n, int C, int dw_accum);
/* Once per process, before any capture: raise shared-memory limits. */
void sj_cuda_attention_init(void);
void sj_cuda_matmul_init(void);
}
