/* timing.cu — CUDA events around work on the bound stream, for the kernel
 * benchmark hook (csrc/py/cuda.c, benchmarks/bench_kernels.py). Not used by
 * the engine's own path. */
#include "common.cuh"
#include "kernels.h"

struct sj_cuda_timer { cudaEvent_t a, b; };

extern "C" void *sj_cuda_timer_begin(void) {
    sj_cuda_timer *t = new sj_cuda_timer;
    CUDA_CHECK(cudaEventCreate(&t->a));
    CUDA_CHECK(cudaEventCreate(&t->b));
    CUDA_CHECK(cudaEventRecord(t->a, sj_stream()));
    return t;
}

/* Milliseconds since begin (waits for the stream); frees the timer. */
extern "C" float sj_cuda_timer_end(void *p) {
    sj_cuda_timer *t = (sj_cuda_timer *)p;
    float ms = -1.f;
    CUDA_CHECK(cudaEventRecord(t->b, sj_stream()));
    CUDA_CHECK(cudaEventSynchronize(t->b));
    CUDA_CHECK(cudaEventElapsedTime(&ms, t->a, t->b));
    cudaEventDestroy(t->a);
    cudaEventDestroy(t->b);
    delete t;
    return ms;
}
