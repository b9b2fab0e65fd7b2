/* gemm_sm90_check.cu — the fused Hopper GEMMs (cuda/gemm_sm90.cu) on their
 * own: each epilogue against an f32 reference on random data (odd shapes
 * included: row tails, K not a multiple of 64), then time against cuBLASLt
 * on the same shapes in the same process. Needs an sm_90 GPU.
 *
 *   nvcc -O3 -std=c++17 -Icsrc -Icuda -gencode arch=compute_90a,code=sm_90a \
 *        benchmarks/probes/gemm_sm90_check.cu -lcublasLt -o /tmp/gemm_sm90_check && /tmp/gemm_sm90_check
 */
#include "sm90_check.cuh"
#include <cublasLt.h>

/* P[m][n] = sum_k x[m][k] w[n][k] in f32 */
__global__ void ref_gemm_k(float *P, const bf16 *x, const bf16 *w, int M, int N, int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
    if (n >= N) return;
    float s = 0.f;
    for (int k = 0; k < K; k++) s += __bfloat162float(x[(int64_t)m * K + k]) * __bfloat162float(w[(int64_t)n * K + k]);
    P[(int64_t)m * N + n] = s;
}

static bf16 *rand_bf16(int64_t n, uint32_t seed, float scale) {
    bf16 *p;
    CK(cudaMalloc(&p, n * 2));
    fill_k<<<1024, 256>>>(p, n, seed, scale);
    return p;
}
static std::vector<float> ref_product(const bf16 *x, const bf16 *w, int M, int N, int K) {
    float *P;
    CK(cudaMalloc(&P, (int64_t)M * N * 4));
    ref_gemm_k<<<dim3((N + 127) / 128, M), 128>>>(P, x, w, M, N, K);
    std::vector<float> h((int64_t)M * N);
    CK(cudaMemcpy(h.data(), P, h.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaFree(P));
    return h;
}
static int n_fail;
static void report(const char *what, double err) {
    const bool ok = err < 8e-3 && !failed && !std::isnan(err);
    printf("%-46s rel err %.2e  %s\n", what, err, ok ? "ok" : "FAIL");
    n_fail += !ok;
}

static void check_plain(int M, int N, int K) {
    bf16 *x = rand_bf16((int64_t)M * K, 1, 2.f), *w = rand_bf16((int64_t)N * K, 2, 0.2f), *o = rand_bf16((int64_t)M * N, 3, 100.f);
    if (!matmul_plain<bf16>(o, x, w, M, N, K)) { printf("plain %dx%dx%d: not taken\n", M, N, K); n_fail++; return; }
    CK(cudaDeviceSynchronize());
    char name[96];
    snprintf(name, sizeof name, "plain   M=%d N=%d K=%d", M, N, K);
    report(name, rel_err(down(o, (int64_t)M * N), ref_product(x, w, M, N, K)));
    cudaFree(x); cudaFree(w); cudaFree(o);
}
/* with_gu: the product is stored too (training keeps it) */
static void check_swiglu(int M, int F, int K, bool with_gu = false) {
    bf16 *x = rand_bf16((int64_t)M * K, 4, 2.f), *w = rand_bf16((int64_t)2 * F * K, 5, 0.2f), *h = rand_bf16((int64_t)M * F, 6, 100.f);
    bf16 *gu = with_gu ? rand_bf16((int64_t)M * 2 * F, 7, 100.f) : NULL;
    if (!matmul_swiglu<bf16>(h, gu, x, w, M, F, K)) { printf("swiglu %dx%dx%d: not taken\n", M, F, K); n_fail++; return; }
    CK(cudaDeviceSynchronize());
    std::vector<float> P = ref_product(x, w, M, 2 * F, K), want((int64_t)M * F);
    for (int64_t m = 0; m < M; m++)
        for (int f = 0; f < F; f++) {
            const float g = P[m * 2 * F + f], u = P[m * 2 * F + F + f];
            want[m * F + f] = g / (1.f + expf(-g)) * u;
        }
    char name[96];
    snprintf(name, sizeof name, "swiglu  M=%d F=%d K=%d%s", M, F, K, with_gu ? " (+gu)" : "");
    report(name, rel_err(down(h, (int64_t)M * F), want));
    if (gu) {
        report("  its gu", rel_err(down(gu, (int64_t)M * 2 * F), P));
        cudaFree(gu);
    }
    cudaFree(x); cudaFree(w); cudaFree(h);
}
/* Plain RoPE at base 10000, cos and sin scaled by mscale (YaRN's at factor 4 by default). */
static sj_rope rope_table(int hd, float mscale = 1.1386294f) {
    sj_rope r = {};
    r.n_pairs = hd / 2;
    r.mscale = mscale;
    for (int i = 0; i < hd / 2; i++)
        r.inv_freq[i] = 1.0f / (float)pow(10000.0, (double)((float)(2 * i) / (float)hd));
    return r;
}
static void check_rope(int B, int T, int H, int KV, int hd, int K, int pos0) {
    const int M = B * T, nh = H + 2 * KV, N = nh * hd, n_rot = H + KV;
    bf16 *x = rand_bf16((int64_t)M * K, 7, 2.f), *w = rand_bf16((int64_t)N * K, 8, 0.2f), *o = rand_bf16((int64_t)M * N, 9, 100.f);
    const sj_rope rope = rope_table(hd);
    const float *inv = rope.inv_freq;
    if (!matmul_rope<bf16>(o, x, w, B, T, nh, n_rot, hd, K, pos0, &rope)) {
        printf("rope %d %d: not taken\n", M, N); n_fail++; return;
    }
    CK(cudaDeviceSynchronize());
    std::vector<float> P = ref_product(x, w, M, N, K), want = P;
    for (int64_t m = 0; m < M; m++) {
        const float pos = (float)(pos0 + m % T);
        for (int hh = 0; hh < n_rot; hh++)
            for (int i = 0; i < hd / 2; i++) {
                const float a = pos * inv[i], c = cosf(a) * rope.mscale, s = sinf(a) * rope.mscale;
                const int64_t j = m * N + hh * hd + i;
                want[j] = P[j] * c - P[j + hd / 2] * s;
                want[j + hd / 2] = P[j + hd / 2] * c + P[j] * s;
            }
    }
    char name[96];
    snprintf(name, sizeof name, "rope    B=%d T=%d heads=%d+2x%d hd=%d K=%d pos0=%d", B, T, H, KV, hd, K, pos0);
    report(name, rel_err(down(o, (int64_t)M * N), want));
    cudaFree(x); cudaFree(w); cudaFree(o);
}

/* ---- timing ---- */
static cublasLtHandle_t lt;
static void *ws;
static const size_t WS = 8 << 20;
/* out (M, N) = x (M, K) w (N, K)^T, bf16, through cuBLASLt (as cuda/matmul.cu calls it) */
static void lt_gemm(bf16 *out, const bf16 *x, const bf16 *w, int M, int N, int K) {
    static cublasLtMatmulDesc_t op;
    static cublasLtMatrixLayout_t a, b, c;
    static cublasLtMatmulAlgo_t algo;
    static int key[3];
    if (key[0] != M || key[1] != N || key[2] != K) {
        key[0] = M; key[1] = N; key[2] = K;
        const cublasOperation_t T_ = CUBLAS_OP_T, N_ = CUBLAS_OP_N;
        cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &T_, sizeof T_);
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &N_, sizeof N_);
        cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, K, N, K);
        cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, K, M, K);
        cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, N, M, N);
        cublasLtMatmulPreference_t pref;
        cublasLtMatmulPreferenceCreate(&pref);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &WS, sizeof WS);
        cublasLtMatmulHeuristicResult_t r;
        int found = 0;
        cublasLtMatmulAlgoGetHeuristic(lt, op, a, b, c, c, pref, 1, &r, &found);
        if (!found) { fprintf(stderr, "no cuBLASLt algo\n"); exit(1); }
        algo = r.algo;
    }
    const float one = 1.f, zero = 0.f;
    cublasLtMatmul(lt, op, &one, w, a, x, b, &zero, out, c, out, c, &algo, ws, WS, 0);
}
__global__ void swiglu_ref_k(bf16 *h, const bf16 *gu, int64_t M, int F) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * F; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t m = i / F, f = i % F;
        const float g = __bfloat162float(gu[m * 2 * F + f]), u = __bfloat162float(gu[m * 2 * F + F + f]);
        h[i] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
    }
}
template <class F>
static float time_ms(F f, int reps = 50) {
    for (int i = 0; i < 5; i++) f();
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    std::vector<float> ts;
    for (int r = 0; r < 5; r++) {
        cudaEventRecord(e0);
        for (int i = 0; i < reps; i++) f();
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        ts.push_back(ms / reps);
    }
    std::sort(ts.begin(), ts.end());
    return ts[2];
}

