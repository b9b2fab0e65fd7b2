/* optimizers.cu — the update rules besides AdamW over ranges of the flat
 * buffers, with csrc/cpu/optimizers.c's arithmetic (fmaf where torch's
 * vectorised kernels fuse, torch's lerp): Lion, SGD, Adafactor (per
 * tensor: row, column and update reductions in fixed orders, so the same
 * bits every run) and Muon's elementwise parts around its Newton-Schulz
 * GEMMs (train/optim.c runs those through the matmul). Scalars come from
 * the hyper-parameters in device memory and the reductions' sums, never
 * from the host: every kernel is capturable. The compute copy (bf16/f16)
 * is written beside the f32 master weights. The elementwise state is an
 * sj_state (ostate.cuh: f32, bf16 or 8-bit). First versions, kept simple:
 * elementwise rules are bandwidth-bound like adamw.cu; not yet timed. */
#include "common.cuh"
#include "kernels.h"
#include "ostate.cuh"

enum { RED_THREADS = 256 };

static __device__ __forceinline__ float lerp_torch(float a, float b, float w) {
    return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

static __device__ double block_sum(double v) {
    __shared__ double part[RED_THREADS / 32];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();   /* part[] may still be read by a previous call */
    if (lane == 0) part[w] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int i = 0; i < RED_THREADS / 32; i++) s += part[i];
    return s;   /* valid in thread 0 */
}

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); \
         i += (int64_t)gridDim.x * blockDim.x)

/* ---- Lion, SGD ------------------------------------------------------------- */

/* The elementwise rules run blocks of SJ_Q8_BLOCK threads, one state block
 * each (ostate.cuh): base is the block's first element, i this thread's. */
#define STATE_BLOCKS(n)                                                                     \
    for (int64_t base = blockIdx.x * (int64_t)SJ_Q8_BLOCK; base < (n);                     \
         base += (int64_t)gridDim.x * SJ_Q8_BLOCK)

// p, g, m: (n)
template <class T>
static __global__ void __launch_bounds__(SJ_Q8_BLOCK)
lion_k(float *p, T *p_act, float *g, int zero_grads, sj_state m, int64_t n, float lr_mult,
       float wd, const sj_optim_hp *hp) {
    __shared__ sj_state_maps sm;
    if (m.dtype == SJ_STATE_Q8) sj_state_maps_load(&sm);
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const float lr = hp->lr * lr_mult, decay = 1.0f - lr * wd;
    STATE_BLOCKS(n) {
        const int64_t i = base + threadIdx.x;
        const bool in = i < n;
        if (update) {
            float next = 0.0f;
            if (in) {
                const float gi = g[i] * scale, mi = sj_state_load(m, &sm, i);
                const float c = fmaf(gi, hp->one_minus_beta1, mi * hp->beta1);
                const float sign = (float)((c > 0.0f) - (c < 0.0f));
                const float pi = p[i] * decay - lr * sign;
                p[i] = pi;
                if (p_act) p_act[i] = fromf<T>(pi);
                next = fmaf(gi, hp->one_minus_beta2, mi * hp->beta2);
            }
            sj_state_store(m, &sm, base, i, in, next, hp);
        }
        if (zero_grads && in) g[i] = 0.0f;
    }
}

// p, g, buf: (n); buf.data NULL without momentum
template <class T>
static __global__ void __launch_bounds__(SJ_Q8_BLOCK)
sgd_k(float *p, T *p_act, float *g, int zero_grads, sj_state buf, int64_t n, float lr_mult,
      float wd, const sj_optim_hp *hp) {
    __shared__ sj_state_maps sm;
    if (buf.dtype == SJ_STATE_Q8) sj_state_maps_load(&sm);
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const float lr = hp->lr * lr_mult, mom = hp->momentum;
    const bool first = hp->step == 1;
    STATE_BLOCKS(n) {
        const int64_t i = base + threadIdx.x;
        const bool in = i < n;
        if (update) {
            float b = 0.0f;
            if (in) {
                float d = g[i] * scale, pi = p[i];
                if (wd != 0.0f) d = fmaf(pi, wd, d);
                if (buf.data) {
                    b = first ? d : fmaf(d, hp->one_minus_dampening, sj_state_load(buf, &sm, i) * mom);
                    d = hp->nesterov ? fmaf(b, mom, d) : b;
                }
                pi = fmaf(d, -lr, pi);
                p[i] = pi;
                if (p_act) p_act[i] = fromf<T>(pi);
            }
            if (buf.data) sj_state_store(buf, &sm, base, i, in, b, hp);
        }
        if (zero_grads && in) g[i] = 0.0f;
    }
}

