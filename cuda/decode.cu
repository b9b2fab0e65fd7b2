/* decode.cu — one decode step (batch 1) of the GPU inference engine, as
 * seven phases per step, each a grid-wide loop over independent units:
 *
 *   per layer  A  RMSNorm (each block redoes the tiny sum of squares) + QKV
 *                 GEMV + RoPE, q to memory, k/v into the cache at pos
 *              B  attention partials: (KV head, context split) per warp
 *              C  combine the partials (each block, into shared memory) +
 *                 out-proj GEMV + residual add
 *              D  RMSNorm + gate|up GEMV + SwiGLU
 *              E  down GEMV + residual add
 *   then       F  final RMSNorm + LM-head GEMV, logits out, per-block argmax
 *              G  (one block) greedy token = argmax, position + 1
 *
 * The phases run either as ONE persistent cooperative kernel with a grid
 * barrier between phases (launch and drain cost paid once per step, or once
 * per n greedy steps), or as one kernel per phase (the fallback, captured as
 * a CUDA graph by the engine). Both call the same phase functions.
 * The step is latency-bound at these sizes: what matters is the number of
 * grid-wide dependencies (5 per layer) and the weight stream (each weight
 * byte read once per token, 16-byte loads, many rows in flight). */
#include "decode.cuh"
#include <cooperative_groups.h>
#include <limits.h>

namespace cg = cooperative_groups;

namespace dec {

/* xs = RMSNorm(src) * w, where src is x, or (layer 0) the token's embedding
 * row, which block 0 also writes to x: the residual stream starts there. */
template <class T>
static __device__ void load_normed(float *xs, float *x, const T *emb_row, const float *w, int C,
                                   float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = emb_row ? tof(emb_row[i]) : x[i];
        if (emb_row && blockIdx.x == 0) x[i] = v;
        xs[i] = v;
        ss += v * v;
    }
    const float rs = 1.0f / sqrtf(block_reduce<false>(ss) / (float)C + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x) xs[i] = xs[i] * rs * w[i];
    __syncthreads();
}

static __device__ __forceinline__ int gwarp(void) { return blockIdx.x * WARPS + (threadIdx.x >> 5); }
static __device__ __forceinline__ int nwarps(void) { return gridDim.x * WARPS; }

/* A: units are (head, i) pairs of rows i and i + hd/2, the two halves RoPE mixes. */
template <class T>
static __device__ void phase_qkv(const params &p, int l, int tok, int pos, float *xs) {
    const int C = p.C, hd = p.hd, half = hd / 2, kvd = p.KV * hd, lane = threadIdx.x & 31;
    load_normed<T>(xs, p.x, l == 0 ? (const T *)p.emb + (int64_t)tok * C : nullptr,
                   p.norms + (int64_t)2 * l * C, C, p.eps);
    const T *W = (const T *)p.wqkv + (int64_t)l * (p.H + 2 * p.KV) * hd * C;
    const int units = (p.H + 2 * p.KV) * half;
    for (int u = gwarp(); u < units; u += nwarps()) {
        const int g = u / half, i = u % half;
        const T *rows[2] = { W + (int64_t)(g * hd + i) * C, W + (int64_t)(g * hd + i + half) * C };
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        if (lane) continue;
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

/* B: (query head, context split) per warp; qs: WARPS * hd floats. */
template <class T>
static __device__ void phase_attn(const params &p, int l, int pos, float *qs) {
    const int hd = p.hd, kvd = p.KV * hd, grp = p.H / p.KV, n = pos + 1;
    int per;
    const int ns = attn_splits(n, &per);
    const T *K = (const T *)p.kc + (int64_t)l * p.max_ctx * kvd;
    const T *V = (const T *)p.vc + (int64_t)l * p.max_ctx * kvd;
    for (int it = gwarp(); it < p.H * ns; it += nwarps()) {
        const int h = it / ns, s = it % ns, start = s * per, end = min(n, start + per);
        attn_partial_any<T>(p.q + (int64_t)h * hd, K + (h / grp) * hd, V + (h / grp) * hd, kvd, hd,
                            start, end, p.scale, qs + (threadIdx.x >> 5) * hd,
                            p.part + ((int64_t)h * MAXSPLIT + s) * (hd + 2));
    }
}

/* C: every block combines all heads' partials (a few KB) into xs, then its
 * rows of the out-projection add into the residual. */
template <class T>
static __device__ void phase_oproj(const params &p, int l, int pos, float *xs) {
    const int C = p.C, hd = p.hd, lane = threadIdx.x & 31;
    int per;
    const int ns = attn_splits(pos + 1, &per);
    for (int h = threadIdx.x >> 5; h < p.H; h += WARPS)
        attn_combine(p.part + (int64_t)h * MAXSPLIT * (hd + 2), ns, hd, xs + h * hd);
    __syncthreads();
    const T *W = (const T *)p.wo + (int64_t)l * C * C;
    for (int r = gwarp(); r < C; r += nwarps()) {
        const T *row = W + (int64_t)r * C;
        float d;
        warp_dots<T, 1>(&row, xs, C, &d);
        if (!lane) p.x[r] += d;
    }
}

/* D: gate row u and up row u together; h = silu(gate) * up. */
template <class T>
static __device__ void phase_ffn_up(const params &p, int l, float *xs) {
    const int C = p.C, F = p.F, lane = threadIdx.x & 31;
    load_normed<T>(xs, p.x, (const T *)nullptr, p.norms + (int64_t)(2 * l + 1) * C, C, p.eps);
    const T *W = (const T *)p.wgu + (int64_t)l * 2 * F * C;
    for (int u = gwarp(); u < F; u += nwarps()) {
        const T *rows[2] = { W + (int64_t)u * C, W + (int64_t)(F + u) * C };
        float d[2];
        warp_dots<T, 2>(rows, xs, C, d);
        if (!lane) p.h[u] = d[0] / (1.0f + expf(-d[0])) * d[1];
    }
}

/* E: down-projection + residual. */
template <class T>
static __device__ void phase_ffn_down(const params &p, int l, float *xs) {
    const int C = p.C, F = p.F, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < F; i += blockDim.x) xs[i] = p.h[i];
    __syncthreads();
    const T *W = (const T *)p.wd + (int64_t)l * C * F;
    for (int r = gwarp(); r < C; r += nwarps()) {
        const T *row = W + (int64_t)r * F;
        float d;
        warp_dots<T, 1>(&row, xs, F, &d);
        if (!lane) p.x[r] += d;
    }
}

static __device__ __forceinline__ void prefetch_l2(const void *row, int64_t bytes) {
    for (int64_t off = (threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)row + off));
}

