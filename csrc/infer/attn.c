/* attn.c — one token's causal attention for the query heads that share one
 * KV head (a GQA group), over the inference engine's KV cache.
 *
 * Why a group at a time: decode attention streams the whole cache of every
 * layer once per token (at 512 positions, 30 layers, fp32: 26 MB for
 * SmolLM2, a fifth of the weight stream), and the old per-head loop read
 * each K/V row once per query head. Here each row is loaded once and used
 * for all G heads. Same arithmetic per head as before (scaled dot, max,
 * expf, normalise, weighted sum of V). With AVX-512 (hd 64 with G <= 4,
 * or hd 128 with G <= 2) the group's queries and outputs live in registers: the
 * portable loops' reductions compile to a serial sum through memory and
 * their output accumulates through memory (measured: attention was a third
 * of a decode step at 512 positions).
 * The cache is f32 or f16 (llama.cpp's default: half the bytes that decode
 * streams). f16 rows are widened in registers (vcvtph2ps; F16C on AVX2),
 * the arithmetic after that is the f32 path's. Must not read past position T - 1. */
#include "infer.h"
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

void sj_attn_group(float *out, const float *q, const void *kc, const void *vc, int kv_f16, int T, int G,
                   int hd, int ld, float scale, float *sc);

/* out (G, hd) = softmax(q k^T * scale) v for q (G, hd), keys/values at
 * kc/vc + s * ld (elements of f32, or f16 when kv_f16) for s < T.
 * sc: scratch (G, T). */
#if defined(__AVX512F__)
#define MAXR 16   /* zmm registers for the group's queries (and later its outputs) */

/* 16 cache elements at p (f32, or f16 widened exactly) as f32. */
static inline __m512 ld16f(const void *p, const int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps(p);
}

/* G and nc = hd / 16 are compile-time constants at every call, so r[] is
 * registers (with runtime bounds GCC keeps it on the stack, through memcpy). */
__attribute__((always_inline)) static inline void
group_512(float *out, const float *q, const void *kc, const void *vc, const int f16, int T, const int G,
          const int hd, int ld, float scale, float *sc) {
    const int nc = hd / 16, es = f16 ? 2 : 4;   /* element size */
    __m512 r[MAXR];
    float m[8], inv[8];
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY;
        for (int c = 0; c < nc; c++) r[h * nc + c] = _mm512_loadu_ps(q + h * hd + 16 * c);
    }
    for (int s = 0; s < T; s++) {
        const char *k = (const char *)kc + (int64_t)s * ld * es;
        __m512 kv[8];
        for (int c = 0; c < nc; c++) kv[c] = ld16f(k + 16 * c * es, f16);
        for (int h = 0; h < G; h++) {
            __m512 a = _mm512_mul_ps(r[h * nc], kv[0]);
            for (int c = 1; c < nc; c++) a = _mm512_fmadd_ps(r[h * nc + c], kv[c], a);
            float d = _mm512_reduce_add_ps(a) * scale;
            sc[h * T + s] = d;
            m[h] = d > m[h] ? d : m[h];
        }
    }
    for (int h = 0; h < G; h++) {
        float *p = sc + (int64_t)h * T;
        const __m512 mh = _mm512_set1_ps(m[h]);
        __m512 sum = _mm512_setzero_ps();
        for (int s = 0; s < T; s += 16) {
            const __mmask16 k = T - s >= 16 ? 0xFFFF : (__mmask16)((1u << (T - s)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + s), mh));
            _mm512_mask_storeu_ps(p + s, k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
        inv[h] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int i = 0; i < G * nc; i++) r[i] = _mm512_setzero_ps();
    for (int s = 0; s < T; s++) {
        const char *v = (const char *)vc + (int64_t)s * ld * es;
        __m512 vv[8];
        for (int c = 0; c < nc; c++) vv[c] = ld16f(v + 16 * c * es, f16);
        for (int h = 0; h < G; h++) {
            const __m512 p = _mm512_set1_ps(sc[h * T + s] * inv[h]);
            for (int c = 0; c < nc; c++) r[h * nc + c] = _mm512_fmadd_ps(p, vv[c], r[h * nc + c]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + h * hd + 16 * c, r[h * nc + c]);
}
#endif

/* Row s of a cache as f32: the row itself (f32), or widened into buf (f16). */
static const float *kv_row(const void *c, int f16, int64_t off, int n, float *buf) {
    if (!f16) return (const float *)c + off;
    const uint16_t *h = (const uint16_t *)c + off;
    int e = 0;
#if defined(__F16C__)
    for (; e + 8 <= n; e += 8) _mm256_storeu_ps(buf + e, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + e))));
#endif
    for (; e < n; e++) buf[e] = sj_f16_to_f32(h[e]);
    return buf;
}

