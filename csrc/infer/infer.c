/* infer.c — the inference engine, llama2.c style: a config, the weights (each
 * matrix in f32, bf16, Q8 or Q4 blocks), and a run state with a KV cache
 * allocated once. This file builds it (from a model or a GGUF file) and
 * holds the backend table; the forward pass is forward.c's (compiled once
 * per ISA level): it reads top to bottom like the paper; prefill runs many
 * tokens through it at once (batched matmuls), decode runs one.
 * Semantics follow the training model exactly (the kernels in csrc/cpu;
 * tests/torch_ref.py is the spec): HF Llama rotate-half RoPE with float
 * angles, GQA (query head h reads KV head h / (H / KV)), RMSNorm, SwiGLU or
 * relu2, tied or untied output head, and the architecture options: qk-norm,
 * paired heads, value mix, embedding skip, and per-layer sliding windows
 * whose KV cache is a ring buffer of `window` rows (position p at row
 * p % window), so long generation keeps a bounded cache.
 * The handle (handle.c) checks every request before it reaches here and
 * tells each call its position; this file is the CPU backend behind it.
 * It must never allocate per token nor read past the KV cache. */
#include "infer_cpu.h"
#include "../model/model.h"
#include "../model/mamba2.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int wtype_for(int mode) {
    return mode == SJ_INFER_FP32 ? SJ_W_F32 : mode == SJ_INFER_BF16 ? SJ_W_BF16
         : mode == SJ_INFER_Q8 ? SJ_W_Q8 : SJ_W_Q4;
}

static void cpu_free(void *e) {
    sj_infer_cpu *h = e;
    if (!h) return;
    if (h->L)
        for (int l = 0; l < h->c.n_layers; l++) {
            layer_w *w = &h->L[l];
            sj_qmat_free(&w->wq); sj_qmat_free(&w->wk); sj_qmat_free(&w->wv); sj_qmat_free(&w->wo);
            sj_qmat_free(&w->w_gate); sj_qmat_free(&w->w_up); sj_qmat_free(&w->w_down);
            sj_qmat_free(&w->router);
            for (int e = 0; w->experts && e < 2 * h->c.moe.n_experts; e++) sj_qmat_free(&w->experts[e]);
            free(w->experts);
            sj_qmat_free(&w->q_a); sj_qmat_free(&w->kv_a);
            sj_qmat_free(&w->in_proj); sj_qmat_free(&w->out_proj); sj_qmat_free(&w->wg);
        }
    sj_qmat_free(&h->tok_emb); sj_qmat_free(&h->output);
    sj_qpool_free(&h->pool);
    free(h->L);
    sj_free(h->norms);
    sj_free(h->mla_mem);
    sj_free(h->ssm_vec);
    sj_free(h->state_mem);
    free(h);
}

sj_status sj_infer_rope_tables(const sj_config *c, int n_pos, float *cos_out, float *sin_out) {
    /* one set of frequencies for the whole context, so that every key in the
     * cache was turned by the same ones (dynamic scaling: sized for n_pos) */
    sj_rope r;
    SJ_TRY(sj_rope_init(&r, c, n_pos));
    const int half = r.n_pairs;
    /* angles in float, as csrc/cpu/rope.c and Hugging Face's fp32 path */
    for (int t = 0; t < n_pos; t++)
        for (int i = 0; i < half; i++) {
            float a = (float)t * r.inv_freq[i];
            cos_out[(int64_t)t * half + i] = cosf(a) * r.mscale;
            sin_out[(int64_t)t * half + i] = sinf(a) * r.mscale;
        }
    return SJ_OK;
}

/* Rows of layer l's K/V cache: a ring of `window` rows, or max_ctx; none
 * for Mamba-2 and linear layers (their state is constant in the context). */
static int cache_rows(const sj_infer_cpu *h, int l) {
    if (h->c.layers[l].mixer != SJ_MIXER_ATTENTION) return 0;
    return h->L[l].window ? h->L[l].window : h->max_ctx;
}

/* Layers of a kind. */
static int count_mixers(const sj_config *c, int mixer) {
    int n = 0;
    for (int l = 0; l < c->n_layers; l++) n += c->layers[l].mixer == mixer;
    return n;
}

/* The run state's buffers and the KV cache, 64-byte aligned, from base;
 * base NULL: only their size. Returns floats used (the activation
 * scratch of quant.c's layout follows). */
/* The widest dense ffn hidden: the config's, or the MoE layers' shared experts'. */
static int dense_dim(const sj_config *c) {
    return SJ_MAX(c->ffn_dim, c->moe.n_shared * c->moe.expert_dim);
}

