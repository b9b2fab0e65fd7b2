/* decode.cu — one decode step (batch 1) of the GPU inference engine, as
 * phases, each a grid-wide loop over independent units:
 *
 *   per layer  A  RMSNorm (each block redoes the tiny sum of squares) + QKV
 *                 GEMV + RoPE, q to memory, k/v into the cache at pos
 *              B  attention of head h and its share of the out-projection,
 *                 per block (h, row range): the block's warps split the
 *                 context and combine in shared memory, then add
 *                 o_h . Wo[c, h's columns] into the residual
 *                 (long contexts: B1 attention partials per (head, split),
 *                 then B2 every block combines them + out-proj GEMV rows)
 *              D  RMSNorm + gate|up rows u + SwiGLU, and h_u times row u of
 *                 the transposed down projection, summed per block and
 *                 added into the next residual row
 *   then       F  final RMSNorm + LM-head GEMV, logits out, per-block argmax
 *              G  (one block) greedy token = argmax, position + 1
 *
 * On Hopper, models that stream from HBM (16-warp blocks) run A and B as
 * one phase in thread-block clusters, one per query head: the cluster
 * computes its head's q and its group's k, v, passes them to its blocks
 * through distributed shared memory, and each block runs its share of B
 * (phase_qkv_attn): two grid barriers a layer, not three.
 *
 * The phases run either as ONE persistent cooperative kernel with a grid
 * barrier between phases (launch and drain cost paid once per step, or once
 * per n greedy steps), or as one kernel per phase (the fallback, captured as
 * a CUDA graph by the engine). Both call the same phase functions.
 * The step is latency-bound at these sizes: what matters is the number of
 * grid-wide dependencies (2 or 3 per layer) and the weight stream (each weight
 * byte read once per token, 16-byte loads, many rows in flight). B and D
 * add partial vectors from many blocks into the residual: fixed-point
 * atomics (decode.cuh) keep that deterministic.
 *
 * Architecture options (params.lay) run in kernels compiled apart (OPT):
 * A per attention head (phase_qkv_heads: paired heads, qk_norm, value mix,
 * a window's ring row), B over the ring's rows, D with relu2 and embed
 * skip; no clusters. The plain model's kernels carry none of it. */
#include "decode.cuh"
#include "decode_trace.cuh"
#include "sm90.cuh"
#include <cooperative_groups.h>
#include <limits.h>
#include <stdlib.h>

namespace cg = cooperative_groups;

namespace dec {

/* The grid barrier between phases of the persistent kernel, traced for
 * the probe. */
struct phase_barrier {
    cg::grid_group grid = cg::this_grid();
    int n = 0;
    cg::grid_group::arrival_token token;
    __device__ __forceinline__ void arrive() {
        trace_stamp(2 * n);
        token = grid.barrier_arrive();
    }
    __device__ __forceinline__ void wait() {
        grid.barrier_wait(cg::grid_group::arrival_token(token));
        trace_stamp(2 * n + 1);
        n++;
    }
    __device__ __forceinline__ void sync() { arrive(); wait(); }
};

/* The residual stream of a step, in fixed point: version v = 2l enters
 * layer l's attention, 2l + 1 its FFN, 2L the head; version 0 is the
 * token's embedding row itself. A phase making version v sums many blocks'
 * partials (and the carry of version v - 1) into a zeroed row, and clears
 * the row of version v + 1, which the next phase sums into: the row
 * version v - 2 had, whose readers are a grid barrier behind. Version 1
 * has a row of its own (3), which the head clears for the next step, so
 * the first layer never waits on a clear, whatever came before the step;
 * others take rows v % 3. Three consecutive versions never share a row. */
static __device__ __forceinline__ unsigned long long *xrow(const params &p, int v) {
    return p.x + (int64_t)(v == 1 ? 3 : v % 3) * p.C;
}
static __device__ __forceinline__ void clear_row(const params &p, int v) {
    if (blockIdx.x == gridDim.x - 1)
        for (int i = threadIdx.x; i < p.C; i += blockDim.x) xrow(p, v)[i] = 0;
}

/* Where a phase reads the residual stream: the token's embedding row
 * (version 0), a fixed-point row, or (both null, as a carry) nothing.
 * Passed by value: an address taken puts it in local memory. */
template <class T> struct resid_in {
    const T *emb;
    const unsigned long long *x;
    __device__ __forceinline__ float val(int i) const { return emb ? tof(emb[i]) : unfix(x[i]); }
    __device__ __forceinline__ unsigned long long fixed(int i) const {
        return emb ? fix(tof(emb[i])) : x ? x[i] : 0ull;
    }
};
/* Layer l's input, version 2l. */
template <class T>
static __device__ __forceinline__ resid_in<T> layer_in(const params &p, int l, int tok) {
    if (l == 0) return { (const T *)p.emb + (int64_t)tok * p.C, nullptr };
    return { nullptr, xrow(p, 2 * l) };
}
template <class T>
static __device__ __forceinline__ resid_in<T> version(const params &p, int v) { return { nullptr, xrow(p, v) }; }

/* RMSNorm with its scale left to the caller: xs = src * w and the return
 * value is 1 / rms(src), by which the caller multiplies its dot products
 * with xs. One block barrier: no pass over xs waits for the sum of
 * squares. Calls are a grid barrier apart (part[] is then free again). */
template <class T>
static __device__ float load_normed(float *xs, resid_in<T> src, const float *w, int C, float eps) {
    __shared__ float part[32];
    float ss = 0.f;
    auto take = [&](int i, float v, float wi) {
        xs[i] = v * wi;
        ss += v * v;
    };
    if (C > (int)blockDim.x && C <= 2 * (int)blockDim.x) {   /* both loads in flight at once
                                                              (SmolLM2: 530 -> 523 us a token) */
        float v[2], wv[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            v[k] = i < C ? src.val(i) : 0.f;
            wv[k] = i < C ? w[i] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i >= C) break;
            take(i, v[k], wv[k]);
        }
    } else {
        for (int i = threadIdx.x; i < C; i += blockDim.x) take(i, src.val(i), w[i]);
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float t = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) t += part[k];   /* one order: one rs */
    return 1.0f / sqrtf(t / (float)C + eps);
}

template <int NW> static __device__ __forceinline__ int gwarp(void) { return blockIdx.x * NW + (threadIdx.x >> 5); }
template <int NW> static __device__ __forceinline__ int nwarps(void) { return gridDim.x * NW; }

/* A's unit u: rows i and i + hd/2 of QKV head g (u = g hd/2 + i), the two
 * halves RoPE mixes. */
