/* qk_avx512.c — Q8/Q4 weights x 8-bit activations with AVX-512 VNNI.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so Q8 weights are stored
 * + 128 (infer.h's repacked layout) and the
 * activation side starts each block's sum at -128 sum(x) (sj_qact.c2): the
 * integer block sums are exact, as GGML's. Q4 nibbles are unsigned already.
 * Two blocks per 512-bit register (lanes 0-7 and 8-15), so one fmadd
 * applies both block scales.
 *
 * One tile = RT rows x TT tokens: each weight vector is loaded once per tile
 * and each activation vector once per tile, RT x TT independent accumulator
 * chains hide the fmadd latency. Decode (one token) is a GEMV bound by the
 * weight stream (it reads each weight byte once per token): Q8 one 4-row
 * group at a time (gemv_q8_group: 1 thread ~18 GB/s on the Zen 4 test
 * machine, the row-major layout it replaced 8-9), Q4 2-row tiles (gemv_tile);
 * prefill runs 4 x 4 tiles: bound by vpdpbusd + scale arithmetic, each weight
 * row stays in L1 while the caller's block of tokens streams from L2.
 * Never reads past a row except within sj_qmat's 64-byte tail slack. */
#include "qkernels.h"
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define INL __attribute__((always_inline)) static inline
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
#ifndef PF_TILES
#define PF_TILES 2   /* decode: prefetch the tile 2 ahead; measured q8 decode -12% time vs none, 8 ahead between */
#endif

/* The fp16 scales of blocks 2p, 2p+1 spread over lanes 0-7 and 8-15 (half:
 * only block 2p exists; the upper lanes are zero, never a neighbour's bytes). */
T512 INL __m512 spread2(const uint16_t *dw, int half) {
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    uint32_t two;
    if (half) two = dw[0];
    else memcpy(&two, dw, 4);
    __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)two));
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

/* 64 weights of pair p as unsigned bytes. Q8: w + 128. Q4: the pair's 32
 * bytes unpack to 64 consecutive nibbles (infer.h); an unpaired last block
 * is in GGML order (byte k: elements k and k + 16). */
T512 INL __m512i wpair(const sj_qmat *W, int r, int p, int half, const int q4) {
    if (!q4) {   /* stored + 128 already (infer.h) */
        uint16_t *d;
        const uint8_t *w = sj_q8_block(W, r, 2 * p, &d);
        return half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w) : _mm512_loadu_si512(w);
    }
    const uint8_t *w = W->q4 + (int64_t)r * W->cols / 2 + 32 * p;
    if (half) {
        const __m128i m4 = _mm_set1_epi8(15), raw = _mm_loadu_si128((const __m128i *)w);
        __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(raw, m4)),
                                            _mm_and_si128(_mm_srli_epi16(raw, 4), m4), 1);
        return _mm512_zextsi256_si512(v);
    }
    const __m256i m4 = _mm256_set1_epi8(15), raw = _mm256_loadu_si256((const __m256i *)w);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m4)),
                              _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), 1);
}

/* acc[i][j] += pair p of row r+i . token t+j */
T512 INL void pair_step(__m512 *acc, const sj_qmat *W, int r, const sj_qact *X, int t, int p, int half,
                        const int RT, const int TT, const int q4) {
    const int C = W->cols, nb = C / QK, npc = (nb + 1) / 2;
    __m512i wv[4];
    __m512 sw[4];
    for (int i = 0; i < RT; i++) {
        wv[i] = wpair(W, r + i, p, half, q4);
        uint16_t *d = W->d + (int64_t)(r + i) * nb + 2 * p;
        if (!q4) sj_q8_block(W, r + i, 2 * p, &d);   /* the pair's two scales are adjacent there too */
        sw[i] = spread2(d, half);
    }
    for (int j = 0; j < TT; j++) {
        const int64_t tp = (int64_t)(t + j) * npc + p;
        const int8_t *x = X->q + (int64_t)(t + j) * C + 64 * p;
        __m512i xv = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, x) : _mm512_loadu_si512(x);
        __m512 dx = _mm512_loadu_ps(X->d2 + tp * 16);
        __m512i c0 = q4 ? _mm512_setzero_si512() : _mm512_loadu_si512(X->c2 + tp * 16);
        for (int i = 0; i < RT; i++)
            acc[i * TT + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c0, wv[i], xv)),
                                              _mm512_mul_ps(sw[i], dx), acc[i * TT + j]);
    }
}

