/* ssm.cu — the pieces around the scan on the GPU, forward and backward, the
 * same expressions as csrc/cpu/ssm.c: Mamba-2's causal depthwise conv + SiLU,
 * dt and decays, D skip and gated RMSNorm; linear attention's feature maps,
 * gate and normalisation. Elementwise kernels one thread per element;
 * parameter gradients one block per parameter element, its rows summed in a
 * fixed order (block_reduce): the same bits every run, no atomics. A slice's
 * gradient, first written (accum 0), has its whole rows zeroed first.
 * Bound: memory bandwidth; not measured. */
#include "common.cuh"
#include "kernels.h"

enum { SSM_THREADS = 256 };

static unsigned ssm_blocks(int64_t n) { return (unsigned)((n + SSM_THREADS - 1) / SSM_THREADS); }

static __device__ __forceinline__ float ssm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static __device__ __forceinline__ float ssm_silu(float x) { return x * ssm_sigmoid(x); }
static __device__ __forceinline__ float ssm_dsilu(float x) {
    const float s = ssm_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}
/* torch's softplus (beta 1, threshold 20) */
static __device__ __forceinline__ float ssm_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static __device__ __forceinline__ float ssm_elu1(float x) { return x > 0.0f ? x + 1.0f : expf(x); }
static __device__ __forceinline__ float ssm_delu1(float x) { return x > 0.0f ? 1.0f : expf(x); }

template <class T>
static __global__ void ssm_zero_k(T *x, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fromf<T>(0.0f);
}
template <class T>
static void ssm_zero(T *x, int64_t n, const char *what) {
    ssm_zero_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(x, n);
    LAUNCH_CHECK(what);
}

/* ---- conv1d + SiLU ---------------------------------------------------------- */

template <class T>
static __device__ float conv_pre(const T *x, const T *w, const T *bias, int64_t row0, int t, int c,
                                 int ld, int off, int K) {
    float s = tof(bias[c]);
    for (int i = 0; i < K; i++) {
        const int u = t - K + 1 + i;
        if (u >= 0) s += tof(w[(int64_t)c * K + i]) * tof(x[(row0 + u) * ld + off + c]);
    }
    return s;
}

template <class T>
static __global__ void conv_fwd_k(T *out, const T *x, const T *w, const T *bias, int B, int T_,
                                  int ld, int off, int W, int K) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)B * T_ * W) return;
    const int64_t r = i / W;
    const int c = (int)(i % W), t = (int)(r % T_);
    out[i] = fromf<T>(ssm_silu(conv_pre(x, w, bias, r - t, t, c, ld, off, K)));
}

/* dx of input row u, channel c: the taps of the outputs t = u .. u + K - 1. */
template <class T>
static __global__ void conv_bwd_dx_k(T *dx, const T *dout, const T *x, const T *w, const T *bias,
                                     int B, int T_, int ld, int off, int W, int K) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)B * T_ * W) return;
    const int64_t u = i / W;
    const int c = (int)(i % W), tu = (int)(u % T_);
    const int64_t row0 = u - tu;
    float s = 0.0f;
    for (int j = 0; j < K; j++) {
        const int t = tu + K - 1 - j;
        if (t >= T_) continue;
        const float g = tof(dout[(row0 + t) * W + c]) * ssm_dsilu(conv_pre(x, w, bias, row0, t, c, ld, off, K));
        s += g * tof(w[(int64_t)c * K + j]);
    }
    put(dx + u * ld + off + c, s, 1);
}

