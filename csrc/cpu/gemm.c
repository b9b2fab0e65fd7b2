/* gemm.c — CPU GEMM, C = op(A) op(B) (+ C), the BLIS/GotoBLAS way.
 *
 * General path: op(A) and op(B) are copied ("packed") into micro-panels the
 * microkernel reads contiguously, so the transposes cost nothing after
 * packing; a register-blocked microkernel computes an MR x NR tile of C with
 * broadcast + FMA (AVX-512 14x32, AVX2+FMA 6x16, portable C 4x16). Cache
 * blocks: packed B (all of K for up to 16384 columns, within 8 MiB) is
 * shared by all threads (L3); an item's MC x KC block of A sits in L2, and
 * one KC x NR micro-panel of B in L1 while the item sweeps its MR-panels.
 * Work items are the tiles of a 2-D grid over C (row blocks x column
 * slices, sized for the thread count) handed out by sj_parallel_for; each
 * owns its tile outright and runs the K loop over it. Packing is done on
 * demand by whichever items need a block first, with no barrier: one
 * fork-join per call for the model's shapes (see "driver" below, with a
 * table of the work items per shape at P = 1..16).
 * Decode shapes (M <= MR) skip the shared B block, which nothing would reuse:
 * with AVX-512 and M <= 4 wide register strips read B in place (transposing
 * W in registers when transB); otherwise B is packed a few panels at a time.
 *
 * Determinism: every C element is a single FMA chain over k = 0..K-1 in
 * order, started from 0 (or from the old C when accum), on every path.
 * Between KC blocks a tile is stored and reloaded as float, which is exactly
 * the register value, so neither the blocking, the thread count, the
 * schedule nor the number of rows in the call changes a bit of the result
 * (a row computed alone in decode equals that row of a big batch).
 *
 * Bound targeted: the FMA rate, one zmm FMA per cycle per core on Zen 4
 * (~110 GFLOP/s per core at ~3.5 GHz; the kernel alone on L1-resident panels
 * measured 109). Achieved on the AMD EPYC (Zen 4, 2 vCPU, AVX-512) this was
 * written on: 82-110 GFLOP/s on one core for square 512-2048 and the model's
 * linear layers, 0.88-1.16x (geomean 1.01x) NumPy's OpenBLAS in CPU time
 * (benchmarks/results/gemm_cpu.jsonl, tag t1_cpuclock); on two cores,
 * in ad-hoc runs while the shared machine was quiet, 160-210 against
 * OpenBLAS's 170-205 (the committed 2-thread table was taken under other
 * sessions' load and says so). Decode with M = 1 and transB runs at
 * about half of OpenBLAS's dot-product GEMV, the price of keeping the same
 * k-order chain (shuffle-bound transposes); M = 2..16 measured 0.9-3x it
 * (ad-hoc, noisy runs), since OpenBLAS does poorly on such thin GEMMs.
 *
 * The reference (serial, double accumulation) is kept as the test oracle.
 * Must never: allocate on the hot path (pack buffers are grow-only,
 * per-thread, kept for the thread's life; small ones on the stack, < 50 KB),
 * or let a result depend on threads.
 */
#include "cpu.h"
#include <pthread.h>
#include <sched.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define AT(X, ld, tr, i, k) ((tr) ? (X)[(int64_t)(k) * (ld) + (i)] : (X)[(int64_t)(i) * (ld) + (k)])

void sj_cpu_gemm_reference(float *C, int ldc, const float *A, int lda, int transA,
                           const float *B, int ldb, int transB, int M, int N, int K,
                           int accum) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = accum ? C[(int64_t)i * ldc + j] : 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)AT(A, lda, transA, i, k) * (double)AT(B, ldb, transB, k, j);
            C[(int64_t)i * ldc + j] = (float)acc;
        }
}

/* ---- microkernels: c(MR, NR) (=|+=) a(kc, MR)^T b(kc, NR) ---------------
 * a: kc groups of MR floats (one column of op(A) each); b: kc rows of NR
 * floats, ldbk apart (NR when packed); c: row stride ldc. load: start from
 * c, else from 0. */

#if defined(__AVX512F__)
/* 14 x 32: 28 zmm accumulators + 2 for B + 1 broadcast = 31 of 32 registers;
 * per k 28 FMAs against 2 vector loads and 14 broadcasts. */
#define MR 14
#define NR 32
#define KC 256
#define MC (MR * 12)
#define SJ_GEMM_ISA "avx512"

/* The kernel body for mr <= MR rows; with `masked` the C tile is nr < NR
 * columns wide (B panels are always NR wide: packed edge panels are zero-
 * padded). Each variant computes every element as the same FMA chain. */
static inline __attribute__((always_inline)) void
kernel_body(const int mr, const int masked, int kc, const float *restrict a,
            const float *restrict b, int64_t ldbk, float *restrict c, int64_t ldc, int load,
            __mmask16 m0, __mmask16 m1) {
    __m512 acc[MR][2];
#pragma GCC unroll 14
    for (int i = 0; i < mr; i++) {
        if (!load) {
            acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        } else if (masked) {
            acc[i][0] = _mm512_maskz_loadu_ps(m0, c + i * ldc);
            acc[i][1] = _mm512_maskz_loadu_ps(m1, c + i * ldc + 16);
        } else {
            acc[i][0] = _mm512_loadu_ps(c + i * ldc);
            acc[i][1] = _mm512_loadu_ps(c + i * ldc + 16);
        }
    }
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 14
        for (int i = 0; i < mr; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
        a += MR;
        b += ldbk;
    }
#pragma GCC unroll 14
    for (int i = 0; i < mr; i++) {
        if (masked) {
            _mm512_mask_storeu_ps(c + i * ldc, m0, acc[i][0]);
            _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc[i][1]);
        } else {
            _mm512_storeu_ps(c + i * ldc, acc[i][0]);
            _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
        }
    }
}

/* A full MR x NR tile; b advances ldbk floats per k (NR when packed). */
static void kernel(int kc, const float *a, const float *b, int64_t ldbk, float *c,
                   int64_t ldc, int load) {
    kernel_body(MR, 0, kc, a, b, ldbk, c, ldc, load, 0, 0);
}

