/* ssm.c — the pieces around the scan (scan.c), forward and backward:
 * Mamba-2's causal depthwise conv + SiLU, step sizes and decays (dt, a), D
 * skip and gated RMSNorm; linear attention's feature maps, gate and
 * normalisation. Inputs that are column slices of a wider row (the in_proj
 * output) get their gradient on the slice; a first writer (accum 0) zeroes
 * the rest of the row, so the gradient is whole. */
#include "cpu.h"
#include <math.h>
#include <string.h>

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float silu(float x) { return x * sigmoid(x); }
static inline float dsilu(float x) { const float s = sigmoid(x); return s * (1.0f + x * (1.0f - s)); }
/* torch's softplus (beta 1, threshold 20) */
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

typedef struct { float *x; int ld; } zero_job;
static void zero_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const zero_job *z = ctx;
    memset(z->x + r0 * z->ld, 0, sizeof(float) * (size_t)(r1 - r0) * z->ld);
}
static void zero(float *x, int64_t N, int ld) {
    zero_job z = { x, ld };
    sj_parallel_for(N, 64, zero_rows, &z);
}

/* ---- conv1d + SiLU ------------------------------------------------------- */

typedef struct {
    float *out, *dx, *dw, *db; const float *x, *w, *bias, *dout;
    int B, T, ld, off, W, K, dw_accum;
} conv_job;

/* The pre-activation of row t of sequence b, channel c. */
static inline float conv_at(const conv_job *j, int64_t row0, int t, int c) {
    float s = j->bias[c];
    for (int i = 0; i < j->K; i++) {
        const int u = t - j->K + 1 + i;
        if (u >= 0) s += j->w[(int64_t)c * j->K + i] * j->x[(row0 + u) * j->ld + j->off + c];
    }
    return s;
}

static void conv_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const conv_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const int t = (int)(r % j->T);
        for (int c = 0; c < j->W; c++) j->out[r * j->W + c] = silu(conv_at(j, r - t, t, c));
    }
}

// out: (B*T, W); x: rows of ld, channels at off
void sj_cpu_conv1d_silu_forward(void *out, const void *x, const void *w, const void *bias,
                                int B, int T, int ld, int off, int W, int K) {
    conv_job j = { .out = out, .x = x, .w = w, .bias = bias, .B = B, .T = T, .ld = ld,
                   .off = off, .W = W, .K = K };
    sj_parallel_for((int64_t)B * T, 16, conv_fwd_rows, &j);
}

/* One task = a range of channels over every row: dx, dw and dbias of those
 * channels are its own, summed in row order (the same bits on any threads). */
static void conv_bwd_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const conv_job *j = ctx;
    const int K = j->K;
    for (int64_t c = c0; c < c1; c++) {
        float *dw = j->dw + c * K, db = 0.f;
        if (!j->dw_accum) { memset(dw, 0, sizeof(float) * K); j->db[c] = 0.f; }
        for (int b = 0; b < j->B; b++) {
            const int64_t row0 = (int64_t)b * j->T;
            for (int t = 0; t < j->T; t++) {
                const float g = j->dout[(row0 + t) * j->W + c] * dsilu(conv_at(j, row0, t, (int)c));
                db += g;
                for (int i = 0; i < K; i++) {
                    const int u = t - K + 1 + i;
                    if (u < 0) continue;
                    const int64_t at = (row0 + u) * j->ld + j->off + c;
                    dw[i] += g * j->x[at];
                    j->dx[at] += g * j->w[c * K + i];
                }
            }
        }
        j->db[c] += db;
    }
}

void sj_cpu_conv1d_silu_backward(void *dx, float *dw, float *dbias, const void *dout,
                                 const void *x, const void *w, const void *bias, int B, int T,
                                 int ld, int off, int W, int K, int accum, int dw_accum) {
    if (!accum) zero(dx, (int64_t)B * T, ld);
    conv_job j = { .dx = dx, .dw = dw, .db = dbias, .x = x, .w = w, .bias = bias, .dout = dout,
                   .B = B, .T = T, .ld = ld, .off = off, .W = W, .K = K, .dw_accum = dw_accum };
    sj_parallel_for(W, 8, conv_bwd_cols, &j);
}