/* The portable loops: the reference the AVX-512 path is checked against. */
static void group_ref(float *out, const float *q, const void *kc, const void *vc, int kv_f16, int T, int G,
                      int hd, int ld, float scale, float *sc) {
    float m[G], inv[G], buf[hd];
    for (int h = 0; h < G; h++) m[h] = -INFINITY;
    for (int s = 0; s < T; s++) {
        const float *k = kv_row(kc, kv_f16, (int64_t)s * ld, hd, buf);
        for (int h = 0; h < G; h++) {
            const float *qh = q + h * hd;
            float d = 0.f;
#pragma omp simd reduction(+:d)
            for (int e = 0; e < hd; e++) d += qh[e] * k[e];
            d *= scale;
            sc[h * T + s] = d;
            m[h] = d > m[h] ? d : m[h];
        }
    }
    for (int h = 0; h < G; h++) {
        float sum = 0.f, *p = sc + (int64_t)h * T;
        for (int s = 0; s < T; s++) { p[s] = expf(p[s] - m[h]); sum += p[s]; }
        inv[h] = 1.0f / sum;
    }
    memset(out, 0, sizeof(float) * G * hd);
    for (int s = 0; s < T; s++) {
        const float *v = kv_row(vc, kv_f16, (int64_t)s * ld, hd, buf);
        for (int h = 0; h < G; h++) {
            float *o = out + h * hd, p = sc[h * T + s] * inv[h];
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}

void sj_attn_group(float *out, const float *q, const void *kc, const void *vc, int kv_f16, int T, int G,
                   int hd, int ld, float scale, float *sc) {
#if defined(__AVX512F__)
#define CASE(g, d) if (G == g && hd == d) { \
        if (kv_f16) group_512(out, q, kc, vc, 1, T, g, d, ld, scale, sc); \
        else group_512(out, q, kc, vc, 0, T, g, d, ld, scale, sc); \
        return; }
    CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(1, 128) CASE(2, 128)
#undef CASE
#endif
    group_ref(out, q, kc, vc, kv_f16, T, G, hd, ld, scale, sc);
}

/* Testing hook: sj_attn_group on f32 and f16 caches against group_ref on
 * the same (f16-rounded) values, for group sizes 1-4, head sizes with and
 * without an AVX-512 case, 1 .. 300 positions. Largest error relative to
 * the output's scale. */
sj_status sj_attn_check(uint64_t seed, double *max_err);
sj_status sj_attn_check(uint64_t seed, double *max_err) {
    const int Ts[] = { 1, 17, 300 }, hds[] = { 64, 128, 32 };
    const int Tmax = 300, hdmax = 128, Gmax = 4, ld = 2 * hdmax + 8;
    sj_rng rng;
    sj_rng_seed(&rng, seed);
    *max_err = 0;
    const size_t nf = (size_t)Tmax * ld * 2 + 4 * (size_t)Gmax * hdmax + (size_t)Gmax * Tmax;
    float *k = sj_alloc(sizeof(float) * nf + 2 * sizeof(uint16_t) * Tmax * ld, "attn check");
    if (!k) return SJ_ERR_NOMEM;
    float *v = k + (size_t)Tmax * ld, *q = v + (size_t)Tmax * ld, *o1 = q + Gmax * hdmax,
          *o2 = o1 + Gmax * hdmax, *o3 = o2 + Gmax * hdmax, *sc = o3 + Gmax * hdmax;
    uint16_t *k16 = (uint16_t *)(sc + (size_t)Gmax * Tmax), *v16 = k16 + (size_t)Tmax * ld;
    for (size_t i = 0; i < (size_t)Tmax * ld; i++) {   /* f16-exact values, so all three see the same */
        k16[i] = sj_f32_to_f16(sj_rng_normal(&rng)); k[i] = sj_f16_to_f32(k16[i]);
        v16[i] = sj_f32_to_f16(sj_rng_normal(&rng)); v[i] = sj_f16_to_f32(v16[i]);
    }
    for (int i = 0; i < Gmax * hdmax; i++) q[i] = 2.f * sj_rng_normal(&rng);
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int G = 1; G <= Gmax; G++) {
                const int T = Ts[a], hd = hds[b];
                group_ref(o1, q, k + 3, v + 3, 0, T, G, hd, ld, 0.125f, sc);   /* odd offsets: unaligned rows */
                sj_attn_group(o2, q, k + 3, v + 3, 0, T, G, hd, ld, 0.125f, sc);
                sj_attn_group(o3, q, k16 + 3, v16 + 3, 1, T, G, hd, ld, 0.125f, sc);
                double scale = 0, err = 0;
                for (int i = 0; i < G * hd; i++) {
                    scale = fmax(scale, fabs(o1[i]));
                    err = fmax(err, fmax(fabs(o2[i] - o1[i]), fabs(o3[i] - o1[i])));
                }
                if (err / (scale + 1e-30) > *max_err) *max_err = err / (scale + 1e-30);
            }
    sj_free(k);
    return SJ_OK;
}