template <class T, bool OPT>
static __device__ __forceinline__ void qkv_rows(const params &p, int l, int u, const T **rows) {
    const int hd = p.hd, half = hd / 2, g = u / half, i = u % half;
    const T *W = (const T *)p.wqkv + (OPT ? (int64_t)l * p.qkv_rows * p.C : (int64_t)l * (p.H + 2 * p.KV) * hd * p.C);
    rows[0] = W + (int64_t)(g * hd + i) * p.C;
    rows[1] = W + (int64_t)(g * hd + i + half) * p.C;
}
static __device__ __forceinline__ int qkv_units(const params &p) { return (p.H + 2 * p.KV) * (p.hd / 2); }

/* D's unit u: gate row u, up row u, row u of the transposed down projection. */
template <class T>
static __device__ __forceinline__ void ffn_rows(const params &p, int l, int u, const T **rows) {
    const int64_t C = p.C, F = p.F;
    const T *W = (const T *)p.wgu + l * 2 * F * C;
    rows[0] = W + u * C;
    rows[1] = W + (F + u) * C;
    rows[2] = (const T *)p.wdt + l * F * C + u * C;
}

/* Per-layer lookups of the options. In the kernels compiled without them
 * (OPT false) they fold into the plain model's own expressions: those
 * kernels' PTX is what it was before the options came (p.od in place of C
 * alone cost the 16-warp f32 kernel 60 bytes of spills). */
/* Layer l's ring (layer_info): cache row s % ring holds position s; 0: row s. */
template <bool OPT>
static __device__ __forceinline__ int kv_ring(const params &p, int l) { return OPT ? p.lay[l].ring : 0; }
/* The cache rows attention at pos reads: every row written so far (a full
 * ring holds the window; attention does not depend on the keys' order). */
template <bool OPT>
static __device__ __forceinline__ int kv_keys(const params &p, int l, int pos) {
    const int ring = kv_ring<OPT>(p, l);
    return ring ? min(pos + 1, ring) : pos + 1;
}
/* wo's columns (params.od). */
template <bool OPT>
static __device__ __forceinline__ int wo_cols(const params &p) { return OPT ? p.od : p.C; }

/* Row `row` of layer l's K (is_v 0) or V cache, KV head g. */
template <class T, bool OPT>
static __device__ __forceinline__ T *kv_row(const params &p, int l, int row, bool is_v, int g) {
    if (OPT) return (T *)(is_v ? p.vc : p.kc) + p.lay[l].kv_off + ((int64_t)row * p.KV + g) * p.hd;
    return (T *)(is_v ? p.vc : p.kc) + ((int64_t)l * p.max_ctx + row) * p.KV * p.hd + g * p.hd;
}

/* A: units are (head, i) pairs of rows (qkv_rows). */
template <class T, int NW>
static __device__ void phase_qkv(const params &p, int l, int tok, int pos, float *xs) {
    const int C = p.C, hd = p.hd, half = hd / 2, lane = threadIdx.x & 31;
    const float rs = load_normed<T>(xs, layer_in<T>(p, l, tok), p.norms + (int64_t)2 * l * C, C, p.eps);
    DEC_MARK(0);
    const int units = qkv_units(p);
    for (int u = gwarp<NW>(); u < units; u += nwarps<NW>()) {
        const T *rows[2];
        qkv_rows<T, false>(p, l, u, rows);
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        if (lane) continue;
        const int g = u / half, i = u % half;
        d[0] *= rs;
        d[1] *= rs;
        if (g < p.H + p.KV) rope_pair(d[0], d[1], p.rope_cos[(int64_t)pos * half + i],
                                      p.rope_sin[(int64_t)pos * half + i]);
        if (g < p.H) {
            p.q[g * hd + i] = d[0];
            p.q[g * hd + i + half] = d[1];
        } else {
            const bool is_v = g >= p.H + p.KV;
            T *dst = kv_row<T, false>(p, l, pos, is_v, g - p.H - (is_v ? p.KV : 0));
            dst[i] = fromf<T>(d[0]);
            dst[i + half] = fromf<T>(d[1]);
        }
    }
    DEC_MARK(1);
}

/* A with options (p.lay): a block per attention head g of q, k, v (in
 * wqkv's order), its warps over the head's units i: rows i and i + hd/2
 * of its p.pair projection heads g pair + k, averaged; then, with the head
 * whole in hb (hd floats of shared memory): its RMSNorm (q and k, the
 * layer's qk_norm), RoPE (q and k), value mix (v of layers after the
 * first; layer 0 keeps its v), and q or the cache row written. */
template <class T, int NW>
static __device__ void phase_qkv_heads(const params &p, int l, int tok, int pos, float *xs, float *hb) {
    const int C = p.C, hd = p.hd, half = hd / 2, lane = threadIdx.x & 31, nh = p.H + 2 * p.KV;
    if ((int)blockIdx.x >= nh) return;
    const layer_info li = p.lay[l];
    const float rs = load_normed<T>(xs, layer_in<T>(p, l, tok), p.norms + (int64_t)2 * l * C, C, p.eps) /
                     (float)p.pair;
    for (int g = blockIdx.x; g < nh; g += gridDim.x) {
        for (int i = threadIdx.x >> 5; i < half; i += NW) {
            float a = 0.f, b = 0.f;
            for (int k = 0; k < p.pair; k++) {
                const T *rows[2];
                qkv_rows<T, true>(p, l, (g * p.pair + k) * half + i, rows);
                float d[2];
                warp_dots<T, 2>(rows, xs, C, d);
                a += d[0];
                b += d[1];
            }
            if (!lane) { hb[i] = a * rs; hb[i + half] = b * rs; }
        }
        __syncthreads();
        const bool is_q = g < p.H, is_v = g >= p.H + p.KV;
        float r = 1.f;
        const float *gain = nullptr;
        if (!is_v && li.qk_norm != SJ_QK_NORM_NONE) {
            float ss = 0.f;
            for (int d = lane; d < hd; d += 32) ss += hb[d] * hb[d];
            r = 1.0f / sqrtf(warp_sum(ss) / (float)hd + p.eps);
            if (li.qk_norm == SJ_QK_NORM_WEIGHTED) gain = p.qk_gain + ((int64_t)2 * l + !is_q) * hd;
        }
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float a = hb[i] * r, b = hb[i + half] * r;
            if (gain) { a *= gain[i]; b *= gain[i + half]; }
            if (!is_v) rope_pair(a, b, p.rope_cos[(int64_t)pos * half + i], p.rope_sin[(int64_t)pos * half + i]);
            if (is_q) {
                p.q[g * hd + i] = a;
                p.q[g * hd + i + half] = b;
                continue;
            }
            if (is_v && p.value_mix != 0.f) {
                float *v0 = p.v0 + (g - p.H - p.KV) * hd;
                if (l == 0) {
                    v0[i] = a;
                    v0[i + half] = b;
                } else {
                    a = (1.f - p.value_mix) * a + p.value_mix * v0[i];
                    b = (1.f - p.value_mix) * b + p.value_mix * v0[i + half];
                }
            }
            T *dst = kv_row<T, true>(p, l, li.ring ? pos % li.ring : pos, is_v, g - p.H - (is_v ? p.KV : 0));
            dst[i] = fromf<T>(a);
            dst[i + half] = fromf<T>(b);
        }
        __syncthreads();   /* hb is the next head's */
    }
}

