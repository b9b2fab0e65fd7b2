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
 * The phases run either as ONE persistent cooperative kernel with a grid
 * barrier between phases (launch and drain cost paid once per step, or once
 * per n greedy steps), or as one kernel per phase (the fallback, captured as
 * a CUDA graph by the engine). Both call the same phase functions.
 * The step is latency-bound at these sizes: what matters is the number of
 * grid-wide dependencies (3 per layer) and the weight stream (each weight
 * byte read once per token, 16-byte loads, many rows in flight). B and D
 * add partial vectors from many blocks into the residual: fixed-point
 * atomics (decode.cuh) keep that deterministic. */
#include "decode.cuh"
#include <cooperative_groups.h>
#include <limits.h>
#include <stdlib.h>

namespace cg = cooperative_groups;

namespace dec {

#ifdef DEC_TRACE
/* benchmarks/decode_probe.cu: per block, when it arrives at and leaves
 * each grid barrier of a launch (%globaltimer ns), barrier-major. */
__device__ unsigned long long *trace;
/* ... and, per block, the mean time from leaving the last grid barrier to
 * each DEC_MARK(id) inside a phase (thread 0's view): (NMARK, grid) ns. */
enum { NMARK = 9 };
__device__ unsigned long long *marks;
__shared__ unsigned long long mark_left, mark_sum[NMARK];
__shared__ unsigned mark_cnt[NMARK];
static __device__ __forceinline__ unsigned long long now_ns(void) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define DEC_MARK(id) do { if (threadIdx.x == 0) { mark_sum[id] += now_ns() - mark_left; mark_cnt[id]++; } } while (0)
#else
#define DEC_MARK(id) do { } while (0)
#endif

/* The grid barrier between phases of the persistent kernel, traced for
 * the probe. */
struct phase_barrier {
    cg::grid_group grid = cg::this_grid();
    int n = 0;
    __device__ __forceinline__ void stamp(int slot) {
#ifdef DEC_TRACE
        const unsigned long long t = now_ns();
        if (threadIdx.x == 0 && trace) trace[(int64_t)slot * gridDim.x + blockIdx.x] = t;
        if (threadIdx.x == 0) mark_left = t;
#endif
    }
    cg::grid_group::arrival_token token;
    __device__ __forceinline__ void arrive() {
        stamp(2 * n);
        token = grid.barrier_arrive();
    }
    __device__ __forceinline__ void wait() {
        grid.barrier_wait(cg::grid_group::arrival_token(token));
        stamp(2 * n + 1);
        n++;
    }
    __device__ __forceinline__ void sync() { arrive(); wait(); }
};

/* Row r (0 or 1) of the fixed-point residual stream. */
static __device__ __forceinline__ unsigned long long *xrow(const params &p, int r) {
    return p.x + (int64_t)(r & 1) * p.C;
}

/* RMSNorm with its scale left to the caller: xs = src * w and the return
 * value is 1 / rms(src), by which the caller multiplies its dot products
 * with xs. src is the residual x, or (layer 0) the token's embedding row,
 * which block 0 also writes to x: the residual stream starts there. One
 * block barrier: no pass over xs waits for the sum of squares. Calls are
 * a grid barrier apart (part[] is then free again). */
template <class T>
static __device__ float load_normed(float *xs, unsigned long long *x, const T *emb_row,
                                    const float *w, int C, float eps) {
    __shared__ float part[32];
    float ss = 0.f;
    auto load = [&](int i) { return emb_row ? tof(emb_row[i]) : unfix(x[i]); };
    auto take = [&](int i, float v, float wi) {
        if (emb_row && blockIdx.x == 0) x[i] = fix(v);
        xs[i] = v * wi;
        ss += v * v;
    };
    if (C > (int)blockDim.x && C <= 2 * (int)blockDim.x) {   /* both loads in flight at once
                                                              (SmolLM2: 530 -> 523 us a token) */
        float v[2], wv[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            v[k] = i < C ? load(i) : 0.f;
            wv[k] = i < C ? w[i] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i >= C) break;
            take(i, v[k], wv[k]);
        }
    } else {
        for (int i = threadIdx.x; i < C; i += blockDim.x) take(i, load(i), w[i]);
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
template <class T>
static __device__ __forceinline__ void qkv_rows(const params &p, int l, int u, const T **rows) {
    const int hd = p.hd, half = hd / 2, g = u / half, i = u % half;
    const T *W = (const T *)p.wqkv + (int64_t)l * (p.H + 2 * p.KV) * hd * p.C;
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

/* A: units are (head, i) pairs of rows (qkv_rows). The last block also
 * clears the residual row this layer's FFN sums into (nothing reads it
 * until then). */
template <class T, int NW>
static __device__ void phase_qkv(const params &p, int l, int tok, int pos, float *xs) {
    const int C = p.C, hd = p.hd, half = hd / 2, kvd = p.KV * hd, lane = threadIdx.x & 31;
    const float rs = load_normed<T>(xs, xrow(p, l), l == 0 ? (const T *)p.emb + (int64_t)tok * C : nullptr,
                                    p.norms + (int64_t)2 * l * C, C, p.eps);
    DEC_MARK(0);
    if (blockIdx.x == gridDim.x - 1)
        for (int i = threadIdx.x; i < C; i += blockDim.x) xrow(p, l + 1)[i] = 0;
    const int units = qkv_units(p);
    for (int u = gwarp<NW>(); u < units; u += nwarps<NW>()) {
        const T *rows[2];
        qkv_rows<T>(p, l, u, rows);
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
            const bool is_k = g < p.H + p.KV;
            T *dst = (T *)(is_k ? p.kc : p.vc) + ((int64_t)l * p.max_ctx + pos) * kvd +
                     (g - p.H - (is_k ? 0 : p.KV)) * hd;
            dst[i] = fromf<T>(d[0]);
            dst[i + half] = fromf<T>(d[1]);
        }
    }
    DEC_MARK(1);
}

/* B runs fused (one phase) while the context is short enough that every
 * block of a head redoing its attention costs less than a grid barrier. */
static __device__ __forceinline__ bool attn_fused(const params &p, int pos) { return pos < p.fuse_ctx; }

/* B's units: (head h, share j of the out-projection rows), J per head. */
static __device__ __forceinline__ int oproj_shares(const params &p) {
    return (int)gridDim.x >= p.H ? (int)gridDim.x / p.H : 1;
}

/* x[c] += dot(o, W[c * ld .. + hd)) for c in [c0, c1), by the block: G
 * lanes per row (one 16-byte load each), 32 / G rows per warp at a time,
 * fixed-point atomics (other heads add into the same rows). o: shared. */
template <class T, int NW>
static __device__ void rows_add(unsigned long long *x, const T *W, int64_t ld, int c0, int c1,
                                const float *o, int hd) {
    constexpr int VEC = vec16<T>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, G = hd / VEC;
    if (hd % VEC == 0 && ld % VEC == 0 && G <= 32 && 32 % G == 0) {
        const int rpw = 32 / G, sub = lane / G, gl = lane % G;
        float ov[VEC];
#pragma unroll
        for (int e = 0; e < VEC; e++) ov[e] = o[gl * VEC + e];
        for (int base = c0 + warp * rpw; base < c1; base += NW * rpw) {
            const int c = base + sub;
            float d = 0.f;
            if (c < c1) {
                float w[VEC];
                unpack16<T>(w, __ldg(reinterpret_cast<const uint4 *>(W + c * ld + gl * VEC)));
#pragma unroll
                for (int e = 0; e < VEC; e++) d = fmaf(w[e], ov[e], d);
            }
            for (int off = G / 2; off; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            if (c < c1 && gl == 0) atomicAdd(x + c, fix(d));
        }
    } else {
        for (int c = c0 + warp; c < c1; c += NW) {
            const T *row = W + c * ld;
            float d;
            warp_dots<T, 1>(&row, o, hd, &d);
            if (!lane) atomicAdd(x + c, fix(d));
        }
    }
}

/* B (fused): unit (h, j) per block. Warp w takes keys [w per, (w + 1) per)
 * of head h (one partial each, in shared memory), warp 0 combines them into
 * o_h, then the block adds o_h times head h's columns of Wo, rows of share
 * j, into the residual. ps: NW (hd + 2) + hd floats of shared memory. */
template <class T, int NW>
static __device__ void phase_attn_oproj(const params &p, int l, int pos, float *qs, float *ps) {
    const int C = p.C, hd = p.hd, kvd = p.KV * hd, grp = p.H / p.KV, n = pos + 1;
    const int warp = threadIdx.x >> 5, J = oproj_shares(p);
    /* keys per warp: a multiple of 16, as few as spread the context over
     * the block's warps (one V batch of attn_partial for 16 keys) */
    const int per = max(16, ((n + NW - 1) / NW + 15) / 16 * 16), ns = (n + per - 1) / per;
    const T *K = (const T *)p.kc + (int64_t)l * p.max_ctx * kvd;
    const T *V = (const T *)p.vc + (int64_t)l * p.max_ctx * kvd;
    const T *Wo = (const T *)p.wo + (int64_t)l * C * C;
    float *o = ps + NW * (hd + 2);
    for (int u = blockIdx.x; u < p.H * J; u += gridDim.x) {
        const int h = u / J, j = u % J;
        if (warp < ns)
            attn_partial_any<T>(p.q + (int64_t)h * hd, K + (h / grp) * hd, V + (h / grp) * hd, kvd,
                                hd, warp * per, min(n, warp * per + per), p.scale, qs + warp * hd,
                                ps + warp * (hd + 2));
        __syncthreads();
        DEC_MARK(2);
        if (warp == 0) attn_combine(ps, ns, hd, o);
        __syncthreads();
        DEC_MARK(3);
        rows_add<T, NW>(xrow(p, l), Wo + h * hd, C, (int)((int64_t)C * j / J),
                    (int)((int64_t)C * (j + 1) / J), o, hd);
        __syncthreads();   /* ps and o are the next unit's */
        DEC_MARK(4);
    }
}

/* B1 (long contexts): (query head, context split) per warp; qs: NW * hd floats. */
template <class T, int NW>
static __device__ void phase_attn(const params &p, int l, int pos, float *qs) {
    const int hd = p.hd, kvd = p.KV * hd, grp = p.H / p.KV, n = pos + 1;
    int per;
    const int ns = attn_splits(n, &per);
    const T *K = (const T *)p.kc + (int64_t)l * p.max_ctx * kvd;
    const T *V = (const T *)p.vc + (int64_t)l * p.max_ctx * kvd;
    for (int it = gwarp<NW>(); it < p.H * ns; it += nwarps<NW>()) {
        const int h = it / ns, s = it % ns, start = s * per, end = min(n, start + per);
        attn_partial_any<T>(p.q + (int64_t)h * hd, K + (h / grp) * hd, V + (h / grp) * hd, kvd, hd,
                            start, end, p.scale, qs + (threadIdx.x >> 5) * hd,
                            p.part + ((int64_t)h * MAXSPLIT + s) * (hd + 2));
    }
}

/* B2 (long contexts): every block combines all heads' partials (a few KB)
 * into xs, then its rows of the out-projection add into the residual (each
 * row by one warp: no other writer). */
template <class T, int NW>
static __device__ void phase_oproj(const params &p, int l, int pos, float *xs) {
    const int C = p.C, hd = p.hd, lane = threadIdx.x & 31;
    int per;
    const int ns = attn_splits(pos + 1, &per);
    for (int h = threadIdx.x >> 5; h < p.H; h += NW)
        attn_combine(p.part + (int64_t)h * MAXSPLIT * (hd + 2), ns, hd, xs + h * hd);
    __syncthreads();
    const T *W = (const T *)p.wo + (int64_t)l * C * C;
    unsigned long long *x = xrow(p, l);
    for (int r = gwarp<NW>(); r < C; r += nwarps<NW>()) {
        const T *row = W + (int64_t)r * C;
        float d;
        warp_dots<T, 1>(&row, xs, C, &d);
        if (!lane) x[r] += fix(d);
    }
}

/* Width of D's column slices: acc holds NW of them. */
static __host__ __device__ __forceinline__ int ffn_slice(int C) { return C < 1024 ? (C + 7) / 8 * 8 : 1024; }

/* D: warp w of the grid owns rows u = w + k nwarps (k < maxu) of the FFN:
 * h_u = silu(gate_u . xs) * (up_u . xs), then h_u times row u of the
 * transposed down projection. Per slice of C, each warp writes its sum to
 * acc, the block adds the warps' rows in a fixed order and adds that into
 * the next residual row (fixed point; block 0 also carries this layer's
 * residual over). hs: NW * maxu floats, acc: NW * ffn_slice(C). */
template <class T, int NW>
static __device__ void phase_ffn(const params &p, int l, float *xs, float *hs, float *acc) {
    constexpr int VEC = vec16<T>::N;
    const int C = p.C, F = p.F, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (blockIdx.x * NW >= F && blockIdx.x != 0) return;   /* no rows here */
    unsigned long long *xc = xrow(p, l), *xn = xrow(p, l + 1);
    const float rs = load_normed<T>(xs, xc, (const T *)nullptr, p.norms + (int64_t)(2 * l + 1) * C, C, p.eps);
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
        if (!lane) hw[nu] = g / (1.0f + expf(-g)) * (d[1] * rs);
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
            atomicAdd(xn + s0 + c, fix(t) + (blockIdx.x == 0 ? xc[s0 + c] : 0ull));
        }
        __syncthreads();   /* acc is the next slice's */
    }
    DEC_MARK(8);
}

static __device__ __forceinline__ void prefetch_l2(const void *row, int64_t bytes) {
    for (int64_t off = (threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)row + off));
}