static int64_t place_state(sj_infer_cpu *h, float *base) {
    const sj_config *c = &h->c;
    const int64_t R = CHUNK, C = c->dim, F = dense_dim(c), half = h->hd / 2;
    const sj_mla *a = &c->mla;
    const int64_t lat_row = a->kv_lora_rank + a->qk_rope_head_dim,
                  mla_q = (int64_t)c->n_heads * (a->qk_nope_head_dim + a->qk_rope_head_dim);
    /* RoPE tables only for attention layers: mla layers turn on the fly, and
     * a Mamba-2 or linear model's state does not grow with max_ctx */
    const int64_t rope_rows = count_mixers(c, SJ_MIXER_ATTENTION) ? h->max_ctx : 0;
    const int mamba2 = count_mixers(c, SJ_MIXER_MAMBA2);
    const sj_mamba2_shape S = sj_mamba2_shape_of(c);
    int windowed = 0;
    int64_t kv_elems = 0, lat_elems = 0, ssm_floats = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (base) { h->L[l].kv_at = kv_elems; h->L[l].lat_at = lat_elems; h->L[l].rec_at = ssm_floats; }
        if (h->L[l].mla) lat_elems += (int64_t)h->max_ctx * lat_row;
        kv_elems += (int64_t)cache_rows(h, l) * h->kv_dim;
        windowed |= h->L[l].window != 0;
        if (c->layers[l].mixer == SJ_MIXER_MAMBA2) ssm_floats += sj_infer_mamba2_state_floats(c);
        if (c->layers[l].mixer == SJ_MIXER_LINEAR) ssm_floats += sj_infer_linear_state_floats(c);
    }
    const int64_t att = h->n_mla ? SJ_MAX(C, (int64_t)c->n_heads * a->v_head_dim) : C;
    const int64_t kv_floats = h->kv_f16 ? SJ_CDIV(kv_elems, 2) : kv_elems;
    int64_t off = 0;
#define TAKE(ptr, type, n) do { if (base) ptr = (type *)(base + off); off += SJ_CDIV((int64_t)(n), 16) * 16; } while (0)
    TAKE(h->x, float, R * C); TAKE(h->xb, float, R * C); TAKE(h->q, float, R * C);
    TAKE(h->k, float, R * h->kv_proj); TAKE(h->v, float, R * h->kv_proj);
    TAKE(h->att, float, R * att); TAKE(h->hb, float, R * F); TAKE(h->hb2, float, R * F);
    TAKE(h->logits, float, c->vocab_size);
    TAKE(h->rope_cos, float, rope_rows * half); TAKE(h->rope_sin, float, rope_rows * half);
    if (mamba2) {
        TAKE(h->zx, float, R * S.d_in_proj); TAKE(h->xbc, float, R * S.conv_dim);
        TAKE(h->ssm_y, float, R * S.d_inner);
    }
    if (count_mixers(c, SJ_MIXER_LINEAR)) {
        TAKE(h->lin_k, float, R * C); TAKE(h->lin_v, float, R * C); TAKE(h->lin_g, float, R * c->n_heads);
    }
    h->rec_state_floats = ssm_floats;
    if (ssm_floats) TAKE(h->rec_state, float, ssm_floats);
    if (c->embed_skip != 0.f) TAKE(h->emb, float, R * C);
    if (c->value_mix != 0.f) TAKE(h->v0, float, R * h->kv_dim);
    if (windowed && h->kv_f16) { TAKE(h->k16, uint16_t, SJ_CDIV(R * h->kv_dim, 2)); TAKE(h->v16, uint16_t, SJ_CDIV(R * h->kv_dim, 2)); }
    if (sj_moe_layers(c)) {
        const int64_t E = c->moe.n_experts, k = c->moe.top_k, Fe = c->moe.expert_dim;
        TAKE(h->moe_logits, float, R * E); TAKE(h->moe_record, float, sj_moe_record_numel(R, E, k));
        TAKE(h->moe_w, float, R * k); TAKE(h->moe_xp, float, R * k * C); TAKE(h->moe_yp, float, R * k * C);
        TAKE(h->moe_gu, float, R * 2 * Fe); TAKE(h->moe_act, float, R * Fe); TAKE(h->moe_y, float, R * C);
        TAKE(h->moe_route.stats, float, 2 + E);
    }
    TAKE(h->kcache, float, kv_floats); TAKE(h->vcache, float, kv_floats);
    if (h->n_mla) {
        TAKE(h->mq, float, R * mla_q); TAKE(h->mqa, float, R * a->q_lora_rank);
        TAKE(h->mqabs, float, R * c->n_heads * 2 * lat_row);
        TAKE(h->lcache, float, lat_elems);
    }
#undef TAKE
    return off;
}

/* Run state and KV cache: one allocation, sized by the config, max_ctx,
 * the layers' windows and the cache's element type. */
static sj_status alloc_state(sj_infer_cpu *h) {
    const sj_config *c = &h->c;
    /* the widest matmul input: mla's q_b_proj and wo read q_lora_rank and
     * n_heads * v_head_dim, Mamba-2's out_proj d_inner */
    const int W = SJ_MAX(SJ_MAX(SJ_MAX(c->dim, dense_dim(c)), SJ_MAX(c->moe.expert_dim, sj_mamba2_shape_of(c).d_inner)),
                         h->n_mla ? SJ_MAX(c->mla.q_lora_rank, c->n_heads * c->mla.v_head_dim) : 0);
    h->emb = h->v0 = NULL; h->k16 = h->v16 = NULL;
    h->zx = h->xbc = h->ssm_y = h->rec_state = h->lin_k = h->lin_v = h->lin_g = NULL;
    h->moe_route = (sj_moe_route){ c->moe.router, c->moe.norm_topk, 0, 0, 0, NULL };
    const int64_t n_f = place_state(h, NULL);
    const int64_t bytes = n_f * 4 + sj_qact_bytes(CHUNK, W);
    float *f = h->state_mem = sj_alloc((size_t)bytes, "KV cache and run state");
    if (!f) return SJ_ERR_NOMEM;
    h->state_bytes = bytes;
    place_state(h, f);
    sj_qact_bind(&h->qa, f + n_f, CHUNK, W);   /* the rest: activation scratch */
    if (h->rec_state) memset(h->rec_state, 0, sizeof(float) * (size_t)h->rec_state_floats);
    sj_status s = count_mixers(c, SJ_MIXER_ATTENTION)
                ? sj_infer_rope_tables(c, h->max_ctx, h->rope_cos, h->rope_sin) : SJ_OK;
    if (s) { sj_free(h->state_mem); h->state_mem = NULL; }
    return s;
}