/* ---- dt, v = x dt, a = dt A ---------------------------------------------- */

typedef struct {
    float *v, *a, *dx, *ddt, *dp; const float *x, *dt_raw, *p, *dv, *da;
    int N, H, P, ldx, ld, off, dw_accum;
} prep_job;

static void prep_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const prep_job *j = ctx;
    const int H = j->H, P = j->P;
    for (int64_t r = r0; r < r1; r++)
        for (int h = 0; h < H; h++) {
            const float dt = softplus(j->dt_raw[r * j->ld + j->off + h] + j->p[h]);
            j->a[r * H + h] = -dt * expf(j->p[H + h]);
            const float *x = j->x + r * j->ldx + (int64_t)h * P;
            float *v = j->v + r * H * P + (int64_t)h * P;
            for (int e = 0; e < P; e++) v[e] = x[e] * dt;
        }
}

void sj_cpu_ssd_prep_forward(void *v, void *a, const void *x, const void *dt_raw, const void *p,
                             int N, int H, int P, int ldx, int ld, int off) {
    prep_job j = { .v = v, .a = a, .x = x, .dt_raw = dt_raw, .p = p, .N = N, .H = H, .P = P,
                   .ldx = ldx, .ld = ld, .off = off };
    sj_parallel_for(N, 16, prep_fwd_rows, &j);
}

/* One task = one head over every row: its columns and parameters are its own. */
static void prep_bwd_heads(void *ctx, int64_t h0, int64_t h1, int tid) {
    (void)tid;
    const prep_job *j = ctx;
    const int H = j->H, P = j->P;
    for (int64_t h = h0; h < h1; h++) {
        const float A = -expf(j->p[H + h]);
        float dbias = 0.f, dalog = 0.f;
        for (int64_t r = 0; r < j->N; r++) {
            const float raw = j->dt_raw[r * j->ld + j->off + h] + j->p[h], dt = softplus(raw);
            const float *x = j->x + r * j->ldx + h * P, *dv = j->dv + r * H * P + h * P;
            const float da = j->da[r * H + h];
            float *dx = j->dx + r * j->ldx + h * P, ddt = da * A;
            for (int e = 0; e < P; e++) { ddt += dv[e] * x[e]; dx[e] += dv[e] * dt; }
            const float draw = ddt * sigmoid(raw);
            j->ddt[r * j->ld + j->off + h] += draw;
            dbias += draw;
            dalog += da * dt * A;
        }
        j->dp[h] = (j->dw_accum ? j->dp[h] : 0.f) + dbias;
        j->dp[H + h] = (j->dw_accum ? j->dp[H + h] : 0.f) + dalog;
    }
}

void sj_cpu_ssd_prep_backward(void *dx, void *ddt_raw, float *dp, const void *dv, const void *da,
                              const void *x, const void *dt_raw, const void *p, int N, int H,
                              int P, int ldx, int ld, int off, int accum_x, int accum_dt,
                              int dw_accum) {
    if (!accum_x) zero(dx, N, ldx);
    if (!accum_dt) zero(ddt_raw, N, ld);
    prep_job j = { .dx = dx, .ddt = ddt_raw, .dp = dp, .dv = dv, .da = da, .x = x,
                   .dt_raw = dt_raw, .p = p, .N = N, .H = H, .P = P, .ldx = ldx, .ld = ld,
                   .off = off, .dw_accum = dw_accum };
    sj_parallel_for(H, 1, prep_bwd_heads, &j);
}

/* ---- y + D x ---------------------------------------------------------------- */

typedef struct {
    float *out, *dy, *dx, *dD; const float *y, *x, *D, *dout;
    int N, H, P, ldx, accum_y, dw_accum;
} skip_job;

