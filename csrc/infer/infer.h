/* infer.h — internals of the inference engine: weight matrices in four
 * in-memory forms and the kernels that multiply by them. Never included by
 * the public header. */
#ifndef SJ_INFER_H
#define SJ_INFER_H

#include "../core/core.h"
#include "../core/isa.h"
#include <math.h>

/* attn.c, qmatmul.c and forward.c are compiled once per ISA level
 * (core/isa.h): their symbols carry the level's suffix. */
#define sj_attn_group SJ_ISA(sj_attn_group)
#define sj_attn_tile SJ_ISA(sj_attn_tile)
#define sj_attn_tile_fast SJ_ISA(sj_attn_tile_fast)
#define sj_attn_check SJ_ISA(sj_attn_check)
#define sj_qact_quantize SJ_ISA(sj_qact_quantize)
#define sj_qmat_mul SJ_ISA(sj_qmat_mul)
#define sj_qmat_mul_multi SJ_ISA(sj_qmat_mul_multi)
#define sj_qmat_mul_reference SJ_ISA(sj_qmat_mul_reference)
#define sj_infer_kernel_check SJ_ISA(sj_infer_kernel_check)

#define QK 32   /* elements per quantisation block (GGML's QK8_0 / QK4_0) */

typedef enum { SJ_W_F32 = 0, SJ_W_BF16, SJ_W_Q8, SJ_W_Q4 } sj_wtype;

/* A (rows, cols) weight matrix, y = W x. One allocation holds everything.
 *   F32:  f (rows, cols)            BF16: bf (rows, cols) bit patterns
 *   Q8:   q8: groups of SJ_Q8_RG rows interleaved, see below: w = d * q
 *   Q4:   q4 (rows, cols/2) nibbles, d and m (rows, cols/32): w = d * n + m
 *   d and m are fp16 bit patterns, as in GGUF: decode streams every weight
 *   byte per token, and fp32 scales were 5% (Q8) / 13% (Q4) more bytes.
 *         (GGML's Q4_1; Q4_0 is m = -8 d). Nibble order: a pair of blocks
 *         (2b, 2b+1) is 32 bytes; byte k holds element k of block 2b in its
 *         low nibble and element k of block 2b+1 in its high nibble, so one
 *         load unpacks to 64 consecutive elements. A last unpaired block
 *         uses GGML's order (byte k: elements k and k+16).
 *   Q8 layout (as llama.cpp's repacked block_q8_0x4): rows in groups of 4
 *   (the last group padded with zero rows), a group is 136 * nb bytes; in it,
 *   per pair of blocks (2p, 2p+1), 272 bytes: the 4 rows' 8 fp16 scales
 *   (row i: 2i, 2i+1), then row i's 64 weights at 16 + 64 i; a last
 *   unpaired block: 4 scales, then row i's 32 weights at 8 + 32 i. Weights
 *   are stored + 128 (as unsigned bytes: what vpdpbusd multiplies). Why: the
 *   decode GEMV reads one contiguous stream per matrix with each scale next
 *   to its weights (the row-major layout with a separate scale array ran at
 *   8-9 GB/s, a third below Q4's stream); prefill's 4-row tiles are groups.
 * GGUF export is lossless. */
typedef struct {
    int type, rows, cols;
    int src;                 /* Q4: SJ_GGUF_Q4_0 or SJ_GGUF_Q4_1 (what m means) */
    float *f; uint16_t *bf; int8_t *q8; uint8_t *q4; uint16_t *d, *m;
    void *mem; int64_t bytes;
    int pooled;              /* mem is inside an sj_qpool: not freed with the matrix */
} sj_qmat;

#define SJ_Q8_RG 4   /* rows per interleaved Q8 group */

