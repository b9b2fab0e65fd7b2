/* backend.h — the line between ops and devices: one table of kernels per
 * backend. Above it (tape, model, train) nothing knows which device runs.
 * Valid C and C++ (the CUDA backend defines tables of this type).
 *
 * Argument order: outputs first, then inputs, then dims (B, T, C ...).
 * Backward kernels with an `accum` flag add into their input-gradient when
 * it is set and overwrite it otherwise (the tape plans which); parameter
 * gradients likewise (matmul's C with c_f32, rmsnorm's dw_accum), except
 * the embedding's, which is always added into.
 *
 * Precision: activations, activation gradients and the compute copy of the
 * weights are of the backend's act_dtype (`void *` below: f32 on the CPU,
 * bf16, f16 or f32 on CUDA). Master weights, parameter gradients and saved
 * statistics (rstd, lse, per-row losses) are always f32 (`float *`); the
 * optimizers' elementwise state is an sj_state (ops/ostate.h: f32, bf16 or
 * 8 bits), its math f32.
 * Every reduction accumulates in f32 (or wider).
 *
 * Device backends (device != 0) take pointers to device memory, run on the
 * stream bound with bind(), and never synchronise inside a kernel call, so a
 * whole step can be captured as a graph. Scalars that change from step to
 * step (loss scale, lr, step count) are therefore passed by pointer into
 * backend memory, never by value. Token tensors on a device backend are
 * always int32 and, for the embedding, followed by N more int32: the row
 * indices stably sorted by token (the host prepares both; see model.c), so
 * that the embedding gradient is a deterministic segmented sum. */
#ifndef SJ_BACKEND_H
#define SJ_BACKEND_H

#include "../smedjan.h"
#include <math.h>
#include "ostate.h"
#ifndef __cplusplus
#include "../core/core.h"   /* C side: errors, threads, rng */
#include "../core/isa.h"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The optimizers' hyper-parameters and the global grad norm, in backend
 * memory so that a captured step reads this step's values. The host sets
 * everything above `sumsq`; sumsq is written by the backend's sumsq; the
 * update kernels read all of it. Per-tensor settings (lr multiplier,
 * weight decay) are kernel arguments: they never change for a graph. */
typedef struct {
    float lr;            /* the schedule's; each call scales it by its lr_mult */
    float beta1, beta2, eps;     /* AdamW, Lion; Adafactor: eps = eps1 */
    float clip;          /* global grad-norm clip; <= 0 disables */
    float momentum, dampening;   /* SGD; Muon: momentum */
    /* 1 - beta1, 1 - beta2, 1 - momentum, 1 - dampening formed in double on
     * the host and rounded once, as torch forms a step's alpha */
    float one_minus_beta1, one_minus_beta2, one_minus_momentum, one_minus_dampening;
    int nesterov;                /* SGD, Muon */
    float beta2_decay, eps2, d;  /* Adafactor */
    uint64_t state_seed;         /* bf16 state's rounding (ops/ostate.h) */
    int64_t step;        /* 1-based number of this update */
    double sumsq;        /* sum of squared gradients */
} sj_optim_hp;

/* RoPE as the kernels apply it: pair i of a head (i, i + hd/2) turns by
 * position * inv_freq[i], cos and sin scaled by mscale (transformers'
 * attention_scaling: YaRN's temperature, 1 otherwise). Built on the host by
 * sj_rope_init; kernels read it when launched (device kernels copy it into
 * their launch parameters), so the caller keeps it alive only for the call. */
enum { SJ_ROPE_MAX_PAIRS = 128 };   /* head dims up to 256 */
typedef struct {
    int n_pairs;          /* head dim / 2 */
    float mscale;
    float inv_freq[SJ_ROPE_MAX_PAIRS];
} sj_rope;

/* The host kernels' turn (CPU training, the CPU engine): cos and sin of
 * position pos for the first n pairs, in float as transformers' fp32 path
 * (sin negated: the inverse turn); then y = x turned, rotate-half pairs (i,
 * i + half), accum adding (y may be x). */
