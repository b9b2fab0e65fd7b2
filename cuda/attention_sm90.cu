/* attention_sm90.cu — causal attention, optionally within a sliding window
 * (attention.cuh), on Hopper tensor cores (wgmma), head_dim 64, bf16 or f16:
 * forward and the two backward kernels with the tiles of attention.cu's
 * mma.sync kernels, and their results bit for bit
 * (benchmarks/probes/attention_sm90_check.cu compares them); those stay the
 * kernels everywhere else.
 *
 * One CTA = 64 query rows of one (batch, head): a warpgroup of consumers
 * (warps 0-3, 16 rows each as in the wgmma accumulator layout) and one
 * producer warp. The producer TMA-copies the Q tile once and K and V tiles
 * of 64 keys through a ring of STAGES stages (128-byte swizzle); per key
 * tile the consumers compute S = Q K^T (wgmma, both operands in shared
 * memory), the online softmax in registers (only the diagonal tile and
 * those the window's edge crosses are masked),
 * then O += P V with P straight from registers (wgmma's register A
 * operand: S's accumulator layout is P's fragment layout) and V read
 * transposed from its row-major tile. Small CTAs, three per SM: one CTA's
 * softmax runs while another's products do. H100, bf16 (benchmarks/probes/
 * attention_sm90_check.cu): forward 1.46x the mma.sync kernel at T=512
 * (178 TF/s), 1.56x at T=1024 (242 TF/s); backward 1.26x and 1.35x.
 *
 * Requirements (checked; else the caller uses the mma.sync kernels): an
 * sm_90 device, head_dim 64, 16-byte aligned tensors. */
#include "attention.cuh"
#include "kernels.h"
#include "sm90.cuh"
#include <type_traits>