/* The per-layer tensors a llama GGUF holds, by our names (names.c). */
static const char *const LAYER_TENSORS[] = { "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "attn_norm", "ffn_norm" };
enum { N_LAYER_TENSORS = sizeof LAYER_TENSORS / sizeof LAYER_TENSORS[0] };

/* The matrix of our name, or NULL (a norm, an absent head, another name). */
static sj_qmat *matrix(const sj_infer_cpu *h, const char *name) {
    int l;
    const sj_tensor_name *r = sj_tensor_name_find(name, SJ_NAMES_OURS, &l);
    if (!r || l >= h->c.n_layers) return NULL;
    const char *k = r->name[SJ_NAMES_OURS];
    sj_infer_cpu *m = (sj_infer_cpu *)h;
    if (!r->per_layer)
        return !strcmp(k, "tok_emb") ? &m->tok_emb : !strcmp(k, "lm_head") && h->output.mem ? &m->output : NULL;
    layer_w *w = &m->L[l];
    if (w->mla && (!strcmp(k, "wk") || !strcmp(k, "wv"))) return NULL;
    sj_qmat *const mats[7] = { &w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down };
    for (int i = 0; i < 7; i++) if (!strcmp(k, LAYER_TENSORS[i])) return mats[i]->mem ? mats[i] : NULL;
    if (!strcmp(k, "ssm.in_proj")) return w->in_proj.mem ? &w->in_proj : NULL;
    if (!strcmp(k, "ssm.out_proj")) return w->out_proj.mem ? &w->out_proj : NULL;
    if (!strcmp(k, "wg")) return w->wg.mem ? &w->wg : NULL;
    if (!w->mla) return NULL;
    if (!strcmp(k, "mla.q_a_proj")) return &w->q_a;
    if (!strcmp(k, "mla.q_b_proj")) return &w->wq;
    if (!strcmp(k, "mla.kv_a_proj")) return &w->kv_a;
    return NULL;
}

/* The vector of our name (dim values; q_norm, k_norm: head dim; an mla
 * layer's latent norms and its kv_b_proj, kept f32 whole: mla.c reads it as
 * the absorbed matrices), or NULL. */
static float *vector(const sj_infer_cpu *h, const char *name) {
    int l;
    const sj_tensor_name *r = sj_tensor_name_find(name, SJ_NAMES_OURS, &l);
    if (!r || l >= h->c.n_layers) return NULL;
    const char *k = r->name[SJ_NAMES_OURS];
    const int64_t C = h->c.dim;
    if (!r->per_layer) return !strcmp(k, "final_norm") ? h->norms + 2 * h->c.n_layers * C : NULL;
    if (!strcmp(k, "attn_norm")) return h->L[l].attn_norm;
    if (!strcmp(k, "ffn_norm")) return h->L[l].ffn_norm;
    if (!strcmp(k, "q_norm")) return h->L[l].q_norm;
    if (!strcmp(k, "k_norm")) return h->L[l].k_norm;
    if (!strcmp(k, "mla.q_a_norm")) return h->L[l].q_a_norm;
    if (!strcmp(k, "mla.kv_a_norm")) return h->L[l].kv_a_norm;
    if (!strcmp(k, "mla.kv_b_proj")) return h->L[l].kv_b;
    const layer_w *w = &h->L[l];
    if (!strcmp(k, "ssm.conv_w")) return w->conv_w;
    if (!strcmp(k, "ssm.conv_b")) return w->conv_b;
    if (!strcmp(k, "ssm.dt_bias")) return w->dt_bias;
    if (!strcmp(k, "ssm.A_log")) return w->A_log;
    if (!strcmp(k, "ssm.D")) return w->D;
    if (!strcmp(k, "ssm.norm")) return w->ssm_norm;
    return NULL;
}

const sj_qmat *sj_infer_cpu_matrix(const sj_infer_cpu *e, const char *name) { return matrix(e, name); }
const float *sj_infer_cpu_vector(const sj_infer_cpu *e, const char *name) { return vector(e, name); }

/* Config checked, matrices allocated (unfilled), run state and RoPE tables built. */
static sj_status create(const sj_config *c, int mode, int max_ctx, sj_infer_cpu **out) {
    *out = NULL;
    SJ_TRY(sj_config_validate(c));
    if (c->dim % c->n_heads || (c->dim / c->n_heads) % 2)
        return sj_fail(SJ_ERR_ARG, "dim %d / n_heads %d must be an even head size", c->dim, c->n_heads);
    SJ_TRY(sj_infer_resolve_ctx(c, &max_ctx));
    sj_infer_cpu *h = calloc(1, sizeof *h);
    if (!h) return sj_fail(SJ_ERR_NOMEM, "inference handle: out of memory");
    h->c = *c; h->mode = mode; h->max_ctx = max_ctx;
    h->hd = c->dim / c->n_heads;
    const int pairs = c->paired_heads ? 2 : 1;   /* heads averaged into one */
    h->n_att = c->n_heads / pairs;
    h->kv_proj = c->n_kv_heads * h->hd; h->kv_dim = h->kv_proj / pairs;
    const int C = c->dim, F = c->ffn_dim, V = c->vocab_size, KVd = h->kv_proj, O = h->n_att * h->hd,
              wt = wtype_for(mode);
    sj_status s = SJ_OK;
    h->L = calloc((size_t)c->n_layers, sizeof *h->L);
    const int E = c->moe.n_experts, Fe = c->moe.expert_dim;
    h->norms = sj_alloc(sizeof(float) * ((size_t)(2 * c->n_layers + 1) * C + (size_t)2 * c->n_layers * h->hd +
                                         (size_t)c->n_layers * E), "norm weights");
    if (!h->L || !h->norms) { cpu_free(h); return sj_fail(SJ_ERR_NOMEM, "inference weights: out of memory"); }
    /* The embedding (and a tied head) keep 8 bits in q4 mode, as llama.cpp's Q4 files do. */
    int et = mode == SJ_INFER_Q4 ? SJ_W_Q8 : wt;
    if ((s = sj_qmat_alloc(&h->tok_emb, et, V, C, "tok_emb"))) goto fail;
    if (c->untied_head && (s = sj_qmat_alloc(&h->output, et, V, C, "lm_head"))) goto fail;
    const sj_mla *a = &c->mla;
    const int qr = a->q_lora_rank, kvr = a->kv_lora_rank, mq = c->n_heads * (a->qk_nope_head_dim + a->qk_rope_head_dim),
              mo = c->n_heads * a->v_head_dim, mkv = c->n_heads * (a->qk_nope_head_dim + a->v_head_dim);
    for (int l = 0; l < c->n_layers; l++) h->n_mla += h->L[l].mla = c->layers[l].mixer == SJ_MIXER_MLA;
    const int64_t mla_bytes = (qr ? sj_qmat_bytes(wt, qr, C) + sj_qmat_bytes(wt, mq, qr) : sj_qmat_bytes(wt, mq, C)) +
                              sj_qmat_bytes(wt, kvr + a->qk_rope_head_dim, C) + sj_qmat_bytes(wt, C, mo);
    const int64_t mla_floats = (int64_t)qr + kvr + (int64_t)mkv * kvr;   /* per mla layer */
    const sj_mamba2_shape S = sj_mamba2_shape_of(c);
    /* a layer's dense ffn hidden: the config's, the MoE layers' shared experts', or none */
    #define DENSE_F(y) ((y)->ffn == SJ_FFN_MOE ? c->moe.n_shared * Fe : (y)->ffn == SJ_FFN_NONE ? 0 : F)
    int64_t pool_bytes = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const sj_layer *y = &c->layers[l];
        const int Fl = DENSE_F(y);
        const int gated = y->mixer == SJ_MIXER_LINEAR && c->linear.decay == SJ_LINEAR_DECAY_GATED;
        pool_bytes += y->mixer == SJ_MIXER_MAMBA2
                    ? sj_qmat_bytes(wt, S.d_in_proj, C) + sj_qmat_bytes(wt, C, S.d_inner)
                    : y->mixer == SJ_MIXER_LINEAR
                    ? 4 * sj_qmat_bytes(wt, C, C) + (gated ? sj_qmat_bytes(wt, c->n_heads, C) : 0)
                    : y->mixer == SJ_MIXER_MLA ? mla_bytes
                    : sj_qmat_bytes(wt, C, C) + sj_qmat_bytes(wt, C, O) + 2 * sj_qmat_bytes(wt, KVd, C);
        if (Fl) pool_bytes += 2 * sj_qmat_bytes(wt, Fl, C) + sj_qmat_bytes(wt, C, Fl);
        if (y->ffn == SJ_FFN_MOE)
            pool_bytes += sj_qmat_bytes(SJ_W_F32, E, C) +
                          (int64_t)E * (sj_qmat_bytes(wt, 2 * Fe, C) + sj_qmat_bytes(wt, C, Fe));
    }
    if ((s = sj_qpool_init(&h->pool, pool_bytes, "layer weights"))) goto fail;
    if (h->n_mla && !(h->mla_mem = sj_alloc(sizeof(float) * (size_t)(mla_floats * h->n_mla), "mla weights"))) {
        s = SJ_ERR_NOMEM;
        goto fail;
    }
    const int n_mamba2 = count_mixers(c, SJ_MIXER_MAMBA2);
    const int64_t vec_floats = sj_infer_mamba2_vector_floats(c);
    if (n_mamba2 && !(h->ssm_vec = sj_alloc(sizeof(float) * (size_t)(vec_floats * n_mamba2), "Mamba-2 vectors"))) {
        s = SJ_ERR_NOMEM;
        goto fail;
    }
    float *vec = h->ssm_vec;
    for (int l = 0, m = 0; l < c->n_layers; l++) {
        layer_w *w = &h->L[l];
        sj_qpool *P = &h->pool;
        const sj_layer *y = &c->layers[l];
        const int moe = y->ffn == SJ_FFN_MOE, Fl = DENSE_F(y);
        if (y->mixer == SJ_MIXER_MAMBA2) {
            if ((s = sj_qmat_alloc_pool(&w->in_proj, P, wt, S.d_in_proj, C, "ssm.in_proj")) ||
                (s = sj_qmat_alloc_pool(&w->out_proj, P, wt, C, S.d_inner, "ssm.out_proj")))
                goto fail;
            w->conv_w = vec; vec += (int64_t)S.conv_dim * S.K;
            w->conv_b = vec; vec += S.conv_dim;
            w->dt_bias = vec; vec += S.H;
            w->A_log = vec; vec += S.H;
            w->D = vec; vec += S.H;
            w->ssm_norm = vec; vec += S.d_inner;
        } else if (y->mixer == SJ_MIXER_LINEAR) {
            if ((s = sj_qmat_alloc_pool(&w->wq, P, wt, C, C, "wq")) || (s = sj_qmat_alloc_pool(&w->wk, P, wt, C, C, "wk")) ||
                (s = sj_qmat_alloc_pool(&w->wv, P, wt, C, C, "wv")) || (s = sj_qmat_alloc_pool(&w->wo, P, wt, C, C, "wo")) ||
                (c->linear.decay == SJ_LINEAR_DECAY_GATED &&
                 (s = sj_qmat_alloc_pool(&w->wg, P, wt, c->n_heads, C, "wg"))))
                goto fail;
        } else if (w->mla) {
            if ((qr && ((s = sj_qmat_alloc_pool(&w->q_a, P, wt, qr, C, "mla.q_a_proj")) ||
                        (s = sj_qmat_alloc_pool(&w->wq, P, wt, mq, qr, "mla.q_b_proj")))) ||
                (!qr && (s = sj_qmat_alloc_pool(&w->wq, P, wt, mq, C, "wq"))) ||
                (s = sj_qmat_alloc_pool(&w->kv_a, P, wt, kvr + a->qk_rope_head_dim, C, "mla.kv_a_proj")) ||
                (s = sj_qmat_alloc_pool(&w->wo, P, wt, C, mo, "wo")))
                goto fail;
            w->q_a_norm = h->mla_mem + mla_floats * m++;
            w->kv_a_norm = w->q_a_norm + qr;
            w->kv_b = w->kv_a_norm + kvr;
        } else if ((s = sj_qmat_alloc_pool(&w->wq, P, wt, C, C, "wq")) || (s = sj_qmat_alloc_pool(&w->wk, P, wt, KVd, C, "wk")) ||
                   (s = sj_qmat_alloc_pool(&w->wv, P, wt, KVd, C, "wv")) || (s = sj_qmat_alloc_pool(&w->wo, P, wt, C, O, "wo")))
            goto fail;
        if (Fl && ((s = sj_qmat_alloc_pool(&w->w_gate, P, wt, Fl, C, "w_gate")) ||
                   (s = sj_qmat_alloc_pool(&w->w_up, P, wt, Fl, C, "w_up")) ||
                   (s = sj_qmat_alloc_pool(&w->w_down, P, wt, C, Fl, "w_down"))))
            goto fail;
        if (moe) {   /* the router in f32; each expert its own matrices, read only when chosen */
            if (!(w->experts = calloc((size_t)2 * E, sizeof(sj_qmat)))) {
                s = sj_fail(SJ_ERR_NOMEM, "inference weights: out of memory");
                goto fail;
            }
            if ((s = sj_qmat_alloc_pool(&w->router, P, SJ_W_F32, E, C, "moe.router"))) goto fail;
            for (int e = 0; e < E; e++)
                if ((s = sj_qmat_alloc_pool(&w->experts[e], P, wt, 2 * Fe, C, "moe.w_gate_up")) ||
                    (s = sj_qmat_alloc_pool(&w->experts[E + e], P, wt, C, Fe, "moe.w_down")))
                    goto fail;
            if (c->moe.router == SJ_MOE_SIGMOID)
                w->moe_bias = h->norms + (int64_t)(2 * c->n_layers + 1) * C + (int64_t)2 * c->n_layers * h->hd +
                              (int64_t)l * E;
        }
        w->attn_norm = h->norms + (int64_t)(2 * l) * C;
        w->ffn_norm = h->norms + (int64_t)(2 * l + 1) * C;
        if (c->layers[l].qk_norm == SJ_QK_NORM_WEIGHTED) {
            w->q_norm = h->norms + (int64_t)(2 * c->n_layers + 1) * C + (int64_t)(2 * l) * h->hd;
            w->k_norm = w->q_norm + h->hd;
        }
        /* a window as long as the context hides nothing: the whole-context cache */
        w->window = c->layers[l].window < max_ctx ? c->layers[l].window : 0;
    }
    if (h->n_mla && (s = sj_rope_init_hd(&h->rope_mla, c, max_ctx, a->qk_rope_head_dim))) goto fail;
    if ((s = alloc_state(h))) goto fail;
    *out = h;
    return SJ_OK;
fail:
    cpu_free(h);
    return s;
}

