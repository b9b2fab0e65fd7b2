/* gemm_sm90.cu — out = epilogue(x @ w^T) on Hopper tensor cores, for the
 * projections whose epilogue cuBLASLt cannot do: SwiGLU (or relu2) after the gate/up
 * GEMM and RoPE after the QKV GEMM. Fused, the un-rotated q and k never
 * reach memory and the separate SwiGLU and RoPE passes (each a full read
 * and write at bandwidth) go; a forward-only run needs no (N, 2F) gate/up
 * buffer at all, training stores it beside SwiGLU's output for backward.
 *
 * Shape of the kernel (the one CUTLASS and DeepGEMM use on sm_90):
 * persistent CTAs of three warpgroups. One thread of the first issues TMA
 * copies of 128 x 64 tiles of x and BN x 64 tiles of w into a ring of
 * STAGES shared-memory stages (128-byte swizzle, the layout wgmma reads),
 * signalling each stage's arrival on its "full" mbarrier. The other two
 * warpgroups each own 64 rows of the 128 x BN output tile: they wait for a
 * stage, issue wgmma (bf16/f16 in, f32 accumulators in registers), hand the
 * stage back on its "empty" mbarrier, and after the K loop apply the
 * epilogue to their registers, round once, stage the tile in shared memory
 * and write it with 16-byte coalesced stores. The ring runs on across tiles,
 * so the next tile's loads overlap this tile's epilogue.
 *
 * Requirements (checked by the launchers, which return false otherwise and
 * leave the work to cuBLASLt + the separate kernels): an sm_90 device, a
 * 16-bit act dtype, K a multiple of 8, 16-byte aligned operands, the output
 * width a multiple of the tile's. Rows past M are zero-filled on load and
 * not stored. */
#include "kernels.h"
#include "sm90.cuh"
#include <cudaTypedefs.h>
#include <math.h>
#include <mutex>
#include <type_traits>

namespace {

constexpr int BM = 128;   /* two consumer warpgroups of 64 rows */
constexpr int BK = 64;    /* 64 16-bit elements: one 128-byte swizzled row */

enum epi_kind { EPI_PLAIN, EPI_SWIGLU, EPI_ROPE };

struct epi_args {
    int M, K;
    void *out;
    int64_t ldo;        /* output row stride, elements */
    void *gu;           /* SwiGLU: the (M, 2F) product too, unless NULL */
    int n_tiles_n;      /* output tiles across */
    int F;              /* SwiGLU: up rows start at F in w */
    int act;            /* SwiGLU: the gate's activation, SJ_FFN_* */
    int T, rot_cols, pos0;   /* RoPE: row m has position pos0 + m % T; columns < rot_cols rotate */
    float inv[64];      /* RoPE inverse frequencies, hd / 2 of them */
    float mscale;       /* RoPE: cos and sin scale */
};

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* sin and cos of a RoPE angle: reduced to [-pi, pi] in two FMA steps, then
 * the SFU's __sincosf (absolute error ~5e-7 there; the separate kernel's
 * sinf/cosf agree to about 1e-6, far below a 16-bit output's rounding). */
__device__ __forceinline__ void rope_sincos(float a, float *s, float *c) {
    const float k = rintf(a * 0.159154943f);
    float r = fmaf(-k, 6.28318548f, a);
    r = fmaf(-k, -1.74845553e-7f, r);
    __sincosf(r, s, c);
}

#endif

/* ---- the kernel ------------------------------------------------------------ */

/* 64 rows x NJ 8-column groups of a warpgroup's results (val(j, e): group
 * j's e-th register, in the wgmma accumulator layout: rows r_lo, r_lo + 8,
 * columns 8j + 2t, +1) rounded into the staging tile, then written to rows
 * row0.. of dst (row stride ldo) with 16-byte stores, rows past M skipped.
 * The barriers (named per warpgroup) keep the staging from being
 * overwritten while it is read. */
template <class T, int NJ, int SR, class V>
__device__ __forceinline__ void write_tile(T *so, V val, T *dst, int64_t ldo, int row0, int M,
                                           int r_lo, int t, int tid, int bar) {
    named_sync(bar, 128);
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        *(uint32_t *)(so + r_lo * SR + 8 * j + 2 * t) = pack2<T>(val(j, 0), val(j, 1));
        *(uint32_t *)(so + (r_lo + 8) * SR + 8 * j + 2 * t) = pack2<T>(val(j, 2), val(j, 3));
    }
    named_sync(bar, 128);
    for (int i = tid; i < 64 * NJ; i += 128) {
        const int r = i / NJ, ch = i % NJ, m = row0 + r;
        if (m < M) st16(dst + (int64_t)m * ldo + ch * 8, ld16(so + r * SR + ch * 8));
    }
}