/* One block per channel: dw (K) and dbias summed over every row. */
template <class T>
static __global__ void conv_bwd_dw_k(float *dw, float *dbias, const T *dout, const T *x, const T *w,
                                     const T *bias, int B, int T_, int ld, int off, int W, int K,
                                     int dw_accum) {
    const int c = blockIdx.x;
    float pw[16], pb = 0.0f;
    for (int i = 0; i < 16; i++) pw[i] = 0.0f;
    for (int64_t r = threadIdx.x; r < (int64_t)B * T_; r += blockDim.x) {
        const int t = (int)(r % T_);
        const int64_t row0 = r - t;
        const float g = tof(dout[r * W + c]) * ssm_dsilu(conv_pre(x, w, bias, row0, t, c, ld, off, K));
        pb += g;
        for (int i = 0; i < K; i++) {
            const int u = t - K + 1 + i;
            if (u >= 0) pw[i] += g * tof(x[(row0 + u) * ld + off + c]);
        }
    }
    for (int i = 0; i < K; i++) {
        const float s = block_reduce<false>(pw[i]);
        if (threadIdx.x == 0) dw[(int64_t)c * K + i] = (dw_accum ? dw[(int64_t)c * K + i] : 0.0f) + s;
    }
    const float s = block_reduce<false>(pb);
    if (threadIdx.x == 0) dbias[c] = (dw_accum ? dbias[c] : 0.0f) + s;
}

template <class T>
static void conv_forward(T *out, const T *x, const T *w, const T *bias, int B, int T_, int ld, int off,
                         int W, int K) {
    if ((int64_t)B * T_ * W <= 0) return;
    conv_fwd_k<T><<<ssm_blocks((int64_t)B * T_ * W), SSM_THREADS, 0, sj_stream()>>>(out, x, w, bias, B, T_,
                                                                                    ld, off, W, K);
    LAUNCH_CHECK("conv1d_silu_forward");
}

template <class T>
static void conv_backward(T *dx, float *dw, float *dbias, const T *dout, const T *x, const T *w,
                          const T *bias, int B, int T_, int ld, int off, int W, int K, int accum,
                          int dw_accum) {
    const int64_t n = (int64_t)B * T_ * W;
    if (n <= 0) return;
    if (K > 16) { sj_cuda_error("conv1d_silu_backward", "kernel above 16", __FILE__, __LINE__); return; }
    if (!accum) ssm_zero(dx, (int64_t)B * T_ * ld, "conv1d_silu_backward (zero)");
    cudaStream_t s = sj_stream();
    conv_bwd_dx_k<T><<<ssm_blocks(n), SSM_THREADS, 0, s>>>(dx, dout, x, w, bias, B, T_, ld, off, W, K);
    LAUNCH_CHECK("conv1d_silu_backward dx");
    conv_bwd_dw_k<T><<<(unsigned)W, SSM_THREADS, 0, s>>>(dw, dbias, dout, x, w, bias, B, T_, ld, off, W, K,
                                                         dw_accum);
    LAUNCH_CHECK("conv1d_silu_backward dw");
}

/* ---- dt, v = x dt, a = dt A ------------------------------------------------- */

template <class T>
static __global__ void prep_fwd_k(T *v, T *a, const T *x, const T *dt_raw, const T *p, int N, int H,
                                  int P, int ldx, int ld, int off) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * H * P) return;
    const int64_t r = i / ((int64_t)H * P);
    const int h = (int)(i / P % H), e = (int)(i % P);
    const float dt = ssm_softplus(tof(dt_raw[r * ld + off + h]) + tof(p[h]));
    v[i] = fromf<T>(tof(x[r * ldx + (int64_t)h * P + e]) * dt);
    if (e == 0) a[r * H + h] = fromf<T>(-dt * expf(tof(p[H + h])));
}

/* One thread per (row, head): dx slice and ddt_raw. */
template <class T>
static __global__ void prep_bwd_k(T *dx, T *ddt_raw, const T *dv, const T *da, const T *x,
                                  const T *dt_raw, const T *p, int N, int H, int P, int ldx, int ld,
                                  int off) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * H) return;
    const int64_t r = i / H;
    const int h = (int)(i % H);
    const float raw = tof(dt_raw[r * ld + off + h]) + tof(p[h]), dt = ssm_softplus(raw);
    float ddt = tof(da[i]) * -expf(tof(p[H + h]));
    for (int e = 0; e < P; e++) {
        const int64_t at = r * ldx + (int64_t)h * P + e;
        const float g = tof(dv[i * P + e]);
        ddt += g * tof(x[at]);
        put(dx + at, g * dt, 1);
    }
    put(ddt_raw + r * ld + off + h, ddt * ssm_sigmoid(raw), 1);
}