static void engine(sj_infer_cpu *h, sj_infer_engine *out) {
    out->be = &sj_infer_cpu_backend;
    out->e = h;
    out->c = h->c;
    out->max_ctx = h->max_ctx;
}

/* ---- from the training model ------------------------------------------------- */

/* Rows that held a NaN or Inf where quantised (the row, or -1). */
static void note_bad_row(int *bad, int64_t r) {
    int none = -1;
    __atomic_compare_exchange_n(bad, &none, (int)r, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

typedef struct { sj_qmat *W; const float *src; int bad_row; } fill_job;
static void fill_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    fill_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        if (!sj_qmat_set_row(j->W, (int)r, j->src + r * j->W->cols)) note_bad_row(&j->bad_row, r);
}
static sj_status fill_f32(sj_qmat *W, const float *src, const char *name) {
    fill_job j = { W, src, -1 };
    sj_parallel_for(W->rows, 64, fill_rows, &j);
    if (j.bad_row >= 0)
        return sj_fail(SJ_ERR_ARG, "%s: row %d holds NaN or Inf: it has no quantised form", name,
                       j.bad_row);
    return SJ_OK;
}

/* A MoE layer's tensor (model/moe.c's layout) into the engine's matrices. */
static sj_status fill_moe(sj_infer_cpu *h, const sj_tensor_info *t, const float *src) {
    int l;
    char what[24];
    if (sscanf(t->name, "layers.%d.moe.%23s", &l, what) != 2 || l < 0 || l >= h->c.n_layers || !h->L[l].experts)
        return sj_fail(SJ_ERR_ARG, "inference engine: tensor '%s' has no place in it", t->name);
    layer_w *w = &h->L[l];
    const int E = h->c.moe.n_experts;
    const int64_t C = h->c.dim, F = h->c.moe.expert_dim;
    if (!strcmp(what, "router")) return fill_f32(&w->router, src, t->name);
    if (!strcmp(what, "router_bias") && w->moe_bias) {
        memcpy(w->moe_bias, src, sizeof(float) * E);
        return SJ_OK;
    }
    const int up = !strcmp(what, "w_gate_up");
    if (!up && strcmp(what, "w_down"))
        return sj_fail(SJ_ERR_ARG, "inference engine: tensor '%s' has no place in it", t->name);
    for (int e = 0; e < E; e++)
        SJ_TRY(fill_f32(&w->experts[up ? e : E + e], src + e * (up ? 2 * F * C : C * F), t->name));
    return SJ_OK;
}

sj_status sj_infer_cpu_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    if (sj_model_device(m) != SJ_DEVICE_CPU)
        return sj_fail(SJ_ERR_ARG, "inference engine: the model must be on the CPU (move it with .to('cpu'))");
    const sj_config *c = sj_model_config(m);
    sj_infer_cpu *h;
    SJ_TRY(create(c, mode, max_ctx, &h));
    int64_t n;
    const float *P = sj_model_params(m, &n);
    for (int i = 0; i < sj_model_n_tensors(m); i++) {
        const sj_tensor_info *t = sj_model_tensor(m, i);
        const float *src = P + t->offset;
        sj_qmat *W = matrix(h, t->name);
        float *v = W ? NULL : vector(h, t->name);
        sj_status s = SJ_OK;
        if (strstr(t->name, ".moe.")) s = fill_moe(h, t, src);
        else if (W) s = fill_f32(W, src, t->name);
        else if (v) memcpy(v, src, sizeof(float) * t->numel);
        else s = sj_fail(SJ_ERR_ARG, "inference engine: tensor '%s' has no place in it (its architecture "
                         "option does not generate yet)", t->name);
        if (s != SJ_OK) { cpu_free(h); return s; }
    }
    engine(h, out);
    return SJ_OK;
}

