// grid_barrier_probe.cu — what a grid-wide dependency costs on this GPU: cg grid.sync() and a
// hand-written barrier in a cooperative kernel (132 blocks), and an empty kernel boundary inside a
// CUDA graph, plain and with programmatic dependent launch (PDL). H100: cg 1.21 us, hand 1.71 us,
// graph kernel boundary 0.90 us (2026-11-23); with PDL 0.63 us (2026-11-24). And a cooperative grid
// of thread-block clusters: how many fit, grid.sync there, and the cluster's own barrier. H100, 512
// threads: clusters of 2 / 8 / 16 fit 66 / 15 / 7 times; cluster barrier 0.18 us relaxed, 0.78-0.83
// us with release/acquire (cg cluster.sync), grid.sync 1.29-1.31 us (2026-11-24).
// nvcc -O3 -arch=sm_90a benchmarks/probes/grid_barrier_probe.cu -o /tmp/bar && /tmp/bar
#include <cooperative_groups.h>
#include <cstdio>
namespace cg = cooperative_groups;
__device__ unsigned cnt, gen;
__global__ void k_cg(int n, float *x) {
    cg::grid_group g = cg::this_grid();
    for (int i = 0; i < n; i++) { if (threadIdx.x == 0 && blockIdx.x == i % gridDim.x) x[0] += 1; g.sync(); }
}
__device__ __forceinline__ unsigned ld_acq(unsigned *p) { unsigned v; asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ void hand_sync(unsigned nb) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned g0 = ld_acq(&gen);
        unsigned a; asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], 1;" : "=r"(a) : "l"(&cnt) : "memory");
        if (a == nb - 1) { cnt = 0; asm volatile("st.release.gpu.u32 [%0], %1;" :: "l"(&gen), "r"(g0 + 1) : "memory"); }
        else while (ld_acq(&gen) == g0) {}
    }
    __syncthreads();
}
__global__ void k_hand(int n, float *x) {
    for (int i = 0; i < n; i++) { if (threadIdx.x == 0 && blockIdx.x == i % gridDim.x) x[0] += 1; hand_sync(gridDim.x); }
}
__global__ void k_empty(float *x) { if (threadIdx.x == 0 && blockIdx.x == 0) x[0] += 1; }
// thread-block clusters in a cooperative grid: grid.sync and the cluster's own barrier
__global__ void k_cluster(int n, int which, float *x) {
    cg::grid_group g = cg::this_grid();
    cg::cluster_group c = cg::this_cluster();
    for (int i = 0; i < n; i++) {
        if (which == 0) { if (threadIdx.x == 0 && blockIdx.x == i % gridDim.x) x[0] += 1; g.sync(); }
        else if (which == 1) c.sync();
        else if (which == 2) asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
        else asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
    }
}
// programmatic dependent launch: the next kernel's blocks start while this one runs and wait in
// griddepcontrol.wait for it to finish (early: dependents released at the start, else at the end)
template <bool early> __global__ void k_pdl(float *x) {
    if (early) asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (threadIdx.x == 0 && blockIdx.x == 0) x[0] += 1;
    if (!early) asm volatile("griddepcontrol.launch_dependents;");
}
int main() {
    float *x; cudaMalloc(&x, 4);
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    int n = 2000;
    for (int threads : {128, 512, 1024}) {
      for (int which = 0; which < 2; which++) {
        void *args[] = {&n, &x};
        float ms;
        for (int rep = 0; rep < 2; rep++) {
            cudaEventRecord(a);
            cudaLaunchCooperativeKernel(which ? (void*)k_hand : (void*)k_cg, sms, threads, args, 0, 0);
            cudaEventRecord(b); cudaEventSynchronize(b);
            cudaEventElapsedTime(&ms, a, b);
        }
        printf("%s threads=%d blocks=%d: %.3f us per barrier (%s)\n", which ? "hand" : "cg  ", threads, sms, ms * 1000 / n, cudaGetErrorString(cudaGetLastError()));
      }
    }
    // clusters: how many fit (one block per SM: 120 KB of shared memory), and a cooperative launch
    for (int cs : {2, 8, 16}) {
      for (int threads : {128, 512}) {
        cudaFuncSetAttribute(k_cluster, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        cudaFuncSetAttribute(k_cluster, cudaFuncAttributeMaxDynamicSharedMemorySize, 120 * 1024);
        cudaLaunchAttribute at[2];
        at[0].id = cudaLaunchAttributeClusterDimension;
        at[0].val.clusterDim.x = cs; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
        at[1].id = cudaLaunchAttributeCooperative;
        at[1].val.cooperative = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.blockDim = threads; cfg.dynamicSmemBytes = 120 * 1024; cfg.attrs = at; cfg.numAttrs = 1;
        cfg.gridDim = cs * 64;   /* the query wants a grid the cluster size divides */
        int ncl = 0;
        cudaError_t e = cudaOccupancyMaxActiveClusters(&ncl, (void *)k_cluster, &cfg);
        printf("clusters of %d, %d threads: %d fit (%d blocks) (%s)\n", cs, threads, ncl, ncl * cs, cudaGetErrorString(e));
        cudaGetLastError();
        if (ncl < 1) continue;
        cfg.gridDim = ncl * cs; cfg.numAttrs = 2;
        for (int which = 0; which < 4; which++) {
            float ms = 0;
            for (int rep = 0; rep < 2; rep++) {
                cudaEventRecord(a);
                e = cudaLaunchKernelEx(&cfg, k_cluster, n, which, x);
                cudaEventRecord(b); cudaEventSynchronize(b);
                cudaEventElapsedTime(&ms, a, b);
            }
            static const char *what[] = {"grid.sync", "cg cluster.sync", "arrive.release + wait.acquire",
                                         "arrive.relaxed + wait"};
            printf("  cooperative grid of clusters of %d, %s: %.3f us per barrier (%s / %s)\n", cs, what[which],
                   ms * 1000 / n, cudaGetErrorString(e), cudaGetErrorString(cudaGetLastError()));
        }
      }
    }
    // kernel-boundary cost inside a graph
    cudaStream_t s; cudaStreamCreate(&s);
    cudaGraph_t g; cudaGraphExec_t ge;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    for (int i = 0; i < 500; i++) k_empty<<<sms, 512, 0, s>>>(x);
    cudaStreamEndCapture(s, &g); cudaGraphInstantiate(&ge, g, 0);
    float ms;
    for (int rep = 0; rep < 3; rep++) { cudaEventRecord(a, s); cudaGraphLaunch(ge, s); cudaEventRecord(b, s); cudaEventSynchronize(b); cudaEventElapsedTime(&ms, a, b); }
    printf("graph kernel boundary: %.3f us per kernel (%s)\n", ms * 1000 / 500, cudaGetErrorString(cudaGetLastError()));
    for (int early = 0; early < 2; early++) {
        cudaMemset(x, 0, 4);
        cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = sms; cfg.blockDim = 512; cfg.stream = s; cfg.attrs = at; cfg.numAttrs = 1;
        for (int i = 0; i < 500; i++) cudaLaunchKernelEx(&cfg, early ? k_pdl<true> : k_pdl<false>, x);
        cudaStreamEndCapture(s, &g); cudaGraphInstantiate(&ge, g, 0);
        for (int rep = 0; rep < 3; rep++) { cudaEventRecord(a, s); cudaGraphLaunch(ge, s); cudaEventRecord(b, s); cudaEventSynchronize(b); cudaEventElapsedTime(&ms, a, b); }
        float h; cudaMemcpy(&h, x, 4, cudaMemcpyDeviceToHost);
        printf("graph kernel boundary, PDL (dependents released %s): %.3f us per kernel, count %.0f of %d (%s)\n",
               early ? "at the start" : "at the end", ms * 1000 / 500, h, 3 * 500, cudaGetErrorString(cudaGetLastError()));
    }
}
