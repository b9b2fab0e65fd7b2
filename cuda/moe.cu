/* moe.cu — mixture-of-experts kernels (backend.h): the router, the dropless
 * permutation of token rows by expert and its inverse, and the grouped GEMM
 * over the experts' row groups; the same arithmetic as csrc/cpu/moe.c, f32
 * in registers, deterministic (no float atomics: every sum in a fixed order).
 *
 * The simple correct version, kept as the reference a fast one will be
 * tested against: the route's bookkeeping runs in one block, the grouped
 * GEMM is a 32x32 shared-memory tile per (expert, row tile, column tile).
 * Bound: neither tuned (a tensor-core grouped GEMM is the next step). */
#include "common.cuh"
#include "kernels.h"

/* The record's views (sj_moe_record_at), on the device. */
struct moe_rec {
    float *scores;
    int32_t *expert, *offsets, *slot, *row;
};
static __host__ __device__ moe_rec rec_at(const float *base, int64_t N, int64_t E, int64_t k) {
    float *f = (float *)base;
    int32_t *i = (int32_t *)(f + N * E);
    return moe_rec{ f, i, i + N * k, i + N * k + E + 1, i + 2 * N * k + E + 1 };
}

/* ---- route ---------------------------------------------------------------- */

/* One thread per token: scores, the top k (ties: the lower expert), the
 * weights; each token's sum of scores and logsumexp go to the (not yet
 * written) row and slot arrays for the statistics kernel. */
template <class T>
static __global__ void route_k(T *weights, float *record, const T *logits, const T *bias, int N,
                               int E, int k, int sigmoid, int normalise) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    moe_rec rc = rec_at(record, N, E, k);
    const T *l = logits + (int64_t)t * E;
    float *s = rc.scores + (int64_t)t * E;
    float mx = tof(l[0]), sum = 0.0f, tot = 0.0f;
    for (int e = 1; e < E; e++) mx = fmaxf(mx, tof(l[e]));
    for (int e = 0; e < E; e++) sum += expf(tof(l[e]) - mx);
    for (int e = 0; e < E; e++) {
        const float x = tof(l[e]);
        s[e] = sigmoid ? 1.0f / (1.0f + expf(-x)) : expf(x - mx) / sum;
        tot += s[e];
    }
    int32_t *ex = rc.expert + (int64_t)t * k;
    T *w = weights + (int64_t)t * k;
    float picked = 0.0f;
    for (int c = 0; c < k; c++) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int p = 0; p < c; p++) taken |= ex[p] == e;
            if (taken) continue;
            const float v = s[e] + (bias ? tof(bias[e]) : 0.0f);
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        ex[c] = best;
        picked += s[best];
    }
    for (int c = 0; c < k; c++) w[c] = fromf<T>(s[ex[c]] / (normalise ? picked : 1.0f));
    reinterpret_cast<float *>(rc.row)[t] = sigmoid ? tot : 1.0f;   /* q = s / tot */
    reinterpret_cast<float *>(rc.slot)[t] = mx + logf(sum);        /* logsumexp */
}

/* One block: per expert its count (the load) and sum_t q_te, the offsets,
 * the aux loss; z over the tokens in a fixed tree. */
static __global__ void route_stats_k(float *record, float *stats, int N, int E, int k) {
    extern __shared__ double part[];   /* (blockDim) */
    moe_rec rc = rec_at(record, N, E, k);
    const float *tot = reinterpret_cast<const float *>(rc.row);
    const float *lse = reinterpret_cast<const float *>(rc.slot);
    const int64_t R = (int64_t)N * k;
    double aux = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t count = 0;
        for (int64_t i = 0; i < R; i++) count += rc.expert[i] == e;
        double colsum = 0.0;
        for (int t = 0; t < N; t++) colsum += (double)rc.scores[(int64_t)t * E + e] / tot[t];
        stats[2 + e] = (float)count;
        rc.offsets[e + 1] = count;
        aux += (double)count * colsum;
    }
    double z = 0.0;
    for (int t = threadIdx.x; t < N; t += blockDim.x) z += (double)lse[t] * lse[t];
    for (int pass = 0; pass < 2; pass++) {   /* aux, then z: a fixed-order tree */
        part[threadIdx.x] = pass ? z : aux;
        __syncthreads();
        for (int h = blockDim.x / 2; h > 0; h /= 2) {
            if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            if (pass) stats[1] = (float)(part[0] / N);
            else stats[0] = (float)(part[0] * E / ((double)N * N));
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        rc.offsets[0] = 0;
        for (int e = 0; e < E; e++) rc.offsets[e + 1] += rc.offsets[e];
    }
}

