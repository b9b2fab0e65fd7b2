/* infer_cuda.c — the C side of the GPU inference engine: GGUF files reach
 * the GPU through the CPU engine's loader (parsing, row un-permutation,
 * dequantisation to the GPU mode all happen once there, with a 1-position
 * cache); a training model's parameters go straight from its f32 master
 * weights (every architecture option with them); then cuda/infer.cu takes
 * the weights. Without a CUDA build every entry point says so. It must
 * never leave a host copy behind. */
#include "infer.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sj_status gpu_mode(sj_infer_mode mode) {
    if (mode == SJ_INFER_FP32 || mode == SJ_INFER_BF16) return SJ_OK;
    return sj_fail(SJ_ERR_ARG, "mode %s is not available on the GPU: use bf16 or fp32 (quantised "
                   "GGUF tensors are dequantised to either at load)", mode == SJ_INFER_Q8 ? "q8" : "q4");
}

#ifndef SJ_HAVE_CUDA

static sj_status no_cuda(void) {
    return sj_fail(SJ_ERR_RUNTIME, "device='cuda': this build of smedjan has no CUDA backend "
                   "(nvcc was not found when it was built; rebuild with nvcc on PATH)");
}
sj_status sj_cuinfer_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_cuinfer **out) {
    (void)m; (void)max_ctx; *out = NULL;
    SJ_TRY(gpu_mode(mode));
    return no_cuda();
}
sj_status sj_cuinfer_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_cuinfer **out) {
    (void)path; (void)max_ctx; *out = NULL;
    SJ_TRY(gpu_mode(mode));
    return no_cuda();
}
/* No handle can exist in this build: the rest is never reached. */
void sj_cuinfer_free(sj_cuinfer *g) { (void)g; }
const sj_config *sj_cuinfer_config(const sj_cuinfer *g) { (void)g; return NULL; }
int sj_cuinfer_max_ctx(const sj_cuinfer *g) { (void)g; return 0; }
int sj_cuinfer_pos(const sj_cuinfer *g) { (void)g; return 0; }
sj_infer_mode sj_cuinfer_mode(const sj_cuinfer *g) { (void)g; return SJ_INFER_FP32; }
int64_t sj_cuinfer_weight_bytes(const sj_cuinfer *g) { (void)g; return 0; }
int64_t sj_cuinfer_cache_bytes(const sj_cuinfer *g) { (void)g; return 0; }
void sj_cuinfer_reset(sj_cuinfer *g) { (void)g; }
sj_status sj_cuinfer_prefill(sj_cuinfer *g, const int32_t *t, int n, float *l) {
    (void)g; (void)t; (void)n; (void)l; return no_cuda();
}
sj_status sj_cuinfer_decode(sj_cuinfer *g, int32_t t, int32_t *next) { (void)g; (void)t; (void)next; return no_cuda(); }
sj_status sj_cuinfer_greedy(sj_cuinfer *g, int32_t t, int n, int32_t *o) {
    (void)g; (void)t; (void)n; (void)o; return no_cuda();
}
sj_status sj_cuinfer_logits(sj_cuinfer *g, float *out) { (void)g; (void)out; return no_cuda(); }
void sj_cuinfer_set_options(sj_cuinfer *g, int graphs, int persistent) { (void)g; (void)graphs; (void)persistent; }
void sj_cuinfer_get_options(const sj_cuinfer *g, int *graphs, int *persistent) { (void)g; *graphs = *persistent = 0; }

#else
#include "../../cuda/sj_cuinfer.h"

const sj_qmat *sj_infer_matrix(const sj_infer *h, const char *name);
const float *sj_infer_norm(const sj_infer *h, int i);
sj_status sj_cuda_check_device(void);

static const void *mat_data(const sj_qmat *W) {
    return W->type == SJ_W_F32 ? (const void *)W->f : (const void *)W->bf;
}

/* in's RoPE tables (the CPU engine's angles, bit for bit) for max_ctx
 * positions, then the GPU engine from in. */
static sj_status create_gpu(sj_cuinfer_init *in, int max_ctx, sj_cuinfer **out) {
    const sj_config *c = &in->c;
    if (max_ctx <= 0) max_ctx = SJ_MIN(c->max_seq_len, 4096);
    if (max_ctx > (1 << 20)) return sj_fail(SJ_ERR_ARG, "max_ctx %d is too large", max_ctx);
    const int half = c->dim / c->n_heads / 2;
    float *rope = malloc(sizeof(float) * 2 * (size_t)max_ctx * half);
    if (!rope) return sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory");
    float *cs = rope, *sn = rope + (size_t)max_ctx * half;
    sj_infer_rope_tables(c, max_ctx, cs, sn);
    in->max_ctx = max_ctx;
    in->rope_cos = cs;
    in->rope_sin = sn;
    sj_status s = sj_cuinfer_create(in, out);
    free(rope);
    return s;
}

static const char *const layer_mats[7] = { "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down" };

/* in's per-layer matrices from ptrs (7 L: layer_mats' order). */
static void set_layer_mats(sj_cuinfer_init *in, const void **ptrs, int L) {
    in->wq = ptrs; in->wk = ptrs + L; in->wv = ptrs + 2 * L; in->wo = ptrs + 3 * L;
    in->w_gate = ptrs + 4 * L; in->w_up = ptrs + 5 * L; in->w_down = ptrs + 6 * L;
}

