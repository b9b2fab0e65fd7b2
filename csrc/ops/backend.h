/* backend.h — the line between ops and devices: one table of kernels per
 * backend. Above it (tape, model, train) nothing knows which device runs.
 * Argument order: outputs first, then inputs, then dims (B, T, C ...).
 * Backward kernels with an `accum` flag add into their input-gradient when
 * it is set and overwrite it otherwise (the tape plans which); parameter
 * gradients are always added into. */
#ifndef SJ_BACKEND_H
#define SJ_BACKEND_H

#include "../core/core.h"

typedef struct sj_backend {
    const char *name;

    /* memory */
    void *(*alloc)(size_t bytes, const char *what);
    void (*free)(void *p);
    void (*fill)(float *x, float value, int64_t n);
    void (*to_host)(void *dst, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *src, size_t bytes);

    /* C(M,N) = op(A) op(B) (+ C if accum). A is (M,K), or (K,M) when
     * transA; B is (K,N), or (N,K) when transB. Row-major, packed. */
    void (*matmul)(float *C, const float *A, const float *B, int M, int N, int K,
                   int transA, int transB, int accum);

    /* out: (N, C) = emb[tok]; demb: (V, C) += scatter of dout. */
    void (*embedding_forward)(float *out, const void *tok, sj_dtype tok_dtype,
                              const float *emb, int N, int C);
    void (*embedding_backward)(float *demb, const float *dout, const void *tok,
                               sj_dtype tok_dtype, int N, int C);

    /* out, x: (N, C); rstd: (N); w: (C). */
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *w,
                            int N, int C, float eps);
    void (*rmsnorm_backward)(float *dx, float *dw, const float *dout, const float *x,
                             const float *w, const float *rstd, int N, int C, int accum);

    /* Rotate-half RoPE on the first n_rot heads of each row of n_heads heads
     * of size hd; the remaining heads are copied. Row r of batch b has
     * position pos0 + (r % T). out, in: (B, T, n_heads*hd). */
    void (*rope_forward)(float *out, const float *in, int B, int T, int n_heads,
                         int n_rot, int hd, int pos0, float theta);
    void (*rope_backward)(float *din, const float *dout, int B, int T, int n_heads,
                          int n_rot, int hd, int pos0, float theta, int accum);

    /* Causal attention over qkv: (B, T, (H + 2*KV)*hd), q heads then k then v.
     * out: (B, T, H*hd); lse: (B, H, T) log-sum-exp of each score row. */
    void (*attention_forward)(float *out, float *lse, const float *qkv,
                              int B, int T, int H, int KV, int hd);
    void (*attention_backward)(float *dqkv, const float *dout, const float *qkv,
                               const float *out, const float *lse,
                               int B, int T, int H, int KV, int hd, int accum);

    /* gu: (N, 2F) = [gate | up] -> h: (N, F) = silu(gate) * up. */
    void (*swiglu_forward)(float *h, const float *gu, int N, int F);
    void (*swiglu_backward)(float *dgu, const float *dh, const float *gu, int N, int F,
                            int accum);

    /* out = a + b; dst (+)= src. */
    void (*add)(float *out, const float *a, const float *b, int64_t n);
    void (*copy)(float *dst, const float *src, int64_t n, int accum);

    /* logits: (N, V); targets (N) of tok_dtype; losses, lse: (N).
     * Rows whose target == ignore_index get loss 0 and zero gradient.
     * dlogits = scale * (softmax - onehot). */
    void (*cross_entropy_forward)(float *losses, float *lse, const float *logits,
                                  const void *targets, sj_dtype tok_dtype, int N, int V,
                                  int ignore_index);
    void (*cross_entropy_backward)(float *dlogits, const float *logits, const float *lse,
                                   const void *targets, sj_dtype tok_dtype, int N, int V,
                                   int ignore_index, float scale, int accum);

    /* Sum of squares (in double) and in-place scaling, for grad clipping. */
    double (*sumsq)(const float *x, int64_t n);
    /* AdamW over flat buffers; weight decay on [0, n_decay) only. */
    void (*adamw)(float *p, const float *g, float *m, float *v, int64_t n, int64_t n_decay,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int64_t step);
} sj_backend;

extern const sj_backend sj_cpu_backend;

#endif
