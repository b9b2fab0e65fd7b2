/* model.c — the Llama-style decoder: parameter table over one flat buffer,
 * initialisation, and the forward pass recorded on a tape per (B, T). */
#include "model.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sj_model_account(sj_model *m, int64_t delta) {
    m->bytes += delta;
    if (m->bytes > m->peak_bytes) m->peak_bytes = m->bytes;
}

/* Layout: every matrix first (weight decay), then every norm gain (none).
 * wq|wk|wv are adjacent, so they are one fused (q+2kv, C) matrix for the
 * QKV projection; w_gate|w_up likewise form one (2F, C) matrix. */
static sj_status build_table(sj_model *m) {
    const sj_config *c = &m->cfg;
    int64_t C = c->dim, hd = C / c->n_heads, qd = (int64_t)c->n_heads * hd,
            kvd = (int64_t)c->n_kv_heads * hd, F = c->ffn_dim;
    int n = 1 + 7 * c->n_layers + 2 * c->n_layers + 1;
    m->tensors = calloc((size_t)n, sizeof(sj_tensor_info));
    m->names = calloc((size_t)n, 32);
    if (!m->tensors || !m->names) return sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    int64_t off = 0;
    int i = 0;
    #define ADD(fmt, l, d0, d1, nd) do {                                         \
        sj_tensor_info *t = &m->tensors[i];                                     \
        char *nm = m->names + 32 * i++;                                         \
        snprintf(nm, 32, fmt, l);                                               \
        t->name = nm; t->ndim = nd; t->shape[0] = d0; t->shape[1] = d1;         \
        t->numel = (nd == 2 ? (d0) * (d1) : (d0)); t->offset = off;             \
        t->decay = nd == 2; off += t->numel;                                    \
    } while (0)
    ADD("tok_emb%.0d", 0, (int64_t)c->vocab_size, C, 2);
    for (int l = 0; l < c->n_layers; l++) {
        ADD("layers.%d.wq", l, qd, C, 2);
        ADD("layers.%d.wk", l, kvd, C, 2);
        ADD("layers.%d.wv", l, kvd, C, 2);
        ADD("layers.%d.wo", l, C, qd, 2);
        ADD("layers.%d.w_gate", l, F, C, 2);
        ADD("layers.%d.w_up", l, F, C, 2);
        ADD("layers.%d.w_down", l, C, F, 2);
    }
    m->n_decay = off;
    for (int l = 0; l < c->n_layers; l++) {
        ADD("layers.%d.attn_norm", l, C, 0, 1);
        ADD("layers.%d.ffn_norm", l, C, 0, 1);
    }
    ADD("final_norm%.0d", 0, C, 0, 1);
    #undef ADD
    m->n_tensors = i;
    m->n_params = off;
    return SJ_OK;
}

static const sj_tensor_info *find(const sj_model *m, const char *fmt, int l) {
    char name[32];
    snprintf(name, sizeof name, fmt, l);
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return &m->tensors[i];
    return NULL;
}

typedef struct { float *p; float std; uint64_t seed; int64_t base; } init_job;

/* Each 64K-element chunk draws from its own stream seeded by (seed, global
 * chunk index): parallel, yet the same weights for any thread count. */
static void init_chunks(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const init_job *j = ctx;
    for (int64_t c = c0; c < c1; c++) {
        sj_rng r;
        sj_rng_seed(&r, j->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(j->base + c + 1)));
        for (int64_t k = c << 16; k < (c + 1) << 16; k++) j->p[k] = j->std * sj_rng_normal(&r);
    }
}