/* The CPU engine's weights (mode fp32 or bf16, a GGUF's) to a new GPU engine. */
static sj_status to_gpu(const sj_infer *h, int max_ctx, sj_cuinfer **out) {
    const sj_config *c = sj_infer_config(h);
    const int L = c->n_layers;
    sj_cuinfer_init in;
    memset(&in, 0, sizeof in);
    in.c = *c;
    in.bf16 = sj_infer_get_mode(h) == SJ_INFER_BF16;
    in.tok_emb = mat_data(sj_infer_matrix(h, "tok_emb"));
    const sj_qmat *o = sj_infer_matrix(h, "output");
    in.output = o ? mat_data(o) : NULL;
    in.norms = sj_infer_norm(h, 0);
    const void **ptrs = calloc((size_t)7 * L, sizeof *ptrs);
    if (!ptrs) return sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory");
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < L; l++) {
            char nm[48];
            snprintf(nm, sizeof nm, "layers.%d.%s", l, layer_mats[k]);
            ptrs[k * L + l] = mat_data(sj_infer_matrix(h, nm));
        }
    set_layer_mats(&in, ptrs, L);
    sj_status s = create_gpu(&in, max_ctx, out);
    free(ptrs);
    return s;
}

typedef struct { uint16_t *dst; const float *src; } bf16_job;
static void bf16_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    bf16_job *j = ctx;
    for (int64_t i = i0; i < i1; i++) j->dst[i] = sj_f32_to_bf16(j->src[i]);
}

/* A model's f32 parameters (host memory P) to a new GPU engine, every
 * architecture option included: fp32 takes them as they are, bf16 a copy
 * rounded as the CPU engine rounds. The gains stay f32. */
static sj_status model_to_gpu(const sj_model *m, const float *P, int64_t n, int bf16, int max_ctx,
                              sj_cuinfer **out) {
    const sj_config *c = sj_model_config(m);
    const int L = c->n_layers, C = c->dim;
    sj_cuinfer_init in;
    memset(&in, 0, sizeof in);
    in.c = *c;
    in.bf16 = bf16;
    uint16_t *bf = bf16 ? malloc(sizeof(uint16_t) * (size_t)n) : NULL;
    const void **ptrs = calloc((size_t)7 * L, sizeof *ptrs);
    const float **gains = calloc((size_t)2 * L, sizeof *gains);
    float *norms = malloc(sizeof(float) * (size_t)(2 * L + 1) * C);
    sj_status s = SJ_OK;
    if ((bf16 && !bf) || !ptrs || !gains || !norms) {
        s = sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory");
        goto done;
    }
    if (bf16) {
        bf16_job j = { bf, P };
        sj_parallel_for(n, 1 << 16, bf16_range, &j);
    }
    for (int i = 0; i < sj_model_n_tensors(m) && !s; i++) {
        const sj_tensor_info *t = sj_model_tensor(m, i);
        const void *mat = bf16 ? (const void *)(bf + t->offset) : (const void *)(P + t->offset);
        const float *vec = P + t->offset;
        int l, k, known = 1;
        char what[32];
        if (!strcmp(t->name, "tok_emb")) in.tok_emb = mat;
        else if (!strcmp(t->name, "lm_head")) in.output = mat;
        else if (!strcmp(t->name, "final_norm")) memcpy(norms + (int64_t)2 * L * C, vec, sizeof(float) * C);
        else if (sscanf(t->name, "layers.%d.%31s", &l, what) == 2 && l >= 0 && l < L) {
            for (k = 0; k < 7 && strcmp(what, layer_mats[k]); k++) {}
            if (k < 7) ptrs[k * L + l] = mat;
            else if (!strcmp(what, "attn_norm")) memcpy(norms + (int64_t)2 * l * C, vec, sizeof(float) * C);
            else if (!strcmp(what, "ffn_norm")) memcpy(norms + (int64_t)(2 * l + 1) * C, vec, sizeof(float) * C);
            else if (!strcmp(what, "q_norm")) gains[l] = vec;
            else if (!strcmp(what, "k_norm")) gains[L + l] = vec;
            else known = 0;
        } else known = 0;
        if (!known) s = sj_fail(SJ_ERR_ARG, "GPU inference: unknown tensor '%s'", t->name);
    }
    if (s) goto done;
    set_layer_mats(&in, ptrs, L);
    in.q_norm = gains;
    in.k_norm = gains + L;
    in.norms = norms;
    s = create_gpu(&in, max_ctx, out);
done:
    free(bf);
    free(ptrs);
    free(gains);
    free(norms);
    return s;
}

sj_status sj_cuinfer_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_cuinfer **out) {
    *out = NULL;
    SJ_TRY(gpu_mode(mode));
    SJ_TRY(sj_cuda_check_device());
    sj_model *tmp = NULL;
    int64_t n;
    const float *P = sj_model_params(m, &n);
    if (sj_model_device(m) == SJ_DEVICE_CUDA) {
        /* a host copy of the f32 master weights */
        SJ_TRY(sj_model_create(sj_model_config(m), 0, &tmp));
        int64_t n2;
        float *hp = sj_model_params(tmp, &n2);
        sj_status s = sj_cuda_memcpy(hp, P, sizeof(float) * (size_t)n, 1);
        if (s) { sj_model_free(tmp); return s; }
        P = hp;
    }
    sj_status s = model_to_gpu(tmp ? tmp : m, P, n, mode == SJ_INFER_BF16, max_ctx, out);
    sj_model_free(tmp);
    return s;
}

sj_status sj_cuinfer_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_cuinfer **out) {
    *out = NULL;
    SJ_TRY(gpu_mode(mode));
    SJ_TRY(sj_cuda_check_device());
    sj_infer *h = NULL;
    SJ_TRY(sj_infer_load_gguf(path, mode, 1, &h));
    sj_status s = to_gpu(h, max_ctx, out);
    sj_infer_free(h);
    return s;
}
#endif
