/* attention_sm90.cu — the causal attention forward on Hopper tensor cores
 * (wgmma), head_dim 64, bf16 or f16; the same results as fwd_mma in
 * attention.cu (out and the log-sum-exp of every row), which stays the
 * kernel everywhere else and for the backward.
 *
 * One CTA = 64 query rows of one (batch, head): a warpgroup of consumers
 * (warps 0-3, 16 rows each as in the wgmma accumulator layout) and one
 * producer warp. The producer TMA-copies the Q tile once and K and V tiles
 * of 64 keys through a ring of STAGES stages (128-byte swizzle); per key
 * tile the consumers compute S = Q K^T (wgmma, both operands in shared
 * memory), the online softmax in registers (only the last tile is masked),
 * then O += P V with P straight from registers (wgmma's register A
 * operand: S's accumulator layout is P's fragment layout) and V read
 * transposed from its row-major tile. Small CTAs, three per SM: one CTA's
 * softmax runs while another's products do. H100, bf16 (benchmarks/
 * attention_sm90_check.cu): 1.46x fwd_mma at T=512 (182 TF/s), 1.57x at
 * T=1024 (241 TF/s).
 *
 * Requirements (checked; else the caller uses fwd_mma): an sm_90 device,
 * head_dim 64, rows of qkv 16-byte aligned. */
#include "kernels.h"
#include "sm90.cuh"
#include <type_traits>

namespace {

/* 64 x 64 tiles as in fwd_mma, so the two give the same bits (measured on
 * the H100: 128-key tiles, two CTAs per SM, were 5-10% slower than three
 * CTAs of these). */
constexpr int HD = 64, BQ = 64, BKV = 64, STAGES = 2;
constexpr int Q_BYTES = BQ * HD * 2, KV_BYTES = BKV * HD * 2;
constexpr size_t SMEM = Q_BYTES + (size_t)STAGES * 2 * KV_BYTES + (2 * STAGES + 1) * 8;
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

/* qkv: (B*T, (H + 2KV) * 64) through two maps (boxes of 64 and 128 rows);
 * out: (B, T, H*64); lse: (B, H, T). grid (ceil(T/64), B*H), 160 threads. */
template <class T>
__global__ void __launch_bounds__(160, 3)
attn_fwd_sm90_k(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_kv,
                T *out, float *lse, int T_, int H, int KV) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char *q_s = smem, *kv_s = smem + Q_BYTES;   /* stage s: K, then V */
    uint64_t *full = (uint64_t *)(kv_s + STAGES * 2 * KV_BYTES), *empty = full + STAGES,
             *q_full = empty + STAGES;
    /* the last query tiles see the most keys: start them first */
    const int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
    const int kvh = h / (H / KV), q0 = qt * BQ;
    const int n_kt = (q0 + BQ - 1) / BKV + 1;   /* key tiles up to the tile's last row */
    const int64_t row0 = (int64_t)b * T_;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 4);   /* every consumer warp hands the stage back */
        }
        mbar_init(q_full, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x >= 128) {   /* the producer warp: one thread issues every copy */
        if (threadIdx.x != 128) return;
        mbar_expect_tx(q_full, Q_BYTES);
        tma_load(q_s, &map_q, h * HD, (int)(row0 + q0), q_full);
        for (int kt = 0; kt < n_kt; kt++) {
            const int s = kt % STAGES;
            mbar_wait(&empty[s], ((kt / STAGES) & 1) ^ 1);
            unsigned char *st = kv_s + s * 2 * KV_BYTES;
            mbar_expect_tx(&full[s], 2 * KV_BYTES);
            tma_load(st, &map_kv, (H + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
            tma_load(st + KV_BYTES, &map_kv, (H + KV + kvh) * HD, (int)(row0 + kt * BKV), &full[s]);
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
    for (int kt = 0; kt < n_kt; kt++) {
        const int s = kt % STAGES;
        mbar_wait(&full[s], (kt / STAGES) & 1);
        const unsigned char *k_s = kv_s + s * 2 * KV_BYTES, *v_s = k_s + KV_BYTES;
        const uint64_t dk = desc_sw128(k_s), dv = desc_sw128_mn(v_s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) wgmma<BKV, T>(s_acc, dq + 2 * kk, dk + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs<BKV / 2>(s_acc);
        /* scores in log2 units; keys past a row masked (only the last tile has any) */
        const bool last = kt == n_kt - 1;
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < BKV / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = kt * BKV + 8 * j + 2 * t + e;
                float a = s_acc[4 * j + e] * sl2, c = s_acc[4 * j + 2 + e] * sl2;
                if (last && key > r_lo) a = -INFINITY;
                if (last && key > r_hi) c = -INFINITY;
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
        /* every row sees key 0 in its first tile: the maxima are finite */
        const float c_lo = exp2f(m_lo - mn_lo), c_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float ls_lo = 0.f, ls_hi = 0.f;
        uint32_t pa[BKV / 16][4];
#pragma unroll
        for (int j = 0; j < BKV / 8; j++) {
            const float p0 = exp2f(s_acc[4 * j] - mn_lo), p1 = exp2f(s_acc[4 * j + 1] - mn_lo);
            const float p2 = exp2f(s_acc[4 * j + 2] - mn_hi), p3 = exp2f(s_acc[4 * j + 3] - mn_hi);
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

template <class T>
bool attn_fwd_sm90(T *out, float *lse, const T *qkv, int B, int T_, int H, int KV, int hd) {
    const int64_t rs = (int64_t)(H + 2 * KV) * hd;
    if (hd != HD || !sm90_usable() || !aligned16(qkv) || !aligned16(out)) return false;
    CUtensorMap mq, mkv;
    const bool f16 = !std::is_same<T, bf16>::value;
    if (!sm90_map(&mq, qkv, (int64_t)B * T_, rs, rs, BQ, HD, f16) ||
        !sm90_map(&mkv, qkv, (int64_t)B * T_, rs, rs, BKV, HD, f16))
        return false;
    static bool attr_set;   /* set before any capture (the first call is eager) */
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(attn_fwd_sm90_k<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)SMEM));
        attr_set = true;
    }
    attn_fwd_sm90_k<T><<<dim3((T_ + BQ - 1) / BQ, B * H), 160, SMEM, sj_stream()>>>(mq, mkv, out, lse, T_, H,
                                                                                KV);
    LAUNCH_CHECK("attention_forward (sm90)");
    return true;
}

}  // namespace

extern "C" int sj_cuda_attention_forward_sm90_bf16(void *out, float *lse, const void *qkv, int B,
                                                  int T_, int H, int KV, int hd) {
    return attn_fwd_sm90((bf16 *)out, lse, (const bf16 *)qkv, B, T_, H, KV, hd);
}
extern "C" int sj_cuda_attention_forward_sm90_f16(void *out, float *lse, const void *qkv, int B,
                                                 int T_, int H, int KV, int hd) {
    return attn_fwd_sm90((f16 *)out, lse, (const f16 *)qkv, B, T_, H, KV, hd);
}