static inline void sj_rope_angles(const sj_rope *r, int pos, int inverse, int n, float *cs,
                                  float *sn) {
    for (int i = 0; i < n; i++) {
        const float a = (float)pos * r->inv_freq[i];
        cs[i] = cosf(a) * r->mscale;
        sn[i] = (inverse ? -sinf(a) : sinf(a)) * r->mscale;
    }
}

static inline void sj_rope_turn(float *y, const float *x, const float *cs, const float *sn,
                                int half, int accum) {
    for (int i = 0; i < half; i++) {
        const float a = x[i] * cs[i] - x[i + half] * sn[i];
        const float b = x[i + half] * cs[i] + x[i] * sn[i];
        y[i] = accum ? y[i] + a : a;
        y[i + half] = accum ? y[i + half] + b : b;
    }
}

/* The config's RoPE (default, linear, dynamic NTK, YaRN) for a run of
 * seq_len positions, in transformers' float32 arithmetic (rope_freqs.c).
 * Dynamic scaling grows the base only once seq_len passes the original
 * context, as transformers' dynamic update does. */
sj_status sj_rope_init(sj_rope *r, const sj_config *c, int seq_len);
/* ... for heads of hd rotated dims (mla's qk_rope_head_dim); the above is
 * hd = dim / n_heads. */
sj_status sj_rope_init_hd(sj_rope *r, const sj_config *c, int seq_len, int hd);

/* A MoE layer's routing as its kernels apply it (the config's moe fields),
 * built on the host and kept alive by the model as long as its tapes, like
 * sj_rope. stats: (2 + E) f32 in backend memory, outside any arena (they
 * outlive the run): the aux (switch) loss, the z-loss, then the tokens
 * routed to each expert, written by every forward. */
typedef struct {
    int router;           /* SJ_MOE_SOFTMAX, SJ_MOE_SIGMOID */
    int norm_topk;        /* weights renormalised over the chosen k (sigmoid: always) */
    float aux_coef, z_coef, bias_rate;
    float *stats;
} sj_moe_route;

/* The routing record a route forward writes (one f32 tensor, int32 views):
 * scores (N, E) f32 (softmax probabilities or sigmoids); expert (N, k) int32,
 * token t's choices best first (ties: the lower expert); offsets (E + 1)
 * int32, expert e's rows of the permuted order are [offsets[e], offsets[e+1]);
 * slot (N k) int32, permuted row r holds choice slot[r] = t k + j (rows of
 * one expert in slot order: a stable counting sort, the same every run);
 * row (N k) int32, the inverse: choice t k + j sits at permuted row row[t k + j]. */
typedef struct { float *scores; int32_t *expert, *offsets, *slot, *row; } sj_moe_record;
static inline int64_t sj_moe_record_numel(int64_t N, int64_t E, int64_t k) {
    return N * E + 3 * N * k + E + 1;
}
static inline sj_moe_record sj_moe_record_at(const void *base, int64_t N, int64_t E, int64_t k) {
    float *f = (float *)base;
    int32_t *i = (int32_t *)(f + N * E);
    sj_moe_record r = { f, i, i + N * k, i + N * k + E + 1, i + 2 * N * k + E + 1 };
    return r;
}

/* The chunked scan's shape (scan_forward below). */
typedef struct {
    int B, T, H, G, dk, dv;
    int ld_qk, q_off, k_off;     /* q of group g at q_off + g*dk of a row of ld_qk; k likewise */
    int ld_v, v_off;             /* v of head h at v_off + h*dv of a row of ld_v */
    int chunk;                   /* tokens per chunk */
} sj_scan_dims;

