/* attention_sm90_check.cu — the wgmma attention kernels (cuda/attention_sm90.cu)
 * against the mma.sync kernels they replace on Hopper (cuda/attention.cu, tested
 * against float64 in tests/test_cuda.py), through the backend's own entry
 * points with the kernel choice switched (0: wgmma where it applies, 2:
 * mma.sync only): forward outputs and log-sum-exps (the same tiles: equal
 * bits expected) and dQ, dK, dV on random qkv (poisoned outputs, odd
 * lengths, GQA, sliding windows), then both timed on the shapes of benchmarks/vs_torch.py.
 * Needs an sm_90 GPU.
 *
 *   nvcc -O3 -std=c++17 -Icsrc -Icuda -gencode arch=compute_90a,code=sm_90a \
 *        benchmarks/probes/attention_sm90_check.cu -lcuda -o /tmp/attn_check && /tmp/attn_check
 */
#include "sm90_check.cuh"
#include "../../cuda/attention_sm90.cu"
#include "../../cuda/attention.cu"

static int n_fail;

struct bufs {
    int64_t nq, no, nl;
    bf16 *qkv, *dout, *out, *dqkv;
    float *lse;
    bufs(int B, int T, int H, int KV) {
        nq = (int64_t)B * T * (H + 2 * KV) * 64; no = (int64_t)B * T * H * 64; nl = (int64_t)B * H * T;
        CK(cudaMalloc(&qkv, nq * 2)); CK(cudaMalloc(&dqkv, nq * 2)); CK(cudaMalloc(&dout, no * 2));
        CK(cudaMalloc(&out, no * 2)); CK(cudaMalloc(&lse, nl * 4));
        fill_k<<<1024, 256>>>(qkv, nq, 11, 2.f);
        fill_k<<<1024, 256>>>(dout, no, 12, 1.f);
    }
    ~bufs() { cudaFree(qkv); cudaFree(dqkv); cudaFree(dout); cudaFree(out); cudaFree(lse); }
};
/* forward then backward with kernel choice v; outputs poisoned first */
static void run(bufs &b, int v, int B, int T, int H, int KV, int window) {
    sj_cuda_set_attention_variant(v);
    CK(cudaMemset(b.out, 0xff, b.no * 2)); CK(cudaMemset(b.lse, 0xff, b.nl * 4)); CK(cudaMemset(b.dqkv, 0xff, b.nq * 2));
    sj_cuda_attention_forward_bf16(b.out, b.lse, b.qkv, B, T, H, KV, 64, window);
    sj_cuda_attention_backward_bf16(b.dqkv, b.dout, b.qkv, b.out, b.lse, B, T, H, KV, 64, window, 0);
    CK(cudaDeviceSynchronize());
}

static void check(int B, int T, int H, int KV, int window = 0) {
    bufs b(B, T, H, KV);
    run(b, 2, B, T, H, KV, window);
    const auto o2 = down(b.out, b.no), l2 = down(b.lse, b.nl), d2 = down(b.dqkv, b.nq);
    run(b, 0, B, T, H, KV, window);
    const auto o0 = down(b.out, b.no), l0 = down(b.lse, b.nl), d0 = down(b.dqkv, b.nq);
    const double eo = rel_err(o0, o2), el = rel_err(l0, l2), ed = rel_err(d0, d2);
    const bool ok = eo == 0 && el == 0 && ed < 1e-2 && !failed;
    printf("B=%-3d T=%-5d H=%-3d KV=%-3d window=%-4d  forward: out %.1e, lse %.1e; backward dqkv rel %.2e  %s\n",
           B, T, H, KV, window, eo, el, ed, ok ? "ok" : "FAIL");
    n_fail += !ok;
}

static float median_ms(std::vector<float> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
static void bench(int B, int T, int H) {
    bufs b(B, T, H, H);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    auto time = [&](auto f) {
        for (int i = 0; i < 3; i++) f();
        std::vector<float> ts;
        for (int r = 0; r < 7; r++) {
            cudaEventRecord(e0);
            for (int i = 0; i < 10; i++) f();
            cudaEventRecord(e1);
            cudaEventSynchronize(e1);
            float ms;
            cudaEventElapsedTime(&ms, e0, e1);
            ts.push_back(ms / 10);
        }
        return median_ms(ts);
    };
    float f[2], bw[2];
    for (int v : {2, 0}) {
        sj_cuda_set_attention_variant(v);
        f[v / 2] = time([&] { sj_cuda_attention_forward_bf16(b.out, b.lse, b.qkv, B, T, H, H, 64, 0); });
        bw[v / 2] = time([&] { sj_cuda_attention_backward_bf16(b.dqkv, b.dout, b.qkv, b.out, b.lse, B, T, H, H, 64, 0, 0); });
    }
    const double fl = 4.0 * B * H * (double)T * T / 2 * 64;   /* causal: half the products */
    printf("B=%-3d T=%-5d H=%-3d forward  mma.sync %7.1f us (%3.0f TF/s)  wgmma %7.1f us (%3.0f TF/s)  %.2fx\n", B, T,
           H, f[1] * 1e3, fl / f[1] / 1e9, f[0] * 1e3, fl / f[0] / 1e9, f[1] / f[0]);
    printf("                       backward mma.sync %7.1f us (%3.0f TF/s)  wgmma %7.1f us (%3.0f TF/s)  %.2fx\n",
           bw[1] * 1e3, 2.5 * fl / bw[1] / 1e9, bw[0] * 1e3, 2.5 * fl / bw[0] / 1e9, bw[1] / bw[0]);
}

int main(int argc, char **argv) {
    CK(cudaSetDevice(0));
    sj_cuda_attention_init();
    ctx0.scratch_bytes = SJ_CUDA_SCRATCH;   /* the backward's D = rowsum(dO * O) */
    CK(cudaMalloc(&ctx0.scratch, ctx0.scratch_bytes));
    check(2, 300, 4, 2);
    check(3, 64, 2, 1);
    check(1, 1000, 4, 4);
    check(2, 129, 6, 3);
    check(3, 77, 4, 2);
    check(32, 512, 8, 8);
    check(16, 1024, 12, 12);
    check(2, 300, 4, 2, 5);      /* windows: within a tile, across tiles, T - 1 */
    check(3, 77, 4, 2, 70);
    check(1, 1000, 4, 4, 999);
    if (argc > 1 && !strcmp(argv[1], "--check-only")) return n_fail ? 1 : 0;
    bench(32, 512, 8);     /* forward and train rows, medium */
    bench(16, 1024, 12);   /* d768 */
    bench(64, 512, 4);     /* small */
    printf("%s\n", n_fail || failed ? "FAILED" : "all checks passed");
    return n_fail || failed ? 1 : 0;
}
