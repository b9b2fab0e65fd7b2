/* config.c — model presets, validation and exact parameter counts. */
#include "model.h"   /* SJ_ROPE_MAX_PAIRS, sj_mla_param_count */
#include "mamba2.h"
#include <math.h>
#include <string.h>

typedef struct { const char *name; int dim, n_layers, n_heads, max_seq_len; } preset;

/* The original Smedjan's presets; SwiGLU hidden from sj_ffn_dim_for(dim, 2.67). */
static const preset presets[] = {
    {"tiny", 128, 4, 4, 512},       {"small", 256, 6, 4, 512},
    {"medium", 512, 12, 8, 1024},   {"large", 1024, 16, 16, 2048},
    {"xl", 1536, 20, 16, 2048},     {"max", 2048, 24, 16, 2048},
    {"huge", 2560, 32, 20, 4096},   {"8b", 4096, 32, 32, 8192},
};
enum { N_PRESETS = sizeof presets / sizeof presets[0] };

int sj_preset_count(void) { return N_PRESETS; }
const char *sj_preset_name(int i) { return i >= 0 && i < N_PRESETS ? presets[i].name : NULL; }

int sj_ffn_dim_for(int dim, double mult) {
    int64_t h = (int64_t)(mult * dim);
    return (int)(SJ_CDIV(h, 256) * 256);
}

sj_status sj_config_preset(const char *name, int vocab_size, sj_config *out) {
    for (int i = 0; i < N_PRESETS; i++) {
        if (strcmp(name, presets[i].name) != 0) continue;
        const preset *p = &presets[i];
        *out = (sj_config){ .dim = p->dim, .n_layers = p->n_layers, .n_heads = p->n_heads,
                            .n_kv_heads = p->n_heads, .ffn_dim = sj_ffn_dim_for(p->dim, 2.67),
                            .vocab_size = vocab_size, .max_seq_len = p->max_seq_len,
                            .rope_theta = 10000.0f, .norm_eps = 1e-5f };
        return sj_config_validate(out);
    }
    char names[256] = "";
    for (int i = 0; i < N_PRESETS; i++) {
        strcat(names, i ? ", " : "");
        strcat(names, presets[i].name);
    }
    return sj_fail(SJ_ERR_ARG, "unknown size '%s' (presets: %s, or custom)", name, names);
}

#define NAMES(fn, ...)                                                       \
    const char *fn(int k) {                                                  \
        static const char *const names[] = { __VA_ARGS__ };                  \
        return k >= 0 && k < (int)(sizeof names / sizeof names[0]) ? names[k] : NULL; \
    }
NAMES(sj_mixer_name, "attention", "mla", "mamba2", "linear")
NAMES(sj_linear_feature_name, "identity", "elu1")
NAMES(sj_linear_decay_name, "none", "gated")
NAMES(sj_ffn_name, "swiglu", "relu2", "moe", "none")
NAMES(sj_moe_router_name, "softmax", "sigmoid")
NAMES(sj_qk_norm_name, "none", "weighted", "plain")
NAMES(sj_rope_type_name, "default", "linear", "dynamic", "yarn")
#undef NAMES

int sj_option_value(const char *(*name_of)(int), const char *name) {
    for (int k = 0; name_of(k); k++)
        if (!strcmp(name_of(k), name)) return k;
    return -1;
}

static sj_status validate_rope_scaling(const sj_config *c) {
    const sj_rope_scaling *r = &c->rope_scaling;
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    NEED(sj_rope_type_name(r->type), "rope_scaling.type %d is unknown", r->type);
    if (r->type == SJ_ROPE_DEFAULT) return SJ_OK;
    const char *t = sj_rope_type_name(r->type);
    NEED(isfinite(r->factor) && (r->type == SJ_ROPE_YARN ? r->factor > 1 : r->factor >= 1),
         "rope_scaling.factor must be %s for %s scaling, got %g",
         r->type == SJ_ROPE_YARN ? "> 1" : ">= 1", t, (double)r->factor);
    if (r->type == SJ_ROPE_LINEAR) return SJ_OK;
    NEED(r->original_max_seq_len > 0 && r->original_max_seq_len <= c->max_seq_len,
         "rope_scaling.original_max_seq_len must be in 1..max_seq_len (%d) for %s scaling, got %d",
         c->max_seq_len, t, r->original_max_seq_len);
    if (r->type == SJ_ROPE_DYNAMIC) return SJ_OK;
    NEED(isfinite(r->beta_fast) && isfinite(r->beta_slow) && r->beta_slow > 0 &&
         r->beta_fast > r->beta_slow, "rope_scaling.beta_fast (%g) must be greater than "
         "beta_slow (%g) > 0", (double)r->beta_fast, (double)r->beta_slow);
    NEED(isfinite(r->attention_factor) && r->attention_factor >= 0,
         "rope_scaling.attention_factor must be >= 0 (0: the default), got %g",
         (double)r->attention_factor);
    return SJ_OK;
    #undef NEED
}

