/* engine.h — the line between the inference handle (handle.c: argument
 * checks, the position, the verbs of smedjan.h) and the engines behind it:
 * the CPU engine (infer.c) and the GPU engine (infer_cuda.c + cuda/infer.cu).
 * An engine is a backend table and an opaque pointer. An engine never checks
 * what the handle already checked (token range, free cache positions, n > 0)
 * and owns no position: the handle passes it to every call. */
#ifndef SJ_ENGINE_H
#define SJ_ENGINE_H

#include "infer.h"

typedef struct {
    const char *device;          /* "cpu", "cuda": named in errors */
    /* n tokens at positions pos .. pos+n-1; logits_all: NULL or (n, vocab)
     * host memory. On failure the cache past pos may hold garbage. */
    sj_status (*prefill)(void *e, int pos, const int32_t *tokens, int n, float *logits_all);
    /* n steps at positions pos .. pos+n-1, step 0 consuming token and step
     * i > 0 the greedy choice of step i-1 (smallest id of the maximum);
     * next: (n) those choices, or NULL (then n == 1). */
    sj_status (*decode)(void *e, int pos, int32_t token, int n, int32_t *next);
    /* The last position's logits (vocab) in host memory, valid until the
     * next call: the engine's own buffer (CPU) or a copy (GPU). */
    sj_status (*logits)(void *e, const float **host);
    /* State beyond the position (a recurrent state); NULL: the position is
     * all there is to forget (KV caches). */
    void (*reset)(void *e);
    void (*free)(void *e);
    int64_t (*weight_bytes)(const void *e);
    int64_t (*cache_bytes)(const void *e);
    /* Optional, NULL where the device has no such choice. */
    sj_status (*set_kv_f16)(void *e, int f16);      /* only called with an empty cache */
    int (*kv_f16)(const void *e);
    void (*set_options)(void *e, int graphs, int persistent);
    void (*get_options)(const void *e, int *graphs, int *persistent);
} sj_infer_backend;

/* What an engine's constructor hands the handle. */
typedef struct {
    const sj_infer_backend *be;
    void *e;
    sj_config c;
    int max_ctx;                 /* cache positions, resolved */
} sj_infer_engine;

/* max_ctx <= 0: the model's max_seq_len, capped at 4096; too large: SJ_ERR_ARG. */
sj_status sj_infer_resolve_ctx(const sj_config *c, int *max_ctx);

/* The CPU engine (infer.c). */
typedef struct sj_infer_cpu sj_infer_cpu;
sj_status sj_infer_cpu_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_infer_engine *out);
sj_status sj_infer_cpu_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_infer_engine *out);
extern const sj_infer_backend sj_infer_cpu_backend;
/* The engine behind a handle on the CPU; NULL on another device. */
sj_infer_cpu *sj_infer_cpu_of(const sj_infer *h);
/* Its tensors by our names (names.c): a matrix (tok_emb, lm_head,
 * layers.{i}.wq ...) or a vector of dim values (final_norm,
 * layers.{i}.attn_norm ...); NULL when it has none of that name. The norm
 * vectors are one (2 n_layers + 1, dim) array: attn, ffn per layer, final. */
const sj_qmat *sj_infer_cpu_matrix(const sj_infer_cpu *e, const char *name);
const float *sj_infer_cpu_vector(const sj_infer_cpu *e, const char *name);

/* The GPU engine (infer_cuda.c): without a CUDA build both say so. */
sj_status sj_infer_cuda_from_model(sj_model *m, sj_infer_mode mode, int max_ctx, sj_infer_engine *out);
sj_status sj_infer_cuda_load_gguf(const char *path, sj_infer_mode mode, int max_ctx, sj_infer_engine *out);

#endif
