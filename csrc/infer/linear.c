/* linear.c — generation for linear attention layers: the recurrent form of
 * what csrc/model/linear.c trains, token by token, on a state of constant
 * size (H, hd, hd [+ 1]) per layer: S = exp(a) S + phi(k) [v | 1]^T,
 * y = scale S^T phi(q), normalised by its last channel when asked. It must
 * never allocate per token. */
#include "infer_cpu.h"
#include <math.h>
#include <string.h>

int64_t sj_infer_linear_state_floats(const sj_config *c) {
    const int64_t H = c->n_heads, hd = c->dim / c->n_heads;
    return H * hd * (hd + (c->linear.normalize ? 1 : 0));
}

static inline float feature(int kind, float x) {
    return kind == SJ_LINEAR_ELU1 ? (x > 0.f ? x + 1.0f : expf(x)) : x;
}

typedef struct { sj_infer_cpu *h; float *S; int n; } lin_job;

/* One task = a head, its n steps in order. */
static void lin_heads(void *ctx, int64_t h0, int64_t h1, int tid) {
    (void)tid;
    const lin_job *j = ctx;
    const sj_config *c = &j->h->c;
    const sj_linear_config *o = &c->linear;
    const int C = c->dim, H = c->n_heads, hd = C / H, dv = hd + (o->normalize ? 1 : 0);
    const float scale = 1.0f / sqrtf((float)hd);
    float q[hd], k[hd], y[dv];
    for (int64_t hh = h0; hh < h1; hh++) {
        float *S = j->S + hh * hd * dv;
        for (int t = 0; t < j->n; t++) {
            const int64_t at = (int64_t)t * C + hh * hd;
            for (int e = 0; e < hd; e++) {
                q[e] = feature(o->feature, j->h->q[at + e]);
                k[e] = feature(o->feature, j->h->lin_k[at + e]);
            }
            const float *v = j->h->lin_v + at;
            const float decay = o->decay == SJ_LINEAR_DECAY_GATED
                              ? 1.0f / (1.0f + expf(-j->h->lin_g[(int64_t)t * H + hh])) : 1.0f;
            memset(y, 0, sizeof y);
            for (int e = 0; e < hd; e++) {
                float *s = S + (int64_t)e * dv;
                for (int p = 0; p < hd; p++) { s[p] = decay * s[p] + k[e] * v[p]; y[p] += q[e] * s[p]; }
                if (o->normalize) { s[hd] = decay * s[hd] + k[e]; y[hd] += q[e] * s[hd]; }
            }
            float *out = j->h->att + at;
            const float inv = o->normalize ? 1.0f / (scale * y[hd] + c->norm_eps) : 1.0f;
            for (int p = 0; p < hd; p++) out[p] = scale * y[p] * inv;
        }
    }
}

void sj_infer_linear_mix(sj_infer_cpu *h, int l, int n) {
    lin_job j = { h, h->rec_state + h->L[l].rec_at, n };
    sj_parallel_for(h->c.n_heads, 1, lin_heads, &j);
}