/* One block per head: d dt_bias and d A_log summed over the rows. */
template <class T>
static __global__ void prep_bwd_p_k(float *dp, const T *dv, const T *da, const T *x, const T *dt_raw,
                                    const T *p, int N, int H, int P, int ldx, int ld, int off,
                                    int dw_accum) {
    const int h = blockIdx.x;
    const float A = -expf(tof(p[H + h]));
    float db = 0.0f, dl = 0.0f;
    for (int64_t r = threadIdx.x; r < N; r += blockDim.x) {
        const float raw = tof(dt_raw[r * ld + off + h]) + tof(p[h]), dt = ssm_softplus(raw);
        const float g_a = tof(da[r * H + h]);
        float ddt = g_a * A;
        for (int e = 0; e < P; e++)
            ddt += tof(dv[(r * H + h) * P + e]) * tof(x[r * ldx + (int64_t)h * P + e]);
        db += ddt * ssm_sigmoid(raw);
        dl += g_a * dt * A;
    }
    db = block_reduce<false>(db);
    dl = block_reduce<false>(dl);
    if (threadIdx.x == 0) {
        dp[h] = (dw_accum ? dp[h] : 0.0f) + db;
        dp[H + h] = (dw_accum ? dp[H + h] : 0.0f) + dl;
    }
}

template <class T>
static void prep_forward(T *v, T *a, const T *x, const T *dt_raw, const T *p, int N, int H, int P,
                         int ldx, int ld, int off) {
    const int64_t n = (int64_t)N * H * P;
    if (n <= 0) return;
    prep_fwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(v, a, x, dt_raw, p, N, H, P, ldx, ld, off);
    LAUNCH_CHECK("ssd_prep_forward");
}

template <class T>
static void prep_backward(T *dx, T *ddt_raw, float *dp, const T *dv, const T *da, const T *x,
                          const T *dt_raw, const T *p, int N, int H, int P, int ldx, int ld, int off,
                          int accum_x, int accum_dt, int dw_accum) {
    if ((int64_t)N * H <= 0) return;
    if (!accum_x) ssm_zero(dx, (int64_t)N * ldx, "ssd_prep_backward (zero dx)");
    if (!accum_dt) ssm_zero(ddt_raw, (int64_t)N * ld, "ssd_prep_backward (zero ddt)");
    cudaStream_t s = sj_stream();
    prep_bwd_k<T><<<ssm_blocks((int64_t)N * H), SSM_THREADS, 0, s>>>(dx, ddt_raw, dv, da, x, dt_raw, p, N,
                                                                     H, P, ldx, ld, off);
    LAUNCH_CHECK("ssd_prep_backward");
    prep_bwd_p_k<T><<<(unsigned)H, SSM_THREADS, 0, s>>>(dp, dv, da, x, dt_raw, p, N, H, P, ldx, ld, off,
                                                        dw_accum);
    LAUNCH_CHECK("ssd_prep_backward dp");
}

/* ---- y + D x ----------------------------------------------------------------- */

template <class T>
static __global__ void skip_fwd_k(T *out, const T *y, const T *x, const T *D, int N, int H, int P,
                                  int ldx) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int HP = H * P;
    if (i >= (int64_t)N * HP) return;
    const int64_t r = i / HP;
    const int c = (int)(i % HP);
    out[i] = fromf<T>(tof(y[i]) + tof(D[c / P]) * tof(x[r * ldx + c]));
}

template <class T>
static __global__ void skip_bwd_k(T *dy, T *dx, const T *dout, const T *D, int N, int H, int P,
                                  int ldx, int accum_y) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int HP = H * P;
    if (i >= (int64_t)N * HP) return;
    const int64_t r = i / HP;
    const int c = (int)(i % HP);
    const float g = tof(dout[i]);
    if (dy != dout) put(dy + i, g, accum_y);   /* dy is dout only when it is written first */
    put(dx + r * ldx + c, tof(D[c / P]) * g, 1);
}

template <class T>
static __global__ void skip_bwd_D_k(float *dD, const T *dout, const T *x, int N, int H, int P, int ldx,
                                    int dw_accum) {
    const int h = blockIdx.x;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < (int64_t)N * P; i += blockDim.x) {
        const int64_t r = i / P, c = (int64_t)h * P + i % P;
        s += tof(dout[r * H * P + c]) * tof(x[r * ldx + c]);
    }
    s = block_reduce<false>(s);
    if (threadIdx.x == 0) dD[h] = (dw_accum ? dD[h] : 0.0f) + s;
}