/* An edge tile: exactly mr rows (no work on padding rows, which matters for
 * decode's M = 1..13) and nr columns through masks. */
static void kernel_edge(int kc, const float *a, const float *b, int64_t ldbk, float *c,
                        int64_t ldc, int load, int mr, int nr) {
    __mmask16 m0 = (__mmask16)(nr >= 16 ? 0xFFFF : (1u << nr) - 1);
    __mmask16 m1 = (__mmask16)(nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (1u << (nr - 16)) - 1);
    switch (mr) {
#define SJ_EDGE_CASE(R) \
    case R: kernel_body(R, 1, kc, a, b, ldbk, c, ldc, load, m0, m1); break;
    SJ_EDGE_CASE(1) SJ_EDGE_CASE(2) SJ_EDGE_CASE(3) SJ_EDGE_CASE(4) SJ_EDGE_CASE(5)
    SJ_EDGE_CASE(6) SJ_EDGE_CASE(7) SJ_EDGE_CASE(8) SJ_EDGE_CASE(9) SJ_EDGE_CASE(10)
    SJ_EDGE_CASE(11) SJ_EDGE_CASE(12) SJ_EDGE_CASE(13) SJ_EDGE_CASE(14)
#undef SJ_EDGE_CASE
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
/* 6 x 16: 12 ymm accumulators + 2 for B + 1 broadcast = 15 of 16 registers. */
#define MR 6
#define NR 16
#define KC 256
#define MC (MR * 20)
#define SJ_GEMM_ISA "avx2"

static void kernel(int kc, const float *restrict a, const float *restrict b, int64_t ldbk,
                   float *restrict c, int64_t ldc, int load) {
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        acc[i][0] = load ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
        acc[i][1] = load ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
    }
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
        a += MR;
        b += ldbk;
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(c + i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
}

#else
/* Portable: plain C the compiler may vectorise along NR. Each element is
 * still one multiply-add chain in k order (fused or not, as the compiler's
 * contraction setting decides), so determinism holds here too. */
#define MR 4
#define NR 16
#define KC 256
#define MC (MR * 32)
#define SJ_GEMM_ISA "portable"

static void kernel(int kc, const float *restrict a, const float *restrict b, int64_t ldbk,
                   float *restrict c, int64_t ldc, int load) {
    float acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = load ? c[i * ldc + j] : 0.f;
    for (int k = 0; k < kc; k++) {
        for (int i = 0; i < MR; i++) {
            float ai = a[i];
#pragma omp simd
            for (int j = 0; j < NR; j++) acc[i][j] += ai * b[j];
        }
        a += MR;
        b += ldbk;
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) c[i * ldc + j] = acc[i][j];
}
#endif

#if !defined(__AVX512F__)
/* An edge tile (mr < MR or nr < NR): run the full kernel on a scratch tile.
 * The padded rows/columns of the panels are zero, so the valid part is the
 * same FMA chain as in a full tile. */
static void kernel_edge(int kc, const float *a, const float *b, int64_t ldbk, float *c,
                        int64_t ldc, int load, int mr, int nr) {
    _Alignas(64) float t[MR * NR];
    if (load)
        for (int i = 0; i < mr; i++) memcpy(t + i * NR, c + i * ldc, sizeof(float) * nr);
    kernel(kc, a, b, ldbk, t, NR, load);
    for (int i = 0; i < mr; i++) memcpy(c + i * ldc, t + i * NR, sizeof(float) * nr);
}
#endif

/* ---- packing ------------------------------------------------------------
 * The two transposing cases (op(A) from row-major A, op(B) from B stored
 * (N, K)) read MR or NR rows in 16-float chunks of k, so that each cache
 * line is used up at once: rows lda apart are often 4 KiB apart and would
 * evict one another from L1 if walked in lockstep. */

#if defined(__AVX512F__)
/* In-register transpose of a 16x16 float block: r[i] row i -> r[j] column j. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 4) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        t[i + 2] = _mm512_unpacklo_ps(r[i + 2], r[i + 3]);
        t[i + 3] = _mm512_unpackhi_ps(r[i + 2], r[i + 3]);
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

/* rows src[0..rows) (stride ld), columns k0..k0+kn (kn <= 16), transposed:
 * column c -> r[c]; missing rows are zero. */
static inline __attribute__((always_inline)) void
load_transpose16(__m512 r[16], const float *src, int64_t ld, int rows, int kn) {
    __mmask16 m = (__mmask16)((1u << kn) - 1);
    for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * ld) : _mm512_setzero_ps();
    transpose16(r);
}
#endif

/* One MR-panel of op(A): rows i0..i0+mr, columns p0..p0+kc -> dst(kc, MR),
 * rows past mr zero. */
static void pack_a_panel(float *restrict dst, const float *A, int lda, int transA,
                         int i0, int mr, int p0, int kc) {
    if (transA) { /* A stored (K, M): op(A)'s column k is contiguous */
        for (int k = 0; k < kc; k++, dst += MR) {
            const float *src = A + (int64_t)(p0 + k) * lda + i0;
            int r = 0;
            for (; r < mr; r++) dst[r] = src[r];
            for (; r < MR; r++) dst[r] = 0.f;
        }
        return;
    }
    const float *src = A + (int64_t)i0 * lda + p0;
#if defined(__AVX512F__) && MR <= 16
    for (int k0 = 0; k0 < kc; k0 += 16) {
        int kn = SJ_MIN(16, kc - k0);
        __m512 r[16];
        load_transpose16(r, src + k0, lda, mr, kn);
        for (int c = 0; c < kn; c++)
            _mm512_mask_storeu_ps(dst + (k0 + c) * MR, (__mmask16)((1u << MR) - 1), r[c]);
    }
#else
    for (int k0 = 0; k0 < kc; k0 += 16) {
        int k1 = SJ_MIN(kc, k0 + 16);
        for (int r = 0; r < MR; r++)
            for (int k = k0; k < k1; k++)
                dst[k * MR + r] = r < mr ? src[(int64_t)r * lda + k] : 0.f;
    }
#endif
}

/* Rows i0..i1 of op(A) as consecutive MR-panels. With transA each stored
 * row k is walked once across all panels: panel by panel, the short pieces
 * of rows lda apart would keep missing in L1. */
static void pack_a_block(float *restrict dst, const float *A, int lda, int transA,
                         int i0, int i1, int p0, int kc) {
    if (!transA) {
        for (int i = i0; i < i1; i += MR, dst += (size_t)kc * MR)
            pack_a_panel(dst, A, lda, 0, i, SJ_MIN(MR, i1 - i), p0, kc);
        return;
    }
    for (int k = 0; k < kc; k++) {
        const float *src = A + (int64_t)(p0 + k) * lda;
        float *d = dst + k * MR;
        /* rows lda apart sit on different pages, beyond the hardware
         * prefetcher's reach: fetch a few rows ahead */
        if (k + 4 < kc)
            for (int i = i0; i < i1; i += 16) __builtin_prefetch(src + 4 * (int64_t)lda + i);
        for (int i = i0; i < i1; i += MR, d += (size_t)kc * MR) {
            int mr = SJ_MIN(MR, i1 - i);
#if defined(__AVX512F__) && MR <= 16
            _mm512_mask_storeu_ps(d, (__mmask16)((1u << MR) - 1),
                                  _mm512_maskz_loadu_ps((__mmask16)((1u << mr) - 1), src + i));
#else
            int r = 0;
            for (; r < mr; r++) d[r] = src[i + r];
            for (; r < MR; r++) d[r] = 0.f;
#endif
        }
    }
}

/* One NR-panel of op(B): rows p0..p0+kc, columns j0..j0+nr -> dst(kc, NR),
 * columns past nr zero. */
/* dst[0..NR) = src[0..nr), zero past nr. Explicit vectors: left to itself
 * the compiler turns this into a call to memmove for 128 bytes. */
static inline void copy_row(float *restrict dst, const float *restrict src, int nr) {
#if defined(__AVX512F__) && NR % 16 == 0
    for (int j = 0; j < NR; j += 16) {
        int n = SJ_MAX(0, SJ_MIN(16, nr - j));
        __mmask16 m = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
        _mm512_store_ps(dst + j, _mm512_maskz_loadu_ps(m, src + j));
    }
#else
    int j = 0;
    for (; j < nr; j++) dst[j] = src[j];
    for (; j < NR; j++) dst[j] = 0.f;
#endif
}

static void pack_b_panel(float *restrict dst, const float *B, int ldb, int transB,
                         int j0, int nr, int p0, int kc) {
    if (!transB) { /* B stored (K, N): rows of op(B) are contiguous */
        for (int k = 0; k < kc; k++, dst += NR)
            copy_row(dst, B + (int64_t)(p0 + k) * ldb + j0, nr);
        return;
    }
    /* B stored (N, K): op(B)'s column j is row j of B */
    const float *src = B + (int64_t)j0 * ldb + p0;
#if defined(__AVX512F__) && NR % 16 == 0
    for (int k0 = 0; k0 < kc; k0 += 16) {
        int kn = SJ_MIN(16, kc - k0);
        for (int h = 0; h < NR; h += 16) {
            __m512 r[16];
            load_transpose16(r, src + (int64_t)h * ldb + k0, ldb, SJ_MAX(0, nr - h), kn);
            for (int c = 0; c < kn; c++) _mm512_store_ps(dst + (k0 + c) * NR + h, r[c]);
        }
    }
#else
    for (int k0 = 0; k0 < kc; k0 += 16) {
        int k1 = SJ_MIN(kc, k0 + 16);
        for (int j = 0; j < NR; j++)
            for (int k = k0; k < k1; k++)
                dst[k * NR + j] = j < nr ? src[(int64_t)j * ldb + k] : 0.f;
    }
#endif
}

/* ---- per-thread pack buffers -------------------------------------------- */

/* Grow-only, one per thread for the thread's life (freed by the key's
 * destructor when a pool worker exits). slot 0: this thread's packed A
 * block; in the calling thread, slot 1: the shared packed B, slot 2: the
 * shared packed A, slot 3: the pack counters. */
#define N_SLOTS 4
typedef struct { float *p[N_SLOTS]; size_t cap[N_SLOTS]; } gemm_scratch;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    gemm_scratch *s = v;
    if (!s) return;
    for (int i = 0; i < N_SLOTS; i++) sj_free(s->p[i]);
    sj_free(s);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

/* NULL when memory is short; callers then take the unbuffered path, which
 * computes the identical result. */
static float *scratch_get(int slot, size_t floats) {
    pthread_once(&scratch_once, scratch_init);
    gemm_scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = sj_alloc(sizeof *s, "gemm scratch");
        if (!s) return NULL;
        memset(s, 0, sizeof *s);
        if (pthread_setspecific(scratch_key, s) != 0) { sj_free(s); return NULL; }
    }
    if (s->cap[slot] < floats) {
        sj_free(s->p[slot]);
        s->cap[slot] = 0;
        s->p[slot] = sj_alloc(floats * sizeof(float), "gemm pack buffer");
        if (!s->p[slot]) return NULL;
        s->cap[slot] = floats;
    }
    return s->p[slot];
}