/* B runs fused (one phase) while the context is short enough that every
 * block of a head redoing its attention costs less than a grid barrier. */
static __device__ __forceinline__ bool attn_fused(const params &p, int pos) { return pos < p.fuse_ctx; }

/* A and B as one phase of thread-block clusters (p.cluster blocks each)
 * while B is fused: compiled for sm_90a (setup asks for it on 9.x only). */
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DEC_CLUSTERS 1
#else
#define DEC_CLUSTERS 0
#endif
static __device__ __forceinline__ bool qkv_attn_clustered(const params &p, int pos) {
    return DEC_CLUSTERS && p.cluster && attn_fused(p, pos);
}

/* B's units: (head h, share j of the out-projection rows), J per head. */
static __device__ __forceinline__ int oproj_shares(const params &p) {
    return (int)gridDim.x >= p.H ? (int)gridDim.x / p.H : 1;
}

/* L2 prefetch of the bytes [p, p + bytes) by one lane, and of a row by the warp's lanes. */
static __device__ __forceinline__ void prefetch_lines(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)p + off));
}
static __device__ __forceinline__ void prefetch_l2(const void *row, int64_t bytes) {
    for (int64_t off = (threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        prefetch_lines((const char *)row + off, 128);
}

/* Head h's columns of Wo, rows of share j of J (B's unit), one row a lane
 * (not one a warp: SmolLM2 495.5 vs 512.5 us a token, clustered). */
template <class T, int NW, bool OPT>
static __device__ void prefetch_oproj_share(const params &p, int l, int h, int j, int J) {
    const int64_t C = p.C, od = wo_cols<OPT>(p);
    const T *W = (const T *)p.wo + (int64_t)l * C * od + h * p.hd;
    for (int64_t c = C * j / J + threadIdx.x; c < C * (j + 1) / J; c += NW * 32)
        prefetch_lines(W + c * od, p.hd * (int64_t)sizeof(T));
}

/* A's unit u: its two rows, by the warp. */
template <class T, bool OPT>
static __device__ __forceinline__ void prefetch_qkv_unit(const params &p, int l, int u) {
    const T *rows[2];
    qkv_rows<T, OPT>(p, l, u, rows);
    prefetch_l2(rows[0], p.C * (int64_t)sizeof(T));
    prefetch_l2(rows[1], p.C * (int64_t)sizeof(T));
}

/* x[c] += dot(o, W[c * ld .. + hd)) + carry's c for c in [c0, c1), by the
 * block: G lanes per row (one 16-byte load each), 32 / G rows per warp at a
 * time, fixed-point atomics (other heads add into the same rows). o: shared.
 * The carry's load goes out with the row's: not a round trip after it. */
template <class T, int NW, int R>
static __device__ void rows_add_vec(unsigned long long *x, const T *W, int64_t ld, int c0, int c1,
                                    const float *o, int G, resid_in<T> carry) {
    constexpr int VEC = vec16<T>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rpw = 32 / G, sub = lane / G, gl = lane % G, pass = NW * rpw;
    float ov[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) ov[e] = o[gl * VEC + e];
    for (int base = c0 + warp * rpw; base < c1; base += R * pass) {   /* R rows a lane, pass apart */
        uint4 raw[R];
        unsigned long long cv[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int c = base + r * pass + sub;
            cv[r] = c < c1 && gl == 0 ? carry.fixed(c) : 0ull;
            if (c < c1) raw[r] = __ldg(reinterpret_cast<const uint4 *>(W + c * ld + gl * VEC));
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int c = base + r * pass + sub;
            float d = 0.f;
            if (c < c1) {
                float w[VEC];
                unpack16<T>(w, raw[r]);
#pragma unroll
                for (int e = 0; e < VEC; e++) d = fmaf(w[e], ov[e], d);
            }
            for (int off = G / 2; off; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            if (c < c1 && gl == 0) atomicAdd(x + c, fix(d) + cv[r]);
        }
    }
}
/* R rows a lane at a time. The clustered phase takes 2: its C / 8 rows a
 * block can outnumber what the block's lanes take at once (SmolLM2's 72:
 * 494.6 -> 488.9 us a token; medium's 64, one pass either way: 175.7 ->
 * 178.7; both compiled in, chosen by the rows: more spills). */
template <class T, int NW, int R>
static __device__ void rows_add(unsigned long long *x, const T *W, int64_t ld, int c0, int c1,
                                const float *o, int hd, resid_in<T> carry) {
    constexpr int VEC = vec16<T>::N;
    const int G = hd / VEC, lane = threadIdx.x & 31;
    if (hd % VEC == 0 && ld % VEC == 0 && G <= 32 && 32 % G == 0) {
        rows_add_vec<T, NW, R>(x, W, ld, c0, c1, o, G, carry);
        return;
    }
    for (int c = c0 + (threadIdx.x >> 5); c < c1; c += NW) {
        const T *row = W + c * ld;
        const unsigned long long cv = lane ? 0ull : carry.fixed(c);
        float d;
        warp_dots<T, 1>(&row, o, hd, &d);
        if (!lane) atomicAdd(x + c, fix(d) + cv);
    }
}

/* The partial (see attn_partial) of one key k with value v: o = v, m = its
 * score, l = 1. By one warp; q, k, v in shared memory. */
static __device__ void key_partial(const float *q, const float *k, const float *v, int hd, float scale,
                                   float *pp) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    for (int d = lane; d < hd; d += 32) s = fmaf(q[d], k[d], s);
    s = warp_sum(s) * scale;
    for (int d = lane; d < hd; d += 32) pp[d] = v[d];
    if (lane == 0) { pp[hd] = s; pp[hd + 1] = 1.f; }
}

/* B's unit: attention of query head h (q) over the layer's cache (kv) rows
 * [0, n), and, given knew, one more key (knew, vnew: the cluster path's
 * current position, not read back from the cache), then o_h times head
 * h's columns of Wo, rows [c0, c1), added into xo (with carry's rows). The
 * cache keys are split over the block's warps (one partial each, in
 * shared memory; the last warp takes the extra key), warp 0 combines them
 * into o_h. ps: NW (hd + 2) + hd floats of shared memory, qs: NW hd. */
template <class T, int NW, int R, bool OPT>
static __device__ void attend_project(const params &p, int l, int h, const float *q, int n,
                                      const float *knew, const float *vnew, int c0, int c1,
                                      unsigned long long *xo, resid_in<T> carry, float *qs,
                                      float *ps) {
    const int hd = p.hd, kvd = p.KV * hd, g = h / (p.H / p.KV), warp = threadIdx.x >> 5;
    /* keys per warp: a multiple of 16, as few as spread the context over
     * the warps (one V batch of attn_partial for 16 keys) */
    const int nw = knew ? NW - 1 : NW;
    const int per = max(16, ((n + nw - 1) / nw + 15) / 16 * 16), ns = (n + per - 1) / per;
    float *o = ps + NW * (hd + 2);
    if (warp < ns)
        attn_partial_any<T>(q, kv_row<T, OPT>(p, l, 0, false, g), kv_row<T, OPT>(p, l, 0, true, g), kvd, hd,
                            warp * per, min(n, warp * per + per), p.scale, qs + warp * hd,
                            ps + warp * (hd + 2));
    if (knew && warp == NW - 1) key_partial(q, knew, vnew, hd, p.scale, ps + ns * (hd + 2));
    __syncthreads();
    DEC_MARK(2);
    if (warp == 0) attn_combine(ps, ns + (knew != nullptr), hd, o);
    __syncthreads();
    DEC_MARK(3);
    const int od = wo_cols<OPT>(p);
    rows_add<T, NW, R>(xo, (const T *)p.wo + (int64_t)l * p.C * od + h * hd, od, c0, c1, o, hd, carry);
    __syncthreads();   /* ps and o are the next unit's */
    DEC_MARK(4);
}

/* B (fused): unit (h, j) per block, B's unit (attend_project) over the
 * cache rows of keys [0, pos], rows of share j; head 0 carries version 2l over. */
template <class T, int NW, bool OPT>
static __device__ void phase_attn_oproj(const params &p, int l, int tok, int pos, float *qs, float *ps) {
    const int C = p.C, J = oproj_shares(p), n = kv_keys<OPT>(p, l, pos);
    clear_row(p, 2 * l + 2);
    const resid_in<T> in = layer_in<T>(p, l, tok);
    for (int u = blockIdx.x; u < p.H * J; u += gridDim.x) {
        const int h = u / J, j = u % J;
        attend_project<T, NW, 1, OPT>(p, l, h, p.q + (int64_t)h * p.hd, n, nullptr, nullptr,
                              (int)((int64_t)C * j / J), (int)((int64_t)C * (j + 1) / J),
                              xrow(p, 2 * l + 1), h == 0 ? in : resid_in<T>{}, qs, ps);
    }
}

#if DEC_CLUSTERS
/* The cluster's exchange in phase_qkv_attn: head h's q and its KV group's
 * new k, v (3 hd floats). Each value goes by st.async into every block's
 * buf, which counts the bytes on that block's own mbarrier: a block waits
 * for its 3 hd values only (a cluster barrier with release semantics,
 * which would order the values, costs 0.5-0.8 us on an H100). */
struct qkv_mail {
    float *buf;        /* shared: q, k, v */
    uint64_t *bar;     /* shared */
    uint32_t parity;
    __device__ void init() {   /* once per launch: every block's barrier before any value */
        if (threadIdx.x == 0) {
            mbar_init(bar, 1);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        cg::this_cluster().sync();
        parity = 0;
    }
    __device__ void expect(uint32_t bytes) { if (threadIdx.x == 0) mbar_expect_tx(bar, bytes); }
    __device__ void send(uint32_t rank, int i, float v) {
        uint32_t a, b;
        asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_u32(buf + i)), "r"(rank));
        asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(b) : "r"(smem_u32(bar)), "r"(rank));
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                     ::"r"(a), "r"(__float_as_uint(v)), "r"(b) : "memory");
    }
    __device__ void wait() { mbar_wait(bar, parity); parity ^= 1; }
};