/* Before a grid barrier: pull into L2 the first weight rows this warp will
 * read in phase ph (0 A, 2 C, 3 D, 4 E, 5 F) of layer l, with the same unit
 * mapping as the phase, so that their HBM latency overlaps the barrier. */
template <class T>
static __device__ void prefetch_phase(const params &p, int ph, int l) {
    const int64_t C = p.C, F = p.F, hd = p.hd, half = p.hd / 2, es = sizeof(T);
    for (int k = 0; k < 2; k++) {
        const int64_t u = gwarp() + (int64_t)k * nwarps();
        if (ph == 0) {
            if (u >= (p.H + 2 * p.KV) * half) return;
            const T *W = (const T *)p.wqkv + (int64_t)l * (p.H + 2 * p.KV) * hd * C;
            prefetch_l2(W + ((u / half) * hd + u % half) * C, C * es);
            prefetch_l2(W + ((u / half) * hd + u % half + half) * C, C * es);
        } else if (ph == 2) {
            if (u >= C) return;
            prefetch_l2((const T *)p.wo + (int64_t)l * C * C + u * C, C * es);
        } else if (ph == 3) {
            if (u >= F) return;
            const T *W = (const T *)p.wgu + (int64_t)l * 2 * F * C;
            prefetch_l2(W + u * C, C * es);
            prefetch_l2(W + (F + u) * C, C * es);
        } else if (ph == 4) {
            if (u >= C) return;
            prefetch_l2((const T *)p.wd + (int64_t)l * C * F + u * F, F * es);
        } else if (ph == 5) {
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
template <class T>
static __device__ void phase_head(const params &p, float *xs) {
    __shared__ float sv[WARPS];
    __shared__ int si[WARPS];
    const int C = p.C, V = p.V, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    load_normed<T>(xs, p.x, (const T *)nullptr, p.norms + (int64_t)2 * p.L * C, C, p.eps);
    const T *W = (const T *)p.head;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int r0 = gwarp() * 4; r0 < V; r0 += nwarps() * 4) {
        const T *rows[4];
#pragma unroll
        for (int k = 0; k < 4; k++) rows[k] = W + (int64_t)min(r0 + k, V - 1) * C;
        float d[4];
        warp_dots<T, 4>(rows, xs, C, d);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (r0 + k < V) {
                if (!lane) p.logits[r0 + k] = d[k];
                if (better(d[k], r0 + k, bv, bi)) { bv = d[k]; bi = r0 + k; }
            }
    }
    if (!lane) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < WARPS; w++)
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

/* Dynamic shared memory: xs (max(C, F) floats, rounded to 4) then the
 * per-warp query scratch of phase B. */
static inline int xs_floats(const params &p) { return ((p.C > p.F ? p.C : p.F) + 3) / 4 * 4; }
size_t smem_bytes(const params &p) { return sizeof(float) * ((size_t)xs_floats(p) + (size_t)WARPS * p.hd); }

template <class T>
__global__ void __launch_bounds__(THREADS) step_persistent(params p, int n_steps, int xs_n) {
    extern __shared__ float4 smem4[];
    float *xs = reinterpret_cast<float *>(smem4), *qs = xs + xs_n;
    cg::grid_group grid = cg::this_grid();
    for (int step = 0; step < n_steps; step++) {
        const int tok = ((volatile int *)p.io)[0], pos = ((volatile int *)p.io)[1];
        for (int l = 0; l < p.L; l++) {
            phase_qkv<T>(p, l, tok, pos, xs);
            prefetch_phase<T>(p, 2, l);     /* B reads no weights: C's rows wait through it */
            grid.sync();
            phase_attn<T>(p, l, pos, qs);
            grid.sync();
            phase_oproj<T>(p, l, pos, xs);
            prefetch_phase<T>(p, 3, l);
            grid.sync();
            phase_ffn_up<T>(p, l, xs);
            prefetch_phase<T>(p, 4, l);
            grid.sync();
            phase_ffn_down<T>(p, l, xs);
            if (l + 1 < p.L) prefetch_phase<T>(p, 0, l + 1);
            else prefetch_phase<T>(p, 5, 0);
            grid.sync();
        }
        phase_head<T>(p, xs);
        prefetch_phase<T>(p, 0, 0);
        grid.sync();
        if (blockIdx.x == 0) phase_pick(p, gridDim.x, step, pos);
        if (step + 1 < n_steps) grid.sync();
    }
}

/* The same phases, one kernel each (ph: 0..5 = A..F; G is step_pick). */
template <class T>
__global__ void __launch_bounds__(THREADS) step_phase(params p, int ph, int l, int xs_n) {
    extern __shared__ float4 smem4[];
    float *xs = reinterpret_cast<float *>(smem4), *qs = xs + xs_n;
    const int tok = p.io[0], pos = p.io[1];
    switch (ph) {
    case 0: phase_qkv<T>(p, l, tok, pos, xs); break;
    case 1: phase_attn<T>(p, l, pos, qs); break;
    case 2: phase_oproj<T>(p, l, pos, xs); break;
    case 3: phase_ffn_up<T>(p, l, xs); break;
    case 4: phase_ffn_down<T>(p, l, xs); break;
    default: phase_head<T>(p, xs); break;
    }
}

__global__ void step_pick(params p, int nblocks, int step) { phase_pick(p, nblocks, step, p.io[1]); }

/* Raise the dynamic shared-memory limit where needed; blocks for the grid:
 * one per SM (the persistent kernel needs them all co-resident). *coop: the
 * device can launch cooperative kernels. */
template <class T>
static sj_status setup_t(const params &p, int *grid, int *coop) {
    const size_t smem = smem_bytes(p);
    int dev = 0, sms = 0, occ = 0, c = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&c, cudaDevAttrCooperativeLaunch, dev);
    if (e == cudaSuccess && smem > 48 * 1024) {
        e = cudaFuncSetAttribute(step_persistent<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(step_phase<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    }
    if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, step_persistent<T>, THREADS, smem);
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

sj_status setup(const params &p, int is_bf16, int *grid, int *coop) {
    return is_bf16 ? setup_t<bf16>(p, grid, coop) : setup_t<float>(p, grid, coop);
}

template <class T>
static void enqueue_t(const params &p, int persistent, int n_steps, int grid, cudaStream_t st) {
    const size_t smem = smem_bytes(p);
    int xs_n = xs_floats(p);
    if (persistent) {
        params pp = p;
        void *args[] = { &pp, &n_steps, &xs_n };
        CUDA_CHECK(cudaLaunchCooperativeKernel((const void *)step_persistent<T>, dim3(grid),
                                               dim3(THREADS), args, smem, st));
        return;
    }
    for (int step = 0; step < n_steps; step++) {
        for (int l = 0; l < p.L; l++)
            for (int ph = 0; ph < 5; ph++) {
                step_phase<T><<<grid, THREADS, smem, st>>>(p, ph, l, xs_n);
                LAUNCH_CHECK("step_phase");
            }
        step_phase<T><<<grid, THREADS, smem, st>>>(p, 5, 0, xs_n);
        LAUNCH_CHECK("step_phase head");
        step_pick<<<1, 32, 0, st>>>(p, grid, step);
        LAUNCH_CHECK("step_pick");
    }
}

void enqueue(const params &p, int is_bf16, int persistent, int n_steps, int grid, cudaStream_t st) {
    if (is_bf16) enqueue_t<bf16>(p, persistent, n_steps, grid, st);
    else enqueue_t<float>(p, persistent, n_steps, grid, st);
}

}  // namespace dec