static void init_params(sj_model *m, uint64_t seed) {
    const float std = 0.02f, resid_std = std / sqrtf(2.0f * m->cfg.n_layers);
    for (int i = 0; i < m->n_tensors; i++) {
        const sj_tensor_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        if (!t->decay) { for (int64_t k = 0; k < t->numel; k++) p[k] = 1.0f; continue; }
        /* GPT-2's scaled init for the projections that feed the residual stream. */
        const char *dot = strrchr(t->name, '.');
        int resid = dot && (!strcmp(dot, ".wo") || !strcmp(dot, ".w_down"));
        int64_t full = t->numel >> 16;
        init_job j = { p, resid ? resid_std : std, seed, (int64_t)i << 32 };
        sj_parallel_for(full, 1, init_chunks, &j);
        sj_rng r;
        sj_rng_seed(&r, seed ^ ((uint64_t)i << 32 | 0xFFFFFFFFu));
        for (int64_t k = full << 16; k < t->numel; k++) p[k] = j.std * sj_rng_normal(&r);
    }
}

sj_status sj_model_create(const sj_config *c, uint64_t seed, sj_model **out) {
    *out = NULL;
    SJ_TRY(sj_config_validate(c));
    sj_model *m = calloc(1, sizeof *m);
    if (!m) return sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    m->cfg = *c;
    m->be = &sj_cpu_backend;
    sj_status s = build_table(m);
    if (s == SJ_OK) {
        m->params = m->be->alloc(sizeof(float) * m->n_params, "parameters");
        m->grads = m->params ? m->be->alloc(sizeof(float) * m->n_params, "gradients") : NULL;
        if (!m->params || !m->grads) s = SJ_ERR_NOMEM;
    }
    if (s != SJ_OK) { sj_model_free(m); return s; }
    sj_model_account(m, 2 * (int64_t)sizeof(float) * m->n_params);
    init_params(m, seed);
    sj_model_zero_grad(m);
    *out = m;
    return SJ_OK;
}

void sj_model_free(sj_model *m) {
    if (!m) return;
    for (int i = 0; i < SJ_MAX_PLANS; i++)
        if (m->plans[i].used) sj_tape_free(&m->plans[i].tape, m->be);
    if (m->params) m->be->free(m->params);
    if (m->grads) m->be->free(m->grads);
    free(m->rows_host);
    free(m->tensors);
    free(m->names);
    free(m);
}

const sj_config *sj_model_config(const sj_model *m) { return &m->cfg; }
int sj_model_n_tensors(const sj_model *m) { return m->n_tensors; }
const sj_tensor_info *sj_model_tensor(const sj_model *m, int i) {
    return i >= 0 && i < m->n_tensors ? &m->tensors[i] : NULL;
}
float *sj_model_params(sj_model *m, int64_t *n) { if (n) *n = m->n_params; return m->params; }
float *sj_model_grads(sj_model *m, int64_t *n) { if (n) *n = m->n_params; return m->grads; }
void sj_model_zero_grad(sj_model *m) { m->be->fill(m->grads, 0.0f, m->n_params); }
int64_t sj_model_bytes(const sj_model *m) { return m->bytes; }
int64_t sj_model_peak_bytes(const sj_model *m) { return m->peak_bytes; }