/* ---- Adafactor ------------------------------------------------------------- */

/* sums: [0] the weights' sum of squares (before decay), [1] the row
 * factor's sum, [2] the update's sum of squares, [3 ..] per-row partials. */

/* One block per row: row = lerp(row, mean of g^2 over the row, w). */
static __global__ void fact_rows_k(float *row, const float *g, int64_t cols,
                                   const sj_optim_hp *hp) {
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    if (!update) return;
    const float *gr = g + blockIdx.x * cols;
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < cols; c += RED_THREADS) {
        const float v = gr[c] * scale;
        s += (double)v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) {
        const float w = (float)pow((double)hp->step, (double)hp->beta2_decay);
        row[blockIdx.x] = lerp_torch(row[blockIdx.x], (float)(s / (double)cols), w);
    }
}

/* 32 columns a block, 32 threads down each: col = lerp(col, mean of g^2
 * over the column, w); the 32 partial sums of a column added in order. */
static __global__ void fact_cols_k(float *col, const float *g, int64_t rows, int64_t cols,
                                   const sj_optim_hp *hp) {
    __shared__ double part[32][33];
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    if (!update) return;
    const int64_t c = blockIdx.x * 32 + threadIdx.x;
    double s = 0.0;
    if (c < cols)
        for (int64_t r = threadIdx.y; r < rows; r += 32) {
            const float v = g[r * cols + c] * scale;
            s += (double)v * v;
        }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double t = 0.0;
        for (int k = 0; k < 32; k++) t += part[k][threadIdx.x];
        const float w = (float)pow((double)hp->step, (double)hp->beta2_decay);
        col[c] = lerp_torch(col[c], (float)(t / (double)rows), w);
    }
}

/* A vector's full second moment: v = lerp(v, g^2, w). */
static __global__ void fact_vector_k(float *v, const float *g, int64_t n, const sj_optim_hp *hp) {
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    if (!update) return;
    const float w = (float)pow((double)hp->step, (double)hp->beta2_decay);
    GRID_STRIDE(i, n) {
        const float gi = g[i] * scale;
        v[i] = lerp_torch(v[i], gi * gi, w);
    }
}

/* One block: out = sum of x (n), in order per thread, then by block_sum. */
static __global__ void sum_k(double *out, const float *x, int64_t n) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += RED_THREADS) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

static __global__ void sum_d_k(double *out, const double *x, int64_t n) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += RED_THREADS) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

/* The update at element (r, c): g / sqrt(max(row col / mean(row), eps1^2)),
 * or for a vector (cols 0) at element r: g / sqrt(max(v, eps1^2)). */
static __device__ __forceinline__ float fact_update(const float *g, const float *row,
                                                    const float *col, int64_t r, int64_t c,
                                                    int64_t cols, float row_mean, float scale,
                                                    float eps1) {
    const float v = cols ? row[r] * col[c] / row_mean : row[r];
    const float gi = g[cols ? r * cols + c : r] * scale;
    return 1.0f / sqrtf(fmaxf(v, eps1 * eps1)) * gi;
}

static __device__ __forceinline__ float fact_row_mean(const double *sums, int64_t rows,
                                                      const sj_optim_hp *hp) {
    return fmaxf((float)(sums[1] / (double)rows), hp->eps);
}