/* Block b of row r of a Q8 matrix: its 32 weights (+ 128) and, in *d, its scale. */
static inline uint8_t *sj_q8_block(const sj_qmat *W, int r, int b, uint16_t **d) {
    const int nb = W->cols / QK, np = nb / 2, i = r % SJ_Q8_RG;
    uint8_t *g = (uint8_t *)W->q8 + (int64_t)(r / SJ_Q8_RG) * (SJ_Q8_RG * 34) * nb;
    if (b < 2 * np) {
        uint8_t *c = g + (int64_t)(b >> 1) * (SJ_Q8_RG * 68);
        *d = (uint16_t *)c + 2 * i + (b & 1);
        return c + SJ_Q8_RG * 4 + 64 * i + 32 * (b & 1);
    }
    uint8_t *c = g + (int64_t)np * (SJ_Q8_RG * 68);
    *d = (uint16_t *)c + i;
    return c + SJ_Q8_RG * 2 + 32 * i;
}

/* One allocation (on transparent huge pages) for many matrices, handed out
 * in the order they are allocated: decode reads the layer matrices in that
 * order, so the stream crosses no 4 KB page walls and no allocation gaps. */
typedef struct { uint8_t *mem; int64_t used, cap; } sj_qpool;

/* Activations quantised to 8-bit blocks once per matmul input:
 * q (n, cols) int8, d (n, cols/32), s (n, cols/32) = d * sum(q) of the block,
 * and for the SIMD kernels, per pair of blocks (np = ceil(cols/64); an
 * unpaired last block has zeros in the second half):
 * d2 (n, np, 16) float: the pair's two scales, each spread over 8 lanes;
 * c2 (n, np, 16) int32: -128 * sum(q) of each block in lanes 0 and 8, zero
 * elsewhere: the start value of vpdpbusd that cancels the +128 the Q8
 * kernels add to make weights unsigned (exact, in integers).
 * Made once per input, read by every row. Bind to caller-owned memory. */
typedef struct { int8_t *q; float *d, *s, *d2; int32_t *c2; int n, cols; } sj_qact;

/* Attention over the KV cache (attn.c). A span: n consecutive cache rows,
 * row r's key at k + r * ld elements, its value at v + r * ld. */
typedef struct { const void *k, *v; int n; } sj_kv_span;
/* out (G, hd): softmax(q k^T * scale) v for the G query heads q (G, hd) of
 * one token over the spans' rows in order (f32 elements, or f16 when
 * kv_f16). sc: scratch (G, total rows). */
void sj_attn_group(float *out, const float *q, const sj_kv_span *sp, int nsp, int kv_f16, int G,
                   int hd, int ld, float scale, float *sc);
#define SJ_ATTN_TQ 4   /* query tokens per prefill tile */
/* nt (<= SJ_ATTN_TQ) consecutive tokens of one head (queries and outputs
 * ldq apart): token j attends to rows s < T0 + j of kc/vc. sc: scratch of
 * SJ_ATTN_TQ (T0 + nt - 1) floats. */
void sj_attn_tile(float *out, const float *q, int ldq, const void *kc, const void *vc, int kv_f16, int T0, int nt,
                  int hd, int ld, float scale, float *sc);
/* 1 where sj_attn_tile has a fast kernel for this head size. */
int sj_attn_tile_fast(int hd);
/* The attention kernels against their references (the largest relative error). */
sj_status sj_attn_check(uint64_t seed, double *max_err);

/* RoPE (cos, sin) tables, (n_pos, head_dim/2) each, scaled by the config's
 * RoPE scaling (sj_rope_init at seq_len n_pos): the CPU engine's, and the
 * GPU engine's copy of them. */
sj_status sj_infer_rope_tables(const sj_config *c, int n_pos, float *cos_out, float *sin_out);

/* 1 when every value of a block is finite: a NaN or Inf has no quantised
 * form (and casting it to an integer is undefined). */
static inline int sj_block_finite(const float *x) {
    int ok = 1;
    for (int j = 0; j < QK; j++) ok &= isfinite(x[j]) != 0;
    return ok;
}

