/* quant.c — weight matrices in f32, bf16, Q8 and Q4 blocks of 32, and
 * GGML-compatible (de)quantisation. The matmuls by them are in qmatmul.c.
 * Compiled once (cold: loading and export). */
#include "infer.h"
#include "qkernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---- fp16 / bf16 ---------------------------------------------------------- */

static inline float bits_f(uint32_t w) { union { uint32_t u; float f; } v = { w }; return v.f; }
static inline uint32_t f_bits(float f) { union { float f; uint32_t u; } v = { f }; return v.u; }

float sj_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_f(sign | (two_w < (1u << 27) ? f_bits(denormalized) : f_bits(normalized)));
}

/* Round to nearest even, as GGML_FP32_TO_FP16 (and F16C) do. */
uint16_t sj_f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

uint16_t sj_f32_to_bf16(float f) {
    uint32_t u = f_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* ---- GGML blocks (the file format) ------------------------------------------- */

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* A block with a NaN or Inf (sj_block_finite) has no quantised form: the
 * blocks below give zeros for it and return 0, and their callers refuse it. */

/* GGML's quantize_row_q8_0_ref for one block: d from the fp32 amax. */
static int q8_0_block(const float *x, float *d_out, int8_t *q) {
    if (!sj_block_finite(x)) { memset(q, 0, QK); *d_out = 0.f; return 0; }
    float amax = 0.f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.f, id = d ? 1.0f / d : 0.0f;
    /* a subnormal d has no finite inverse: divide instead */
    for (int j = 0; j < QK; j++) q[j] = (int8_t)roundf(isinf(id) ? x[j] / d : x[j] * id);
    *d_out = d;
    return 1;
}

/* GGML's quantize_row_q4_0_ref: signed max over -8; nibbles n with w = d (n - 8). */
static int q4_0_block(const float *x, float *d_out, uint8_t n[QK]) {
    if (!sj_block_finite(x)) { memset(n, 8, QK); *d_out = 0.f; return 0; }
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < QK; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    const float d = max / -8.f, id = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) {
        int v = (int8_t)((isinf(id) ? x[j] / d : x[j] * id) + 8.5f);
        n[j] = (uint8_t)(v > 15 ? 15 : v);
    }
    *d_out = d;
    return 1;
}

sj_status sj_gguf_quantize(int type, const float *x, int64_t n, void *out) {
    uint8_t *o = out;
    if (type == SJ_GGUF_F32) { memcpy(out, x, (size_t)n * 4); return SJ_OK; }
    if (type == SJ_GGUF_F16 || type == SJ_GGUF_BF16) {
        for (int64_t i = 0; i < n; i++)
            st16(o + 2 * i, type == SJ_GGUF_F16 ? sj_f32_to_f16(x[i]) : sj_f32_to_bf16(x[i]));
        return SJ_OK;
    }
    if (n % QK) return sj_fail(SJ_ERR_ARG, "quantize: %lld values is not a multiple of %d", (long long)n, QK);
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float d;
        int ok;
        if (type == SJ_GGUF_Q8_0) {
            uint8_t *blk = o + b * 34;
            ok = q8_0_block(xb, &d, (int8_t *)(blk + 2));
            st16(blk, sj_f32_to_f16(d));
        } else if (type == SJ_GGUF_Q4_0) {
            uint8_t *blk = o + b * 18, nib[QK];
            ok = q4_0_block(xb, &d, nib);
            st16(blk, sj_f32_to_f16(d));
            for (int j = 0; j < 16; j++) blk[2 + j] = (uint8_t)(nib[j] | (nib[j + 16] << 4));
        } else {
            return sj_fail(SJ_ERR_ARG, "quantize: type %s cannot be written", sj_gguf_type_name(type));
        }
        if (!ok)
            return sj_fail(SJ_ERR_ARG, "quantize: value %lld..%lld holds NaN or Inf (no %s form)",
                           (long long)(b * QK), (long long)(b * QK + QK - 1), sj_gguf_type_name(type));
    }
    return SJ_OK;
}

