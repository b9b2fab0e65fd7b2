/* rope.cu — rotary position embedding, Hugging Face rotate-half convention,
 * forward and backward (rotation by -angle). One block per row; the row's
 * cos/sin are computed once into shared memory. The inverse frequency is
 * computed in double and rounded, which gives the f32 value the CPU's powf
 * gives, so angles match csrc/cpu/rope.c bit for bit in f32 mode. */
#include "common.cuh"
#include "kernels.h"

// out, in: (B, T, n_heads*hd); row r has position pos0 + r % T
template <class T>
static __global__ void rope_k(T *out, const T *in, int T_, int n_heads, int n_rot, int hd,
                              int pos0, float theta, int inverse, int accum) {
    extern __shared__ float cs[];   /* [half] cos, then [half] sin */
    const int half = hd / 2, row = n_heads * hd;
    const int64_t r = blockIdx.x;
    const float pos = (float)(pos0 + (int)(r % T_));
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float e = (float)(2 * i) / (float)hd;
        float inv = 1.0f / (float)pow((double)theta, (double)e);
        float a = pos * inv;
        cs[i] = cosf(a);
        cs[half + i] = inverse ? -sinf(a) : sinf(a);
    }
    __syncthreads();
    const T *x = in + r * row;
    T *y = out + r * row;
    for (int k = threadIdx.x; k < n_rot * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        const float x0 = tof(x[h * hd + i]), x1 = tof(x[h * hd + i + half]);
        const float c = cs[i], s = cs[half + i];
        put(y + h * hd + i, x0 * c - x1 * s, accum);
        put(y + h * hd + i + half, x1 * c + x0 * s, accum);
    }
    for (int k = n_rot * hd + threadIdx.x; k < row; k += blockDim.x) put(y + k, tof(x[k]), accum);
}

#define SJ_CU_ROPE(T, TY)                                                                   \
extern "C" void sj_cuda_rope_forward_##T(void *out, const void *in, int B, int T_,          \
                                         int n_heads, int n_rot, int hd, int pos0,          \
                                         float theta) {                                     \
    if ((int64_t)B * T_ <= 0) return;                                                       \
    rope_k<<<(unsigned)((int64_t)B * T_), 128, sizeof(float) * hd, sj_stream()>>>(          \
        (TY *)out, (const TY *)in, T_, n_heads, n_rot, hd, pos0, theta, 0, 0);              \
    LAUNCH_CHECK("rope_forward");                                                           \
}                                                                                           \
extern "C" void sj_cuda_rope_backward_##T(void *din, const void *dout, int B, int T_,       \
                                          int n_heads, int n_rot, int hd, int pos0,         \
                                          float theta, int accum) {                         \
    if ((int64_t)B * T_ <= 0) return;                                                       \
    rope_k<<<(unsigned)((int64_t)B * T_), 128, sizeof(float) * hd, sj_stream()>>>(          \
        (TY *)din, (const TY *)dout, T_, n_heads, n_rot, hd, pos0, theta, 1, accum);        \
    LAUNCH_CHECK("rope_backward");                                                          \
}
SJ_CU_ROPE(f32, float)
SJ_CU_ROPE(bf16, bf16)
