/* model.c — the decoder a config describes (docs/architectures.md): the
 * parameter table over one flat buffer, initialisation, and the forward
 * pass, each layer spelled from its kinds, recorded on a tape per (B, T). */
#include "model.h"
#include "mamba2.h"
#include "../infer/infer.h"   /* sj_f16_to_f32: fp16 logits to the host */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sj_model_account(sj_model *m, int64_t delta) {
    m->bytes += delta;
    if (m->bytes > m->peak_bytes) m->peak_bytes = m->bytes;
}


/* Layout: every matrix first (weight decay by default), then every norm gain (none).
 * wq|wk|wv are adjacent, so they are one fused (q+2kv, C) matrix for the
 * QKV projection; w_gate|w_up likewise form one (2F, C) matrix. */
static sj_status build_table(sj_model *m) {
    const sj_config *c = &m->cfg;
    int64_t C = c->dim, hd = C / c->n_heads, qd = (int64_t)c->n_heads * hd,
            kvd = (int64_t)c->n_kv_heads * hd, F = c->ffn_dim,
            od = c->paired_heads ? qd / 2 : qd;   /* what attention hands wo */
    int n = 2 + 20 * c->n_layers + 1;   /* at most 20 tensors a layer (mamba2 with MoE: 17) */
    m->tensors = calloc((size_t)n, sizeof(sj_tensor_info));
    m->names = calloc((size_t)n, SJ_NAME_MAX);
    if (!m->tensors || !m->names) return sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    int64_t off = 0;
    int i = 0;
    #define ADD(fmt, l, d0, d1, nd) do {                                         \
        sj_tensor_info *t = &m->tensors[i];                                     \
        char *nm = m->names + SJ_NAME_MAX * i++;                                \
        snprintf(nm, SJ_NAME_MAX, fmt, l);                                      \
        t->name = nm; t->ndim = nd; t->shape[0] = d0; t->shape[1] = d1;         \
        t->numel = (nd == 2 ? (d0) * (d1) : (d0)); t->offset = off;             \
        t->decay = nd == 2; off += t->numel;                                    \
    } while (0)
    ADD("tok_emb%.0d", 0, (int64_t)c->vocab_size, C, 2);
    const sj_mla *a = &c->mla;
    const int64_t mla_hq = a->qk_nope_head_dim + a->qk_rope_head_dim;
    const sj_mamba2_shape S = sj_mamba2_shape_of(c);
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layers[l].mixer == SJ_MIXER_MAMBA2) {
            ADD("layers.%d.ssm.in_proj", l, (int64_t)S.d_in_proj, C, 2);
            ADD("layers.%d.ssm.conv_w", l, (int64_t)S.conv_dim, (int64_t)S.K, 2);
            ADD("layers.%d.ssm.out_proj", l, C, (int64_t)S.d_inner, 2);
        } else if (c->layers[l].mixer == SJ_MIXER_LINEAR) {   /* wq|wk|wv|wg: one projection */
            ADD("layers.%d.wq", l, C, C, 2);
            ADD("layers.%d.wk", l, C, C, 2);
            ADD("layers.%d.wv", l, C, C, 2);
            if (c->linear.decay == SJ_LINEAR_DECAY_GATED) ADD("layers.%d.wg", l, (int64_t)c->n_heads, C, 2);
            ADD("layers.%d.wo", l, C, C, 2);
        } else if (c->layers[l].mixer == SJ_MIXER_MLA) {
            if (a->q_lora_rank) {
                ADD("layers.%d.mla.q_a_proj", l, (int64_t)a->q_lora_rank, C, 2);
                ADD("layers.%d.mla.q_b_proj", l, c->n_heads * mla_hq, (int64_t)a->q_lora_rank, 2);
            } else {
                ADD("layers.%d.wq", l, c->n_heads * mla_hq, C, 2);   /* as attention's: q_proj */
            }
            ADD("layers.%d.mla.kv_a_proj", l, (int64_t)a->kv_lora_rank + a->qk_rope_head_dim, C, 2);
            ADD("layers.%d.mla.kv_b_proj", l,
                (int64_t)c->n_heads * (a->qk_nope_head_dim + a->v_head_dim), (int64_t)a->kv_lora_rank, 2);
            ADD("layers.%d.wo", l, C, (int64_t)c->n_heads * a->v_head_dim, 2);
        } else {
            ADD("layers.%d.wq", l, qd, C, 2);
            ADD("layers.%d.wk", l, kvd, C, 2);
            ADD("layers.%d.wv", l, kvd, C, 2);
            ADD("layers.%d.wo", l, C, od, 2);
        }
        const sj_moe_config *e = &c->moe;
        const int moe = c->layers[l].ffn == SJ_FFN_MOE;
        const int64_t Fl = moe ? (int64_t)e->n_shared * e->expert_dim
                         : c->layers[l].ffn == SJ_FFN_NONE ? 0 : F;   /* dense, shared or none */
        if (Fl) {
            ADD("layers.%d.w_gate", l, Fl, C, 2);
            ADD("layers.%d.w_up", l, Fl, C, 2);
            ADD("layers.%d.w_down", l, C, Fl, 2);
        }
        if (moe) {
            ADD("layers.%d.moe.router", l, (int64_t)e->n_experts, C, 2);
            ADD("layers.%d.moe.w_gate_up", l, (int64_t)e->n_experts * 2 * e->expert_dim, C, 2);
            ADD("layers.%d.moe.w_down", l, (int64_t)e->n_experts * C, e->expert_dim, 2);
        }
    }
    if (c->untied_head) ADD("lm_head%.0d", 0, (int64_t)c->vocab_size, C, 2);
    for (int l = 0; l < c->n_layers; l++) {
        ADD("layers.%d.attn_norm", l, C, 0, 1);
        if (c->layers[l].ffn != SJ_FFN_NONE) ADD("layers.%d.ffn_norm", l, C, 0, 1);
        if (c->layers[l].mixer == SJ_MIXER_MAMBA2) {   /* dt_bias, A_log adjacent: one view */
            ADD("layers.%d.ssm.conv_b", l, (int64_t)S.conv_dim, 0, 1);
            ADD("layers.%d.ssm.dt_bias", l, (int64_t)S.H, 0, 1);
            ADD("layers.%d.ssm.A_log", l, (int64_t)S.H, 0, 1);
            ADD("layers.%d.ssm.D", l, (int64_t)S.H, 0, 1);
            ADD("layers.%d.ssm.norm", l, (int64_t)S.d_inner, 0, 1);
        }
        if (c->layers[l].qk_norm == SJ_QK_NORM_WEIGHTED) {
            ADD("layers.%d.q_norm", l, hd, 0, 1);
            ADD("layers.%d.k_norm", l, hd, 0, 1);
        }
        if (c->layers[l].ffn == SJ_FFN_MOE && c->moe.router == SJ_MOE_SIGMOID)
            ADD("layers.%d.moe.router_bias", l, (int64_t)c->moe.n_experts, 0, 1);
        if (c->layers[l].mixer == SJ_MIXER_MLA) {
            if (a->q_lora_rank) ADD("layers.%d.mla.q_a_norm", l, (int64_t)a->q_lora_rank, 0, 1);
            ADD("layers.%d.mla.kv_a_norm", l, (int64_t)a->kv_lora_rank, 0, 1);
        }
    }
    ADD("final_norm%.0d", 0, C, 0, 1);
    #undef ADD
    m->n_tensors = i;
    m->n_params = off;
    return SJ_OK;
}