sj_status sj_gguf_dequantize(int type, const void *in, int64_t n, float *out) {
    const uint8_t *p = in;
    int be, bb;
    if (!sj_gguf_type_block(type, &be, &bb)) return sj_fail(SJ_ERR_ARG, "dequantize: type %d is not supported", type);
    if (n % be) return sj_fail(SJ_ERR_ARG, "dequantize: %lld values is not a multiple of %d", (long long)n, be);
    switch (type) {
    case SJ_GGUF_F32: memcpy(out, in, (size_t)n * 4); break;
    case SJ_GGUF_F16: for (int64_t i = 0; i < n; i++) out[i] = sj_f16_to_f32(ld16(p + 2 * i)); break;
    case SJ_GGUF_BF16: for (int64_t i = 0; i < n; i++) out[i] = sj_bf16_to_f32(ld16(p + 2 * i)); break;
    case SJ_GGUF_Q8_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = p + b * 34;
            float d = sj_f16_to_f32(ld16(blk));
            for (int j = 0; j < QK; j++) out[b * QK + j] = d * (float)(int8_t)blk[2 + j];
        }
        break;
    case SJ_GGUF_Q4_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = p + b * 18;
            float d = sj_f16_to_f32(ld16(blk));
            for (int j = 0; j < 16; j++) {
                out[b * QK + j] = d * (float)((blk[2 + j] & 15) - 8);
                out[b * QK + j + 16] = d * (float)((blk[2 + j] >> 4) - 8);
            }
        }
        break;
    case SJ_GGUF_Q4_1:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *blk = p + b * 20;
            float d = sj_f16_to_f32(ld16(blk)), m = sj_f16_to_f32(ld16(blk + 2));
            for (int j = 0; j < 16; j++) {
                out[b * QK + j] = d * (float)(blk[4 + j] & 15) + m;
                out[b * QK + j + 16] = d * (float)(blk[4 + j] >> 4) + m;
            }
        }
        break;
    }
    return SJ_OK;
}

/* ---- our matrices -------------------------------------------------------- */

/* Matrices of 2 MB and more on transparent huge pages where the kernel
 * offers them (madvise mode): a GEMV streams them once per token, and with
 * 4 KB pages the hardware prefetcher stops at every page boundary. Freed
 * with sj_free (posix_memalign memory). */
static void *weight_alloc(int64_t bytes, const char *what) {
    const size_t huge = (size_t)2 << 20;
    if (bytes < (int64_t)huge) return sj_alloc((size_t)bytes, what);
    void *p = NULL;
    const size_t n = ((size_t)bytes + huge - 1) & ~(huge - 1);
    if (posix_memalign(&p, huge, n) != 0 || !p) {
        sj_fail(SJ_ERR_NOMEM, "out of memory allocating %zu bytes for %s", n, what);
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);   /* a hint: no huge pages is still correct */
#endif
    return p;
}

int64_t sj_qmat_bytes(int type, int rows, int cols) {
    int64_t n = (int64_t)rows * cols, nb = n / QK, bytes;
    switch (type) {
    case SJ_W_F32: bytes = n * 4; break;
    case SJ_W_BF16: bytes = n * 2; break;
    case SJ_W_Q8: bytes = (int64_t)SJ_CDIV(rows, SJ_Q8_RG) * SJ_Q8_RG * (cols / QK) * 34 + 64; break;
    default: bytes = n / 2 + nb * 4 + 64; break;
    }
    return SJ_CDIV(bytes, 64) * 64;
}

sj_status sj_qpool_init(sj_qpool *pool, int64_t bytes, const char *what) {
    pool->used = 0; pool->cap = bytes;
    pool->mem = weight_alloc(SJ_MAX(bytes, 64), what);
    return pool->mem ? SJ_OK : SJ_ERR_NOMEM;
}

void sj_qpool_free(sj_qpool *pool) { sj_free(pool->mem); memset(pool, 0, sizeof *pool); }

sj_status sj_qmat_alloc(sj_qmat *W, int type, int rows, int cols, const char *what) {
    return sj_qmat_alloc_pool(W, NULL, type, rows, cols, what);
}

