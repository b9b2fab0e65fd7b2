/* scan.c — the chunked scan: causal linear attention with a per-head scalar
 * decay (Mamba-2's SSD, gated linear attention), forward and backward:
 *   y_t = scale sum_{s<=t} exp(c_t - c_s) (q_t . k_s) v_s,  c_t = sum_{r<=t} a_r.
 * Chunks of L tokens: within a chunk the (L, L) matrix form, across chunks
 * a (dk, dv) state. Memory is O(L^2 + dk dv) per task, never O(T^2); the
 * backward recomputes the states instead of keeping them. Decays enter as
 * exp(c_t - c_s) with s <= t only: with a <= 0 every factor is <= 1. */
#include "cpu.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *y, *dqk, *dv, *da;
    const float *qk, *v, *a, *dy, *yf;
    sj_scan_dims d;
    float scale;
    int accum_a;
} scan_job;

/* Row pointers of token t (within sequence b) for head h. */
#define QROW(j, b, t, g) ((j)->qk + ((int64_t)(b) * (j)->d.T + (t)) * (j)->d.ld_qk + (j)->d.q_off + (int64_t)(g) * (j)->d.dk)
#define KROW(j, b, t, g) ((j)->qk + ((int64_t)(b) * (j)->d.T + (t)) * (j)->d.ld_qk + (j)->d.k_off + (int64_t)(g) * (j)->d.dk)
#define VROW(j, b, t, h) ((j)->v + ((int64_t)(b) * (j)->d.T + (t)) * (j)->d.ld_v + (j)->d.v_off + (int64_t)(h) * (j)->d.dv)
#define AVAL(j, b, t, h) ((j)->a ? (j)->a[((int64_t)(b) * (j)->d.T + (t)) * (j)->d.H + (h)] : 0.0f)

/* cum[i] = a of the chunk's tokens 0..i, summed. */
static void chunk_cum(const scan_job *j, int b, int h, int c0, int n, float *cum) {
    float s = 0.f;
    for (int i = 0; i < n; i++) { s += AVAL(j, b, c0 + i, h); cum[i] = s; }
}

/* One task = one (b, h): its y slice. */
static void fwd_heads(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const scan_job *j = ctx;
    const sj_scan_dims *d = &j->d;
    const int T = d->T, H = d->H, dk = d->dk, dv = d->dv, L = d->chunk, per = H / d->G;
    float S[dk * dv], cum[L];
    for (int64_t i = i0; i < i1; i++) {
        const int h = (int)(i % H), b = (int)(i / H), g = h / per;
        memset(S, 0, sizeof S);
        for (int c0 = 0; c0 < T; c0 += L) {
            const int n = SJ_MIN(L, T - c0);
            chunk_cum(j, b, h, c0, n, cum);
            for (int t = 0; t < n; t++) {
                const float *q = QROW(j, b, c0 + t, g);
                float *y = j->y + ((int64_t)b * T + c0 + t) * H * dv + (int64_t)h * dv;
                memset(y, 0, sizeof(float) * dv);
                for (int e = 0; e < dk; e++) sj_axpy(y, q[e], S + (int64_t)e * dv, dv);
                const float inter = expf(cum[t]);
                for (int e = 0; e < dv; e++) y[e] *= inter;
                for (int s = 0; s <= t; s++)
                    sj_axpy(y, expf(cum[t] - cum[s]) * sj_dot(q, KROW(j, b, c0 + s, g), dk),
                         VROW(j, b, c0 + s, h), dv);
                for (int e = 0; e < dv; e++) y[e] *= j->scale;
            }
            /* S = exp(cum_end) S + sum_s exp(cum_end - cum_s) k_s v_s^T */
            const float keep = expf(cum[n - 1]);
            for (int e = 0; e < dk * dv; e++) S[e] *= keep;
            for (int s = 0; s < n; s++) {
                const float *k = KROW(j, b, c0 + s, g), *v = VROW(j, b, c0 + s, h);
                const float w = expf(cum[n - 1] - cum[s]);
                for (int e = 0; e < dk; e++) sj_axpy(S + (int64_t)e * dv, w * k[e], v, dv);
            }
        }
    }
}