/* ---- from GGUF ------------------------------------------------------------------ */

typedef struct { sj_qmat *W; const sj_gguf_tensor *t; uint64_t row_bytes; int permute_hd, bad_row; } load_job;
static void load_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    load_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        int dst = j->permute_hd ? sj_gguf_rope_row((int)r, j->permute_hd) : (int)r;
        if (!sj_qmat_set_row_gguf(j->W, dst, j->t->type, (const uint8_t *)j->t->data + j->row_bytes * r))
            note_bad_row(&j->bad_row, r);
    }
}

static sj_status load_mat(sj_gguf_file *f, const char *name, sj_qmat *W, int permute_hd) {
    const char *path = sj_gguf_path(f);
    const sj_gguf_tensor *t = sj_gguf_find_tensor(f, name);
    if (!t) return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' is missing", path, name);
    if (t->ndim > 2 || t->shape[0] != W->cols || (t->ndim == 2 ? t->shape[1] : 1) != W->rows)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld], expected [%d, %d]", path, name,
                       (long long)t->shape[0], (long long)t->shape[1], W->cols, W->rows);
    int be, bb;
    sj_gguf_type_block(t->type, &be, &bb);
    load_job j = { W, t, (uint64_t)W->cols / be * bb, permute_hd, -1 };
    sj_parallel_for(W->rows, 64, load_rows, &j);
    if (j.bad_row >= 0)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': row %d holds NaN or Inf: it has no %s form",
                       path, name, j.bad_row, W->type == SJ_W_Q4 ? "q4" : "q8");
    return SJ_OK;
}