static void skip_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const skip_job *j = ctx;
    const int HP = j->H * j->P;
    for (int64_t r = r0; r < r1; r++)
        for (int c = 0; c < HP; c++)
            j->out[r * HP + c] = j->y[r * HP + c] + j->D[c / j->P] * j->x[r * j->ldx + c];
}

void sj_cpu_ssd_skip_forward(void *out, const void *y, const void *x, const void *D, int N,
                             int H, int P, int ldx) {
    skip_job j = { .out = out, .y = y, .x = x, .D = D, .N = N, .H = H, .P = P, .ldx = ldx };
    sj_parallel_for(N, 16, skip_fwd_rows, &j);
}

static void skip_bwd_heads(void *ctx, int64_t h0, int64_t h1, int tid) {
    (void)tid;
    const skip_job *j = ctx;
    const int HP = j->H * j->P, P = j->P;
    for (int64_t h = h0; h < h1; h++) {
        float dD = 0.f;
        for (int64_t r = 0; r < j->N; r++)
            for (int e = 0; e < P; e++) {
                const int64_t c = h * P + e;
                const float g = j->dout[r * HP + c];
                if (j->dy != j->dout) j->dy[r * HP + c] = (j->accum_y ? j->dy[r * HP + c] : 0.f) + g;
                j->dx[r * j->ldx + c] += j->D[h] * g;
                dD += g * j->x[r * j->ldx + c];
            }
        j->dD[h] = (j->dw_accum ? j->dD[h] : 0.f) + dD;
    }
}

// dy may be dout (accum_y 0): then it is left as it is
void sj_cpu_ssd_skip_backward(void *dy, void *dx, float *dD, const void *dout, const void *x,
                              const void *D, int N, int H, int P, int ldx, int accum_y,
                              int accum_x, int dw_accum) {
    if (!accum_x) zero(dx, N, ldx);
    skip_job j = { .dy = dy, .dx = dx, .dD = dD, .x = x, .D = D, .dout = dout, .N = N, .H = H,
                   .P = P, .ldx = ldx, .accum_y = accum_y, .dw_accum = dw_accum };
    sj_parallel_for(H, 1, skip_bwd_heads, &j);
}

/* ---- gated RMSNorm ---------------------------------------------------------- */

typedef struct {
    float *out, *rstd, *dy, *dz, *dw; const float *y, *z, *w, *dout, *rs;
    int N, Din, G, ld, off, accum_y, accum_z, dw_accum; float eps;
} gnorm_job;

static void gnorm_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const gnorm_job *j = ctx;
    const int gs = j->Din / j->G;
    for (int64_t r = r0; r < r1; r++)
        for (int g = 0; g < j->G; g++) {
            const float *y = j->y + r * j->Din + g * gs, *z = j->z + r * j->ld + j->off + g * gs;
            float *o = j->out + r * j->Din + g * gs, ss = 0.f;
            for (int c = 0; c < gs; c++) { o[c] = y[c] * silu(z[c]); ss += o[c] * o[c]; }
            const float rs = 1.0f / sqrtf(ss / gs + j->eps);
            j->rstd[r * j->G + g] = rs;
            for (int c = 0; c < gs; c++) o[c] *= rs * j->w[g * gs + c];
        }
}

void sj_cpu_gated_rmsnorm_forward(void *out, float *rstd, const void *y, const void *z,
                                  const void *w, int N, int Din, int G, int ld, int off, float eps) {
    gnorm_job j = { .out = out, .rstd = rstd, .y = y, .z = z, .w = w, .N = N, .Din = Din, .G = G,
                    .ld = ld, .off = off, .eps = eps };
    sj_parallel_for(N, 16, gnorm_fwd_rows, &j);
}