/* A and B in one phase, by thread-block clusters of cs blocks, one per
 * query head h (setup_t: a cluster for every head): the cluster computes
 * A's units of q_h and of its KV group's k and v (the group's first head's
 * cluster writes those to the cache), mails them to all its blocks, and
 * block j runs B's unit (h, share j of cs) with the current key from the
 * mail. One grid barrier a layer fewer; the k, v rows are computed once
 * per query head of their group. */
template <class T, int NW>
static __device__ void phase_qkv_attn(const params &p, int l, int tok, int pos, float *xs, float *qs,
                                      float *ps, qkv_mail &mail) {
    const int C = p.C, hd = p.hd, half = hd / 2, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cs = p.cluster, h = blockIdx.x / cs, rank = blockIdx.x % cs, g = h / (p.H / p.KV);
    clear_row(p, 2 * l + 2);
    if (h >= p.H) return;   /* a cluster without a head */
    const resid_in<T> in = layer_in<T>(p, l, tok);
    const float rs = load_normed<T>(xs, in, p.norms + (int64_t)2 * l * C, C, p.eps);
    DEC_MARK(0);
    mail.expect(3 * hd * sizeof(float));
    for (int u = rank * NW + warp; u < 3 * half; u += cs * NW) {
        const int s = u / half, i = u % half;   /* s: q, k, v */
        const T *rows[2];
        qkv_rows<T, false>(p, l, (s == 0 ? h : p.H + (s - 1) * p.KV + g) * half + i, rows);
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        d[0] *= rs;
        d[1] *= rs;
        if (s < 2) rope_pair(d[0], d[1], p.rope_cos[(int64_t)pos * half + i], p.rope_sin[(int64_t)pos * half + i]);
        if (lane < cs) {   /* lane r mails block r */
            mail.send(lane, s * hd + i, d[0]);
            mail.send(lane, s * hd + i + half, d[1]);
        }
        if (s > 0 && h % (p.H / p.KV) == 0 && lane == 31) {
            T *dst = kv_row<T, false>(p, l, pos, s == 2, g);
            dst[i] = fromf<T>(d[0]);
            dst[i + half] = fromf<T>(d[1]);
        }
    }
    /* this block's Wo rows, while the mail and the attention take their
     * time (at the barrier, with the QKV rows, they delayed its departure) */
    prefetch_oproj_share<T, NW, false>(p, l, h, rank, cs);
    DEC_MARK(1);
    mail.wait();
    DEC_MARK(9);
    attend_project<T, NW, 2, false>(p, l, h, mail.buf, pos, mail.buf + hd, mail.buf + 2 * hd,
                             (int)((int64_t)C * rank / cs), (int)((int64_t)C * (rank + 1) / cs),
                             xrow(p, 2 * l + 1), h == 0 ? in : resid_in<T>{}, qs, ps);
}
#endif

/* B1 (long contexts): (query head, context split) per warp; qs: NW * hd floats. */
template <class T, int NW, bool OPT>
static __device__ void phase_attn(const params &p, int l, int pos, float *qs) {
    const int hd = p.hd, kvd = p.KV * hd, grp = p.H / p.KV, n = kv_keys<OPT>(p, l, pos);
    int per;
    const int ns = attn_splits(n, &per);
    for (int it = gwarp<NW>(); it < p.H * ns; it += nwarps<NW>()) {
        const int h = it / ns, s = it % ns, start = s * per, end = min(n, start + per);
        attn_partial_any<T>(p.q + (int64_t)h * hd, kv_row<T, OPT>(p, l, 0, false, h / grp),
                            kv_row<T, OPT>(p, l, 0, true, h / grp), kvd, hd, start, end, p.scale,
                            qs + (threadIdx.x >> 5) * hd, p.part + ((int64_t)h * MAXSPLIT + s) * (hd + 2));
    }
}

