/* mamba2.h — the mixers over the chunked scan: Mamba-2 (mamba2.c) and
 * linear attention (linear.c): shapes, parameters and tape recording,
 * shared by the config, the model and the inference engine. */
#ifndef SJ_MAMBA2_H
#define SJ_MAMBA2_H

#include "../graph/tape.h"

/* in_proj's output row (transformers' layout): [z (d_inner) | xBC (conv_dim) |
 * dt (H)], xBC = [x (d_inner) | B (G N) | C (G N)]. */
typedef struct { int d_inner, H, P, N, G, K, conv_dim, d_in_proj; } sj_mamba2_shape;

static inline sj_mamba2_shape sj_mamba2_shape_of(const sj_config *c) {
    const sj_ssm_config *s = &c->ssm;
    sj_mamba2_shape m;
    m.d_inner = s->expand * c->dim;
    m.P = s->head_dim;
    m.H = m.P > 0 ? m.d_inner / m.P : 0;
    m.N = s->d_state;
    m.G = s->n_groups;
    m.K = s->d_conv;
    m.conv_dim = m.d_inner + 2 * m.G * m.N;
    m.d_in_proj = m.d_inner + m.conv_dim + m.H;
    return m;
}

/* The config's ssm field, checked where a layer is a Mamba-2 mixer. */
sj_status sj_mamba2_validate(const sj_config *c);
/* Parameters of one Mamba-2 mixer (its pre-norm included). */
int64_t sj_mamba2_param_count(const sj_config *c);
/* mamba_ssm's initialisation of the layer tensors named layers.{i}.ssm.*
 * (dt_bias from dt in [0.001, 0.1] log-uniform, A_log = log U(1, 16), D = 1,
 * the conv as PyTorch's Conv1d), over the generic initialisation. */
void sj_mamba2_init(float *params, const sj_tensor_info *t, int n_tensors, const sj_config *c,
                    uint64_t seed);

/* The mixer between in_proj and out_proj, on a tape: zx (B*T, d_in_proj) ->
 * (B*T, d_inner), the gated norm's output; weights: tensor ids of conv_w
 * (conv_dim, K), conv_b (conv_dim), dt (2H: dt_bias | A_log), D (H), norm (d_inner). */
typedef struct { int conv_w, conv_b, dt, D, norm; } sj_mamba2_params;
int sj_mamba2_record(sj_tape *tp, const sj_config *c, const sj_mamba2_params *w, int zx, int B,
                     int T);

/* Linear attention (linear.c): the config's linear field, checked where a
 * layer is a linear mixer; parameters of one such mixer (its pre-norm
 * included); the mixer between the projection and wo on a tape: p = h [wq |
 * wk | wv (| wg)]^T (B*T, 3 dim (+ n_heads)) -> (B*T, dim). */
sj_status sj_linear_validate(const sj_config *c);
int64_t sj_linear_param_count(const sj_config *c);
int sj_linear_record(sj_tape *tp, const sj_config *c, int p, int B, int T);

#endif