/* out for rows r .. r+RT-1, tokens t .. t+TT-1. */
T512 INL void tile(float *out, int ldo, const sj_qmat *W, int r, const sj_qact *X, int t,
                   const int RT, const int TT, const int q4) {
    const int nb = W->cols / QK, np = nb / 2;
    __m512 acc[16];
    for (int k = 0; k < RT * TT; k++) acc[k] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) pair_step(acc, W, r, X, t, p, 0, RT, TT, q4);
    if (nb & 1) pair_step(acc, W, r, X, t, np, 1, RT, TT, q4);
    if (q4)   /* the offset: sum over blocks of m_w * (d_x sum x) */
        for (int b = 0; b < nb; b += 16) {
            const __mmask16 k = nb - b >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            for (int i = 0; i < RT; i++) {
                __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, W->m + (int64_t)(r + i) * nb + b));
                for (int j = 0; j < TT; j++)
                    acc[i * TT + j] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(k, X->s + (int64_t)(t + j) * nb + b),
                                                      acc[i * TT + j]);
            }
        }
    for (int i = 0; i < RT; i++)
        for (int j = 0; j < TT; j++) out[(int64_t)(t + j) * ldo + r + i] = _mm512_reduce_add_ps(acc[i * TT + j]);
}

/* Decode, Q4: RT rows x one token. The products d_w d_x of 16 blocks take one
 * multiply per row, then one permute spreads each pair's two: 5 vector ops
 * per row and pair of blocks instead of 9 (the weight stream only reaches
 * DRAM speed when the core keeps enough loads in flight, i.e. is not busy). */
T512 INL void gemv_step(__m512 *acc, const sj_qmat *W, int r, const sj_qact *X, int t, int p, int half,
                        __m512i idx, const __m512 *sc, const int RT, const int q4) {
    const int C = W->cols, npc = (C / QK + 1) / 2;
    __m512i wv[4];
    for (int i = 0; i < RT; i++) {
#if PF_TILES
        const int64_t bytes = q4 ? C / 2 : C;
        const uint8_t *w = (q4 ? W->q4 : (const uint8_t *)W->q8) + (int64_t)(r + i + PF_TILES * RT) * bytes + (q4 ? 32 : 64) * p;
        _mm_prefetch((const char *)w, PF_HINT);
#endif
        wv[i] = wpair(W, r + i, p, half, q4);
    }
    const int8_t *x = X->q + (int64_t)t * C + 64 * p;
    const __m512i xv = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, x) : _mm512_loadu_si512(x);
    const __m512i c0 = q4 ? _mm512_setzero_si512() : _mm512_loadu_si512(X->c2 + ((int64_t)t * npc + p) * 16);
    for (int i = 0; i < RT; i++)
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c0, wv[i], xv)),
                                 _mm512_permutexvar_ps(idx, sc[i]), acc[i]);
}

T512 INL void gemv_tile(float *out, const sj_qmat *W, int r, const sj_qact *X, int t, const int RT, const int q4) {
    const int nb = W->cols / QK, np = nb / 2;
    const float *dx = X->d + (int64_t)t * nb;
    __m512 acc[4];
    for (int i = 0; i < RT; i++) acc[i] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const __mmask16 k = nb - b0 >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b0)) - 1);
        const __m512 dxv = _mm512_maskz_loadu_ps(k, dx + b0);
        __m512 sc[4];   /* blocks past the end are zero */
        for (int i = 0; i < RT; i++)
            sc[i] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, W->d + (int64_t)(r + i) * nb + b0)), dxv);
        __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const int p1 = SJ_MIN(np, b0 / 2 + 8);
        for (int p = b0 / 2; p < p1; p++) {
            gemv_step(acc, W, r, X, t, p, 0, idx, sc, RT, q4);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
        }
        if ((nb & 1) && np == p1 && np < b0 / 2 + 8) gemv_step(acc, W, r, X, t, np, 1, idx, sc, RT, q4);
    }
    if (q4)
        for (int b = 0; b < nb; b += 16) {
            const __mmask16 k = nb - b >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            const __m512 s = _mm512_maskz_loadu_ps(k, X->s + (int64_t)t * nb + b);
            for (int i = 0; i < RT; i++)
                acc[i] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, W->m + (int64_t)(r + i) * nb + b)), s, acc[i]);
        }
    for (int i = 0; i < RT; i++) out[r + i] = _mm512_reduce_add_ps(acc[i]);
}

/* Decode, Q8: one group of 4 rows (infer.h's layout) x one token, written
 * for the rows in [r0, r1). The group is one contiguous stream: per pair of
 * blocks, 16 bytes of scales then 4 x 64 weights. d_w d_x of the pair for all
 * 4 rows is one convert and one multiply; per row and pair: load, vpdpbusd,
 * convert, permute (each block's scale over its 8 lanes), fmadd. Bound: the
 * weight stream from DRAM. */