/* B2 (long contexts): every block combines all heads' partials (a few KB)
 * into xs, then its rows of the out-projection make version 2l + 1 (each
 * row by one warp: no other writer). */
template <class T, int NW, bool OPT>
static __device__ void phase_oproj(const params &p, int l, int tok, int pos, float *xs) {
    const int C = p.C, hd = p.hd, lane = threadIdx.x & 31;
    int per;
    const int ns = attn_splits(kv_keys<OPT>(p, l, pos), &per);
    clear_row(p, 2 * l + 2);
    for (int h = threadIdx.x >> 5; h < p.H; h += NW)
        attn_combine(p.part + (int64_t)h * MAXSPLIT * (hd + 2), ns, hd, xs + h * hd);
    __syncthreads();
    const int od = wo_cols<OPT>(p);
    const T *W = (const T *)p.wo + (int64_t)l * C * od;
    const resid_in<T> in = layer_in<T>(p, l, tok);
    unsigned long long *x = xrow(p, 2 * l + 1);
    for (int r = gwarp<NW>(); r < C; r += nwarps<NW>()) {
        const T *row = W + (int64_t)r * od;
        float d;
        warp_dots<T, 1>(&row, xs, od, &d);
        if (!lane) x[r] = in.fixed(r) + fix(d);
    }
}

/* Width of D's column slices: acc holds NW of them. */
static __host__ __device__ __forceinline__ int ffn_slice(int C) { return C < 1024 ? (C + 7) / 8 * 8 : 1024; }

/* D: warp w of the grid owns rows u = w + k nwarps (k < maxu) of the FFN:
 * h_u = silu(gate_u . xs) * (up_u . xs) (relu2: relu(gate_u . xs)^2), then
 * h_u times row u of the transposed down projection. Per slice of C, each
 * warp writes its sum to acc, the block adds the warps' rows in a fixed
 * order and adds that into version 2l + 2 (fixed point; block 0 also
 * carries version 2l + 1 over, and, with embed skip, adds the token's
 * embedding times embed_skip to the next layer's input).
 * hs: NW * maxu floats, acc: NW * ffn_slice(C). */
template <class T, int NW, bool OPT>
static __device__ void phase_ffn(const params &p, int l, int tok, float *xs, float *hs, float *acc) {
    constexpr int VEC = vec16<T>::N;
    const int C = p.C, F = p.F, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    clear_row(p, 2 * l + 3);
    if (blockIdx.x * NW >= F && blockIdx.x != 0) return;   /* no rows here */
    const bool relu2 = OPT && p.lay[l].ffn == SJ_FFN_RELU2;
    const T *skip = OPT && p.embed_skip != 0.f && l + 1 < p.L && blockIdx.x == 0
                  ? (const T *)p.emb + (int64_t)tok * C : nullptr;
    const unsigned long long *xc = xrow(p, 2 * l + 1);
    unsigned long long *xn = xrow(p, 2 * l + 2);
    const float rs = load_normed<T>(xs, version<T>(p, 2 * l + 1), p.norms + (int64_t)(2 * l + 1) * C, C, p.eps);
    DEC_MARK(5);
    const T *D = (const T *)p.wdt + (int64_t)l * F * C;
    float *hw = hs + warp * p.maxu;
    int nu = 0;
    for (int u = gwarp<NW>(); u < F; u += nwarps<NW>(), nu++) {
        const T *rows[3];
        ffn_rows<T>(p, l, u, rows);
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        const float g = d[0] * rs;
        if (!lane) hw[nu] = (relu2 ? fmaxf(g, 0.f) * fmaxf(g, 0.f) : g / (1.0f + expf(-g))) * (d[1] * rs);
    }
    __syncwarp();
    DEC_MARK(6);
    const int S = ffn_slice(C);
    float *aw = acc + warp * S;
    for (int s0 = 0; s0 < C; s0 += S) {
        const int sn = min(S, C - s0);
        if (C % VEC == 0) {
            for (int e = lane * VEC; e < sn; e += 32 * VEC) {
                float r[VEC] = {};
                for (int k = 0; k < nu; k++) {
                    float w[VEC];
                    const int u = gwarp<NW>() + k * nwarps<NW>();
                    unpack16<T>(w, __ldg(reinterpret_cast<const uint4 *>(D + (int64_t)u * C + s0 + e)));
                    const float hk = hw[k];
#pragma unroll
                    for (int i = 0; i < VEC; i++) r[i] = fmaf(hk, w[i], r[i]);
                }
#pragma unroll
                for (int i = 0; i < VEC; i++) aw[e + i] = r[i];
            }
        } else {
            for (int e = lane; e < sn; e += 32) {
                float r = 0.f;
                for (int k = 0; k < nu; k++)
                    r = fmaf(hw[k], tof(D[(int64_t)(gwarp<NW>() + k * nwarps<NW>()) * C + s0 + e]), r);
                aw[e] = r;
            }
        }
        __syncthreads();
        DEC_MARK(7);
        for (int c = threadIdx.x; c < sn; c += blockDim.x) {
            float t = 0.f;
            for (int w = 0; w < NW; w++) t += acc[w * S + c];
            atomicAdd(xn + s0 + c, fix(t) + (blockIdx.x == 0 ? xc[s0 + c] : 0ull) +
                                   (skip ? fix(p.embed_skip * tof(skip[s0 + c])) : 0ull));
        }
        __syncthreads();   /* acc is the next slice's */
    }
    DEC_MARK(8);
}

enum { PF_QKV, PF_ATTN_OPROJ, PF_OPROJ, PF_FFN, PF_HEAD };

/* The small data phase ph of layer l reads once a token: its norm weights
 * and, for A (and B after it), RoPE row pos and the layer's KV cache rows
 * [0, pos) while the context is short (B fused; a long one B1 streams over
 * the whole grid). A model whose weights stream from HBM evicts them from
 * L2 between tokens; spread over the grid's warps. (H100, SmolLM2's shape:
 * 589 -> 564 us a token; medium 217 -> 206; a model held in L2, where
 * nothing is evicted, pays for the instructions: small 81 -> 84.) */