static void gnorm_bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const gnorm_job *j = ctx;
    const int gs = j->Din / j->G;
    for (int64_t r = r0; r < r1; r++) {
        if (!j->accum_z) memset(j->dz + r * j->ld, 0, sizeof(float) * j->ld);
        for (int g = 0; g < j->G; g++) {
            const int64_t at = r * j->Din + g * gs, zat = r * j->ld + j->off + g * gs;
            const float *y = j->y + at, *z = j->z + zat, *go = j->dout + at, *w = j->w + g * gs;
            const float rs = j->rs[r * j->G + g];
            float d = 0.f;
            for (int c = 0; c < gs; c++) d += go[c] * w[c] * y[c] * silu(z[c]);
            const float k = d * rs * rs * rs / gs;
            for (int c = 0; c < gs; c++) {
                const float u = y[c] * silu(z[c]), du = go[c] * w[c] * rs - k * u;
                const float gy = du * silu(z[c]);
                j->dy[at + c] = (j->accum_y ? j->dy[at + c] : 0.f) + gy;
                j->dz[zat + c] += du * y[c] * dsilu(z[c]);
            }
        }
    }
}

static void gnorm_bwd_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const gnorm_job *j = ctx;
    const int gs = j->Din / j->G;
    if (!j->dw_accum) for (int64_t c = c0; c < c1; c++) j->dw[c] = 0.0f;
    for (int64_t r = 0; r < j->N; r++)
        for (int64_t c = c0; c < c1; c++) {
            const float z = j->z[r * j->ld + j->off + c];
            j->dw[c] += j->dout[r * j->Din + c] * j->y[r * j->Din + c] * silu(z) *
                        j->rs[r * j->G + c / gs];
        }
}

void sj_cpu_gated_rmsnorm_backward(void *dy, void *dz, float *dw, const void *dout, const void *y,
                                   const void *z, const void *w, const float *rstd, int N, int Din,
                                   int G, int ld, int off, int accum_y, int accum_z, int dw_accum) {
    gnorm_job j = { .dy = dy, .dz = dz, .dw = dw, .dout = dout, .y = y, .z = z, .w = w, .rs = rstd,
                    .N = N, .Din = Din, .G = G, .ld = ld, .off = off, .accum_y = accum_y,
                    .accum_z = accum_z, .dw_accum = dw_accum };
    sj_parallel_for(N, 16, gnorm_bwd_rows, &j);
    sj_parallel_for(Din, 16, gnorm_bwd_cols, &j);
}

/* ---- linear attention: feature maps, gate, normalisation -------------------- */

/* elu + 1 (> 0: a kernel feature map for which q . k > 0) and its derivative */
static inline float elu1(float x) { return x > 0.f ? x + 1.0f : expf(x); }
static inline float delu1(float x) { return x > 0.f ? 1.0f : expf(x); }

typedef struct {
    float *u, *a, *dp; const float *p, *du, *da;
    int N, H, hd, feature, normalize, gated, accum;
} lin_job;

static void lin_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const lin_job *j = ctx;
    const int Hd = j->H * j->hd, dv = j->hd + j->normalize, ld = 3 * Hd + (j->gated ? j->H : 0);
    const int ldu = 2 * Hd + j->H * dv;
    for (int64_t r = r0; r < r1; r++) {
        const float *p = j->p + r * ld;
        float *u = j->u + r * ldu;
        for (int c = 0; c < 2 * Hd; c++) u[c] = j->feature == SJ_LINEAR_ELU1 ? elu1(p[c]) : p[c];
        for (int h = 0; h < j->H; h++) {
            memcpy(u + 2 * Hd + h * dv, p + 2 * Hd + h * j->hd, sizeof(float) * j->hd);
            if (j->normalize) u[2 * Hd + h * dv + j->hd] = 1.0f;
            if (j->gated) j->a[r * j->H + h] = -softplus(-p[3 * Hd + h]);   /* log sigmoid */
        }
    }
}