int main(int argc, char **argv) {
    CK(cudaSetDevice(0));
    check_plain(1000, 512, 200);
    check_plain(16384, 3072, 512);
    check_swiglu(1000, 256, 200);
    check_swiglu(16384, 1536, 512);
    check_swiglu(333, 768, 256);
    check_swiglu(300, 320, 128);   /* 64-wide output tiles */
    check_swiglu(1000, 768, 200, true);
    check_swiglu(300, 320, 128, true);
    check_rope(2, 300, 8, 8, 64, 512, 0);
    check_rope(2, 100, 4, 2, 128, 256, 7);
    check_rope(3, 64, 6, 3, 32, 192, 0);   /* 384 columns: 128-wide tiles */
    check_rope(32, 512, 8, 8, 64, 512, 0);
    if (argc > 1 && !strcmp(argv[1], "--check-only")) return n_fail ? 1 : 0;

    cublasLtCreate(&lt);
    CK(cudaMalloc(&ws, WS));
    printf("\n%-34s %10s %10s %8s\n", "shape (M x N x K)", "ours us", "cuBLASLt", "ratio");
    struct { int M, F, K; } sw[] = {{16384, 1536, 512}, {32768, 768, 256}, {16384, 2304, 768}};   /* medium, small, d768 */
    for (auto s : sw) {
        const int M = s.M, F = s.F, K = s.K;
        bf16 *x = rand_bf16((int64_t)M * K, 1, 2.f), *w = rand_bf16((int64_t)2 * F * K, 2, .2f);
        bf16 *gu = rand_bf16((int64_t)M * 2 * F, 3, 1.f), *h = rand_bf16((int64_t)M * F, 4, 1.f);
        const float lt_ms = time_ms([&] { lt_gemm(gu, x, w, M, 2 * F, K); });
        const float unf = time_ms([&] { lt_gemm(gu, x, w, M, 2 * F, K); swiglu_ref_k<<<2048, 256>>>(h, gu, M, F); });
        const float pl = time_ms([&] { matmul_plain<bf16>(gu, x, w, M, 2 * F, K); });
        const float fu = time_ms([&] { matmul_swiglu<bf16>(h, NULL, x, w, M, F, K); });
        const float fg = time_ms([&] { matmul_swiglu<bf16>(h, gu, x, w, M, F, K); });
        const double fl = 2.0 * M * 2 * F * K;
        printf("plain  %6d x %5d x %4d        %10.1f %10.1f %7.2fx  (%.0f / %.0f TF/s)\n", M, 2 * F, K, pl * 1e3, lt_ms * 1e3,
               lt_ms / pl, fl / pl / 1e9, fl / lt_ms / 1e9);
        printf("swiglu %6d x %5d x %4d        %10.1f %10.1f %7.2fx  (vs GEMM + swiglu kernel)\n", M, 2 * F, K, fu * 1e3, unf * 1e3, unf / fu);
        printf("  +gu  %6d x %5d x %4d        %10.1f %10.1f %7.2fx  (training: gu kept too)\n", M, 2 * F, K, fg * 1e3, unf * 1e3, unf / fg);
        cudaFree(x); cudaFree(w); cudaFree(gu); cudaFree(h);
    }
    struct { int B, T, H, K; } ro[] = {{32, 512, 8, 512}, {16, 1024, 12, 768}};
    for (auto r : ro) {
        const int B = r.B, T = r.T, H = r.H, hd = 64, K = r.K, N = 3 * H * hd, M = B * T;
        bf16 *x = rand_bf16((int64_t)M * K, 1, 2.f), *w = rand_bf16((int64_t)N * K, 2, .2f), *o = rand_bf16((int64_t)M * N, 3, 1.f);
        const float lt_ms = time_ms([&] { lt_gemm(o, x, w, M, N, K); });
        const sj_rope rope = rope_table(hd);
        const float fu = time_ms([&] { matmul_rope<bf16>(o, x, w, B, T, 3 * H, 2 * H, hd, K, 0, &rope); });
        printf("rope   %6d x %5d x %4d        %10.1f %10.1f %7.2fx  (vs GEMM alone)\n", M, N, K, fu * 1e3, lt_ms * 1e3, lt_ms / fu);
    }
    CK(cudaDeviceSynchronize());
    printf("%s\n", n_fail || failed ? "FAILED" : "all checks passed");
    return n_fail || failed ? 1 : 0;
}
