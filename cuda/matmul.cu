/* matmul.cu — dense GEMMs through cuBLASLt: bf16, f16 (or f32) operands, f32
 * accumulation (CUBLAS_COMPUTE_32F: no TF32, so the f32 mode is plain f32),
 * f32 or act-dtype output. One handle per process; the workspace belongs to
 * the bound context; descriptors and the chosen algorithm are cached per
 * shape, so a replayed or eager step does no heuristic search.
 *
 * matmul_add gives cuBLASLt a separate C (the residual) with beta = 1.
 *
 * f16 outputs: cuBLASLt rounds the f32 result to half with no saturation, so
 * an overflow gives inf; one in-place pass (sat_f16) turns +-inf into +-65504,
 * which is what the clamped cast of common.cuh gives for the same f32 value
 * (the inputs are finite: every f16 writer clamps). NaN stays NaN.
 *
 * Row-major C(M,N) = op(A) op(B) is computed as the column-major product
 * C^T(N,M) = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its "B" our A. */
#include "common.cuh"
#include "kernels.h"
#include <cublasLt.h>
#include <mutex>
#include <stdio.h>

static cublasLtHandle_t handle;
static std::once_flag handle_once;
static cublasStatus_t handle_status = CUBLAS_STATUS_NOT_INITIALIZED;

static void make_handle(void) { handle_status = cublasLtCreate(&handle); }

extern "C" void sj_cuda_matmul_init(void) { std::call_once(handle_once, make_handle); }

/* Alignments matter: the heuristic assumes 256-byte aligned operands
 * unless told otherwise, and parameter views sit at arbitrary offsets. */
struct plan_key {
    int M, N, K, tA, tB, c_f32;
    int lda, ldb, ldc;                 /* row strides of our A, B, C and D (elements) */
    cudaDataType ab;                   /* of A, B (and C, D unless c_f32) */
    uint32_t al_a, al_b, al_c, al_d;   /* byte alignment of our A, B, C, D (<= 256) */
    bool operator==(const plan_key &o) const {
        return M == o.M && N == o.N && K == o.K && tA == o.tA && tB == o.tB &&
               c_f32 == o.c_f32 && lda == o.lda && ldb == o.ldb && ldc == o.ldc && ab == o.ab && al_a == o.al_a && al_b == o.al_b &&
               al_c == o.al_c && al_d == o.al_d;
    }
};

static uint32_t alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && (a & (al - 1))) al >>= 1;
    return al;
}
struct plan {
    plan_key key;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    size_t ws;
};
/* A cache of plans, one per shape seen; when full, the oldest entry makes
 * room (a long session, a sweep or a test run meets many shapes). Callers
 * hold plans_mu from lookup through the cublasLtMatmul call that reads the
 * plan's descriptors, so no plan is evicted while in use. */
enum { N_PLANS = 256 };
static plan plans[N_PLANS];
static int n_plans, next_victim;
static std::mutex plans_mu;

static void plan_destroy(plan *p) {
    if (p->op) cublasLtMatmulDescDestroy(p->op);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    *p = plan{};
}

#define LT_CHECK(call, what)                                                              \
    do {                                                                                  \
        cublasStatus_t _s = (call);                                                       \
        if (_s != CUBLAS_STATUS_SUCCESS) {                                                \
            char _d[160];                                                                 \
            snprintf(_d, sizeof _d, "cuBLASLt status %d (%s) for %s M=%d N=%d K=%d",      \
                     (int)_s, cublasLtGetStatusName(_s), what, k.M, k.N, k.K);            \
            sj_cuda_error(#call, _d, __FILE__, __LINE__);                                 \
            return NULL;                                                                  \
        }                                                                                 \
    } while (0)

static const plan *get_plan(const plan_key &k, size_t ws_bytes) {
    for (int i = 0; i < n_plans; i++)
        if (plans[i].key == k) return &plans[i];
    plan p = {};
    p.key = k;
    const cudaDataType ab = k.ab;
    const cudaDataType ct = k.c_f32 ? CUDA_R_32F : ab;
    const cublasOperation_t opa = k.tB ? CUBLAS_OP_T : CUBLAS_OP_N;   /* theirs A = our B */
    const cublasOperation_t opb = k.tA ? CUBLAS_OP_T : CUBLAS_OP_N;   /* theirs B = our A */
    LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa), "transa");
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb), "transb");
    /* Stored shapes, column-major: our B is (N x K), or (K x N) when
     * transposed; our A is (K x M), or (M x K); C is (N x M); each with
     * our row stride as its leading dimension. */
    if (opa == CUBLAS_OP_N) LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, k.N, k.K, k.ldb), "layout a");
    else LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, k.K, k.N, k.ldb), "layout a");
    if (opb == CUBLAS_OP_N) LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, k.K, k.M, k.lda), "layout b");
    else LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, k.M, k.K, k.lda), "layout b");
    LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, ct, k.N, k.M, k.ldc), "layout c");
    cublasLtMatmulPreference_t pref;
    LT_CHECK(cublasLtMatmulPreferenceCreate(&pref), "preference");
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &ws_bytes, sizeof ws_bytes), "workspace");
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                  &k.al_b, sizeof k.al_b), "align a");
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                  &k.al_a, sizeof k.al_a), "align b");
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                  &k.al_c, sizeof k.al_c), "align c");
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                  &k.al_d, sizeof k.al_d), "align d");
    cublasLtMatmulHeuristicResult_t res[1];
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.c, p.c, pref, 1,
                                                       res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    LT_CHECK(st, "heuristic");
    if (found < 1) {
        char d[128];
        snprintf(d, sizeof d, "no cuBLASLt algorithm for M=%d N=%d K=%d", k.M, k.N, k.K);
        sj_cuda_error("cublasLtMatmulAlgoGetHeuristic", d, __FILE__, __LINE__);
        return NULL;
    }
    p.algo = res[0].algo;
    p.ws = res[0].workspaceSize;
    int slot;
    if (n_plans < N_PLANS) {
        slot = n_plans++;
    } else {
        slot = next_victim;
        next_victim = (next_victim + 1) % N_PLANS;
        plan_destroy(&plans[slot]);
    }
    plans[slot] = p;
    return &plans[slot];
}