template <class T>
static void skip_forward(T *out, const T *y, const T *x, const T *D, int N, int H, int P, int ldx) {
    const int64_t n = (int64_t)N * H * P;
    if (n <= 0) return;
    skip_fwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(out, y, x, D, N, H, P, ldx);
    LAUNCH_CHECK("ssd_skip_forward");
}

template <class T>
static void skip_backward(T *dy, T *dx, float *dD, const T *dout, const T *x, const T *D, int N, int H,
                          int P, int ldx, int accum_y, int accum_x, int dw_accum) {
    const int64_t n = (int64_t)N * H * P;
    if (n <= 0) return;
    if (!accum_x) ssm_zero(dx, (int64_t)N * ldx, "ssd_skip_backward (zero)");
    cudaStream_t s = sj_stream();
    skip_bwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, s>>>(dy, dx, dout, D, N, H, P, ldx, accum_y);
    LAUNCH_CHECK("ssd_skip_backward");
    skip_bwd_D_k<T><<<(unsigned)H, SSM_THREADS, 0, s>>>(dD, dout, x, N, H, P, ldx, dw_accum);
    LAUNCH_CHECK("ssd_skip_backward dD");
}

/* ---- gated RMSNorm ---------------------------------------------------------- */

/* One block per (row, group). */
template <class T>
static __global__ void gnorm_fwd_k(T *out, float *rstd, const T *y, const T *z, const T *w, int N,
                                   int Din, int G, int ld, int off, float eps) {
    const int64_t r = blockIdx.x / G;
    const int g = blockIdx.x % G, gs = Din / G;
    const int64_t at = r * Din + (int64_t)g * gs, zat = r * ld + off + (int64_t)g * gs;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < gs; c += blockDim.x) {
        const float u = tof(y[at + c]) * ssm_silu(tof(z[zat + c]));
        ss += u * u;
    }
    const float rs = 1.0f / sqrtf(block_reduce<false>(ss) / gs + eps);
    if (threadIdx.x == 0) rstd[r * G + g] = rs;
    for (int c = threadIdx.x; c < gs; c += blockDim.x) {
        const float u = tof(y[at + c]) * ssm_silu(tof(z[zat + c]));
        out[at + c] = fromf<T>(u * rs * tof(w[(int64_t)g * gs + c]));
    }
}

template <class T>
static __global__ void gnorm_bwd_k(T *dy, T *dz, const T *dout, const T *y, const T *z, const T *w,
                                   const float *rstd, int N, int Din, int G, int ld, int off,
                                   int accum_y) {
    const int64_t r = blockIdx.x / G;
    const int g = blockIdx.x % G, gs = Din / G;
    const int64_t at = r * Din + (int64_t)g * gs, zat = r * ld + off + (int64_t)g * gs;
    const float rs = rstd[r * G + g];
    float d = 0.0f;
    for (int c = threadIdx.x; c < gs; c += blockDim.x)
        d += tof(dout[at + c]) * tof(w[(int64_t)g * gs + c]) * tof(y[at + c]) * ssm_silu(tof(z[zat + c]));
    const float k = block_reduce<false>(d) * rs * rs * rs / gs;
    for (int c = threadIdx.x; c < gs; c += blockDim.x) {
        const float zc = tof(z[zat + c]), yc = tof(y[at + c]), u = yc * ssm_silu(zc);
        const float du = tof(dout[at + c]) * tof(w[(int64_t)g * gs + c]) * rs - k * u;
        put(dy + at + c, du * ssm_silu(zc), accum_y);
        put(dz + zat + c, du * yc * ssm_dsilu(zc), 1);
    }
}