/* ---- driver ---------------------------------------------------------------
 * The general path (M > MR) is one fork-join per (column group, K group),
 * and for every shape in the model one per call. Its work items are the
 * tiles of a 2-D grid over C: n_i row blocks (MR-panel counts differing by
 * at most one, at most MC rows) x n_j column slices (NR-panel counts
 * differing by at most one). An item owns its tile outright and runs the
 * whole K loop of its group over it, KC at a time, so every C element still
 * sees one FMA chain in k order.
 *
 * Packed operands are shared and packed on demand, without a barrier: B (a
 * kg x Wg block, all of the group's K for the group's columns) is cut into
 * (column slice, KC step) blocks, A likewise into (row block, KC step)
 * blocks when n_j > 1 (else each item packs its own A block into its
 * thread's buffer, as A is used by one item only). Each block has a claim
 * counter and a done counter: an item that needs a block claims units of it
 * (one NR-panel of B, two MR-panels of A) until none are left, packs them,
 * counts them done, then waits (briefly: the others are packing, never
 * waiting) until all are done. So packing is spread over whichever threads
 * need a block first, a lone thread packs all it needs itself, and the
 * packed values never depend on who packed them. Items are numbered with
 * the column slice fastest, so the first P items of a call mostly pack
 * distinct B slices.
 *
 * Choosing the grid (plan_tiles): with P = 1, n_j = 1 and the fewest row
 * blocks of at most MC rows (the classic BLIS loop). With P > 1, the (n_i,
 * n_j) over row blocks of 1..MC/MR panels and 1..8P column slices that
 * minimises a modelled time
 *     T = max(ceil(n/P), n/P + 1/2) * r*c*(1 + 14/r + 16/c)
 * where n = n_i n_j items, r x c the largest tile (rows x columns): the
 * first factor is the rounds of the dynamic hand-out, plus half an item of
 * tail for threads that run at different speeds (shared machines, turbo),
 * which favours several items per thread; the second the largest item's
 * cost, with 14/r for reloading each B panel per row block (one MR-panel
 * row block costs as much again as the FMAs only when B streams from L3 at
 * full contention) and 16/c for streaming the A block per column slice and
 * the C tile's load and store.
 *
 * Work items per shape and thread count P (printed by a harness around
 * plan_tiles). Per P: "old items/fork-joins" of the previous driver (NC =
 * 3072 column blocks x KC steps, each a B-pack and a compute fork-join;
 * its row blocks were single MR-panels, 14 rows, for M = 512 from P = 16
 * on, each streaming its B slice from L3 for 14 rows of FMAs), then "new
 * items/fork-joins" and the largest tile, rows x columns:
 *
 *   M     N     K     | P=1                   | P=2                   | P=4                   | P=8                   | P=16
 * 512   512   512   |   4/4    4/1 140x512  |   8/4   16/1 140x128  |  16/4   20/1 112x128  |  32/4   32/1  70x128  |  74/4   64/1  70x64     square 512 (also medium attn out, all forms)
 * 1024  1024  1024  |   7/8    7/1 154x1024 |   8/8   28/2 154x256  |  16/8   28/2 154x256  |  32/8   56/2 154x128  |  64/8  120/2  70x128    square 1024
 * 2048  2048  2048  |  13/16  13/2 168x2048 |  13/16  60/8 140x512  |  16/16  60/8 140x512  |  32/16 120/8 140x256  |  64/16 168/8  98x256    square 2048
 * 512   768   256   |   4/2    4/1 140x768  |   8/2   16/1 140x192  |  16/2   24/1 140x128  |  32/2   30/1 112x128  |  74/2   64/1  70x96     small qkv fwd, ffn down dx
 * 512   256   768   |   4/6    4/1 140x256  |   8/6   10/1 112x128  |  16/6   16/1  70x128  |  32/6   32/1  70x64   |  74/6   40/1  56x64     small qkv/ffn down/attn out fwd+dx*
 * 768   256   512   |   5/4    5/1 154x256  |   8/4   10/1 154x128  |  16/4   22/1  70x128  |  32/4   22/1  70x128  | 110/4   44/1  70x64     small qkv dW
 * 256   256   512   |   4/4    2/1 140x256  |   8/4    8/1  70x128  |  16/4   16/1  70x64   |  38/4   20/1  56x64   |  76/4   40/1  28x64     small attn out dW
 * 512   1536  256   |   4/2    4/1 140x1536 |   8/2   24/1 140x256  |  16/2   32/1 140x192  |  32/2   48/1 140x128  |  74/2   60/1 112x128    small ffn up fwd
 * 1536  256   512   |  10/4   10/1 154x256  |  10/4   11/1 140x256  |  16/4   22/1 140x128  |  32/4   44/1  70x128  |  64/4   44/1  70x128    small ffn up dW
 * 256   768   512   |   4/4    2/1 140x768  |   8/4   12/1 140x128  |  16/4   16/1 140x96   |  38/4   32/1  70x96   |  76/4   48/1  70x64     small ffn down dW
 * 512   8192  256   |   4/6    4/1 140x8192 |   8/6   64/1 140x512  |  16/6   64/1 140x512  |  32/6  128/1 140x256  |  74/6  128/1 140x256    small lm head fwd
 * 512   256   8192  |   4/64   4/1 140x256  |   8/64  10/5 112x128  |  16/64  16/5  70x128  |  32/64  32/5  70x64   |  74/64  40/5  56x64     small lm head dx
 * 8192  256   512   |  49/4   49/1 168x256  |  49/4   49/1 168x256  |  49/4   59/1 140x256  |  49/4   54/1 154x256  |  64/4  108/1 154x128    small lm head dW
 * 512   1536  512   |   4/4    4/1 140x1536 |   8/4   24/1 140x256  |  16/4   32/1 140x192  |  32/4   48/1 140x128  |  74/4   60/1 112x128    medium qkv fwd, ffn down dx/dW
 * 512   512   1536  |   4/12   4/1 140x512  |   8/12  16/1 140x128  |  16/12  20/1 112x128  |  32/12  32/1  70x128  |  74/12  64/1  70x64     medium qkv dx, ffn down fwd
 * 1536  512   512   |  10/4   10/1 154x512  |  10/4   20/1 154x256  |  16/4   22/1 140x256  |  32/4   44/1 140x128  |  64/4   88/1  70x128    medium qkv dW
 * 512   3072  512   |   4/4    4/1 140x3072 |   8/4   32/1 140x384  |  16/4   48/1 140x256  |  32/4   64/1 140x192  |  74/4   96/1 140x128    medium ffn up fwd
 * 512   512   3072  |   4/24   4/1 140x512  |   8/24  16/2 140x128  |  16/24  20/2 112x128  |  32/24  32/2  70x128  |  74/24  64/2  70x64     medium ffn up dx
 * 3072  512   512   |  19/4   19/1 168x512  |  19/4   20/1 154x512  |  19/4   40/2 154x256  |  32/4   44/2 140x256  |  64/4   88/2 140x128    medium ffn up dW
 * 512   8192  512   |   4/12   4/2 140x8192 |   8/12  64/2 140x512  |  16/12  64/2 140x512  |  32/12 128/2 140x256  |  74/12 128/2 140x256    medium lm head fwd
 * 512   512   8192  |   4/64   4/2 140x512  |   8/64  16/5 140x128  |  16/64  20/5 112x128  |  32/64  32/5  70x128  |  74/64  64/5  70x64     medium lm head dx
 * 8192  512   512   |  49/4   49/1 168x512  |  49/4   49/1 168x512  |  49/4   98/1 168x256  |  49/4  118/1 140x256  |  64/4  108/1 154x256    medium lm head dW
 * (* the 512 x 256 x K shapes: K = 768 small qkv dx / ffn down fwd, 256
 * attn out fwd and dx, 1536 ffn up dx: the same grid.)
 *
 * Memory: the shared B block is at most B_BUDGET floats (8 MiB) and the
 * shared A at most A_BUDGET (4 MiB), both grow-only in the calling thread;
 * wider N is cut into column groups of B_BUDGET / KC columns, longer K into
 * K groups (each one fork-join), e.g. medium lm head fwd (K = 512, N = 8192)
 * runs as 2 K groups. */