typedef struct sj_backend {
    const char *name;
    sj_dtype act_dtype;   /* activations, their grads, compute copy of weights */
    int device;           /* 0: host memory; 1: CUDA device memory */

    /* memory: alloc returns NULL with the error set (naming the bytes). */
    void *(*alloc)(size_t bytes, const char *what);
    void (*free)(void *p);
    void (*fill)(float *x, float value, int64_t n);
    /* Synchronous copies between host and backend memory. */
    void (*to_host)(void *dst, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *src, size_t bytes);
    /* Copies on the bound stream (capturable); host memory must be pinned
     * (allocated with host_alloc) on device backends. */
    void (*to_host_async)(void *dst, const void *src, size_t bytes);
    void (*from_host_async)(void *dst, const void *src, size_t bytes);
    /* dst (dst_dtype) = src (src_dtype), n elements, f32 <-> act dtype. */
    void (*convert)(void *dst, sj_dtype dst_dtype, const void *src, sj_dtype src_dtype,
                    int64_t n);

    /* C(M,N) = op(A) op(B) (+ C if accum). A is (M,K), or (K,M) when
     * transA; B is (K,N), or (N,K) when transB. Row-major, rows ldc, lda,
     * ldb elements apart (sj_matmul below: packed). A and B are act dtype;
     * C is f32 when c_f32 (parameter gradients), else act. */
    void (*matmul)(void *C, int ldc, const void *A, int lda, const void *B, int ldb, int M,
                   int N, int K, int transA, int transB, int accum, int c_f32);
    /* D(M,N) = op(A) op(B) + C, all act dtype: the residual add fused into
     * the GEMM (cuBLASLt's epilogue reads C; D may be C, never partly). */
    void (*matmul_add)(void *D, const void *C, const void *A, const void *B, int M, int N,
                       int K, int transA, int transB);

    /* out: (N, C) = emb[tok]; demb: (V, C) += scatter of dout. */
    void (*embedding_forward)(void *out, const void *tok, sj_dtype tok_dtype,
                              const void *emb, int N, int C);
    void (*embedding_backward)(float *demb, const void *dout, const void *tok,
                               sj_dtype tok_dtype, int N, int C);
    /* Rows by index (the sparse loss's label rows): x: (N, C) -> out: (R, C),
     * out[r] = x[idx[r]], a zero row where idx[r] < 0 (padding); idx: (R)
     * int32 in backend memory, its entries >= 0 distinct. Backward: dout
     * row r goes back to dx row idx[r] (added with accum; else every other
     * row of dx is zeroed); padding entries touch nothing. */
    void (*gather_rows_forward)(void *out, const void *x, const int32_t *idx, int R, int C);
    void (*gather_rows_backward)(void *dx, const void *dout, const int32_t *idx, int N, int R,
                                 int C, int accum);

    /* out, x: (N, C); rstd: (N); w: (C). */
    void (*rmsnorm_forward)(void *out, float *rstd, const void *x, const void *w,
                            int N, int C, float eps);
    void (*rmsnorm_backward)(void *dx, float *dw, const void *dout, const void *x,
                             const void *w, const float *rstd, int N, int C, int accum,
                             int dw_accum);

    /* Per-head RMSNorm of q and k (Qwen3's q_norm and k_norm, before RoPE).
     * qkv, out: (N, (H + 2*KV)*hd), q heads then k then v; each q head's hd
     * values become x * rstd * wq, each k head's x * rstd * wk, v heads are
     * copied (dv = dout). rstd: (N, H + KV), q heads then k. wq, wk: (hd),
     * dwq, dwk: (hd); all four NULL for no gain ("plain"). out may be qkv;
     * dqkv may be dout (accum 0). */
    void (*qk_norm_forward)(void *out, float *rstd, const void *qkv, const void *wq,
                            const void *wk, int N, int H, int KV, int hd, float eps);
    void (*qk_norm_backward)(void *dqkv, float *dwq, float *dwk, const void *dout,
                             const void *qkv, const void *wq, const void *wk,
                             const float *rstd, int N, int H, int KV, int hd, int accum,
                             int dw_accum);

    /* Rotate-half RoPE on the first n_rot heads of each row of n_heads heads
     * of size hd (rope->n_pairs == hd/2); the remaining heads are copied. Row
     * r of batch b has position pos0 + (r % T). out, in: (B, T, n_heads*hd).
     * out may be in (din may be dout, accum 0): then only the rotated heads
     * are touched. Backward: din = mscale * R^T dout. */
    void (*rope_forward)(void *out, const void *in, int B, int T, int n_heads,
                         int n_rot, int hd, int pos0, const sj_rope *rope);
    void (*rope_backward)(void *din, const void *dout, int B, int T, int n_heads,
                          int n_rot, int hd, int pos0, const sj_rope *rope, int accum);

    /* Causal attention over qkv: (B, T, (H + 2*KV)*hd), q heads then k then v.
     * out: (B, T, H*hd); lse: (B, H, T) log-sum-exp of each score row.
     * window 0: query t sees every key s <= t. window > 0 (sliding window,
     * Mistral's and transformers' sliding_window): query t sees the window
     * keys t - window < s <= t, itself included; work is linear in T. */
    void (*attention_forward)(void *out, float *lse, const void *qkv,
                              int B, int T, int H, int KV, int hd, int window);
    void (*attention_backward)(void *dqkv, const void *dout, const void *qkv,
                               const void *out, const float *lse,
                               int B, int T, int H, int KV, int hd, int window, int accum);

    /* The gated FFN activation ("swiglu" after its first kind): gu: (N, 2F)
     * = [gate | up] -> h: (N, F) = act(gate) * up, act by SJ_FFN_*: silu
     * (SwiGLU) or relu^2 (relu2). */
    void (*swiglu_forward)(void *h, const void *gu, int N, int F, int act);
    void (*swiglu_backward)(void *dgu, const void *dh, const void *gu, int N, int F, int act,
                            int accum);

    /* Fused projections, optional: NULL, or 0 returned where a backend has no
     * kernel for the shape (the op then runs the matmul and the elementwise
     * kernel apart). h: (N, F) = swiglu(gu, act), gu = x @ w^T, x: (N, K),
     * w: (2F, K) = [gate | up] rows; gu: (N, 2F) is stored too unless NULL
     * (training keeps it for backward). out: (B, T, n_heads*hd) =
     * rope_forward(x @ w^T) with pos0 = 0. */
    int (*matmul_swiglu)(void *h, void *gu, const void *x, const void *w, int N, int F, int K,
                         int act);
    int (*matmul_rope)(void *out, const void *x, const void *w, int B, int T, int n_heads,
                       int n_rot, int hd, int K, const sj_rope *rope);

    /* out = a + b_scale * b; dst (+)= scale * src (act dtype; a factor of 1
     * gives the plain sum and copy bit for bit). */
    void (*add)(void *out, const void *a, const void *b, int64_t n, float b_scale);
    void (*copy)(void *dst, const void *src, int64_t n, float scale, int accum);

    /* Paired heads: in: (N, n_heads*hd), n_heads even -> out: (N, n_heads/2*hd),
     * out head j = (in head 2j + in head 2j+1) / 2; din (+)= dout / 2 into both. */
    void (*pair_heads_forward)(void *out, const void *in, int N, int n_heads, int hd);
    void (*pair_heads_backward)(void *din, const void *dout, int N, int n_heads, int hd,
                                int accum);
    /* Mix (value mix): x, y, out: (N, ld); out = x except columns [c0, c0+w)
     * of each row, which are (1 - a) x + a y. out may be x: then only the
     * slice is written. Backward: dx (+)= dout off the slice and (1 - a) dout
     * on it; dy (+)= a dout on the slice, and, unless accum_y, 0 off it (the
     * whole gradient is defined). Either gradient may be NULL; dx may be dout
     * when accum_x is 0 (then only its slice is rewritten). */
    void (*mix_forward)(void *out, const void *x, const void *y, int N, int ld, int c0, int w,
                        float a);
    void (*mix_backward)(void *dx, void *dy, const void *dout, int N, int ld, int c0, int w,
                         float a, int accum_x, int accum_y);

    /* logits: (N, ld), of which the first V columns are the vocabulary
     * (ld >= V: a row stride that keeps rows aligned; the columns past V
     * are neither read nor written); targets (N) of tok_dtype; losses,
     * lse: (N). Rows whose target == ignore_index get loss 0 and zero
     * gradient. dlogits (N, ld) = *scale * (softmax - onehot); dlogits may
     * be logits itself (in place) when accum is 0. */
    void (*cross_entropy_forward)(float *losses, float *lse, const void *logits,
                                  const void *targets, sj_dtype tok_dtype, int N, int V,
                                  int ld, int ignore_index);
    void (*cross_entropy_backward)(void *dlogits, const void *logits, const float *lse,
                                   const void *targets, sj_dtype tok_dtype, int N, int V,
                                   int ld, int ignore_index, const float *scale, int accum);

    /* Mixture of experts (sj_moe_route, sj_moe_record above); R = N k permuted rows.
     * Route: logits (N, E) -> record, weights (N, k) (act dtype) and the stats.
     * Softmax: p = softmax(logits), the top k of p, w = p (norm_topk: / their sum).
     * Sigmoid: s = sigmoid(logits), the top k of s + bias, w = s / their sum.
     * bias: (E) act dtype or NULL (softmax). Aux loss E/N^2 sum_e count_e sum_t
     * q_te, q = p (sigmoid: s / sum_e s); z-loss mean_t logsumexp(logits_t)^2.
     * Backward: dlogits (+)= d(logits) of sum w dweights + aux_coef aux + z_coef z;
     * with a bias_master (f32, sigmoid) and bias_rate > 0 it also moves the
     * bias by bias_rate * sign(mean load - load_e). */
    void (*moe_route_forward)(void *weights, float *record, const void *logits, const void *bias,
                              int N, int E, int k, const sj_moe_route *route);
    void (*moe_route_backward)(void *dlogits, float *bias_master, const void *dweights,
                               const void *logits, const void *weights, const float *record,
                               int N, int E, int k, const sj_moe_route *route, int accum);
    /* Permute: xp (R, C), row r = x[slot[r] / k]. Backward: dx (+)= the sum
     * of each token's k rows of dxp. */
    void (*moe_permute_forward)(void *xp, const void *x, const float *record, int N, int E, int k,
                                int C);
    void (*moe_permute_backward)(void *dx, const void *dxp, const float *record, int N, int E,
                                 int k, int C, int accum);
    /* Un-permute: y (N, C) = sum_j weights[t, j] yp[row[t k + j]]. Backward:
     * dyp = weights dy (accum_yp: +=), dweights (+)= dot(dy_t, yp row). */
    void (*moe_unpermute_forward)(void *y, const void *yp, const void *weights,
                                  const float *record, int N, int E, int k, int C);
    void (*moe_unpermute_backward)(void *dyp, void *dweights, const void *dy, const void *yp,
                                   const void *weights, const float *record, int N, int E, int k,
                                   int C, int accum_yp, int accum_w);
    /* Grouped GEMM over the experts' row groups: y (R, n) (+)= x (R, K) op(W_e)
     * for each expert e's rows; w: (E, n, K) when transB (the forward: x W_e^T),
     * (E, K, n) otherwise (dx = dy W_e). wgrad: dw (E, n, K) f32 (+)= dy_e^T x_e
     * per expert (an expert without rows gets zeros unless accum). */
    void (*moe_matmul)(void *y, const void *x, const void *w, const float *record, int N, int E,
                       int k, int n, int K, int transB, int accum);
    void (*moe_matmul_wgrad)(float *dw, const void *dy, const void *x, const float *record,
                             int N, int E, int k, int n, int K, int accum);

    /* *out = sum of x^2 in double, in a fixed order (the same bits every run). */
    void (*sumsq)(double *out, const float *x, int64_t n);

    /* The update rules over one range of the flat buffers (a tensor, or
     * tensors that share settings). Common to all: gradients scaled by
     * min(1, clip / (sqrt(hp->sumsq) + 1e-6)) when clip > 0; when sumsq is
     * not finite nothing is updated; with zero_grads the gradients are
     * zeroed either way; p_act (act dtype, may be NULL) receives the new
     * weights; lr = hp->lr * lr_mult; wd is the range's weight decay.
     * p, g: (n) f32; an sj_state: (n) of its dtype, decoded, updated in
     * f32 and coded back block by block (a skipped step leaves it as it
     * was, bit for bit); Adafactor's row and col: f32. */
    /* AdamW (torch.optim.AdamW): decoupled decay p *= 1 - lr wd. */
    void (*adamw)(float *p, void *p_act, float *g, int zero_grads, sj_state m, sj_state v,
                  int64_t n, float lr_mult, float wd, const sj_optim_hp *hp);
    /* Lion (lion-pytorch 0.2.5): p *= 1 - lr wd; p -= lr sign(b1 m + (1-b1) g);
     * m = b2 m + (1-b2) g. */
    void (*lion)(float *p, void *p_act, float *g, int zero_grads, sj_state m, int64_t n,
                 float lr_mult, float wd, const sj_optim_hp *hp);
    /* SGD (torch.optim.SGD): L2 decay g += wd p; momentum buffer (data NULL when
     * momentum is 0) = g at step 1, else momentum buf + (1-dampening) g;
     * nesterov: g + momentum buf. */
    void (*sgd)(float *p, void *p_act, float *g, int zero_grads, sj_state buf, int64_t n,
                float lr_mult, float wd, const sj_optim_hp *hp);
    /* Adafactor (torch.optim.Adafactor) over one tensor: (rows, cols), with
     * row (rows) and col (cols) factored second moments; a vector when cols
     * is 0, row then (rows) holding its full second moment and col NULL.
     * sums: 3 + rows doubles of backend scratch (the tensor's reductions). */
    void (*adafactor)(float *p, void *p_act, float *g, int zero_grads, float *row, float *col,
                      int64_t rows, int64_t cols, float lr_mult, float wd, double *sums,
                      const sj_optim_hp *hp);
    /* Muon (torch.optim.Muon) over one matrix, in three parts around the
     * Newton-Schulz GEMMs: momentum buf = lerp(buf, g, 1 - momentum), u =
     * nesterov ? lerp(g, buf, momentum) : buf (u written even when the step
     * is skipped; buf is not); x (act) = u / max(sqrt(*sumsq), eps); and
     * p = p (1 - lr wd) - lr ratio o, o (act) the orthogonalised update. */
    void (*muon_momentum)(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
                          const sj_optim_hp *hp);
    void (*muon_normalize)(void *x, const float *u, int64_t n, const double *sumsq, float eps);
    void (*muon_apply)(float *p, void *p_act, const void *o, int64_t n, float lr_mult,
                       float ratio, float wd, const sj_optim_hp *hp);

    /* Multi-head latent attention's heads in attention's qkv layout
     * (model/mla.c): q: (B, T, H*(dn+dr)), per head (q_nope, q_pe); kv: (B, T,
     * H*(dn+dv)), per head (k_nope, v); kpe: (B, T, dr), the key shared by
     * every head. out: (B, T, 3*H*(dn+dr)): q heads (q_nope, rot(q_pe)), then
     * k heads (k_nope, rot(kpe)), then v heads (v, dn+dr-dv zeros); rot is
     * rope_forward's turn of dr = 2 rope->n_pairs values at position r % T.
     * Backward: dq, dkv, dkpe (each may be NULL) from dout, added into with
     * their accum flag; dkpe sums the k heads. */
    void (*mla_pack_forward)(void *out, const void *q, const void *kv, const void *kpe, int B,
                             int T, int H, int dn, int dr, int dv, const sj_rope *rope);
    void (*mla_pack_backward)(void *dq, void *dkv, void *dkpe, const void *dout, int B, int T,
                              int H, int dn, int dr, int dv, const sj_rope *rope, int accum_q,
                              int accum_kv, int accum_kpe);
    /* in: (N, H*hd_in) -> out: (N, H*hd_out), each head's first hd_out
     * values (hd_out <= hd_in). Backward: din (+)= dout there; without
     * accum the rest of din is zeroed. */
    void (*head_slice_forward)(void *out, const void *in, int N, int H, int hd_in, int hd_out);
    void (*head_slice_backward)(void *din, const void *dout, int N, int H, int hd_in, int hd_out,
                                int accum);

    /* The chunked scan (Mamba-2's SSD, linear attention), per head h of H:
     *   y_t = scale sum_{s<=t} exp(c_t - c_s) (q_t . k_s) v_s, c_t = sum_{r<=t} a_r
     * over each sequence of T tokens; q and k of group h / (H / G). qk: rows
     * of ld_qk elements, q of group g at q_off + g dk, k at k_off + g dk; v:
     * rows of ld_v, head h at v_off + h dv; a: (B*T, H) log decays (<= 0 for
     * a decay), or NULL for none; y: (B*T, H*dv). Chunks of `chunk` tokens
     * (any T). Backward, given y (the forward's output): dqk (+)= on the q and
     * k slices and, unless accum_qk, zero elsewhere in its rows (dv likewise);
     * da (B*T, H) (+)=. dqk, dv, da may be NULL (not wanted). */
    void (*scan_forward)(void *y, const void *qk, const void *v, const void *a,
                         const sj_scan_dims *d, float scale);
    void (*scan_backward)(void *dqk, void *dv, void *da, const void *dy, const void *qk,
                          const void *v, const void *a, const void *y, const sj_scan_dims *d,
                          float scale, int accum_qk, int accum_v, int accum_a);

    /* Mamba-2's pieces around the scan (x: rows of ld, a slice of W channels
     * at off; its gradient (+)= on the slice and, unless accum, zero elsewhere
     * in its rows; parameter gradients f32 (+)= with dw_accum).
     * conv1d_silu: causal depthwise convolution of kernel K with bias, then
     * SiLU: out[t, c] = silu(bias[c] + sum_j w[c, j] x[t - K + 1 + j, c]) within
     * each sequence of T rows (earlier rows are zeros); out: (B*T, W), w: (W, K). */
    void (*conv1d_silu_forward)(void *out, const void *x, const void *w, const void *bias,
                                int B, int T, int ld, int off, int W, int K);
    void (*conv1d_silu_backward)(void *dx, float *dw, float *dbias, const void *dout,
                                 const void *x, const void *w, const void *bias, int B, int T,
                                 int ld, int off, int W, int K, int accum, int dw_accum);
    /* ssd_prep: dt = softplus(dt_raw + dt_bias), A = -exp(A_log) per head;
     * v = x dt (x: the H*P columns at 0 of rows of ldx), a = dt A. dt_raw: the
     * H columns at off of rows of ld; p: (2H) = [dt_bias | A_log]. v: (N, H*P),
     * a: (N, H). */
    void (*ssd_prep_forward)(void *v, void *a, const void *x, const void *dt_raw, const void *p,
                             int N, int H, int P, int ldx, int ld, int off);
    void (*ssd_prep_backward)(void *dx, void *ddt_raw, float *dp, const void *dv, const void *da,
                              const void *x, const void *dt_raw, const void *p, int N, int H,
                              int P, int ldx, int ld, int off, int accum_x, int accum_dt,
                              int dw_accum);
    /* ssd_skip: out = y + D_h x (per head of P channels; x: the H*P columns at
     * 0 of rows of ldx); y, out: (N, H*P); D: (H). dy (+)= dout. */
    void (*ssd_skip_forward)(void *out, const void *y, const void *x, const void *D, int N,
                             int H, int P, int ldx);
    void (*ssd_skip_backward)(void *dy, void *dx, float *dD, const void *dout, const void *x,
                              const void *D, int N, int H, int P, int ldx, int accum_y,
                              int accum_x, int dw_accum);
    /* gated_rmsnorm (transformers' Mamba2RMSNormGated): u = y silu(z), each
     * group of Din/G channels RMS-normalised, times w. y, out: (N, Din); z:
     * the Din columns at off of rows of ld; rstd: (N, G); w: (Din). */
    void (*gated_rmsnorm_forward)(void *out, float *rstd, const void *y, const void *z,
                                  const void *w, int N, int Din, int G, int ld, int off, float eps);
    void (*gated_rmsnorm_backward)(void *dy, void *dz, float *dw, const void *dout, const void *y,
                                   const void *z, const void *w, const float *rstd, int N, int Din,
                                   int G, int ld, int off, int accum_y, int accum_z, int dw_accum);

    /* Linear attention around the scan. linear_prep: p: (N, 3 H hd [+ H]) = [q |
     * k | v | g] -> u: (N, 2 H hd + H dv) = [phi(q) | phi(k) | v heads, each with
     * a 1 appended when normalize (dv = hd + 1; else hd)], phi by
     * SJ_LINEAR_* (identity, elu + 1); a: (N, H) = log sigmoid(g), or NULL (no
     * gate: p has no g). linear_norm: y: (N, H, hd + 1) -> out: (N, H hd) =
     * y[..hd] / (y[hd] + eps). Backward: dp, dy (+)= with accum. */
    void (*linear_prep_forward)(void *u, void *a, const void *p, int N, int H, int hd,
                                int feature, int normalize);
    void (*linear_prep_backward)(void *dp, const void *du, const void *da, const void *p, int N,
                                 int H, int hd, int feature, int normalize, int accum);
    void (*linear_norm_forward)(void *out, const void *y, int N, int H, int hd, float eps);
    void (*linear_norm_backward)(void *dy, const void *dout, const void *y, int N, int H, int hd,
                                 float eps, int accum);

    /* ---- device plumbing (trivial on the CPU) ---- */
    /* A context = a stream plus its scratch and GEMM workspace. bind() makes
     * it current for this thread's following kernel calls. */
    void *(*ctx_create)(void);
    void (*ctx_free)(void *ctx);
    void (*bind)(void *ctx);
    /* Wait for the bound stream; report any kernel or launch error. */
    sj_status (*sync)(void);
    /* Pinned host memory for async copies. */
    void *(*host_alloc)(size_t bytes, const char *what);
    void (*host_free)(void *p);
    /* Capture the bound stream's work into a replayable graph. */
    sj_status (*capture_begin)(void);
    sj_status (*capture_end)(void **graph);   /* NULL graph on failure */
    sj_status (*graph_launch)(void *graph);
    void (*graph_free)(void *graph);
} sj_backend;

/* matmul over packed operands: each row directly after the previous one. */
static inline void sj_matmul(const sj_backend *be, void *C, const void *A, const void *B, int M,
                             int N, int K, int transA, int transB, int accum, int c_f32) {
    be->matmul(C, N, A, transA ? M : K, B, transB ? K : N, M, N, K, transA, transB, accum, c_f32);
}

#ifndef __cplusplus
/* The CPU backend's table, one per ISA level (core/isa.h): the active level's. */
SJ_ISA_EXTERN(const sj_backend, sj_cpu_table);
SJ_ISA_EXTERN(const sj_backend, sj_cpu_staged_table);
static inline const sj_backend *sj_cpu_backend(void) { return SJ_ISA_PICK(sj_cpu_table); }
/* testing, see cpu/backend.c */
static inline const sj_backend *sj_cpu_staged_backend(void) { return SJ_ISA_PICK(sj_cpu_staged_table); }
/* The backend for a device and compute dtype (CUDA: the device checked
 * usable), or an error saying why not. */
sj_status sj_backend_for(sj_device dev, sj_dtype dt, const sj_backend **out);
#endif

#ifdef __cplusplus
}
#endif
#endif