// y: (B*T, H*dv); qk: rows of ld_qk; v: rows of ld_v; a: (B*T, H) or NULL
void sj_cpu_scan_forward(void *y, const void *qk, const void *v, const void *a,
                         const sj_scan_dims *d, float scale) {
    scan_job j = { .y = y, .qk = qk, .v = v, .a = a, .d = *d, .scale = scale };
    sj_parallel_for((int64_t)d->B * d->H, 1, fwd_heads, &j);
}

/* Backward of one head h of sequence b, adding into dq and dk (its group's)
 * and dv, da (+)=. Pass 1 runs forward with the state S: dq_t = scale S_t dy_t.
 * Pass 2 runs backward with R_t = sum_{u>t} exp(c_u - c_t) q_u dy_u^T:
 * dk_s = scale R_s v_s, dv_s = scale R_s^T k_s, and da_r = sum_{t>=r} dc_t,
 * dc_t = q_t . dq_t - k_t . dk_t (this head's shares), where q_t . dq_t =
 * y_t . dy_t: the forward's output gives it without keeping dq. */
static void bwd_head(const scan_job *j, int b, int h, float *S, float *cum, float *gq) {
    const sj_scan_dims *d = &j->d;
    const int T = d->T, H = d->H, dk = d->dk, dv = d->dv, L = d->chunk, g = h / (H / d->G);
    const int64_t row0 = (int64_t)b * T;
    float *da = j->da ? j->da + row0 * H + h : NULL, kdk[L], later_dc = 0.f;
    #define DY(t) (j->dy + (row0 + (t)) * H * dv + (int64_t)h * dv)
    #define DQ(t) (j->dqk + (row0 + (t)) * d->ld_qk + d->q_off + (int64_t)g * dk)
    #define DK(t) (j->dqk + (row0 + (t)) * d->ld_qk + d->k_off + (int64_t)g * dk)
    #define DV(t) (j->dv + (row0 + (t)) * d->ld_v + d->v_off + (int64_t)h * dv)
    memset(S, 0, sizeof(float) * dk * dv);
    for (int c0 = 0; c0 < T; c0 += L) {
        const int n = SJ_MIN(L, T - c0);
        chunk_cum(j, b, h, c0, n, cum);
        for (int t = 0; t < n; t++) {
            const float *dy = DY(c0 + t);
            const float inter = expf(cum[t]);
            for (int e = 0; e < dk; e++) gq[e] = inter * sj_dot(S + (int64_t)e * dv, dy, dv);
            for (int s = 0; s <= t; s++)
                sj_axpy(gq, expf(cum[t] - cum[s]) * sj_dot(dy, VROW(j, b, c0 + s, h), dv),
                     KROW(j, b, c0 + s, g), dk);
            for (int e = 0; e < dk; e++) gq[e] *= j->scale;
            if (j->dqk) sj_axpy(DQ(c0 + t), 1.0f, gq, dk);
        }
        const float keep = expf(cum[n - 1]);
        for (int e = 0; e < dk * dv; e++) S[e] *= keep;
        for (int s = 0; s < n; s++) {
            const float *k = KROW(j, b, c0 + s, g), *v = VROW(j, b, c0 + s, h);
            const float w = expf(cum[n - 1] - cum[s]);
            for (int e = 0; e < dk; e++) sj_axpy(S + (int64_t)e * dv, w * k[e], v, dv);
        }
    }
    float *R = S, gv[dv];
    memset(R, 0, sizeof(float) * dk * dv);
    for (int c0 = (T - 1) / L * L; c0 >= 0; c0 -= L) {
        const int n = SJ_MIN(L, T - c0);
        chunk_cum(j, b, h, c0, n, cum);
        for (int s = 0; s < n; s++) {
            const float *k = KROW(j, b, c0 + s, g), *v = VROW(j, b, c0 + s, h);
            const float later = expf(cum[n - 1] - cum[s]);
            for (int e = 0; e < dk; e++) gq[e] = later * sj_dot(R + (int64_t)e * dv, v, dv);
            memset(gv, 0, sizeof gv);
            for (int e = 0; e < dk; e++) sj_axpy(gv, later * k[e], R + (int64_t)e * dv, dv);
            for (int t = s; t < n; t++) {
                const float *q = QROW(j, b, c0 + t, g), *dy = DY(c0 + t);
                const float w = expf(cum[t] - cum[s]);
                sj_axpy(gq, w * sj_dot(dy, v, dv), q, dk);
                sj_axpy(gv, w * sj_dot(q, k, dk), dy, dv);
            }
            for (int e = 0; e < dk; e++) gq[e] *= j->scale;
            if (j->dqk) sj_axpy(DK(c0 + s), 1.0f, gq, dk);
            kdk[s] = sj_dot(k, gq, dk);
            if (j->dv) sj_axpy(DV(c0 + s), j->scale, gv, dv);
        }
        for (int s = n - 1; da && s >= 0; s--) {
            const int64_t at = (row0 + c0 + s) * H * dv + (int64_t)h * dv;
            later_dc += sj_dot(j->yf + at, j->dy + at, dv) - kdk[s];
            da[(int64_t)(c0 + s) * H] = (j->accum_a ? da[(int64_t)(c0 + s) * H] : 0.f) + later_dc;
        }
        /* R_{c0-1} = exp(cum_end) R + sum_t exp(cum_t) q_t dy_t^T */
        const float keep = expf(cum[n - 1]);
        for (int e = 0; e < dk * dv; e++) R[e] *= keep;
        for (int t = 0; t < n; t++) {
            const float *q = QROW(j, b, c0 + t, g), *dy = DY(c0 + t);
            const float w = expf(cum[t]);
            for (int e = 0; e < dk; e++) sj_axpy(R + (int64_t)e * dv, w * q[e], dy, dv);
        }
    }
    #undef DY
    #undef DQ
    #undef DK
    #undef DV
}

