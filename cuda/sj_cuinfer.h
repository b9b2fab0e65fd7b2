/* sj_cuinfer.h — how the C side hands a loaded model to the GPU inference
 * engine (cuda/infer.cu): host pointers to weights the CPU engine already
 * read, un-permuted and converted. Valid C and C++; C linkage. */
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

sj_status sj_cuinfer_create(const sj_cuinfer_init *in, sj_cuinfer **out);

#ifdef __cplusplus
}
#endif
#endif