sj_status sj_qmat_alloc_pool(sj_qmat *W, sj_qpool *pool, int type, int rows, int cols, const char *what) {
    memset(W, 0, sizeof *W);
    W->type = type; W->rows = rows; W->cols = cols; W->src = SJ_GGUF_Q4_0;
    if ((type == SJ_W_Q8 || type == SJ_W_Q4) && cols % QK)
        return sj_fail(SJ_ERR_ARG, "%s: %d columns is not a multiple of %d", what, cols, QK);
    const int64_t bytes = sj_qmat_bytes(type, rows, cols), n = (int64_t)rows * cols, nb = n / QK;
    if (pool) {
        if (pool->used + bytes > pool->cap) return sj_fail(SJ_ERR_RUNTIME, "%s: weight pool is full", what);
        W->mem = pool->mem + pool->used;
        pool->used += bytes;
        W->pooled = 1;
    } else {
        W->mem = weight_alloc(bytes, what);
        if (!W->mem) return SJ_ERR_NOMEM;
    }
    W->bytes = bytes;
    uint8_t *p = W->mem;
    switch (type) {
    case SJ_W_F32: W->f = (float *)p; break;
    case SJ_W_BF16: W->bf = (uint16_t *)p; break;
    case SJ_W_Q8:   /* the padding rows of the last group: zero scales, never NaN */
        W->q8 = (int8_t *)p;
        memset(p + (int64_t)(rows / SJ_Q8_RG) * SJ_Q8_RG * 34 * (cols / QK), 0,
               (size_t)(bytes - (int64_t)(rows / SJ_Q8_RG) * SJ_Q8_RG * 34 * (cols / QK)));
        break;
    default:
        W->d = (uint16_t *)p; W->m = W->d + nb;
        W->q4 = p + SJ_CDIV(nb * 4, 64) * 64;
    }
    return SJ_OK;
}

void sj_qmat_free(sj_qmat *W) { if (!W->pooled) sj_free(W->mem); memset(W, 0, sizeof *W); }

/* Block b of row r of a Q8 matrix from its fp16 scale and signed weights. */
static void q8_put(sj_qmat *W, int r, int b, uint16_t d16, const int8_t *q) {
    uint16_t *d;
    uint8_t *w = sj_q8_block(W, r, b, &d);
    *d = d16;
    for (int e = 0; e < QK; e++) w[e] = (uint8_t)q[e] ^ 0x80;
}

static void q4_put_block(sj_qmat *W, int r, int b, const uint8_t nib[QK], float d, float m) {
    const int nb = W->cols / QK;
    uint8_t *row = W->q4 + (int64_t)r * W->cols / 2;
    for (int e = 0; e < QK; e++) {
        int by, sh;
        sj_q4_where(nb, b, e, &by, &sh);
        row[by] = (uint8_t)((row[by] & ~(15 << sh)) | (nib[e] << sh));
    }
    W->d[(int64_t)r * nb + b] = sj_f32_to_f16(d);
    W->m[(int64_t)r * nb + b] = sj_f32_to_f16(m);
}

int sj_qmat_set_row(sj_qmat *W, int r, const float *x) {
    const int C = W->cols, nb = C / QK;
    int ok = 1;
    switch (W->type) {
    case SJ_W_F32: memcpy(W->f + (int64_t)r * C, x, sizeof(float) * C); break;
    case SJ_W_BF16: for (int c = 0; c < C; c++) W->bf[(int64_t)r * C + c] = sj_f32_to_bf16(x[c]); break;
    case SJ_W_Q8:
        for (int b = 0; b < nb; b++) {
            float d;
            int8_t q[QK];
            ok &= q8_0_block(x + b * QK, &d, q);
            q8_put(W, r, b, sj_f32_to_f16(d), q);
        }
        break;
    default:
        W->src = SJ_GGUF_Q4_0;
        for (int b = 0; b < nb; b++) {
            float d; uint8_t nib[QK];
            ok &= q4_0_block(x + b * QK, &d, nib);
            d = sj_f16_to_f32(sj_f32_to_f16(d));
            q4_put_block(W, r, b, nib, d, -8.f * d);
        }
    }
    return ok;
}

int sj_qmat_set_row_gguf(sj_qmat *W, int r, int type, const void *src) {
    const int C = W->cols, nb = C / QK;
    const uint8_t *p = src;
    if (W->type == SJ_W_Q8 && type == SJ_GGUF_Q8_0) {
        for (int b = 0; b < nb; b++) q8_put(W, r, b, ld16(p + b * 34), (const int8_t *)p + b * 34 + 2);
        return 1;
    }
    if (W->type == SJ_W_Q4 && (type == SJ_GGUF_Q4_0 || type == SJ_GGUF_Q4_1)) {
        W->src = type;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = p + b * (type == SJ_GGUF_Q4_0 ? 18 : 20);
            float d = sj_f16_to_f32(ld16(blk)), m = type == SJ_GGUF_Q4_0 ? -8.f * d : sj_f16_to_f32(ld16(blk + 2));
            const uint8_t *qs = blk + (type == SJ_GGUF_Q4_0 ? 2 : 4);
            uint8_t nib[QK];
            for (int j = 0; j < 16; j++) { nib[j] = qs[j] & 15; nib[j + 16] = qs[j] >> 4; }
            q4_put_block(W, r, b, nib, d, m);
        }
        return 1;
    }
    float tmp[C];
    sj_gguf_dequantize(type, src, C, tmp);
    return sj_qmat_set_row(W, r, tmp);
}

