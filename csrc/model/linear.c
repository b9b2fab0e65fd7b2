/* linear.c — linear attention as a token mixer: q, k, v (and, gated, a
 * per-head gate g) from one projection; phi(q), phi(k) (identity or elu + 1);
 * the chunked scan with scale head_dim^-1/2 and decay a = log sigmoid(g)
 * (gated linear attention / RetNet-style, data-dependent) or none; optionally
 * normalised by scale phi(q_t) . sum_s decay phi(k_s) (+ norm_eps), computed
 * by the same scan as one more value channel of ones. wo follows (model.c). */
#include "mamba2.h"
#include <math.h>

sj_status sj_linear_validate(const sj_config *c) {
    const sj_linear_config *s = &c->linear;
    if (!sj_linear_feature_name(s->feature))
        return sj_fail(SJ_ERR_ARG, "linear.feature %d is unknown", s->feature);
    if (!sj_linear_decay_name(s->decay))
        return sj_fail(SJ_ERR_ARG, "linear.decay %d is unknown", s->decay);
    if (s->chunk_size < 1 || s->chunk_size > 256)
        return sj_fail(SJ_ERR_ARG, "linear.chunk_size must be in 1..256, got %d", s->chunk_size);
    if (c->value_mix != 0 && c->layers[0].mixer != SJ_MIXER_ATTENTION)
        return sj_fail(SJ_ERR_ARG, "value_mix reads layer 0's v: layer 0 must be attention");
    return SJ_OK;
}

int64_t sj_linear_param_count(const sj_config *c) {
    const int64_t C = c->dim;
    return C + 4 * C * C + (c->linear.decay == SJ_LINEAR_DECAY_GATED ? (int64_t)c->n_heads * C : 0);
}

int sj_linear_record(sj_tape *tp, const sj_config *c, int p, int B, int T) {
    const sj_linear_config *s = &c->linear;
    const int N = B * T, C = c->dim, H = c->n_heads, hd = C / H, gated = s->decay == SJ_LINEAR_DECAY_GATED;
    const int dv = hd + (s->normalize ? 1 : 0), ldu = 2 * C + H * dv;
    int a = -1;
    int u = sj_op_linear_prep(tp, p, N, H, hd, s->feature, s->normalize, gated ? &a : NULL);
    const sj_scan_dims d = { .B = B, .T = T, .H = H, .G = H, .dk = hd, .dv = dv, .ld_qk = ldu,
                             .q_off = 0, .k_off = C, .ld_v = ldu, .v_off = 2 * C,
                             .chunk = s->chunk_size };
    int y = sj_op_scan(tp, u, u, a, &d, 1.0f / sqrtf((float)hd));
    return s->normalize ? sj_op_linear_norm(tp, y, N, H, hd, c->norm_eps) : y;
}