#define B_BUDGET ((size_t)1 << 21)
#define A_BUDGET ((size_t)1 << 20)
#define A_UNIT 2  /* MR-panels of A per claim */

/* A block's pack state; a cache line each, as many threads hit them. */
typedef struct { atomic_int claim, done; char pad[56]; } pack_ctr;

typedef struct {
    float *C; const float *A, *B; int ldc, lda, ldb, transA, transB, M, N, K, accum;
    int jpp;                   /* decode paths: NR-panels per item */
    /* general path: the current column group jc..jc+nc, K group k0..k0+kg */
    int jc, nc, k0, kg, npc;   /* npc: KC steps in the group */
    int n_ip, n_jp;            /* MR-panels of M, NR-panels of the group */
    int n_i, n_j;              /* the grid */
    float *bp;                 /* packed B: [pc step][NR-panel] (KC, NR) each */
    float *ap;                 /* shared packed A: [pc step][MR-panel] (KC, MR), or NULL */
    pack_ctr *actr, *bctr;     /* [row block][pc step], [column slice][pc step] */
} gemm_plan;

/* Wait for the units other threads claimed; they are packing, not waiting. */
static void wait_done(pack_ctr *c, int n) {
    int spins = 0;
    while (atomic_load_explicit(&c->done, memory_order_acquire) < n) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (++spins > 4000) { sched_yield(); spins = 0; }  /* a packer lost its core */
    }
}