/* Byte index and shift of element e of block b in a Q4 row (see above). */
static inline void sj_q4_where(int nb, int b, int e, int *byte, int *shift) {
    if (b < (nb & ~1)) { *byte = (b >> 1) * 32 + e; *shift = (b & 1) * 4; }
    else { *byte = (b >> 1) * 32 + (e & 15); *shift = (e >> 4) * 4; }
}

float sj_f16_to_f32(uint16_t h);
uint16_t sj_f32_to_f16(float f);
static inline float sj_bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } v = { (uint32_t)b << 16 };
    return v.f;
}
uint16_t sj_f32_to_bf16(float f);

sj_status sj_qmat_alloc(sj_qmat *W, int type, int rows, int cols, const char *what);
int64_t sj_qmat_bytes(int type, int rows, int cols);   /* what sj_qmat_alloc takes */
sj_status sj_qpool_init(sj_qpool *pool, int64_t bytes, const char *what);
void sj_qpool_free(sj_qpool *pool);
/* sj_qmat_alloc from pool (NULL: its own allocation). */
sj_status sj_qmat_alloc_pool(sj_qmat *W, sj_qpool *pool, int type, int rows, int cols, const char *what);
void sj_qmat_free(sj_qmat *W);
/* Set row r from f32 values (quantising as GGML's reference does). */
int sj_qmat_set_row(sj_qmat *W, int r, const float *x);   /* 0: a NaN/Inf met (zeros stored) */
/* Set row r from GGUF-encoded data of `type` (exact for Q8_0->Q8, Q4_x->Q4). */
int sj_qmat_set_row_gguf(sj_qmat *W, int r, int type, const void *src);   /* likewise */
void sj_qmat_get_row(const sj_qmat *W, int r, float *out);
/* Row r in GGUF encoding of `type` (Q8 -> Q8_0, Q4 -> Q4_0/Q4_1 as made). */
void sj_qmat_row_to_gguf(const sj_qmat *W, int r, int type, void *dst);

/* Bytes of scratch for up to n inputs of up to cols values; bind a to it. */
int64_t sj_qact_bytes(int n, int cols);
void sj_qact_bind(sj_qact *a, void *mem, int n, int cols);
/* Quantise x (n, cols) into a (bound with capacity >= n x cols). */
void sj_qact_quantize(sj_qact *a, const float *x, int n, int cols);
/* out (n, rows) = x (n, cols) W^T. xa: x quantised (needed for Q8/Q4). */
void sj_qmat_mul(float *out, const sj_qmat *W, const float *x, const sj_qact *xa, int n);
/* k matrices with the same input (q/k/v, gate/up) in one parallel loop. */
void sj_qmat_mul_multi(int k, float *const *outs, const sj_qmat *const *Ws, const float *x,
                       const sj_qact *xa, int n);
/* The scalar kernels, kept as the reference the SIMD ones are tested against. */
void sj_qmat_mul_reference(float *out, const sj_qmat *W, const float *x, const sj_qact *xa, int n);
/* Testing: the quantised kernels of `which` ISA ("avx2", "avx512vnni"; NULL:
 * each this CPU runs) against the scalar reference, and the attention
 * kernels; *max_err: the largest error relative to the output's scale. */
typedef sj_status sj_infer_kernel_check_fn(uint64_t seed, const char *which, double *max_err);
sj_infer_kernel_check_fn sj_infer_kernel_check;
SJ_ISA_EXTERN(sj_infer_kernel_check_fn, sj_infer_kernel_check);

#if defined(__AVX512F__)
#include <immintrin.h>
/* e^x, 16 at a time, within 2 ulp of expf (Cephes' polynomial, 2^n by
 * vscalefps, which also underflows to 0 for x < -87): a scalar expf call per
 * score was 15% of decode attention and 10% of prefill. llama.cpp's softmax
 * is vectorised the same way. Used by attention (attn.c) and SwiGLU
 * (infer.c). */
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

#endif

#endif
