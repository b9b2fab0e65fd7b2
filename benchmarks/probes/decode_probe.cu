/* decode_probe.cu — the GPU decode step (cuda/decode.cu) on its own, on
 * random weights of a model's shape: the persistent kernel's greedy tokens
 * and logits against the one-kernel-per-phase path (bit for bit); its
 * speed; and, traced, where a step's time goes:
 * each phase's critical path (last block out of the previous barrier to the
 * last block into the next) and each grid barrier (last arrival to last
 * departure), from %globaltimer stamps of every block.
 *
 *   nvcc -O3 -std=c++17 -Icsrc -Icuda -arch=sm_90a -DDEC_TRACE \
 *        benchmarks/probes/decode_probe.cu -o /tmp/decode_probe && /tmp/decode_probe smollm2
 */
#include "../../cuda/decode.cu"
#include "kernel_harness.cuh"
#include <map>
#include <string>

struct shape { const char *name; int C, L, H, KV, F, V; };
static const shape shapes[] = {
    {"small", 256, 6, 4, 4, 768, 8192},
    {"medium", 512, 12, 8, 8, 1536, 8192},
    {"smollm2", 576, 30, 9, 3, 1536, 49152},
};

static bf16 *rand_bf16(int64_t n, uint32_t seed, float scale) {
    bf16 *p;
    CK(cudaMalloc(&p, n * 2));
    fill_k<<<1024, 256>>>(p, n, seed, scale);
    return p;
}
static float *rand_f32(int64_t n, uint32_t seed, float lo, float hi) {
    std::vector<float> h(n);
    for (int64_t i = 0; i < n; i++) h[i] = lo + (hi - lo) * (float)((i * 2654435761u ^ seed) % 10007) / 10007.f;
    float *p;
    CK(cudaMalloc(&p, n * 4));
    CK(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
    return p;
}
template <class X> static X *zeros(int64_t n) {
    X *p;
    CK(cudaMalloc(&p, n * sizeof(X)));
    CK(cudaMemset(p, 0, n * sizeof(X)));
    return p;
}

enum { P0 = 16 };   /* prompt positions already in the cache */

/* n greedy steps from (token 1, position P0); the tokens, and the last logits */
static std::vector<int> run(const dec::params &p, int persistent, int n, int grid, std::vector<float> *logits) {
    const int io[2] = {1, P0};
    CK(cudaMemcpy(p.io, io, sizeof io, cudaMemcpyHostToDevice));
    dec::enqueue(p, 1, persistent, n, grid, 0);
    CK(cudaDeviceSynchronize());
    if (sj_cuda_has_error()) exit(1);
    std::vector<int> out(n);
    CK(cudaMemcpy(out.data(), p.out, n * 4, cudaMemcpyDeviceToHost));
    if (logits) *logits = down(p.logits, p.V);
    return out;
}

int main(int argc, char **argv) {
    const char *want = argc > 1 ? argv[1] : "smollm2";
    const int n = argc > 2 ? atoi(argv[2]) : 128;
    const shape *s = nullptr;
    for (const shape &x : shapes)
        if (!strcmp(x.name, want)) s = &x;
    if (!s) { fprintf(stderr, "unknown shape %s (small, medium, smollm2)\n", want); return 2; }
    const int C = s->C, L = s->L, H = s->H, KV = s->KV, F = s->F, V = s->V, hd = C / H;
    const int mc = P0 + n + 1, QR = (H + 2 * KV) * hd;
    dec::params p = {};
    p.C = C; p.F = F; p.H = H; p.KV = KV; p.hd = hd; p.V = V; p.L = L; p.max_ctx = mc;
    p.eps = 1e-5f; p.scale = 1.f / sqrtf((float)hd); p.fuse_ctx = 32 * dec::WARPS;
    const float ws = 2.f / sqrtf((float)C);
    p.emb = p.head = rand_bf16((int64_t)V * C, 1, 1.f);
    p.wqkv = rand_bf16((int64_t)L * QR * C, 2, ws);
    p.wo = rand_bf16((int64_t)L * C * C, 3, ws);
    p.wgu = rand_bf16((int64_t)L * 2 * F * C, 4, ws);
    p.wdt = rand_bf16((int64_t)L * F * C, 5, 2.f / sqrtf((float)F));
    p.norms = rand_f32((int64_t)(2 * L + 1) * C, 6, 0.5f, 1.5f);
    p.rope_cos = rand_f32((int64_t)mc * hd / 2, 7, -1.f, 1.f);
    p.rope_sin = rand_f32((int64_t)mc * hd / 2, 8, -1.f, 1.f);
    p.kc = rand_bf16((int64_t)L * mc * KV * hd, 9, 1.f);   /* positions < P0: the "prompt" */
    p.vc = rand_bf16((int64_t)L * mc * KV * hd, 10, 1.f);
    p.x = zeros<unsigned long long>(4 * C);
    p.q = zeros<float>(H * hd);
    p.h = zeros<float>(F);
    p.logits = zeros<float>(V);
    p.part = zeros<float>(H * dec::MAXSPLIT * (hd + 2));
    p.io = zeros<int>(2 + mc);
    p.out = p.io + 2;
    const int64_t wbytes = 2 * ((int64_t)V * C + (int64_t)L * (QR + C + 3 * F) * C);
    int grid = 0, coop = 0;
    if (dec::setup(p, 1, wbytes, &grid, &coop)) return 1;
    p.best_v = zeros<float>(grid);
    p.best_i = zeros<int>(grid);
    if (!coop) { fprintf(stderr, "no cooperative launch on this GPU\n"); return 1; }
    printf("%s: C %d, L %d, H %d/%d, F %d, V %d; grid %d x %d warps, clusters of %d, %zu B shared\n",
           s->name, C, L, H, KV, F, V, grid, p.warps, p.cluster, dec::smem_bytes(p));

    /* the same tokens and logits two ways */
    std::vector<float> l_ref, l_per;
    const std::vector<int> t_ref = run(p, 0, n, grid, &l_ref);
    const std::vector<int> t_per = run(p, 1, n, grid, &l_per);
    const bool same = t_ref == t_per && l_ref == l_per;
    printf("persistent == per-phase kernels, %d tokens and the last logits bit for bit: %s\n",
           n, same ? "yes" : "NO");
    printf("tokens:");
    for (int i = 0; i < n && i < 16; i++) printf(" %d", t_ref[i]);
    printf("; last logits %.6g %.6g %.6g\n", l_ref[0], l_ref[1], l_ref[2]);

    /* speed: median of 7 launches of n steps */
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    /* the per-phase kernels as one CUDA graph of n steps, as the engine replays them */
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t gr;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    dec::enqueue(p, 1, 0, n, grid, st);
    CK(cudaStreamEndCapture(st, &gr));
    CK(cudaGraphInstantiate(&ge, gr, 0));
    for (int persistent = 1; persistent >= 0; persistent--) {
        std::vector<float> ms;
        for (int r = 0; r < 7; r++) {
            const int io[2] = {1, P0};
            CK(cudaMemcpy(p.io, io, sizeof io, cudaMemcpyHostToDevice));
            CK(cudaEventRecord(a, st));
            if (persistent) dec::enqueue(p, 1, 1, n, grid, st);
            else CK(cudaGraphLaunch(ge, st));
            CK(cudaEventRecord(b, st));
            CK(cudaEventSynchronize(b));
            float t;
            CK(cudaEventElapsedTime(&t, a, b));
            ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        printf("%s: %.1f us a token, %.0f tok/s (median of 7 launches of %d steps)\n",
               persistent ? "persistent" : "phase kernels, graph",
               1e3 * ms[3] / n, n / ms[3] * 1e3, n);
    }
    std::vector<int> t_graph(n);
    CK(cudaMemcpy(t_graph.data(), p.out, n * 4, cudaMemcpyDeviceToHost));
    printf("graph of phase kernels gives the same tokens: %s\n", t_graph == t_ref ? "yes" : "NO");

#ifdef DEC_TRACE
    /* barrier k's label: the phase that waits on it (the first one of the launch is the launch) */
    std::vector<std::string> lab;
    for (int step = 0; step < n; step++) {
        for (int l = 0; l < L; l++) {   /* (the context stays fused: P0 + n < fuse_ctx) */
            if (step || l) lab.push_back(p.cluster ? "AB clustered" : "A qkv");
            if (!p.cluster) lab.push_back("B attn+oproj");
            lab.push_back("D ffn");
        }
        lab.push_back("F head");
        lab.push_back("G pick");
    }
    const int nb = (int)lab.size();
    unsigned long long *tr = zeros<unsigned long long>((int64_t)2 * nb * grid);
    CK(cudaMemcpyToSymbol(dec::trace, &tr, sizeof tr));
    unsigned long long *mk = zeros<unsigned long long>((int64_t)dec::NMARK * grid);
    CK(cudaMemcpyToSymbol(dec::marks, &mk, sizeof mk));
    run(p, 1, n, grid, nullptr);
    std::vector<unsigned long long> h((size_t)2 * nb * grid);
    CK(cudaMemcpy(h.data(), tr, h.size() * 8, cudaMemcpyDeviceToHost));
    auto mx = [&](int slot) {
        unsigned long long m = 0;
        for (int i = 0; i < grid; i++) m = std::max(m, h[(size_t)slot * grid + i]);
        return m;
    };
    /* work before barrier k belongs to the phase that waited on barrier k - 1
     * (layer 0's first QKV, which waited on the launch, is not timed) */
    std::map<std::string, std::pair<double, int>> work, wait;
    for (int k = 0; k < nb; k++) {
        const unsigned long long arrive = mx(2 * k), leave = mx(2 * k + 1);
        if (k) {
            work[lab[k - 1]].first += (arrive - mx(2 * k - 1)) * 1e-3;
            work[lab[k - 1]].second++;
        }
        wait[lab[k]].first += (leave - arrive) * 1e-3;
        wait[lab[k]].second++;
    }
    const double total = (mx(2 * nb - 1) - mx(0)) * 1e-3 / n;
    printf("\n%s, traced: %.1f us a step between the first and last barrier\n\n", s->name, total);
    printf("| phase | work us (last in -> last out) | barrier before it, us | us a step |\n|---|---:|---:|---:|\n");
    for (const char *ph : {"A qkv", "B attn+oproj", "AB clustered", "D ffn", "F head", "G pick"}) {
        const auto &wk = work[ph], &wt = wait[ph];
        if (!wk.second && !wt.second) continue;
        const double a1 = wk.second ? wk.first / wk.second : 0, b1 = wt.second ? wt.first / wt.second : 0;
        printf("| %s | %.2f | %.2f | %.1f |\n", ph, a1, b1, (wk.first + wt.first) / n);
    }
    /* barrier departure spread: last minus first block out, mean over barriers */
    double spread = 0, aspread = 0;
    for (int k = 0; k < nb; k++) {
        unsigned long long lo = ~0ull, hi = 0, alo = ~0ull, ahi = 0;
        for (int i = 0; i < grid; i++) {
            lo = std::min(lo, h[(size_t)(2 * k + 1) * grid + i]); hi = std::max(hi, h[(size_t)(2 * k + 1) * grid + i]);
            alo = std::min(alo, h[(size_t)(2 * k) * grid + i]); ahi = std::max(ahi, h[(size_t)(2 * k) * grid + i]);
        }
        spread += (hi - lo) * 1e-3; aspread += (ahi - alo) * 1e-3;
    }
    printf("\nbarriers: departures spread %.2f us, arrivals spread %.2f us (last - first block, mean)\n",
           spread / nb, aspread / nb);
    /* inside the phases: mean time from the block leaving the barrier to each mark */
    static const char *mname[] = {"A normed", "A dots done", "B attn partials", "B combined", "B oproj done",
                                  "D normed", "D gate/up done (warp 0)", "D down partials", "D done",
                                  "AB mail received"};
    std::vector<unsigned long long> hm((size_t)dec::NMARK * grid);
    CK(cudaMemcpy(hm.data(), mk, hm.size() * 8, cudaMemcpyDeviceToHost));
    printf("\n| mark (us since own barrier departure) | median block | max block | blocks |\n|---|---:|---:|---:|\n");
    for (int id = 0; id < dec::NMARK; id++) {
        std::vector<double> v;
        for (int i = 0; i < grid; i++) if (hm[(size_t)id * grid + i]) v.push_back(hm[(size_t)id * grid + i] * 1e-3);
        if (v.empty()) continue;
        std::sort(v.begin(), v.end());
        printf("| %s | %.2f | %.2f | %zu |\n", mname[id], v[v.size() / 2], v.back(), v.size());
    }
#endif
    return same ? 0 : 1;
}