template <class T, int NW, bool OPT>
static __device__ void prefetch_small(const params &p, int ph, int l, int pos) {
    const int w = gwarp<NW>(), nw = nwarps<NW>();
    if (ph == PF_FFN) { if (w == 0) prefetch_l2(p.norms + (int64_t)(2 * l + 1) * p.C, p.C * 4); return; }
    if (ph == PF_HEAD) { if (w == 0) prefetch_l2(p.norms + (int64_t)2 * p.L * p.C, p.C * 4); return; }
    if (ph != PF_QKV) return;
    if (w == 0) prefetch_l2(p.norms + (int64_t)2 * l * p.C, p.C * 4);
    if (w == nw - 1) {
        prefetch_l2(p.rope_cos + (int64_t)pos * (p.hd / 2), p.hd / 2 * 4);
        prefetch_l2(p.rope_sin + (int64_t)pos * (p.hd / 2), p.hd / 2 * 4);
    }
    if (!attn_fused(p, pos)) return;
    const int64_t kvd = (int64_t)p.KV * p.hd, keys = OPT ? kv_keys<OPT>(p, l, pos) - 1 : pos,
                  bytes = keys * kvd * (int64_t)sizeof(T), nch = (bytes + 4095) / 4096;
    const char *K = (const char *)(OPT ? kv_row<T, OPT>(p, l, 0, false, 0) : (const T *)p.kc + (int64_t)l * p.max_ctx * kvd);
    const char *V = (const char *)(OPT ? kv_row<T, OPT>(p, l, 0, true, 0) : (const T *)p.vc + (int64_t)l * p.max_ctx * kvd);
    for (int64_t c = w - 1; c >= 0 && c < 2 * nch; c += nw) {
        const int64_t off = (c % nch) * 4096;
        prefetch_l2((c < nch ? K : V) + off, min((int64_t)4096, bytes - off));
    }
}

/* At a grid barrier: pull into L2 the first weight rows this warp (or,
 * for B, this block) will read in phase ph of layer l (of the step at
 * position pos), with the same unit mapping as the phase, so that their
 * HBM latency overlaps the barrier; and the phase's small data when the
 * model streams from HBM (16-warp blocks, setup). (Into L1 instead, every
 * row of the phase: measured no faster. One phase earlier: slower, the
 * prefetch then competes with the phase in between.) */
template <class T, int NW, bool OPT>
static __device__ void prefetch_phase(const params &p, int ph, int l, int pos) {
    if (NW == WARPS) prefetch_small<T, NW, OPT>(p, ph, l, pos);
    const int64_t C = p.C, F = p.F, es = sizeof(T);
    if (ph == PF_ATTN_OPROJ) {
        const int J = oproj_shares(p), u = blockIdx.x;
        if (u < p.H * J) prefetch_oproj_share<T, NW, OPT>(p, l, u / J, u % J, J);
        return;
    }
    if (ph == PF_QKV && qkv_attn_clustered(p, pos)) {
        /* the layer's QKV rows, spread over all blocks, not by the cluster
         * that reads them: 128 warps' rows in flight from one SM would
         * delay its own loads after the barrier (493.8 vs 495.3 us) */
        for (int u = (threadIdx.x >> 5) * gridDim.x + blockIdx.x; u < qkv_units(p); u += nwarps<NW>())
            prefetch_qkv_unit<T, OPT>(p, l, u);
        return;
    }
    for (int k = 0; k < 2; k++) {
        const int64_t u = gwarp<NW>() + (int64_t)k * nwarps<NW>();
        if (ph == PF_QKV) {
            if (u >= qkv_units(p)) return;
            prefetch_qkv_unit<T, OPT>(p, l, (int)u);
        } else if (ph == PF_OPROJ) {
            if (u >= C) return;
            const int64_t od = wo_cols<OPT>(p);
            prefetch_l2((const T *)p.wo + (int64_t)l * C * od + u * od, od * es);
        } else if (ph == PF_FFN) {
            if (u >= F) return;
            const T *rows[3];
            ffn_rows<T>(p, l, (int)u, rows);
            for (int r = 0; r < 3; r++) prefetch_l2(rows[r], C * es);
        } else if (ph == PF_HEAD) {
            for (int64_t r = 4 * u; r < 4 * u + 4 && r < p.V; r++)
                prefetch_l2((const T *)p.head + r * C, C * es);
        }
    }
}

/* (v, i) beats (bv, bi): larger value, ties to the smaller id (the host
 * sampler's greedy rule); NaN never wins. */
static __device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

/* F: four vocabulary rows per warp at a time (more loads in flight). */
template <class T, int NW>
static __device__ void phase_head(const params &p, float *xs) {
    __shared__ float sv[NW];
    __shared__ int si[NW];
    const int C = p.C, V = p.V, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    clear_row(p, 1);   /* for the next step's first layer */
    const float rs = load_normed<T>(xs, version<T>(p, 2 * p.L), p.norms + (int64_t)2 * p.L * C, C, p.eps);
    const T *W = (const T *)p.head;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int r0 = gwarp<NW>() * 4; r0 < V; r0 += nwarps<NW>() * 4) {
        const T *rows[4];
#pragma unroll
        for (int k = 0; k < 4; k++) rows[k] = W + (int64_t)min(r0 + k, V - 1) * C;
        float d[4];
        warp_dots<T, 4>(rows, xs, C, d);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (r0 + k < V) {
                d[k] *= rs;
                if (!lane) p.logits[r0 + k] = d[k];
                if (better(d[k], r0 + k, bv, bi)) { bv = d[k]; bi = r0 + k; }
            }
    }
    if (!lane) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < NW; w++)
            if (better(sv[w], si[w], bv, bi)) { bv = sv[w]; bi = si[w]; }
        p.best_v[blockIdx.x] = bv;
        p.best_i[blockIdx.x] = bi;
    }
    __syncthreads();   /* sv/si are read above before any later reuse */
}

/* G: one warp; the chosen token becomes the next step's input. */
static __device__ void phase_pick(const params &p, int nblocks, int step, int pos) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int b = lane; b < nblocks; b += 32)
        if (better(p.best_v[b], p.best_i[b], bv, bi)) { bv = p.best_v[b]; bi = p.best_i[b]; }
    for (int o = 16; o; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) {
        if (bi == INT_MAX) bi = 0;   /* every logit NaN: a valid id all the same */
        p.io[0] = bi;
        p.io[1] = pos + 1;
        p.out[step] = bi;
    }
}

/* Dynamic shared memory, in floats (each region a multiple of 4, so
 * 16-byte aligned): xs (max(C, F)), the per-warp query scratch qs and
 * partials ps of B, the per-warp h_u list hs and column sums acc of D,
 * the cluster path's mail (q, k, v). */
struct smem_map { int xs, qs, ps, hs, acc, mail, total; };
static __host__ __device__ __forceinline__ int r4(int n) { return (n + 3) / 4 * 4; }
static __host__ __device__ __forceinline__ smem_map smem_layout(const params &p, int NW) {
    smem_map m;
    m.xs = 0;
    m.qs = m.xs + r4(p.C > p.F ? p.C : p.F);
    m.ps = m.qs + r4(NW * p.hd);
    m.hs = m.ps + r4(NW * (p.hd + 2) + p.hd);
    m.acc = m.hs + r4(NW * p.maxu);
    m.mail = m.acc + NW * ffn_slice(p.C);
    m.total = m.mail + (p.cluster ? r4(3 * p.hd) : 0);
    return m;
}
size_t smem_bytes(const params &p) { return sizeof(float) * (size_t)smem_layout(p, p.warps).total; }

