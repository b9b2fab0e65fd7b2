/* moe_forward.c — the CPU inference engine's mixture-of-experts layers:
 * route a chunk's tokens, run each chosen expert over its tokens only (a
 * decode step reads top_k experts' weights, never the others), and sum
 * their outputs by the routing weights. The routing, permutation and
 * weighted sum are the training kernels (cpu/moe.c), so generation chooses
 * exactly as the model trained. Compiled once per ISA level. */
#include "infer_cpu.h"
#include "../cpu/cpu.h"

static void matmul(sj_infer_cpu *h, float *out, const sj_qmat *W, const float *x, int n) {
    if (W->type == SJ_W_Q8 || W->type == SJ_W_Q4) sj_qact_quantize(&h->qa, x, n, W->cols);
    sj_qmat_mul(out, W, x, &h->qa, n);
}

void sj_infer_moe_ffn(sj_infer_cpu *h, const layer_w *w, float *x, const float *xn, int n) {
    const sj_moe_config *e = &h->c.moe;
    const int C = h->c.dim, E = e->n_experts, k = e->top_k, F = e->expert_dim;
    matmul(h, h->moe_logits, &w->router, xn, n);
    sj_cpu_moe_route_forward(h->moe_w, h->moe_record, h->moe_logits, w->moe_bias, n, E, k,
                             &h->moe_route);
    sj_cpu_moe_permute_forward(h->moe_xp, xn, h->moe_record, n, E, k, C);
    const int32_t *off = sj_moe_record_at(h->moe_record, n, E, k).offsets;
    for (int ex = 0; ex < E; ex++) {
        const int rows = off[ex + 1] - off[ex];   /* at most n: a token picks an expert once */
        if (!rows) continue;
        matmul(h, h->moe_gu, &w->experts[ex], h->moe_xp + (int64_t)off[ex] * C, rows);
        sj_cpu_swiglu_forward(h->moe_act, h->moe_gu, rows, F, SJ_FFN_SWIGLU);
        matmul(h, h->moe_yp + (int64_t)off[ex] * C, &w->experts[E + ex], h->moe_act, rows);
    }
    sj_cpu_moe_unpermute_forward(h->moe_y, h->moe_yp, h->moe_w, h->moe_record, n, E, k, C);
    for (int64_t i = 0; i < (int64_t)n * C; i++) x[i] += h->moe_y[i];
}