/* One thread per expert: its choices in slot order (a stable counting sort). */
static __global__ void route_sort_k(float *record, int N, int E, int k) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    moe_rec rc = rec_at(record, N, E, k);
    int32_t at = rc.offsets[e];
    for (int64_t i = 0; i < (int64_t)N * k; i++)
        if (rc.expert[i] == e) rc.slot[at++] = (int32_t)i;
}

static __global__ void route_inverse_k(float *record, int N, int E, int k) {
    moe_rec rc = rec_at(record, N, E, k);
    for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < (int64_t)N * k;
         r += (int64_t)gridDim.x * blockDim.x)
        rc.row[rc.slot[r]] = (int32_t)r;
}

/* One thread per token: d(logits) of sum w dweights + aux_coef aux + z_coef z. */
template <class T>
static __global__ void route_back_k(T *dlogits, const T *dweights, const T *logits,
                                    const T *weights, const float *record, const float *stats,
                                    int N, int E, int k, int sigmoid, int normalise, float aux_c,
                                    float z_c, int accum) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    moe_rec rc = rec_at(record, N, E, k);
    const float *s = rc.scores + (int64_t)t * E;
    const T *l = logits + (int64_t)t * E, *g = dweights + (int64_t)t * k, *w = weights + (int64_t)t * k;
    const int32_t *ex = rc.expert + (int64_t)t * k;
    /* ds_e, the gradient of the scores, is recomputed per expert: no per-thread array */
    float S = 0.0f, dot = 0.0f, tot = 0.0f, qdq = 0.0f, sdot = 0.0f, mx = tof(l[0]), sum = 0.0f;
    for (int c = 0; c < k; c++) { S += s[ex[c]]; dot += tof(g[c]) * tof(w[c]); }
    for (int e = 0; e < E; e++) tot += s[e];
    if (sigmoid)
        for (int e = 0; e < E; e++) qdq += s[e] / tot * aux_c * stats[2 + e];
    for (int e = 1; e < E; e++) mx = fmaxf(mx, tof(l[e]));
    for (int e = 0; e < E; e++) sum += expf(tof(l[e]) - mx);
    const float lse = mx + logf(sum);
    auto ds = [&](int e) {
        float d = 0.0f;
        for (int c = 0; c < k; c++)
            if (ex[c] == e) d += normalise ? (tof(g[c]) - dot) / S : tof(g[c]);
        if (aux_c != 0.0f) d += sigmoid ? (aux_c * stats[2 + e] - qdq) / tot : aux_c * stats[2 + e];
        return d;
    };
    if (!sigmoid)
        for (int e = 0; e < E; e++) sdot += s[e] * ds(e);
    for (int e = 0; e < E; e++) {
        float v = sigmoid ? ds(e) * s[e] * (1.0f - s[e]) : s[e] * (ds(e) - sdot);
        if (z_c != 0.0f) v += z_c * lse * expf(tof(l[e]) - lse);
        put(dlogits + (int64_t)t * E + e, v, accum);
    }
}

/* The balancing bias moves by rate * sign(mean load - load). */
static __global__ void bias_update_k(float *bias, const float *stats, int E, float mean, float rate) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const float load = stats[2 + e];
    bias[e] += rate * (float)((load < mean) - (load > mean));
}

/* ---- permute and un-permute -------------------------------------------------- */