/* +-inf -> +-65504 in place, 8 halves a step when D is 16-byte aligned
 * (the tail, or all of an unaligned D, takes the scalar loop).
 * Bound: memory bandwidth, 4 B per element. */
static __device__ __forceinline__ uint32_t sat2(uint32_t w) {
    const uint32_t inf_lo = 0x7c00u, inf_hi = 0x7c000000u, max_lo = 0x7bffu, max_hi = 0x7bff0000u;
    if ((w & 0x7fffu) == inf_lo) w = (w & ~0x7fffu) | max_lo;
    if ((w & 0x7fff0000u) == inf_hi) w = (w & ~0x7fff0000u) | max_hi;
    return w;
}
static __global__ void __launch_bounds__(256) sat_f16_k(f16 *x, int64_t n, int vec) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t nv = vec ? n / 8 : 0;
    for (int64_t i = t0; i < nv; i += stride) {
        uint4 u = ld16(x + i * 8);
        u.x = sat2(u.x); u.y = sat2(u.y); u.z = sat2(u.z); u.w = sat2(u.w);
        st16(x + i * 8, u);
    }
    for (int64_t i = nv * 8 + t0; i < n; i += stride) x[i] = fromf<f16>(tof(x[i]));
}
static void sat_f16(f16 *x, int64_t n) {
    const int vec = aligned16(x);
    sat_f16_k<<<sj_blocks(vec ? n / 8 + 1 : n, 256, 8192), 256, 0, sj_stream()>>>(x, n, vec);
    LAUNCH_CHECK("matmul f16 saturation");
}

/* D = op(A) op(B) (+ C when C): the addend is cuBLASLt's C with beta = 1,
 * in the same layout as D (accumulation is C = D); rows lda, ldb, ldc
 * elements apart. */
static void matmul(void *D, const void *C, int ldc, const void *A, int lda, const void *B,
                   int ldb, int M, int N, int K, int tA, int tB, int c_f32, cudaDataType ab) {
    if (M <= 0 || N <= 0) return;
    sj_cuda_matmul_init();
    if (handle_status != CUBLAS_STATUS_SUCCESS) {
        sj_cuda_error("cublasLtCreate", cublasLtGetStatusName(handle_status), __FILE__, __LINE__);
        return;
    }
    sj_cuda_ctx *ctx = sj_cuda_cur();
    const plan_key k = { M, N, K, tA, tB, c_f32, lda, ldb, ldc, ab, alignment(A), alignment(B),
                         alignment(C ? C : D), alignment(D) };
    cublasStatus_t st;
    {
        std::lock_guard<std::mutex> lk(plans_mu);
        const plan *p = get_plan(k, ctx->workspace_bytes);
        if (!p) return;
        const float alpha = 1.0f, beta = C ? 1.0f : 0.0f;
        st = cublasLtMatmul(handle, p->op, &alpha, B, p->a, A, p->b, &beta, C ? C : D, p->c, D, p->c,
                            &p->algo, ctx->workspace, ctx->workspace_bytes, ctx->stream);
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        char d[160];
        snprintf(d, sizeof d, "cuBLASLt status %d (%s) for M=%d N=%d K=%d", (int)st,
                 cublasLtGetStatusName(st), M, N, K);
        sj_cuda_error("cublasLtMatmul", d, __FILE__, __LINE__);
    }
    if (ab == CUDA_R_16F && !c_f32) sat_f16((f16 *)D, (int64_t)(M - 1) * ldc + N);
}

/* matmul_add: the residual add in the epilogue, no separate add kernel,
 * and D is rounded once (the unfused pair rounds the product, then the sum). */
#define SJ_CU_MATMUL(T, AB)                                                                   \
extern "C" void sj_cuda_matmul_##T(void *C, int ldc, const void *A, int lda, const void *B,     \
                                   int ldb, int M, int N, int K, int transA, int transB,       \
                                   int accum, int c_f32) {                                     \
    matmul(C, accum ? C : NULL, ldc, A, lda, B, ldb, M, N, K, transA, transB, c_f32, AB);      \
}                                                                                              \
extern "C" void sj_cuda_matmul_add_##T(void *D, const void *C, const void *A, const void *B,   \
                                       int M, int N, int K, int transA, int transB) {          \
    matmul(D, C, N, A, transA ? M : K, B, transB ? K : N, M, N, K, transA, transB, 0, AB);     \
}
SJ_CU_MATMUL(f32, CUDA_R_32F)
SJ_CU_MATMUL(bf16, CUDA_R_16BF)
SJ_CU_MATMUL(f16, CUDA_R_16F)