template <int BN, int STAGES, int EPI>
struct layout {
    static constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
    static constexpr int STAGE = A_BYTES + B_BYTES;
    static constexpr int OUT_COLS = EPI == EPI_SWIGLU ? BN / 2 : BN;
    static constexpr int SROW = OUT_COLS * 2 + 16;   /* padded: the quad's stores hit 32 banks */
    static constexpr int STAGING = 64 * SROW;        /* per consumer warpgroup */
    static constexpr size_t BYTES = (size_t)STAGES * STAGE + 2 * STAGING + 2 * STAGES * 8;
};

template <class T, int BN, int STAGES, int EPI, int HD>
__global__ void __launch_bounds__(384, 1)
gemm_sm90_k(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
            const __grid_constant__ epi_args args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = layout<BN, STAGES, EPI>;
    constexpr int NR = BN / 2;   /* accumulator registers per thread */
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char *stages = smem;
    unsigned char *staging = smem + STAGES * L::STAGE;
    uint64_t *full = (uint64_t *)(staging + 2 * L::STAGING), *empty = full + STAGES;

    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
    const int n_k = (args.K + BK - 1) / BK;
    const int n_tiles = (args.M + BM - 1) / BM * args.n_tiles_n;
    ring_init(full, STAGES, 1, 8, 0);   /* every consumer warp hands a stage back */
    __syncthreads();

    if (wg == 0) {   /* producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid != 0) return;
        int it = 0;
        for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
            const int m0 = tile / args.n_tiles_n * BM, nb = tile % args.n_tiles_n;
            /* rows of w for the tile's two halves: gate and up for SwiGLU */
            const int w0 = EPI == EPI_SWIGLU ? nb * (BN / 2) : nb * BN;
            const int w1 = EPI == EPI_SWIGLU ? args.F + w0 : w0 + BN / 2;
            for (int kb = 0; kb < n_k; kb++, it++) {
                const int s = it % STAGES;
                mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
                unsigned char *st = stages + s * L::STAGE;
                mbar_expect_tx(&full[s], L::STAGE);
                tma_load(st, &map_x, kb * BK, m0, &full[s]);
                tma_load(st + L::A_BYTES, &map_w, kb * BK, w0, &full[s]);
                tma_load(st + L::A_BYTES + L::B_BYTES / 2, &map_w, kb * BK, w1, &full[s]);
            }
        }
        return;
    }

    /* consumers: warpgroup c owns rows 64c..64c+63 of each tile */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = wg - 1, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    unsigned char *stage_out = staging + c * L::STAGING;
    float d[NR];
    int it = 0;
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const int m0 = tile / args.n_tiles_n * BM, nb = tile % args.n_tiles_n;
        for (int kb = 0; kb < n_k; kb++, it++) {
            const int s = it % STAGES;
            mbar_wait(&full[s], (it / STAGES) & 1);
            const unsigned char *st = stages + s * L::STAGE;
            const uint64_t da = desc_sw128(st + c * 64 * 128), db = desc_sw128(st + L::A_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++)
                wgmma<BN, T>(d, da + 2 * kk, db + 2 * kk, kb > 0 || kk > 0);
            wgmma_commit();
            fence_regs<NR>(d);
            /* the previous stage's products are done: hand it back */
            wgmma_wait<1>();
            fence_regs<NR>(d);
            if (kb > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % STAGES]);
        }
        wgmma_wait<0>();
        fence_regs<NR>(d);
        if (lane == 0) mbar_arrive(&empty[(it - 1) % STAGES]);

        /* epilogue: registers -> rounded 16-bit -> staging -> global */
        const int r_lo = warp * 16 + g;   /* and r_lo + 8, of this warpgroup's 64 rows */
        const int row0 = m0 + c * 64;
        T *so = (T *)stage_out, *out = (T *)args.out;
        if (EPI == EPI_SWIGLU) {   /* gate cols 8j.., up cols BN/2 + 8j.. */
            const int f0 = nb * (BN / 2);
            if (args.gu) {
                write_tile<T, NR / 8, L::SROW / 2>(so, [&](int j, int e) { return d[4 * j + e]; },
                                                   (T *)args.gu + f0, 2 * args.F, row0, args.M, r_lo, t, tid, 1 + c);
                write_tile<T, NR / 8, L::SROW / 2>(so, [&](int j, int e) { return d[4 * (j + NR / 8) + e]; },
                                                   (T *)args.gu + args.F + f0, 2 * args.F, row0, args.M, r_lo, t, tid, 1 + c);
            }
            write_tile<T, NR / 8, L::SROW / 2>(so, [&](int j, int e) {
                return gate_act<true>(d[4 * j + e], args.act) * d[4 * (j + NR / 8) + e];
            }, out + f0, args.ldo, row0, args.M, r_lo, t, tid, 1 + c);
            continue;
        }
        if (EPI == EPI_ROPE) {
            /* pairs (i, i + HD/2) of a head sit in registers j and j + HD/16 */
            const int col0 = nb * BN;
            const float p_lo = (float)(args.pos0 + (row0 + r_lo) % args.T);
            const float p_hi = (float)(args.pos0 + (row0 + r_lo + 8) % args.T);
#pragma unroll
            for (int jj = 0; jj < HD / 16; jj++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float f = args.inv[8 * jj + 2 * t + e];
                    float s_lo, c_lo, s_hi, c_hi;
                    rope_sincos(p_lo * f, &s_lo, &c_lo);
                    rope_sincos(p_hi * f, &s_hi, &c_hi);
                    s_lo *= args.mscale; c_lo *= args.mscale;
                    s_hi *= args.mscale; c_hi *= args.mscale;
#pragma unroll
                    for (int h0 = 0; h0 < BN; h0 += HD) {
                        if (col0 + h0 >= args.rot_cols) continue;
                        const int j = h0 / 8 + jj, j2 = j + HD / 16;
                        const float x1 = d[4 * j + e], x2 = d[4 * j2 + e];
                        d[4 * j + e] = x1 * c_lo - x2 * s_lo;
                        d[4 * j2 + e] = x2 * c_lo + x1 * s_lo;
                        const float y1 = d[4 * j + 2 + e], y2 = d[4 * j2 + 2 + e];
                        d[4 * j + 2 + e] = y1 * c_hi - y2 * s_hi;
                        d[4 * j2 + 2 + e] = y2 * c_hi + y1 * s_hi;
                    }
                }
        }
        write_tile<T, NR / 4, L::SROW / 2>(so, [&](int j, int e) { return d[4 * j + e]; },
                                           out + nb * BN, args.ldo, row0, args.M, r_lo, t, tid, 1 + c);
    }
