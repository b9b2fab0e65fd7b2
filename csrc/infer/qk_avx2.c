/* qk_avx2.c — Q8/Q4 weights x 8-bit activations with AVX2 + FMA, for x86
 * without AVX-512 VNNI. One block of 32 per 256-bit register.
 *
 * vpmaddubsw multiplies unsigned by signed bytes into saturating int16
 * pairs. Q8 uses the sign trick (|w| times x with w's sign): |w| <= 128 and
 * |x| <= 127, so a pair sum is at most 32512 and never saturates; Q4 nibbles
 * (<= 15) are unsigned already. vpmaddwd with ones then gives exact int32
 * block sums, scaled by d_w d_x in float as GGML does.
 *
 * Tiles of RT rows x TT tokens share weight and activation loads: 4 x 1 for
 * decode (a GEMV bound by the weight stream), 2 x 4 for prefill (16 ymm
 * registers: 8 accumulators, the weights, their absolute values). */
#include "qkernels.h"
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* Under -march=native on an AVX-512 machine the compiler may still encode
 * these as EVEX: same arithmetic, so SMEDJAN_ISA=avx2 tests this code there. */
#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL __attribute__((always_inline)) static inline

/* 32 weights of block b as bytes: Q8 signed, Q4 nibbles 0..15. */
T256 INL __m256i wblock(const sj_qmat *W, int r, int b, const int q4) {
    if (!q4) {   /* stored + 128 (infer.h): back to signed */
        uint16_t *d;
        const uint8_t *w = sj_q8_block(W, r, b, &d);
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), _mm256_set1_epi8((char)0x80));
    }
    const int nb = W->cols / QK;
    const uint8_t *w = W->q4 + (int64_t)r * W->cols / 2 + 32 * (b >> 1);
    if (b >= (nb & ~1)) {   /* unpaired last block: GGML order */
        const __m128i m4 = _mm_set1_epi8(15), raw = _mm_loadu_si128((const __m128i *)w);
        return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(raw, m4)),
                                       _mm_and_si128(_mm_srli_epi16(raw, 4), m4), 1);
    }
    __m256i raw = _mm256_loadu_si256((const __m256i *)w);
    if (b & 1) raw = _mm256_srli_epi16(raw, 4);
    return _mm256_and_si256(raw, _mm256_set1_epi8(15));
}

T256 INL float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q4's offset term of one (row, token): sum over blocks of m_w * (d_x sum x). */
T256 INL float q4_offset(const uint16_t *m, const float *sx, int nb) {
    __m256 o = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8)
        o = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + b))), _mm256_loadu_ps(sx + b), o);
    float s = hsum(o);
    for (; b < nb; b++) s += _cvtsh_ss(m[b]) * sx[b];
    return s;
}

T256 INL void tile(float *out, int ldo, const sj_qmat *W, int r, const sj_qact *X, int t,
                   const int RT, const int TT, const int q4) {
    const int C = W->cols, nb = C / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    for (int k = 0; k < RT * TT; k++) acc[k] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wv[4], aw[4];
        for (int i = 0; i < RT; i++) {
            wv[i] = wblock(W, r + i, b, q4);
            aw[i] = q4 ? wv[i] : _mm256_sign_epi8(wv[i], wv[i]);
        }
        for (int j = 0; j < TT; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + (int64_t)(t + j) * C + 32 * b));
            const float dx = X->d[(int64_t)(t + j) * nb + b];
            for (int i = 0; i < RT; i++) {
                __m256i sx = q4 ? xv : _mm256_sign_epi8(xv, wv[i]);
                __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[i], sx), ones);
                uint16_t *d = W->d + (int64_t)(r + i) * nb + b;
                if (!q4) sj_q8_block(W, r + i, b, &d);
                __m256 sc = _mm256_set1_ps(_cvtsh_ss(*d) * dx);
                acc[i * TT + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), sc, acc[i * TT + j]);
            }
        }
    }
    for (int i = 0; i < RT; i++)
        for (int j = 0; j < TT; j++) {
            float s = hsum(acc[i * TT + j]);
            if (q4) s += q4_offset(W->m + (int64_t)(r + i) * nb, X->s + (int64_t)(t + j) * nb, nb);
            out[(int64_t)(t + j) * ldo + r + i] = s;
        }
}

/* Decode: RT rows x one token. d_w d_x for 8 blocks per row is one convert
 * and one multiply; each block's product is then one permute (a scalar fp16
 * convert, multiply and broadcast per block and row made this 2x slower). */
