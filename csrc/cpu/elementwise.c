/* elementwise.c — one-pass ops over activations: fill, add and copy (with a
 * factor: the residual add, gradient copies, axpy), the column-slice mix
 * (value mix) and paired heads. Threaded over elements or rows; no op here
 * allocates. */
#include "cpu.h"

typedef struct { float *out; const float *a, *b; float v; int accum; } ew_job;

static void add_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const ew_job *j = ctx;
    for (int64_t i = i0; i < i1; i++) j->out[i] = j->a[i] + j->v * j->b[i];
}

static void copy_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const ew_job *j = ctx;
    if (j->accum) for (int64_t i = i0; i < i1; i++) j->out[i] += j->v * j->a[i];
    else for (int64_t i = i0; i < i1; i++) j->out[i] = j->v * j->a[i];
}

static void fill_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const ew_job *j = ctx;
    for (int64_t i = i0; i < i1; i++) j->out[i] = j->v;
}

void sj_cpu_add(void *out, const void *a, const void *b, int64_t n, float b_scale) {
    ew_job j = { out, a, b, b_scale, 0 };
    sj_parallel_for(n, 1 << 14, add_range, &j);
}

void sj_cpu_copy(void *dst, const void *src, int64_t n, float scale, int accum) {
    ew_job j = { dst, src, NULL, scale, accum };
    sj_parallel_for(n, 1 << 14, copy_range, &j);
}

void sj_cpu_fill(float *x, float value, int64_t n) {
    ew_job j = { x, NULL, NULL, value, 0 };
    sj_parallel_for(n, 1 << 15, fill_range, &j);
}

/* ---- mix: columns [c0, c0 + w) of each row blended with y ------------------ */

typedef struct {
    float *out, *dx, *dy;
    const float *x, *y, *dout;
    int ld, c0, w, accum_x, accum_y;
    float a;
} mix_job;

static void mix_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const mix_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->ld, *y = j->y + r * j->ld;
        float *out = j->out + r * j->ld;
        if (out != x)
            for (int c = 0; c < j->ld; c++) out[c] = x[c];
        for (int c = j->c0; c < j->c0 + j->w; c++) out[c] = (1.0f - j->a) * x[c] + j->a * y[c];
    }
}

// out, x, y: (N, ld); out may be x (then only the slice is written)
void sj_cpu_mix_forward(void *out, const void *x, const void *y, int N, int ld, int c0, int w,
                        float a) {
    mix_job j = { .out = out, .x = x, .y = y, .ld = ld, .c0 = c0, .w = w, .a = a };
    sj_parallel_for(N, 8, mix_fwd_rows, &j);
}

/* Columns [c_lo, c_hi) off the slice: dx (+)= dout unless dx is dout; dy = 0
 * unless it is accumulated into. */
static void mix_bwd_off(const mix_job *j, float *dx, float *dy, const float *d, int c_lo,
                        int c_hi) {
    for (int c = c_lo; c < c_hi; c++) {
        if (dx && dx != d) dx[c] = j->accum_x ? dx[c] + d[c] : d[c];
        if (dy && !j->accum_y) dy[c] = 0.0f;
    }
}

static void mix_bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const mix_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *d = j->dout + r * j->ld;
        float *dx = j->dx ? j->dx + r * j->ld : NULL, *dy = j->dy ? j->dy + r * j->ld : NULL;
        for (int c = j->c0; c < j->c0 + j->w; c++) {   /* dy before dx: dx may be dout */
            const float v = d[c];
            if (dy) dy[c] = j->accum_y ? dy[c] + j->a * v : j->a * v;
            if (dx) dx[c] = j->accum_x ? dx[c] + (1.0f - j->a) * v : (1.0f - j->a) * v;
        }
        mix_bwd_off(j, dx, dy, d, 0, j->c0);
        mix_bwd_off(j, dx, dy, d, j->c0 + j->w, j->ld);
    }
}

// dx, dy (+)=, dout: (N, ld); either gradient may be NULL; dx may be dout (accum_x 0)
void sj_cpu_mix_backward(void *dx, void *dy, const void *dout, int N, int ld, int c0, int w,
                         float a, int accum_x, int accum_y) {
    mix_job j = { .dx = dx, .dy = dy, .dout = dout, .ld = ld, .c0 = c0, .w = w, .a = a,
                  .accum_x = accum_x, .accum_y = accum_y };
    sj_parallel_for(N, 8, mix_bwd_rows, &j);
}

/* ---- paired heads: head j of out is the mean of heads 2j and 2j+1 ---------- */

typedef struct { float *dst; const float *src; int n_heads, hd, accum; } pair_job;

static void pair_fwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const pair_job *j = ctx;
    const int half = j->n_heads / 2 * j->hd;
    for (int64_t r = r0; r < r1; r++) {
        const float *in = j->src + r * 2 * half;
        float *out = j->dst + r * half;
        for (int h = 0; h < j->n_heads / 2; h++)
            for (int e = 0; e < j->hd; e++)
                out[h * j->hd + e] = 0.5f * (in[2 * h * j->hd + e] + in[(2 * h + 1) * j->hd + e]);
    }
}

// out: (N, n_heads/2 * hd); in: (N, n_heads * hd), n_heads even
void sj_cpu_pair_heads_forward(void *out, const void *in, int N, int n_heads, int hd) {
    pair_job j = { out, in, n_heads, hd, 0 };
    sj_parallel_for(N, 8, pair_fwd_rows, &j);
}

static void pair_bwd_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const pair_job *j = ctx;
    const int half = j->n_heads / 2 * j->hd;
    for (int64_t r = r0; r < r1; r++) {
        const float *dout = j->src + r * half;
        float *din = j->dst + r * 2 * half;
        for (int h = 0; h < j->n_heads; h++)
            for (int e = 0; e < j->hd; e++) {
                const float v = 0.5f * dout[h / 2 * j->hd + e];
                din[h * j->hd + e] = j->accum ? din[h * j->hd + e] + v : v;
            }
    }
}

// din: (N, n_heads * hd) (+)=; dout: (N, n_heads/2 * hd)
void sj_cpu_pair_heads_backward(void *din, const void *dout, int N, int n_heads, int hd,
                                int accum) {
    pair_job j = { din, dout, n_heads, hd, accum };
    sj_parallel_for(N, 8, pair_bwd_rows, &j);
}