/* One block per row (a vector: one block): the update's sum of squares. */
static __global__ void fact_update_sumsq_k(double *part, const float *g, const float *row,
                                           const float *col, int64_t rows, int64_t cols,
                                           const double *sums, const sj_optim_hp *hp) {
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    if (!update) return;
    const float rm = cols ? fact_row_mean(sums, rows, hp) : 1.0f;
    double s = 0.0;
    if (cols) {
        for (int64_t c = threadIdx.x; c < cols; c += RED_THREADS) {
            const float u = fact_update(g, row, col, blockIdx.x, c, cols, rm, scale, hp->eps);
            s += (double)u * u;
        }
    } else {
        for (int64_t r = threadIdx.x; r < rows; r += RED_THREADS) {
            const float u = fact_update(g, row, col, r, 0, 0, rm, scale, hp->eps);
            s += (double)u * u;
        }
    }
    s = block_sum(s);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// p, g: (rows, cols) or (rows) when cols is 0
template <class T>
static __global__ void fact_apply_k(float *p, T *p_act, float *g, int zero_grads,
                                    const float *row, const float *col, int64_t rows,
                                    int64_t cols, float lr_mult, float wd, const double *sums,
                                    const sj_optim_hp *hp) {
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const int64_t n = cols ? rows * cols : rows;
    const double step = (double)hp->step, lr = (double)hp->lr * lr_mult;
    const double rho = fmin(lr, 1.0 / sqrt(step));
    const double alpha = fmax((double)hp->eps2, sqrt(sums[0]) / sqrt((double)n)) * rho;
    const double denom = fmax(1.0, sqrt(sums[2]) / (sqrt((double)n) * hp->d));
    const float a = (float)(-alpha / denom), decay = (float)(1.0 - lr * wd);
    const float rm = cols ? fact_row_mean(sums, rows, hp) : 1.0f;
    GRID_STRIDE(i, n) {
        if (update) {
            const int64_t r = cols ? i / cols : i, c = cols ? i % cols : 0;
            float pi = p[i];
            if (wd != 0.0f) pi *= decay;
            pi += a * fact_update(g, row, col, r, c, cols, rm, scale, hp->eps);
            p[i] = pi;
            if (p_act) p_act[i] = fromf<T>(pi);
        }
        if (zero_grads) g[i] = 0.0f;
    }
}

/* ---- Muon's elementwise parts ----------------------------------------------- */

// u, buf, g: (n); u written even on a skipped step, buf only on an update
static __global__ void __launch_bounds__(SJ_Q8_BLOCK)
muon_momentum_k(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
                const sj_optim_hp *hp) {
    __shared__ sj_state_maps sm;
    if (buf.dtype == SJ_STATE_Q8) sj_state_maps_load(&sm);
    bool update;
    const float scale = sj_clip_scale(hp, &update);
    const float mom = hp->momentum;
    STATE_BLOCKS(n) {
        const int64_t i = base + threadIdx.x;
        const bool in = i < n;
        float b = 0.0f;
        if (in) {
            const float gi = g[i] * scale;
            b = lerp_torch(sj_state_load(buf, &sm, i), gi, hp->one_minus_momentum);
            u[i] = hp->nesterov ? lerp_torch(gi, b, mom) : b;
            if (zero_grads) g[i] = 0.0f;
        }
        if (update) sj_state_store(buf, &sm, base, i, in, b, hp);
    }
}

// x (act), u: (n)
template <class T>
static __global__ void muon_normalize_k(T *x, const float *u, int64_t n, const double *sumsq,
                                        float eps) {
    const float d = fmaxf((float)sqrt(*sumsq), eps);
    GRID_STRIDE(i, n) x[i] = fromf<T>(u[i] / d);
}

// p, o (act): (n)
template <class T>
static __global__ void muon_apply_k(float *p, T *p_act, const T *o, int64_t n, float lr_mult,
                                    float ratio, float wd, const sj_optim_hp *hp) {
    bool update;
    sj_clip_scale(hp, &update);
    if (!update) return;
    const double lr = (double)hp->lr * lr_mult;
    const float decay = (float)(1.0 - lr * wd), step = (float)(lr * ratio);
    GRID_STRIDE(i, n) {
        const float pi = p[i] * decay - step * tof(o[i]);
        p[i] = pi;
        if (p_act) p_act[i] = fromf<T>(pi);
    }
}

extern "C" void sj_cuda_muon_momentum(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
                                      const sj_optim_hp *hp) {
    if (n <= 0) return;
    muon_momentum_k<<<sj_blocks(n, SJ_Q8_BLOCK, 8192), SJ_Q8_BLOCK, 0, sj_stream()>>>(
        u, buf, g, zero_grads, n, hp);
    LAUNCH_CHECK("muon_momentum");
}

#define SJ_CU_OPTIMIZERS(T, TY)                                                             \
extern "C" void sj_cuda_lion_##T(float *p, void *p_act, float *g, int zero_grads,          \
                                 sj_state m, int64_t n, float lr_mult, float wd,            \
                                 const sj_optim_hp *hp) {                                   \
    if (n <= 0) return;                                                                     \
    lion_k<<<sj_blocks(n, SJ_Q8_BLOCK, 8192), SJ_Q8_BLOCK, 0, sj_stream()>>>(               \
        p, (TY *)p_act, g, zero_grads, m, n, lr_mult, wd, hp);                              \
    LAUNCH_CHECK("lion");                                                                   \
}                                                                                           \
extern "C" void sj_cuda_sgd_##T(float *p, void *p_act, float *g, int zero_grads,           \
                                sj_state buf, int64_t n, float lr_mult, float wd,           \
                                const sj_optim_hp *hp) {                                    \
    if (n <= 0) return;                                                                     \
    sgd_k<<<sj_blocks(n, SJ_Q8_BLOCK, 8192), SJ_Q8_BLOCK, 0, sj_stream()>>>(                \
        p, (TY *)p_act, g, zero_grads, buf, n, lr_mult, wd, hp);                            \
    LAUNCH_CHECK("sgd");                                                                    \
}                                                                                           \
extern "C" void sj_cuda_adafactor_##T(float *p, void *p_act, float *g, int zero_grads,      \
                                      float *row, float *col, int64_t rows, int64_t cols,   \
                                      float lr_mult, float wd, double *sums,                \
                                      const sj_optim_hp *hp) {                              \
    const int64_t n = cols ? rows * cols : rows;                                            \
    if (n <= 0) return;                                                                     \
    cudaStream_t st = sj_stream();                                                          \
    sj_cuda_sumsq(&sums[0], p, n);                                                          \
    if (cols) {                                                                             \
        fact_rows_k<<<(unsigned)rows, RED_THREADS, 0, st>>>(row, g, cols, hp);              \
        LAUNCH_CHECK("adafactor rows");                                                     \
        fact_cols_k<<<(unsigned)((cols + 31) / 32), dim3(32, 32), 0, st>>>(col, g, rows,     \
                                                                          cols, hp);        \
        LAUNCH_CHECK("adafactor cols");                                                     \
        sum_k<<<1, RED_THREADS, 0, st>>>(&sums[1], row, rows);                              \
        LAUNCH_CHECK("adafactor row sum");                                                  \
    } else {                                                                                \
        fact_vector_k<<<sj_blocks(n, 256, 8192), 256, 0, st>>>(row, g, n, hp);              \
        LAUNCH_CHECK("adafactor vector");                                                   \
    }                                                                                       \
    const unsigned parts = cols ? (unsigned)rows : 1;                                       \
    fact_update_sumsq_k<<<parts, RED_THREADS, 0, st>>>(sums + 3, g, row, col, rows, cols,   \
                                                       sums, hp);                           \
    LAUNCH_CHECK("adafactor update norm");                                                  \
    sum_d_k<<<1, RED_THREADS, 0, st>>>(&sums[2], sums + 3, parts);                          \
    LAUNCH_CHECK("adafactor update norm sum");                                              \
    fact_apply_k<<<sj_blocks(n, 256, 8192), 256, 0, st>>>(p, (TY *)p_act, g, zero_grads,    \
                                                          row, col, rows, cols, lr_mult,    \
                                                          wd, sums, hp);                    \
    LAUNCH_CHECK("adafactor");                                                              \
}                                                                                           \
extern "C" void sj_cuda_muon_normalize_##T(void *x, const float *u, int64_t n,              \
                                           const double *sumsq, float eps) {                \
    if (n <= 0) return;                                                                     \
    muon_normalize_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>((TY *)x, u, n,       \
                                                                       sumsq, eps);         \
    LAUNCH_CHECK("muon_normalize");                                                         \
}                                                                                           \
extern "C" void sj_cuda_muon_apply_##T(float *p, void *p_act, const void *o, int64_t n,     \
                                       float lr_mult, float ratio, float wd,                \
                                       const sj_optim_hp *hp) {                             \
    if (n <= 0) return;                                                                     \
    muon_apply_k<<<sj_blocks(n, 256, 8192), 256, 0, sj_stream()>>>(                         \
        p, (TY *)p_act, (const TY *)o, n, lr_mult, ratio, wd, hp);                          \
    LAUNCH_CHECK("muon_apply");                                                             \
}
SJ_CU_OPTIMIZERS(f32, float)
SJ_CU_OPTIMIZERS(bf16, bf16)
SJ_CU_OPTIMIZERS(f16, f16)
