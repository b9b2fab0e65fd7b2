/* qmatmul.c — the inference engine's matmuls by sj_qmat weights, and the
 * quantisation of their inputs. Compiled once per ISA level (core/isa.h).
 *
 * Q8/Q4 matmuls quantise the activations once to 8-bit blocks (sj_qact) and
 * use integer dot products, like GGML's Q8_0 x Q8_0 and Q4_1 x Q8_1: per
 * block, sum(w_int * x_int) scaled by d_w * d_x, plus m_w * (d_x sum x_int)
 * for the 4-bit offset. Kernels: a scalar reference here (kept and tested
 * against), AVX-512 VNNI (qk_avx512.c) and AVX2 (qk_avx2.c), chosen by the
 * active ISA level (sj_isa_active: avx512vnni, else avx2, else scalar).
 * One kernel serves decode (n = 1: a GEMV, memory-bandwidth bound) and
 * prefill (tiles of rows x tokens, tokens in blocks of 64 so they stay in L2).
 * f32 weights: a vectorised dot product (decode) or the CPU GEMM (prefill).
 * Threads split output rows. Never allocates on the hot path. */
#include "infer.h"
#include "qkernels.h"
#include "../cpu/cpu.h"
#include <math.h>
#include <string.h>

typedef struct { sj_qact *a; const float *x; } qact_job;

static void qact_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const qact_job *j = ctx;
    const int C = j->a->cols, nb = C / QK, npc = (nb + 1) / 2;
    for (int64_t r = r0; r < r1; r++) {
        float *d2 = j->a->d2 + r * npc * 16;
        int32_t *c2 = j->a->c2 + r * npc * 16;
        memset(d2, 0, sizeof(float) * 16 * npc);     /* the unpaired block's empty half */
        memset(c2, 0, sizeof(int32_t) * 16 * npc);
        for (int b = 0; b < nb; b++) {
            const float *x = j->x + r * C + b * QK;
            int8_t *q = j->a->q + r * C + b * QK;
            float amax = 0.f;
#pragma omp simd reduction(max:amax)
            for (int e = 0; e < QK; e++) { float v = fabsf(x[e]); amax = v > amax ? v : amax; }
            float d = amax / 127.f, id = d ? 1.0f / d : 0.0f;
            int sum = 0;
            if (!sj_block_finite(x)) {   /* an Inf or NaN activation: the block's products are NaN */
                memset(q, 0, QK);
                d = NAN;
            } else if (isinf(id)) {   /* a subnormal d has no finite inverse: divide */
                for (int e = 0; e < QK; e++) {
                    int v = (int)nearbyintf(x[e] / d);
                    q[e] = (int8_t)v;
                    sum += v;
                }
            } else {
#pragma omp simd reduction(+:sum)
                for (int e = 0; e < QK; e++) {
                    int v = (int)nearbyintf(x[e] * id);
                    q[e] = (int8_t)v;
                    sum += v;
                }
            }
            j->a->d[r * nb + b] = d;
            j->a->s[r * nb + b] = d * (float)sum;
            for (int e = 0; e < 8; e++) d2[b / 2 * 16 + (b & 1) * 8 + e] = d;
            c2[b / 2 * 16 + (b & 1) * 8] = -128 * sum;
        }
    }
}

void sj_qact_quantize(sj_qact *a, const float *x, int n, int cols) {
    a->n = n; a->cols = cols;
    qact_job j = { a, x };
    if (n == 1) qact_rows(&j, 0, 1, 0);
    else sj_parallel_for(n, 4, qact_rows, &j);
}

/* ---- kernels: scalar reference ---------------------------------------------- */

static float dotf(const float *a, const float *b, int n) {
    float s0 = 0.f;
#pragma omp simd reduction(+:s0)
    for (int i = 0; i < n; i++) s0 += a[i] * b[i];
    return s0;
}

/* One output: row r of W with token t. */
static float ref_dot(const sj_qmat *W, int r, const float *x, const sj_qact *xa, int t) {
    const int C = W->cols, nb = C / QK;
    if (W->type == SJ_W_F32) return dotf(W->f + (int64_t)r * C, x + (int64_t)t * C, C);
    if (W->type == SJ_W_BF16) {
        float s = 0.f;
        for (int c = 0; c < C; c++) s += sj_bf16_to_f32(W->bf[(int64_t)r * C + c]) * x[(int64_t)t * C + c];
        return s;
    }
    const int8_t *xq = xa->q + (int64_t)t * C;
    const float *dx = xa->d + (int64_t)t * nb, *sx = xa->s + (int64_t)t * nb;
    float acc = 0.f;
    if (W->type == SJ_W_Q8) {
        for (int b = 0; b < nb; b++) {
            uint16_t *d;
            const uint8_t *w = sj_q8_block(W, r, b, &d);
            int32_t s = 0;
            for (int e = 0; e < QK; e++) s += ((int32_t)w[e] - 128) * xq[b * QK + e];   /* not (int8_t)(w ^ 0x80): GCC 12.2 -O3 miscompiled that sum (measured) */
            acc += sj_f16_to_f32(*d) * dx[b] * (float)s;
        }
        return acc;
    }
    const uint8_t *row = W->q4 + (int64_t)r * C / 2;
    const uint16_t *dw = W->d + (int64_t)r * nb, *mw = W->m + (int64_t)r * nb;
    for (int b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int e = 0; e < QK; e++) {
            int by, sh;
            sj_q4_where(nb, b, e, &by, &sh);
            s += (int32_t)((row[by] >> sh) & 15) * xq[b * QK + e];
        }
        acc += sj_f16_to_f32(dw[b]) * dx[b] * (float)s + sj_f16_to_f32(mw[b]) * sx[b];
    }
    return acc;
}

