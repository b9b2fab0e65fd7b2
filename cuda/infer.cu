/* infer.cu — the inference engine on a CUDA GPU: weights resident on the
 * device (bf16 or f32), a KV cache allocated once, prefill as a batched
 * forward (cuBLASLt GEMMs + small kernels here), decode steps from
 * decode.cu, run eagerly or replayed from CUDA graphs captured once per
 * step count. The token and its position reach the device through a pinned
 * host buffer copied by the graph itself, so one graph serves every
 * position. Every CUDA failure becomes an sj_status naming the call; device
 * allocations that fail raise MemoryError naming the bytes. The handle
 * (csrc/infer/handle.c) checks tokens and positions and passes the position
 * to every call; this engine must never be reached without it. */
#include "decode.cuh"
#include "sj_cuinfer.h"
#include <stdlib.h>
#include <string.h>

using namespace dec;

enum { CHUNK = 128, SMALL = 16 };   /* prefill rows per pass: padded to 16 or 128 (few GEMM plans) */

struct sj_cuinfer {
    sj_config c;
    int is_bf, es, hd, kvd, max_ctx;
    const sj_backend *be;
    void *ctx;
    void *wmem, *smem;
    int64_t wbytes, sbytes;
    params p;                     /* the decode step's view of everything */
    layer_info *lay;              /* (L) host copy: each layer's options and cache */
    /* prefill scratch, CHUNK rows each */
    float *px, *pqkv, *pq, *pgu, *plog, *ppart, *pv0;
    void *pxn, *patt, *ph;
    void *stage_k, *stage_v;      /* a window's keys in position order: ring - 1 + CHUNK rows */
    int *ptok;
    int *h_io;                    /* pinned: [0] token, [1] position, [2 ..) greedy tokens out */
    int grid, coop, graphs, persistent;
    void *graph1, *graphn;        /* one step; graphn_n chained greedy steps */
    int graphn_n;
};

/* ---- prefill kernels (rows t < n are tokens; rows n .. npad are padding, kept finite) ---- */

/* x = scale * embedding rows, or (add) x += that (embed skip). */
template <class T>
__global__ void embed_k(float *x, const T *emb, const int *tok, int n, int C, float scale, int add) {
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float e = t < n ? scale * tof(emb[(int64_t)tok[t] * C + i]) : 0.f;
        x[(int64_t)t * C + i] = add ? x[(int64_t)t * C + i] + e : e;
    }
}

/* out (T) = RMSNorm(x) * w, one block per row (as csrc/infer: x * rs * w). */
template <class T>
__global__ void norm_k(T *out, const float *x, const float *w, int C, float eps) {
    const float *xr = x + (int64_t)blockIdx.x * C;
    float ss = 0.f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) ss += xr[i] * xr[i];
    const float rs = 1.0f / sqrtf(block_reduce<false>(ss) / (float)C + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        out[(int64_t)blockIdx.x * C + i] = fromf<T>(xr[i] * rs * w[i]);
}

/* qkv (n, (H + 2KV) pair hd) f32, per attention head g (q heads, k, v; a
 * warp per (token, g)): its pair projection heads averaged; q and k:
 * RMSNorm over the head (qk_norm; gain: q_norm, then k_norm) and RoPE at
 * position pos0 + t; v: kept in v0 (n, KV hd) at layer 0, mixed with it
 * after (mix: value mix, 0: none). q to q (n, H hd) f32, k and v to rows
 * row0 + t of kc, vc (the layer's cache, or a window's staging rows). */
