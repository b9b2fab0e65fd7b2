/* names.c — the one table of tensor names: ours, Hugging Face Llama's and
 * GGUF's, and the one row permutation between GGUF's attn_q/attn_k and
 * ours. The loaders, the exporters and Python (smedjan.io, .hf, .gguf) read
 * them here; no other file spells a foreign tensor name. */
#include "../core/core.h"
#include <stdio.h>
#include <string.h>

static const sj_tensor_name TABLE[] = {
    /* ours          Hugging Face                         GGUF                  layer rope */
    { { "tok_emb",    "model.embed_tokens.weight",         "token_embd.weight" },   0, 0 },
    { { "attn_norm",  "input_layernorm.weight",            "attn_norm.weight" },    1, 0 },
    { { "wq",         "self_attn.q_proj.weight",           "attn_q.weight" },       1, 1 },
    { { "wk",         "self_attn.k_proj.weight",           "attn_k.weight" },       1, 1 },
    { { "wv",         "self_attn.v_proj.weight",           "attn_v.weight" },       1, 0 },
    { { "wo",         "self_attn.o_proj.weight",           "attn_output.weight" },  1, 0 },
    /* q/k-norm gains multiply head elements before RoPE pairs them: they
     * follow the rows of wq/wk */
    { { "q_norm",     "self_attn.q_norm.weight",           "attn_q_norm.weight" },  1, 1 },
    { { "k_norm",     "self_attn.k_norm.weight",           "attn_k_norm.weight" },  1, 1 },
    /* mla layers (DeepSeek-V2/V3; GGUF: llama.cpp's deepseek2 spelling); their
     * q projection without a bottleneck is wq, their output projection wo */
    { { "mla.q_a_proj",  "self_attn.q_a_proj.weight",         "attn_q_a.weight" },      1, 0 },
    { { "mla.q_a_norm",  "self_attn.q_a_layernorm.weight",    "attn_q_a_norm.weight" }, 1, 0 },
    { { "mla.q_b_proj",  "self_attn.q_b_proj.weight",         "attn_q_b.weight" },      1, 0 },
    { { "mla.kv_a_proj", "self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight" }, 1, 0 },
    { { "mla.kv_a_norm", "self_attn.kv_a_layernorm.weight",   "attn_kv_a_norm.weight" }, 1, 0 },
    { { "mla.kv_b_proj", "self_attn.kv_b_proj.weight",        "attn_kv_b.weight" },     1, 0 },
    { { "ffn_norm",   "post_attention_layernorm.weight",   "ffn_norm.weight" },     1, 0 },
    { { "w_gate",     "mlp.gate_proj.weight",              "ffn_gate.weight" },     1, 0 },
    { { "w_up",       "mlp.up_proj.weight",                "ffn_up.weight" },       1, 0 },
    { { "w_down",     "mlp.down_proj.weight",              "ffn_down.weight" },     1, 0 },
    /* the MoE router (Mixtral's spelling); its experts are split per expert
     * by smedjan/hf.py (ours stack them: model/moe.c) */
    { { "moe.router", "block_sparse_moe.gate.weight",      "ffn_gate_inp.weight" }, 1, 0 },
    /* Mamba-2 mixers (transformers' Mamba2 puts its layers under backbone.,
     * see smedjan/hf.py; GGUF: llama.cpp's mamba2 spelling) */
    { { "ssm.in_proj",  "mixer.in_proj.weight",            "ssm_in.weight" },       1, 0 },
    { { "ssm.conv_w",   "mixer.conv1d.weight",             "ssm_conv1d.weight" },   1, 0 },
    { { "ssm.conv_b",   "mixer.conv1d.bias",               "ssm_conv1d.bias" },     1, 0 },
    { { "ssm.dt_bias",  "mixer.dt_bias",                   "ssm_dt.bias" },         1, 0 },
    { { "ssm.A_log",    "mixer.A_log",                     "ssm_a" },               1, 0 },
    { { "ssm.D",        "mixer.D",                         "ssm_d" },               1, 0 },
    { { "ssm.norm",     "mixer.norm.weight",               "ssm_norm.weight" },     1, 0 },
    { { "ssm.out_proj", "mixer.out_proj.weight",           "ssm_out.weight" },      1, 0 },
    /* gated linear attention's gate (no transformers or GGUF architecture has it) */
    { { "wg",         "self_attn.g_proj.weight",           "attn_gate.weight" },    1, 0 },
    { { "final_norm", "model.norm.weight",                 "output_norm.weight" },  0, 0 },
    { { "lm_head",    "lm_head.weight",                    "output.weight" },       0, 0 },
};
enum { N_ROWS = sizeof TABLE / sizeof TABLE[0] };

/* the layer prefix of each spelling, by sj_names */
static const char *const PREFIX[3] = { "layers.", "model.layers.", "blk." };

int sj_tensor_names(const sj_tensor_name **rows) {
    *rows = TABLE;
    return N_ROWS;
}

const sj_tensor_name *sj_tensor_name_find(const char *name, sj_names from, int *layer) {
    *layer = -1;
    if ((unsigned)from > SJ_NAMES_GGUF) return NULL;
    const size_t pl = strlen(PREFIX[from]);
    const char *rest = NULL;
    int l = -1;
    if (!strncmp(name, PREFIX[from], pl)) {   /* <prefix><digits>.<rest>, no sign or leading zero */
        const char *p = name + pl;
        long v = 0;
        if (*p >= '0' && *p <= '9' && !(p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
            for (; *p >= '0' && *p <= '9' && v <= SJ_MAX_LAYERS; p++) v = v * 10 + (*p - '0');
        if (p > name + pl && *p == '.' && v < SJ_MAX_LAYERS) { l = (int)v; rest = p + 1; }
    }
    for (int i = 0; i < N_ROWS; i++) {
        const sj_tensor_name *r = &TABLE[i];
        if (r->per_layer ? rest && !strcmp(rest, r->name[from]) : !strcmp(name, r->name[from])) {
            *layer = r->per_layer ? l : -1;
            return r;
        }
    }
    return NULL;
}

sj_status sj_tensor_name_map(const char *name, sj_names from, sj_names to, char *out, size_t cap) {
    static const char *const SPELLING[3] = { "smedjan", "Hugging Face", "GGUF" };
    int layer;
    const sj_tensor_name *r = sj_tensor_name_find(name, from, &layer);
    if (!r || (unsigned)to > SJ_NAMES_GGUF)
        return sj_fail(SJ_ERR_ARG, "no tensor named '%s' in the %s spelling", name,
                       (unsigned)from <= SJ_NAMES_GGUF ? SPELLING[from] : "(unknown)");
    int n = r->per_layer ? snprintf(out, cap, "%s%d.%s", PREFIX[to], layer, r->name[to])
                         : snprintf(out, cap, "%s", r->name[to]);
    if (n < 0 || (size_t)n >= cap) return sj_fail(SJ_ERR_ARG, "tensor name '%s': %zu bytes are too few", name, cap);
    return SJ_OK;
}

int sj_gguf_rope_row(int r, int head_dim) {
    const int head = r / head_dim, i = r % head_dim;
    return head * head_dim + (i % 2) * (head_dim / 2) + i / 2;
}
