/* backend.c — the CPU backend's table, and the small adapters between it
 * and kernels whose signatures differ (gemm.c is shared with other users). */
#include "cpu.h"
#include <string.h>

static void copy_bytes(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }

/* IEEE half <-> f32, round to nearest even. Values beyond the half range
 * are clamped to +-65504 (not inf), so a stored activation never turns into
 * an infinity; NaN stays NaN. */
static uint16_t f32_to_f16(float f) {
    union { float f; uint32_t u; } v = { f };
    uint32_t sign = (v.u >> 16) & 0x8000u, a = v.u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);            /* NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7BFFu);           /* clamp: 65504 */
    if (a < 0x38800000u) {                                             /* subnormal or 0 */
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u, e = a >> 23;
        uint32_t shift = 126 - e, r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((a - 0x38000000u) >> 13), rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FFu, u;
    if (e == 0x1F) u = sign | 0x7F800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else {   /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400u)) { m <<= 1; e--; }
        u = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    union { uint32_t u; float f; } v = { u };
    return v.f;
}

typedef struct { void *dst; const void *src; sj_dtype dt; } conv_job;
static void conv_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const conv_job *j = ctx;
    if (j->dt == SJ_F16)
        for (int64_t i = i0; i < i1; i++) ((uint16_t *)j->dst)[i] = f32_to_f16(((const float *)j->src)[i]);
    else
        for (int64_t i = i0; i < i1; i++) ((float *)j->dst)[i] = f16_to_f32(((const uint16_t *)j->src)[i]);
}

/* f32 is the compute dtype on the CPU: f32 -> f32 is a copy; f16 is a
 * storage format (fp16 activations). */
static void convert(void *dst, sj_dtype dt, const void *src, sj_dtype st, int64_t n) {
    if (dt == st) {
        if (dst != src) memcpy(dst, src, sj_dtype_size(dt) * (size_t)n);
        return;
    }
    conv_job j = { dst, src, dt };
    sj_parallel_for(n, 1 << 14, conv_range, &j);
}

static void matmul(void *C, int ldc, const void *A, int lda, const void *B, int ldb, int M,
                   int N, int K, int transA, int transB, int accum, int c_f32) {
    (void)c_f32;   /* act dtype is f32 here */
    sj_cpu_gemm(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accum);
}

/* The GEMM, then the addend: bit for bit the unfused matmul and add. */
static void matmul_add(void *D, const void *C, const void *A, const void *B, int M, int N,
                       int K, int transA, int transB) {
    if (D == C) { sj_cpu_matmul(D, A, B, M, N, K, transA, transB, 1); return; }
    sj_cpu_matmul(D, A, B, M, N, K, transA, transB, 0);
    sj_cpu_add(D, D, C, (int64_t)M * N, 1.0f);
}

static void *ctx_create(void) { static char ctx; return &ctx; }
static void ctx_free(void *ctx) { (void)ctx; }
static void bind(void *ctx) { (void)ctx; }
static sj_status sync_ok(void) { return SJ_OK; }
static sj_status no_graph(void) { return sj_fail(SJ_ERR_RUNTIME, "cpu backend: no graphs"); }
static sj_status no_graph_end(void **g) { *g = NULL; return no_graph(); }
static sj_status no_graph_launch(void *g) { (void)g; return no_graph(); }
static void graph_free(void *g) { (void)g; }