/* Make sure B panels jp0..jp1 of KC step pcl are packed. */
static void need_b(const gemm_plan *g, pack_ctr *c, int jp0, int jp1, int pcl) {
    int n = jp1 - jp0;
    if (atomic_load_explicit(&c->done, memory_order_acquire) >= n) return;
    int pc = g->k0 + pcl * KC, kc = SJ_MIN(KC, g->K - pc);
    for (;;) {
        int u = atomic_fetch_add_explicit(&c->claim, 1, memory_order_relaxed);
        if (u >= n) break;
        int jp = jp0 + u, j = g->jc + jp * NR;
        pack_b_panel(g->bp + ((size_t)pcl * g->n_jp + jp) * KC * NR, g->B, g->ldb, g->transB,
                     j, SJ_MIN(NR, g->jc + g->nc - j), pc, kc);
        atomic_fetch_add_explicit(&c->done, 1, memory_order_release);
    }
    wait_done(c, n);
}

/* Make sure A panels ip0..ip1 of KC step pcl are packed (shared A). */
static void need_a(const gemm_plan *g, pack_ctr *c, int ip0, int ip1, int pcl) {
    int n = SJ_CDIV(ip1 - ip0, A_UNIT);
    if (atomic_load_explicit(&c->done, memory_order_acquire) >= n) return;
    int pc = g->k0 + pcl * KC, kc = SJ_MIN(KC, g->K - pc);
    for (;;) {
        int u = atomic_fetch_add_explicit(&c->claim, 1, memory_order_relaxed);
        if (u >= n) break;
        int p0 = ip0 + u * A_UNIT, p1 = SJ_MIN(ip1, p0 + A_UNIT);
        /* panels of one KC step are consecutive, KC * MR apart: pack_a_block's
         * stride is kc * MR, so go panel by panel when kc < KC */
        float *dst = g->ap + ((size_t)pcl * g->n_ip + p0) * KC * MR;
        if (kc == KC)
            pack_a_block(dst, g->A, g->lda, g->transA, p0 * MR, SJ_MIN(g->M, p1 * MR), pc, kc);
        else
            for (int ip = p0; ip < p1; ip++)
                pack_a_panel(dst + (size_t)(ip - p0) * KC * MR, g->A, g->lda, g->transA,
                             ip * MR, SJ_MIN(MR, g->M - ip * MR), pc, kc);
        atomic_fetch_add_explicit(&c->done, 1, memory_order_release);
    }
    wait_done(c, n);
}