/* Only when a layer is MoE: a config without one may leave moe zeroed. */
static sj_status validate_moe(const sj_config *c) {
    const sj_moe_config *e = &c->moe;
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    NEED(e->n_experts > 0 && e->n_experts <= 4096, "moe.n_experts must be in 1..4096, got %d",
         e->n_experts);
    NEED(e->top_k > 0 && e->top_k <= e->n_experts,
         "moe.top_k must be in 1..moe.n_experts (%d), got %d", e->n_experts, e->top_k);
    NEED(e->expert_dim > 0 && e->expert_dim <= 1 << 20, "moe.expert_dim must be in 1..1048576, got %d",
         e->expert_dim);
    NEED(e->n_shared >= 0 && (int64_t)e->n_shared * e->expert_dim <= 1 << 20,
         "moe.n_shared must be >= 0 with n_shared * expert_dim <= 1048576, got %d", e->n_shared);
    NEED(sj_moe_router_name(e->router), "moe.router %d is unknown", e->router);
    NEED(isfinite(e->aux_loss) && e->aux_loss >= 0, "moe.aux_loss must be >= 0, got %g",
         (double)e->aux_loss);
    NEED(isfinite(e->z_loss) && e->z_loss >= 0, "moe.z_loss must be >= 0, got %g", (double)e->z_loss);
    NEED(isfinite(e->bias_update_rate) && e->bias_update_rate >= 0,
         "moe.bias_update_rate must be >= 0, got %g", (double)e->bias_update_rate);
    NEED(e->bias_update_rate == 0 || e->router == SJ_MOE_SIGMOID,
         "moe.bias_update_rate needs router 'sigmoid' (the bias lives beside its scores)");
    return SJ_OK;
    #undef NEED
}

/* Checked only when a layer is mla. v heads are padded to the q/k head
 * size inside attention (model/mla.c), hence v_head_dim's bound. */
static sj_status validate_mla(const sj_config *c) {
    const sj_mla *a = &c->mla;
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    NEED(a->q_lora_rank >= 0 && a->q_lora_rank <= 65536,
         "mla.q_lora_rank must be in 0..65536 (0: no q bottleneck), got %d", a->q_lora_rank);
    NEED(a->kv_lora_rank > 0 && a->kv_lora_rank <= 65536,
         "mla.kv_lora_rank must be in 1..65536, got %d", a->kv_lora_rank);
    NEED(a->qk_nope_head_dim >= 0 && a->qk_nope_head_dim <= 1024,
         "mla.qk_nope_head_dim must be in 0..1024, got %d", a->qk_nope_head_dim);
    NEED(a->qk_rope_head_dim > 0 && a->qk_rope_head_dim % 2 == 0 &&
         a->qk_rope_head_dim <= 2 * SJ_ROPE_MAX_PAIRS,
         "mla.qk_rope_head_dim must be even and in 2..%d, got %d", 2 * SJ_ROPE_MAX_PAIRS,
         a->qk_rope_head_dim);
    NEED(a->v_head_dim > 0 && a->v_head_dim <= a->qk_nope_head_dim + a->qk_rope_head_dim,
         "mla.v_head_dim must be in 1..qk_nope_head_dim + qk_rope_head_dim (%d), got %d",
         a->qk_nope_head_dim + a->qk_rope_head_dim, a->v_head_dim);
    NEED(!c->paired_heads && c->value_mix == 0,
         "mla layers take neither paired_heads nor value_mix (they act on attention's heads)");
    return SJ_OK;
    #undef NEED
}

static sj_status validate_layers(const sj_config *c) {
    int mamba2 = 0, linear = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const sj_layer *y = &c->layers[l];
        if (!sj_mixer_name(y->mixer))
            return sj_fail(SJ_ERR_ARG, "layer %d: mixer %d is unknown", l, y->mixer);
        if (!sj_ffn_name(y->ffn))
            return sj_fail(SJ_ERR_ARG, "layer %d: ffn %d is unknown", l, y->ffn);
        if (!sj_qk_norm_name(y->qk_norm))
            return sj_fail(SJ_ERR_ARG, "layer %d: qk_norm %d is unknown", l, y->qk_norm);
        if (y->window < 0 || y->window > c->max_seq_len)
            return sj_fail(SJ_ERR_ARG, "layer %d: window must be in 0..max_seq_len (%d; 0: the "
                           "whole context), got %d", l, c->max_seq_len, y->window);
        if (y->mixer == SJ_MIXER_MLA && (y->window || y->qk_norm != SJ_QK_NORM_NONE))
            return sj_fail(SJ_ERR_ARG, "layer %d: mla layers take no window and no qk_norm", l);
        mamba2 |= y->mixer == SJ_MIXER_MAMBA2;
        linear |= y->mixer == SJ_MIXER_LINEAR;
    }
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].ffn == SJ_FFN_MOE) { SJ_TRY(validate_moe(c)); break; }
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].mixer == SJ_MIXER_MLA) { SJ_TRY(validate_mla(c)); break; }
    if (linear) SJ_TRY(sj_linear_validate(c));
    return mamba2 ? sj_mamba2_validate(c) : SJ_OK;
}