// xp: (N k, C), row r = x[slot[r] / k]
template <class T>
static __global__ void permute_k(T *xp, const T *x, const float *record, int N, int E, int k, int C) {
    moe_rec rc = rec_at(record, N, E, k);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)N * k * C;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / C, c = i % C;
        xp[i] = x[(int64_t)(rc.slot[r] / k) * C + c];
    }
}

/* out (N, C) (+)= sum_j a_tj in[row[t k + j]]; a = weights, or 1 (permute's backward). */
template <class T>
static __global__ void gather_k(T *out, const T *in, const T *weights, const float *record, int N,
                                int E, int k, int C, int accum) {
    moe_rec rc = rec_at(record, N, E, k);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)N * C;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / C, c = i % C;
        float v = 0.0f;
        for (int j = 0; j < k; j++)
            v += (weights ? tof(weights[t * k + j]) : 1.0f) * tof(in[(int64_t)rc.row[t * k + j] * C + c]);
        put(out + i, v, accum);
    }
}

// dyp: (N k, C) (+)= weights[t, j] dy[t]
template <class T>
static __global__ void unpermute_dyp_k(T *dyp, const T *dy, const T *weights, const float *record,
                                       int N, int E, int k, int C, int accum) {
    moe_rec rc = rec_at(record, N, E, k);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)N * k * C;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / C, c = i % C, tj = rc.slot[r];
        put(dyp + i, tof(weights[tj]) * tof(dy[(tj / k) * C + c]), accum);
    }
}

// dweights: (N, k) (+)= dot(dy[t], yp[row[t k + j]]), one warp each
template <class T>
static __global__ void unpermute_dw_k(T *dweights, const T *dy, const T *yp, const float *record,
                                      int N, int E, int k, int C, int accum) {
    moe_rec rc = rec_at(record, N, E, k);
    const int64_t tj = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    if (tj >= (int64_t)N * k) return;
    const int lane = threadIdx.x % 32;
    const T *a = dy + (tj / k) * C, *b = yp + (int64_t)rc.row[tj] * C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) v += tof(a[c]) * tof(b[c]);
    v = warp_sum(v);
    if (lane == 0) put(dweights + tj, v, accum);
}

/* ---- grouped GEMM ----------------------------------------------------------------- */

enum { TILE = 32 };

/* Block (bx, by): column tile bx; by walks the experts' row tiles in order
 * (expert e has ceil(rows_e / TILE) of them; the grid's spare blocks exit).
 * y rows of expert e (+)= x rows op(W_e); op(W_e)[kk, n] = W_e[n, kk] when
 * transB (w: (E, n, K)), else W_e[kk, n] (w: (E, K, n)). */
template <class T>
static __global__ void grouped_matmul_k(T *y, const T *x, const T *w, const float *record, int N,
                                        int E, int k, int n, int K, int transB, int accum) {
    __shared__ float xs[TILE][TILE + 1], ws[TILE][TILE + 1];
    moe_rec rc = rec_at(record, N, E, k);
    int tile = blockIdx.y, e = 0;
    for (; e < E; e++) {
        const int tiles = (rc.offsets[e + 1] - rc.offsets[e] + TILE - 1) / TILE;
        if (tile < tiles) break;
        tile -= tiles;
    }
    if (e >= E) return;
    const int r0 = rc.offsets[e] + tile * TILE, r1 = rc.offsets[e + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, col = blockIdx.x * TILE + tx, row = r0 + ty;
    const T *We = w + (int64_t)e * n * K;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        xs[ty][tx] = row < r1 && k0 + tx < K ? tof(x[(int64_t)row * K + k0 + tx]) : 0.0f;
        const int kk = k0 + ty, nn = blockIdx.x * TILE + tx;   /* ws[kk][nn] = op(W_e)[kk, nn] */
        ws[ty][tx] = kk < K && nn < n ? tof(transB ? We[(int64_t)nn * K + kk] : We[(int64_t)kk * n + nn]) : 0.0f;
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < TILE; j++) acc += xs[ty][j] * ws[j][tx];
        __syncthreads();
    }
    if (row < r1 && col < n) put(y + (int64_t)row * n + col, acc, accum);
}