static const sj_tensor_info *find(const sj_model *m, const char *fmt, int l) {
    char name[SJ_NAME_MAX];
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
        if (!t->decay) {   /* norm gains start at 1, the MoE router's balancing bias at 0 */
            const float v = strstr(t->name, ".router_bias") ? 0.0f : 1.0f;
            for (int64_t k = 0; k < t->numel; k++) p[k] = v;
            continue;
        }
        /* GPT-2's scaled init for the projections that feed the residual stream. */
        const char *dot = strrchr(t->name, '.');
        int resid = dot && (!strcmp(dot, ".wo") || !strcmp(dot, ".w_down") || !strcmp(dot, ".out_proj"));
        int64_t full = t->numel >> 16;
        init_job j = { p, resid ? resid_std : std, seed, (int64_t)i << 32 };
        sj_parallel_for(full, 1, init_chunks, &j);
        sj_rng r;
        sj_rng_seed(&r, seed ^ ((uint64_t)i << 32 | 0xFFFFFFFFu));
        for (int64_t k = full << 16; k < t->numel; k++) p[k] = j.std * sj_rng_normal(&r);
    }
    sj_mamba2_init(m->params, m->tensors, m->n_tensors, &m->cfg, seed);
}

static void drop_plan(sj_model *m, sj_plan *pl) {
    if (!pl->used) return;
    sj_model_account(m, -pl->tape.arena_bytes);
    if (pl->graph) m->be->graph_free(pl->graph);
    if (pl->host) m->be->host_free(pl->host);
    sj_tape_free(&pl->tape, m->be);
    memset(pl, 0, sizeof *pl);
}

/* The gradients come into being (zero-filled) on first use: backward, the
 * optimizer step, or a caller asking for them. A model used only for forward
 * passes or generation never holds them (4 bytes a parameter). Never called
 * inside a graph capture: the train path calls it in sj_model_prepare, so a
 * captured step sees the final pointer. */
sj_status sj_model_need_grads(sj_model *m) {
    if (m->grads) return SJ_OK;
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    const sj_backend *be = m->be;
    const size_t bytes = sizeof(float) * (size_t)m->n_params;
    SJ_TRY(sj_model_check_memory(m, m->device, (int64_t)bytes, 1, "the gradients"));
    be->bind(m->ctx);
    if (!(m->grads = be->alloc(bytes, "gradients"))) return SJ_ERR_NOMEM;
    sj_model_account(m, (int64_t)bytes);
    be->fill(m->grads, 0.0f, m->n_params);
    return be->sync();
}

/* A 16-bit model's forward and loss runs cast each weight from the f32
 * master right before use, as autocast does, while the model holds no
 * compute copy of its weights: one that never trained (evaluation,
 * generation) keeps 2 bytes a parameter less. Training makes the copy, and
 * from then on every run reads it, unless the cast_on_use lever drops it. */
static int casts_weights(const sj_model *m, sj_run_mode mode) {
    return (m->lv.cast_on_use || !m->params_act) && !sj_run_trains(mode) &&
           m->be->act_dtype != SJ_F32;
}

/* The compute copy of the weights in the act dtype, made from the master
 * when a training run needs it; plans that cast are dropped, so that the
 * next run of their shape reads it. Like sj_model_need_grads, never inside
 * a capture. */
static sj_status need_compute_copy(sj_model *m) {
    if (m->params_act) return SJ_OK;
    const sj_backend *be = m->be;
    const size_t ab = sj_dtype_size(be->act_dtype) * (size_t)m->n_params;
    SJ_TRY(sj_model_check_memory(m, m->device, (int64_t)ab, 1,
                                 "the 16-bit compute copy of the parameters"));
    be->bind(m->ctx);
    SJ_TRY(be->sync());   /* no casting plan still running */
    for (int i = 0; i < SJ_MAX_PLANS; i++)
        if (m->plans[i].used && m->plans[i].casts) drop_plan(m, &m->plans[i]);
    if (!(m->params_act = be->alloc(ab, "compute copy of the parameters"))) return SJ_ERR_NOMEM;
    sj_model_account(m, (int64_t)ab);
    be->convert(m->params_act, be->act_dtype, m->params, SJ_F32, m->n_params);
    return be->sync();
}

static void drop_compute_copy(sj_model *m) {
    if (!m->params_act || m->params_act == m->params) return;
    m->be->free(m->params_act);
    sj_model_account(m, -(int64_t)sj_dtype_size(m->be->act_dtype) * m->n_params);
    m->params_act = NULL;
}

/* Device-side state of a model: buffers on m->be, filled from host copies
 * (hp: f32 params; hg: f32 grads, or NULL when there are none yet). */
static sj_status attach(sj_model *m, const float *hp, const float *hg) {
    const sj_backend *be = m->be;
    const size_t bytes = sizeof(float) * (size_t)m->n_params;
    m->ctx = be->ctx_create();
    if (!m->ctx) return SJ_ERR_NOMEM;
    SJ_TRY(sj_model_check_memory(m, m->device, (int64_t)bytes, 1, "the parameters"));
    be->bind(m->ctx);
    if (!(m->params = be->alloc(bytes, "parameters"))) return SJ_ERR_NOMEM;
    sj_model_account(m, (int64_t)bytes);
    m->params_act = be->act_dtype == SJ_F32 ? m->params : NULL;
    m->scalars = be->alloc(sizeof(sj_scalars), "step scalars");
    m->scalars_host = m->scalars ? be->host_alloc(2 * sizeof(sj_scalars), "step scalars") : NULL;
    if (!m->scalars_host) return SJ_ERR_NOMEM;
    memset(m->scalars_host, 0, 2 * sizeof(sj_scalars));
    SJ_TRY(sj_moe_attach(m));
    if (hp && hp != m->params) be->from_host(m->params, hp, bytes);
    if (hg) {
        SJ_TRY(sj_model_need_grads(m));
        be->from_host(m->grads, hg, bytes);
    }
    return be->sync();
}

static void detach(sj_model *m) {
    const sj_backend *be = m->be;
    if (!be) return;
    if (m->ctx) be->bind(m->ctx);
    for (int i = 0; i < SJ_MAX_PLANS; i++) drop_plan(m, &m->plans[i]);
    const int64_t bytes = 4 * m->n_params;
    drop_compute_copy(m);
    if (m->params) { be->free(m->params); sj_model_account(m, -bytes); }
    if (m->grads) { be->free(m->grads); sj_model_account(m, -bytes); }
    if (m->scalars) be->free(m->scalars);
    if (m->scalars_host) be->host_free(m->scalars_host);
    sj_moe_detach(m);
    if (m->ctx) be->ctx_free(m->ctx);
    m->params = m->grads = NULL;
    m->params_act = NULL;
    m->scalars = m->scalars_host = NULL;
    m->ctx = NULL;
}

/* The row stride of the logits that loss and train runs keep to themselves:
 * the vocabulary rounded up to a multiple of 64 elements, so that any
 * vocabulary (GPT-2's 50257) keeps the head's GEMMs and the cross-entropy on
 * their aligned, vectorised paths (the columns past it are never read).
 * SMEDJAN_VOCAB_ALIGN sets another multiple (tests: 1 packs the rows). */
