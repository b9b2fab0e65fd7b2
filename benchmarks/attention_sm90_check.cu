/* attention_sm90_check.cu — the wgmma attention forward (cuda/attention_sm90.cu)
 * against the mma.sync kernel it replaces on Hopper (cuda/attention.cu, itself
 * tested against float64 in tests/test_cuda.py; the two use the same tiles and
 * agree bit for bit): outputs and log-sum-exps on
 * random qkv (poisoned outputs, odd lengths, GQA), then both timed on the
 * training and forward shapes of benchmarks/vs_torch.py. Needs an sm_90 GPU.
 *
 *   nvcc -O3 -std=c++17 -Icsrc -Icuda -gencode arch=compute_90a,code=sm_90a \
 *        benchmarks/attention_sm90_check.cu -lcuda -o /tmp/attn_check && /tmp/attn_check
 */
#include "../cuda/gemm_sm90.cu"
#include "../cuda/attention_sm90.cu"
#include "../cuda/attention.cu"
#include <algorithm>
#include <cmath>
#include <stdarg.h>
#include <vector>

static sj_cuda_ctx ctx0;
sj_cuda_ctx *sj_cuda_cur(void) { return &ctx0; }
static bool failed;
void sj_cuda_error(const char *what, const char *detail, const char *file, int line) {
    fprintf(stderr, "CUDA error: %s (%s at %s:%d)\n", detail, what, file, line);
    failed = true;
}
bool sj_cuda_has_error(void) { return failed; }
extern "C" void sj_cuda_rope_inv_freqs(float *inv, int hd, float theta) {
    for (int i = 0; i < hd / 2; i++) inv[i] = 1.0f / (float)pow((double)theta, (double)(2 * i) / hd);
}
extern "C" sj_status sj_fail(sj_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    return code;
}
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void fill_k(bf16 *p, int64_t n, uint32_t seed, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = __float2bfloat16(((h & 0xffffff) / 16777216.0f - 0.5f) * scale);
    }
}
template <class X> static std::vector<float> down(const X *p, int64_t n) {
    std::vector<X> raw(n);
    CK(cudaMemcpy(raw.data(), p, n * sizeof(X), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (int64_t i = 0; i < n; i++) {
        if constexpr (std::is_same<X, float>::value) f[i] = raw[i];
        else f[i] = __bfloat162float(raw[i]);
    }
    return f;
}
static double max_abs_diff(const std::vector<float> &a, const std::vector<float> &b, double *mx) {
    double e = 0;
    *mx = 0;
    for (size_t i = 0; i < a.size(); i++) {
        e = std::isnan(a[i]) ? INFINITY : fmax(e, fabs((double)a[i] - b[i]));
        *mx = fmax(*mx, fabs((double)b[i]));
    }
    return e;
}
static int n_fail;

struct shape { int B, T, H, KV; float scale; };
static void check(shape s) {
    const int B = s.B, T = s.T, H = s.H, KV = s.KV, hd = 64;
    const int64_t nq = (int64_t)B * T * (H + 2 * KV) * hd, no = (int64_t)B * T * H * hd, nl = (int64_t)B * H * T;
    bf16 *qkv, *o1, *o2;
    float *l1, *l2;
    CK(cudaMalloc(&qkv, nq * 2)); CK(cudaMalloc(&o1, no * 2)); CK(cudaMalloc(&o2, no * 2));
    CK(cudaMalloc(&l1, nl * 4)); CK(cudaMalloc(&l2, nl * 4));   /* outputs poisoned: NaN fails */
    fill_k<<<1024, 256>>>(qkv, nq, 11, s.scale);
    forward_mma<bf16, 64>(o1, l1, qkv, B, T, H, KV);
    CK(cudaMemset(o2, 0xff, no * 2)); CK(cudaMemset(l2, 0xff, nl * 4));
    const bool took = attn_fwd_sm90(o2, l2, qkv, B, T, H, KV, hd);
    CK(cudaDeviceSynchronize());
    double mo, ml;
    const double eo = max_abs_diff(down(o2, no), down(o1, no), &mo), el = max_abs_diff(down(l2, nl), down(l1, nl), &ml);
    const bool ok = took && eo / mo < 1e-2 && el < 1e-3 * fmax(1.0, ml) && !failed;
    printf("B=%-3d T=%-5d H=%-3d KV=%-3d scale %.0f: out rel %.2e, lse abs %.2e  %s\n", B, T, H, KV,
           s.scale, eo / mo, el, ok ? "ok" : "FAIL");
    n_fail += !ok;
    cudaFree(qkv); cudaFree(o1); cudaFree(o2); cudaFree(l1); cudaFree(l2);
}

static float median_ms(std::vector<float> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
static void bench(int B, int T, int H) {
    const int KV = H, hd = 64;
    const int64_t nq = (int64_t)B * T * 3 * H * hd, no = (int64_t)B * T * H * hd;
    bf16 *qkv, *o;
    float *l;
    CK(cudaMalloc(&qkv, nq * 2)); CK(cudaMalloc(&o, no * 2)); CK(cudaMalloc(&l, (int64_t)B * H * T * 4));
    fill_k<<<1024, 256>>>(qkv, nq, 5, 2.f);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    auto time = [&](auto f) {
        for (int i = 0; i < 3; i++) f();
        std::vector<float> ts;
        for (int r = 0; r < 7; r++) {
            cudaEventRecord(e0);
            for (int i = 0; i < 20; i++) f();
            cudaEventRecord(e1);
            cudaEventSynchronize(e1);
            float ms;
            cudaEventElapsedTime(&ms, e0, e1);
            ts.push_back(ms / 20);
        }
        return median_ms(ts);
    };
    const float a = time([&] { forward_mma<bf16, 64>(o, l, qkv, B, T, H, KV); });
    const float b = time([&] { attn_fwd_sm90(o, l, qkv, B, T, H, KV, hd); });
    const double fl = 4.0 * B * H * (double)T * T / 2 * hd;   /* causal: half the products */
    printf("B=%-3d T=%-5d H=%-3d  mma.sync %7.1f us (%3.0f TF/s)  wgmma %7.1f us (%3.0f TF/s)  %.2fx\n", B, T, H,
           a * 1e3, fl / a / 1e9, b * 1e3, fl / b / 1e9, a / b);
    cudaFree(qkv); cudaFree(o); cudaFree(l);
}

int main(int argc, char **argv) {
    CK(cudaSetDevice(0));
    sj_cuda_attention_init();
    for (shape s : {shape{2, 300, 4, 2, 2.f}, shape{3, 64, 2, 1, 2.f}, shape{1, 1000, 4, 4, 6.f},
                    shape{2, 129, 6, 3, 2.f}, shape{32, 512, 8, 8, 2.f}, shape{16, 1024, 12, 12, 2.f}})
        check(s);
    if (argc > 1 && !strcmp(argv[1], "--check-only")) return n_fail ? 1 : 0;
    bench(32, 512, 8);     /* forward and train rows, medium */
    bench(16, 1024, 12);   /* d768 */
    bench(64, 512, 4);     /* small */
    printf("%s\n", n_fail || failed ? "FAILED" : "all checks passed");
    return n_fail || failed ? 1 : 0;
}