namespace {

/* 64 x 64 tiles as in fwd_mma, so the two give the same bits (measured on
 * the H100: 128-key tiles, two CTAs per SM, were 5-10% slower than three
 * CTAs of these). */
constexpr int HD = 64, BQ = 64, BKV = 64, STAGES = 2;
constexpr int Q_BYTES = BQ * HD * 2, KV_BYTES = BKV * HD * 2;
static_assert(BQ == BKV, "one tensor map (64-row boxes) serves Q, K, V and dO tiles");
static_assert(BQ == attn::TILE, "the window's tiles are attention.cuh's");
constexpr size_t SMEM = Q_BYTES + (size_t)STAGES * 2 * KV_BYTES + (2 * STAGES + 1) * 8;
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

/* qkv: (B*T, (H + 2KV) * 64) through map_qkv (64 x 64 boxes); out: (B, T,
 * H*64); lse: (B, H, T). grid (ceil(T/64), B*H), 160 threads. */
template <class T>
__global__ void __launch_bounds__(160, 3)
attn_fwd_sm90_k(const __grid_constant__ CUtensorMap map_qkv, T *out, float *lse, int T_, int H,
                int KV, int window) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char *q_s = smem, *kv_s = smem + Q_BYTES;   /* stage s: K, then V */
    uint64_t *full = (uint64_t *)(kv_s + STAGES * 2 * KV_BYTES), *empty = full + STAGES,
             *q_full = empty + STAGES;
    /* the last query tiles see the most keys: start them first */
    const int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
    const int kvh = h / (H / KV), q0 = qt * BQ;
    /* key tiles from the window's first to the tile's last row */
    const int kt0 = attn::first_key_tile(qt, window), n_kt = (q0 + BQ - 1) / BKV + 1 - kt0;
    const int64_t row0 = (int64_t)b * T_;
    ring_init(full, STAGES, 1, 4, 1);   /* then q_full; every consumer warp hands a stage back */
    __syncthreads();
    if (threadIdx.x >= 128) {   /* the producer warp: one thread issues every copy */
        if (threadIdx.x != 128) return;
        mbar_expect_tx(q_full, Q_BYTES);
        tma_load(q_s, &map_qkv, h * HD, (int)(row0 + q0), q_full);
        for (int i = 0; i < n_kt; i++) {
            const int s = i % STAGES, kt = kt0 + i;
            mbar_wait(&empty[s], ((i / STAGES) & 1) ^ 1);
            unsigned char *st = kv_s + s * 2 * KV_BYTES;
            mbar_expect_tx(&full[s], 2 * KV_BYTES);
            tma_load(st, &map_qkv, (H + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
            tma_load(st + KV_BYTES, &map_qkv, (H + KV + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
        }
        return;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;   /* this thread's two rows */
    const float sl2 = LOG2E_F * 0.125f;                       /* log2(e) / sqrt(64) */
    float o[32], s_acc[BKV / 2];
#pragma unroll
    for (int i = 0; i < 32; i++) o[i] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
    mbar_wait(q_full, 0);
    const uint64_t dq = desc_sw128(q_s);
    for (int i = 0; i < n_kt; i++) {
        const int s = i % STAGES, kt = kt0 + i;
        mbar_wait(&full[s], (i / STAGES) & 1);
        const unsigned char *k_s = kv_s + s * 2 * KV_BYTES, *v_s = k_s + KV_BYTES;
        const uint64_t dk = desc_sw128(k_s), dv = desc_sw128_mn(v_s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) wgmma<BKV, T>(s_acc, dq + 2 * kk, dk + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<BKV / 2>(s_acc);
        /* scores in log2 units; keys past a row or before its window masked */
        const bool masked = !attn::tile_unmasked(qt, kt, window);
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < BKV / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = kt * BKV + 8 * j + 2 * t + e;
                float a = s_acc[4 * j + e] * sl2, c = s_acc[4 * j + 2 + e] * sl2;
                if (masked && !attn::visible(r_lo, key, window)) a = -INFINITY;
                if (masked && !attn::visible(r_hi, key, window)) c = -INFINITY;
                s_acc[4 * j + e] = a;
                s_acc[4 * j + 2 + e] = c;
                mx_lo = fmaxf(mx_lo, a);
                mx_hi = fmaxf(mx_hi, c);
            }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        /* a row whose window starts in a later tile has seen no key yet:
         * it keeps m = -inf, l = 0, o = 0 (fwd_mma's arithmetic, bit for bit) */
        const float z_lo = mn_lo == -INFINITY ? 0.f : mn_lo, z_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
        const float c_lo = exp2f(m_lo - z_lo), c_hi = exp2f(m_hi - z_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float ls_lo = 0.f, ls_hi = 0.f;
        uint32_t pa[BKV / 16][4];
#pragma unroll
        for (int j = 0; j < BKV / 8; j++) {
            const float p0 = exp2f(s_acc[4 * j] - z_lo), p1 = exp2f(s_acc[4 * j + 1] - z_lo);
            const float p2 = exp2f(s_acc[4 * j + 2] - z_hi), p3 = exp2f(s_acc[4 * j + 3] - z_hi);
            ls_lo += p0 + p1;
            ls_hi += p2 + p3;
            /* keys 16kk..16kk+7 (j even) and +8.. (j odd): one A fragment */
            pa[j / 2][(j & 1) * 2] = pack2<T>(p0, p1);
            pa[j / 2][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
        }
        l_lo = l_lo * c_lo + ls_lo;
        l_hi = l_hi * c_hi + ls_hi;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            o[4 * j] *= c_lo; o[4 * j + 1] *= c_lo;
            o[4 * j + 2] *= c_hi; o[4 * j + 3] *= c_hi;
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++)   /* 16 keys: two 8-row groups of V, 2048 bytes */
            wgmma_rs_tb<T>(o, pa[kk], dv + kk * (2048 >> 4), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(o);
        if (lane == 0) mbar_arrive(&empty[s]);
    }
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const float i_lo = 1.0f / l_lo, i_hi = 1.0f / l_hi;
    const int64_t orow = (int64_t)H * HD;
    T *O = out + row0 * orow + h * HD;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        const int c = 8 * j + 2 * t;
        if (r_lo < T_) *(uint32_t *)(O + r_lo * orow + c) = pack2<T>(o[4 * j] * i_lo, o[4 * j + 1] * i_lo);
        if (r_hi < T_) *(uint32_t *)(O + r_hi * orow + c) = pack2<T>(o[4 * j + 2] * i_hi, o[4 * j + 3] * i_hi);
    }
    if (t == 0) {
        float *L = lse + ((int64_t)b * H + h) * T_;
        if (r_lo < T_) L[r_lo] = m_lo * LN2_F + logf(l_lo);
        if (r_hi < T_) L[r_hi] = m_hi * LN2_F + logf(l_hi);
    }
#endif
}

/* Backward, two kernels as in attention.cu (no atomics: deterministic),
 * each the forward's shape: a consumer warpgroup of 64 rows and a producer
 * warp streaming 64-row tiles through STAGES stages. Rows of a tile past
 * T_ (the next batch's, or zeros past the end) are masked explicitly.
 * D = rowsum(dO * O) and lse: (B, H, T) f32. */

/* dK, dV of 64 keys of one KV head over its query heads and the query tiles
 * that see them:
 * S^T = K Q^T and dP^T = V dO^T from shared memory, then dV += P^T dO and
 * dK += dS^T Q with P^T, dS^T from registers. grid (ceil(T/64), B*KV). */
template <class T>
__global__ void __launch_bounds__(160, 2)
attn_dkv_sm90_k(const __grid_constant__ CUtensorMap map_qkv, const __grid_constant__ CUtensorMap map_do,
                T *dqkv, const float *D, const float *lse, int T_, int H, int KV, int window,
                int accum) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char *k_s = smem, *v_s = smem + Q_BYTES, *st_s = smem + 2 * Q_BYTES;   /* stage: Q, dO */
    float *stats = (float *)(st_s + STAGES * 2 * Q_BYTES);   /* stage: lse (log2 units), D */
    uint64_t *full = (uint64_t *)(stats + STAGES * 2 * BQ), *empty = full + STAGES,
             *kv_full = empty + STAGES;
    const int kt = blockIdx.x, b = blockIdx.y / KV, kvh = blockIdx.y % KV, grp = H / KV;
    const int n_qt = attn::last_query_tile(kt, (T_ + BQ - 1) / BQ, window) - kt + 1;
    const int n_steps = grp * n_qt;   /* (head, query tile) */
    const int64_t row0 = (int64_t)b * T_;
    ring_init(full, STAGES, 32, 4, 1);   /* full: the producer warp, tiles and statistics */
    __syncthreads();
    if (threadIdx.x >= 128) {   /* the producer warp: lane 0 copies tiles, all copy statistics */
        const int lane = threadIdx.x - 128;
        if (lane == 0) {
            mbar_expect_tx(kv_full, 2 * Q_BYTES);
            tma_load(k_s, &map_qkv, (H + kvh) * HD, (int)(row0 + kt * BKV), kv_full);
            tma_load(v_s, &map_qkv, (H + KV + kvh) * HD, (int)(row0 + kt * BKV), kv_full);
        }
        for (int i = 0; i < n_steps; i++) {
            const int s = i % STAGES, h = kvh * grp + i / n_qt, qt = kt + i % n_qt;
            mbar_wait(&empty[s], ((i / STAGES) & 1) ^ 1);
            const float *Lg = lse + ((int64_t)b * H + h) * T_, *Dg = D + ((int64_t)b * H + h) * T_;
            for (int r = lane; r < BQ; r += 32) {   /* rows past T_: zero, and masked anyway */
                const int q = qt * BQ + r;
                stats[s * 2 * BQ + r] = q < T_ ? Lg[q] * LOG2E_F : 0.f;
                stats[s * 2 * BQ + BQ + r] = q < T_ ? Dg[q] : 0.f;
            }
            if (lane == 0) {
                unsigned char *st = st_s + s * 2 * Q_BYTES;
                mbar_expect_tx(&full[s], 2 * Q_BYTES);
                tma_load(st, &map_qkv, h * HD, (int)(row0 + qt * BQ), &full[s]);
                tma_load(st + Q_BYTES, &map_do, h * HD, (int)(row0 + qt * BQ), &full[s]);
            } else {
                mbar_arrive(&full[s]);
            }
        }
        return;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int k_lo = kt * BKV + warp * 16 + g, k_hi = k_lo + 8;   /* this thread's two keys */
    const float scale = 0.125f, sl2 = scale * LOG2E_F;               /* 1/sqrt(64) */
    float dk[32], dv[32];
#pragma unroll
    for (int i = 0; i < 32; i++) dk[i] = dv[i] = 0.f;
    mbar_wait(kv_full, 0);
    const uint64_t dks = desc_sw128(k_s), dvs = desc_sw128(v_s);
    for (int i = 0; i < n_steps; i++) {
        const int s = i % STAGES, qt = kt + i % n_qt;
        mbar_wait(&full[s], (i / STAGES) & 1);
        const float *lq = stats + s * 2 * BQ, *dq = lq + BQ;
        const unsigned char *q_t = st_s + s * 2 * Q_BYTES, *do_t = q_t + Q_BYTES;
        const uint64_t dqd = desc_sw128(q_t), ddo = desc_sw128(do_t);
        float st[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) wgmma<64, T>(st, dks + 2 * kk, dqd + 2 * kk, kk > 0);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) wgmma<64, T>(dp, dvs + 2 * kk, ddo + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(st);
        fence_regs<32>(dp);
        const bool masked = !attn::tile_unmasked(qt, kt, window);
        uint32_t pa[4][4], sa[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = 8 * j + 2 * t + (e & 1), q = qt * BQ + c;
                const int key = e < 2 ? k_lo : k_hi;
                p[e] = q >= T_ || (masked && !attn::visible(q, key, window))
                           ? 0.f : exp2f(st[4 * j + e] * sl2 - lq[c]);
                ds[e] = p[e] * (dp[4 * j + e] - dq[c]);   /* dS^T without the scale */
            }
            pa[j / 2][(j & 1) * 2] = pack2<T>(p[0], p[1]);
            pa[j / 2][(j & 1) * 2 + 1] = pack2<T>(p[2], p[3]);
            sa[j / 2][(j & 1) * 2] = pack2<T>(ds[0], ds[1]);
            sa[j / 2][(j & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {   /* 16 queries: 2048 bytes of dO, Q */
            wgmma_rs_tb<T>(dv, pa[kk], desc_sw128_mn(do_t) + kk * (2048 >> 4), 1);
            wgmma_rs_tb<T>(dk, sa[kk], desc_sw128_mn(q_t) + kk * (2048 >> 4), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(dv);
        fence_regs<32>(dk);
        if (lane == 0) mbar_arrive(&empty[s]);
    }
    const int64_t rs = (int64_t)(H + 2 * KV) * HD;
    T *dK = dqkv + row0 * rs + (H + kvh) * HD, *dV = dqkv + row0 * rs + (H + KV + kvh) * HD;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = e < 2 ? k_lo : k_hi, c = 8 * j + 2 * t + (e & 1);
            if (key >= T_) continue;
            put(dK + key * rs + c, dk[4 * j + e] * scale, accum);
            put(dV + key * rs + c, dv[4 * j + e], accum);
        }
#endif
}

/* dQ of 64 query rows of one head over the forward's key tiles: S = Q K^T
 * and dP = dO V^T from shared memory, dQ += dS K with dS from registers.
 * grid (ceil(T/64), B*H). */
template <class T>
__global__ void __launch_bounds__(160, 3)
attn_dq_sm90_k(const __grid_constant__ CUtensorMap map_qkv, const __grid_constant__ CUtensorMap map_do,
               T *dqkv, const float *D, const float *lse, int T_, int H, int KV, int window,
               int accum) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char *q_s = smem, *do_s = smem + Q_BYTES, *st_s = smem + 2 * Q_BYTES;   /* stage: K, V */
    uint64_t *full = (uint64_t *)(st_s + STAGES * 2 * KV_BYTES), *empty = full + STAGES,
             *q_full = empty + STAGES;
    const int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
    const int kvh = h / (H / KV), kt0 = attn::first_key_tile(qt, window), n_kt = qt + 1 - kt0;
    const int64_t row0 = (int64_t)b * T_;
    ring_init(full, STAGES, 1, 4, 1);
    __syncthreads();
    if (threadIdx.x >= 128) {
        if (threadIdx.x != 128) return;
        mbar_expect_tx(q_full, 2 * Q_BYTES);
        tma_load(q_s, &map_qkv, h * HD, (int)(row0 + qt * BQ), q_full);
        tma_load(do_s, &map_do, h * HD, (int)(row0 + qt * BQ), q_full);
        for (int i = 0; i < n_kt; i++) {
            const int s = i % STAGES, kt = kt0 + i;
            mbar_wait(&empty[s], ((i / STAGES) & 1) ^ 1);
            unsigned char *st = st_s + s * 2 * KV_BYTES;
            mbar_expect_tx(&full[s], 2 * KV_BYTES);
            tma_load(st, &map_qkv, (H + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
            tma_load(st + KV_BYTES, &map_qkv, (H + KV + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
        }
        return;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r_lo = qt * BQ + warp * 16 + g, r_hi = r_lo + 8;
    const float scale = 0.125f, sl2 = scale * LOG2E_F;
    const float *Lg = lse + ((int64_t)b * H + h) * T_, *Dg = D + ((int64_t)b * H + h) * T_;
    const float l_lo = r_lo < T_ ? Lg[r_lo] * LOG2E_F : 0.f, l_hi = r_hi < T_ ? Lg[r_hi] * LOG2E_F : 0.f;
    const float d_lo = r_lo < T_ ? Dg[r_lo] : 0.f, d_hi = r_hi < T_ ? Dg[r_hi] : 0.f;
    float dq[32];
#pragma unroll
    for (int i = 0; i < 32; i++) dq[i] = 0.f;
    mbar_wait(q_full, 0);
    const uint64_t dqd = desc_sw128(q_s), ddo = desc_sw128(do_s);
    for (int i = 0; i < n_kt; i++) {
        const int s = i % STAGES, kt = kt0 + i;
        mbar_wait(&full[s], (i / STAGES) & 1);
        const unsigned char *k_t = st_s + s * 2 * KV_BYTES, *v_t = k_t + KV_BYTES;
        float sc[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
            wgmma<64, T>(sc, dqd + 2 * kk, desc_sw128(k_t) + 2 * kk, kk > 0);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
            wgmma<64, T>(dp, ddo + 2 * kk, desc_sw128(v_t) + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(sc);
        fence_regs<32>(dp);
        const bool masked = !attn::tile_unmasked(qt, kt, window);
        uint32_t sa[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float ds[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kt * BKV + 8 * j + 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
                const float p = masked && !attn::visible(row, key, window)
                                    ? 0.f : exp2f(sc[4 * j + e] * sl2 - (e < 2 ? l_lo : l_hi));
                ds[e] = p * (dp[4 * j + e] - (e < 2 ? d_lo : d_hi));
            }
            sa[j / 2][(j & 1) * 2] = pack2<T>(ds[0], ds[1]);
            sa[j / 2][(j & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++)
            wgmma_rs_tb<T>(dq, sa[kk], desc_sw128_mn(k_t) + kk * (2048 >> 4), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<32>(dq);
        if (lane == 0) mbar_arrive(&empty[s]);
    }
    const int64_t rs = (int64_t)(H + 2 * KV) * HD;
    T *dQ = dqkv + row0 * rs + h * HD;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = e < 2 ? r_lo : r_hi, c = 8 * j + 2 * t + (e & 1);
            if (row < T_) put(dQ + row * rs + c, dq[4 * j + e] * scale, accum);
        }
#endif
}

template <class T>
bool attn_fwd_sm90(T *out, float *lse, const T *qkv, int B, int T_, int H, int KV, int hd, int window) {
    const int64_t rs = (int64_t)(H + 2 * KV) * hd;
    if (hd != HD || !sm90_usable() || !aligned16(qkv) || !aligned16(out)) return false;
    CUtensorMap mq;   /* Q, K and V tiles alike: 64 rows x 64 columns */
    if (!sm90_map(&mq, qkv, (int64_t)B * T_, rs, rs, BQ, HD, !std::is_same<T, bf16>::value))
        return false;
    sm90_smem<attn_fwd_sm90_k<T>>(SMEM);
    attn_fwd_sm90_k<T><<<dim3((T_ + BQ - 1) / BQ, B * H), 160, SMEM, sj_stream()>>>(mq, out, lse, T_, H, KV,
                                                                                   window);
    LAUNCH_CHECK("attention_forward (sm90)");
    return true;
}

/* dK, dV then dQ of B batches (D from attn_rowdot_k); false where it does not apply. */
template <class T>
bool attn_bwd_sm90(T *dqkv, const T *dout, const T *qkv, const float *D, const float *lse, int B,
                   int T_, int H, int KV, int hd, int window, int accum) {
    const int64_t rs = (int64_t)(H + 2 * KV) * hd, orow = (int64_t)H * hd;
    if (hd != HD || !sm90_usable() || !aligned16(qkv) || !aligned16(dout) || !aligned16(dqkv))
        return false;
    CUtensorMap mq, mdo;
    const bool f16 = !std::is_same<T, bf16>::value;
    if (!sm90_map(&mq, qkv, (int64_t)B * T_, rs, rs, BQ, HD, f16) ||
        !sm90_map(&mdo, dout, (int64_t)B * T_, orow, orow, BQ, HD, f16))
        return false;
    constexpr size_t DKV_SMEM = 2 * Q_BYTES + (size_t)STAGES * 2 * Q_BYTES + STAGES * 2 * BQ * 4 +
                                (2 * STAGES + 1) * 8;
    constexpr size_t DQ_SMEM = 2 * Q_BYTES + (size_t)STAGES * 2 * KV_BYTES + (2 * STAGES + 1) * 8;
    sm90_smem<attn_dkv_sm90_k<T>>(DKV_SMEM);
    sm90_smem<attn_dq_sm90_k<T>>(DQ_SMEM);
    const unsigned nt = (unsigned)((T_ + BQ - 1) / BQ);
    attn_dkv_sm90_k<T><<<dim3(nt, B * KV), 160, DKV_SMEM, sj_stream()>>>(mq, mdo, dqkv, D, lse, T_, H, KV,
                                                                         window, accum);
    LAUNCH_CHECK("attention_backward dkv (sm90)");
    attn_dq_sm90_k<T><<<dim3(nt, B * H), 160, DQ_SMEM, sj_stream()>>>(mq, mdo, dqkv, D, lse, T_, H, KV,
                                                                      window, accum);
    LAUNCH_CHECK("attention_backward dq (sm90)");
    return true;
}

}  // namespace

extern "C" int sj_cuda_attention_forward_sm90_bf16(void *out, float *lse, const void *qkv, int B,
                                                  int T_, int H, int KV, int hd, int window) {
    return attn_fwd_sm90((bf16 *)out, lse, (const bf16 *)qkv, B, T_, H, KV, hd, window);
}
extern "C" int sj_cuda_attention_forward_sm90_f16(void *out, float *lse, const void *qkv, int B,
                                                 int T_, int H, int KV, int hd, int window) {
    return attn_fwd_sm90((f16 *)out, lse, (const f16 *)qkv, B, T_, H, KV, hd, window);
}
extern "C" int sj_cuda_attention_backward_sm90_bf16(void *dqkv, const void *dout, const void *qkv,
                                                   const float *D, const float *lse, int B, int T_,
                                                   int H, int KV, int hd, int window, int accum) {
    return attn_bwd_sm90((bf16 *)dqkv, (const bf16 *)dout, (const bf16 *)qkv, D, lse, B, T_, H, KV, hd,
                         window, accum);
}
extern "C" int sj_cuda_attention_backward_sm90_f16(void *dqkv, const void *dout, const void *qkv,
                                                  const float *D, const float *lse, int B, int T_,
                                                  int H, int KV, int hd, int window, int accum) {
    return attn_bwd_sm90((f16 *)dqkv, (const f16 *)dout, (const f16 *)qkv, D, lse, B, T_, H, KV, hd,
                         window, accum);
}