static int vocab_stride(int V) {
    const char *e = getenv("SMEDJAN_VOCAB_ALIGN");
    const long a = e && e[0] ? strtol(e, NULL, 10) : 64;
    if (a <= 1 || a > 4096) return V;
    const int64_t ld = ((int64_t)V + a - 1) / a * a;
    return ld > INT32_MAX ? V : (int)ld;
}

sj_status sj_model_create_ex(const sj_config *c, uint64_t seed, sj_device device,
                             sj_dtype dtype, sj_model **out) {
    *out = NULL;
    SJ_TRY(sj_config_validate(c));
    const sj_backend *be = NULL;
    SJ_TRY(sj_backend_for(device, dtype, &be));
    sj_model *m = calloc(1, sizeof *m);
    if (!m) return sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    m->cfg = *c;
    m->be = be;
    m->device = device;
    m->dtype = dtype;
    m->epoch = 1;
    m->vocab_ld = vocab_stride(c->vocab_size);
    const char *g = getenv("SMEDJAN_GRAPHS");
    m->use_graphs = !(g && g[0] == '0') && device == SJ_DEVICE_CUDA;
    sj_status s = build_table(m);
    float *host = NULL;
    if (s == SJ_OK && !(m->sort_count = calloc((size_t)c->vocab_size + 1, sizeof(int32_t))))
        s = sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    if (s == SJ_OK && be->device) {
        /* Device memory first (an out-of-memory error comes before any host
         * work); then initialise on the host (the same weights on every
         * device) and upload. */
        s = attach(m, NULL, NULL);
        if (s == SJ_OK)
            s = sj_model_check_memory(m, SJ_DEVICE_CPU, 4 * m->n_params, 0,
                                      "the parameters' host staging (initialised on the host)");
        if (s == SJ_OK && !(host = sj_alloc(sizeof(float) * (size_t)m->n_params,
                                            "parameters (host staging)")))
            s = SJ_ERR_NOMEM;
        if (s == SJ_OK) {
            float *dev = m->params;
            m->params = host;
            init_params(m, seed);
            m->params = dev;
            be->from_host(m->params, host, sizeof(float) * (size_t)m->n_params);
            s = sj_model_params_updated(m);
        }
        sj_free(host);
    } else if (s == SJ_OK) {
        s = attach(m, NULL, NULL);   /* CPU: allocate, then initialise in place */
        if (s == SJ_OK) init_params(m, seed);
    }
    if (s != SJ_OK) { sj_model_free(m); return s; }
    *out = m;
    return SJ_OK;
}

sj_status sj_model_create(const sj_config *c, uint64_t seed, sj_model **out) {
    return sj_model_create_ex(c, seed, SJ_DEVICE_CPU, SJ_F32, out);
}

sj_status sj_model_to(sj_model *m, sj_device device, sj_dtype dtype) {
    if (device == m->device && dtype == m->dtype) return SJ_OK;
    const sj_backend *nb = NULL;
    SJ_TRY(sj_backend_for(device, dtype, &nb));
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    const size_t bytes = sizeof(float) * (size_t)m->n_params;
    /* Before anything moves: the host staging, and the new device's room for
     * what travels (where the old buffers are freed first, in the same
     * memory, their room comes back before the new ones are made). */
    const int64_t moving = (int64_t)bytes * (m->grads ? 2 : 1);
    const int to_host = nb->device == 0, from_host = m->be->device == 0;
    SJ_TRY(sj_model_check_memory(m, SJ_DEVICE_CPU, moving * (to_host && !from_host ? 2 : 1), 0,
                                 "the move's host staging and the parameters and gradients"));
    if (!to_host && from_host)
        SJ_TRY(sj_model_check_memory(m, device, moving, 0, "the parameters and gradients"));
    /* Gradients travel only if they exist: no staging for ones never made. */
    float *hp = sj_alloc(bytes, "parameters (host staging)");
    float *hg = hp && m->grads ? sj_alloc(bytes, "gradients (host staging)") : NULL;
    if (!hp || (m->grads && !hg)) { sj_free(hp); return SJ_ERR_NOMEM; }
    m->be->bind(m->ctx);
    sj_status s = m->be->sync();
    if (s == SJ_OK) {
        m->be->to_host(hp, m->params, bytes);
        if (hg) m->be->to_host(hg, m->grads, bytes);
        s = m->be->sync();
    }
    if (s != SJ_OK) { sj_free(hp); sj_free(hg); return s; }
    detach(m);
    m->be = nb; m->device = device; m->dtype = dtype;
    if (device != SJ_DEVICE_CUDA) m->use_graphs = 0;
    m->epoch++;
    s = attach(m, hp, hg);
    sj_free(hp); sj_free(hg);
    /* A failed attach leaves no usable buffers: the model cannot run until a
     * later to() succeeds; the error says why. */
    return s;
}