enum { PF_QKV, PF_ATTN_OPROJ, PF_OPROJ, PF_FFN, PF_HEAD };

/* The small data phase ph of layer l reads once a token: its norm weights
 * and, for A (and B after it), RoPE row pos and the layer's KV cache rows
 * [0, pos) while the context is short (B fused; a long one B1 streams over
 * the whole grid). A model whose weights stream from HBM evicts them from
 * L2 between tokens; spread over the grid's warps. (H100, SmolLM2's shape:
 * 589 -> 564 us a token; medium 217 -> 206; a model held in L2, where
 * nothing is evicted, pays for the instructions: small 81 -> 84.) */
template <class T, int NW>
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
    const int64_t kvd = (int64_t)p.KV * p.hd, bytes = pos * kvd * (int64_t)sizeof(T), nch = (bytes + 4095) / 4096;
    const char *K = (const char *)((const T *)p.kc + (int64_t)l * p.max_ctx * kvd);
    const char *V = (const char *)((const T *)p.vc + (int64_t)l * p.max_ctx * kvd);
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
template <class T, int NW>
static __device__ void prefetch_phase(const params &p, int ph, int l, int pos) {
    if (NW == WARPS) prefetch_small<T, NW>(p, ph, l, pos);
    const int64_t C = p.C, F = p.F, hd = p.hd, es = sizeof(T);
    if (ph == PF_ATTN_OPROJ) {
        const int J = oproj_shares(p), u = blockIdx.x;
        if (u >= p.H * J) return;
        const int h = u / J, j = u % J;
        const T *W = (const T *)p.wo + (int64_t)l * C * C + h * hd;
        for (int64_t c = C * j / J + (threadIdx.x >> 5); c < C * (j + 1) / J; c += NW)
            prefetch_l2(W + c * C, hd * es);
        return;
    }
    for (int k = 0; k < 2; k++) {
        const int64_t u = gwarp<NW>() + (int64_t)k * nwarps<NW>();
        if (ph == PF_QKV) {
            if (u >= qkv_units(p)) return;
            const T *rows[2];
            qkv_rows<T>(p, l, (int)u, rows);
            prefetch_l2(rows[0], C * es);
            prefetch_l2(rows[1], C * es);
        } else if (ph == PF_OPROJ) {
            if (u >= C) return;
            prefetch_l2((const T *)p.wo + (int64_t)l * C * C + u * C, C * es);
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
    const float rs = load_normed<T>(xs, xrow(p, p.L), (const T *)nullptr, p.norms + (int64_t)2 * p.L * C, C, p.eps);
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
 * partials ps of B, the per-warp h_u list hs and column sums acc of D. */
struct smem_map { int xs, qs, ps, hs, acc, total; };
static __host__ __device__ __forceinline__ int r4(int n) { return (n + 3) / 4 * 4; }
static __host__ __device__ __forceinline__ smem_map smem_layout(const params &p, int NW) {
    smem_map m;
    m.xs = 0;
    m.qs = m.xs + r4(p.C > p.F ? p.C : p.F);
    m.ps = m.qs + r4(NW * p.hd);
    m.hs = m.ps + r4(NW * (p.hd + 2) + p.hd);
    m.acc = m.hs + r4(NW * p.maxu);
    m.total = m.acc + NW * ffn_slice(p.C);
    return m;
}
size_t smem_bytes(const params &p) { return sizeof(float) * (size_t)smem_layout(p, p.warps).total; }

/* One block per SM: at 8 warps that allows 255 registers a thread, and
 * saying so lets ptxas use them (167 instead of a self-imposed 128 and its
 * spills); 16 warps are held to 128 by the register file either way. */
template <class T, int NW>
__global__ void __launch_bounds__(NW * 32, NW <= 8 ? 1 : 0) step_persistent(params p, int n_steps) {
    extern __shared__ float4 smem4[];
    float *sm = reinterpret_cast<float *>(smem4);
    const smem_map m = smem_layout(p, NW);
    float *xs = sm + m.xs, *qs = sm + m.qs, *ps = sm + m.ps, *hs = sm + m.hs, *acc = sm + m.acc;
    phase_barrier bar;
#ifdef DEC_TRACE
    if (threadIdx.x < NMARK) { mark_sum[threadIdx.x] = 0; mark_cnt[threadIdx.x] = 0; }
    if (threadIdx.x == 0) mark_left = now_ns();
    __syncthreads();
#endif
    /* A grid barrier that pulls the next phase's data into L2 while it
     * waits: the prefetches go out after this block's arrival, so they do
     * not delay it (issued before it: 3.5-5% slower on every shape). */
    auto sync_prefetching = [&](int ph, int l, int pos) {
        bar.arrive();
        prefetch_phase<T, NW>(p, ph, l, pos);
        bar.wait();
    };
    for (int step = 0; step < n_steps; step++) {
        const int tok = ((volatile int *)p.io)[0], pos = ((volatile int *)p.io)[1];
        for (int l = 0; l < p.L; l++) {
            phase_qkv<T, NW>(p, l, tok, pos, xs);
            if (attn_fused(p, pos)) {
                sync_prefetching(PF_ATTN_OPROJ, l, pos);
                phase_attn_oproj<T, NW>(p, l, pos, qs, ps);
            } else {
                sync_prefetching(PF_OPROJ, l, pos);   /* B1 reads no weights: B2's wait through it */
                phase_attn<T, NW>(p, l, pos, qs);
                bar.sync();
                phase_oproj<T, NW>(p, l, pos, xs);
            }
            sync_prefetching(PF_FFN, l, pos);
            phase_ffn<T, NW>(p, l, xs, hs, acc);
            sync_prefetching(l + 1 < p.L ? PF_QKV : PF_HEAD, l + 1, pos);
        }
        phase_head<T, NW>(p, xs);
        sync_prefetching(PF_QKV, 0, pos + 1);
        if (blockIdx.x == 0) phase_pick(p, gridDim.x, step, pos);
        if (step + 1 < n_steps) bar.sync();
    }
#ifdef DEC_TRACE
    __syncthreads();
    if (marks && threadIdx.x < NMARK)
        marks[(int64_t)threadIdx.x * gridDim.x + blockIdx.x] =
            mark_cnt[threadIdx.x] ? mark_sum[threadIdx.x] / mark_cnt[threadIdx.x] : 0;
#endif
}

/* The same phases, one kernel each (ph: 0 A, 1 B or B1, 2 nothing or B2,
 * 3 D, 4 F; G is step_pick). */
template <class T, int NW>
__global__ void __launch_bounds__(NW * 32) step_phase(params p, int ph, int l) {
    extern __shared__ float4 smem4[];
    float *sm = reinterpret_cast<float *>(smem4);
    const smem_map m = smem_layout(p, NW);
    float *xs = sm + m.xs, *qs = sm + m.qs, *ps = sm + m.ps, *hs = sm + m.hs, *acc = sm + m.acc;
    const int tok = p.io[0], pos = p.io[1];
    switch (ph) {
    case 0: phase_qkv<T, NW>(p, l, tok, pos, xs); break;
    case 1:
        if (attn_fused(p, pos)) phase_attn_oproj<T, NW>(p, l, pos, qs, ps);
        else phase_attn<T, NW>(p, l, pos, qs);
        break;
    case 2: if (!attn_fused(p, pos)) phase_oproj<T, NW>(p, l, pos, xs); break;
    case 3: phase_ffn<T, NW>(p, l, xs, hs, acc); break;
    default: phase_head<T, NW>(p, xs); break;
    }
}

__global__ void step_pick(params p, int nblocks, int step) { phase_pick(p, nblocks, step, p.io[1]); }

/* Raise the dynamic shared-memory limit where needed; blocks for the grid:
 * one per SM (the persistent kernel needs them all co-resident). *coop: the
 * device can launch cooperative kernels. */
template <class T, int NW>
static sj_status setup_t(params &p, int sms, int *grid, int *coop) {
    int dev = 0, occ = 0, c = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&c, cudaDevAttrCooperativeLaunch, dev);
    p.warps = NW;
    p.maxu = (p.F + sms * NW - 1) / (sms * NW);   /* D's rows per warp on this grid */
    const size_t smem = smem_bytes(p);
    if (e == cudaSuccess && smem > 48 * 1024) {
        e = cudaFuncSetAttribute(step_persistent<T, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_phase<T, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    }
    if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, step_persistent<T, NW>, NW * 32, smem);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (decode kernel setup, %zu bytes of shared memory)",
                       cudaGetErrorString(e), smem);
    }
    if (occ < 1)
        return sj_fail(SJ_ERR_ARG, "decode kernel: %zu bytes of shared memory per block do not fit "
                       "(model too wide)", smem);
    *grid = sms;
    *coop = c;
    return SJ_OK;
}