#if !DEC_CLUSTERS   /* never called there: setup asks for clusters on 9.x only */
struct qkv_mail { float *buf; uint64_t *bar; uint32_t parity; __device__ void init() {} };
template <class T, int NW>
static __device__ void phase_qkv_attn(const params &, int, int, int, float *, float *, float *, qkv_mail &) {}
#endif

/* The shared-memory regions of a step's block. */
struct block_smem {
    float *xs, *qs, *ps, *hs, *acc;
    qkv_mail mail;
    __device__ block_smem(const params &p, int NW, uint64_t *mail_bar) {
        extern __shared__ float4 smem4[];
        float *sm = reinterpret_cast<float *>(smem4);
        const smem_map m = smem_layout(p, NW);
        xs = sm + m.xs; qs = sm + m.qs; ps = sm + m.ps; hs = sm + m.hs; acc = sm + m.acc;
        mail = { sm + m.mail, mail_bar, 0 };
    }
};

/* One block per SM: at 8 warps that allows 255 registers a thread, and
 * saying so lets ptxas use them (167 instead of a self-imposed 128 and its
 * spills); 16 warps are held to 128 by the register file either way.
 * CL: launched in clusters, QKV and attention in one phase while B is
 * fused. Compiled apart: with the clustered phase's code in them, the
 * other kernels ran slower (SmolLM2's shape, clusters off: 531.0 vs 524.0
 * us a token; medium 198.3 vs 196.2; small, 8 warps: 79.3 vs 78.5).
 * OPT: the architecture options (p.lay), compiled apart for the same
 * reason: the plain model's kernels carry none of their code. */
template <class T, int NW, bool CL, bool OPT>
__global__ void __launch_bounds__(NW * 32, NW <= 8 ? 1 : 0) step_persistent(params p, int n_steps) {
    __shared__ uint64_t mail_bar;
    block_smem b(p, NW, &mail_bar);
    if (CL) b.mail.init();
    phase_barrier bar;
    trace_begin();
    /* A grid barrier that pulls the next phase's data into L2 while it
     * waits: the prefetches go out after this block's arrival, so they do
     * not delay it (issued before it: 3.5-5% slower on every shape). */
    auto sync_prefetching = [&](int ph, int l, int pos) {
        bar.arrive();
        prefetch_phase<T, NW, OPT>(p, ph, l, pos);
        bar.wait();
    };
    for (int step = 0; step < n_steps; step++) {
        const int tok = ((volatile int *)p.io)[0], pos = ((volatile int *)p.io)[1];
        for (int l = 0; l < p.L; l++) {
            if (CL && qkv_attn_clustered(p, pos)) {
                phase_qkv_attn<T, NW>(p, l, tok, pos, b.xs, b.qs, b.ps, b.mail);
            } else {
                if constexpr (OPT) phase_qkv_heads<T, NW>(p, l, tok, pos, b.xs, b.qs);
                else phase_qkv<T, NW>(p, l, tok, pos, b.xs);
                if (attn_fused(p, pos)) {
                    sync_prefetching(PF_ATTN_OPROJ, l, pos);
                    phase_attn_oproj<T, NW, OPT>(p, l, tok, pos, b.qs, b.ps);
                } else {
                    sync_prefetching(PF_OPROJ, l, pos);   /* B1 reads no weights: B2's wait through it */
                    phase_attn<T, NW, OPT>(p, l, pos, b.qs);
                    bar.sync();
                    phase_oproj<T, NW, OPT>(p, l, tok, pos, b.xs);
                }
            }
            sync_prefetching(PF_FFN, l, pos);
            phase_ffn<T, NW, OPT>(p, l, tok, b.xs, b.hs, b.acc);
            sync_prefetching(l + 1 < p.L ? PF_QKV : PF_HEAD, l + 1, pos);
        }
        phase_head<T, NW>(p, b.xs);
        sync_prefetching(PF_QKV, 0, pos + 1);
        if (blockIdx.x == 0) phase_pick(p, gridDim.x, step, pos);
        if (step + 1 < n_steps) bar.sync();
    }
    trace_end();
}

/* The same phases, one kernel each (ph: 0 A or A+B clustered, 1 B or B1,
 * 2 B2, 3 D, 4 F, each phase's kernel empty where the context makes it
 * so; G is step_pick). */
template <class T, int NW, bool CL, bool OPT>
__global__ void __launch_bounds__(NW * 32) step_phase(params p, int ph, int l) {
    __shared__ uint64_t mail_bar;
    block_smem b(p, NW, &mail_bar);
    const int tok = p.io[0], pos = p.io[1];
    const bool clustered = CL && qkv_attn_clustered(p, pos);
    switch (ph) {
    case 0:
        if (clustered) {
            b.mail.init();
            phase_qkv_attn<T, NW>(p, l, tok, pos, b.xs, b.qs, b.ps, b.mail);
        } else if constexpr (OPT) {
            phase_qkv_heads<T, NW>(p, l, tok, pos, b.xs, b.qs);
        } else {
            phase_qkv<T, NW>(p, l, tok, pos, b.xs);
        }
        break;
    case 1:
        if (clustered) break;
        if (attn_fused(p, pos)) phase_attn_oproj<T, NW, OPT>(p, l, tok, pos, b.qs, b.ps);
        else phase_attn<T, NW, OPT>(p, l, pos, b.qs);
        break;
    case 2: if (!attn_fused(p, pos)) phase_oproj<T, NW, OPT>(p, l, tok, pos, b.xs); break;
    case 3: phase_ffn<T, NW, OPT>(p, l, tok, b.xs, b.hs, b.acc); break;
    default: phase_head<T, NW>(p, b.xs); break;
    }
}

__global__ void step_pick(params p, int nblocks, int step) { phase_pick(p, nblocks, step, p.io[1]); }

/* Both kernels' launch: clusters of p.cluster blocks, if any; the
 * persistent one cooperative (all blocks co-resident). */