void sj_model_free(sj_model *m) {
    if (!m) return;
    detach(m);
    free(m->rows_host);
    free(m->sort_count);
    free(m->moe_routes);
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
float *sj_model_grads(sj_model *m, int64_t *n) {
    if (n) *n = m->n_params;
    return sj_model_need_grads(m) == SJ_OK ? m->grads : NULL;
}
void sj_model_zero_grad(sj_model *m) {
    if (!m->grads) return;   /* none yet: they are zero when they come */
    m->be->bind(m->ctx);
    m->be->fill(m->grads, 0.0f, m->n_params);
    m->be->sync();
}
sj_status sj_model_params_finite(sj_model *m, int i, int *finite) {
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    if (i < -1 || i >= m->n_tensors)
        return sj_fail(SJ_ERR_ARG, "tensor index %d out of range [-1, %d)", i, m->n_tensors);
    const sj_backend *be = m->be;
    const float *p = i < 0 ? m->params : m->params + m->tensors[i].offset;
    const int64_t n = i < 0 ? m->n_params : m->tensors[i].numel;
    /* A sum of squares in double is finite exactly when every f32 value is. */
    be->bind(m->ctx);
    be->sumsq(&m->scalars->hp.sumsq, p, n);
    be->to_host_async(&m->scalars_host[1].hp.sumsq, &m->scalars->hp.sumsq, sizeof(double));
    SJ_TRY(be->sync());
    *finite = isfinite(m->scalars_host[1].hp.sumsq) != 0;
    return SJ_OK;
}

int64_t sj_model_bytes(const sj_model *m) { return m->bytes; }
int64_t sj_model_peak_bytes(const sj_model *m) { return m->peak_bytes; }
sj_device sj_model_device(const sj_model *m) { return m->device; }
sj_dtype sj_model_dtype(const sj_model *m) { return m->dtype; }
void sj_model_set_graphs(sj_model *m, int on) { m->use_graphs = on && m->device == SJ_DEVICE_CUDA; }

sj_status sj_model_params_updated(sj_model *m) {
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    if (!m->params_act || m->params_act == m->params) return SJ_OK;   /* none, or the master */
    m->be->bind(m->ctx);
    m->be->convert(m->params_act, m->be->act_dtype, m->params, SJ_F32, m->n_params);
    return m->be->sync();
}

int sj_model_weight(const sj_model *m, sj_plan *pl, const char *fmt, int l, int64_t row0,
                    int64_t rows) {
    const sj_tensor_info *t = find(m, fmt, l);
    if (!t) return sj_fail(SJ_ERR_ARG, "model: layer %d lacks a tensor (%s)", l, fmt), -1;
    const int64_t row = t->ndim == 2 ? t->shape[1] : 1, off = t->offset + row0 * row, n = rows * row;
    sj_tape *tp = &pl->tape;
    return pl->casts ? sj_op_cast(tp, sj_tape_master(tp, off, n)) : sj_tape_param(tp, off, n);
}

/* x + a @ w^T: one GEMM with the residual as its addend; the tests'
 * reference records the separate matmul and add. */
static int residual(const sj_plan *pl, sj_tape *tp, int x, int a, int w, int N, int C,
                    int in_features) {
    if (pl->unfused)
        return sj_op_add(tp, x, sj_op_matmul(tp, a, w, N, C, in_features), (int64_t)N * C);
    return sj_op_matmul_add(tp, x, a, w, N, C, in_features);
}

/* The tape of a new plan, levers applied. */
static void tape_init(const sj_model *m, sj_plan *pl, int dry) {
    sj_tape_init(&pl->tape, sj_run_trains(pl->mode), m->be->act_dtype, m->be->device);
    pl->tape.arena_grads = pl->mode == SJ_RUN_STEP ? m->n_params : 0;
    pl->tape.checkpoint = m->lv.gradient_checkpointing || m->lv.cheap_recompute;
    pl->tape.f16_act = m->lv.fp16_activations;
    pl->tape.dry = dry;
    /* Tests only, the reference: "1" as before this fusion (matmul + add, no
     * storage shared in place), "add": matmul + add with in-place planning. */
    const char *u = getenv("SMEDJAN_UNFUSED");
    pl->unfused = u && u[0] && strcmp(u, "0") != 0;
    pl->tape.no_inplace = pl->unfused && strcmp(u, "add") != 0;
}

/* Record the whole forward pass (and the loss) for one (B, T, mode). */
static sj_status record(sj_model *m, sj_plan *pl) {
    const sj_config *c = &m->cfg;
    sj_tape *tp = &pl->tape;
    const int B = pl->B, T = pl->T, N = B * T, C = c->dim, H = c->n_heads, KV = c->n_kv_heads,
              hd = C / H, F = c->ffn_dim, V = c->vocab_size;
    const int cast = pl->casts = casts_weights(m, pl->mode);
    #define WEIGHT(off, n) (cast ? sj_op_cast(tp, sj_tape_master(tp, (off), (n))) \
                                 : sj_tape_param(tp, (off), (n)))
    #define PARAM(fmt, l, rows) WEIGHT(find(m, fmt, l)->offset, (int64_t)(rows) * find(m, fmt, l)->shape[1])
    #define NORM(fmt, l) WEIGHT(find(m, fmt, l)->offset, C)
    SJ_TRY(sj_rope_init(&pl->rope, c, T));
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].mixer == SJ_MIXER_MLA) {
            SJ_TRY(sj_rope_init_hd(&pl->rope_mla, c, T, c->mla.qk_rope_head_dim));
            break;
        }
    pl->tokens = sj_tape_tensor(tp, SJ_T_EXTERN, N);
    int x = sj_op_embedding(tp, pl->tokens, PARAM("tok_emb%.0d", 0, V), N, C);
    /* Checkpointed blocks: whole layers, or (cheap recompute) just an
     * elementwise op and the projection that reads it, so that only that
     * op's output (a norm's, SwiGLU's) is dropped and redone in backward. */
    const int layer_blocks = m->lv.gradient_checkpointing, op_blocks = !layer_blocks && m->lv.cheap_recompute;
    /* The QKV product is rotated and the gate/up product gated as they are
     * made (one node each). Cheap recompute keeps SwiGLU apart: it drops
     * SwiGLU's output and redoes it from gu, not from a GEMM. */
    const int fuse = !pl->unfused, fuse_swiglu = fuse && (!sj_run_trains(pl->mode) || !op_blocks);
    #define OP_BLOCK_BEGIN() do { if (op_blocks) SJ_TRY(sj_tape_block_begin(tp)); } while (0)
    #define OP_BLOCK_END() do { if (op_blocks) SJ_TRY(sj_tape_block_end(tp)); } while (0)
    /* Paired heads: attention runs at Ha query and KVa kv heads; a qkv row
     * then holds (Ha + 2 KVa) heads. */
    const int Ha = c->paired_heads ? H / 2 : H, KVa = c->paired_heads ? KV / 2 : KV,
              Wa = (Ha + 2 * KVa) * hd;
    const int emb = x;   /* embed skip adds it back into every later layer */
    int qkv0 = -1;       /* layer 0's qkv: value mix reads its v */
    for (int l = 0; l < c->n_layers; l++) {
        const sj_layer *y = &c->layers[l];
        if (layer_blocks) SJ_TRY(sj_tape_block_begin(tp));
        if (l > 0 && c->embed_skip != 0) x = sj_op_axpy(tp, x, emb, c->embed_skip, (int64_t)N * C);
        OP_BLOCK_BEGIN();
        int h = sj_op_rmsnorm(tp, x, NORM("layers.%d.attn_norm", l), N, C, c->norm_eps);
        if (y->mixer == SJ_MIXER_MAMBA2) {
            if (!m->be->scan_forward)
                return sj_fail(SJ_ERR_ARG, "mamba2 layers: the %s backend has no scan kernels yet",
                               m->be->name);
            const sj_mamba2_shape S = sj_mamba2_shape_of(c);
            const int zx = sj_op_matmul(tp, h, PARAM("layers.%d.ssm.in_proj", l, S.d_in_proj), N,
                                        S.d_in_proj, C);
            OP_BLOCK_END();
            #define VEC(name, n) WEIGHT(find(m, "layers.%d.ssm." name, l)->offset, (n))
            const sj_mamba2_params w = { PARAM("layers.%d.ssm.conv_w", l, S.conv_dim),
                                         VEC("conv_b", S.conv_dim), VEC("dt_bias", 2 * S.H),
                                         VEC("D", S.H), VEC("norm", S.d_inner) };
            #undef VEC
            const int g = sj_mamba2_record(tp, c, &w, zx, B, T);
            x = residual(pl, tp, x, g, PARAM("layers.%d.ssm.out_proj", l, C), N, C, S.d_inner);
        } else if (y->mixer == SJ_MIXER_LINEAR) {
            if (!m->be->scan_forward)
                return sj_fail(SJ_ERR_ARG, "linear layers: the %s backend has no scan kernels yet",
                               m->be->name);
            const int rows = 3 * C + (c->linear.decay == SJ_LINEAR_DECAY_GATED ? H : 0);
            const int p = sj_op_matmul(tp, h, PARAM("layers.%d.wq", l, rows), N, rows, C);
            OP_BLOCK_END();
            const int o = sj_linear_record(tp, c, p, B, T);
            x = residual(pl, tp, x, o, PARAM("layers.%d.wo", l, C), N, C, C);
        } else if (y->mixer == SJ_MIXER_MLA) {
            const int a = sj_mla_record(m, pl, l, h, op_blocks);
            x = residual(pl, tp, x, a, PARAM("layers.%d.wo", l, C), N, C, H * c->mla.v_head_dim);
        } else {
            const int wqkv = PARAM("layers.%d.wq", l, (H + 2 * KV) * hd);
            int qkv;
            if (fuse && !c->paired_heads && y->qk_norm == SJ_QK_NORM_NONE) {
                qkv = sj_op_matmul_rope(tp, h, wqkv, B, T, H + 2 * KV, H + KV, hd, C, &pl->rope);
                OP_BLOCK_END();
            } else {
                /* Pairing averages the heads as projected, qk-norm normalises
                 * them before they turn (RoPE's angles are the same for every
                 * head, so only the norm fixes the order). */
                qkv = sj_op_matmul(tp, h, wqkv, N, (H + 2 * KV) * hd, C);
                OP_BLOCK_END();
                if (c->paired_heads) qkv = sj_op_pair_heads(tp, qkv, N, H + 2 * KV, hd);
                if (y->qk_norm != SJ_QK_NORM_NONE) {
                    const int gains = y->qk_norm == SJ_QK_NORM_WEIGHTED;
                    qkv = sj_op_qk_norm(tp, qkv, gains ? WEIGHT(find(m, "layers.%d.q_norm", l)->offset, hd) : -1,
                                        gains ? WEIGHT(find(m, "layers.%d.k_norm", l)->offset, hd) : -1,
                                        N, Ha, KVa, hd, c->norm_eps);
                }
                qkv = sj_op_rope(tp, qkv, B, T, Ha + 2 * KVa, Ha + KVa, hd, &pl->rope);
            }
            if (c->value_mix != 0) {
                if (l == 0) qkv0 = qkv;
                else qkv = sj_op_mix(tp, qkv, qkv0, N, Wa, (Ha + KVa) * hd, KVa * hd, c->value_mix);
            }
            int a = sj_op_attention(tp, qkv, B, T, Ha, KVa, hd, y->window);
            x = residual(pl, tp, x, a, PARAM("layers.%d.wo", l, C), N, C, Ha * hd);
        }
        if (y->ffn == SJ_FFN_NONE) {
            if (layer_blocks) SJ_TRY(sj_tape_block_end(tp));
            continue;
        }
        OP_BLOCK_BEGIN();
        h = sj_op_rmsnorm(tp, x, NORM("layers.%d.ffn_norm", l), N, C, c->norm_eps);
        if (y->ffn == SJ_FFN_MOE) {   /* routed experts, then the shared ones (moe.c) */
            OP_BLOCK_END();
            x = sj_op_add(tp, x, sj_moe_record_layer(m, tp, l, h, N, cast), (int64_t)N * C);
            const int Fs = c->moe.n_shared * c->moe.expert_dim;
            if (Fs)
                x = residual(pl, tp, x, sj_op_matmul_swiglu(tp, h, PARAM("layers.%d.w_gate", l, 2 * Fs),
                                                            N, Fs, C, SJ_FFN_SWIGLU, 1024),
                             PARAM("layers.%d.w_down", l, C), N, C, Fs);
            if (layer_blocks) SJ_TRY(sj_tape_block_end(tp));
            continue;
        }
        int s;
        if (fuse_swiglu) {
            s = sj_op_matmul_swiglu(tp, h, PARAM("layers.%d.w_gate", l, 2 * F), N, F, C,
                                    y->ffn, 1024);
        } else {
            int gu = sj_op_matmul(tp, h, PARAM("layers.%d.w_gate", l, 2 * F), N, 2 * F, C);
            OP_BLOCK_END();
            OP_BLOCK_BEGIN();
            s = sj_op_swiglu(tp, gu, N, F, y->ffn);
        }
        x = residual(pl, tp, x, s, PARAM("layers.%d.w_down", l, C), N, C, F);
        OP_BLOCK_END();
        if (layer_blocks) SJ_TRY(sj_tape_block_end(tp));
    }
    /* The sparse loss: only the label rows go on, gathered before the final
     * norm (which, like the head, works row by row). */
    const int R = pl->label_rows, rows = R ? R : N;
    if (R) {
        if ((pl->label_idx = sj_tape_tensor(tp, SJ_T_EXTERN, R)) < 0) return SJ_ERR_NOMEM;
        tp->t[pl->label_idx].dtype = SJ_I32;
        x = sj_op_gather_rows(tp, x, pl->label_idx, N, R, C);
    }
    OP_BLOCK_BEGIN();
    int h = sj_op_rmsnorm(tp, x, NORM("final_norm%.0d", 0), rows, C, c->norm_eps);
    /* An unaligned vocabulary (ld > V) takes the fused head over all rows
     * even without the lever: it alone runs the GEMMs at the padded
     * vocabulary (GPT-2's 50257 on an H100: 286K -> 424K tok/s). */
    const int odd_vocab = m->vocab_ld > V;
    const char *head = c->untied_head ? "lm_head%.0d" : "tok_emb%.0d";
    if ((m->lv.fused_ce || odd_vocab) && pl->mode != SJ_RUN_LOGITS) {
        pl->logits = -1;
        pl->targets = sj_tape_tensor(tp, SJ_T_EXTERN, rows);
        const int chunk = !m->lv.fused_ce ? rows : m->lv.ce_rows > 0 ? m->lv.ce_rows : 256;
        pl->losses = sj_op_lm_head_ce(tp, h, PARAM(head, 0, V), pl->targets, rows, V,
                                      m->vocab_ld, C, -1, chunk);
        OP_BLOCK_END();
        return pl->losses < 0 ? SJ_ERR_NOMEM : SJ_OK;
    }
    pl->logits = sj_op_matmul(tp, h, PARAM(head, 0, V), rows, V, C);
    OP_BLOCK_END();
    #undef PARAM
    #undef NORM
    #undef WEIGHT
    #undef OP_BLOCK_BEGIN
    #undef OP_BLOCK_END
    if (pl->logits < 0) return SJ_ERR_NOMEM;
    if (pl->mode == SJ_RUN_LOGITS) {
        /* Host backends write straight into the caller's array; device
         * backends keep the logits in the arena and copy them out. */
        if (!tp->device) { tp->t[pl->logits].kind = SJ_T_EXTERN; tp->t[pl->logits].dtype = SJ_F32; }
        return SJ_OK;
    }
    pl->targets = sj_tape_tensor(tp, SJ_T_EXTERN, rows);
    pl->losses = sj_op_cross_entropy(tp, pl->logits, pl->targets, rows, V, -1);
    return pl->losses < 0 ? SJ_ERR_NOMEM : SJ_OK;
}
/* The plan for (B, T, mode, label rows): reused when present, else recorded
 * and planned, evicting the least recently used one. */