/* dW_e (n, K) f32 (+)= dy_e^T x_e: block (K tile, n tile, expert), the
 * expert's rows in order. */
template <class T>
static __global__ void grouped_wgrad_k(float *dw, const T *dy, const T *x, const float *record,
                                       int N, int E, int k, int n, int K, int accum) {
    __shared__ float ds[TILE][TILE + 1], xs[TILE][TILE + 1];
    moe_rec rc = rec_at(record, N, E, k);
    const int e = blockIdx.z, r0 = rc.offsets[e], r1 = rc.offsets[e + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int nn = blockIdx.y * TILE + ty, kk = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int b = r0; b < r1; b += TILE) {
        const int rd = b + tx, rx = b + ty;   /* ds[i][j] = dy[b + j, n tile row i]; xs[i][j] = x[b + i, k col j] */
        ds[ty][tx] = rd < r1 && blockIdx.y * TILE + ty < n ? tof(dy[(int64_t)rd * n + blockIdx.y * TILE + ty]) : 0.0f;
        xs[ty][tx] = rx < r1 && kk < K ? tof(x[(int64_t)rx * K + kk]) : 0.0f;
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < TILE; j++) acc += ds[ty][j] * xs[j][tx];
        __syncthreads();
    }
    if (nn < n && kk < K) {
        float *d = dw + (int64_t)e * n * K + (int64_t)nn * K + kk;
        *d = accum ? *d + acc : acc;
    }
}

/* ---- launchers ------------------------------------------------------------------------ */