#endif
}

/* ---- host side -------------------------------------------------------------- */

bool usable(const void *out, const void *x, const void *w, int64_t ldo, int K) {
    return sm90_usable() && K % 8 == 0 && K > 0 && ldo % 8 == 0 && aligned16(out) &&
           aligned16(x) && aligned16(w);
}

template <class T, int BN, int STAGES, int EPI, int HD>
bool launch(epi_args &a, const void *x, const void *w, int w_rows, int out_cols) {
    using L = layout<BN, STAGES, EPI>;
    if (out_cols % L::OUT_COLS) return false;
    CUtensorMap mx, mw;
    const bool f16 = !std::is_same<T, bf16>::value;
    if (!sm90_map(&mx, x, a.M, a.K, a.K, BM, BK, f16) ||
        !sm90_map(&mw, w, w_rows, a.K, a.K, BN / 2, BK, f16))
        return false;
    a.n_tiles_n = out_cols / L::OUT_COLS;
    const int tiles = (a.M + BM - 1) / BM * a.n_tiles_n;
    constexpr auto k = gemm_sm90_k<T, BN, STAGES, EPI, HD>;
    sm90_smem<k>(L::BYTES);
    k<<<tiles < sm90_sm_count() ? tiles : sm90_sm_count(), 384, L::BYTES, sj_stream()>>>(mx, mw, a);
    LAUNCH_CHECK("gemm_sm90");
    return true;
}

}  // namespace

/* ---- the Hopper host helpers (sm90.cuh) ---------------------------------------- */

static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled;
static std::once_flag sm90_once;
static int sm_count, is_sm90;

