/* attn.c — causal attention over the inference engine's KV cache: one
 * token's query heads that share one KV head (a GQA group; decode), and
 * tiles of consecutive tokens of one head (prefill, below).
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
 * the arithmetic after that is the f32 path's.
 * Keys come as spans of consecutive cache rows (sj_kv_span): one for the
 * whole-context cache, up to three for a sliding window (the ring buffer's
 * two runs and the chunk's fresh rows), read in order: position order.
 * Must not read past a span's last row. */
#include "infer.h"
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* out (G, hd) = softmax(q k^T * scale) v for q (G, hd) over the rows of
 * the spans (row r of a span at its k/v + r * ld elements of f32, or f16
 * when kv_f16). sc: scratch (G, T), T = the spans' rows. */
#if defined(__AVX512F__)
#define MAXR 16   /* zmm registers for the group's queries (and later its outputs) */

/* 16 cache elements at p (f32, or f16 widened exactly) as f32. */
static inline __m512 ld16f(const void *p, const int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps(p);
}

/* p[0..n) = exp(p - max) in place; returns 1 / their sum (softmax's
 * normaliser). max: the row's maximum (exp512's range assumes <= 0). */
static inline float exp_row_512(float *p, int n, float max) {
    const __m512 mh = _mm512_set1_ps(max);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + i), mh));
        _mm512_mask_storeu_ps(p + i, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* G and nc = hd / 16 are compile-time constants at every call, so r[] is
 * registers (with runtime bounds GCC keeps it on the stack, through memcpy). */
__attribute__((always_inline)) static inline void
group_512(float *out, const float *q, const sj_kv_span *sp, int nsp, const int f16, int T, const int G,
          const int hd, int ld, float scale, float *sc) {
    const int nc = hd / 16, es = f16 ? 2 : 4;   /* element size */
    __m512 r[MAXR];
    float m[8], inv[8];
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY;
        for (int c = 0; c < nc; c++) r[h * nc + c] = _mm512_loadu_ps(q + h * hd + 16 * c);
    }
    for (int i = 0, s = 0; i < nsp; i++)
    for (int row = 0; row < sp[i].n; row++, s++) {
        const char *k = (const char *)sp[i].k + (int64_t)row * ld * es;
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
    for (int h = 0; h < G; h++) inv[h] = exp_row_512(sc + (int64_t)h * T, T, m[h]);
    for (int i = 0; i < G * nc; i++) r[i] = _mm512_setzero_ps();
    for (int i = 0, s = 0; i < nsp; i++)
    for (int row = 0; row < sp[i].n; row++, s++) {
        const char *v = (const char *)sp[i].v + (int64_t)row * ld * es;
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
static void group_ref(float *out, const float *q, const sj_kv_span *sp, int nsp, int kv_f16, int T, int G,
                      int hd, int ld, float scale, float *sc) {
    float m[G], inv[G], buf[hd];
    for (int h = 0; h < G; h++) m[h] = -INFINITY;
    for (int i = 0, s = 0; i < nsp; i++)
    for (int row = 0; row < sp[i].n; row++, s++) {
        const float *k = kv_row(sp[i].k, kv_f16, (int64_t)row * ld, hd, buf);
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
    for (int i = 0, s = 0; i < nsp; i++)
    for (int row = 0; row < sp[i].n; row++, s++) {
        const float *v = kv_row(sp[i].v, kv_f16, (int64_t)row * ld, hd, buf);
        for (int h = 0; h < G; h++) {
            float *o = out + h * hd, p = sc[h * T + s] * inv[h];
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}

/* ---- prefill: tiles of TQ query tokens of one head ----------------------------
 * Why: per-token attention re-reads (and, for f16, re-widens) every K/V row
 * for each query token, and reduces each 16-lane dot product on its own
 * (a horizontal sum per score). A tile of TQ consecutive tokens of one head
 * widens each row once for the TQ queries and reduces their TQ dot products
 * together (one 4-way transpose-add). Token j of the tile (position
 * T0 - 1 + j) attends to s < T0 + j: the causal mask only touches the last
 * TQ - 1 rows. Two passes over the tile's scores, as the per-token path
 * (the block fits L2 at any prompt we run; no online rescaling needed).
 * The queries of a tile are q + j * ldq, its outputs out + j * ldq. */
#define TQ SJ_ATTN_TQ

/* The portable loops: the reference the AVX-512 tile is checked against.
 * sc: scratch (T0 + nt - 1, TQ). */
static void tile_ref(float *out, const float *q, int ldq, const void *kc, const void *vc, int kv_f16, int T0,
                     int nt, int hd, int ld, float scale, float *sc) {
    const int T = T0 + nt - 1;
    float m[TQ], inv[TQ], buf[hd];
    for (int j = 0; j < nt; j++) m[j] = -INFINITY;
    for (int s = 0; s < T; s++) {
        const float *k = kv_row(kc, kv_f16, (int64_t)s * ld, hd, buf);
        for (int j = 0; j < nt; j++) {
            const float *qj = q + (int64_t)j * ldq;
            float d = 0.f;
#pragma omp simd reduction(+:d)
            for (int e = 0; e < hd; e++) d += qj[e] * k[e];
            d = s < T0 + j ? d * scale : -INFINITY;
            sc[s * TQ + j] = d;
            m[j] = d > m[j] ? d : m[j];
        }
    }
    for (int j = 0; j < nt; j++) {
        float sum = 0.f;
        for (int s = 0; s < T; s++) { float e = expf(sc[s * TQ + j] - m[j]); sc[s * TQ + j] = e; sum += e; }
        inv[j] = 1.0f / sum;
    }
    for (int j = 0; j < nt; j++) memset(out + (int64_t)j * ldq, 0, sizeof(float) * hd);
    for (int s = 0; s < T; s++) {
        const float *v = kv_row(vc, kv_f16, (int64_t)s * ld, hd, buf);
        for (int j = 0; j < nt; j++) {
            float *o = out + (int64_t)j * ldq, p = sc[s * TQ + j] * inv[j];
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}

#if defined(__AVX512F__)
/* The 4 queries' dot products with one key row (a[j]: 16 partial sums each)
 * reduced together, with the exact tree of _mm512_reduce_add_ps (halves
 * 256, 128, then lanes 2, 1): query j's total lands in lane 4j, bitwise what
 * group_512 gets for it. */
static inline __m512 reduce4(const __m512 *a) {
    const __m512 c01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 c23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_add_ps(e, _mm512_permute_ps(e, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Head size 64: the tile's 4 x 4 query registers, then its 4 x 4 output
 * accumulators, stay in zmm registers. Targets the FMA rate: per key row 16
 * FMAs for the scores (+ ~4 shuffles/adds per score for the reductions) and
 * 16 for the output, where the per-token path spent 4 FMAs + ~8 per score
 * and widened each f16 row once per token. Every value is bitwise what
 * group_512 (G = 1) gives token by token: same dot order, reduction tree,
 * softmax loop and accumulation order (masked rows add p = 0, exact), so
 * batched prefill and decode keep identical arithmetic.
 * sc: scratch (TQ, T0 + TQ - 1), row j for token j. */
__attribute__((always_inline)) static inline void
tile_512(float *out, const float *q, int ldq, const void *kc, const void *vc, const int f16, int T0, int ld,
         float scale, float *sc) {
    enum { NC = 4 };   /* hd 64 = 4 x 16 */
    const int es = f16 ? 2 : 4, T = T0 + TQ - 1;
    __m512 r[TQ * NC];
    const __m512 sv = _mm512_set1_ps(scale);
    for (int j = 0; j < TQ; j++)
        for (int c = 0; c < NC; c++) r[j * NC + c] = _mm512_loadu_ps(q + (int64_t)j * ldq + 16 * c);
#define DOTS(f, s) do { \
        const char *k_ = (const char *)kc + (int64_t)(s) * ld * es; \
        __m512 kv_[NC], a_[TQ]; \
        for (int c = 0; c < NC; c++) kv_[c] = ld16f(k_ + 16 * c * es, f16); \
        for (int j = 0; j < TQ; j++) { \
            a_[j] = _mm512_mul_ps(r[j * NC], kv_[0]); \
            for (int c = 1; c < NC; c++) a_[j] = _mm512_fmadd_ps(r[j * NC + c], kv_[c], a_[j]); \
        } \
        f = _mm512_mul_ps(reduce4(a_), sv); } while (0)
    int s = 0;
    for (; s + 4 <= T; s += 4) {   /* 4 rows: lane 4j + i = row s + i of token j */
        __m512 f0, f1, f2, f3;
        DOTS(f0, s); DOTS(f1, s + 1); DOTS(f2, s + 2); DOTS(f3, s + 3);
        __m512 g = _mm512_mask_blend_ps(0x2222, f0, _mm512_permute_ps(f1, 0));
        g = _mm512_mask_blend_ps(0x4444, g, _mm512_permute_ps(f2, 0));
        g = _mm512_mask_blend_ps(0x8888, g, _mm512_permute_ps(f3, 0));
        _mm_storeu_ps(sc + s, _mm512_extractf32x4_ps(g, 0));
        _mm_storeu_ps(sc + T + s, _mm512_extractf32x4_ps(g, 1));
        _mm_storeu_ps(sc + 2 * T + s, _mm512_extractf32x4_ps(g, 2));
        _mm_storeu_ps(sc + 3 * T + s, _mm512_extractf32x4_ps(g, 3));
    }
    for (; s < T; s++) {
        __m512 f;
        DOTS(f, s);
        sc[s] = _mm_cvtss_f32(_mm512_extractf32x4_ps(f, 0));
        sc[T + s] = _mm_cvtss_f32(_mm512_extractf32x4_ps(f, 1));
        sc[2 * T + s] = _mm_cvtss_f32(_mm512_extractf32x4_ps(f, 2));
        sc[3 * T + s] = _mm_cvtss_f32(_mm512_extractf32x4_ps(f, 3));
    }
#undef DOTS
    float inv[TQ];
    for (int j = 0; j < TQ; j++) {   /* token j: its T0 + j scores, as group_512 */
        float *p = sc + (int64_t)j * T;
        const int Tj = T0 + j;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < Tj; i += 16) {
            const __mmask16 km = Tj - i >= 16 ? 0xFFFF : (__mmask16)((1u << (Tj - i)) - 1);
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, km, p + i));
        }
        inv[j] = exp_row_512(p, Tj, _mm512_reduce_max_ps(mx));
        for (int i = Tj; i < T; i++) p[i] = 0.f;   /* causal mask: rows past the token add exactly 0 */
    }
    for (int i = 0; i < TQ * NC; i++) r[i] = _mm512_setzero_ps();
    for (s = 0; s < T; s++) {
        const char *v = (const char *)vc + (int64_t)s * ld * es;
        __m512 vv[NC];
        for (int c = 0; c < NC; c++) vv[c] = ld16f(v + 16 * c * es, f16);
        for (int j = 0; j < TQ; j++) {
            const __m512 p = _mm512_set1_ps(sc[j * T + s] * inv[j]);
            for (int c = 0; c < NC; c++) r[j * NC + c] = _mm512_fmadd_ps(p, vv[c], r[j * NC + c]);
        }
    }
    for (int j = 0; j < TQ; j++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(out + (int64_t)j * ldq + 16 * c, r[j * NC + c]);
}
#endif

int sj_attn_tile_fast(int hd) {
#if defined(__AVX512F__)
    return hd == 64;
#else
    (void)hd;
    return 0;
#endif
}

void sj_attn_tile(float *out, const float *q, int ldq, const void *kc, const void *vc, int kv_f16, int T0, int nt,
                  int hd, int ld, float scale, float *sc) {
#if defined(__AVX512F__)
    if (nt == TQ && hd == 64) {
        if (kv_f16) tile_512(out, q, ldq, kc, vc, 1, T0, ld, scale, sc);
        else tile_512(out, q, ldq, kc, vc, 0, T0, ld, scale, sc);
        return;
    }
    if (hd == 64) {   /* a last partial tile: token by token, as decode */
        for (int j = 0; j < nt; j++) {
            const sj_kv_span sp = { kc, vc, T0 + j };
            sj_attn_group(out + (int64_t)j * ldq, q + (int64_t)j * ldq, &sp, 1, kv_f16, 1, hd, ld, scale, sc);
        }
        return;
    }
#endif
    tile_ref(out, q, ldq, kc, vc, kv_f16, T0, nt, hd, ld, scale, sc);
}

void sj_attn_group(float *out, const float *q, const sj_kv_span *sp, int nsp, int kv_f16, int G,
                   int hd, int ld, float scale, float *sc) {
    int T = 0;
    for (int i = 0; i < nsp; i++) T += sp[i].n;
#if defined(__AVX512F__)
#define CASE(g, d) if (G == g && hd == d) { \
        if (kv_f16) group_512(out, q, sp, nsp, 1, T, g, d, ld, scale, sc); \
        else group_512(out, q, sp, nsp, 0, T, g, d, ld, scale, sc); \
        return; }
    CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(1, 128) CASE(2, 128)
#undef CASE
#endif
    group_ref(out, q, sp, nsp, kv_f16, T, G, hd, ld, scale, sc);
}

/* Testing hook: sj_attn_group on f32 and f16 caches against group_ref on
 * the same (f16-rounded) values, for group sizes 1-4, head sizes with and
 * without an AVX-512 case, 1 .. 300 positions, and the same rows as three
 * spans bitwise as one; and prefill tiles (sj_attn_tile
 * on both caches, and tile_ref) of 1-4 tokens against group_ref token by
 * token, and the fast tile bitwise against sj_attn_group (what decode runs). Largest error relative to the output's scale. */
sj_status sj_attn_check(uint64_t seed, double *max_err) {
    const int Ts[] = { 1, 17, 297 }, hds[] = { 64, 128, 32 };
    const int Tmax = 300, hdmax = 128, Gmax = 4, ld = 2 * hdmax + 8, ldq = 3 * hdmax + 5;
    sj_rng rng;
    sj_rng_seed(&rng, seed);
    *max_err = 0;
    const size_t nsc = (size_t)Gmax * (Tmax + TQ), nf = (size_t)Tmax * ld * 2 + 4 * (size_t)Gmax * hdmax + nsc +
                       4 * (size_t)TQ * ldq;
    float *k = sj_alloc(sizeof(float) * nf + 2 * sizeof(uint16_t) * Tmax * ld, "attn check");
    if (!k) return SJ_ERR_NOMEM;
    float *v = k + (size_t)Tmax * ld, *q = v + (size_t)Tmax * ld, *o1 = q + Gmax * hdmax,
          *o2 = o1 + Gmax * hdmax, *o3 = o2 + Gmax * hdmax, *sc = o3 + Gmax * hdmax;
    float *qt = sc + nsc, *t1 = qt + TQ * ldq, *t2 = t1 + TQ * ldq, *t3 = t2 + TQ * ldq;
    uint16_t *k16 = (uint16_t *)(t3 + TQ * ldq), *v16 = k16 + (size_t)Tmax * ld;
    for (size_t i = 0; i < (size_t)Tmax * ld; i++) {   /* f16-exact values, so all three see the same */
        k16[i] = sj_f32_to_f16(sj_rng_normal(&rng)); k[i] = sj_f16_to_f32(k16[i]);
        v16[i] = sj_f32_to_f16(sj_rng_normal(&rng)); v[i] = sj_f16_to_f32(v16[i]);
    }
    for (int i = 0; i < Gmax * hdmax; i++) q[i] = 2.f * sj_rng_normal(&rng);
    for (int i = 0; i < TQ * ldq; i++) qt[i] = 2.f * sj_rng_normal(&rng);
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            const int T = Ts[a], hd = hds[b];
            /* odd offsets: unaligned rows */
            const sj_kv_span one = { k + 3, v + 3, T }, one16 = { k16 + 3, v16 + 3, T };
            const int a = T / 3, b = 2 * T / 3;
            const sj_kv_span three[3] = { { k + 3, v + 3, a }, { k + 3 + (int64_t)a * ld, v + 3 + (int64_t)a * ld, b - a },
                                          { k + 3 + (int64_t)b * ld, v + 3 + (int64_t)b * ld, T - b } };
            for (int G = 1; G <= Gmax; G++) {
                group_ref(o1, q, &one, 1, 0, T, G, hd, ld, 0.125f, sc);
                sj_attn_group(o2, q, &one, 1, 0, G, hd, ld, 0.125f, sc);
                sj_attn_group(o3, q, three, 3, 0, G, hd, ld, 0.125f, sc);
                if (memcmp(o2, o3, sizeof(float) * G * hd)) *max_err = fmax(*max_err, 1.0);
                sj_attn_group(o3, q, &one16, 1, 1, G, hd, ld, 0.125f, sc);
                double scale = 0, err = 0;
                for (int i = 0; i < G * hd; i++) {
                    scale = fmax(scale, fabs(o1[i]));
                    err = fmax(err, fmax(fabs(o2[i] - o1[i]), fabs(o3[i] - o1[i])));
                }
                if (err / (scale + 1e-30) > *max_err) *max_err = err / (scale + 1e-30);
            }
            for (int nt = 1; nt <= TQ; nt++) {   /* token j of the tile sees T + j positions */
                sj_attn_tile(t1, qt, ldq, k + 3, v + 3, 0, T, nt, hd, ld, 0.125f, sc);
                sj_attn_tile(t2, qt, ldq, k16 + 3, v16 + 3, 1, T, nt, hd, ld, 0.125f, sc);
                tile_ref(t3, qt, ldq, k16 + 3, v16 + 3, 1, T, nt, hd, ld, 0.125f, sc);
                for (int j = 0; j < nt; j++) {
                    /* the fast tile must be bitwise the per-token kernel (decode == prefill) */
                    const sj_kv_span tj16 = { k16 + 3, v16 + 3, T + j }, tj = { k + 3, v + 3, T + j };
                    sj_attn_group(o2, qt + j * ldq, &tj16, 1, 1, 1, hd, ld, 0.125f, sc);
                    if (sj_attn_tile_fast(hd) && memcmp(o2, t2 + j * ldq, sizeof(float) * hd)) *max_err = fmax(*max_err, 1.0);
                    group_ref(o1, qt + j * ldq, &tj, 1, 0, T + j, 1, hd, ld, 0.125f, sc);
                    double scale = 0, err = 0;
                    for (int i = 0; i < hd; i++) {
                        const int o = j * ldq + i;
                        scale = fmax(scale, fabs(o1[i]));
                        err = fmax(err, fmax(fabs(t1[o] - o1[i]), fmax(fabs(t2[o] - o1[i]), fabs(t3[o] - o1[i]))));
                    }
                    if (err / (scale + 1e-30) > *max_err) *max_err = err / (scale + 1e-30);
                }
            }
        }
    sj_free(k);
    return SJ_OK;
}