#define SJ_CU_MOE(T, TY)                                                                      \
extern "C" void sj_cuda_moe_route_forward_##T(void *weights, float *record, const void *logits, \
                                              const void *bias, int N, int E, int k,          \
                                              const sj_moe_route *r) {                        \
    cudaStream_t s = sj_stream();                                                             \
    const int sig = r->router == SJ_MOE_SIGMOID;                                              \
    route_k<<<(N + 127) / 128, 128, 0, s>>>((TY *)weights, record, (const TY *)logits,        \
                                            (const TY *)bias, N, E, k, sig, sig || r->norm_topk); \
    route_stats_k<<<1, 512, 512 * sizeof(double), s>>>(record, r->stats, N, E, k);            \
    route_sort_k<<<(E + 127) / 128, 128, 0, s>>>(record, N, E, k);                           \
    route_inverse_k<<<sj_blocks((int64_t)N * k, 256), 256, 0, s>>>(record, N, E, k);        \
    LAUNCH_CHECK("moe_route_forward");                                                        \
}                                                                                             \
extern "C" void sj_cuda_moe_route_backward_##T(void *dlogits, float *bias_master,             \
                                               const void *dweights, const void *logits,      \
                                               const void *weights, const float *record,      \
                                               int N, int E, int k, const sj_moe_route *r,    \
                                               int accum) {                                   \
    cudaStream_t s = sj_stream();                                                             \
    const int sig = r->router == SJ_MOE_SIGMOID;                                              \
    route_back_k<<<(N + 127) / 128, 128, 0, s>>>((TY *)dlogits, (const TY *)dweights,         \
        (const TY *)logits, (const TY *)weights, record, r->stats, N, E, k, sig,              \
        sig || r->norm_topk, r->aux_coef * (float)E / ((float)N * (float)N),                  \
        2.0f * r->z_coef / (float)N, accum);                                                  \
    if (bias_master && r->bias_rate > 0.0f)                                                   \
        bias_update_k<<<(E + 127) / 128, 128, 0, s>>>(bias_master, r->stats, E,               \
                                                      (float)N * (float)k / (float)E, r->bias_rate); \
    LAUNCH_CHECK("moe_route_backward");                                                       \
}                                                                                             \
extern "C" void sj_cuda_moe_permute_forward_##T(void *xp, const void *x, const float *record,  \
                                                int N, int E, int k, int C) {                 \
    permute_k<<<sj_blocks((int64_t)N * k * C, 256), 256, 0, sj_stream()>>>(                   \
        (TY *)xp, (const TY *)x, record, N, E, k, C);                                         \
    LAUNCH_CHECK("moe_permute_forward");                                                      \
}                                                                                             \
extern "C" void sj_cuda_moe_permute_backward_##T(void *dx, const void *dxp, const float *record, \
                                                 int N, int E, int k, int C, int accum) {     \
    gather_k<<<sj_blocks((int64_t)N * C, 256), 256, 0, sj_stream()>>>(                        \
        (TY *)dx, (const TY *)dxp, (const TY *)NULL, record, N, E, k, C, accum);              \
    LAUNCH_CHECK("moe_permute_backward");                                                     \
}                                                                                             \
extern "C" void sj_cuda_moe_unpermute_forward_##T(void *y, const void *yp, const void *weights, \
                                                  const float *record, int N, int E, int k,   \
                                                  int C) {                                    \
    gather_k<<<sj_blocks((int64_t)N * C, 256), 256, 0, sj_stream()>>>(                        \
        (TY *)y, (const TY *)yp, (const TY *)weights, record, N, E, k, C, 0);                 \
    LAUNCH_CHECK("moe_unpermute_forward");                                                    \
}                                                                                             \
extern "C" void sj_cuda_moe_unpermute_backward_##T(void *dyp, void *dweights, const void *dy,  \
                                                   const void *yp, const void *weights,       \
                                                   const float *record, int N, int E, int k,  \
                                                   int C, int accum_yp, int accum_w) {        \
    cudaStream_t s = sj_stream();                                                             \
    if (dyp)                                                                                  \
        unpermute_dyp_k<<<sj_blocks((int64_t)N * k * C, 256), 256, 0, s>>>(                   \
            (TY *)dyp, (const TY *)dy, (const TY *)weights, record, N, E, k, C, accum_yp);    \
    if (dweights)                                                                             \
        unpermute_dw_k<<<(unsigned)(((int64_t)N * k + 7) / 8), 256, 0, s>>>(                  \
            (TY *)dweights, (const TY *)dy, (const TY *)yp, record, N, E, k, C, accum_w);     \
    LAUNCH_CHECK("moe_unpermute_backward");                                                   \
}                                                                                             \
extern "C" void sj_cuda_moe_matmul_##T(void *y, const void *x, const void *w, const float *record, \
                                       int N, int E, int k, int n, int K, int transB, int accum) { \
    /* sum_e ceil(rows_e / TILE) <= R / TILE + E row tiles, whatever the routing */            \
    const dim3 grid((n + TILE - 1) / TILE, (unsigned)(((int64_t)N * k + TILE - 1) / TILE + E)); \
    grouped_matmul_k<<<grid, dim3(TILE, TILE), 0, sj_stream()>>>(                             \
        (TY *)y, (const TY *)x, (const TY *)w, record, N, E, k, n, K, transB, accum);         \
    LAUNCH_CHECK("moe_matmul");                                                               \
}                                                                                             \
extern "C" void sj_cuda_moe_matmul_wgrad_##T(float *dw, const void *dy, const void *x,         \
                                             const float *record, int N, int E, int k, int n, \
                                             int K, int accum) {                              \
    const dim3 grid((K + TILE - 1) / TILE, (n + TILE - 1) / TILE, E);                         \
    grouped_wgrad_k<<<grid, dim3(TILE, TILE), 0, sj_stream()>>>(                              \
        dw, (const TY *)dy, (const TY *)x, record, N, E, k, n, K, accum);                     \
    LAUNCH_CHECK("moe_matmul_wgrad");                                                         \
}
SJ_CU_MOE(f32, float)
SJ_CU_MOE(bf16, bf16)
SJ_CU_MOE(f16, f16)