void sj_qmat_mul_reference(float *out, const sj_qmat *W, const float *x, const sj_qact *xa, int n) {
    for (int t = 0; t < n; t++)
        for (int r = 0; r < W->rows; r++) out[(int64_t)t * W->rows + r] = ref_dot(W, r, x, xa, t);
}

/* ---- instruction set -------------------------------------------------------- */

/* The quantised kernels' level: the active one, or the one under test. */
static int qk_level = -1;

static sj_qkernel qkernel(void) {
    switch (sj_qkernel_isa(qk_level >= 0 ? (sj_isa)qk_level : sj_isa_active())) {
    case SJ_ISA_AVX512VNNI: return sj_qkernel_avx512vnni;
    case SJ_ISA_AVX2: return sj_qkernel_avx2;
    default: return NULL;
    }
}

/* ---- dispatch -------------------------------------------------------------- */

typedef struct { float *out; const sj_qmat *W; const float *x; const sj_qact *xa; int n; } mul_job;

#define TOK_BLOCK 64
#define ROW_BLOCK 16

static void mul_range(float *out, const sj_qmat *W, const float *x, const sj_qact *xa, int n,
                      int64_t r0, int64_t r1) {
    const int C = W->cols, R = W->rows;
    if (W->type == SJ_W_F32 || W->type == SJ_W_BF16) {
        float tmp[W->type == SJ_W_BF16 ? C : 1];
        for (int64_t r = r0; r < r1; r++) {
            const float *w = W->f ? W->f + r * C : tmp;
            if (W->type == SJ_W_BF16)
                for (int c = 0; c < C; c++) tmp[c] = sj_bf16_to_f32(W->bf[r * C + c]);
            for (int t = 0; t < n; t++) out[(int64_t)t * R + r] = dotf(w, x + (int64_t)t * C, C);
        }
        return;
    }
    const sj_qkernel k = qkernel();
    if (k) {   /* each 4-row tile sweeps a block of tokens whose activations stay in L2 */
        for (int t0 = 0; t0 < n; t0 += TOK_BLOCK) k(out, R, W, (int)r0, (int)r1, xa, t0, SJ_MIN(t0 + TOK_BLOCK, n));
        return;
    }
    for (int t = 0; t < n; t++)
        for (int64_t r = r0; r < r1; r++) out[(int64_t)t * R + r] = ref_dot(W, (int)r, x, xa, t);
}

static void mul_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const mul_job *j = ctx;
    mul_range(j->out, j->W, j->x, j->xa, j->n, r0, r1);
}

/* Several matrices of one input as one parallel loop over their stacked rows:
 * one fork-join instead of k (decode is a few hundred of them per token). */
typedef struct { int k; float *const *outs; const sj_qmat *const *Ws; const float *x; const sj_qact *xa; int n; } multi_job;

static void multi_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const multi_job *j = ctx;
    int64_t base = 0;
    for (int i = 0; i < j->k && base < r1; i++) {
        const int64_t R = j->Ws[i]->rows, a = SJ_MAX(r0, base), b = SJ_MIN(r1, base + R);
        if (a < b) mul_range(j->outs[i], j->Ws[i], j->x, j->xa, j->n, a - base, b - base);
        base += R;
    }
}

void sj_qmat_mul_multi(int k, float *const *outs, const sj_qmat *const *Ws, const float *x,
                       const sj_qact *xa, int n) {
    if (Ws[0]->type == SJ_W_F32 && n > 1) {
        for (int i = 0; i < k; i++) sj_qmat_mul(outs[i], Ws[i], x, xa, n);
        return;
    }
    int64_t total = 0;
    for (int i = 0; i < k; i++) total += Ws[i]->rows;
    multi_job j = { k, outs, Ws, x, xa, n };
    int P = sj_parallel_threads();
    int64_t grain = SJ_CDIV(SJ_CDIV(total, 4 * P), ROW_BLOCK) * ROW_BLOCK;
    sj_parallel_for(total, grain, multi_rows, &j);
}

