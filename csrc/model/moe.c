/* moe.c — the mixture-of-experts channel mixer of a model (SJ_FFN_MOE
 * layers): its tensors, its recording on the tape, and its routing state
 * (the per-layer sj_moe_route and the statistics each forward leaves).
 *
 * Tensors of MoE layer i: layers.i.moe.router (E, C); layers.i.moe.router_bias
 * (E, sigmoid routers: moved by load, never by the optimizer: its gradient
 * is zero); layers.i.moe.w_gate_up (E * 2F, C), expert e's gate rows then
 * its up rows at e * 2F; layers.i.moe.w_down (E * C, F); and for shared
 * experts the dense layer's w_gate, w_up, w_down of hidden n_shared * F. */
#include "model.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sj_moe_layers(const sj_config *c) {
    int n = 0;
    for (int l = 0; l < c->n_layers; l++) n += c->layers[l].ffn == SJ_FFN_MOE;
    return n;
}

/* A weight of layer l as the tape reads it: the compute copy, or (forward-only
 * 16-bit runs) cast from the master on use. */
static int weight(const sj_model *m, sj_tape *tp, int cast, const char *fmt, int l) {
    char name[SJ_NAME_MAX];
    snprintf(name, sizeof name, fmt, l);
    for (int i = 0; i < m->n_tensors; i++) {
        const sj_tensor_info *t = &m->tensors[i];
        if (strcmp(t->name, name)) continue;
        return cast ? sj_op_cast(tp, sj_tape_master(tp, t->offset, t->numel))
                    : sj_tape_param(tp, t->offset, t->numel);
    }
    sj_fail(SJ_ERR_RUNTIME, "model: no tensor '%s'", name);
    return -2;   /* below -1: a failed input (ops refuse it) */
}

int sj_moe_record_layer(sj_model *m, sj_tape *tp, int l, int h, int N, int cast) {
    const sj_moe_config *e = &m->cfg.moe;
    const int C = m->cfg.dim, E = e->n_experts, k = e->top_k, F = e->expert_dim;
    int rec = -1;
    const int logits = sj_op_matmul(tp, h, weight(m, tp, cast, "layers.%d.moe.router", l), N, E, C);
    const int bias = e->router == SJ_MOE_SIGMOID ? weight(m, tp, cast, "layers.%d.moe.router_bias", l) : -1;
    const int w = sj_op_moe_route(tp, logits, bias, N, E, k, &m->moe_routes[l], &rec);
    if (w < 0) return -1;
    const int xp = sj_op_moe_permute(tp, h, rec, N, E, k, C);
    const int gu = sj_op_moe_matmul(tp, xp, weight(m, tp, cast, "layers.%d.moe.w_gate_up", l), rec,
                                    N, E, k, 2 * F, C);
    const int a = sj_op_swiglu(tp, gu, N * k, F, SJ_FFN_SWIGLU);
    const int yp = sj_op_moe_matmul(tp, a, weight(m, tp, cast, "layers.%d.moe.w_down", l), rec,
                                    N, E, k, C, F);
    return sj_op_moe_unpermute(tp, yp, w, rec, N, E, k, C);
}

sj_status sj_moe_attach(sj_model *m) {
    const sj_config *c = &m->cfg;
    if (!sj_moe_layers(c)) return SJ_OK;
    const int per = 2 + c->moe.n_experts;
    const size_t bytes = sizeof(float) * (size_t)per * c->n_layers;
    if (!m->moe_routes && !(m->moe_routes = calloc((size_t)c->n_layers, sizeof(sj_moe_route))))
        return sj_fail(SJ_ERR_NOMEM, "model: out of memory");
    if (!(m->moe_stats = m->be->alloc(bytes, "MoE statistics"))) return SJ_ERR_NOMEM;
    if (!(m->moe_stats_host = m->be->host_alloc(bytes, "MoE statistics"))) return SJ_ERR_NOMEM;
    m->be->fill(m->moe_stats, 0.0f, (int64_t)per * c->n_layers);
    memset(m->moe_stats_host, 0, bytes);
    for (int l = 0; l < c->n_layers; l++)
        m->moe_routes[l] = (sj_moe_route){ c->moe.router, c->moe.norm_topk, c->moe.aux_loss,
                                           c->moe.z_loss, c->moe.bias_update_rate,
                                           m->moe_stats + (int64_t)per * l };
    return SJ_OK;
}

void sj_moe_detach(sj_model *m) {
    if (m->moe_stats) m->be->free(m->moe_stats);
    if (m->moe_stats_host) m->be->host_free(m->moe_stats_host);
    m->moe_stats = m->moe_stats_host = NULL;
}

/* What the MoE layers add to the reported loss: their coefficients times
 * their aux and z losses, from the last forward's statistics (on the host). */
double sj_moe_loss(const sj_model *m) {
    const sj_config *c = &m->cfg;
    if (!m->moe_stats_host) return 0.0;
    const int per = 2 + c->moe.n_experts;
    double sum = 0.0;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layers[l].ffn != SJ_FFN_MOE) continue;
        const float *st = m->moe_stats_host + (int64_t)per * l;
        sum += (double)c->moe.aux_loss * st[0] + (double)c->moe.z_loss * st[1];
    }
    return sum;
}

const float *sj_model_moe_stats(const sj_model *m, int *per_layer) {
    if (per_layer) *per_layer = 2 + m->cfg.moe.n_experts;
    return m->moe_stats_host;
}
