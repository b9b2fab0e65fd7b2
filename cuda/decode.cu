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
#endif

/* The grid barrier between phases of the persistent kernel, traced for
 * the probe. */
struct phase_barrier {
    cg::grid_group grid = cg::this_grid();
    int n = 0;
    __device__ __forceinline__ void stamp(int slot) {
#ifdef DEC_TRACE
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (threadIdx.x == 0 && trace) trace[(int64_t)slot * gridDim.x + blockIdx.x] = t;
#endif
    }
    __device__ __forceinline__ void sync() {
        stamp(2 * n);
        grid.sync();
        stamp(2 * n + 1);
        n++;
    }
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
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = emb_row ? tof(emb_row[i]) : unfix(x[i]);
        if (emb_row && blockIdx.x == 0) x[i] = fix(v);
        xs[i] = v * w[i];
        ss += v * v;
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

/* A: units are (head, i) pairs of rows i and i + hd/2, the two halves RoPE
 * mixes. The last block also clears the residual row this layer's FFN
 * sums into (nothing reads it until then). */
template <class T, int NW>
static __device__ void phase_qkv(const params &p, int l, int tok, int pos, float *xs) {
    const int C = p.C, hd = p.hd, half = hd / 2, kvd = p.KV * hd, lane = threadIdx.x & 31;
    const float rs = load_normed<T>(xs, xrow(p, l), l == 0 ? (const T *)p.emb + (int64_t)tok * C : nullptr,
                                    p.norms + (int64_t)2 * l * C, C, p.eps);
    if (blockIdx.x == gridDim.x - 1)
        for (int i = threadIdx.x; i < C; i += blockDim.x) xrow(p, l + 1)[i] = 0;
    const T *W = (const T *)p.wqkv + (int64_t)l * (p.H + 2 * p.KV) * hd * C;
    const int units = (p.H + 2 * p.KV) * half;
    for (int u = gwarp<NW>(); u < units; u += nwarps<NW>()) {
        const int g = u / half, i = u % half;
        const T *rows[2] = { W + (int64_t)(g * hd + i) * C, W + (int64_t)(g * hd + i + half) * C };
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        if (lane) continue;
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
        if (warp == 0) attn_combine(ps, ns, hd, o);
        __syncthreads();
        rows_add<T, NW>(xrow(p, l), Wo + h * hd, C, (int)((int64_t)C * j / J),
                    (int)((int64_t)C * (j + 1) / J), o, hd);
        __syncthreads();   /* ps and o are the next unit's */
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
    const T *W = (const T *)p.wgu + (int64_t)l * 2 * F * C;
    const T *D = (const T *)p.wdt + (int64_t)l * F * C;
    float *hw = hs + warp * p.maxu;
    int nu = 0;
    for (int u = gwarp<NW>(); u < F; u += nwarps<NW>(), nu++) {
        const T *rows[2] = { W + (int64_t)u * C, W + (int64_t)(F + u) * C };
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        const float g = d[0] * rs;
        if (!lane) hw[nu] = g / (1.0f + expf(-g)) * (d[1] * rs);
    }
    __syncwarp();
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
        for (int c = threadIdx.x; c < sn; c += blockDim.x) {
            float t = 0.f;
            for (int w = 0; w < NW; w++) t += acc[w * S + c];
            atomicAdd(xn + s0 + c, fix(t) + (blockIdx.x == 0 ? xc[s0 + c] : 0ull));
        }
        __syncthreads();   /* acc is the next slice's */
    }
}

static __device__ __forceinline__ void prefetch_l2(const void *row, int64_t bytes) {
    for (int64_t off = (threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)row + off));
}

enum { PF_QKV, PF_ATTN_OPROJ, PF_OPROJ, PF_FFN, PF_HEAD };

/* Before a grid barrier: pull into L2 the first weight rows this warp (or,
 * for B, this block) will read in phase ph of layer l, with the same unit
 * mapping as the phase, so that their HBM latency overlaps the barrier.
 * (Into L1 instead, every row of the phase: measured no faster.) */
template <class T, int NW>
static __device__ void prefetch_phase(const params &p, int ph, int l) {
    const int64_t C = p.C, F = p.F, hd = p.hd, half = p.hd / 2, es = sizeof(T);
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
            if (u >= (p.H + 2 * p.KV) * half) return;
            const T *W = (const T *)p.wqkv + (int64_t)l * (p.H + 2 * p.KV) * hd * C;
            prefetch_l2(W + ((u / half) * hd + u % half) * C, C * es);
            prefetch_l2(W + ((u / half) * hd + u % half + half) * C, C * es);
        } else if (ph == PF_OPROJ) {
            if (u >= C) return;
            prefetch_l2((const T *)p.wo + (int64_t)l * C * C + u * C, C * es);
        } else if (ph == PF_FFN) {
            if (u >= F) return;
            const T *W = (const T *)p.wgu + (int64_t)l * 2 * F * C;
            prefetch_l2(W + u * C, C * es);
            prefetch_l2(W + (F + u) * C, C * es);
            prefetch_l2((const T *)p.wdt + (int64_t)l * F * C + u * C, C * es);
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
    for (int step = 0; step < n_steps; step++) {
        const int tok = ((volatile int *)p.io)[0], pos = ((volatile int *)p.io)[1];
        for (int l = 0; l < p.L; l++) {
            phase_qkv<T, NW>(p, l, tok, pos, xs);
            if (attn_fused(p, pos)) {
                prefetch_phase<T, NW>(p, PF_ATTN_OPROJ, l);
                bar.sync();
                phase_attn_oproj<T, NW>(p, l, pos, qs, ps);
            } else {
                prefetch_phase<T, NW>(p, PF_OPROJ, l);   /* B1 reads no weights: B2's wait through it */
                bar.sync();
                phase_attn<T, NW>(p, l, pos, qs);
                bar.sync();
                phase_oproj<T, NW>(p, l, pos, xs);
            }
            prefetch_phase<T, NW>(p, PF_FFN, l);
            bar.sync();
            phase_ffn<T, NW>(p, l, xs, hs, acc);
            if (l + 1 < p.L) prefetch_phase<T, NW>(p, PF_QKV, l + 1);
            else prefetch_phase<T, NW>(p, PF_HEAD, 0);
            bar.sync();
        }
        phase_head<T, NW>(p, xs);
        prefetch_phase<T, NW>(p, PF_QKV, 0);
        bar.sync();
        if (blockIdx.x == 0) phase_pick(p, gridDim.x, step, pos);
        if (step + 1 < n_steps) bar.sync();
    }
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