/* Warps per block: a model whose weights sit in L2 (half of it, say) is
 * bound by the latency of each phase's block-wide steps, and 8 warps pay
 * less for them; a model streamed from HBM needs 16 warps' loads in flight
 * (H100: small preset 5.1x vs 4.7x PyTorch with 8; medium 3.9x vs 4.2x). */
sj_status setup(params &p, int is_bf16, int64_t weight_bytes, int *grid, int *coop) {
    int dev = 0, sms = 0, l2 = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
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
    if (is_bf16) return nw == 8 ? setup_t<bf16, 8>(p, sms, grid, coop) : setup_t<bf16, WARPS>(p, sms, grid, coop);
    return nw == 8 ? setup_t<float, 8>(p, sms, grid, coop) : setup_t<float, WARPS>(p, sms, grid, coop);
}

template <class T, int NW>
static void enqueue_t(const params &p, int persistent, int n_steps, int grid, cudaStream_t st) {
    const size_t smem = smem_bytes(p);
    if (persistent) {
        params pp = p;
        void *args[] = { &pp, &n_steps };
        CUDA_CHECK(cudaLaunchCooperativeKernel((const void *)step_persistent<T, NW>, dim3(grid),
                                               dim3(NW * 32), args, smem, st));
        return;
    }
    for (int step = 0; step < n_steps; step++) {
        for (int l = 0; l < p.L; l++)
            for (int ph = 0; ph < 4; ph++) {
                step_phase<T, NW><<<grid, NW * 32, smem, st>>>(p, ph, l);
                LAUNCH_CHECK("step_phase");
            }
        step_phase<T, NW><<<grid, NW * 32, smem, st>>>(p, 4, 0);
        LAUNCH_CHECK("step_phase head");
        step_pick<<<1, 32, 0, st>>>(p, grid, step);
        LAUNCH_CHECK("step_pick");
    }
}

void enqueue(const params &p, int is_bf16, int persistent, int n_steps, int grid, cudaStream_t st) {
    if (is_bf16) (p.warps == 8 ? enqueue_t<bf16, 8> : enqueue_t<bf16, WARPS>)(p, persistent, n_steps, grid, st);
    else (p.warps == 8 ? enqueue_t<float, 8> : enqueue_t<float, WARPS>)(p, persistent, n_steps, grid, st);
}

}  // namespace dec