/* Record the whole forward pass (and the loss) for one (B, T, mode). */
static sj_status record(sj_model *m, sj_plan *pl) {
    const sj_config *c = &m->cfg;
    sj_tape *tp = &pl->tape;
    const int B = pl->B, T = pl->T, N = B * T, C = c->dim, H = c->n_heads, KV = c->n_kv_heads,
              hd = C / H, F = c->ffn_dim, V = c->vocab_size;
    #define PARAM(fmt, l, rows) \
        sj_tape_param(tp, find(m, fmt, l)->offset, (int64_t)(rows) * find(m, fmt, l)->shape[1])
    #define NORM(fmt, l) sj_tape_param(tp, find(m, fmt, l)->offset, C)
    pl->tokens = sj_tape_tensor(tp, SJ_T_EXTERN, N);
    int x = sj_op_embedding(tp, pl->tokens, PARAM("tok_emb%.0d", 0, V), N, C);
    for (int l = 0; l < c->n_layers; l++) {
        int h = sj_op_rmsnorm(tp, x, NORM("layers.%d.attn_norm", l), N, C, c->norm_eps);
        int qkv = sj_op_matmul(tp, h, PARAM("layers.%d.wq", l, (H + 2 * KV) * hd), N,
                               (H + 2 * KV) * hd, C);
        qkv = sj_op_rope(tp, qkv, B, T, H + 2 * KV, H + KV, hd, c->rope_theta);
        int a = sj_op_attention(tp, qkv, B, T, H, KV, hd);
        x = sj_op_add(tp, x, sj_op_matmul(tp, a, PARAM("layers.%d.wo", l, C), N, C, H * hd),
                      (int64_t)N * C);
        h = sj_op_rmsnorm(tp, x, NORM("layers.%d.ffn_norm", l), N, C, c->norm_eps);
        int gu = sj_op_matmul(tp, h, PARAM("layers.%d.w_gate", l, 2 * F), N, 2 * F, C);
        int s = sj_op_swiglu(tp, gu, N, F);
        x = sj_op_add(tp, x, sj_op_matmul(tp, s, PARAM("layers.%d.w_down", l, C), N, C, F),
                      (int64_t)N * C);
    }
    int h = sj_op_rmsnorm(tp, x, NORM("final_norm%.0d", 0), N, C, c->norm_eps);
    pl->logits = sj_op_matmul(tp, h, PARAM("tok_emb%.0d", 0, V), N, V, C);  /* tied head */
    #undef PARAM
    #undef NORM
    if (pl->logits < 0) return SJ_ERR_NOMEM;
    if (pl->mode == SJ_RUN_LOGITS) {
        tp->t[pl->logits].kind = SJ_T_EXTERN;   /* written straight into the caller's array */
        return SJ_OK;
    }
    pl->targets = sj_tape_tensor(tp, SJ_T_EXTERN, N);
    pl->losses = sj_op_cross_entropy(tp, pl->logits, pl->targets, N, V, -1);
    return pl->losses < 0 ? SJ_ERR_NOMEM : SJ_OK;
}

/* The plan for (B, T, mode): reused when present, else recorded and planned,
 * evicting the least recently used one. */
static sj_status get_plan(sj_model *m, int B, int T, sj_run_mode mode, sj_plan **out) {
    sj_plan *victim = &m->plans[0];
    for (int i = 0; i < SJ_MAX_PLANS; i++) {
        sj_plan *p = &m->plans[i];
        if (p->used && p->B == B && p->T == T && p->mode == mode) {
            p->last_use = ++m->clock;
            *out = p;
            return SJ_OK;
        }
        if (!p->used || (victim->used && p->last_use < victim->last_use)) victim = p;
    }
    if (victim->used) {
        sj_model_account(m, -victim->tape.arena_bytes);
        sj_tape_free(&victim->tape, m->be);
        victim->used = 0;
    }
    sj_plan *pl = victim;
    memset(pl, 0, sizeof *pl);
    pl->B = B; pl->T = T; pl->mode = mode;
    sj_tape_init(&pl->tape, mode == SJ_RUN_TRAIN);
    sj_status s = record(m, pl);
    if (s == SJ_OK) s = sj_tape_plan(&pl->tape, m->be);
    if (s != SJ_OK) { sj_tape_free(&pl->tape, m->be); return s; }
    pl->used = 1;
    pl->last_use = ++m->clock;
    sj_model_account(m, pl->tape.arena_bytes);
    *out = pl;
    return SJ_OK;
}

static sj_status check_tokens(const sj_model *m, const void *tok, sj_dtype dt, int64_t n,
                              int T, const char *what, int allow_ignore, int ignore) {
    if (dt != SJ_I32 && dt != SJ_U16) return sj_fail(SJ_ERR_ARG, "%s must be int32 or uint16", what);
    for (int64_t i = 0; i < n; i++) {
        int64_t v = dt == SJ_U16 ? ((const uint16_t *)tok)[i] : ((const int32_t *)tok)[i];
        if (allow_ignore && v == ignore) continue;
        if (v < 0 || v >= m->cfg.vocab_size)
            return sj_fail(SJ_ERR_ARG, "%s[%lld, %lld] = %lld is out of range for vocab_size %d",
                           what, (long long)(i / T), (long long)(i % T), (long long)v,
                           m->cfg.vocab_size);
    }
    return SJ_OK;
}

