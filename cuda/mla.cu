/* mla.cu — multi-head latent attention's layout ops (csrc/model/mla.c), the
 * same expressions as csrc/cpu/mla.c: its q, k and v heads packed into
 * attention's qkv with RoPE on the pe parts (v zero-padded to the q/k head
 * size), and the slice that drops that padding from attention's output;
 * forward and backward. Grid-stride, one thread per output element; the
 * rotation's angles as rope.cu computes them (accurate cosf/sinf, the
 * host's sj_rope passed by value so a captured graph carries it).
 * Bound: memory bandwidth, every element read and written once; these run
 * beside attention and the projections and are not yet measured. */
#include "common.cuh"
#include "kernels.h"
#include <math.h>

/* Value i of a dr-sized rotary part x turned at pos (sign -1: the inverse turn). */
template <class T>
static __device__ __forceinline__ float turned(const T *x, int i, int dr, float pos, const sj_rope &f,
                                               float sign) {
    const int half = dr / 2, p = i % half;
    const float a = pos * f.inv_freq[p], c = cosf(a) * f.mscale, s = sign * sinf(a) * f.mscale;
    return i < half ? tof(x[i]) * c - tof(x[i + half]) * s : tof(x[i]) * c + tof(x[i - half]) * s;
}

// out: (N, 3*H*hq), q: (N, H*hq), kv: (N, H*(dn+dv)), kpe: (N, dr); hq = dn + dr
template <class T>
static __global__ void mla_pack_k(T *out, const T *q, const T *kv, const T *kpe, int64_t N, int T_,
                                  int H, int dn, int dr, int dv, const sj_rope f) {
    const int hq = dn + dr;
    const int64_t row = 3 * (int64_t)H * hq, total = N * row;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / row;
        const int e = (int)(i - r * row), part = e / (H * hq), h = e % (H * hq) / hq, d = e % hq;
        const float pos = (float)(int)(r % T_);
        const T *kvh = kv + r * H * (dn + dv) + (int64_t)h * (dn + dv);
        float v;
        if (part == 0) v = d < dn ? tof(q[r * H * hq + (int64_t)h * hq + d])
                                  : turned(q + r * H * hq + (int64_t)h * hq + dn, d - dn, dr, pos, f, 1.f);
        else if (part == 1) v = d < dn ? tof(kvh[d]) : turned(kpe + r * dr, d - dn, dr, pos, f, 1.f);
        else v = d < dv ? tof(kvh[dn + d]) : 0.f;
        out[i] = fromf<T>(v);
    }
}

// dq: (N, H*hq) (+)= dout's q heads, turned back
template <class T>
static __global__ void mla_pack_dq_k(T *dq, const T *dout, int64_t N, int T_, int H, int dn, int dr,
                                     const sj_rope f, int accum) {
    const int hq = dn + dr;
    const int64_t total = N * H * hq;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / ((int64_t)H * hq);
        const int e = (int)(i - r * H * hq), h = e / hq, d = e % hq;
        const T *g = dout + r * 3 * H * hq + (int64_t)h * hq;
        put(dq + i, d < dn ? tof(g[d]) : turned(g + dn, d - dn, dr, (float)(int)(r % T_), f, -1.f), accum);
    }
}

// dkv: (N, H*(dn+dv)) (+)= dout's k heads' nope part and v heads' first dv
template <class T>
static __global__ void mla_pack_dkv_k(T *dkv, const T *dout, int64_t N, int H, int dn, int dr, int dv,
                                      int accum) {
    const int hq = dn + dr, w = dn + dv;
    const int64_t total = N * H * w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / ((int64_t)H * w);
        const int e = (int)(i - r * H * w), h = e / w, d = e % w;
        const T *g = dout + r * 3 * H * hq;
        put(dkv + i, d < dn ? tof(g[(int64_t)(H + h) * hq + d]) : tof(g[(int64_t)(2 * H + h) * hq + d - dn]),
            accum);
    }
}

// dkpe: (N, dr) (+)= the sum over k heads of their rotary part, turned back
template <class T>
static __global__ void mla_pack_dkpe_k(T *dkpe, const T *dout, int64_t N, int T_, int H, int dn,
                                       int dr, const sj_rope f, int accum) {
    const int hq = dn + dr;
    const int64_t total = N * dr;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / dr;
        const int d = (int)(i - r * dr);
        const float pos = (float)(int)(r % T_);
        float s = 0.f;
        for (int h = 0; h < H; h++)
            s += turned(dout + r * 3 * H * hq + (int64_t)(H + h) * hq + dn, d, dr, pos, f, -1.f);
        put(dkpe + i, s, accum);
    }
}