/* One task = one (b, group): the group's dq and dk are its own, and so are
 * the dv and da of the group's heads. */
static void bwd_groups(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const scan_job *j = ctx;
    const sj_scan_dims *d = &j->d;
    const int per = d->H / d->G;
    float S[d->dk * d->dv], cum[d->chunk], gq[d->dk];
    for (int64_t i = i0; i < i1; i++) {
        const int g = (int)(i % d->G), b = (int)(i / d->G);
        for (int h = g * per; h < (g + 1) * per; h++) bwd_head(j, b, h, S, cum, gq);
    }
}

/* Rows of ld elements zeroed (before tasks that add into their own slices). */
typedef struct { float *x; int ld; } zero_job;
static void zero_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const zero_job *z = ctx;
    memset(z->x + r0 * z->ld, 0, sizeof(float) * (size_t)(r1 - r0) * z->ld);
}

// dqk: rows of ld_qk (+)= on the q and k slices, zero elsewhere unless accum_qk;
// dv likewise with ld_v; da: (B*T, H) (+)=. Any of the three may be NULL.
void sj_cpu_scan_backward(void *dqk, void *dv, void *da, const void *dy, const void *qk,
                          const void *v, const void *a, const void *y, const sj_scan_dims *d,
                          float scale, int accum_qk, int accum_v, int accum_a) {
    const int64_t N = (int64_t)d->B * d->T;
    if (dqk && !accum_qk) {
        zero_job z = { dqk, d->ld_qk };
        sj_parallel_for(N, 64, zero_rows, &z);
    }
    if (dv && !accum_v) {
        zero_job z = { dv, d->ld_v };
        sj_parallel_for(N, 64, zero_rows, &z);
    }
    scan_job j = { .dqk = dqk, .dv = dv, .da = a ? da : NULL, .dy = dy, .qk = qk, .v = v,
                   .a = a, .yf = y, .d = *d, .scale = scale, .accum_a = accum_a };
    sj_parallel_for((int64_t)d->B * d->G, 1, bwd_groups, &j);
}
