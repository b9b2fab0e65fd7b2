/* moe.c — mixture-of-experts kernels (backend.h): the router (scores, top-k,
 * weights, aux and z losses, bias balancing), the dropless permutation of
 * token rows by expert and its inverse, and the grouped GEMM over the
 * experts' row groups. Forward and backward of each side by side. The
 * routing is deterministic: ties go to the lower expert, the permutation is
 * a stable counting sort, every sum runs in a fixed order. */
#include "cpu.h"
#include <math.h>
#include <string.h>

/* ---- route ---------------------------------------------------------------- */

typedef struct {
    float *w, *dl, *bias_master;
    const float *logits, *bias, *dw, *wts, *stats;
    sj_moe_record rec;
    int N, E, k, accum;
    const sj_moe_route *r;
} route_job;

static int normalises(const sj_moe_route *r) { return r->router == SJ_MOE_SIGMOID || r->norm_topk; }

static void route_rows(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const route_job *j = ctx;
    const int E = j->E, k = j->k;
    for (int64_t t = t0; t < t1; t++) {
        const float *l = j->logits + t * E;
        float *s = j->rec.scores + t * E;
        if (j->r->router == SJ_MOE_SIGMOID) {
            for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-l[e]));
        } else {
            float mx = l[0], sum = 0.0f;
            for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            for (int e = 0; e < E; e++) sum += s[e] = expf(l[e] - mx);
            for (int e = 0; e < E; e++) s[e] /= sum;
        }
        int32_t *ex = j->rec.expert + t * k;
        float *w = j->w + t * k, total = 0.0f;
        for (int c = 0; c < k; c++) {   /* the best not yet chosen; ties: the lower expert */
            int best = -1;
            float bv = 0.0f;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int p = 0; p < c; p++) taken |= ex[p] == e;
                if (taken) continue;
                const float v = s[e] + (j->bias ? j->bias[e] : 0.0f);
                if (best < 0 || v > bv) { best = e; bv = v; }
            }
            ex[c] = best;
            total += w[c] = s[best];
        }
        if (normalises(j->r))
            for (int c = 0; c < k; c++) w[c] /= total;
    }
}

// weights: (N, k); record: sj_moe_record; logits: (N, E); bias: (E) or NULL
void sj_cpu_moe_route_forward(void *weights, float *record, const void *logits, const void *bias,
                              int N, int E, int k, const sj_moe_route *route) {
    route_job j = { .w = weights, .logits = logits, .bias = bias,
                    .rec = sj_moe_record_at(record, N, E, k), .N = N, .E = E, .k = k, .r = route };
    sj_parallel_for(N, 16, route_rows, &j);
    /* The permutation: a stable counting sort of the choices by expert. */
    const sj_moe_record *rc = &j.rec;
    const int64_t R = (int64_t)N * k;
    float *st = route->stats;
    memset(rc->offsets, 0, sizeof(int32_t) * ((size_t)E + 1));
    for (int64_t i = 0; i < R; i++) rc->offsets[rc->expert[i] + 1]++;
    for (int e = 0; e < E; e++) {
        st[2 + e] = (float)rc->offsets[e + 1];
        rc->offsets[e + 1] += rc->offsets[e];
    }
    int32_t fill[E];   /* each expert's next free row */
    for (int e = 0; e < E; e++) fill[e] = rc->offsets[e];
    for (int64_t i = 0; i < R; i++) rc->slot[fill[rc->expert[i]]++] = (int32_t)i;
    for (int64_t r = 0; r < R; r++) rc->row[rc->slot[r]] = (int32_t)r;
    /* aux = E / N^2 sum_e count_e sum_t q_te; z = mean_t lse_t^2 (in double, in order) */
    double colsum[E], aux = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) colsum[e] = 0.0;
    for (int64_t t = 0; t < N; t++) {
        const float *s = rc->scores + t * E, *lt = (const float *)logits + t * E;
        double tot = route->router == SJ_MOE_SIGMOID ? 0.0 : 1.0, sum = 0.0;
        if (route->router == SJ_MOE_SIGMOID)
            for (int e = 0; e < E; e++) tot += s[e];
        for (int e = 0; e < E; e++) colsum[e] += s[e] / tot;
        float mx = lt[0];
        for (int e = 1; e < E; e++) mx = lt[e] > mx ? lt[e] : mx;
        for (int e = 0; e < E; e++) sum += exp((double)lt[e] - mx);
        const double lse = mx + log(sum);
        z += lse * lse;
    }
    for (int e = 0; e < E; e++) aux += (double)st[2 + e] * colsum[e];
    st[0] = (float)(aux * E / ((double)N * N));
    st[1] = (float)(z / N);
}