// out: (N, H*hd_out) = each head's first hd_out of in: (N, H*hd_in)
template <class T>
static __global__ void head_slice_k(T *out, const T *in, int64_t N, int H, int hd_in, int hd_out) {
    const int64_t total = N * H * hd_out;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t head = i / hd_out;
        out[i] = in[head * hd_in + (i - head * hd_out)];
    }
}

// din: (N, H*hd_in) (+)= dout there; without accum zeros past hd_out
template <class T>
static __global__ void head_slice_back_k(T *din, const T *dout, int64_t N, int H, int hd_in,
                                         int hd_out, int accum) {
    const int64_t total = N * H * hd_in;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t head = i / hd_in;
        const int d = (int)(i - head * hd_in);
        if (d < hd_out) put(din + i, tof(dout[head * hd_out + d]), accum);
        else if (!accum) din[i] = fromf<T>(0.f);
    }
}

#define SJ_CU_MLA(T, TY)                                                                      \
extern "C" void sj_cuda_mla_pack_forward_##T(void *out, const void *q, const void *kv,         \
                                             const void *kpe, int B, int T_, int H, int dn,    \
                                             int dr, int dv, const sj_rope *rope) {            \
    const int64_t N = (int64_t)B * T_, total = N * 3 * H * (dn + dr);                         \
    if (total <= 0) return;                                                                   \
    mla_pack_k<<<sj_blocks(total, 256), 256, 0, sj_stream()>>>(                               \
        (TY *)out, (const TY *)q, (const TY *)kv, (const TY *)kpe, N, T_, H, dn, dr, dv, *rope); \
    LAUNCH_CHECK("mla_pack_forward");                                                         \
}                                                                                             \
extern "C" void sj_cuda_mla_pack_backward_##T(void *dq, void *dkv, void *dkpe,                 \
                                              const void *dout, int B, int T_, int H, int dn,  \
                                              int dr, int dv, const sj_rope *rope,             \
                                              int accum_q, int accum_kv, int accum_kpe) {      \
    const int64_t N = (int64_t)B * T_;                                                        \
    if (N <= 0) return;                                                                       \
    if (dq) {                                                                                 \
        mla_pack_dq_k<<<sj_blocks(N * H * (dn + dr), 256), 256, 0, sj_stream()>>>(            \
            (TY *)dq, (const TY *)dout, N, T_, H, dn, dr, *rope, accum_q);                    \
        LAUNCH_CHECK("mla_pack_backward");                                                    \
    }                                                                                         \
    if (dkv) {                                                                                \
        mla_pack_dkv_k<<<sj_blocks(N * H * (dn + dv), 256), 256, 0, sj_stream()>>>(           \
            (TY *)dkv, (const TY *)dout, N, H, dn, dr, dv, accum_kv);                         \
        LAUNCH_CHECK("mla_pack_backward");                                                    \
    }                                                                                         \
    if (dkpe) {                                                                               \
        mla_pack_dkpe_k<<<sj_blocks(N * dr, 256), 256, 0, sj_stream()>>>(                     \
            (TY *)dkpe, (const TY *)dout, N, T_, H, dn, dr, *rope, accum_kpe);                \
        LAUNCH_CHECK("mla_pack_backward");                                                    \
    }                                                                                         \
}                                                                                             \
extern "C" void sj_cuda_head_slice_forward_##T(void *out, const void *in, int N, int H,        \
                                               int hd_in, int hd_out) {                        \
    const int64_t total = (int64_t)N * H * hd_out;                                            \
    if (total <= 0) return;                                                                   \
    head_slice_k<<<sj_blocks(total, 256), 256, 0, sj_stream()>>>(                             \
        (TY *)out, (const TY *)in, (int64_t)N, H, hd_in, hd_out);                             \
    LAUNCH_CHECK("head_slice_forward");                                                       \
}                                                                                             \
extern "C" void sj_cuda_head_slice_backward_##T(void *din, const void *dout, int N, int H,     \
                                                int hd_in, int hd_out, int accum) {            \
    const int64_t total = (int64_t)N * H * hd_in;                                             \
    if (total <= 0) return;                                                                   \
    head_slice_back_k<<<sj_blocks(total, 256), 256, 0, sj_stream()>>>(                        \
        (TY *)din, (const TY *)dout, (int64_t)N, H, hd_in, hd_out, accum);                    \
    LAUNCH_CHECK("head_slice_backward");                                                      \
}
SJ_CU_MLA(f32, float)
SJ_CU_MLA(bf16, bf16)
SJ_CU_MLA(f16, f16)