static void tile_items(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const gemm_plan *g = ctx;
    float *own = g->ap ? NULL : scratch_get(0, (size_t)MC * KC);
    for (int64_t t = t0; t < t1; t++) {
        int ii = (int)(t / g->n_j), jj = (int)(t % g->n_j);
        int ip0 = (int)((int64_t)ii * g->n_ip / g->n_i);
        int ip1 = (int)((int64_t)(ii + 1) * g->n_ip / g->n_i);
        int jp0 = (int)((int64_t)jj * g->n_jp / g->n_j);
        int jp1 = (int)((int64_t)(jj + 1) * g->n_jp / g->n_j);
        int i0 = ip0 * MR, i1 = SJ_MIN(g->M, ip1 * MR);
        for (int pcl = 0; pcl < g->npc; pcl++) {
            int pc = g->k0 + pcl * KC, kc = SJ_MIN(KC, g->K - pc);
            int load = pc > 0 || g->accum;
            need_b(g, &g->bctr[(size_t)jj * g->npc + pcl], jp0, jp1, pcl);
            const float *ablk;  /* panel ip - ip0 at ablk + (ip - ip0) * astride */
            size_t astride;
            if (g->ap) {
                need_a(g, &g->actr[(size_t)ii * g->npc + pcl], ip0, ip1, pcl);
                ablk = g->ap + ((size_t)pcl * g->n_ip + ip0) * KC * MR;
                astride = (size_t)KC * MR;
            } else {
                if (own) pack_a_block(own, g->A, g->lda, g->transA, i0, i1, pc, kc);
                ablk = own;
                astride = (size_t)kc * MR;
            }
            for (int jp = jp0; jp < jp1; jp++) {
                int j = g->jc + jp * NR, nr = SJ_MIN(NR, g->jc + g->nc - j);
                const float *bpan = g->bp + ((size_t)pcl * g->n_jp + jp) * KC * NR;
                for (int i = i0, ip = 0; i < i1; i += MR, ip++) {
                    int mr = SJ_MIN(MR, i1 - i);
                    const float *apan;
                    _Alignas(64) float one[MR * KC];
                    if (ablk) apan = ablk + ip * astride;
                    else {  /* out of memory: pack this panel on the stack */
                        pack_a_panel(one, g->A, g->lda, g->transA, i, mr, pc, kc);
                        apan = one;
                    }
                    float *c = g->C + (int64_t)i * g->ldc + j;
                    /* the next tile's C rows, so its loads do not stall on memory */
                    if (load && i + MR < i1)
                        for (int r = 0; r < MR; r++)
                            for (int q = 0; q < NR; q += 16)
                                __builtin_prefetch(c + (int64_t)(MR + r) * g->ldc + q, 1);
                    if (mr == MR && nr == NR) kernel(kc, apan, bpan, NR, c, g->ldc, load);
                    else kernel_edge(kc, apan, bpan, NR, c, g->ldc, load, mr, nr);
                }
            }
        }
    }
}

/* The grid for n_ip MR-panels x n_jp NR-panels (M rows, N columns) on P
 * threads; see the comment above. */
static void plan_tiles(int M, int N, int n_ip, int n_jp, int P, int *n_i, int *n_j) {
    *n_i = SJ_CDIV(n_ip, MC / MR);
    *n_j = 1;
    if (P <= 1) return;
    double best = 0;
    for (int mi = 1; mi <= MC / MR; mi++) {
        int ni = SJ_CDIV(n_ip, mi), mb = SJ_CDIV(n_ip, ni);
        if (mi > 1 && SJ_CDIV(n_ip, mi - 1) == ni) continue;  /* same grid as mi - 1 */
        for (int nj = 1; nj <= SJ_MIN(n_jp, 8 * P); nj++) {
            int nb = SJ_CDIV(n_jp, nj);
            double r = SJ_MIN(mb * MR, M), c = SJ_MIN(nb * NR, N), n = (double)ni * nj;
            double item = r * c * (1 + 14.0 / r + 16.0 / c);
            double rounds = SJ_MAX((double)SJ_CDIV((int64_t)ni * nj, P), n / P + 0.5);
            double tm = rounds * item;
            if (best == 0 || tm < best * (1 - 1e-9)) { best = tm; *n_i = ni; *n_j = nj; }
        }
    }
}

/* M <= MR (decode): no B panel would be used twice, so rather than packing
 * a shared KC x NC block of B (megabytes, out to L3 and back), each item
 * packs SLICE panels at a time into its own L2-resident buffer and uses them
 * at once. Each item is a slice of NR-panels and runs the whole K loop
 * itself: one fork-join per call. The FMA chains are the packed path's, so
 * the results are identical to it. */
#define SLICE 4
static void small_m_items(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const gemm_plan *g = ctx;
    int n_jp = SJ_CDIV(g->N, NR);
    _Alignas(64) float ap[MR * KC];
    _Alignas(64) float one[KC * NR];
    float *bs = scratch_get(0, (size_t)SLICE * KC * NR);  /* NULL: panel by panel */
    int slice = bs ? SLICE : 1;
    if (!bs) bs = one;
    for (int64_t t = t0; t < t1; t++) {
        int jp0 = (int)t * g->jpp, jp1 = SJ_MIN(n_jp, jp0 + g->jpp);
        for (int pc = 0; pc < g->K; pc += KC) {
            int kc = SJ_MIN(KC, g->K - pc), load = pc > 0 || g->accum;
            pack_a_panel(ap, g->A, g->lda, g->transA, 0, g->M, pc, kc);
            for (int js = jp0; js < jp1; js += slice) {
                int je = SJ_MIN(jp1, js + slice);
                if (g->transB) {
                    for (int jp = js; jp < je; jp++) {
                        int j = jp * NR;
                        pack_b_panel(bs + (size_t)(jp - js) * kc * NR, g->B, g->ldb, 1, j,
                                     SJ_MIN(NR, g->N - j), pc, kc);
                    }
                } else {  /* row by row across the slice: long contiguous reads */
                    for (int k = 0; k < kc; k++) {
                        const float *src = g->B + (int64_t)(pc + k) * g->ldb;
                        for (int jp = js; jp < je; jp++)
                            copy_row(bs + (size_t)(jp - js) * kc * NR + k * NR, src + jp * NR,
                                     SJ_MIN(NR, g->N - jp * NR));
                    }
                }
                for (int jp = js; jp < je; jp++) {
                    int j = jp * NR, nr = SJ_MIN(NR, g->N - j);
                    const float *b = bs + (size_t)(jp - js) * kc * NR;
                    if (g->M == MR && nr == NR) kernel(kc, ap, b, NR, g->C + j, g->ldc, load);
                    else kernel_edge(kc, ap, b, NR, g->C + j, g->ldc, load, g->M, nr);
                }
            }
        }
    }
}