T256 INL void gemv_tile(float *out, const sj_qmat *W, int r, const sj_qact *X, int t, const int RT, const int q4) {
    const int C = W->cols, nb = C / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq = X->q + (int64_t)t * C;
    const float *dx = X->d + (int64_t)t * nb;
    __m256 acc[4];
    for (int i = 0; i < RT; i++) acc[i] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 8) {
        const int n8 = SJ_MIN(8, nb - b0);
        __m256 sc[4];
        if (n8 == 8) {
            const __m256 d = _mm256_loadu_ps(dx + b0);
            for (int i = 0; i < RT; i++)
                sc[i] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(W->d + (int64_t)(r + i) * nb + b0))), d);
        } else {   /* last few blocks: through a zero-padded copy, never past the row */
            float d8[8] = { 0 };
            uint16_t w8[8] = { 0 };
            memcpy(d8, dx + b0, sizeof(float) * n8);
            for (int i = 0; i < RT; i++) {
                memcpy(w8, W->d + (int64_t)(r + i) * nb + b0, sizeof(uint16_t) * n8);
                sc[i] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w8)), _mm256_loadu_ps(d8));
            }
        }
        for (int b = b0; b < b0 + n8; b++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
            const __m256i lane = _mm256_set1_epi32(b - b0);
            for (int i = 0; i < RT; i++) {
                if (!(b & 1)) {   /* the same line 2 tiles ahead: more loads in flight than the core's own */
                    const int64_t bytes = q4 ? C / 2 : C;
                    const uint8_t *w = (q4 ? W->q4 : (const uint8_t *)W->q8) + (int64_t)(r + i + 2 * RT) * bytes + (q4 ? 16 : 32) * b;
                    _mm_prefetch((const char *)w, _MM_HINT_T0);
                }
                const __m256i wv = wblock(W, r + i, b, q4);
                const __m256i aw = q4 ? wv : _mm256_sign_epi8(wv, wv);
                const __m256i sx = q4 ? xv : _mm256_sign_epi8(xv, wv);
                const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_permutevar8x32_ps(sc[i], lane), acc[i]);
            }
        }
    }
    for (int i = 0; i < RT; i++) {
        float s = hsum(acc[i]);
        if (q4) s += q4_offset(W->m + (int64_t)(r + i) * nb, X->s + (int64_t)t * nb, nb);
        out[r + i] = s;
    }
}

/* Decode, Q8: one group of 4 rows (infer.h's layout) x one token, written
 * for the rows in [r0, r1): one contiguous stream. d_w d_x of a pair of
 * blocks for the 4 rows is one convert and one multiply, then one permute
 * per block and row. */
T256 static void gemv_q8_group(float *out, const sj_qmat *W, int g, int r0, int r1, const sj_qact *X, int t) {
    const int C = W->cols, nb = C / QK, np = nb / 2;
    const uint8_t *c = (const uint8_t *)W->q8 + (int64_t)g * (SJ_Q8_RG * 34) * nb;
    const int8_t *xq = X->q + (int64_t)t * C;
    const float *dx = X->d + (int64_t)t * nb;
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int b = 0; b < nb; b++) {
        const int h = b & 1, paired = b < 2 * np;
        const uint8_t *cp = paired ? c + (int64_t)(b >> 1) * (SJ_Q8_RG * 68) : c + (int64_t)np * (SJ_Q8_RG * 68);
        uint16_t d4[8];   /* the 4 rows' scales of block b */
        for (int i = 0; i < 4; i++) memcpy(&d4[i], cp + (paired ? 4 * i + 2 * h : 2 * i), 2);
        const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadl_epi64((const __m128i *)d4)), _mm256_set1_ps(dx[b]));
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        for (int i = 0; i < 4; i++) {
            const uint8_t *w = paired ? cp + 16 + 64 * i + 32 * h : cp + 8 + 32 * i;
            const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), bias);
            const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(i)), acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        const int r = g * SJ_Q8_RG + i;
        if (r >= r0 && r < r1) out[r] = hsum(acc[i]);
    }
}

T256 INL void rows(float *out, int ldo, const sj_qmat *W, int r, const sj_qact *X, int t0, int t1,
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

/* decode: 4 rows per tile; prefill: 2 rows x 4 tokens */
T256 INL void kernel(float *out, int ldo, const sj_qmat *W, int r0, int r1, const sj_qact *X, int t0, int t1,
                     const int q4) {
    int r = r0;
    if (t1 - t0 == 1 && q4) for (; r + 4 <= r1; r += 4) rows(out, ldo, W, r, X, t0, t1, 4, q4);   /* gemv_tile (Q8 decode: gemv_q8_group) */
    for (; r + 2 <= r1; r += 2) rows(out, ldo, W, r, X, t0, t1, 2, q4);
    for (; r < r1; r++) rows(out, ldo, W, r, X, t0, t1, 1, q4);
}

T256 static void kernel_q8(float *out, int ldo, const sj_qmat *W, int r0, int r1, const sj_qact *X, int t0, int t1) {
    if (t1 - t0 == 1) {   /* whole groups; a group split between two callers is computed by both */
        for (int g = r0 / SJ_Q8_RG; g * SJ_Q8_RG < r1; g++) gemv_q8_group(out + (int64_t)t0 * ldo, W, g, r0, r1, X, t0);
        return;
    }
    kernel(out, ldo, W, r0, r1, X, t0, t1, 0);
}
T256 static void kernel_q4(float *out, int ldo, const sj_qmat *W, int r0, int r1, const sj_qact *X, int t0, int t1) {
    kernel(out, ldo, W, r0, r1, X, t0, t1, 1);
}

void sj_qkernel_avx2(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                     const sj_qact *X, int t0, int t1) {
    if (W->type == SJ_W_Q4) kernel_q4(out, ldo, W, r0, r1, X, t0, t1);
    else kernel_q8(out, ldo, W, r0, r1, X, t0, t1);
}

#else
void sj_qkernel_avx2(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                     const sj_qact *X, int t0, int t1) {
    (void)out; (void)ldo; (void)W; (void)r0; (void)r1; (void)X; (void)t0; (void)t1;
}
#endif