/* One block per channel: dw summed over the rows. */
template <class T>
static __global__ void gnorm_bwd_w_k(float *dw, const T *dout, const T *y, const T *z, const float *rstd,
                                     int N, int Din, int G, int ld, int off, int dw_accum) {
    const int c = blockIdx.x, gs = Din / G;
    float s = 0.0f;
    for (int64_t r = threadIdx.x; r < N; r += blockDim.x)
        s += tof(dout[r * Din + c]) * tof(y[r * Din + c]) * ssm_silu(tof(z[r * ld + off + c])) *
             rstd[r * G + c / gs];
    s = block_reduce<false>(s);
    if (threadIdx.x == 0) dw[c] = (dw_accum ? dw[c] : 0.0f) + s;
}

template <class T>
static void gnorm_forward(T *out, float *rstd, const T *y, const T *z, const T *w, int N, int Din, int G,
                          int ld, int off, float eps) {
    if (N <= 0) return;
    gnorm_fwd_k<T><<<(unsigned)((int64_t)N * G), SSM_THREADS, 0, sj_stream()>>>(out, rstd, y, z, w, N, Din,
                                                                                G, ld, off, eps);
    LAUNCH_CHECK("gated_rmsnorm_forward");
}

template <class T>
static void gnorm_backward(T *dy, T *dz, float *dw, const T *dout, const T *y, const T *z, const T *w,
                           const float *rstd, int N, int Din, int G, int ld, int off, int accum_y,
                           int accum_z, int dw_accum) {
    if (N <= 0) return;
    if (!accum_z) ssm_zero(dz, (int64_t)N * ld, "gated_rmsnorm_backward (zero)");
    cudaStream_t s = sj_stream();
    gnorm_bwd_k<T><<<(unsigned)((int64_t)N * G), SSM_THREADS, 0, s>>>(dy, dz, dout, y, z, w, rstd, N, Din,
                                                                      G, ld, off, accum_y);
    LAUNCH_CHECK("gated_rmsnorm_backward");
    gnorm_bwd_w_k<T><<<(unsigned)Din, SSM_THREADS, 0, s>>>(dw, dout, y, z, rstd, N, Din, G, ld, off,
                                                           dw_accum);
    LAUNCH_CHECK("gated_rmsnorm_backward dw");
}

/* ---- linear attention: features, gate, normalisation ------------------------ */

/* u columns: [phi(q) | phi(k)] (2 H hd), then per head v (hd) and a 1 when normalised. */
template <class T>
static __global__ void lin_prep_fwd_k(T *u, T *a, const T *p, int N, int H, int hd, int feature,
                                      int normalize) {
    const int Hd = H * hd, dv = hd + normalize, ldu = 2 * Hd + H * dv, ld = 3 * Hd + (a ? H : 0);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * ldu) return;
    const int64_t r = i / ldu;
    const int c = (int)(i % ldu);
    float val;
    if (c < 2 * Hd) {
        const float x = tof(p[r * ld + c]);
        val = feature == SJ_LINEAR_ELU1 ? ssm_elu1(x) : x;
    } else {
        const int h = (c - 2 * Hd) / dv, e = (c - 2 * Hd) % dv;
        val = e < hd ? tof(p[r * ld + 2 * Hd + (int64_t)h * hd + e]) : 1.0f;
        if (a && e == 0) a[r * H + h] = fromf<T>(-ssm_softplus(-tof(p[r * ld + 3 * Hd + h])));
    }
    u[i] = fromf<T>(val);
}

template <class T>
static __global__ void lin_prep_bwd_k(T *dp, const T *du, const T *da, const T *p, int N, int H, int hd,
                                      int feature, int normalize, int accum) {
    const int Hd = H * hd, dv = hd + normalize, ldu = 2 * Hd + H * dv, ld = 3 * Hd + (da ? H : 0);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * ld) return;
    const int64_t r = i / ld;
    const int c = (int)(i % ld);
    float g;
    if (c < 2 * Hd) {
        g = tof(du[r * ldu + c]);
        if (feature == SJ_LINEAR_ELU1) g *= ssm_delu1(tof(p[i]));
    } else if (c < 3 * Hd) {
        const int h = (c - 2 * Hd) / hd, e = (c - 2 * Hd) % hd;
        g = tof(du[r * ldu + 2 * Hd + (int64_t)h * dv + e]);
    } else {
        g = tof(da[r * H + (c - 3 * Hd)]) * ssm_sigmoid(-tof(p[i]));
    }
    put(dp + i, g, accum);
}

