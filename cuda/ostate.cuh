/* ostate.cuh — the optimizers' state (csrc/ops/ostate.h) as the CUDA update
 * kernels load and store it. An elementwise rule runs blocks of
 * SJ_Q8_BLOCK (256) threads, one state block each in a grid-stride loop,
 * so that an 8-bit block's absmax is one block-wide max; every thread of a
 * block calls sj_state_store (it synchronises), in range or not. The codes
 * and the bf16 rounding are ostate.h's, so the bits are the CPU's for the
 * same f32 values. */
#pragma once
#include "common.cuh"

static __constant__ float sj_q8_maps[2][256] = { SJ_Q8_SIGNED_MAP, SJ_Q8_UNSIGNED_MAP };

/* The two maps in shared memory (the binary search reads data-dependent
 * entries: constant memory would serialise them); call at kernel start. */
struct sj_state_maps { float map[2][256]; };
static __device__ __forceinline__ void sj_state_maps_load(sj_state_maps *sm) {
    for (int i = threadIdx.x; i < 512; i += blockDim.x) sm->map[i >> 8][i & 255] = sj_q8_maps[i >> 8][i & 255];
    __syncthreads();
}

static __device__ __forceinline__ const float *sj_state_map(const sj_state_maps *sm,
                                                            const sj_state &s) {
    return sm->map[s.q8_signed ? 0 : 1];
}

// element i of the range (in range)
static __device__ __forceinline__ float sj_state_load(const sj_state &s, const sj_state_maps *sm,
                                                      int64_t i) {
    switch (s.dtype) {
    case SJ_STATE_BF16: return sj_bf16_value(((const uint16_t *)s.data)[i]);
    case SJ_STATE_Q8:
        return sj_state_map(sm, s)[((const uint8_t *)s.data)[i]] * s.absmax[i / SJ_Q8_BLOCK];
    default: return ((const float *)s.data)[i];
    }
}

/* Store x at element i (in: i is in range) of the block starting at
 * element base; all 256 threads of the block call it. */
static __device__ __forceinline__ void sj_state_store(const sj_state &s, const sj_state_maps *sm,
                                                      int64_t base, int64_t i, bool in, float x,
                                                      const sj_optim_hp *hp) {
    if (s.dtype == SJ_STATE_F32) {
        if (in) ((float *)s.data)[i] = x;
    } else if (s.dtype == SJ_STATE_BF16) {
        if (in) ((uint16_t *)s.data)[i] =
            sj_bf16_stochastic(x, sj_sr_bits(hp->state_seed, hp->step, s.index + i));
    } else {
        __shared__ float warp_max[SJ_Q8_BLOCK / 32];
        float m = in ? fabsf(x) : 0.0f;
        for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        __syncthreads();   /* warp_max may still be read by the previous store */
        if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
        __syncthreads();
        float absmax = 0.0f;
        for (int w = 0; w < SJ_Q8_BLOCK / 32; w++) absmax = fmaxf(absmax, warp_max[w]);
        if (threadIdx.x == 0) s.absmax[base / SJ_Q8_BLOCK] = absmax;
        if (in) ((uint8_t *)s.data)[i] = sj_q8_code(sj_state_map(sm, s), sj_q8_normalise(x, absmax));
    }
}