template <class T>
__global__ void qkv_k(float *q, T *kc, T *vc, float *v0, const float *qkv, const float *cosb,
                      const float *sinb, const float *gain, int n, int pos0, int row0, int H, int KV,
                      int hd, int pair, int qk_norm, float eps, float mix, int layer) {
    constexpr int NP = MAXHD / 64;                          /* pairs (i, i + hd/2) a lane */
    const int half = hd / 2, nh = H + 2 * KV, lane = threadIdx.x & 31;
    const int64_t it = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (it >= (int64_t)n * nh) return;                      /* whole warps leave together */
    const int t = (int)(it / nh), g = (int)(it % nh), pos = pos0 + t;
    const bool is_q = g < H, is_v = g >= H + KV;
    const float *row = qkv + ((int64_t)t * nh + g) * pair * hd;
    float a[NP], b[NP], ss = 0.f;
#pragma unroll
    for (int j = 0; j < NP; j++) {
        const int i = lane + 32 * j;
        a[j] = b[j] = 0.f;
        if (i >= half) continue;
        for (int k = 0; k < pair; k++) {
            a[j] += row[k * hd + i];
            b[j] += row[k * hd + i + half];
        }
        a[j] /= (float)pair;
        b[j] /= (float)pair;
        ss += a[j] * a[j] + b[j] * b[j];
    }
    float r = 1.f;
    const float *w = nullptr;
    if (!is_v && qk_norm != SJ_QK_NORM_NONE) {
        r = 1.0f / sqrtf(warp_sum(ss) / (float)hd + eps);
        if (qk_norm == SJ_QK_NORM_WEIGHTED) w = gain + (is_q ? 0 : hd);
    }
#pragma unroll
    for (int j = 0; j < NP; j++) {
        const int i = lane + 32 * j;
        if (i >= half) continue;
        float x = a[j] * r, y = b[j] * r;
        if (w) { x *= w[i]; y *= w[i + half]; }
        if (!is_v) rope_pair(x, y, cosb[(int64_t)pos * half + i], sinb[(int64_t)pos * half + i]);
        if (is_q) {
            q[((int64_t)t * H + g) * hd + i] = x;
            q[((int64_t)t * H + g) * hd + i + half] = y;
            continue;
        }
        if (is_v && mix != 0.f) {
            float *v0r = v0 + ((int64_t)t * KV + g - H - KV) * hd;
            if (layer == 0) {
                v0r[i] = x;
                v0r[i + half] = y;
            } else {
                x = (1.f - mix) * x + mix * v0r[i];
                y = (1.f - mix) * y + mix * v0r[i + half];
            }
        }
        T *dst = (is_v ? vc : kc) + (int64_t)(row0 + t) * KV * hd + (g - H - (is_v ? KV : 0)) * hd;
        dst[i] = fromf<T>(x);
        dst[i + half] = fromf<T>(y);
    }
}

/* Keys of token t: rows [lo, row0 + t] of K, V, lo = row0 + t + 1 - window
 * (window 0, or lo < 0: from row 0); *n: how many. */
static __device__ __forceinline__ int token_keys(int row0, int t, int window, int *n) {
    const int end = row0 + t + 1, lo = window && end > window ? end - window : 0;
    *n = end - lo;
    return lo;
}

/* Warp per (token, query head, split) over token_keys.
 * part: (n, H, MAXSPLIT, hd + 2). K, V: this layer's cache or staging rows. */
template <class T>
__global__ void __launch_bounds__(THREADS) attn_k(float *part, const float *q, const T *K, const T *V,
                                                  int n, int row0, int window, int H, int KV, int hd,
                                                  float scale) {
    extern __shared__ float4 smem4[];
    float *qs = reinterpret_cast<float *>(smem4) + (threadIdx.x >> 5) * hd;
    const int grp = H / KV, kvd = KV * hd;
    const int64_t it = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (it >= (int64_t)n * H * MAXSPLIT) return;           /* whole warps leave together */
    const int t = (int)(it / (H * MAXSPLIT)), h = (int)(it / MAXSPLIT % H), s = (int)(it % MAXSPLIT);
    int len, per;
    const int lo = token_keys(row0, t, window, &len);
    if (s >= attn_splits(len, &per)) return;
    const int start = lo + s * per, end = min(lo + len, start + per);
    attn_partial_any<T>(q + ((int64_t)t * H + h) * hd, K + (h / grp) * hd, V + (h / grp) * hd, kvd, hd,
                        start, end, scale, qs, part + (((int64_t)t * H + h) * MAXSPLIT + s) * (hd + 2));
}