T512 static void gemv_q8_group(float *out, const sj_qmat *W, int g, int r0, int r1, const sj_qact *X, int t) {
    const int C = W->cols, nb = C / QK, np = nb / 2, npc = (nb + 1) / 2;
    const uint8_t *c = (const uint8_t *)W->q8 + (int64_t)g * (SJ_Q8_RG * 34) * nb;
    const int8_t *xq = X->q + (int64_t)t * C;
    const float *dx = X->d + (int64_t)t * nb;
    const int32_t *c2 = X->c2 + (int64_t)t * npc * 16;
    __m512i idx[4];
    for (int i = 0; i < 4; i++)
        idx[i] = _mm512_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i,
                                   2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1);
    __m512 acc[4] = { _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps() };
    for (int p = 0; p < np; p++, c += SJ_Q8_RG * 68) {
        /* (d_w0 d_x0, d_w1 d_x1) for rows 0..3: dx of the pair broadcast as one 64-bit lane */
        const __m256 dxx = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(dx + 2 * p)));
        const __m512 s8 = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)c)), dxx));
        const __m512i xv = _mm512_loadu_si512(xq + 64 * p), c0 = _mm512_loadu_si512(c2 + 16 * p);
        for (int i = 0; i < 4; i++) {
            const __m512i wv = _mm512_loadu_si512(c + 16 + 64 * i);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c0, wv, xv)),
                                     _mm512_permutexvar_ps(idx[i], s8), acc[i]);
        }
    }
    if (nb & 1) {   /* the unpaired last block: 4 scales, 4 x 32 weights; upper lanes zero */
        const __m256 dxx = _mm256_set1_ps(dx[2 * np]);
        const __m512 s4 = _mm512_castps256_ps512(_mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadl_epi64((const __m128i *)c)), dxx));
        const __m512i xv = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq + 64 * np);
        const __m512i c0 = _mm512_loadu_si512(c2 + 16 * np);
        for (int i = 0; i < 4; i++) {
            const __m512i wv = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, c + 8 + 32 * i);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c0, wv, xv)),
                                     _mm512_maskz_permutexvar_ps(0x00FF, _mm512_set1_epi32(i), s4), acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        const int r = g * SJ_Q8_RG + i;
        if (r >= r0 && r < r1) out[r] = _mm512_reduce_add_ps(acc[i]);
    }
}

T512 INL void rows(float *out, int ldo, const sj_qmat *W, int r, const sj_qact *X, int t0, int t1,
                   const int RT, const int q4) {
    int t = t0;
    if (t1 - t0 == 1 && q4) { gemv_tile(out + (int64_t)t * ldo, W, r, X, t, RT, q4); return; }
    for (; t + 4 <= t1; t += 4) tile(out, ldo, W, r, X, t, RT, 4, q4);
    switch (t1 - t) {
    case 3: tile(out, ldo, W, r, X, t, RT, 3, q4); break;
    case 2: tile(out, ldo, W, r, X, t, RT, 2, q4); break;
    case 1: tile(out, ldo, W, r, X, t, RT, 1, q4); break;
    }
}

#ifndef DEC_RT
#define DEC_RT 2   /* decode: 2-row tiles measured best of 1, 2, 4 (within a few %) */
#endif
T512 static void kernel_q8(float *out, int ldo, const sj_qmat *W, int r0, int r1, const sj_qact *X, int t0, int t1) {
    int r = r0;
    if (t1 - t0 == 1) {   /* whole groups; a group split between two callers is computed by both */
        for (int g = r0 / SJ_Q8_RG; g * SJ_Q8_RG < r1; g++) gemv_q8_group(out + (int64_t)t0 * ldo, W, g, r0, r1, X, t0);
        return;
    }
    for (; r + 4 <= r1; r += 4) rows(out, ldo, W, r, X, t0, t1, 4, 0);
    for (; r < r1; r++) rows(out, ldo, W, r, X, t0, t1, 1, 0);
}

T512 static void kernel_q4(float *out, int ldo, const sj_qmat *W, int r0, int r1, const sj_qact *X, int t0, int t1) {
    int r = r0;
    if (t1 - t0 == 1) for (; r + DEC_RT <= r1; r += DEC_RT) rows(out, ldo, W, r, X, t0, t1, DEC_RT, 1);
    for (; r + 4 <= r1; r += 4) rows(out, ldo, W, r, X, t0, t1, 4, 1);
    for (; r < r1; r++) rows(out, ldo, W, r, X, t0, t1, 1, 1);
}

void sj_qkernel_avx512vnni(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                           const sj_qact *X, int t0, int t1) {
    if (W->type == SJ_W_Q4) kernel_q4(out, ldo, W, r0, r1, X, t0, t1);
    else kernel_q8(out, ldo, W, r0, r1, X, t0, t1);
}

#else
void sj_qkernel_avx512vnni(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                           const sj_qact *X, int t0, int t1) {
    (void)out; (void)ldo; (void)W; (void)r0; (void)r1; (void)X; (void)t0; (void)t1;
}
#endif