#if defined(__AVX512F__)
/* M <= 4 and B stored (K, N) (decode's dx, a single row through x @ W): the
 * kernel's 28 accumulators are spread over one wide strip, mr rows x NW
 * vectors, and the whole K loop runs over B in place. Per k a strip reads
 * NW*64 contiguous bytes of a row of B, which the prefetchers follow; per
 * element it is the same FMA chain in k order as every other path, so the
 * result is theirs bit for bit. */
static inline __attribute__((always_inline)) void
strip_body(const int mr, const int nw, const gemm_plan *g, int j, int ncols, int k0, int k1) {
    __m512 acc[4][28];
    __mmask16 m[28];
    for (int v = 0; v < nw; v++) {
        int n = SJ_MAX(0, SJ_MIN(16, ncols - 16 * v));
        m[v] = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nw; v++)
            acc[i][v] = k0 > 0 || g->accum ? _mm512_maskz_loadu_ps(m[v], g->C + (int64_t)i * g->ldc + j + 16 * v)
                                 : _mm512_setzero_ps();
    const float *b = g->B + (int64_t)k0 * g->ldb + j;
    for (int k = k0; k < k1; k++, b += g->ldb) {
        __m512 ai[4];
        for (int i = 0; i < mr; i++) ai[i] = _mm512_set1_ps(AT(g->A, g->lda, g->transA, i, k));
        for (int v = 0; v < nw; v++) {
            __m512 bv = _mm512_maskz_loadu_ps(m[v], b + 16 * v);
            for (int i = 0; i < mr; i++) acc[i][v] = _mm512_fmadd_ps(ai[i], bv, acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nw; v++)
            _mm512_mask_storeu_ps(g->C + (int64_t)i * g->ldc + j + 16 * v, m[v], acc[i][v]);
}

/* M <= 4 and B stored (N, K) (decode's y = x @ W^T): 32 columns of op(B)
 * are 32 rows of B, read 16 k at a time and transposed in registers on the
 * fly, so W streams once through the core with no packed copy. Bound: the
 * shuffles (64 per 256 elements of W), about the rate L3 delivers W at.
 * Same FMA chain per element as every other path. */
static inline __attribute__((always_inline)) void
tstrip_body(const int mr, const int ta, const int full, const gemm_plan *g, int j, int ncols) {
    if (full) ncols = 32;
    __mmask16 m0 = (__mmask16)(ncols >= 16 ? 0xFFFF : (1u << ncols) - 1);
    __mmask16 m1 = (__mmask16)(ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (1u << (ncols - 16)) - 1);
    __m512 acc[4][2];
    for (int i = 0; i < mr; i++) {
        float *c = g->C + (int64_t)i * g->ldc + j;
        acc[i][0] = g->accum ? _mm512_maskz_loadu_ps(m0, c) : _mm512_setzero_ps();
        acc[i][1] = g->accum ? _mm512_maskz_loadu_ps(m1, c + 16) : _mm512_setzero_ps();
    }
    const float *b0 = g->B + (int64_t)j * g->ldb, *b1 = b0 + 16 * (int64_t)g->ldb;
    for (int k0 = 0; k0 < g->K; k0 += 16) {
        int kn = SJ_MIN(16, g->K - k0);
        __m512 r0[16], r1[16];
        load_transpose16(r0, b0 + k0, g->ldb, full ? 16 : SJ_MIN(16, ncols), kn);
        load_transpose16(r1, b1 + k0, g->ldb, full ? 16 : SJ_MAX(0, ncols - 16), kn);
        if (kn == 16) {  /* constant trip count: r0/r1 stay in registers */
#pragma GCC unroll 16
            for (int c = 0; c < 16; c++)
                for (int i = 0; i < mr; i++) {
                    __m512 ai = _mm512_set1_ps(AT(g->A, g->lda, ta, i, k0 + c));
                    acc[i][0] = _mm512_fmadd_ps(ai, r0[c], acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(ai, r1[c], acc[i][1]);
                }
        } else {
            for (int c = 0; c < kn; c++)
                for (int i = 0; i < mr; i++) {
                    __m512 ai = _mm512_set1_ps(AT(g->A, g->lda, ta, i, k0 + c));
                    acc[i][0] = _mm512_fmadd_ps(ai, r0[c], acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(ai, r1[c], acc[i][1]);
                }
        }
    }
    for (int i = 0; i < mr; i++) {
        float *c = g->C + (int64_t)i * g->ldc + j;
        _mm512_mask_storeu_ps(c, m0, acc[i][0]);
        _mm512_mask_storeu_ps(c + 16, m1, acc[i][1]);
    }
}

static void tstrip_items(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const gemm_plan *g = ctx;
    for (int64_t t = t0; t < t1; t++) {
        int j = (int)t * 32, n = SJ_MIN(32, g->N - j);
        /* constant row count, transA and width: no branches in the loop */
        int v = (g->M - 1) * 4 + (g->transA ? 2 : 0) + (n == 32);
        switch (v) {
#define SJ_TS(MR_, TA, FULL) \
        case (MR_ - 1) * 4 + TA * 2 + FULL: tstrip_body(MR_, TA, FULL, g, j, n); break;
        SJ_TS(1, 0, 0) SJ_TS(1, 0, 1) SJ_TS(1, 1, 0) SJ_TS(1, 1, 1)
        SJ_TS(2, 0, 0) SJ_TS(2, 0, 1) SJ_TS(2, 1, 0) SJ_TS(2, 1, 1)
        SJ_TS(3, 0, 0) SJ_TS(3, 0, 1) SJ_TS(3, 1, 0) SJ_TS(3, 1, 1)
        SJ_TS(4, 0, 0) SJ_TS(4, 0, 1) SJ_TS(4, 1, 0) SJ_TS(4, 1, 1)
#undef SJ_TS
        }
    }
}

static int strip_width(int mr) { return 16 * (28 / mr); }

static void strip_items(void *ctx, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    const gemm_plan *g = ctx;
    int w = strip_width(g->M);
    /* k in blocks of 64 rows across all of this item's strips: the rows'
     * pages stay in the TLB and the lines the prefetcher brought for the
     * next strip are still in cache when it comes */
    for (int k0 = 0; k0 < g->K; k0 += 64) {
        int k1 = SJ_MIN(g->K, k0 + 64);
        for (int64_t t = t0; t < t1; t++) {
            int j = (int)t * w, n = SJ_MIN(w, g->N - j);
            switch (g->M) {
            case 1: strip_body(1, 28, g, j, n, k0, k1); break;
            case 2: strip_body(2, 14, g, j, n, k0, k1); break;
            case 3: strip_body(3, 9, g, j, n, k0, k1); break;
            default: strip_body(4, 7, g, j, n, k0, k1); break;
            }
        }
    }
}
#endif

/* Out of memory for the shared buffers: columns j0..N tile by tile, both
 * panels packed on the stack. Slow, serial, and bit-identical to the fast
 * path. */
static void gemm_unbuffered(const gemm_plan *g, int j0) {
    _Alignas(64) float ap[MR * KC], bp[KC * NR];
    for (int i = 0; i < g->M; i += MR)
        for (int j = j0; j < g->N; j += NR) {
            int mr = SJ_MIN(MR, g->M - i), nr = SJ_MIN(NR, g->N - j);
            for (int p = 0; p < g->K; p += KC) {
                int kc = SJ_MIN(KC, g->K - p);
                pack_a_panel(ap, g->A, g->lda, g->transA, i, mr, p, kc);
                pack_b_panel(bp, g->B, g->ldb, g->transB, j, nr, p, kc);
                kernel_edge(kc, ap, bp, NR, g->C + (int64_t)i * g->ldc + j, g->ldc,
                            p > 0 || g->accum, mr, nr);
            }
        }
}

void sj_cpu_gemm(float *C, int ldc, const float *A, int lda, int transA,
                 const float *B, int ldb, int transB, int M, int N, int K, int accum) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accum)
            for (int i = 0; i < M; i++) memset(C + (int64_t)i * ldc, 0, sizeof(float) * N);
        return;
    }
    gemm_plan g = { .C = C, .A = A, .B = B, .ldc = ldc, .lda = lda, .ldb = ldb,
                    .transA = transA, .transB = transB, .M = M, .N = N, .K = K,
                    .accum = accum };
    /* Below ~0.5 MFLOP the fork-join costs more than it saves. */
    int P = (int64_t)M * N * K < (1 << 18) ? 1 : sj_parallel_threads();
#if defined(__AVX512F__)
    if (M <= 4 && transB) {
        int64_t strips = SJ_CDIV(N, 32);
        sj_parallel_for(strips, P > 1 ? 1 : strips, tstrip_items, &g);
        return;
    }
    if (M <= 4 && !transB) {
        int64_t strips = SJ_CDIV(N, strip_width(M));
        sj_parallel_for(strips, P > 1 ? 1 : strips, strip_items, &g);
        return;
    }
#endif
    if (M <= MR) {
        int n_jp = SJ_CDIV(N, NR);
        g.jpp = SJ_CDIV(n_jp, SJ_MIN(n_jp, 4 * P));
        int64_t items = SJ_CDIV(n_jp, g.jpp);
        sj_parallel_for(items, P > 1 ? 1 : items, small_m_items, &g);
        return;
    }
    int n_ip = SJ_CDIV(M, MR);
    /* Column groups of at most B_BUDGET / KC columns, each with its grid. */
    int wmax = (int)SJ_MAX(NR, B_BUDGET / KC / NR * NR);
    for (int jc = 0; jc < N; jc += wmax) {
        int nc = SJ_MIN(wmax, N - jc), n_jp = SJ_CDIV(nc, NR);
        int n_i, n_j;
        plan_tiles(M, nc, n_ip, n_jp, P, &n_i, &n_j);
        /* K groups: the group's packed B (and shared A) within budget */
        int nkc = SJ_CDIV(K, KC);
        int spc = (int)SJ_MAX(1, B_BUDGET / ((size_t)n_jp * NR * KC));  /* KC steps */
        int share_a = n_j > 1 && (size_t)n_ip * MR * KC <= A_BUDGET;
        if (share_a) spc = SJ_MIN(spc, (int)(A_BUDGET / ((size_t)n_ip * MR * KC)));
        spc = SJ_MIN(spc, nkc);
        /* equal K groups, not a full ones and a short tail */
        int ngroups = SJ_CDIV(nkc, spc);
        spc = SJ_CDIV(nkc, ngroups);
        g.bp = scratch_get(1, (size_t)spc * n_jp * KC * NR);
        g.ap = share_a ? scratch_get(2, (size_t)spc * n_ip * KC * MR) : NULL;
        size_t nctr = (size_t)(n_j + (g.ap ? n_i : 0)) * spc;
        pack_ctr *ctr = (pack_ctr *)scratch_get(3, nctr * sizeof(pack_ctr) / sizeof(float));
        if (!g.bp || !ctr) { gemm_unbuffered(&g, jc); return; }  /* columns jc.. */
        g.jc = jc; g.nc = nc; g.n_ip = n_ip; g.n_jp = n_jp; g.n_i = n_i; g.n_j = n_j;
        g.bctr = ctr; g.actr = ctr + (size_t)n_j * spc;
        for (int q = 0; q < nkc; q += spc) {
            g.k0 = q * KC;
            g.npc = SJ_MIN(spc, nkc - q);
            g.kg = SJ_MIN(K, g.k0 + g.npc * KC) - g.k0;
            memset(ctr, 0, nctr * sizeof(pack_ctr));
            int64_t items = (int64_t)n_i * n_j;
            sj_parallel_for(items, P > 1 ? 1 : items, tile_items, &g);
        }
    }
}

/* Which microkernel this build uses, for benchmark reports. */
const char *const sj_cpu_gemm_isa = SJ_GEMM_ISA;

void sj_cpu_matmul(float *C, const float *A, const float *B, int M, int N, int K,
                   int transA, int transB, int accum) {
    sj_cpu_gemm(C, N, A, transA ? M : K, transA, B, transB ? K : N, transB, M, N, K, accum);
}
