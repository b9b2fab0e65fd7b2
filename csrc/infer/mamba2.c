/* mamba2.c — generation for Mamba-2 layers: the recurrent form of the mixer
 * csrc/model/mamba2.c trains (prefill and decode alike, token by token), on a
 * state of constant size: the last d_conv - 1 conv inputs and the scan's
 * (H, N, P) per layer, whatever the context. The projections around it run
 * in forward.c. It must never allocate per token. */
#include "infer_cpu.h"
#include "../model/mamba2.h"
#include <math.h>
#include <string.h>

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

int64_t sj_infer_mamba2_state_floats(const sj_config *c) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(c);
    return (int64_t)(m.K - 1) * m.conv_dim + (int64_t)m.H * m.N * m.P;
}

int64_t sj_infer_mamba2_vector_floats(const sj_config *c) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(c);
    return (int64_t)m.conv_dim * (m.K + 1) + 3 * m.H + m.d_inner;
}

typedef struct { sj_infer_cpu *h; const layer_w *w; sj_mamba2_shape m; int n; float *conv, *S; } mix_job;

/* One task = a range of channels: n tokens through the conv, its state shifted. */
static void conv_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const mix_job *j = ctx;
    const int K = j->m.K, W = j->m.conv_dim, ld = j->m.d_in_proj, off = j->m.d_inner;
    for (int64_t c = c0; c < c1; c++) {
        const float *w = j->w->conv_w + c * K;
        for (int t = 0; t < j->n; t++) {
            const float x = j->h->zx[(int64_t)t * ld + off + c];
            float s = j->w->conv_b[c] + w[K - 1] * x;
            for (int i = 0; i < K - 1; i++) s += w[i] * j->conv[(int64_t)i * W + c];
            for (int i = 0; i + 1 < K - 1; i++) j->conv[(int64_t)i * W + c] = j->conv[(int64_t)(i + 1) * W + c];
            if (K > 1) j->conv[(int64_t)(K - 2) * W + c] = x;
            j->h->xbc[(int64_t)t * W + c] = s * sigmoid(s);
        }
    }
}

/* One task = a head: n steps of S = exp(dt A) S + B (dt x)^T, y = S^T C + D x. */
static void scan_heads(void *ctx, int64_t h0, int64_t h1, int tid) {
    (void)tid;
    const mix_job *j = ctx;
    const sj_mamba2_shape *m = &j->m;
    const int N = m->N, P = m->P, per = m->H / m->G;
    for (int64_t hh = h0; hh < h1; hh++) {
        float *S = j->S + hh * N * P;
        const int g = (int)hh / per;
        const float A = -expf(j->w->A_log[hh]);
        for (int t = 0; t < j->n; t++) {
            const float *row = j->h->xbc + (int64_t)t * m->conv_dim;
            const float *x = row + hh * P, *B = row + m->d_inner + g * N, *C = B + m->G * N;
            const float dt = softplus(j->h->zx[(int64_t)t * m->d_in_proj + m->d_inner + m->conv_dim + hh] +
                                      j->w->dt_bias[hh]);
            const float decay = expf(dt * A);
            float *y = j->h->ssm_y + (int64_t)t * m->d_inner + hh * P;
            for (int p = 0; p < P; p++) y[p] = j->w->D[hh] * x[p];
            for (int e = 0; e < N; e++) {
                float *s = S + (int64_t)e * P;
                const float b = B[e] * dt, cc = C[e];
#pragma omp simd
                for (int p = 0; p < P; p++) {
                    s[p] = decay * s[p] + b * x[p];
                    y[p] += cc * s[p];
                }
            }
        }
    }
}

/* One task = a token: y silu(z), RMS-normalised per group, times the gains. */
static void gate_rows(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const mix_job *j = ctx;
    const int Din = j->m.d_inner, gs = Din / j->m.G;
    for (int64_t t = t0; t < t1; t++) {
        float *y = j->h->ssm_y + t * Din;
        const float *z = j->h->zx + t * j->m.d_in_proj;
        for (int g = 0; g < j->m.G; g++) {
            float ss = 0.f;
            for (int c = g * gs; c < (g + 1) * gs; c++) { y[c] *= z[c] * sigmoid(z[c]); ss += y[c] * y[c]; }
            const float rs = 1.0f / sqrtf(ss / gs + j->h->c.norm_eps);
            for (int c = g * gs; c < (g + 1) * gs; c++) y[c] *= rs * j->w->ssm_norm[c];
        }
    }
}

void sj_infer_mamba2_mix(sj_infer_cpu *h, int l, int n) {
    const sj_mamba2_shape m = sj_mamba2_shape_of(&h->c);
    float *state = h->rec_state + h->L[l].rec_at;
    mix_job j = { h, &h->L[l], m, n, state, state + (int64_t)(m.K - 1) * m.conv_dim };
    sj_parallel_for(m.conv_dim, 64, conv_cols, &j);
    sj_parallel_for(m.H, 1, scan_heads, &j);
    sj_parallel_for(n, 4, gate_rows, &j);
}
