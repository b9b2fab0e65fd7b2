/* norm.cu — squared norms on the device (the global gradient norm for
 * clipping, Muon's per-matrix norms), in double, by a fixed grid in two
 * passes (per-block partials in scratch, then one block over them in
 * order): the same bits every run. */
#include "common.cuh"
#include "kernels.h"

enum { NORM_BLOCKS = 512, NORM_THREADS = 256 };

static __device__ double block_sum_d(double v) {
    __shared__ double part[NORM_THREADS / 32];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) part[w] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int i = 0; i < NORM_THREADS / 32; i++) s += part[i];
    return s;   /* valid in thread 0 */
}

static __global__ void sumsq_part_k(double *part, const float *g, int64_t n) {
    double s = 0.0;
    for (int64_t i = blockIdx.x * (int64_t)NORM_THREADS + threadIdx.x; i < n;
         i += (int64_t)NORM_BLOCKS * NORM_THREADS) {
        double v = g[i];
        s += v * v;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

static __global__ void sumsq_final_k(double *out, const double *part) {
    double s = 0.0;
    for (int i = threadIdx.x; i < NORM_BLOCKS; i += NORM_THREADS) s += part[i];
    s = block_sum_d(s);
    if (threadIdx.x == 0) *out = s;
}

extern "C" void sj_cuda_sumsq(double *out, const float *x, int64_t n) {
    double *part = (double *)sj_cuda_cur()->scratch;
    if (!part) { sj_cuda_error("sumsq", "no context bound", __FILE__, __LINE__); return; }
    sumsq_part_k<<<NORM_BLOCKS, NORM_THREADS, 0, sj_stream()>>>(part, x, n);
    LAUNCH_CHECK("sumsq partials");
    sumsq_final_k<<<1, NORM_THREADS, 0, sj_stream()>>>(out, part);
    LAUNCH_CHECK("sumsq");
}