static sj_status load_vec(sj_gguf_file *f, const char *name, float *dst, int n) {
    const sj_gguf_tensor *t = sj_gguf_find_tensor(f, name);
    if (!t) return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' is missing", sj_gguf_path(f), name);
    if (t->numel != n || t->shape[0] != n)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' has %lld values, expected %d", sj_gguf_path(f), name, (long long)t->numel, n);
    return sj_gguf_dequantize(t->type, t->data, n, dst);
}

/* The engine's tensor `ours` from the file's tensor of the same kind (names.c). */
static sj_status load_tensor(sj_gguf_file *f, sj_infer_cpu *h, const char *ours) {
    char g[96];
    int l;
    SJ_TRY(sj_tensor_name_map(ours, SJ_NAMES_OURS, SJ_NAMES_GGUF, g, sizeof g));
    sj_qmat *W = matrix(h, ours);
    if (W) return load_mat(f, g, W, sj_tensor_name_find(ours, SJ_NAMES_OURS, &l)->rope_rows ? h->hd : 0);
    return load_vec(f, g, vector(h, ours), h->c.dim);
}

static sj_status get_i(sj_gguf_file *f, const char *key, int lo, int hi, int *out) {
    int64_t v;
    SJ_TRY(sj_gguf_get_int(f, key, &v));
    if (v < lo || v > hi) return sj_fail(SJ_ERR_FORMAT, "%s: %s = %lld is out of range [%d, %d]", sj_gguf_path(f), key, (long long)v, lo, hi);
    *out = (int)v;
    return SJ_OK;
}