/* att (npad, H hd) of T: combined heads for t < n, zeros below. Warp per (t, h). */
template <class T>
__global__ void combine_k(T *att, const float *part, int n, int npad, int row0, int window, int H, int hd) {
    __shared__ float buf[WARPS][MAXHD];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t it = (int64_t)blockIdx.x * WARPS + w;
    if (it >= (int64_t)npad * H) return;
    const int t = (int)(it / H), h = (int)(it % H);
    T *o = att + ((int64_t)t * H + h) * hd;
    if (t >= n) {
        for (int d = lane; d < hd; d += 32) o[d] = fromf<T>(0.f);
        return;
    }
    int len, per;
    token_keys(row0, t, window, &len);
    const int ns = attn_splits(len, &per);
    attn_combine(part + ((int64_t)t * H + h) * MAXSPLIT * (hd + 2), ns, hd, buf[w]);
    __syncwarp();
    for (int d = lane; d < hd; d += 32) o[d] = fromf<T>(buf[w][d]);
}

/* h (T) = silu(gate) * up (relu2: relu(gate)^2 * up) from gu (npad, 2F) f32. */
template <class T>
__global__ void swiglu_k(T *h, const float *gu, int npad, int F, int relu2) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)npad * F) return;
    const int64_t t = i / F, f = i % F;
    const float g = gu[t * 2 * F + f], u = gu[t * 2 * F + F + f];
    h[i] = fromf<T>((relu2 ? fmaxf(g, 0.f) * fmaxf(g, 0.f) : g / (1.0f + expf(-g))) * u);
}

/* Rows between a window's ring (position s at row s % ring) and rows in
 * position order: row r0 + j of lin is position s0 + j, j < cnt; to_ring
 * says which way. K and V alike; kvd elements a row. */
template <class T>
__global__ void ring_copy_k(T *lin_k, T *lin_v, T *ring_k, T *ring_v, int r0, int s0, int cnt, int ring,
                            int kvd, int to_ring) {
    const int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= (int64_t)cnt * kvd) return;
    const int j = (int)(u / kvd), e = (int)(u % kvd);
    const int64_t li = (int64_t)(r0 + j) * kvd + e, ri = (int64_t)((s0 + j) % ring) * kvd + e;
    if (to_ring) {
        ring_k[ri] = lin_k[li];
        ring_v[ri] = lin_v[li];
    } else {
        lin_k[li] = ring_k[ri];
        lin_v[li] = ring_v[ri];
    }
}

/* ---- creation ------------------------------------------------------------------ */

static size_t al256(size_t b) { return (b + 255) & ~(size_t)255; }

