/* config.c — model presets, validation and exact parameter counts. */
#include "../core/core.h"
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

sj_status sj_config_validate(const sj_config *c) {
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    NEED(c->dim > 0 && c->dim <= 65536, "dim must be in 1..65536, got %d", c->dim);
    NEED(c->n_layers > 0 && c->n_layers <= 1024, "n_layers must be in 1..1024, got %d", c->n_layers);
    NEED(c->n_heads > 0, "n_heads must be positive, got %d", c->n_heads);
    NEED(c->dim % c->n_heads == 0, "n_heads (%d) must divide dim (%d)", c->n_heads, c->dim);
    NEED((c->dim / c->n_heads) % 2 == 0, "head dim dim/n_heads = %d must be even for RoPE",
         c->dim / c->n_heads);
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
    return SJ_OK;
    #undef NEED
}

int64_t sj_config_param_count(const sj_config *c) {
    int64_t C = c->dim, hd = C / c->n_heads, kv = (int64_t)c->n_kv_heads * hd;
    int64_t layer = C * C * 2 + 2 * C * kv + 3 * C * (int64_t)c->ffn_dim + 2 * C;
    return (int64_t)c->vocab_size * C + c->n_layers * layer + C;
}
