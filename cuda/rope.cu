/* rope.cu — rotary position embedding, Hugging Face rotate-half convention,
 * forward and backward (rotation by -angle), cos and sin scaled by the
 * table's mscale. The inverse frequencies are the host's sj_rope (the table
 * csrc/cpu/rope.c reads too, so angles match it bit for bit in f32 mode),
 * passed by value: a captured graph carries them.
 *
 * Simple path (rope_k): one block per row; the row's cos/sin are computed
 * once into shared memory.
 *
 * Fast path (rope_vec): hd/2 a multiple of 16 bytes' worth of elements,
 * 16-byte aligned tensors. Each thread owns VEC pairs (i, i+hd/2)
 * of one row, computes their VEC cos/sin once (accurate cosf/sinf, not
 * __sincosf: the f32 mode must stay within 1e-5 of the CPU) and applies
 * them to every rotated head of the row, 16-byte loads and stores.
 * In place (out == in, as the tape plans it for qkv) only the n_rot
 * rotated heads are read and written: the V heads stay where they are.
 * Bound: memory bandwidth, read in + write out once: 2 * 2 * N * row bytes
 * in bf16 (small preset, 32768 rows of 12 * 64: 100 MB -> ~33 us at 3 TB/s;
 * the per-row-block scalar kernel measured ~80 us). */
#include "common.cuh"
#include "kernels.h"
#include <math.h>

// out, in: (B, T, n_heads*hd), n_rows = B * T; out may be in (each thread
// reads the elements it writes before writing them; the copy is skipped).
template <class T>
static __global__ void __launch_bounds__(256) rope_vec(T *out, const T *in, int64_t n_rows, int T_,
                                                       int n_heads, int n_rot, int hd, int pos0,
                                                       const sj_rope f, int inverse, int accum) {
    constexpr int V = vec16<T>::N, HB = 4;   /* heads whose loads are in flight together */
    const int half = hd / 2, G = half / V, row = n_heads * hd;
    const int64_t total = n_rows * G;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / G;
        const int gi = (int)(idx - r * G), i0 = gi * V;
        const float pos = (float)(pos0 + (int)(r % T_));
        float c[V], sn[V];
#pragma unroll
        for (int v = 0; v < V; v++) {
            const float a = pos * f.inv_freq[i0 + v];
            c[v] = cosf(a) * f.mscale;
            sn[v] = (inverse ? -sinf(a) : sinf(a)) * f.mscale;
        }
        const T *x = in + r * row;
        T *y = out + r * row;
        for (int h0 = 0; h0 < n_rot; h0 += HB) {
            uint4 a[HB], b[HB];
#pragma unroll
            for (int k = 0; k < HB; k++)
                if (h0 + k < n_rot) {
                    a[k] = ld16(x + (h0 + k) * hd + i0);
                    b[k] = ld16(x + (h0 + k) * hd + half + i0);
                }
#pragma unroll
            for (int k = 0; k < HB; k++)
                if (h0 + k < n_rot) {
                    float x0[V], x1[V], y0[V], y1[V];
                    unpack16<T>(x0, a[k]);
                    unpack16<T>(x1, b[k]);
#pragma unroll
                    for (int v = 0; v < V; v++) {
                        y0[v] = x0[v] * c[v] - x1[v] * sn[v];
                        y1[v] = x1[v] * c[v] + x0[v] * sn[v];
                    }
                    store_vec(y + (h0 + k) * hd + i0, y0, accum);
                    store_vec(y + (h0 + k) * hd + half + i0, y1, accum);
                }
        }
        /* heads past n_rot are copied (this row's G threads share them); in
         * place they are already there: the V heads cost nothing */
        if (out == in) continue;
        for (int k = n_rot * hd + i0; k < row; k += half) {
            float v[V];
            load_vec(v, x + k);
            store_vec(y + k, v, accum);
        }
    }
}

template <class T>
static bool rope_fast(T *out, const T *in, int B, int T_, int n_heads, int n_rot, int hd, int pos0,
                      const sj_rope *f, int inverse, int accum) {
    constexpr int V = vec16<T>::N;
    if (hd <= 0 || hd % 2 || (hd / 2) % V || !aligned16(out) || !aligned16(in)) return false;
    const int64_t n_rows = (int64_t)B * T_, total = n_rows * (hd / 2 / V);
    rope_vec<T><<<sj_blocks(total, 256, 1 << 16), 256, 0, sj_stream()>>>(
        out, in, n_rows, T_, n_heads, n_rot, hd, pos0, *f, inverse, accum);
    LAUNCH_CHECK(inverse ? "rope_backward" : "rope_forward");
    return true;
}

// out, in: (B, T, n_heads*hd); row r has position pos0 + r % T
template <class T>
static __global__ void rope_k(T *out, const T *in, int T_, int n_heads, int n_rot, int hd,
                              int pos0, const sj_rope f, int inverse, int accum) {
    extern __shared__ float cs[];   /* [half] cos, then [half] sin */
    const int half = hd / 2, row = n_heads * hd;
    const int64_t r = blockIdx.x;
    const float pos = (float)(pos0 + (int)(r % T_));
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float a = pos * f.inv_freq[i];
        cs[i] = cosf(a) * f.mscale;
        cs[half + i] = (inverse ? -sinf(a) : sinf(a)) * f.mscale;
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
    if (out != in)
        for (int k = n_rot * hd + threadIdx.x; k < row; k += blockDim.x) put(y + k, tof(x[k]), accum);
}

#define SJ_CU_ROPE(T, TY)                                                                   \
extern "C" void sj_cuda_rope_forward_##T(void *out, const void *in, int B, int T_,          \
                                         int n_heads, int n_rot, int hd, int pos0,          \
                                         const sj_rope *rope) {                             \
    if ((int64_t)B * T_ <= 0) return;                                                       \
    if (rope_fast((TY *)out, (const TY *)in, B, T_, n_heads, n_rot, hd, pos0, rope, 0, 0))  \
        return;                                                                             \
    rope_k<<<(unsigned)((int64_t)B * T_), 128, sizeof(float) * hd, sj_stream()>>>(          \
        (TY *)out, (const TY *)in, T_, n_heads, n_rot, hd, pos0, *rope, 0, 0);              \
    LAUNCH_CHECK("rope_forward");                                                           \
}                                                                                           \
extern "C" void sj_cuda_rope_backward_##T(void *din, const void *dout, int B, int T_,       \
                                          int n_heads, int n_rot, int hd, int pos0,         \
                                          const sj_rope *rope, int accum) {                 \
    if ((int64_t)B * T_ <= 0) return;                                                       \
    if (rope_fast((TY *)din, (const TY *)dout, B, T_, n_heads, n_rot, hd, pos0, rope, 1,    \
                  accum))                                                                   \
        return;                                                                             \
    rope_k<<<(unsigned)((int64_t)B * T_), 128, sizeof(float) * hd, sj_stream()>>>(          \
        (TY *)din, (const TY *)dout, T_, n_heads, n_rot, hd, pos0, *rope, 1, accum);        \
    LAUNCH_CHECK("rope_backward");                                                          \
}
SJ_CU_ROPE(f32, float)
SJ_CU_ROPE(bf16, bf16)
SJ_CU_ROPE(f16, f16)
