/* infer_cuda.c — the C side of the GPU inference engine: models reach the
 * GPU through the CPU engine's loaders (GGUF parsing, row un-permutation,
 * dequantisation to the GPU mode all happen once there, with a 1-position
 * cache), then cuda/infer.cu takes the weights. Without a CUDA build every
 * entry point says so. It must never leave the CPU copy behind. */
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

/* The architecture option of c the GPU engine does not run yet, or NULL
 * (an untied head it runs: GGUF's output.weight). */
static const char *option_unsupported(const sj_config *c) {
    if (c->rope_scaling.type != SJ_ROPE_DEFAULT) return "rope_scaling";
    if (c->paired_heads) return "paired_heads";
    if (c->value_mix != 0.f) return "value_mix";
    if (c->embed_skip != 0.f) return "embed_skip";
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layers[l].ffn != SJ_FFN_SWIGLU) return "ffn";
        if (c->layers[l].qk_norm != SJ_QK_NORM_NONE) return "qk_norm";
        if (c->layers[l].window) return "window";
    }
    return NULL;
}

/* The CPU engine's weights (mode fp32 or bf16) to a new GPU engine. */
static sj_status to_gpu(const sj_infer *h, int max_ctx, sj_cuinfer **out) {
    const sj_config *c = sj_infer_config(h);
    const char *opt = option_unsupported(c);
    if (opt) return sj_fail(SJ_ERR_ARG, "the GPU inference engine does not run %s yet: generate on the CPU", opt);
    if (max_ctx <= 0) max_ctx = SJ_MIN(c->max_seq_len, 4096);
    if (max_ctx > (1 << 20)) return sj_fail(SJ_ERR_ARG, "max_ctx %d is too large", max_ctx);
    const int L = c->n_layers, hd = c->dim / c->n_heads, half = hd / 2;
    sj_cuinfer_init in;
    memset(&in, 0, sizeof in);
    in.c = *c;
    in.bf16 = sj_infer_get_mode(h) == SJ_INFER_BF16;
    in.max_ctx = max_ctx;
    in.tok_emb = mat_data(sj_infer_matrix(h, "tok_emb"));
    const sj_qmat *o = sj_infer_matrix(h, "output");
    in.output = o ? mat_data(o) : NULL;
    in.norms = sj_infer_norm(h, 0);
    const void **ptrs = calloc((size_t)7 * L, sizeof *ptrs);
    float *rope = malloc(sizeof(float) * 2 * (size_t)max_ctx * half);
    if (!ptrs || !rope) { free(ptrs); free(rope); return sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory"); }
    static const char *names[7] = { "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down" };
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < L; l++) {
            char nm[48];
            snprintf(nm, sizeof nm, "layers.%d.%s", l, names[k]);
            ptrs[k * L + l] = mat_data(sj_infer_matrix(h, nm));
        }
    in.wq = ptrs; in.wk = ptrs + L; in.wv = ptrs + 2 * L; in.wo = ptrs + 3 * L;
    in.w_gate = ptrs + 4 * L; in.w_up = ptrs + 5 * L; in.w_down = ptrs + 6 * L;
    /* the CPU engine's angles, bit for bit */
    float *cs = rope, *sn = rope + (size_t)max_ctx * half;
    in.rope_cos = cs; in.rope_sin = sn;
    sj_status s = sj_infer_rope_tables(c, max_ctx, cs, sn);
    if (s == SJ_OK) s = sj_cuinfer_create(&in, out);
    free(ptrs);
    free(rope);
    return s;
}

sj_status sj_cuinfer_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_cuinfer **out) {
    *out = NULL;
    SJ_TRY(gpu_mode(mode));
    SJ_TRY(sj_cuda_check_device());
    sj_model *src = m, *tmp = NULL;
    sj_status s;
    if (sj_model_device(m) == SJ_DEVICE_CUDA) {
        /* a host copy of the f32 master weights, read into the CPU engine */
        SJ_TRY(sj_model_create(sj_model_config(m), 0, &tmp));
        int64_t n, n2;
        const float *dp = sj_model_params(m, &n);
        float *hp = sj_model_params(tmp, &n2);
        if ((s = sj_cuda_memcpy(hp, dp, sizeof(float) * (size_t)n, 1))) { sj_model_free(tmp); return s; }
        src = tmp;
    }
    sj_infer *h = NULL;
    s = sj_infer_from_model(src, mode, 1, &h);
    sj_model_free(tmp);
    if (s) return s;
    s = to_gpu(h, max_ctx, out);
    sj_infer_free(h);
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