/* dst (cols, rows) = src (rows, cols), elements of es bytes. */
static void transpose_rows(char *dst, const char *src, int64_t rows, int64_t cols, int64_t es) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) memcpy(dst + (c * rows + r) * es, src + (r * cols + c) * es, (size_t)es);
}
/* One thread per element (no grid-stride loops in the prefill kernels). */
static unsigned blocks(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

/* Bind this engine's context (stream, cuBLASLt workspace) to the calling thread. */
static void bind(sj_cuinfer *g) { g->be->bind(g->ctx); }

extern "C" void sj_cuinfer_free(sj_cuinfer *g) {
    if (!g) return;
    if (g->ctx) {
        bind(g);
        g->be->sync();
        g->be->graph_free(g->graph1);
        g->be->graph_free(g->graphn);
        g->be->free(g->wmem);
        g->be->free(g->smem);
        g->be->host_free(g->h_io);
        g->be->ctx_free(g->ctx);
    }
    free(g->lay);
    free(g);
}

/* Whether the kernels need the options compiled in (params.lay): all but
 * the untied head and RoPE scaling, which are only data. */
static bool has_options(const sj_cuinfer *g) {
    const sj_config *c = &g->c;
    if (c->paired_heads || c->value_mix != 0.f || c->embed_skip != 0.f) return true;
    for (int l = 0; l < c->n_layers; l++)
        if (g->lay[l].ring || g->lay[l].qk_norm != SJ_QK_NORM_NONE || g->lay[l].ffn != SJ_FFN_SWIGLU) return true;
    return false;
}

extern "C" sj_status sj_cuinfer_create(const sj_cuinfer_init *in, sj_cuinfer **out) {
    *out = NULL;
    const sj_config *c = &in->c;
    const int hd = c->dim / c->n_heads, pair = c->paired_heads ? 2 : 1;
    if (hd % 2 || hd > MAXHD)
        return sj_fail(SJ_ERR_ARG, "GPU inference: head size %d must be even and at most %d", hd, (int)MAXHD);
    sj_cuinfer *g = (sj_cuinfer *)calloc(1, sizeof *g);
    if (g) g->lay = (layer_info *)calloc((size_t)c->n_layers, sizeof *g->lay);
    if (!g || !g->lay) { free(g); return sj_fail(SJ_ERR_NOMEM, "GPU inference handle: out of host memory"); }
    g->c = *c;
    g->is_bf = in->bf16;
    g->es = in->bf16 ? 2 : 4;
    g->hd = hd;
    g->kvd = c->n_kv_heads / pair * hd;
    g->max_ctx = in->max_ctx;
    g->graphs = g->persistent = 1;
    g->be = in->bf16 ? &sj_cuda_backend_bf16 : &sj_cuda_backend_f32;
    const char *env = getenv("SMEDJAN_GRAPHS");
    if (env && !strcmp(env, "0")) g->graphs = 0;
    env = getenv("SMEDJAN_DECODE_PERSISTENT");
    if (env && !strcmp(env, "0")) g->persistent = 0;

    g->ctx = g->be->ctx_create();
    if (!g->ctx) { sj_cuinfer_free(g); return sj_cuda_check_device() ? SJ_ERR_RUNTIME : SJ_ERR_NOMEM; }
    bind(g);
    const int64_t C = c->dim, F = c->ffn_dim, V = c->vocab_size, L = c->n_layers, es = g->es;
    const int64_t KVd = g->kvd, QR = (int64_t)(c->n_heads + 2 * c->n_kv_heads) * hd, H = c->n_heads / pair;
    const int64_t OD = H * hd, mc = g->max_ctx, half = hd / 2;
    /* each layer's cache: max_ctx rows, or a window shorter than that as a ring */
    int64_t kv_rows = 0;
    int max_ring = 0, weighted = 0;
    for (int l = 0; l < L; l++) {
        const sj_layer *y = &c->layers[l];
        const int ring = y->window > 0 && y->window < mc ? y->window : 0;
        g->lay[l] = { kv_rows * KVd, ring, y->qk_norm, y->ffn };
        kv_rows += ring ? ring : mc;
        max_ring = max(max_ring, ring);
        if (y->qk_norm == SJ_QK_NORM_WEIGHTED) {
            weighted = 1;
            if (!in->q_norm || !in->k_norm || !in->q_norm[l] || !in->k_norm[l]) {
                sj_cuinfer_free(g);
                return sj_fail(SJ_ERR_ARG, "GPU inference: layer %d's q_norm / k_norm weights are missing", l);
            }
        }
    }
    const bool opts = has_options(g);
    params &p = g->p;
    p.C = (int)C; p.F = (int)F; p.H = (int)H; p.KV = c->n_kv_heads / pair; p.hd = hd; p.V = (int)V;
    p.L = (int)L; p.max_ctx = (int)mc; p.eps = c->norm_eps; p.scale = 1.0f / sqrtf((float)hd);
    p.pair = pair; p.qkv_rows = (int)QR; p.od = (int)OD;
    p.value_mix = c->value_mix; p.embed_skip = c->embed_skip;
    /* fused attention + out-projection up to one 32-key chunk per warp (a
     * tuning and testing knob: SMEDJAN_DECODE_FUSE_CTX=0 never fuses) */
    p.fuse_ctx = 32 * WARPS;
    env = getenv("SMEDJAN_DECODE_FUSE_CTX");
    if (env && *env) p.fuse_ctx = atoi(env);
    /* weights: one allocation, each array 256-byte aligned (rows 16-byte aligned when C, F allow) */
    size_t off[9], wb = 0;
    const size_t sizes[9] = { (size_t)(V * C * es), in->output ? (size_t)(V * C * es) : 0,
                              (size_t)(L * QR * C * es), (size_t)(L * C * OD * es),
                              (size_t)(L * 2 * F * C * es), (size_t)(L * C * F * es),
                              (size_t)((2 * L + 1) * C * 4),
                              opts ? (size_t)L * sizeof(layer_info) : 0,   /* p.lay */
                              weighted ? (size_t)(L * 2 * hd * 4) : 0 };    /* p.qk_gain */
    for (int i = 0; i < 9; i++) { off[i] = wb; wb += al256(sizes[i]); }
    g->wmem = g->be->alloc(wb, "GPU inference weights");
    if (!g->wmem) { sj_cuinfer_free(g); return SJ_ERR_NOMEM; }
    g->wbytes = (int64_t)wb;
    char *W = (char *)g->wmem;
    p.emb = W + off[0];
    p.head = in->output ? W + off[1] : p.emb;
    p.wqkv = W + off[2]; p.wo = W + off[3]; p.wgu = W + off[4]; p.wdt = W + off[5];
    p.norms = (const float *)(W + off[6]);
    p.lay = opts ? (const layer_info *)(W + off[7]) : NULL;
    p.qk_gain = weighted ? (const float *)(W + off[8]) : NULL;
    const sj_backend *be = g->be;
    char *tr = (char *)malloc((size_t)(C * F * es));   /* one layer's down projection, transposed */
    if (!tr) { sj_cuinfer_free(g); return sj_fail(SJ_ERR_NOMEM, "GPU inference: out of host memory"); }
    be->from_host(W + off[0], in->tok_emb, sizes[0]);
    if (in->output) be->from_host(W + off[1], in->output, sizes[1]);
    for (int64_t l = 0; l < L; l++) {
        char *q = W + off[2] + (size_t)(l * QR * C * es);
        const int64_t qrows = (int64_t)c->n_heads * hd, kvrows = (int64_t)c->n_kv_heads * hd;
        be->from_host(q, in->wq[l], (size_t)(qrows * C * es));
        be->from_host(q + (size_t)(qrows * C * es), in->wk[l], (size_t)(kvrows * C * es));
        be->from_host(q + (size_t)((qrows + kvrows) * C * es), in->wv[l], (size_t)(kvrows * C * es));
        be->from_host(W + off[3] + (size_t)(l * C * OD * es), in->wo[l], (size_t)(C * OD * es));
        char *gu = W + off[4] + (size_t)(l * 2 * F * C * es);
        be->from_host(gu, in->w_gate[l], (size_t)(F * C * es));
        be->from_host(gu + (size_t)(F * C * es), in->w_up[l], (size_t)(F * C * es));
        transpose_rows(tr, (const char *)in->w_down[l], C, F, es);
        be->from_host(W + off[5] + (size_t)(l * C * F * es), tr, (size_t)(C * F * es));
        if (c->layers[l].qk_norm == SJ_QK_NORM_WEIGHTED) {
            be->from_host(W + off[8] + (size_t)(l * 2 * hd * 4), in->q_norm[l], (size_t)hd * 4);
            be->from_host(W + off[8] + (size_t)((l * 2 + 1) * hd * 4), in->k_norm[l], (size_t)hd * 4);
        }
    }
    free(tr);
    be->from_host(W + off[6], in->norms, sizes[6]);
    if (opts) be->from_host(W + off[7], g->lay, sizes[7]);
    sj_status s = dec::setup(p, g->is_bf, (int64_t)wb, &g->grid, &g->coop);
    if (s) { sj_cuinfer_free(g); return s; }
    if (!g->coop) g->persistent = 0;

    /* run state: KV cache, RoPE tables, decode vectors, prefill scratch */
    const int64_t R = CHUNK, PS = H * MAXSPLIT * (hd + 2), SR = max_ring ? max_ring - 1 + R : 0;
    const size_t ss[] = {
        (size_t)(kv_rows * KVd * es), (size_t)(kv_rows * KVd * es),        /* kc, vc */
        (size_t)(mc * half * 4), (size_t)(mc * half * 4),                  /* cos, sin */
        (size_t)(C * 32), (size_t)(C * 4), (size_t)(F * 4), (size_t)(V * 4),/* x, q, h, logits */
        (size_t)(PS * 4), (size_t)(g->grid * 4), (size_t)(g->grid * 4),    /* part, best */
        (size_t)((2 + mc) * 4),                                            /* io, out */
        (size_t)(R * C * 4), (size_t)(R * QR * 4), (size_t)(R * C * 4),    /* px, pqkv, pq */
        (size_t)(R * 2 * F * 4), (size_t)(R * V * 4), (size_t)(R * PS * 4),/* pgu, plog, ppart */
        (size_t)(R * C * es), (size_t)(R * C * es), (size_t)(R * F * es),  /* pxn, patt, ph */
        (size_t)(R * 4),                                                   /* ptok */
        (size_t)(KVd * 4), (size_t)(R * KVd * 4),                          /* v0, pv0 */
        (size_t)(SR * KVd * es), (size_t)(SR * KVd * es),                  /* stage_k, stage_v */
    };
    const int NS = (int)(sizeof ss / sizeof ss[0]);
    size_t so[32], sb = 0;
    for (int i = 0; i < NS; i++) { so[i] = sb; sb += al256(ss[i]); }
    g->smem = be->alloc(sb, "GPU inference KV cache and run state");
    g->h_io = g->smem ? (int *)be->host_alloc((size_t)(2 + mc) * 4, "GPU inference pinned io") : NULL;
    if (!g->h_io) { sj_cuinfer_free(g); return SJ_ERR_NOMEM; }
    g->sbytes = (int64_t)sb;
    char *S = (char *)g->smem;
    CUDA_CHECK(cudaMemsetAsync(S, 0, sb, sj_stream()));   /* no stale bits, ever (padding rows) */
    p.kc = S + so[0]; p.vc = S + so[1];
    p.rope_cos = (const float *)(S + so[2]); p.rope_sin = (const float *)(S + so[3]);
    p.x = (unsigned long long *)(S + so[4]); p.q = (float *)(S + so[5]); p.h = (float *)(S + so[6]);
    p.logits = (float *)(S + so[7]); p.part = (float *)(S + so[8]);
    p.best_v = (float *)(S + so[9]); p.best_i = (int *)(S + so[10]);
    p.io = (int *)(S + so[11]); p.out = p.io + 2;
    g->px = (float *)(S + so[12]); g->pqkv = (float *)(S + so[13]); g->pq = (float *)(S + so[14]);
    g->pgu = (float *)(S + so[15]); g->plog = (float *)(S + so[16]); g->ppart = (float *)(S + so[17]);
    g->pxn = S + so[18]; g->patt = S + so[19]; g->ph = S + so[20]; g->ptok = (int *)(S + so[21]);
    p.v0 = (float *)(S + so[22]); g->pv0 = (float *)(S + so[23]);
    g->stage_k = S + so[24]; g->stage_v = S + so[25];
    be->from_host(S + so[2], in->rope_cos, ss[2]);
    be->from_host(S + so[3], in->rope_sin, ss[3]);
    if ((s = be->sync())) { sj_cuinfer_free(g); return s; }
    *out = g;
    return SJ_OK;
}

/* ---- accessors ---------------------------------------------------------------- */

extern "C" int64_t sj_cuinfer_weight_bytes(const sj_cuinfer *g) { return g->wbytes; }
extern "C" int64_t sj_cuinfer_cache_bytes(const sj_cuinfer *g) { return g->sbytes; }

static void drop_graphs(sj_cuinfer *g) {
    bind(g);
    g->be->graph_free(g->graph1);
    g->be->graph_free(g->graphn);
    g->graph1 = g->graphn = NULL;
    g->graphn_n = 0;
}

extern "C" void sj_cuinfer_set_options(sj_cuinfer *g, int graphs, int persistent) {
    drop_graphs(g);
    g->graphs = graphs != 0;
    g->persistent = persistent != 0 && g->coop;
}
extern "C" void sj_cuinfer_get_options(const sj_cuinfer *g, int *graphs, int *persistent) {
    *graphs = g->graphs;
    *persistent = g->persistent;
}

/* ---- prefill ---------------------------------------------------------------------- */

/* C (f32) (+)= A B^T, B (N, K); or A B with B (K, N) when b_kn. */
static void gemm(sj_cuinfer *g, float *C, const void *A, const void *B, int M, int N, int K, int accum,
                 int b_kn = 0) {
    sj_matmul(g->be, C, A, B, M, N, K, 0, !b_kn, accum, 1);
}

/* m (<= CHUNK) tokens at positions pos0 .. pos0 + m - 1; logits of every row in plog.
 * A window's ring takes the chunk's keys only after its attention: that
 * reads the ring's last ring - 1 keys and the chunk's, in position order,
 * from the staging rows. */
template <class T>
static void prefill_chunk(sj_cuinfer *g, int m, int pos0) {
    const params &p = g->p;
    const int npad = m <= SMALL ? SMALL : CHUNK, C = p.C, F = p.F, H = p.H, KV = p.KV, hd = p.hd;
    const int kvd = g->kvd;
    const int64_t es = g->es;
    cudaStream_t st = sj_stream();
    embed_k<T><<<npad, 128, 0, st>>>(g->px, (const T *)p.emb, g->ptok, m, C, 1.f, 0);
    LAUNCH_CHECK("embed_k");
    const int64_t heads = (int64_t)m * (H + 2 * KV), items = (int64_t)m * H * MAXSPLIT;
    for (int l = 0; l < p.L; l++) {
        const layer_info &li = g->lay[l];
        T *kc = (T *)p.kc + li.kv_off, *vc = (T *)p.vc + li.kv_off;
        T *K = kc, *Vc = vc;
        int row0 = pos0;   /* the chunk's first key row in K, Vc */
        if (li.ring) {
            K = (T *)g->stage_k;
            Vc = (T *)g->stage_v;
            row0 = min(pos0, li.ring - 1);
            if (row0) {
                ring_copy_k<T><<<blocks((int64_t)row0 * kvd, 256), 256, 0, st>>>(K, Vc, kc, vc, 0, pos0 - row0, row0,
                                                                                  li.ring, kvd, 0);
                LAUNCH_CHECK("ring_copy_k");
            }
        }
        if (l > 0 && p.embed_skip != 0.f) {
            embed_k<T><<<npad, 128, 0, st>>>(g->px, (const T *)p.emb, g->ptok, m, C, p.embed_skip, 1);
            LAUNCH_CHECK("embed_k");
        }
        norm_k<T><<<npad, 256, 0, st>>>((T *)g->pxn, g->px, p.norms + (int64_t)2 * l * C, C, p.eps);
        LAUNCH_CHECK("norm_k");
        gemm(g, g->pqkv, g->pxn, (const char *)p.wqkv + (int64_t)l * p.qkv_rows * C * es, npad, p.qkv_rows, C, 0);
        qkv_k<T><<<(unsigned)((heads + WARPS - 1) / WARPS), THREADS, 0, st>>>(
            g->pq, K, Vc, g->pv0, g->pqkv, p.rope_cos, p.rope_sin, p.qk_gain ? p.qk_gain + (int64_t)2 * l * hd : NULL,
            m, pos0, row0, H, KV, hd, p.pair, li.qk_norm, p.eps, p.value_mix, l);
        LAUNCH_CHECK("qkv_k");
        attn_k<T><<<(unsigned)((items + WARPS - 1) / WARPS), THREADS, WARPS * hd * sizeof(float), st>>>(
            g->ppart, g->pq, K, Vc, m, row0, li.ring, H, KV, hd, p.scale);
        LAUNCH_CHECK("attn_k");
        combine_k<T><<<(unsigned)(((int64_t)npad * H + WARPS - 1) / WARPS), THREADS, 0, st>>>(
            (T *)g->patt, g->ppart, m, npad, row0, li.ring, H, hd);
        LAUNCH_CHECK("combine_k");
        if (li.ring) {   /* the chunk's last keys (at most a ring of them) into the ring */
            const int cnt = min(m, li.ring);
            ring_copy_k<T><<<blocks((int64_t)cnt * kvd, 256), 256, 0, st>>>(K, Vc, kc, vc, row0 + m - cnt, pos0 + m - cnt,
                                                                             cnt, li.ring, kvd, 1);
            LAUNCH_CHECK("ring_copy_k");
        }
        gemm(g, g->px, g->patt, (const char *)p.wo + l * (int64_t)C * p.od * es, npad, C, p.od, 1);
        norm_k<T><<<npad, 256, 0, st>>>((T *)g->pxn, g->px, p.norms + (int64_t)(2 * l + 1) * C, C, p.eps);
        LAUNCH_CHECK("norm_k");
        gemm(g, g->pgu, g->pxn, (const char *)p.wgu + l * (int64_t)2 * F * C * es, npad, 2 * F, C, 0);
        swiglu_k<T><<<blocks((int64_t)npad * F, 256), 256, 0, st>>>((T *)g->ph, g->pgu, npad, F, li.ffn == SJ_FFN_RELU2);
        LAUNCH_CHECK("swiglu_k");
        gemm(g, g->px, g->ph, (const char *)p.wdt + l * (int64_t)C * F * es, npad, C, F, 1, 1);
    }
    norm_k<T><<<npad, 256, 0, st>>>((T *)g->pxn, g->px, p.norms + (int64_t)2 * p.L * C, C, p.eps);
    LAUNCH_CHECK("norm_k");
    gemm(g, g->plog, g->pxn, p.head, npad, p.V, C, 0);
}

extern "C" sj_status sj_cuinfer_prefill(sj_cuinfer *g, int pos, const int32_t *tokens, int n,
                                        float *logits_all) {
    bind(g);
    const int V = g->c.vocab_size;
    sj_status s = SJ_OK;
    for (int i = 0; i < n && !s; i += CHUNK) {
        const int m = n - i < CHUNK ? n - i : CHUNK;
        g->be->from_host(g->ptok, tokens + i, (size_t)m * 4);
        if (g->is_bf) prefill_chunk<bf16>(g, m, pos + i);
        else prefill_chunk<float>(g, m, pos + i);
        if (logits_all) g->be->to_host(logits_all + (int64_t)i * V, g->plog, (size_t)m * V * 4);
        if (i + m == n)
            CUDA_CHECK(cudaMemcpyAsync(g->p.logits, g->plog + (int64_t)(m - 1) * V, (size_t)V * 4,
                                       cudaMemcpyDeviceToDevice, sj_stream()));
        s = g->be->sync();
    }
    return s;
}

/* ---- decode ----------------------------------------------------------------------- */

/* Token and position in, n steps, the n chosen tokens out: all on the stream. */
static void enqueue_steps(sj_cuinfer *g, int n) {
    g->be->from_host_async(g->p.io, g->h_io, 2 * sizeof(int));
    dec::enqueue(g->p, g->is_bf, g->persistent, n, g->grid, sj_stream());
    g->be->to_host_async(g->h_io + 2, g->p.out, (size_t)n * sizeof(int));
}

/* n steps at positions pos ..; out (may be NULL): the n greedy choices. */
extern "C" sj_status sj_cuinfer_steps(sj_cuinfer *g, int pos, int32_t token, int n, int32_t *out) {
    bind(g);
    g->h_io[0] = token;
    g->h_io[1] = pos;
    sj_status s;
    if (!g->graphs) {
        enqueue_steps(g, n);
    } else {
        void **slot = n == 1 ? &g->graph1 : &g->graphn;
        if (n != 1 && g->graphn_n != n) {
            g->be->graph_free(g->graphn);
            g->graphn = NULL;
        }
        if (!*slot) {
            if ((s = g->be->capture_begin())) return s;
            enqueue_steps(g, n);
            if ((s = g->be->capture_end(slot))) return s;
            if (n != 1) g->graphn_n = n;
        }
        if ((s = g->be->graph_launch(*slot))) return s;
    }
    if ((s = g->be->sync())) return s;
    if (out) memcpy(out, g->h_io + 2, (size_t)n * sizeof(int32_t));
    return SJ_OK;
}

extern "C" sj_status sj_cuinfer_logits(sj_cuinfer *g, float *out) {
    bind(g);
    g->be->to_host(out, g->p.logits, (size_t)g->c.vocab_size * 4);
    return g->be->sync();
}
