/* infer_cpu.h — the CPU inference engine's state, shared by its cold half
 * (infer.c: construction, loading, the table) and its hot half (forward.c,
 * compiled once per ISA level). Internal to csrc/infer. */
#ifndef SJ_INFER_CPU_H
#define SJ_INFER_CPU_H

#include "engine.h"
#include "../ops/backend.h"   /* sj_rope; sj_moe_route, sj_moe_record: MoE layers route as training does */

#define CHUNK 128            /* tokens per batched forward; longer prompts loop */

typedef struct {
    sj_qmat wq, wk, wv, wo, w_gate, w_up, w_down;   /* w_gate.mem NULL: no dense ffn (MoE
                                                      * without shared experts) */
    sj_qmat router;           /* MoE layers: (E, C), f32 (the choice as training makes it) */
    sj_qmat *experts;         /* MoE layers: 2E matrices, expert e's [gate | up] (2F, C) at e,
                               * its down (C, F) at E + e; NULL for dense layers */
    float *moe_bias;          /* (E): the sigmoid router's balancing bias, else NULL */
    float *attn_norm, *ffn_norm;
    float *q_norm, *k_norm;   /* (hd) each where qk_norm is weighted, else NULL */
    int window;               /* < max_ctx: keys t-window < s <= t, cached in a ring of
                               * `window` rows; 0: every key, max_ctx rows */
    int64_t kv_at;            /* the layer's first element in kcache / vcache */
    /* mla layers (mla.c): wq is q_b_proj (or the q projection without a
     * bottleneck q_a), wo the output projection, wk and wv unused; kv_b (f32,
     * (n_heads*(nope+v), kv_lora_rank)) is read as the absorbed W_uk and W_uv */
    int mla;
    sj_qmat q_a, kv_a;
    float *q_a_norm, *kv_a_norm, *kv_b;
    int64_t lat_at;           /* the layer's first element in lcache */
    /* Mamba-2 layers (their attention matrices stay empty): the projections,
     * the vectors (in ssm_vec: conv_w (conv_dim, K), conv_b, dt_bias, A_log, D,
     * norm) and the layer's state: the last K-1 conv inputs (K-1, conv_dim),
     * oldest first, then the scan's (H, N, P). A linear attention layer uses
     * wq, wk, wv (dim, dim), wo and its state (H, hd, hd [+ 1]) */
    sj_qmat in_proj, out_proj;
    float *conv_w, *conv_b, *dt_bias, *A_log, *D, *ssm_norm;
    sj_qmat wg;               /* gated linear attention layers: the gate (n_heads, dim) */
    int64_t rec_at;           /* Mamba-2 and linear layers: their state in rec_state */
} layer_w;

