/* decode_trace.cuh — the hooks through which benchmarks/probes/decode_probe.cu
 * (built with -DDEC_TRACE) sees where the persistent decode kernel's time
 * goes. Without DEC_TRACE every hook is empty and the kernel carries none
 * of it. Included by decode.cu. */
#pragma once
#include <stdint.h>

namespace dec {

#ifdef DEC_TRACE
/* Per block, when it arrives at and leaves each grid barrier of a launch
 * (%globaltimer ns), barrier-major. */
__device__ unsigned long long *trace;
/* ... and, per block, the mean time from leaving the last grid barrier to
 * each DEC_MARK(id) inside a phase (thread 0's view): (NMARK, grid) ns. */
enum { NMARK = 10 };
__device__ unsigned long long *marks;
__shared__ unsigned long long mark_left, mark_sum[NMARK];
__shared__ unsigned mark_cnt[NMARK];
static __device__ __forceinline__ unsigned long long now_ns(void) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define DEC_MARK(id) do { if (threadIdx.x == 0) { mark_sum[id] += now_ns() - mark_left; mark_cnt[id]++; } } while (0)

/* At each barrier arrival (slot 2n) and departure (2n + 1). */
static __device__ __forceinline__ void trace_stamp(int slot) {
    const unsigned long long t = now_ns();
    if (threadIdx.x == 0 && trace) trace[(int64_t)slot * gridDim.x + blockIdx.x] = t;
    if (threadIdx.x == 0) mark_left = t;
}
/* At the persistent kernel's start and end. */
static __device__ __forceinline__ void trace_begin(void) {
    if (threadIdx.x < NMARK) { mark_sum[threadIdx.x] = 0; mark_cnt[threadIdx.x] = 0; }
    if (threadIdx.x == 0) mark_left = now_ns();
    __syncthreads();
}
static __device__ __forceinline__ void trace_end(void) {
    __syncthreads();
    if (marks && threadIdx.x < NMARK)
        marks[(int64_t)threadIdx.x * gridDim.x + blockIdx.x] =
            mark_cnt[threadIdx.x] ? mark_sum[threadIdx.x] / mark_cnt[threadIdx.x] : 0;
}
#else
#define DEC_MARK(id) do { } while (0)
static __device__ __forceinline__ void trace_stamp(int) {}
static __device__ __forceinline__ void trace_begin(void) {}
static __device__ __forceinline__ void trace_end(void) {}
#endif

}  // namespace dec