sj_status sj_infer_cpu_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    sj_gguf_file *f;
    SJ_TRY(sj_gguf_open(path, &f));
    sj_status s;
    sj_infer_cpu *h = NULL;
    const sj_gguf_kv *arch = sj_gguf_find_kv(f, "general.architecture");
    if (!arch || arch->type != SJ_GGUF_STRING || arch->n != 5 || memcmp(arch->data, "llama", 5)) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: general.architecture must be 'llama'", path);
        goto done;
    }
    sj_config c = {0};
    double theta = 10000.0, eps;
    int n_rot = 0;
    char emb_name[32], head_name[32];
    if ((s = sj_tensor_name_map("tok_emb", SJ_NAMES_OURS, SJ_NAMES_GGUF, emb_name, sizeof emb_name)) ||
        (s = sj_tensor_name_map("lm_head", SJ_NAMES_OURS, SJ_NAMES_GGUF, head_name, sizeof head_name)))
        goto done;
    if ((s = get_i(f, "llama.embedding_length", 1, 1 << 16, &c.dim)) ||
        (s = get_i(f, "llama.block_count", 1, 1024, &c.n_layers)) ||
        (s = get_i(f, "llama.attention.head_count", 1, 1024, &c.n_heads)) ||
        (s = get_i(f, "llama.feed_forward_length", 1, 1 << 18, &c.ffn_dim)) ||
        (s = get_i(f, "llama.context_length", 1, 1 << 24, &c.max_seq_len)) ||
        (s = sj_gguf_get_float(f, "llama.attention.layer_norm_rms_epsilon", &eps)))
        goto done;
    c.n_kv_heads = c.n_heads;
    if (sj_gguf_find_kv(f, "llama.attention.head_count_kv") &&
        (s = get_i(f, "llama.attention.head_count_kv", 1, 1024, &c.n_kv_heads))) goto done;
    if (sj_gguf_find_kv(f, "llama.rope.freq_base") && (s = sj_gguf_get_float(f, "llama.rope.freq_base", &theta))) goto done;
    const sj_gguf_tensor *emb = sj_gguf_find_tensor(f, emb_name);
    if (!emb || emb->ndim != 2) { s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' is missing or not 2-D", path, emb_name); goto done; }
    c.vocab_size = (int)SJ_MIN(emb->shape[1], INT32_MAX);
    if (sj_gguf_find_kv(f, "llama.vocab_size") && (s = get_i(f, "llama.vocab_size", 1, 1 << 24, &c.vocab_size))) goto done;
    if (c.vocab_size != emb->shape[1]) { s = sj_fail(SJ_ERR_FORMAT, "%s: llama.vocab_size %d but %s has %lld rows", path, c.vocab_size, emb_name, (long long)emb->shape[1]); goto done; }
    c.rope_theta = (float)theta; c.norm_eps = (float)eps;
    if (c.n_heads > 0 && c.dim % c.n_heads == 0 && sj_gguf_find_kv(f, "llama.rope.dimension_count")) {
        if ((s = get_i(f, "llama.rope.dimension_count", 1, 1 << 16, &n_rot))) goto done;
        if (n_rot != c.dim / c.n_heads) { s = sj_fail(SJ_ERR_FORMAT, "%s: partial rotary embeddings (rope.dimension_count %d, head size %d) are not supported", path, n_rot, c.dim / c.n_heads); goto done; }
    }
    if (sj_gguf_find_kv(f, "llama.rope.scaling.type")) {
        const sj_gguf_kv *k = sj_gguf_find_kv(f, "llama.rope.scaling.type");
        if (!(k->type == SJ_GGUF_STRING && k->n == 4 && !memcmp(k->data, "none", 4))) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: RoPE scaling is not supported", path); goto done;
        }
    }
    c.untied_head = sj_gguf_find_tensor(f, head_name) != NULL;
    if ((s = sj_config_validate(&c))) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", sj_last_error());
        s = sj_fail(SJ_ERR_FORMAT, "%s: %s", path, msg);
        goto done;
    }
    if ((s = create(&c, mode, max_ctx, &h))) goto done;
    if ((s = load_tensor(f, h, "tok_emb")) || (c.untied_head && (s = load_tensor(f, h, "lm_head"))) ||
        (s = load_tensor(f, h, "final_norm")))
        goto done;
    for (int l = 0; l < c.n_layers; l++)
        for (int k = 0; k < N_LAYER_TENSORS; k++) {
            char nm[48];
            snprintf(nm, sizeof nm, "layers.%d.%s", l, LAYER_TENSORS[k]);
            if ((s = load_tensor(f, h, nm))) goto done;
        }
    engine(h, out);
    h = NULL;