template <class K, class... A>
static cudaError_t launch(K kernel, const params &p, int grid, bool cooperative, cudaStream_t st, A... args) {
    cudaLaunchAttribute at[2];
    int na = 0;
    if (p.cluster) {
        at[na].id = cudaLaunchAttributeClusterDimension;
        at[na].val.clusterDim.x = p.cluster;
        at[na].val.clusterDim.y = at[na].val.clusterDim.z = 1;
        na++;
    }
    if (cooperative) {
        at[na].id = cudaLaunchAttributeCooperative;
        at[na].val.cooperative = 1;
        na++;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = p.warps * 32;
    cfg.dynamicSmemBytes = smem_bytes(p);
    cfg.stream = st;
    cfg.attrs = at;
    cfg.numAttrs = na;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* Raise the dynamic shared-memory limit of the kernels for blocks of NW
 * warps (clusters: 16-warp blocks only, and as large as the device allows). */
template <class T, int NW>
static cudaError_t allow_smem(size_t bytes) {
    cudaError_t e = cudaFuncSetAttribute(step_persistent<T, NW, false, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(step_phase<T, NW, false, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(step_persistent<T, NW, false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(step_phase<T, NW, false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if constexpr (NW == WARPS) {
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_persistent<T, NW, true, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_phase<T, NW, true, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_persistent<T, NW, true, false>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_phase<T, NW, true, false>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    }
    return e;
}

/* How many clusters of p.cluster blocks (16 warps, bytes of shared
 * memory each) fit at once, at most sms / p.cluster; 0: none. */
template <class T>
static int max_clusters(const params &p, int sms, size_t bytes) {
    cudaLaunchAttribute at;
    at.id = cudaLaunchAttributeClusterDimension;
    at.val.clusterDim.x = p.cluster;
    at.val.clusterDim.y = at.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = sms / p.cluster * p.cluster;
    cfg.blockDim = WARPS * 32;
    cfg.dynamicSmemBytes = bytes;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    int n = 0;
    if (!cfg.gridDim.x || allow_smem<T, WARPS>(bytes) != cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&n, (const void *)step_persistent<T, WARPS, true, false>, &cfg) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return min(n, sms / p.cluster);
}

/* The grid: one block per SM (the persistent kernel needs them all
 * co-resident), or, asked for clusters, as many as fit when every query
 * head gets one (one round of phase_qkv_attn; else none); D's rows per
 * warp on it; the dynamic shared-memory limit raised where needed.
 * *coop: the device can launch cooperative kernels. */
template <class T, int NW>
static sj_status setup_t(params &p, int sms, int cluster, int *grid, int *coop) {
    int dev = 0, occ = 0, c = 0, g = sms;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&c, cudaDevAttrCooperativeLaunch, dev);
    p.warps = NW;
    p.cluster = NW == WARPS && cluster <= sms ? cluster : 0;
    if (e == cudaSuccess && p.cluster) {
        p.maxu = (p.F + p.cluster * NW - 1) / (p.cluster * NW);   /* the most any grid of clusters needs */
        const int n = max_clusters<T>(p, sms, smem_bytes(p));
        if (n >= p.H) g = n * p.cluster;
        else p.cluster = 0;
    }
    p.maxu = (p.F + g * NW - 1) / (g * NW);
    const size_t smem = smem_bytes(p);
    if (e == cudaSuccess) e = allow_smem<T, NW>(smem);
    if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, p.lay ? step_persistent<T, NW, false, true>
                                                                     : step_persistent<T, NW, false, false>, NW * 32, smem);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (decode kernel setup, %zu bytes of shared memory)",
                       cudaGetErrorString(e), smem);
    }
    if (occ < 1)
        return sj_fail(SJ_ERR_ARG, "decode kernel: %zu bytes of shared memory per block do not fit "
                       "(model too wide)", smem);
    *grid = g;
    *coop = c;
    return SJ_OK;
}

/* Warps per block: a model whose weights sit in L2 (half of it, say) is
 * bound by the latency of each phase's block-wide steps, and 8 warps pay
 * less for them; a model streamed from HBM needs 16 warps' loads in flight
 * (H100: small preset 5.1x vs 4.7x PyTorch with 8; medium 3.9x vs 4.2x). */
sj_status setup(params &p, int is_bf16, int64_t weight_bytes, int *grid, int *coop) {
    int dev = 0, sms = 0, l2 = 0, major = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (decode kernel setup)", cudaGetErrorString(e));
    }
    const char *env = getenv("SMEDJAN_DECODE_GRID");   /* testing: fewer blocks than SMs */
    if (env && atoi(env) > 0 && atoi(env) < sms) sms = atoi(env);
    if (sms < 1) sms = 1;
    int nw = weight_bytes <= (int64_t)l2 / 2 ? 8 : WARPS;
    env = getenv("SMEDJAN_DECODE_WARPS");               /* testing: 8 or 16 */
    if (env && (atoi(env) == 8 || atoi(env) == 16)) nw = atoi(env);
    /* 16-warp blocks: QKV and attention in clusters of 8 (sm_90a code:
     * 9.x only; their 128 warps compute a head's q, k, v rows at once;
     * the plain model's only) */
    int cluster = major == 9 ? 8 : 0;
    env = getenv("SMEDJAN_DECODE_CLUSTER");             /* testing: blocks a cluster, 0 none */
    if (env && *env && atoi(env) >= 0 && atoi(env) <= 16) cluster = major == 9 ? atoi(env) : 0;
    if (p.lay) cluster = 0;
    if (is_bf16)
        return nw == 8 ? setup_t<bf16, 8>(p, sms, cluster, grid, coop) : setup_t<bf16, WARPS>(p, sms, cluster, grid, coop);
    return nw == 8 ? setup_t<float, 8>(p, sms, cluster, grid, coop) : setup_t<float, WARPS>(p, sms, cluster, grid, coop);
}

template <class T, int NW, bool CL, bool OPT>
static void enqueue_k(const params &p, int persistent, int n_steps, int grid, cudaStream_t st) {
    if (persistent) {
        CUDA_CHECK(launch(step_persistent<T, NW, CL, OPT>, p, grid, true, st, p, n_steps));
        return;
    }
    for (int step = 0; step < n_steps; step++) {
        for (int l = 0; l < p.L; l++)
            for (int ph = 0; ph < 4; ph++) CUDA_CHECK(launch(step_phase<T, NW, CL, OPT>, p, grid, false, st, p, ph, l));
        CUDA_CHECK(launch(step_phase<T, NW, CL, OPT>, p, grid, false, st, p, 4, 0));
        step_pick<<<1, 32, 0, st>>>(p, grid, step);
        LAUNCH_CHECK("step_pick");
    }
}
template <class T, int NW>
static void enqueue_t(const params &p, int persistent, int n_steps, int grid, cudaStream_t st) {
    if (p.lay) return enqueue_k<T, NW, false, true>(p, persistent, n_steps, grid, st);
    if constexpr (NW == WARPS)
        if (p.cluster) return enqueue_k<T, NW, true, false>(p, persistent, n_steps, grid, st);
    enqueue_k<T, NW, false, false>(p, persistent, n_steps, grid, st);
}

void enqueue(const params &p, int is_bf16, int persistent, int n_steps, int grid, cudaStream_t st) {
    if (is_bf16) (p.warps == 8 ? enqueue_t<bf16, 8> : enqueue_t<bf16, WARPS>)(p, persistent, n_steps, grid, st);
    else (p.warps == 8 ? enqueue_t<float, 8> : enqueue_t<float, WARPS>)(p, persistent, n_steps, grid, st);
}

}  // namespace dec