sj_status sj_config_validate(const sj_config *c) {
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    NEED(c->dim > 0 && c->dim <= 65536, "dim must be in 1..65536, got %d", c->dim);
    NEED(c->n_layers > 0 && c->n_layers <= 1024, "n_layers must be in 1..1024, got %d", c->n_layers);
    NEED(c->n_heads > 0, "n_heads must be positive, got %d", c->n_heads);
    NEED(c->dim % c->n_heads == 0, "n_heads (%d) must divide dim (%d)", c->n_heads, c->dim);
    NEED((c->dim / c->n_heads) % 2 == 0 && c->dim / c->n_heads <= 2 * SJ_ROPE_MAX_PAIRS,
         "head dim dim/n_heads = %d must be even and at most %d for RoPE", c->dim / c->n_heads,
         2 * SJ_ROPE_MAX_PAIRS);
    NEED(c->n_kv_heads > 0, "n_kv_heads must be positive, got %d", c->n_kv_heads);
    NEED(c->n_heads % c->n_kv_heads == 0, "n_kv_heads (%d) must divide n_heads (%d)",
         c->n_kv_heads, c->n_heads);
    NEED(c->ffn_dim > 0 && c->ffn_dim <= 1 << 20, "ffn_dim must be in 1..1048576, got %d", c->ffn_dim);
    NEED(c->vocab_size > 0 && c->vocab_size <= 1 << 24, "vocab_size must be in 1..16777216, got %d",
         c->vocab_size);
    NEED(c->max_seq_len > 0 && c->max_seq_len <= 1 << 20, "max_seq_len must be in 1..1048576, got %d",
         c->max_seq_len);
    NEED(c->rope_theta > 0 && isfinite(c->rope_theta), "rope_theta must be positive, got %g",
         (double)c->rope_theta);
    NEED(c->norm_eps > 0 && isfinite(c->norm_eps), "norm_eps must be positive, got %g",
         (double)c->norm_eps);
    NEED(!c->paired_heads || (c->n_heads % 2 == 0 && c->n_kv_heads % 2 == 0),
         "paired_heads needs even n_heads and n_kv_heads, got %d and %d", c->n_heads,
         c->n_kv_heads);
    NEED(isfinite(c->value_mix) && c->value_mix >= 0 && c->value_mix <= 1,
         "value_mix must be in [0, 1], got %g", (double)c->value_mix);
    NEED(isfinite(c->embed_skip), "embed_skip must be finite, got %g", (double)c->embed_skip);
    SJ_TRY(validate_rope_scaling(c));
    SJ_TRY(validate_layers(c));
    return SJ_OK;
    #undef NEED
}

/* The parameters of the whole model (experts: all of them), or of what one
 * token's forward reads (experts: top_k of them). */
static int64_t param_count(const sj_config *c, int active) {
    int64_t C = c->dim, hd = C / c->n_heads, q = (int64_t)c->n_heads * hd,
            kv = (int64_t)c->n_kv_heads * hd, o = c->paired_heads ? q / 2 : q;
    int64_t n = (int64_t)c->vocab_size * C * (c->untied_head ? 2 : 1) + C;
    const sj_moe_config *e = &c->moe;
    for (int l = 0; l < c->n_layers; l++) {
        const sj_layer *y = &c->layers[l];
        if (y->mixer == SJ_MIXER_MAMBA2) n += sj_mamba2_param_count(c);
        else if (y->mixer == SJ_MIXER_LINEAR) n += sj_linear_param_count(c);
        else if (y->mixer == SJ_MIXER_MLA) n += sj_mla_param_count(c) + C;
        else n += C * (q + 2 * kv + o) + C + (y->qk_norm == SJ_QK_NORM_WEIGHTED ? 2 * hd : 0);
        if (y->ffn == SJ_FFN_NONE) continue;
        n += C;   /* the ffn norm */
        if (y->ffn != SJ_FFN_MOE) { n += 3 * C * (int64_t)c->ffn_dim; continue; }
        const int64_t experts = active ? e->top_k : e->n_experts;
        n += 3 * C * (int64_t)e->expert_dim * (experts + e->n_shared) + (int64_t)e->n_experts * C +
             (e->router == SJ_MOE_SIGMOID ? e->n_experts : 0);
    }
    return n;
}

int64_t sj_config_param_count(const sj_config *c) { return param_count(c, 0); }
int64_t sj_config_active_param_count(const sj_config *c) { return param_count(c, 1); }
