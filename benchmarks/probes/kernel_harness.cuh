/* kernel_harness.cuh — what the standalone kernel harnesses share
 * (gemm_sm90_check.cu, attention_sm90_check.cu, decode_probe.cu): the few
 * backend functions the kernel files call (cuda/backend.cu and csrc/core
 * are not linked in), random bf16 data, device-to-host copies and the
 * error measure. Include it after the kernel sources. */
#pragma once
#include <algorithm>
#include <cmath>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

static sj_cuda_ctx ctx0;
sj_cuda_ctx *sj_cuda_cur(void) { return &ctx0; }
static bool failed;
void sj_cuda_error(const char *what, const char *detail, const char *file, int line) {
    fprintf(stderr, "CUDA error: %s (%s at %s:%d)\n", detail, what, file, line);
    failed = true;
}
bool sj_cuda_has_error(void) { return failed; }
extern "C" sj_status sj_fail(sj_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    return code;
}
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

/* p[i] uniform in [-scale/2, scale/2), a hash of (i, seed) */
__global__ void fill_k(bf16 *p, int64_t n, uint32_t seed, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = __float2bfloat16(((h & 0xffffff) / 16777216.0f - 0.5f) * scale);
    }
}
/* n elements of device memory (bf16 or f32) as f32 on the host */
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
/* max |got - want| / max |want|; NaN (an unwritten, poisoned output) counts as infinite */
static double rel_err(const std::vector<float> &got, const std::vector<float> &want) {
    double e = 0, mx = 0;
    for (size_t i = 0; i < got.size(); i++) {
        e = std::isnan(got[i]) ? INFINITY : fmax(e, fabs((double)got[i] - want[i]));
        mx = fmax(mx, fabs((double)want[i]));
    }
    return e / (mx > 0 ? mx : 1);
}