template <class T>
static __global__ void lin_norm_fwd_k(T *out, const T *y, int N, int H, int hd, float eps) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * H * hd) return;
    const int64_t rh = i / hd;
    const int e = (int)(i % hd);
    out[i] = fromf<T>(tof(y[rh * (hd + 1) + e]) / (tof(y[rh * (hd + 1) + hd]) + eps));
}

/* One thread per (row, head). */
template <class T>
static __global__ void lin_norm_bwd_k(T *dy, const T *dout, const T *y, int N, int H, int hd, float eps,
                                      int accum) {
    const int64_t rh = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (rh >= (int64_t)N * H) return;
    const T *yr = y + rh * (hd + 1);
    const float inv = 1.0f / (tof(yr[hd]) + eps);
    float s = 0.0f;
    for (int e = 0; e < hd; e++) {
        const float g = tof(dout[rh * hd + e]);
        s += g * tof(yr[e]);
        put(dy + rh * (hd + 1) + e, g * inv, accum);
    }
    put(dy + rh * (hd + 1) + hd, -s * inv * inv, accum);
}

template <class T>
static void lin_prep_forward(T *u, T *a, const T *p, int N, int H, int hd, int feature, int normalize) {
    const int64_t n = (int64_t)N * (2 * H * hd + H * (hd + normalize));
    if (n <= 0) return;
    lin_prep_fwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(u, a, p, N, H, hd, feature, normalize);
    LAUNCH_CHECK("linear_prep_forward");
}

template <class T>
static void lin_prep_backward(T *dp, const T *du, const T *da, const T *p, int N, int H, int hd,
                              int feature, int normalize, int accum) {
    const int64_t n = (int64_t)N * (3 * H * hd + (da ? H : 0));
    if (n <= 0) return;
    lin_prep_bwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(dp, du, da, p, N, H, hd, feature,
                                                                      normalize, accum);
    LAUNCH_CHECK("linear_prep_backward");
}

template <class T>
static void lin_norm_forward(T *out, const T *y, int N, int H, int hd, float eps) {
    const int64_t n = (int64_t)N * H * hd;
    if (n <= 0) return;
    lin_norm_fwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(out, y, N, H, hd, eps);
    LAUNCH_CHECK("linear_norm_forward");
}

template <class T>
static void lin_norm_backward(T *dy, const T *dout, const T *y, int N, int H, int hd, float eps,
                              int accum) {
    const int64_t n = (int64_t)N * H;
    if (n <= 0) return;
    lin_norm_bwd_k<T><<<ssm_blocks(n), SSM_THREADS, 0, sj_stream()>>>(dy, dout, y, N, H, hd, eps, accum);
    LAUNCH_CHECK("linear_norm_backward");
}

