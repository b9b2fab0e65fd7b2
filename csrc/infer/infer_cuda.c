/* infer_cuda.c — the GPU engine's C side: its backend table behind the
 * handle (handle.c), and how models reach it: through the CPU engine's
 * loaders (GGUF parsing, row un-permutation, dequantisation to the GPU mode
 * all happen once there, with a 1-position cache), then cuda/infer.cu takes
 * the weights. Without a CUDA build both constructors say so. It must never
 * leave the CPU copy behind. */
#include "engine.h"
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
sj_status sj_infer_cuda_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    (void)m; (void)max_ctx; (void)out;
    SJ_TRY(gpu_mode(mode));
    return no_cuda();
}
sj_status sj_infer_cuda_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    (void)path; (void)max_ctx; (void)out;
    SJ_TRY(gpu_mode(mode));
    return no_cuda();
}

#else
#include "../../cuda/sj_cuinfer.h"

sj_status sj_cuda_check_device(void);

/* The engine and a host copy of its last logits (what sampling reads). */
typedef struct { sj_cuinfer *g; float *logits; } gpu_engine;

static sj_status gpu_prefill(void *e, int pos, const int32_t *tokens, int n, float *logits_all) {
    return sj_cuinfer_prefill(((gpu_engine *)e)->g, pos, tokens, n, logits_all);
}
static sj_status gpu_decode(void *e, int pos, int32_t token, int n, int32_t *next) {
    return sj_cuinfer_steps(((gpu_engine *)e)->g, pos, token, n, next);
}
static sj_status gpu_logits(void *e, const float **host) {
    gpu_engine *ge = e;
    *host = ge->logits;
    return sj_cuinfer_logits(ge->g, ge->logits);
}
static void gpu_free(void *e) {
    gpu_engine *ge = e;
    if (!ge) return;
    sj_cuinfer_free(ge->g);
    free(ge->logits);
    free(ge);
}
static int64_t gpu_weight_bytes(const void *e) { return sj_cuinfer_weight_bytes(((const gpu_engine *)e)->g); }
static int64_t gpu_cache_bytes(const void *e) { return sj_cuinfer_cache_bytes(((const gpu_engine *)e)->g); }
static void gpu_set_options(void *e, int graphs, int persistent) {
    sj_cuinfer_set_options(((gpu_engine *)e)->g, graphs, persistent);
}
static void gpu_get_options(const void *e, int *graphs, int *persistent) {
    sj_cuinfer_get_options(((const gpu_engine *)e)->g, graphs, persistent);
}

static const sj_infer_backend gpu_backend = {
    .device = "cuda",
    .prefill = gpu_prefill,
    .decode = gpu_decode,
    .logits = gpu_logits,
    .free = gpu_free,
    .weight_bytes = gpu_weight_bytes,
    .cache_bytes = gpu_cache_bytes,
    .set_options = gpu_set_options,
    .get_options = gpu_get_options,
};

static const void *mat_data(const sj_qmat *W) {
    return W->type == SJ_W_F32 ? (const void *)W->f : (const void *)W->bf;
}