static void route_back_rows(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const route_job *j = ctx;
    const int E = j->E, k = j->k, sig = j->r->router == SJ_MOE_SIGMOID;
    const float aux_c = j->r->aux_coef * (float)E / ((float)j->N * (float)j->N);
    const float z_c = 2.0f * j->r->z_coef / (float)j->N;
    float ds[E];
    for (int64_t t = t0; t < t1; t++) {
        const float *s = j->rec.scores + t * E, *l = j->logits + t * E;
        const float *g = j->dw + t * k, *w = j->wts + t * k;
        const int32_t *ex = j->rec.expert + t * k;
        for (int e = 0; e < E; e++) ds[e] = 0.0f;
        if (normalises(j->r)) {   /* w_c = s_c / S: ds_c = (g_c - sum g w) / S */
            float S = 0.0f, dot = 0.0f;
            for (int c = 0; c < k; c++) { S += s[ex[c]]; dot += g[c] * w[c]; }
            for (int c = 0; c < k; c++) ds[ex[c]] += (g[c] - dot) / S;
        } else {
            for (int c = 0; c < k; c++) ds[ex[c]] += g[c];
        }
        if (aux_c != 0.0f) {
            if (sig) {   /* q = s / sum s */
                float S = 0.0f, qdq = 0.0f;
                for (int e = 0; e < E; e++) S += s[e];
                for (int e = 0; e < E; e++) qdq += s[e] / S * aux_c * j->stats[2 + e];
                for (int e = 0; e < E; e++) ds[e] += (aux_c * j->stats[2 + e] - qdq) / S;
            } else {
                for (int e = 0; e < E; e++) ds[e] += aux_c * j->stats[2 + e];
            }
        }
        float *dl = j->dl + t * E, sdot = 0.0f;
        if (!sig)
            for (int e = 0; e < E; e++) sdot += s[e] * ds[e];
        float mx = l[0], sum = 0.0f, lse = 0.0f;
        if (z_c != 0.0f) {
            for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            for (int e = 0; e < E; e++) sum += expf(l[e] - mx);
            lse = mx + logf(sum);
        }
        for (int e = 0; e < E; e++) {
            float v = sig ? ds[e] * s[e] * (1.0f - s[e]) : s[e] * (ds[e] - sdot);
            if (z_c != 0.0f) v += z_c * lse * expf(l[e] - lse);
            dl[e] = j->accum ? dl[e] + v : v;
        }
    }
}

// dlogits: (N, E); bias_master: (E) f32 or NULL; dweights, weights: (N, k)
void sj_cpu_moe_route_backward(void *dlogits, float *bias_master, const void *dweights,
                               const void *logits, const void *weights, const float *record,
                               int N, int E, int k, const sj_moe_route *route, int accum) {
    route_job j = { .dl = dlogits, .logits = logits, .dw = dweights, .wts = weights,
                    .stats = route->stats, .rec = sj_moe_record_at(record, N, E, k),
                    .N = N, .E = E, .k = k, .accum = accum, .r = route };
    sj_parallel_for(N, 16, route_back_rows, &j);
    if (!bias_master || route->bias_rate <= 0.0f) return;
    const float mean = (float)N * (float)k / (float)E;
    for (int e = 0; e < E; e++) {
        const float load = route->stats[2 + e];
        bias_master[e] += route->bias_rate * (float)((load < mean) - (load > mean));
    }
}

/* ---- permute and un-permute ------------------------------------------------ */

typedef struct {
    float *out, *dw;
    const float *in, *w, *dy, *yp;
    sj_moe_record rec;
    int k, C, accum, accum_w;
} perm_job;

static void permute_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const perm_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        memcpy(j->out + r * j->C, j->in + (int64_t)(j->rec.slot[r] / j->k) * j->C, sizeof(float) * j->C);
}

// xp: (N k, C); x: (N, C)
void sj_cpu_moe_permute_forward(void *xp, const void *x, const float *record, int N, int E, int k,
                                int C) {
    perm_job j = { .out = xp, .in = x, .rec = sj_moe_record_at(record, N, E, k), .k = k, .C = C };
    sj_parallel_for((int64_t)N * k, 16, permute_rows, &j);
}