#define SJ_CU_SSM(T, TY)                                                                          \
extern "C" void sj_cuda_conv1d_silu_forward_##T(void *out, const void *x, const void *w,          \
                                                const void *bias, int B, int T_, int ld, int off, \
                                                int W, int K) {                                   \
    conv_forward((TY *)out, (const TY *)x, (const TY *)w, (const TY *)bias, B, T_, ld, off, W, K); \
}                                                                                                 \
extern "C" void sj_cuda_conv1d_silu_backward_##T(void *dx, float *dw, float *dbias,              \
                                                 const void *dout, const void *x, const void *w, \
                                                 const void *bias, int B, int T_, int ld,        \
                                                 int off, int W, int K, int accum,               \
                                                 int dw_accum) {                                 \
    conv_backward((TY *)dx, dw, dbias, (const TY *)dout, (const TY *)x, (const TY *)w,            \
                  (const TY *)bias, B, T_, ld, off, W, K, accum, dw_accum);                       \
}                                                                                                 \
extern "C" void sj_cuda_ssd_prep_forward_##T(void *v, void *a, const void *x,                    \
                                             const void *dt_raw, const void *p, int N, int H,    \
                                             int P, int ldx, int ld, int off) {                  \
    prep_forward((TY *)v, (TY *)a, (const TY *)x, (const TY *)dt_raw, (const TY *)p, N, H, P,    \
                 ldx, ld, off);                                                                   \
}                                                                                                 \
extern "C" void sj_cuda_ssd_prep_backward_##T(void *dx, void *ddt_raw, float *dp,                \
                                              const void *dv, const void *da, const void *x,     \
                                              const void *dt_raw, const void *p, int N, int H,   \
                                              int P, int ldx, int ld, int off, int accum_x,      \
                                              int accum_dt, int dw_accum) {                      \
    prep_backward((TY *)dx, (TY *)ddt_raw, dp, (const TY *)dv, (const TY *)da, (const TY *)x,     \
                  (const TY *)dt_raw, (const TY *)p, N, H, P, ldx, ld, off, accum_x, accum_dt,    \
                  dw_accum);                                                                      \
}                                                                                                 \
extern "C" void sj_cuda_ssd_skip_forward_##T(void *out, const void *y, const void *x,            \
                                             const void *D, int N, int H, int P, int ldx) {      \
    skip_forward((TY *)out, (const TY *)y, (const TY *)x, (const TY *)D, N, H, P, ldx);          \
}                                                                                                 \
extern "C" void sj_cuda_ssd_skip_backward_##T(void *dy, void *dx, float *dD, const void *dout,   \
                                              const void *x, const void *D, int N, int H, int P, \
                                              int ldx, int accum_y, int accum_x, int dw_accum) { \
    skip_backward((TY *)dy, (TY *)dx, dD, (const TY *)dout, (const TY *)x, (const TY *)D, N, H,  \
                  P, ldx, accum_y, accum_x, dw_accum);                                            \
}                                                                                                 \
extern "C" void sj_cuda_gated_rmsnorm_forward_##T(void *out, float *rstd, const void *y,         \
                                                  const void *z, const void *w, int N, int Din,  \
                                                  int G, int ld, int off, float eps) {           \
    gnorm_forward((TY *)out, rstd, (const TY *)y, (const TY *)z, (const TY *)w, N, Din, G, ld,    \
                  off, eps);                                                                      \
}                                                                                                 \
extern "C" void sj_cuda_gated_rmsnorm_backward_##T(void *dy, void *dz, float *dw,                \
                                                   const void *dout, const void *y,              \
                                                   const void *z, const void *w,                 \
                                                   const float *rstd, int N, int Din, int G,     \
                                                   int ld, int off, int accum_y, int accum_z,    \
                                                   int dw_accum) {                               \
    gnorm_backward((TY *)dy, (TY *)dz, dw, (const TY *)dout, (const TY *)y, (const TY *)z,        \
                   (const TY *)w, rstd, N, Din, G, ld, off, accum_y, accum_z, dw_accum);          \
}                                                                                                 \
extern "C" void sj_cuda_linear_prep_forward_##T(void *u, void *a, const void *p, int N, int H,   \
                                                int hd, int feature, int normalize) {            \
    lin_prep_forward((TY *)u, (TY *)a, (const TY *)p, N, H, hd, feature, normalize);             \
}                                                                                                 \
extern "C" void sj_cuda_linear_prep_backward_##T(void *dp, const void *du, const void *da,       \
                                                 const void *p, int N, int H, int hd,            \
                                                 int feature, int normalize, int accum) {        \
    lin_prep_backward((TY *)dp, (const TY *)du, (const TY *)da, (const TY *)p, N, H, hd, feature, \
                      normalize, accum);                                                          \
}                                                                                                 \
extern "C" void sj_cuda_linear_norm_forward_##T(void *out, const void *y, int N, int H, int hd,  \
                                                float eps) {                                     \
    lin_norm_forward((TY *)out, (const TY *)y, N, H, hd, eps);                                    \
}                                                                                                 \
extern "C" void sj_cuda_linear_norm_backward_##T(void *dy, const void *dout, const void *y,      \
                                                 int N, int H, int hd, float eps, int accum) {   \
    lin_norm_backward((TY *)dy, (const TY *)dout, (const TY *)y, N, H, hd, eps, accum);           \
}
SJ_CU_SSM(f32, float)
SJ_CU_SSM(bf16, bf16)
SJ_CU_SSM(f16, f16)