void sj_qmat_mul(float *out, const sj_qmat *W, const float *x, const sj_qact *xa, int n) {
    if (W->type == SJ_W_F32 && n > 1) {
        sj_cpu_gemm(out, W->rows, x, W->cols, 0, W->f, W->cols, 1, n, W->rows, W->cols, 0);
        return;
    }
    mul_job j = { out, W, x, xa, n };
    int P = sj_parallel_threads();
    int64_t grain = SJ_CDIV(W->rows, 4 * P);
    grain = SJ_CDIV(grain, ROW_BLOCK) * ROW_BLOCK;
    if ((int64_t)W->rows * W->cols * n < (1 << 14)) mul_rows(&j, 0, W->rows, 0);
    else sj_parallel_for(W->rows, grain, mul_rows, &j);
}

/* ---- testing hook ------------------------------------------------------------- */

/* One ISA's kernels against the scalar reference on random Q8/Q4 matrices:
 * row counts that are not multiples of the tiles, even and odd block counts
 * (an unpaired last block), token counts 1 .. 70. Returns the largest error
 * relative to the output's scale. */
static sj_status check_isa(uint64_t seed, double *max_err) {
    sj_rng rng;
    sj_rng_seed(&rng, seed);
    *max_err = 0;
    const int shapes[][2] = { { 67, 576 }, { 33, 96 }, { 40, 1536 }, { 5, 32 }, { 13, 160 }, { 2, 64 } };
    const int ns[] = { 1, 2, 3, 5, 7, 70 };
    const int N = 70;
    for (int ty = SJ_W_Q8; ty <= SJ_W_Q4; ty++)
        for (int si = 0; si < (int)(sizeof shapes / sizeof shapes[0]); si++) {
            const int R = shapes[si][0], C = shapes[si][1];
            sj_qmat W;
            SJ_TRY(sj_qmat_alloc(&W, ty, R, C, "check"));
            const int64_t qb = sj_qact_bytes(N, C);
            float *x = sj_alloc(sizeof(float) * ((size_t)N * C * 2 + (size_t)N * R * 2) + (size_t)qb, "check");
            if (!x) { sj_qmat_free(&W); return SJ_ERR_NOMEM; }
            float *row = x + (int64_t)N * C, *o1 = row + (int64_t)N * C, *o2 = o1 + (int64_t)N * R;
            sj_qact a;
            sj_qact_bind(&a, o2 + (int64_t)N * R, N, C);
            for (int r = 0; r < R; r++) {
                for (int c = 0; c < C; c++) row[c] = sj_rng_normal(&rng) * (1.f + (float)(c % 7));
                sj_qmat_set_row(&W, r, row);
                if (ty == SJ_W_Q4 && (r & 1)) {   /* some rows with a Q4_1-style offset */
                    for (int b = 0; b < C / 32; b++) {
                        uint16_t *m = &W.m[(int64_t)r * (C / 32) + b];
                        *m = sj_f32_to_f16(sj_f16_to_f32(*m) + 0.25f * sj_rng_normal(&rng));
                    }
                }
            }
            for (int64_t i = 0; i < (int64_t)N * C; i++) x[i] = sj_rng_normal(&rng);
            for (int k = 0; k < (int)(sizeof ns / sizeof ns[0]); k++) {
                int n = ns[k];
                sj_qact_quantize(&a, x, n, C);
                sj_qmat_mul(o1, &W, x, &a, n);
                sj_qmat_mul_reference(o2, &W, x, &a, n);
                double scale = 0, err = 0;
                for (int64_t i = 0; i < (int64_t)n * R; i++) { scale = fmax(scale, fabs(o2[i])); err = fmax(err, fabs(o1[i] - o2[i])); }
                if (err / (scale + 1e-30) > *max_err) *max_err = err / (scale + 1e-30);
            }
            sj_free(x);
            sj_qmat_free(&W);
        }
    return SJ_OK;
}

/* which: a quantised-kernel ISA name (avx2, avx512vnni), or NULL for every
 * one this CPU runs (the worst error). The attention kernels (this copy's
 * level) are checked every call. */
sj_status sj_infer_kernel_check(uint64_t seed, const char *which, double *max_err) {
    static const sj_isa kernels[] = { SJ_ISA_AVX2, SJ_ISA_AVX512VNNI };
    *max_err = 0;
    sj_status s = SJ_OK;
    int found = 0;
    for (int i = 0; i < 2 && s == SJ_OK; i++) {
        const sj_isa lvl = kernels[i];
        if (lvl > sj_isa_best() || (which && strcmp(which, sj_isa_name(lvl)))) continue;
        double e;
        qk_level = (int)lvl;
        s = check_isa(seed, &e);
        qk_level = -1;
        if (e > *max_err) *max_err = e;
        found = 1;
    }
    if (s == SJ_OK && which && !found && strcmp(which, "scalar"))
        return sj_fail(SJ_ERR_ARG, "kernel check: ISA '%s' is not available on this CPU (best: %s)",
                       which, sj_isa_name(sj_isa_best()));
    double ea = 0;
    if (s == SJ_OK) s = sj_attn_check(seed, &ea);
    if (ea > *max_err) *max_err = ea;
    return s;
}
