/* sj_cuinfer.h — the GPU inference engine (cuda/infer.cu) as its C glue
 * (csrc/infer/infer_cuda.c) sees it: creation from host pointers to weights
 * the CPU engine already read, un-permuted and converted, and the calls
 * behind the handle's backend table. The handle checks every argument and
 * owns the position. Valid C and C++; C linkage. */
#ifndef SJ_CUINFER_H
#define SJ_CUINFER_H

#include "../csrc/smedjan.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    sj_config c;
    int bf16;                    /* matrices are bf16 bit patterns (uint16), else f32 */
    int max_ctx;
    const void *tok_emb;         /* (V, C) */
    const void *output;          /* (V, C), or NULL: tied to tok_emb */
    /* per layer: (rows, cols) row-major, our (Hugging Face) row order; wo
     * (C, H/2 hd) with paired heads */
    const void *const *wq, *const *wk, *const *wv, *const *wo;
    const void *const *w_gate, *const *w_up, *const *w_down;
    /* per layer (hd) f32, where its qk_norm is weighted (others: NULL, or
     * the arrays NULL when no layer's is) */
    const float *const *q_norm, *const *k_norm;
    const float *norms;          /* (2 n_layers + 1, C): attn, ffn per layer, final */
    const float *rope_cos, *rope_sin;   /* (max_ctx, hd/2), the CPU engine's angles */
} sj_cuinfer_init;

typedef struct sj_cuinfer sj_cuinfer;
sj_status sj_cuinfer_create(const sj_cuinfer_init *in, sj_cuinfer **out);
void sj_cuinfer_free(sj_cuinfer *g);
int64_t sj_cuinfer_weight_bytes(const sj_cuinfer *g);   /* on the GPU */
int64_t sj_cuinfer_cache_bytes(const sj_cuinfer *g);    /* KV cache + run state, on the GPU */
/* n tokens at positions pos ..; logits_all: NULL or (n, vocab) host memory. */
sj_status sj_cuinfer_prefill(sj_cuinfer *g, int pos, const int32_t *tokens, int n, float *logits_all);
/* n steps chained on the device at positions pos .., the first consuming
 * token; out (may be NULL): out[i] = step i's greedy choice (step i+1's input). */
sj_status sj_cuinfer_steps(sj_cuinfer *g, int pos, int32_t token, int n, int32_t *out);
/* The last position's logits (vocab) into host memory. */
sj_status sj_cuinfer_logits(sj_cuinfer *g, float *out);
void sj_cuinfer_set_options(sj_cuinfer *g, int graphs, int persistent);
void sj_cuinfer_get_options(const sj_cuinfer *g, int *graphs, int *persistent);

#ifdef __cplusplus
}
#endif
#endif