static void sm90_init(void) {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
    cudaDriverEntryPointQueryResult q;
    void *fn = NULL;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess || q != cudaDriverEntryPointSuccess) {
        cudaGetLastError();
        return;
    }
    encode_tiled = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    is_sm90 = major == 9 && minor == 0;
}
bool sm90_usable(void) {
    std::call_once(sm90_once, sm90_init);
    return is_sm90 && encode_tiled;
}
int sm90_sm_count(void) { return sm_count; }
bool sm90_map(CUtensorMap *map, const void *p, int64_t rows, int64_t cols, int64_t ld,
              int box_rows, int box_cols, bool f16) {
    const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)ld * 2};
    const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows}, estr[2] = {1, 1};
    return sm90_usable() &&
           encode_tiled(map, f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                        2, const_cast<void *>(p), dims, strides, box, estr,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* h: (M, F) = act(x @ w[0:F]^T) * (x @ w[F:2F]^T); x: (M, K), w: (2F, K);
 * gu: (M, 2F) = x @ w^T too unless NULL. */
template <class T>
static bool matmul_swiglu(void *h, void *gu, const void *x, const void *w, int M, int F, int K,
                          int act) {
    if (!usable(h, x, w, F, K) || (gu && !aligned16(gu))) return false;
    epi_args a = {};
    a.M = M; a.K = K; a.out = h; a.ldo = F; a.F = F; a.gu = gu; a.act = act;
    return F % 128 == 0 ? launch<T, 256, 4, EPI_SWIGLU, 64>(a, x, w, 2 * F, F)
                        : launch<T, 128, 5, EPI_SWIGLU, 64>(a, x, w, 2 * F, F);
}

/* out: (B*T, n_heads*hd) = x @ w^T, the first n_rot heads rotated (RoPE,
 * rotate-half, position pos0 + row % T); x: (B*T, K), w: (n_heads*hd, K). */
template <class T, int HD>
static bool matmul_rope_hd(epi_args &a, const void *x, const void *w, int n) {
    return n % 256 == 0 ? launch<T, 256, 3, EPI_ROPE, HD>(a, x, w, n, n)
                        : launch<T, 128, 4, EPI_ROPE, HD>(a, x, w, n, n);
}
template <class T>
static bool matmul_rope(void *out, const void *x, const void *w, int B, int T_, int n_heads,
                        int n_rot, int hd, int K, int pos0, const sj_rope *rope) {
    const int n = n_heads * hd;
    if (!usable(out, x, w, n, K) || (hd != 32 && hd != 64 && hd != 128)) return false;
    epi_args a = {};
    a.M = B * T_; a.K = K; a.out = out; a.ldo = n;
    a.T = T_; a.rot_cols = n_rot * hd; a.pos0 = pos0;
    for (int i = 0; i < hd / 2; i++) a.inv[i] = rope->inv_freq[i];
    a.mscale = rope->mscale;
    if (hd == 32) return matmul_rope_hd<T, 32>(a, x, w, n);
    if (hd == 64) return matmul_rope_hd<T, 64>(a, x, w, n);
    return matmul_rope_hd<T, 128>(a, x, w, n);
}

/* The plain product, for the benchmark that compares this kernel's main
 * loop with cuBLASLt on the same shapes. */
template <class T>
static bool matmul_plain(void *out, const void *x, const void *w, int M, int N, int K) {
    if (!usable(out, x, w, N, K)) return false;
    epi_args a = {};
    a.M = M; a.K = K; a.out = out; a.ldo = N;
    return launch<T, 256, 3, EPI_PLAIN, 64>(a, x, w, N, N);
}

#define SJ_CU_GEMM_SM90(T)                                                                    \
    extern "C" int sj_cuda_matmul_swiglu_##T(void *h, void *gu, const void *x, const void *w,   \
                                             int N, int F, int K, int act) {                  \
        return matmul_swiglu<T>(h, gu, x, w, N, F, K, act);                                    \
    }                                                                                         \
    extern "C" int sj_cuda_matmul_rope_##T(void *out, const void *x, const void *w, int B,     \
                                           int T_, int n_heads, int n_rot, int hd, int K,     \
                                           const sj_rope *rope) {                             \
        return matmul_rope<T>(out, x, w, B, T_, n_heads, n_rot, hd, K, 0, rope);              \
    }
SJ_CU_GEMM_SM90(bf16)
SJ_CU_GEMM_SM90(f16)