done:
    cpu_free(h);
    sj_gguf_close(f);
    return s;
}

/* ---- backend: the state's accessors -------------------------------------------- */

static int cpu_kv_f16(const void *e) { return ((const sj_infer_cpu *)e)->kv_f16; }

static sj_status cpu_set_kv_f16(void *e, int f16) {
    sj_infer_cpu *h = e;
    if (f16 == h->kv_f16) return SJ_OK;
    void *old = h->state_mem;
    const int was = h->kv_f16;
    h->kv_f16 = f16;
    sj_status s = alloc_state(h);
    if (s) {   /* keep the old state usable */
        h->kv_f16 = was;
        h->state_mem = old;
        return s;
    }
    sj_free(old);
    return SJ_OK;
}
static int64_t cpu_cache_bytes(const void *e) { return ((const sj_infer_cpu *)e)->state_bytes; }
static int64_t cpu_weight_bytes(const void *e) {
    const sj_infer_cpu *h = e;
    int64_t b = h->tok_emb.bytes + h->output.bytes +
                ((int64_t)(2 * h->c.n_layers + 1) * h->c.dim + (int64_t)2 * h->c.n_layers * h->hd) * 4 +
                4 * sj_infer_mamba2_vector_floats(&h->c) * count_mixers(&h->c, SJ_MIXER_MAMBA2);
    for (int l = 0; l < h->c.n_layers; l++) {
        const layer_w *w = &h->L[l];
        b += w->wq.bytes + w->wk.bytes + w->wv.bytes + w->wo.bytes + w->w_gate.bytes + w->w_up.bytes + w->w_down.bytes +
             w->q_a.bytes + w->kv_a.bytes + w->router.bytes + w->in_proj.bytes + w->out_proj.bytes + w->wg.bytes;
        for (int e = 0; w->experts && e < 2 * h->c.moe.n_experts; e++) b += w->experts[e].bytes;
    }
    const sj_mla *a = &h->c.mla;
    return b + (int64_t)h->n_mla * 4 * (a->q_lora_rank + a->kv_lora_rank +
                                        (int64_t)h->c.n_heads * (a->qk_nope_head_dim + a->v_head_dim) * a->kv_lora_rank);
}

/* ---- backend: the verbs --------------------------------------------------------- */

/* The forward pass of the ISA level chosen at load (core/isa.h). */
static sj_status cpu_prefill(void *e, int pos, const int32_t *tokens, int n, float *logits_all) {
    return SJ_ISA_PICK(sj_infer_cpu_prefill)(e, pos, tokens, n, logits_all);
}

static sj_status cpu_decode(void *e, int pos, int32_t token, int n, int32_t *next) {
    return SJ_ISA_PICK(sj_infer_cpu_decode)(e, pos, token, n, next);
}

/* Mamba-2 and linear layers' states back to a fresh sequence. */
static void cpu_reset(void *e) {
    sj_infer_cpu *h = e;
    if (h->rec_state) memset(h->rec_state, 0, sizeof(float) * (size_t)h->rec_state_floats);
}

static sj_status cpu_logits(void *e, const float **host) {
    *host = ((sj_infer_cpu *)e)->logits;
    return SJ_OK;
}

const sj_infer_backend sj_infer_cpu_backend = {
    .device = "cpu",
    .prefill = cpu_prefill,
    .decode = cpu_decode,
    .logits = cpu_logits,
    .reset = cpu_reset,
    .free = cpu_free,
    .weight_bytes = cpu_weight_bytes,
    .cache_bytes = cpu_cache_bytes,
    .set_kv_f16 = cpu_set_kv_f16,
    .kv_f16 = cpu_kv_f16,
};
