/* mamba2.c — the Mamba-2 (SSD) mixer as transformers' Mamba2Mixer computes
 * it: in_proj -> (z, xBC, dt); xBC through a causal depthwise conv and SiLU;
 * dt = softplus(dt + dt_bias), A = -exp(A_log); the chunked scan with q = C,
 * k = B, v = x dt, a = dt A; + D x; y silu(z) RMS-normalised per group;
 * out_proj (model.c adds it to the residual stream). */
#include "mamba2.h"
#include <math.h>
#include <string.h>

sj_status sj_mamba2_validate(const sj_config *c) {
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    const sj_ssm_config *s = &c->ssm;
    NEED(s->d_state >= 1 && s->d_state <= 256, "ssm.d_state must be in 1..256, got %d", s->d_state);
    NEED(s->d_conv >= 1 && s->d_conv <= 16, "ssm.d_conv must be in 1..16, got %d", s->d_conv);
    NEED(s->expand >= 1 && s->expand <= 16, "ssm.expand must be in 1..16, got %d", s->expand);
    NEED(s->head_dim >= 1 && s->head_dim <= 256, "ssm.head_dim must be in 1..256, got %d",
         s->head_dim);
    NEED((s->expand * c->dim) % s->head_dim == 0, "ssm.head_dim (%d) must divide expand * dim (%d)",
         s->head_dim, s->expand * c->dim);
    const int H = s->expand * c->dim / s->head_dim;
    NEED(s->n_groups >= 1 && H % s->n_groups == 0,
         "ssm.n_groups (%d) must divide the number of heads expand * dim / head_dim (%d)",
         s->n_groups, H);
    NEED(s->chunk_size >= 1 && s->chunk_size <= 256, "ssm.chunk_size must be in 1..256, got %d",
         s->chunk_size);
    NEED(c->value_mix == 0 || c->layers[0].mixer == SJ_MIXER_ATTENTION,
         "value_mix reads layer 0's v: layer 0 must be attention");
    return SJ_OK;
    #undef NEED
}

int64_t sj_mamba2_param_count(const sj_config *c) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(c);
    return (int64_t)c->dim + (int64_t)m.d_in_proj * c->dim + (int64_t)m.conv_dim * (m.K + 1) +
           3 * m.H + m.d_inner + (int64_t)c->dim * m.d_inner;
}

void sj_mamba2_init(float *params, const sj_tensor_info *t, int n_tensors, const sj_config *c,
                    uint64_t seed) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(c);
    for (int i = 0; i < n_tensors; i++) {
        const char *nm = strstr(t[i].name, ".ssm.");
        if (!nm) continue;
        nm += 5;
        float *p = params + t[i].offset;
        sj_rng r;
        sj_rng_seed(&r, seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(i + 1)));
        if (!strcmp(nm, "dt_bias")) {
            const float lo = logf(0.001f), hi = logf(0.1f);
            for (int64_t k = 0; k < t[i].numel; k++) {
                float dt = expf(lo + (hi - lo) * (float)sj_rng_uniform(&r));
                dt = dt < 1e-4f ? 1e-4f : dt;
                p[k] = dt + logf(-expm1f(-dt));   /* softplus^-1(dt) */
            }
        } else if (!strcmp(nm, "A_log")) {
            for (int64_t k = 0; k < t[i].numel; k++) p[k] = logf(1.0f + 15.0f * (float)sj_rng_uniform(&r));
        } else if (!strcmp(nm, "D")) {
            for (int64_t k = 0; k < t[i].numel; k++) p[k] = 1.0f;
        } else if (!strcmp(nm, "conv_w") || !strcmp(nm, "conv_b")) {
            const float bound = 1.0f / sqrtf((float)m.K);   /* Conv1d's default, fan_in = K */
            for (int64_t k = 0; k < t[i].numel; k++) p[k] = bound * (2.0f * (float)sj_rng_uniform(&r) - 1.0f);
        }
    }
}

int sj_mamba2_record(sj_tape *tp, const sj_config *c, const sj_mamba2_params *w, int zx, int B,
                     int T) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(c);
    const int N = B * T, ld = m.d_in_proj;
    int xbc = sj_op_conv1d_silu(tp, zx, w->conv_w, w->conv_b, B, T, ld, m.d_inner, m.conv_dim, m.K);
    int a;
    int v = sj_op_ssd_prep(tp, xbc, zx, w->dt, N, m.H, m.P, m.conv_dim, ld, m.d_inner + m.conv_dim, &a);
    const sj_scan_dims d = { .B = B, .T = T, .H = m.H, .G = m.G, .dk = m.N, .dv = m.P,
                             .ld_qk = m.conv_dim, .q_off = m.d_inner + m.G * m.N, .k_off = m.d_inner,
                             .ld_v = m.H * m.P, .v_off = 0, .chunk = c->ssm.chunk_size };
    int y = sj_op_scan(tp, xbc, v, a, &d, 1.0f);
    y = sj_op_ssd_skip(tp, y, xbc, w->D, N, m.H, m.P, m.conv_dim);
    return sj_op_gated_rmsnorm(tp, y, zx, w->norm, N, m.d_inner, m.G, ld, 0, c->norm_eps);
}