#define SJ_CPU_TABLE(NAME, DEVICE)                \
    .name = NAME,                                 \
    .act_dtype = SJ_F32,                          \
    .device = DEVICE,                             \
    .alloc = sj_alloc,                            \
    .free = sj_free,                              \
    .fill = sj_cpu_fill,                          \
    .to_host = copy_bytes,                        \
    .from_host = copy_bytes,                      \
    .to_host_async = copy_bytes,                  \
    .from_host_async = copy_bytes,                \
    .convert = convert,                           \
    .matmul = matmul,                             \
    .matmul_add = matmul_add,                     \
    .embedding_forward = sj_cpu_embedding_forward,\
    .embedding_backward = sj_cpu_embedding_backward,\
    .gather_rows_forward = sj_cpu_gather_rows_forward,\
    .gather_rows_backward = sj_cpu_gather_rows_backward,\
    .rmsnorm_forward = sj_cpu_rmsnorm_forward,    \
    .rmsnorm_backward = sj_cpu_rmsnorm_backward,  \
    .qk_norm_forward = sj_cpu_qk_norm_forward,    \
    .qk_norm_backward = sj_cpu_qk_norm_backward,  \
    .rope_forward = sj_cpu_rope_forward,          \
    .rope_backward = sj_cpu_rope_backward,        \
    .mla_pack_forward = sj_cpu_mla_pack_forward,  \
    .mla_pack_backward = sj_cpu_mla_pack_backward,\
    .head_slice_forward = sj_cpu_head_slice_forward,\
    .head_slice_backward = sj_cpu_head_slice_backward,\
    .attention_forward = sj_cpu_attention_forward,\
    .attention_backward = sj_cpu_attention_backward,\
    .swiglu_forward = sj_cpu_swiglu_forward,      \
    .swiglu_backward = sj_cpu_swiglu_backward,    \
    .add = sj_cpu_add,                            \
    .copy = sj_cpu_copy,                          \
    .pair_heads_forward = sj_cpu_pair_heads_forward,\
    .pair_heads_backward = sj_cpu_pair_heads_backward,\
    .mix_forward = sj_cpu_mix_forward,            \
    .mix_backward = sj_cpu_mix_backward,          \
    .cross_entropy_forward = sj_cpu_cross_entropy_forward,\
    .cross_entropy_backward = sj_cpu_cross_entropy_backward,\
    .moe_route_forward = sj_cpu_moe_route_forward,\
    .moe_route_backward = sj_cpu_moe_route_backward,\
    .moe_permute_forward = sj_cpu_moe_permute_forward,\
    .moe_permute_backward = sj_cpu_moe_permute_backward,\
    .moe_unpermute_forward = sj_cpu_moe_unpermute_forward,\
    .moe_unpermute_backward = sj_cpu_moe_unpermute_backward,\
    .moe_matmul = sj_cpu_moe_matmul,              \
    .moe_matmul_wgrad = sj_cpu_moe_matmul_wgrad,  \
    .sumsq = sj_cpu_sumsq_into,                   \
    .scan_forward = sj_cpu_scan_forward,\
    .scan_backward = sj_cpu_scan_backward,\
    .conv1d_silu_forward = sj_cpu_conv1d_silu_forward,\
    .conv1d_silu_backward = sj_cpu_conv1d_silu_backward,\
    .ssd_prep_forward = sj_cpu_ssd_prep_forward,\
    .ssd_prep_backward = sj_cpu_ssd_prep_backward,\
    .ssd_skip_forward = sj_cpu_ssd_skip_forward,\
    .ssd_skip_backward = sj_cpu_ssd_skip_backward,\
    .gated_rmsnorm_forward = sj_cpu_gated_rmsnorm_forward,\
    .gated_rmsnorm_backward = sj_cpu_gated_rmsnorm_backward,\
    .linear_prep_forward = sj_cpu_linear_prep_forward,\
    .linear_prep_backward = sj_cpu_linear_prep_backward,\
    .linear_norm_forward = sj_cpu_linear_norm_forward,\
    .linear_norm_backward = sj_cpu_linear_norm_backward,\
    .adamw = sj_cpu_adamw,                        \
    .lion = sj_cpu_lion,                          \
    .sgd = sj_cpu_sgd,                            \
    .adafactor = sj_cpu_adafactor,                \
    .muon_momentum = sj_cpu_muon_momentum,        \
    .muon_normalize = sj_cpu_muon_normalize,      \
    .muon_apply = sj_cpu_muon_apply,              \
    .ctx_create = ctx_create,                     \
    .ctx_free = ctx_free,                         \
    .bind = bind,                                 \
    .sync = sync_ok,                              \
    .host_alloc = sj_alloc,                       \
    .host_free = sj_free,                         \
    .capture_begin = no_graph,                    \
    .capture_end = no_graph_end,                  \
    .graph_launch = no_graph_launch,              \
    .graph_free = graph_free,

const sj_backend sj_cpu_table = { SJ_CPU_TABLE("cpu", 0) };
/* Testing: the CPU kernels behind the device code path (inputs staged into
 * the arena, in-place loss gradient, scalars read through pointers), so
 * that path is checked against the plain one on machines without a GPU. */
const sj_backend sj_cpu_staged_table = { SJ_CPU_TABLE("cpu-staged", 1) };