static sj_status get_plan(sj_model *m, int B, int T, sj_run_mode mode, int label_rows,
                         sj_plan **out) {
    sj_plan *victim = &m->plans[0];
    for (int i = 0; i < SJ_MAX_PLANS; i++) {
        sj_plan *p = &m->plans[i];
        if (p->used && p->B == B && p->T == T && p->mode == mode &&
            p->label_rows == label_rows) {
            p->last_use = ++m->clock;
            *out = p;
            return SJ_OK;
        }
        if (!p->used || (victim->used && p->last_use < victim->last_use)) victim = p;
    }
    drop_plan(m, victim);
    sj_plan *pl = victim;
    memset(pl, 0, sizeof *pl);
    pl->B = B; pl->T = T; pl->mode = mode; pl->label_rows = label_rows;
    tape_init(m, pl, 0);
    m->plans_recorded++;
    pl->tape.loss_scale_ptr = m->be->device ? &m->scalars->loss_scale : NULL;
    const int64_t limit = m->lv.memory_limit;
    /* Pending: the gradients and compute copy a training run will bring
     * into being after this plan (sj_model_prepare); held: what the model
     * has now, plus those. The arena may take what both the limit and the
     * machine leave. */
    const int64_t pending = (mode == SJ_RUN_TRAIN && !m->grads ? 4 * m->n_params : 0) +
                            (!casts_weights(m, mode) && !m->params_act
                             ? (int64_t)sj_dtype_size(m->be->act_dtype) * m->n_params : 0);
    const int64_t held = m->bytes + pending;
    const int64_t avail = sj_mem_available(m->device, NULL, NULL);
    int by_machine = 0;
    if (limit > 0) pl->tape.budget = limit > held ? limit - held : 0;
    if (avail >= 0 && (pl->tape.budget < 0 || avail - pending < pl->tape.budget)) {
        pl->tape.budget = avail > pending ? avail - pending : 0;
        by_machine = 1;
    }
    static const char *const mode_names[] = { "forward", "loss", "backward", "train" };
    sj_status s = record(m, pl);
    if (s == SJ_OK) s = sj_tape_plan(&pl->tape, m->be);
    const int refused = s == SJ_ERR_NOMEM && pl->tape.budget >= 0 && !pl->tape.arena &&
                        pl->tape.arena_bytes > pl->tape.budget;
    if (refused && !by_machine) {
        s = sj_fail(SJ_ERR_NOMEM, "memory limit: batch %d x seq %d (%s) plans a peak of %.1f MiB "
                    "(%.1f MiB held: parameters, gradients, optimizer state, other plans; "
                    "+ %.1f MiB activation arena%s), over the limit of %.1f MiB; nothing was "
                    "allocated for it. Pull a lever: smaller --batch-size or --seq-len, "
                    "--grad-accum, --cheap-recompute, --gradient-checkpointing, --fused-ce",
                    B, T, mode_names[mode],
                    (double)(held + pl->tape.arena_bytes) / 1048576.0,
                    (double)held / 1048576.0, (double)pl->tape.arena_bytes / 1048576.0,
                    mode == SJ_RUN_STEP ? " with the step's gradients" : "", (double)limit / 1048576.0);
        sj_set_oom(&(sj_oom_info){ pending + pl->tape.arena_bytes, -1, m->bytes, limit, m->device });
    } else if (refused) {
        char what[160];
        snprintf(what, sizeof what, "a batch %d x seq %d (%s) run: its activation arena%s%s",
                 B, T, mode_names[mode], mode == SJ_RUN_STEP ? " with the step's gradients" : "",
                 pending ? " and the gradients or compute copy training brings" : "");
        s = sj_model_check_memory(m, m->device, pending + pl->tape.arena_bytes, 0, what);
        if (s == SJ_OK)   /* the machine's figure moved in between */
            s = sj_fail(SJ_ERR_NOMEM, "out of memory: %lld bytes asked for %s",
                        (long long)(pending + pl->tape.arena_bytes), what);
    }
    if (s == SJ_OK && (m->be->device || label_rows) &&
        !(pl->host = m->be->host_alloc((size_t)16 * B * T + (size_t)4 * label_rows,
                                       "staged tokens and losses")))
        s = SJ_ERR_NOMEM;
    if (s != SJ_OK) {
        if (pl->host) m->be->host_free(pl->host);
        sj_tape_free(&pl->tape, m->be);
        memset(pl, 0, sizeof *pl);
        return s;
    }
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

/* The sparse loss's rows: the label positions (targets not ignored) in
 * order and their targets, padded to label_rows with position -1 and an
 * ignored target (a padding row gathers zeros; its loss and gradient are 0). */
static void stage_labels(sj_plan *pl, const void *targets, sj_dtype dt, int ignore_index,
                         int32_t *tgt, int32_t *pos) {
    const int64_t N = (int64_t)pl->B * pl->T;
    int r = 0;
    for (int64_t i = 0; i < N; i++) {
        const int64_t v = sj_token_at(targets, dt, i);
        if (v == ignore_index) continue;
        pos[r] = (int32_t)i;
        tgt[r++] = (int32_t)v;
    }
    for (; r < pl->label_rows; r++) { pos[r] = -1; tgt[r] = ignore_index; }
}

/* Host side of the inputs. Host backends bind the caller's arrays (the
 * sparse loss's label rows: staged as on a device); device backends get
 * int32 copies in pinned memory (plus, for training, the rows stably
 * sorted by token: a counting sort) that enqueue() copies over. */
static void stage(sj_model *m, sj_plan *pl, const void *tokens, const void *targets,
                  sj_dtype dt, int ignore_index) {
    sj_tape *tp = &pl->tape;
    const int64_t N = (int64_t)pl->B * pl->T;
    int32_t *tok = pl->host, *tgt = tok ? tok + 2 * N : NULL;
    if (targets && pl->label_rows) {
        stage_labels(pl, targets, dt, ignore_index, tgt, tok + 4 * N);
        tp->t[pl->targets].dtype = SJ_I32;
        if (!tp->device) {
            tp->t[pl->targets].ptr = tgt;
            tp->t[pl->label_idx].ptr = tok + 4 * N;
        }
    }
    if (!tp->device) {
        tp->t[pl->tokens].ptr = (void *)tokens; tp->t[pl->tokens].dtype = dt;
        if (targets && !pl->label_rows) {
            tp->t[pl->targets].ptr = (void *)targets;
            tp->t[pl->targets].dtype = dt;
        }
        return;
    }
    for (int64_t i = 0; i < N; i++) tok[i] = (int32_t)sj_token_at(tokens, dt, i);
    tp->t[pl->tokens].dtype = SJ_I32;
    if (sj_run_trains(pl->mode)) {
        int32_t *cnt = m->sort_count, *order = tok + N;
        const int V = m->cfg.vocab_size;
        memset(cnt, 0, sizeof(int32_t) * ((size_t)V + 1));
        for (int64_t i = 0; i < N; i++) cnt[tok[i] + 1]++;
        for (int v = 0; v < V; v++) cnt[v + 1] += cnt[v];
        for (int64_t i = 0; i < N; i++) order[cnt[tok[i]]++] = (int32_t)i;
    }
    if (targets && !pl->label_rows) {
        for (int64_t i = 0; i < N; i++) tgt[i] = (int32_t)sj_token_at(targets, dt, i);
        tp->t[pl->targets].dtype = SJ_I32;
    }
}

sj_status sj_model_prepare(sj_model *m, const void *tokens, const void *targets,
                           sj_dtype tok_dtype, int B, int T, int ignore_index,
                           sj_run_mode mode, int64_t denom, sj_plan **out, int64_t *count) {
    const int64_t N = (int64_t)B * T;
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    m->be->bind(m->ctx);   /* planning may poison the new arena on the stream */
    SJ_TRY(check_shape(m, B, T));
    if (tok_dtype == SJ_U16) ignore_index = -1;   /* no uint16 value can be ignored */
    SJ_TRY(check_tokens(m, tokens, tok_dtype, N, T, "tokens", 0, 0));
    if (targets) SJ_TRY(check_tokens(m, targets, tok_dtype, N, T, "targets", 1, ignore_index));
    int64_t labels = 0;
    if (targets)
        for (int64_t i = 0; i < N; i++) labels += sj_token_at(targets, tok_dtype, i) != ignore_index;
    const int label_rows = targets && mode != SJ_RUN_LOGITS && m->lv.sparse_loss
                         ? sj_model_label_rows(&m->lv, labels, N) : 0;
    sj_plan *pl;
    SJ_TRY(get_plan(m, B, T, mode, label_rows, &pl));
    /* After the plan (a refused plan allocates nothing), before any enqueue
     * or graph capture (which must see the final pointer). */
    if (mode == SJ_RUN_TRAIN) SJ_TRY(sj_model_need_grads(m));
    if (sj_run_trains(mode)) SJ_TRY(need_compute_copy(m));
    stage(m, pl, tokens, targets, tok_dtype, ignore_index);
    *count = 0;
    if (targets) {
        /* The loss node was recorded with ignore -1; the caller's index goes in here. */
        pl->tape.nodes[pl->tape.t[pl->losses].producer].dim[2] = ignore_index;
        *count = denom > 0 ? denom : labels;
        pl->tape.loss_scale = *count ? 1.0f / (float)*count : 0.0f;
        m->scalars_host[0].loss_scale = pl->tape.loss_scale;
    }
    *out = pl;
    return SJ_OK;
}

/* Rows the loss runs over: the label rows, or every position. */
static int64_t loss_rows(const sj_plan *pl) {
    return pl->label_rows ? pl->label_rows : (int64_t)pl->B * pl->T;
}

/* The MoE layers' statistics to the host, on the stream (sj_model_moe_stats). */
static void moe_stats_out(sj_model *m) {
    if (m->moe_stats)
        m->be->to_host_async(m->moe_stats_host, m->moe_stats,
                             sizeof(float) * (2 + (size_t)m->cfg.moe.n_experts) * m->cfg.n_layers);
}

sj_status sj_model_enqueue(sj_model *m, sj_plan *pl) {
    const sj_backend *be = m->be;
    sj_tape *tp = &pl->tape;
    const int64_t N = (int64_t)pl->B * pl->T, rows = loss_rows(pl);
    if (tp->device) {
        int32_t *tok = pl->host;
        be->from_host_async(sj_tape_ptr(tp, pl->tokens, NULL), tok,
                            sizeof(int32_t) * (size_t)N * (sj_run_trains(pl->mode) ? 2 : 1));
        if (pl->mode != SJ_RUN_LOGITS) {
            be->from_host_async(sj_tape_ptr(tp, pl->targets, NULL), tok + 2 * N, 4 * (size_t)rows);
            if (pl->label_rows)
                be->from_host_async(sj_tape_ptr(tp, pl->label_idx, NULL), tok + 4 * N,
                                    4 * (size_t)pl->label_rows);
            be->from_host_async(&m->scalars->loss_scale, &m->scalars_host[0].loss_scale,
                                sizeof(float));
        }
    }
    if (pl->mode == SJ_RUN_TRAIN && !m->grads)   /* sj_model_prepare brings them */
        return sj_fail(SJ_ERR_RUNTIME, "train step without gradients (not prepared)");
    tp->grads = sj_tape_grads(tp, m->grads);
    tp->master = m->params;
    SJ_TRY(sj_tape_forward(tp, be, m->params_act));
    moe_stats_out(m);
    if (pl->mode == SJ_RUN_LOGITS) return SJ_OK;
    /* Per-row losses out before backward reuses their memory. */
    float *losses = tp->device ? (float *)pl->host + 3 * N : m->rows_host;
    if (!tp->device && m->n_rows_host < rows) {
        float *r = realloc(m->rows_host, sizeof(float) * rows);
        if (!r) return sj_fail(SJ_ERR_NOMEM, "loss: out of memory");
        m->rows_host = losses = r; m->n_rows_host = rows;
    }
    be->to_host_async(losses, sj_tape_ptr(tp, pl->losses, m->params_act), sizeof(float) * rows);
    if (!sj_run_trains(pl->mode)) return SJ_OK;
    return sj_tape_backward(tp, be, m->params_act, tp->grads);
}

float sj_model_mean_loss(sj_model *m, sj_plan *pl, int64_t count) {
    const int64_t N = (int64_t)pl->B * pl->T, n = loss_rows(pl);
    const float *rows = pl->tape.device ? (const float *)pl->host + 3 * N : m->rows_host;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += rows[i];
    return count ? (float)(sum / (double)count + sj_moe_loss(m)) : NAN;
}

/* bf16 or f16 -> f32 in place, front to back: element i (4 bytes at 4i) is
 * written after the 16-bit source it overlaps (2 bytes at 2n + 2j, j <= i)
 * was read. */
static void half_to_f32_inplace(float *out, sj_dtype dt, int64_t n) {
    const uint16_t *src = (const uint16_t *)((char *)out + 2 * n);
    for (int64_t i = 0; i < n; i++) {
        const uint16_t h = src[i];
        union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
        out[i] = dt == SJ_F16 ? sj_f16_to_f32(h) : v.f;
    }
}

sj_status sj_model_capture(sj_model *m, sj_plan *pl, void (*then)(void *), void *arg) {
    const sj_backend *be = m->be;
    if (pl->graph) { be->graph_free(pl->graph); pl->graph = NULL; }
    SJ_TRY(be->capture_begin());
    sj_status s = sj_model_enqueue(m, pl);
    if (s == SJ_OK && then) then(arg);
    void *g = NULL;
    sj_status e = be->capture_end(&g);
    if (s == SJ_OK) s = e;
    if (s != SJ_OK) { if (g) be->graph_free(g); return s; }
    pl->graph = g;
    pl->graph_epoch = m->epoch;
    return SJ_OK;
}

/* A logits run on a device: eager the first time (lazy module loading and
 * GEMM heuristics happen outside a capture), then one CUDA graph replay
 * (no launch gaps between its kernels). Re-captured after the buffers move. */
static sj_status run_logits(sj_model *m, sj_plan *pl) {
    if (!m->use_graphs || !pl->eager_steps) {
        pl->eager_steps = 1;
        return sj_model_enqueue(m, pl);
    }
    if (!pl->graph || pl->graph_epoch != m->epoch) SJ_TRY(sj_model_capture(m, pl, NULL, NULL));
    return m->be->graph_launch(pl->graph);
}

sj_status sj_model_forward(sj_model *m, const void *tokens, sj_dtype tok_dtype,
                           int B, int T, float *logits) {
    sj_plan *pl;
    int64_t count;
    SJ_TRY(sj_model_prepare(m, tokens, NULL, tok_dtype, B, T, -1, SJ_RUN_LOGITS, 0, &pl, &count));
    const sj_backend *be = m->be;
    sj_tape *tp = &pl->tape;
    be->bind(m->ctx);
    if (!tp->device) {
        tp->t[pl->logits].ptr = logits;
        tp->master = m->params;
        SJ_TRY(sj_tape_forward(tp, be, m->params_act));
        moe_stats_out(m);
        return SJ_OK;
    }
    SJ_TRY(run_logits(m, pl));
    SJ_TRY(be->sync());
    const int64_t n = (int64_t)B * T * m->cfg.vocab_size;
    const void *src = sj_tape_ptr(tp, pl->logits, m->params_act);
    if (be->act_dtype == SJ_F32) {
        be->to_host(logits, src, sizeof(float) * (size_t)n);
    } else {
        be->to_host((char *)logits + 2 * n, src, 2 * (size_t)n);
        half_to_f32_inplace(logits, be->act_dtype, n);
    }
    return be->sync();
}

sj_status sj_model_forward_device(sj_model *m, const void *tokens, sj_dtype tok_dtype,
                                  int B, int T, void **logits, sj_dtype *dtype) {
    if (!m->be->device)
        return sj_fail(SJ_ERR_ARG, "forward_device: the model is on the CPU (use forward)");
    sj_plan *pl;
    int64_t count;
    SJ_TRY(sj_model_prepare(m, tokens, NULL, tok_dtype, B, T, -1, SJ_RUN_LOGITS, 0, &pl, &count));
    m->be->bind(m->ctx);
    SJ_TRY(run_logits(m, pl));
    SJ_TRY(m->be->sync());
    *logits = sj_tape_ptr(&pl->tape, pl->logits, m->params_act);
    *dtype = m->be->act_dtype;
    return SJ_OK;
}

sj_status sj_model_loss(sj_model *m, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T, int ignore_index,
                        int backward, float *loss) {
    return sj_model_loss_ex(m, tokens, targets, tok_dtype, B, T, ignore_index, backward, 0, loss);
}

void sj_model_reset_peak(sj_model *m) { m->peak_bytes = m->bytes; }

sj_status sj_model_set_levers(sj_model *m, const sj_levers *lv) {
    if (lv->ce_rows < 0) return sj_fail(SJ_ERR_ARG, "ce_rows must be >= 0, got %d", lv->ce_rows);
    if (lv->memory_limit < 0)
        return sj_fail(SJ_ERR_ARG, "memory_limit must be >= 0, got %lld", (long long)lv->memory_limit);
    const int nb = lv->n_label_bucket_sizes;
    if (nb < 0 || nb > SJ_MAX_LABEL_BUCKETS)
        return sj_fail(SJ_ERR_ARG, "label_bucket_sizes: at most %d buckets, got %d",
                       SJ_MAX_LABEL_BUCKETS, nb);
    for (int i = 0; i < nb; i++) {
        if (lv->label_bucket_sizes[i] < 1)
            return sj_fail(SJ_ERR_ARG, "label_bucket_sizes must be positive, got %d",
                           lv->label_bucket_sizes[i]);
        if (i > 0 && lv->label_bucket_sizes[i] <= lv->label_bucket_sizes[i - 1])
            return sj_fail(SJ_ERR_ARG, "label_bucket_sizes must be ascending, got %d after %d",
                           lv->label_bucket_sizes[i], lv->label_bucket_sizes[i - 1]);
    }
    if (lv->gradient_checkpointing == m->lv.gradient_checkpointing && lv->cheap_recompute == m->lv.cheap_recompute &&
        lv->fused_ce == m->lv.fused_ce &&
        lv->ce_rows == m->lv.ce_rows && lv->memory_limit == m->lv.memory_limit &&
        lv->fp16_activations == m->lv.fp16_activations && lv->cast_on_use == m->lv.cast_on_use &&
        lv->sparse_loss == m->lv.sparse_loss && nb == m->lv.n_label_bucket_sizes &&
        !memcmp(lv->label_bucket_sizes, m->lv.label_bucket_sizes, sizeof(int) * (size_t)nb)) return SJ_OK;
    if (m->ctx) m->be->bind(m->ctx);
    for (int i = 0; i < SJ_MAX_PLANS; i++) drop_plan(m, &m->plans[i]);
    /* No plan is left that reads the compute copy: it can go (a run that
     * needs it makes it again from the master). */
    if (lv->cast_on_use && m->params) {
        SJ_TRY(m->be->sync());
        drop_compute_copy(m);
    }
    m->lv = *lv;
    return SJ_OK;
}

/* Without buckets, a multiple of 64 rows: the head's GEMMs keep whole
 * 64-row tiles, a batch pads fewer than 64 rows (beside a head over all
 * B*T), and B*T/64 shapes at most come to be planned. */
int sj_model_label_rows(const sj_levers *lv, int64_t labels, int64_t n) {
    const int nb = lv->n_label_bucket_sizes;
    const int64_t step = nb ? lv->label_bucket_sizes[nb - 1] : 64;
    int64_t rows = labels > step ? (labels + step - 1) / step * step : step;
    for (int i = nb - 1; i >= 0 && lv->label_bucket_sizes[i] >= labels; i--) rows = lv->label_bucket_sizes[i];
    return (int)(rows < n ? rows : n);
}

int64_t sj_model_fixed_bytes(const sj_model *m, sj_run_mode mode, int64_t optimizer_bytes) {
    const int64_t n = m->n_params;
    const int has_copy = m->params_act && m->params_act != m->params;
    int64_t fixed = 4 * n;                                   /* f32 master weights */
    if (mode == SJ_RUN_TRAIN) fixed += 4 * n;                /* the model's gradients */
    fixed += optimizer_bytes;                                /* the optimizer's state */
    if (m->be->act_dtype != SJ_F32 && (sj_run_trains(mode) || has_copy))
        fixed += (int64_t)sj_dtype_size(m->be->act_dtype) * n;   /* the compute copy */
    return fixed;
}

sj_status sj_model_plan_bytes(sj_model *m, int B, int T, sj_run_mode mode,
                              int64_t *arena_bytes, int64_t *kept_bytes) {
    return sj_model_plan_census(m, B, T, mode, -1, arena_bytes, kept_bytes, NULL, NULL);
}

sj_status sj_model_plan_census(sj_model *m, int B, int T, sj_run_mode mode, int64_t labels,
                               int64_t *arena_bytes, int64_t *kept_bytes,
                               int nodes[SJ_OP__COUNT], int in_place[SJ_OP__COUNT]) {
    SJ_TRY(check_shape(m, B, T));
    const int64_t N = (int64_t)B * T;
    sj_plan pl;
    memset(&pl, 0, sizeof pl);
    pl.B = B; pl.T = T; pl.mode = mode;
    if (m->lv.sparse_loss && mode != SJ_RUN_LOGITS)
        pl.label_rows = sj_model_label_rows(&m->lv, labels < 0 || labels > N ? N : labels, N);
    tape_init(m, &pl, 1);
    sj_status s = record(m, &pl);
    if (s == SJ_OK) s = sj_tape_plan(&pl.tape, m->be);
    if (s == SJ_OK) {
        if (arena_bytes) *arena_bytes = pl.tape.arena_bytes;
        if (kept_bytes) *kept_bytes = pl.tape.kept_bytes;
        if (nodes) sj_tape_census(&pl.tape, nodes, in_place);
    }
    sj_tape_free(&pl.tape, m->be);
    return s;
}

sj_status sj_model_loss_ex(sj_model *m, const void *tokens, const void *targets,
                           sj_dtype tok_dtype, int B, int T, int ignore_index,
                           int backward, int64_t denom, float *loss) {
    sj_plan *pl;
    int64_t count;
    SJ_TRY(sj_model_prepare(m, tokens, targets, tok_dtype, B, T, ignore_index,
                            backward ? SJ_RUN_TRAIN : SJ_RUN_LOSS, denom, &pl, &count));
    m->be->bind(m->ctx);
    sj_status s = sj_model_enqueue(m, pl);
    if (s == SJ_OK) s = m->be->sync();
    if (s != SJ_OK) return s;
    *loss = sj_model_mean_loss(m, pl, count);
    return SJ_OK;
}