static sj_status check_shape(const sj_model *m, int B, int T) {
    if (B < 1 || T < 1) return sj_fail(SJ_ERR_ARG, "batch and sequence must be >= 1, got (%d, %d)", B, T);
    if (T > m->cfg.max_seq_len)
        return sj_fail(SJ_ERR_ARG, "sequence length %d exceeds max_seq_len %d", T, m->cfg.max_seq_len);
    if ((int64_t)B * T > (1 << 28))
        return sj_fail(SJ_ERR_ARG, "batch*seq = %lld is too large (at most 2^28)", (long long)B * T);
    return SJ_OK;
}

sj_status sj_model_forward(sj_model *m, const void *tokens, sj_dtype tok_dtype,
                           int B, int T, float *logits) {
    SJ_TRY(check_shape(m, B, T));
    SJ_TRY(check_tokens(m, tokens, tok_dtype, (int64_t)B * T, T, "tokens", 0, 0));
    sj_plan *pl;
    SJ_TRY(get_plan(m, B, T, SJ_RUN_LOGITS, &pl));
    pl->tape.t[pl->tokens].ptr = (void *)tokens;
    pl->tape.t[pl->tokens].dtype = tok_dtype;
    pl->tape.t[pl->logits].ptr = logits;
    return sj_tape_forward(&pl->tape, m->be, m->params);
}

sj_status sj_model_loss(sj_model *m, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T, int ignore_index,
                        int backward, float *loss) {
    const int64_t N = (int64_t)B * T;
    SJ_TRY(check_shape(m, B, T));
    if (tok_dtype == SJ_U16) ignore_index = -1;   /* no uint16 value can be ignored */
    SJ_TRY(check_tokens(m, tokens, tok_dtype, N, T, "tokens", 0, 0));
    SJ_TRY(check_tokens(m, targets, tok_dtype, N, T, "targets", 1, ignore_index));
    sj_plan *pl;
    SJ_TRY(get_plan(m, B, T, backward ? SJ_RUN_TRAIN : SJ_RUN_LOSS, &pl));
    sj_tape *tp = &pl->tape;
    tp->t[pl->tokens].ptr = (void *)tokens; tp->t[pl->tokens].dtype = tok_dtype;
    tp->t[pl->targets].ptr = (void *)targets; tp->t[pl->targets].dtype = tok_dtype;
    /* The loss node was recorded with ignore -1; the caller's index goes in here. */
    tp->nodes[tp->t[pl->losses].producer].dim[2] = ignore_index;
    SJ_TRY(sj_tape_forward(tp, m->be, m->params));
    int64_t count = 0;
    for (int64_t i = 0; i < N; i++)
        count += sj_token_at(targets, tok_dtype, i) != ignore_index;
    if (m->n_rows_host < N) {
        float *r = realloc(m->rows_host, sizeof(float) * N);
        if (!r) return sj_fail(SJ_ERR_NOMEM, "loss: out of memory");
        m->rows_host = r; m->n_rows_host = N;
    }
    float *rows = m->rows_host;
    m->be->to_host(rows, sj_tape_ptr(tp, pl->losses, m->params), sizeof(float) * N);
    double sum = 0.0;
    for (int64_t i = 0; i < N; i++) sum += rows[i];
    *loss = count ? (float)(sum / (double)count) : NAN;
    if (!backward) return SJ_OK;
    tp->loss_scale = count ? 1.0f / (float)count : 0.0f;
    return sj_tape_backward(tp, m->be, m->params, m->grads);
}
