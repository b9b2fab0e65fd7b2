/* cpu.h — the CPU backend's kernels, one file per op family. */
#ifndef SJ_CPU_H
#define SJ_CPU_H

#include "../ops/backend.h"
#include <math.h>

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
#define sj_cpu_moe_route_forward SJ_ISA(sj_cpu_moe_route_forward)
#define sj_cpu_moe_route_backward SJ_ISA(sj_cpu_moe_route_backward)
#define sj_cpu_moe_permute_forward SJ_ISA(sj_cpu_moe_permute_forward)
#define sj_cpu_moe_permute_backward SJ_ISA(sj_cpu_moe_permute_backward)
#define sj_cpu_moe_unpermute_forward SJ_ISA(sj_cpu_moe_unpermute_forward)
#define sj_cpu_moe_unpermute_backward SJ_ISA(sj_cpu_moe_unpermute_backward)
#define sj_cpu_moe_matmul SJ_ISA(sj_cpu_moe_matmul)
#define sj_cpu_moe_matmul_wgrad SJ_ISA(sj_cpu_moe_matmul_wgrad)
#define sj_cpu_mla_pack_forward SJ_ISA(sj_cpu_mla_pack_forward)
#define sj_cpu_mla_pack_backward SJ_ISA(sj_cpu_mla_pack_backward)
#define sj_cpu_head_slice_forward SJ_ISA(sj_cpu_head_slice_forward)
#define sj_cpu_head_slice_backward SJ_ISA(sj_cpu_head_slice_backward)
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
void sj_cpu_moe_route_forward(void *weights, float *record, const void *logits, const void *bias,
                              int N, int E, int k, const sj_moe_route *route);
void sj_cpu_moe_route_backward(void *dlogits, float *bias_master, const void *dweights,
                               const void *logits, const void *weights, const float *record,
                               int N, int E, int k, const sj_moe_route *route, int accum);
void sj_cpu_moe_permute_forward(void *xp, const void *x, const float *record, int N, int E, int k,
                                int C);
void sj_cpu_moe_permute_backward(void *dx, const void *dxp, const float *record, int N, int E,
                                 int k, int C, int accum);
void sj_cpu_moe_unpermute_forward(void *y, const void *yp, const void *weights,
                                  const float *record, int N, int E, int k, int C);
void sj_cpu_moe_unpermute_backward(void *dyp, void *dweights, const void *dy, const void *yp,
                                   const void *weights, const float *record, int N, int E, int k,
                                   int C, int accum_yp, int accum_w);
void sj_cpu_moe_matmul(void *y, const void *x, const void *w, const float *record, int N, int E,
                       int k, int n, int K, int transB, int accum);
void sj_cpu_moe_matmul_wgrad(float *dw, const void *dy, const void *x, const float *record, int N,
                             int E, int k, int n, int K, int accum);
void sj_cpu_add(void *out, const void *a, const void *b, int64_t n, float b_scale);
void sj_cpu_copy(void *dst, const void *src, int64_t n, float scale, int accum);
void sj_cpu_fill(float *x, float value, int64_t n);
void sj_cpu_mix_forward(void *out, const void *x, const void *y, int N, int ld, int c0, int w,
                        float a);
void sj_cpu_mix_backward(void *dx, void *dy, const void *dout, int N, int ld, int c0, int w,
                         float a, int accum_x, int accum_y);
/* mla.c: backend.h's mla_pack and head_slice */
void sj_cpu_mla_pack_forward(void *out, const void *q, const void *kv, const void *kpe, int B,
                             int T, int H, int dn, int dr, int dv, const sj_rope *rope);
void sj_cpu_mla_pack_backward(void *dq, void *dkv, void *dkpe, const void *dout, int B, int T,
                              int H, int dn, int dr, int dv, const sj_rope *rope, int accum_q,
                              int accum_kv, int accum_kpe);
void sj_cpu_head_slice_forward(void *out, const void *in, int N, int H, int hd_in, int hd_out);
void sj_cpu_head_slice_backward(void *din, const void *dout, int N, int H, int hd_in, int hd_out,
                                int accum);
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

/* The elementwise rules walk their range block by block (SJ_Q8_BLOCK
 * elements; a q8 range starts on a block): load a block of state as f32,
 * update it, store it back. f32 state is updated in place (store: nothing
 * to do); bf16 and q8 are decoded into buf and coded back. */
/* The small vector loops the kernels share (the compiler vectorises them
 * for each ISA level). */
static inline float sj_dot(const float *a, const float *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void sj_axpy(float *y, float a, const float *x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static inline const float *sj_q8_map(int is_signed) {
    static const float map_signed[256] = SJ_Q8_SIGNED_MAP, map_unsigned[256] = SJ_Q8_UNSIGNED_MAP;
    return is_signed ? map_signed : map_unsigned;
}

static inline float *sj_cpu_state_load(const sj_state *s, int64_t i0, int cnt, float *buf) {
    switch (s->dtype) {
    case SJ_STATE_BF16:
        for (int k = 0; k < cnt; k++) buf[k] = sj_bf16_value(((const uint16_t *)s->data)[i0 + k]);
        return buf;
    case SJ_STATE_Q8: {
        const float *map = sj_q8_map(s->q8_signed), scale = s->absmax[i0 / SJ_Q8_BLOCK];
        for (int k = 0; k < cnt; k++) buf[k] = map[((const uint8_t *)s->data)[i0 + k]] * scale;
        return buf;
    }
    default: return (float *)s->data + i0;
    }
}

static inline void sj_cpu_state_store(const sj_state *s, int64_t i0, int cnt, const float *x,
                                      const sj_optim_hp *hp) {
    if (s->dtype == SJ_STATE_BF16) {
        for (int k = 0; k < cnt; k++)
            ((uint16_t *)s->data)[i0 + k] =
                sj_bf16_stochastic(x[k], sj_sr_bits(hp->state_seed, hp->step, s->index + i0 + k));
    } else if (s->dtype == SJ_STATE_Q8) {
        const float *map = sj_q8_map(s->q8_signed);
        float absmax = 0.0f;
        for (int k = 0; k < cnt; k++) absmax = fmaxf(absmax, fabsf(x[k]));
        s->absmax[i0 / SJ_Q8_BLOCK] = absmax;
        for (int k = 0; k < cnt; k++)
            ((uint8_t *)s->data)[i0 + k] = sj_q8_code(map, sj_q8_normalise(x[k], absmax));
    }
}
void sj_cpu_adamw(float *p, void *p_act, float *g, int zero_grads, sj_state m, sj_state v,
                  int64_t n, float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_lion(float *p, void *p_act, float *g, int zero_grads, sj_state m, int64_t n,
                 float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_sgd(float *p, void *p_act, float *g, int zero_grads, sj_state buf, int64_t n,
                float lr_mult, float wd, const sj_optim_hp *hp);
void sj_cpu_adafactor(float *p, void *p_act, float *g, int zero_grads, float *row, float *col,
                      int64_t rows, int64_t cols, float lr_mult, float wd, double *sums,
                      const sj_optim_hp *hp);
void sj_cpu_muon_momentum(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
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