void sj_qmat_get_row(const sj_qmat *W, int r, float *out) {
    const int C = W->cols, nb = C / QK;
    switch (W->type) {
    case SJ_W_F32: memcpy(out, W->f + (int64_t)r * C, sizeof(float) * C); break;
    case SJ_W_BF16: for (int c = 0; c < C; c++) out[c] = sj_bf16_to_f32(W->bf[(int64_t)r * C + c]); break;
    case SJ_W_Q8:
        for (int b = 0; b < nb; b++) {
            uint16_t *d;
            const uint8_t *q = sj_q8_block(W, r, b, &d);
            for (int e = 0; e < QK; e++) out[b * QK + e] = sj_f16_to_f32(*d) * (float)((int)q[e] - 128);
        }
        break;
    default: {
        const uint8_t *row = W->q4 + (int64_t)r * C / 2;
        for (int b = 0; b < nb; b++) {
            float d = sj_f16_to_f32(W->d[(int64_t)r * nb + b]), m = sj_f16_to_f32(W->m[(int64_t)r * nb + b]);
            for (int e = 0; e < QK; e++) {
                int by, sh;
                sj_q4_where(nb, b, e, &by, &sh);
                out[b * QK + e] = d * (float)((row[by] >> sh) & 15) + m;
            }
        }
    }
    }
}

void sj_qmat_row_to_gguf(const sj_qmat *W, int r, int type, void *dst) {
    const int C = W->cols, nb = C / QK;
    uint8_t *o = dst;
    if (W->type == SJ_W_Q8 && type == SJ_GGUF_Q8_0) {
        for (int b = 0; b < nb; b++) {
            uint16_t *d;
            const uint8_t *q = sj_q8_block(W, r, b, &d);
            st16(o + b * 34, *d);
            for (int e = 0; e < QK; e++) o[b * 34 + 2 + e] = q[e] ^ 0x80;
        }
        return;
    }
    if (W->type == SJ_W_Q4 && type == W->src) {
        const uint8_t *row = W->q4 + (int64_t)r * C / 2;
        const int bs = type == SJ_GGUF_Q4_0 ? 18 : 20;
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = o + b * bs, nib[QK];
            st16(blk, W->d[(int64_t)r * nb + b]);
            if (type == SJ_GGUF_Q4_1) st16(blk + 2, W->m[(int64_t)r * nb + b]);
            for (int e = 0; e < QK; e++) {
                int by, sh;
                sj_q4_where(nb, b, e, &by, &sh);
                nib[e] = (row[by] >> sh) & 15;
            }
            for (int j = 0; j < 16; j++) blk[bs - 16 + j] = (uint8_t)(nib[j] | (nib[j + 16] << 4));
        }
        return;
    }
    float tmp[C];
    sj_qmat_get_row(W, r, tmp);
    sj_gguf_quantize(type, tmp, C, dst);
}

/* ---- activations ---------------------------------------------------------- */

static int64_t qact_pairs(int n, int cols) { return (int64_t)n * SJ_CDIV(cols / QK, 2); }

int64_t sj_qact_bytes(int n, int cols) {
    int64_t nb = (int64_t)n * SJ_CDIV(cols, QK);
    return qact_pairs(n, cols) * 128 + nb * 8 + (int64_t)n * cols + 4 * 64;
}

/* d2 and c2 first (64-byte aligned), then d, s, q; every later quantisation
 * of m <= n rows of c <= cols values fits (m * ceil(c/64) <= n * ceil(cols/64)). */
void sj_qact_bind(sj_qact *a, void *mem, int n, int cols) {
    uint8_t *p = mem;
    const int64_t np = qact_pairs(n, cols), nb = (int64_t)n * SJ_CDIV(cols, QK);
    a->d2 = (float *)p; p += np * 64;
    a->c2 = (int32_t *)p; p += np * 64;
    a->d = (float *)p; p += SJ_CDIV(nb * 4, 64) * 64;
    a->s = (float *)p; p += SJ_CDIV(nb * 4, 64) * 64;
    a->q = (int8_t *)p;
    a->n = 0; a->cols = cols;
}

const char *sj_infer_isa(void) { return sj_isa_name(sj_qkernel_isa(sj_isa_active())); }
