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
 * of a decode step at 512 positions). Must not read past position T - 1. */
#include "infer.h"
#include <math.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

void sj_attn_group(float *out, const float *q, const float *kc, const float *vc, int T, int G, int hd,
                   int ld, float scale, float *sc);

/* out (G, hd) = softmax(q k^T * scale) v for q (G, hd), keys/values at
 * kc/vc + s * ld for s < T. sc: scratch (G, T). */
#if defined(__AVX512F__)
/* e^x, 16 at a time, within 2 ulp of expf (Cephes' polynomial, 2^n by
 * vscalefps, which also underflows to 0 for x < -87): a scalar expf call per
 * score was 15% of decode attention and 10% of prefill. llama.cpp's softmax
 * is vectorised the same way. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

#define MAXR 16   /* zmm registers for the group's queries (and later its outputs) */

/* G and nc = hd / 16 are compile-time constants at every call, so r[] is
 * registers (with runtime bounds GCC keeps it on the stack, through memcpy). */
__attribute__((always_inline)) static inline void
group_512(float *out, const float *q, const float *kc, const float *vc, int T, const int G, const int hd,
          int ld, float scale, float *sc) {
    const int nc = hd / 16;
    __m512 r[MAXR];
    float m[8], inv[8];
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY;
        for (int c = 0; c < nc; c++) r[h * nc + c] = _mm512_loadu_ps(q + h * hd + 16 * c);
    }
    for (int s = 0; s < T; s++) {
        const float *k = kc + (int64_t)s * ld;
        __m512 kv[8];
        for (int c = 0; c < nc; c++) kv[c] = _mm512_loadu_ps(k + 16 * c);
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
        const float *v = vc + (int64_t)s * ld;
        __m512 vv[8];
        for (int c = 0; c < nc; c++) vv[c] = _mm512_loadu_ps(v + 16 * c);
        for (int h = 0; h < G; h++) {
            const __m512 p = _mm512_set1_ps(sc[h * T + s] * inv[h]);
            for (int c = 0; c < nc; c++) r[h * nc + c] = _mm512_fmadd_ps(p, vv[c], r[h * nc + c]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + h * hd + 16 * c, r[h * nc + c]);
}
#endif

void sj_attn_group(float *out, const float *q, const float *kc, const float *vc, int T, int G, int hd,
                   int ld, float scale, float *sc) {
#if defined(__AVX512F__)
#define CASE(g, d) if (G == g && hd == d) { group_512(out, q, kc, vc, T, g, d, ld, scale, sc); return; }
    CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(1, 128) CASE(2, 128)
#undef CASE
#endif
    float m[G], inv[G];
    for (int h = 0; h < G; h++) m[h] = -INFINITY;
    for (int s = 0; s < T; s++) {
        const float *k = kc + (int64_t)s * ld;
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
        const float *v = vc + (int64_t)s * ld;
        for (int h = 0; h < G; h++) {
            float *o = out + h * hd, p = sc[h * T + s] * inv[h];
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}