static void gather_tokens(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const perm_job *j = ctx;
    const int C = j->C;
    for (int64_t t = t0; t < t1; t++) {
        float *o = j->out + t * C;
        for (int c = 0; c < j->k; c++) {
            const float *src = j->in + (int64_t)j->rec.row[t * j->k + c] * C;
            const float a = j->w ? j->w[t * j->k + c] : 1.0f;
            if (c == 0 && !j->accum) for (int i = 0; i < C; i++) o[i] = a * src[i];
            else for (int i = 0; i < C; i++) o[i] += a * src[i];
        }
    }
}

// dx: (N, C) (+)=; dxp: (N k, C)
void sj_cpu_moe_permute_backward(void *dx, const void *dxp, const float *record, int N, int E,
                                 int k, int C, int accum) {
    perm_job j = { .out = dx, .in = dxp, .rec = sj_moe_record_at(record, N, E, k), .k = k, .C = C,
                   .accum = accum };
    sj_parallel_for(N, 8, gather_tokens, &j);
}

// y: (N, C); yp: (N k, C); weights: (N, k)
void sj_cpu_moe_unpermute_forward(void *y, const void *yp, const void *weights,
                                  const float *record, int N, int E, int k, int C) {
    perm_job j = { .out = y, .in = yp, .w = weights, .rec = sj_moe_record_at(record, N, E, k),
                   .k = k, .C = C };
    sj_parallel_for(N, 8, gather_tokens, &j);
}

static void unpermute_back_rows(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const perm_job *j = ctx;
    const int C = j->C;
    for (int64_t t = t0; t < t1; t++) {
        const float *dy = j->dy + t * C;
        for (int c = 0; c < j->k; c++) {
            const int64_t r = j->rec.row[t * j->k + c];
            const float a = j->w[t * j->k + c], *yp = j->yp + r * C;
            float *dyp = j->out + r * C, dot = 0.0f;
            for (int i = 0; i < C; i++) {
                dot += dy[i] * yp[i];
                dyp[i] = j->accum ? dyp[i] + a * dy[i] : a * dy[i];
            }
            float *dw = j->dw + t * j->k + c;
            *dw = j->accum_w ? *dw + dot : dot;
        }
    }
}

// dyp: (N k, C); dweights: (N, k); dy: (N, C)
void sj_cpu_moe_unpermute_backward(void *dyp, void *dweights, const void *dy, const void *yp,
                                   const void *weights, const float *record, int N, int E, int k,
                                   int C, int accum_yp, int accum_w) {
    perm_job j = { .out = dyp, .dw = dweights, .dy = dy, .yp = yp, .w = weights,
                   .rec = sj_moe_record_at(record, N, E, k), .k = k, .C = C, .accum = accum_yp,
                   .accum_w = accum_w };
    sj_parallel_for(N, 8, unpermute_back_rows, &j);
}

/* ---- grouped GEMM ------------------------------------------------------------ */

/* One GEMM per expert with rows, each on the whole thread pool. */
// y: (N k, n) (+)= x: (N k, K) op(W_e); w: (E, n, K) transB, else (E, K, n)
void sj_cpu_moe_matmul(void *y, const void *x, const void *w, const float *record, int N, int E,
                       int k, int n, int K, int transB, int accum) {
    const int32_t *off = sj_moe_record_at(record, N, E, k).offsets;
    for (int e = 0; e < E; e++) {
        const int rows = off[e + 1] - off[e];
        if (!rows) continue;
        sj_cpu_gemm((float *)y + (int64_t)off[e] * n, n, (const float *)x + (int64_t)off[e] * K, K, 0,
                    (const float *)w + (int64_t)e * n * K, transB ? K : n, transB, rows, n, K, accum);
    }
}

// dw: (E, n, K) f32 (+)= dy_e^T x_e; dy: (N k, n); x: (N k, K)
void sj_cpu_moe_matmul_wgrad(float *dw, const void *dy, const void *x, const float *record, int N,
                             int E, int k, int n, int K, int accum) {
    const int32_t *off = sj_moe_record_at(record, N, E, k).offsets;
    for (int e = 0; e < E; e++) {
        const int rows = off[e + 1] - off[e];
        float *d = dw + (int64_t)e * n * K;
        if (!rows) {
            if (!accum) memset(d, 0, sizeof(float) * (size_t)n * K);
            continue;
        }
        sj_cpu_gemm(d, K, (const float *)dy + (int64_t)off[e] * n, n, 1,
                    (const float *)x + (int64_t)off[e] * K, K, 0, n, K, rows, accum);
    }
}