// p: (N, 3 H hd [+ H]) = [q | k | v | g] -> u: (N, 2 H hd + H (hd [+ 1])), a: (N, H) or NULL
void sj_cpu_linear_prep_forward(void *u, void *a, const void *p, int N, int H, int hd, int feature,
                                int normalize) {
    lin_job j = { .u = u, .a = a, .p = p, .N = N, .H = H, .hd = hd, .feature = feature,
                  .normalize = normalize, .gated = a != NULL };
    sj_parallel_for(N, 16, lin_fwd_rows, &j);
}

static void lin_bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const lin_job *j = ctx;
    const int Hd = j->H * j->hd, dv = j->hd + j->normalize, ld = 3 * Hd + (j->gated ? j->H : 0);
    const int ldu = 2 * Hd + j->H * dv;
    for (int64_t r = r0; r < r1; r++) {
        const float *p = j->p + r * ld, *du = j->du + r * ldu;
        float *dp = j->dp + r * ld;
        if (!j->accum) memset(dp, 0, sizeof(float) * ld);
        for (int c = 0; c < 2 * Hd; c++) dp[c] += j->feature == SJ_LINEAR_ELU1 ? du[c] * delu1(p[c]) : du[c];
        for (int h = 0; h < j->H; h++) {
            for (int e = 0; e < j->hd; e++) dp[2 * Hd + h * j->hd + e] += du[2 * Hd + h * dv + e];
            if (j->gated) dp[3 * Hd + h] += j->da[r * j->H + h] * sigmoid(-p[3 * Hd + h]);
        }
    }
}

// dp: (N, 3 H hd [+ H]) (+)=
void sj_cpu_linear_prep_backward(void *dp, const void *du, const void *da, const void *p, int N,
                                 int H, int hd, int feature, int normalize, int accum) {
    lin_job j = { .dp = dp, .du = du, .da = da, .p = p, .N = N, .H = H, .hd = hd,
                  .feature = feature, .normalize = normalize, .gated = da != NULL, .accum = accum };
    sj_parallel_for(N, 16, lin_bwd_rows, &j);
}

typedef struct { float *out, *dy; const float *y, *dout; int N, H, hd, accum; float eps; } lnorm_job;

static void lnorm_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const lnorm_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        for (int h = 0; h < j->H; h++) {
            const float *y = j->y + (r * j->H + h) * (j->hd + 1);
            float *o = j->out + (r * j->H + h) * j->hd;
            const float inv = 1.0f / (y[j->hd] + j->eps);
            for (int e = 0; e < j->hd; e++) o[e] = y[e] * inv;
        }
}

// y: (N, H, hd + 1), the last of each head the denominator -> out: (N, H hd)
void sj_cpu_linear_norm_forward(void *out, const void *y, int N, int H, int hd, float eps) {
    lnorm_job j = { .out = out, .y = y, .N = N, .H = H, .hd = hd, .eps = eps };
    sj_parallel_for(N, 16, lnorm_fwd_rows, &j);
}

static void lnorm_bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const lnorm_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        for (int h = 0; h < j->H; h++) {
            const float *y = j->y + (r * j->H + h) * (j->hd + 1), *g = j->dout + (r * j->H + h) * j->hd;
            float *dy = j->dy + (r * j->H + h) * (j->hd + 1);
            const float inv = 1.0f / (y[j->hd] + j->eps);
            float s = 0.f;
            for (int e = 0; e < j->hd; e++) {
                dy[e] = (j->accum ? dy[e] : 0.f) + g[e] * inv;
                s += g[e] * y[e];
            }
            dy[j->hd] = (j->accum ? dy[j->hd] : 0.f) - s * inv * inv;
        }
}

// dy: (N, H, hd + 1) (+)=
void sj_cpu_linear_norm_backward(void *dy, const void *dout, const void *y, int N, int H, int hd,
                                 float eps, int accum) {
    lnorm_job j = { .dy = dy, .y = y, .dout = dout, .N = N, .H = H, .hd = hd, .accum = accum,
                    .eps = eps };
    sj_parallel_for(N, 16, lnorm_bwd_rows, &j);
}