struct sj_infer_cpu {
    sj_config c;
    int hd, max_ctx, mode;
    int n_att;                   /* query heads attention runs at: n_heads, or n_heads / 2 paired */
    int kv_proj, kv_dim;         /* k/v projection width, and a cache row (after pairing) */
    int kv_f16;                  /* K/V cache entries stored as IEEE f16 (half the memory) */
    /* weights */
    sj_qmat tok_emb, output;     /* output.mem == NULL: tied to tok_emb */
    layer_w *L;
    sj_qpool pool;               /* the layer matrices, in the order decode reads them */
    float *norms;                /* (2 n_layers + 1, dim): attn, ffn per layer, final;
                                  * then (n_layers, 2, hd): q_norm, k_norm per layer */
    /* run state (CHUNK rows each) */
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2, *logits, *rope_cos, *rope_sin;
    float *emb;                  /* the chunk's embeddings (embed_skip), else NULL */
    float *v0;                   /* layer 0's v of the chunk (value_mix), else NULL */
    uint16_t *k16, *v16;         /* the chunk's k/v as f16 (windowed layers, f16 cache), else NULL */
    float *kcache, *vcache;      /* per layer (rows, kv_dim) at its kv_at: f32, or uint16 f16 when kv_f16 */
    /* MoE layers' run state (CHUNK tokens, R = CHUNK k routed rows), NULL without them */
    float *moe_logits;           /* (CHUNK, E) */
    float *moe_record;           /* sj_moe_record of CHUNK tokens */
    float *moe_w;                /* (CHUNK, k) routing weights */
    float *moe_xp, *moe_yp;      /* (R, C): the rows by expert, in and out */
    float *moe_gu, *moe_act;     /* (CHUNK, 2F), (CHUNK, F): one expert's rows at a time */
    float *moe_y;                /* (CHUNK, C) */
    sj_moe_route moe_route;      /* its stats: (2 + E) floats of the run state */
    /* mla layers: the latent cache, per layer (max_ctx, kv_lora_rank + qk_rope_head_dim) at
     * its lat_at, f32: the normed latent and the turned shared key of each position */
    float *lcache;
    float *mq, *mqa;             /* the chunk's q (CHUNK, n_heads*(nope+rope)) and q bottleneck */
    float *mqabs;                /* absorbed queries and latent outputs (CHUNK, n_heads, 2 (kv_lora_rank+rope)) */
    float *mla_mem;              /* the mla layers' f32 vectors and kv_b */
    sj_rope rope_mla;            /* RoPE over qk_rope_head_dim, turned on the fly */
    int n_mla;                   /* mla layers */
    float *ssm_vec;              /* Mamba-2 layers' vectors (layer_w), one allocation */
    float *zx, *xbc, *ssm_y;     /* Mamba-2 run state: in_proj's output, the conv's, the mixer's */
    float *lin_k, *lin_v, *lin_g; /* linear attention run state: k, v (CHUNK, dim), gate (CHUNK, n_heads) */
    float *rec_state;            /* Mamba-2 and linear layers' states (constant in the context) */
    int64_t rec_state_floats;
    sj_qact qa;
    void *state_mem;
    int64_t state_bytes;
};

#define sj_infer_moe_ffn SJ_ISA(sj_infer_moe_ffn)
/* x (n, C) += layer w's routed experts of xn (n, C), reading only the
 * experts its tokens chose (moe_forward.c). */
void sj_infer_moe_ffn(sj_infer_cpu *h, const layer_w *w, float *x, const float *xn, int n);
#define sj_infer_mla_mixer SJ_ISA(sj_infer_mla_mixer)
/* An mla layer's mixer (mla.c) for the chunk's n normed rows h->xb at
 * positions pos ..: their latents into the cache, attention over it with the
 * absorbed matrices, the (n, n_heads*v_head_dim) result in h->att. */
void sj_infer_mla_mixer(sj_infer_cpu *h, int l, int n, int pos);
/* mamba2.c: layer l's mixer for n tokens between in_proj (h->zx, (n,
 * d_in_proj)) and out_proj (h->ssm_y, (n, d_inner)), advancing its state. */
void sj_infer_mamba2_mix(sj_infer_cpu *h, int l, int n);
/* Floats of one Mamba-2 layer's state, and of its vectors. */
int64_t sj_infer_mamba2_state_floats(const sj_config *c);
int64_t sj_infer_mamba2_vector_floats(const sj_config *c);
/* linear.c: layer l's linear attention for n tokens: q, k, v in h->q,
 * lin_k, lin_v, the gate's logits in lin_g -> h->att (n, dim), advancing its
 * state; the floats of that state. */
void sj_infer_linear_mix(sj_infer_cpu *h, int l, int n);
int64_t sj_infer_linear_state_floats(const sj_config *c);

#define sj_infer_cpu_prefill SJ_ISA(sj_infer_cpu_prefill)
#define sj_infer_cpu_decode SJ_ISA(sj_infer_cpu_decode)
/* The table's prefill and decode (engine.h), per ISA level (forward.c). */
typedef sj_status sj_infer_cpu_prefill_fn(void *e, int pos, const int32_t *tokens, int n, float *logits_all);
typedef sj_status sj_infer_cpu_decode_fn(void *e, int pos, int32_t token, int n, int32_t *next);
sj_infer_cpu_prefill_fn sj_infer_cpu_prefill;
sj_infer_cpu_decode_fn sj_infer_cpu_decode;
SJ_ISA_EXTERN(sj_infer_cpu_prefill_fn, sj_infer_cpu_prefill);
SJ_ISA_EXTERN(sj_infer_cpu_decode_fn, sj_infer_cpu_decode);

#endif
