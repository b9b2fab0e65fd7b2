/* decode.cuh — device code shared by the GPU inference engine's decode step
 * (decode.cu) and its prefill (infer.cu): the step's parameters, the warp
 * GEMV dot products, RoPE on a pair, and split ("flash-decoding") attention
 * of one query over a KV-cache range with its combine.
 *
 * Data written during a kernel (x, q, h, the KV cache, partials, tokens) is
 * read with plain loads, never __ldg / const __restrict__: the persistent
 * kernel reads it after a grid barrier, from other SMs' writes. Only the
 * weights (constant for the engine's life) go through the read-only path. */
#pragma once
#include "common.cuh"

namespace dec {

enum {
    WARPS = 16, THREADS = WARPS * 32,   /* prefill kernels; decode blocks: 8 or 16 warps (setup) */
    MAXSPLIT = 16,                      /* attention splits of the context per query head */
    MAXHD = 256,                        /* head_dim limit (8 f32 per lane in the PV sum) */
};

/* A layer's architecture options and KV cache (device memory, one per
 * layer; read only by the kernels compiled for options, see params.lay). */
struct layer_info {
    int64_t kv_off;                     /* its first cache element (K and V caches alike) */
    int ring;                           /* a sliding window's cache: position s at row
                                           s % ring (ring = window < max_ctx); 0: row s */
    int qk_norm, ffn;                   /* SJ_QK_NORM_*, SJ_FFN_* */
};

/* Everything a decode step reads and writes; passed by value. Matrices are
 * row-major (rows, cols) of T, all layers of one kind in one array. H and
 * KV count attention heads: with paired heads, half the projections'. */
struct params {
    int C, F, H, KV, hd, V, L, max_ctx;
    float eps, scale;                   /* RMSNorm eps; 1/sqrt(hd) */
    const void *emb, *head;             /* (V, C); head == emb when tied */
    const void *wqkv;                   /* (L, qkv_rows, C): q rows, k rows, v rows */
    const void *wo;                     /* (L, C, od) */
    const void *wgu;                    /* (L, 2F, C): gate rows, then up rows */
    const void *wdt;                    /* (L, F, C): the down projection transposed */
    const float *norms;                 /* (2L + 1, C): attn, ffn per layer, final */
    const float *rope_cos, *rope_sin;   /* (max_ctx, hd/2) */
    void *kc, *vc;                      /* per layer (its ring or max_ctx rows, KV hd) of T */
    unsigned long long *x;              /* (4, C) residual stream in fixed point (fix/unfix),
                                           its versions in turn (decode.cu, xrow) */
    float *q;                           /* (H hd) roped queries */
    float *h;                           /* (F) silu(gate) * up */
    float *logits;                      /* (V) */
    float *part;                        /* (H, MAXSPLIT, hd + 2): o, then m, l */
    float *best_v; int *best_i;         /* (gridDim.x) per-block argmax */
    int *io;                            /* [0] token in, [1] its position */
    int *out;                           /* (max_ctx) greedy tokens, one per step */
    int fuse_ctx;                       /* contexts up to this many keys: attention and
                                           out-projection in one phase (see decode.cu) */
    int warps;                          /* per decode block (setup: 8 or 16) */
    int maxu;                           /* FFN rows u per warp: ceil(F / (grid warps)) */
    int cluster;                        /* blocks a cluster for QKV + attention, 0: none (setup) */
    /* the architecture options (last: the plain model's kernels address
       the fields above as before they came) */
    int pair;                           /* projection heads per attention head (paired: 2) */
    int qkv_rows;                       /* (H + 2KV) pair hd: a layer's rows of wqkv */
    int od;                             /* H hd: attention's output, wo's columns */
    const layer_info *lay;              /* (L), or NULL: the plain model (no options in
                                           the kernels, which are then compiled without) */
    const float *qk_gain;               /* (L, 2, hd): q_norm, k_norm of weighted layers */
    float value_mix, embed_skip;        /* the config's */
    float *v0;                          /* (KV hd) layer 0's v of the token (value mix) */
};

/* The residual stream is summed from many blocks' partial vectors with
 * atomics; in 64-bit fixed point (2^-32 steps, range +-2^31) integer adds
 * give the same bits in any order, so a step is deterministic. */
static __device__ __forceinline__ unsigned long long fix(float v) {
    return (unsigned long long)__float2ll_rn(v * 4294967296.0f);
}
static __device__ __forceinline__ float unfix(unsigned long long q) {
    return __ll2float_rn((long long)q) * 2.3283064365386963e-10f;   /* 2^-32 */
}

/* Splits of a context of n keys: *per keys each (a multiple of 32), at most
 * MAXSPLIT of them. Decode and combine must agree, so one function. */
static __device__ __forceinline__ int attn_splits(int n, int *per) {
    int chunks = (n + 31) / 32;
    int ns = chunks < MAXSPLIT ? chunks : MAXSPLIT;
    int p = (chunks + ns - 1) / ns * 32;
    *per = p;
    return (n + p - 1) / p;
}

/* out[r] = dot(rows[r][0..n), xs[0..n)) for R rows, by one warp; xs in
 * shared memory, 16-byte aligned. 16-byte weight loads, the R rows' loads
 * of a stride issued before any is used, when n is a multiple of the
 * vector width; else scalar. The weights come from L2 (prefetched before
 * the grid barrier), so a stride costs one L2 latency. The loop stays
 * rolled: the persistent kernel pays for its code size too (two strides in
 * flight, unrolled, ran 5% slower: H100, SmolLM2 618 vs 588 us a token,
 * benchmarks/probes/decode_probe.cu). Bound: latency of the weight stream at
 * batch 1, then HBM bandwidth. */
template <class T, int R>
static __device__ __forceinline__ void warp_dots(const T *const *rows, const float *xs, int n,
                                                 float *out) {
    constexpr int VEC = vec16<T>::N, STEP = 32 * VEC;
    const int lane = threadIdx.x & 31;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    if (n % VEC == 0) {
#pragma unroll 1
        for (int k = lane * VEC; k < n; k += STEP) {
            uint4 w[R];
#pragma unroll
            for (int r = 0; r < R; r++) w[r] = __ldg(reinterpret_cast<const uint4 *>(rows[r] + k));
            float xv[VEC];
#pragma unroll
            for (int j = 0; j < VEC; j += 4) {
                float4 f = *reinterpret_cast<const float4 *>(xs + k + j);
                xv[j] = f.x; xv[j + 1] = f.y; xv[j + 2] = f.z; xv[j + 3] = f.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wf[VEC];
                unpack16<T>(wf, w[r]);
#pragma unroll
                for (int j = 0; j < VEC; j++) acc[r] = fmaf(wf[j], xv[j], acc[r]);
            }
        }
    } else {
        for (int k = lane; k < n; k += 32) {
            float xv = xs[k];
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] = fmaf(tof(rows[r][k]), xv, acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = warp_sum(acc[r]);
}

/* Rotate-half RoPE of the pair (a, b) = (v[i], v[i + hd/2]), as csrc/infer. */
static __device__ __forceinline__ void rope_pair(float &a, float &b, float cs, float sn) {
    const float x = a, y = b;
    a = x * cs - y * sn;
    b = y * cs + x * sn;
}

/* Attention of one query head over cache rows [start, end), by one warp,
 * as an unnormalised partial: m = max score, l = sum exp(score - m),
 * o = sum exp(score - m) v; written as pp[0..hd) = o, pp[hd] = m, pp[hd+1] = l.
 * q: (hd) f32; K, V: its KV head's first row, row stride kvd; qs: this
 * warp's shared scratch (hd floats). Lane i scores key p0 + i (its whole K
 * row), then the warp sums p v with lanes over the head dimension, several
 * rows' loads in flight at a time. HD: the head size at compile time (the loads
 * then unroll), or 0 for any even head size up to MAXHD.
 * Latency-bound (a few KB per warp): what matters is loads in flight. */
template <class T, int HD>
static __device__ void attn_partial(const float *q, const T *K, const T *V, int kvd, int hd_rt,
                                    int start, int end, float scale, float *qs, float *pp) {
    constexpr int VEC = vec16<T>::N;
    constexpr int NDL = HD ? (HD + 31) / 32 : MAXHD / 32;   /* head dims per lane in the PV sum */
    const int hd = HD ? HD : hd_rt;
    const int lane = threadIdx.x & 31;
    __syncwarp();
    for (int d = lane; d < hd; d += 32) qs[d] = q[d];
    __syncwarp();
    float m = -INFINITY, l = 0.f, o[NDL];
#pragma unroll
    for (int t = 0; t < NDL; t++) o[t] = 0.f;
    for (int p0 = start; p0 < end; p0 += 32) {
        const int p = p0 + lane;
        float s = -INFINITY;
        if (p < end) {
            const T *k = K + (int64_t)p * kvd;
            float acc = 0.f;
            if (HD && HD % VEC == 0) {
                constexpr int NV = HD ? HD / VEC : 1, B = NV < 8 ? NV : 8;   /* 8 loads in flight */
#pragma unroll
                for (int v0 = 0; v0 < NV; v0 += B) {
                    uint4 raw[B];
#pragma unroll
                    for (int b = 0; b < B; b++) raw[b] = ld16(k + (v0 + b) * VEC);
#pragma unroll
                    for (int b = 0; b < B; b++) {
                        float kf[VEC];
                        unpack16<T>(kf, raw[b]);
#pragma unroll
                        for (int e = 0; e < VEC; e++) acc = fmaf(qs[(v0 + b) * VEC + e], kf[e], acc);
                    }
                }
            } else if (hd % VEC == 0) {
                for (int d = 0; d < hd; d += VEC) {
                    float kf[VEC];
                    load_vec<T>(kf, k + d);
#pragma unroll
                    for (int e = 0; e < VEC; e++) acc = fmaf(qs[d + e], kf[e], acc);
                }
            } else {
                for (int d = 0; d < hd; d++) acc = fmaf(qs[d], tof(k[d]), acc);
            }
            s = acc * scale;
        }
        const float mn = fmaxf(m, warp_max(s));   /* finite: key p0 is always valid */
        const float e = p < end ? expf(s - mn) : 0.f;
        const float corr = expf(m - mn);           /* 0 on the first round (m = -inf) */
        l = l * corr + warp_sum(e);
#pragma unroll
        for (int t = 0; t < NDL; t++) o[t] *= corr;
        const int cnt = min(32, end - p0);
        constexpr int VB = NDL <= 2 ? 16 : NDL <= 4 ? 8 : 4;   /* V rows in flight (registers) */
        for (int i0 = 0; i0 < cnt; i0 += VB) {
            float vv[VB][NDL];
#pragma unroll
            for (int k = 0; k < VB; k++) {
                const T *v = V + (int64_t)(p0 + i0 + k) * kvd;
#pragma unroll
                for (int t = 0; t < NDL; t++) {
                    const int d = lane + 32 * t;
                    vv[k][t] = (i0 + k < cnt && d < hd) ? tof(v[d]) : 0.f;
                }
            }
#pragma unroll
            for (int k = 0; k < VB; k++) {
                const float pk = __shfl_sync(0xffffffffu, e, i0 + k);   /* 0 past cnt */
#pragma unroll
                for (int t = 0; t < NDL; t++) o[t] = fmaf(pk, vv[k][t], o[t]);
            }
        }
        m = mn;
    }
#pragma unroll
    for (int t = 0; t < NDL; t++) {
        const int d = lane + 32 * t;
        if (d < hd) pp[d] = o[t];
    }
    if (lane == 0) { pp[hd] = m; pp[hd + 1] = l; }
}

/* attn_partial with the head size dispatched to a compiled-in one when it is common. */
template <class T>
static __device__ void attn_partial_any(const float *q, const T *K, const T *V, int kvd, int hd,
                                        int start, int end, float scale, float *qs, float *pp) {
    switch (hd) {
    case 64: attn_partial<T, 64>(q, K, V, kvd, hd, start, end, scale, qs, pp); break;
    case 128: attn_partial<T, 128>(q, K, V, kvd, hd, start, end, scale, qs, pp); break;
    case 32: attn_partial<T, 32>(q, K, V, kvd, hd, start, end, scale, qs, pp); break;
    default: attn_partial<T, 0>(q, K, V, kvd, hd, start, end, scale, qs, pp); break;
    }
}

/* One head's attention output from its ns (<= MAXSPLIT <= 32) partials
 * (stride hd + 2), by one warp: out[d] = sum_s o_s[d] e^(m_s - M) / L,
 * L = sum_s l_s e^(m_s - M). Lane s holds split s's weight; every load is
 * issued at once (this sits on the critical path of a decode step). */
static __device__ __forceinline__ void attn_combine(const float *part, int ns, int hd,
                                                    float *out) {
    const int lane = threadIdx.x & 31, st = hd + 2;
    const float ms = lane < ns ? part[lane * st + hd] : -INFINITY;
    const float ls = lane < ns ? part[lane * st + hd + 1] : 0.f;
    const float M = warp_max(ms);
    const float ws = lane < ns ? expf(ms - M) : 0.f;
    const float inv = 1.0f / warp_sum(ls * ws);
    float w[MAXSPLIT];
#pragma unroll
    for (int s = 0; s < MAXSPLIT; s++) w[s] = __shfl_sync(0xffffffffu, ws, s);
    for (int d = lane; d < hd; d += 32) {
        float o[MAXSPLIT];
#pragma unroll
        for (int s = 0; s < MAXSPLIT; s++) o[s] = s < ns ? part[s * st + d] : 0.f;
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < MAXSPLIT; s++) acc = fmaf(o[s], w[s], acc);
        out[d] = acc * inv;
    }
}

/* decode.cu: dynamic shared memory of a step's blocks; kernel attributes,
 * the grid (*coop: cooperative launches possible), p.warps and p.maxu for
 * weights of weight_bytes; enqueue n_steps
 * greedy steps on st, as one persistent kernel or one kernel per phase. */
size_t smem_bytes(const params &p);
sj_status setup(params &p, int is_bf16, int64_t weight_bytes, int *grid, int *coop);
void enqueue(const params &p, int is_bf16, int persistent, int n_steps, int grid, cudaStream_t st);

}  // namespace dec