/* The CPU engine's weights (mode fp32 or bf16) to a new GPU engine. */
static sj_status to_gpu(const sj_infer_engine *cpu, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    const sj_infer_cpu *h = cpu->e;
    const sj_config *c = &cpu->c;
    SJ_TRY(sj_infer_resolve_ctx(c, &max_ctx));
    const int L = c->n_layers, hd = c->dim / c->n_heads, half = hd / 2;
    sj_cuinfer_init in;
    memset(&in, 0, sizeof in);
    in.c = *c;
    in.bf16 = mode == SJ_INFER_BF16;
    in.max_ctx = max_ctx;
    in.tok_emb = mat_data(sj_infer_cpu_matrix(h, "tok_emb"));
    const sj_qmat *o = sj_infer_cpu_matrix(h, "lm_head");
    in.output = o ? mat_data(o) : NULL;
    in.norms = sj_infer_cpu_vector(h, "layers.0.attn_norm");   /* the start of all norms */
    gpu_engine *ge = calloc(1, sizeof *ge);
    const void **ptrs = calloc((size_t)7 * L, sizeof *ptrs);
    const float **gains = calloc((size_t)2 * L, sizeof *gains);   /* q_norm, k_norm per layer */
    float *rope = malloc(sizeof(float) * 2 * (size_t)max_ctx * half);
    if (ge) ge->logits = malloc(sizeof(float) * (size_t)c->vocab_size);
    if (!ge || !ge->logits || !ptrs || !gains || !rope) {
        gpu_free(ge); free(ptrs); free(gains); free(rope);
        return sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory");
    }
    static const char *names[7] = { "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down" };
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < L; l++) {
            char nm[48];
            snprintf(nm, sizeof nm, "layers.%d.%s", l, names[k]);
            ptrs[k * L + l] = mat_data(sj_infer_cpu_matrix(h, nm));
        }
    in.wq = ptrs; in.wk = ptrs + L; in.wv = ptrs + 2 * L; in.wo = ptrs + 3 * L;
    in.w_gate = ptrs + 4 * L; in.w_up = ptrs + 5 * L; in.w_down = ptrs + 6 * L;
    for (int l = 0; l < L; l++) {   /* NULL where the layer's qk-norm has no gains */
        char nm[48];
        snprintf(nm, sizeof nm, "layers.%d.q_norm", l);
        gains[l] = sj_infer_cpu_vector(h, nm);
        snprintf(nm, sizeof nm, "layers.%d.k_norm", l);
        gains[L + l] = sj_infer_cpu_vector(h, nm);
    }
    in.q_norm = gains; in.k_norm = gains + L;
    /* the CPU engine's angles, bit for bit */
    float *cs = rope, *sn = rope + (size_t)max_ctx * half;
    in.rope_cos = cs; in.rope_sin = sn;
    sj_status s = sj_infer_rope_tables(c, max_ctx, cs, sn);
    if (s == SJ_OK) s = sj_cuinfer_create(&in, &ge->g);
    free(ptrs);
    free(gains);
    free(rope);
    if (s) { gpu_free(ge); return s; }
    out->be = &gpu_backend;
    out->e = ge;
    out->c = *c;
    out->max_ctx = max_ctx;
    return SJ_OK;
}

sj_status sj_infer_cuda_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    SJ_TRY(gpu_mode(mode));
    const sj_config *c = sj_model_config(m);
    for (int l = 0; l < c->n_layers; l++) {
        const sj_layer *y = &c->layers[l];
        if (y->mixer != SJ_MIXER_ATTENTION || y->ffn == SJ_FFN_MOE || y->ffn == SJ_FFN_NONE)
            return sj_fail(SJ_ERR_ARG, "layer %d: %s layers: GPU generation is not built yet "
                           "(generate on the CPU: device='cpu')", l,
                           y->mixer != SJ_MIXER_ATTENTION ? sj_mixer_name(y->mixer)
                           : y->ffn == SJ_FFN_MOE ? "moe" : "ffn none");
    }
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
    sj_infer_engine cpu;
    s = sj_infer_cpu_from_model(src, mode, 1, &cpu);
    sj_model_free(tmp);
    if (s) return s;
    s = to_gpu(&cpu, mode, max_ctx, out);
    cpu.be->free(cpu.e);
    return s;
}

sj_status sj_infer_cuda_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_infer_engine *out) {
    SJ_TRY(gpu_mode(mode));
    SJ_TRY(sj_cuda_check_device());
    sj_infer_engine cpu;
    SJ_TRY(sj_infer_cpu_load_gguf(path, mode, 1, &cpu));
    sj_status s = to_gpu(&cpu, mode, max_ctx, out);
    cpu.be->free(cpu.e);
    return s;
}
#endif
