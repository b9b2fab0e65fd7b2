/* optimizers.c — the update rules besides AdamW over ranges of the flat
 * buffers: Lion, SGD, Adafactor and Muon's elementwise parts (its
 * Newton-Schulz GEMMs run in train/optim.c through the backend's matmul).
 * Each follows its reference's arithmetic (lion-pytorch 0.2.5,
 * torch.optim), so that f32 trajectories agree to rounding. */
#include "cpu.h"
#include <math.h>

/* torch.lerp's formula, exact for weights near either end. */
static inline float lerp_torch(float a, float b, float w) {
    return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

/* Where torch's vectorised kernels fuse `a + alpha * b` (add_ with alpha,
 * a vec::fmadd), these use fmaf: the same roundings, so that Lion's sign
 * sees the bits torch's does. */
typedef struct {
    float *p, *g;
    sj_state s;                 /* the rule's state (data NULL: none) */
    int64_t n;
    float lr, wd, gs;
    float b1, c1, b2, c2;       /* Lion: beta1, 1 - beta1, beta2, 1 - beta2;
                                 * SGD: momentum, -, -, 1 - dampening */
    int first, nesterov, update, zero_grads;
    const sj_optim_hp *hp;
} rule_job;

/* The block loop every elementwise rule runs (cpu.h): the rule's body
 * sees i (the element), k (its place in the block) and s (the state's
 * block as f32; NULL without state). */
#define FOR_STATE_BLOCKS(j, c0, c1, ...)                                                     \
    for (int64_t blk = (c0); blk < (c1) && (j)->update; blk++) {                             \
        const int64_t i0 = blk * SJ_Q8_BLOCK;                                                \
        const int cnt = (int)SJ_MIN(SJ_Q8_BLOCK, (j)->n - i0);                               \
        float sbuf[SJ_Q8_BLOCK];                                                             \
        float *s = (j)->s.data ? sj_cpu_state_load(&(j)->s, i0, cnt, sbuf) : NULL;          \
        for (int k = 0; k < cnt; k++) { const int64_t i = i0 + k; __VA_ARGS__ }                 \
        if (s) sj_cpu_state_store(&(j)->s, i0, cnt, s, (j)->hp);                             \
    }                                                                                        \
    if ((j)->zero_grads)                                                                     \
        for (int64_t i = (c0) * SJ_Q8_BLOCK; i < SJ_MIN((c1) * SJ_Q8_BLOCK, (j)->n); i++)    \
            (j)->g[i] = 0.0f;

static void lion_blocks(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const rule_job *j = ctx;
    const float decay = 1.0f - j->lr * j->wd;
    FOR_STATE_BLOCKS(j, c0, c1, {
        const float g = j->g[i] * j->gs, m = s[k];
        const float c = fmaf(g, j->c1, m * j->b1);
        const float sign = (float)((c > 0.0f) - (c < 0.0f));
        j->p[i] = j->p[i] * decay - j->lr * sign;
        s[k] = fmaf(g, j->c2, m * j->b2);
    })
}

// p, g, m: (n)
void sj_cpu_lion(float *p, void *p_act, float *g, int zero_grads, sj_state m, int64_t n,
                 float lr_mult, float wd, const sj_optim_hp *hp) {
    (void)p_act;
    int update;
    const float scale = sj_cpu_clip_scale(hp, &update);
    rule_job j = { p, g, m, n, hp->lr * lr_mult, wd, scale, hp->beta1, hp->one_minus_beta1,
                   hp->beta2, hp->one_minus_beta2, 0, 0, update, zero_grads, hp };
    sj_parallel_for(SJ_CDIV(n, SJ_Q8_BLOCK), 64, lion_blocks, &j);
}

static void sgd_blocks(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const rule_job *j = ctx;
    FOR_STATE_BLOCKS(j, c0, c1, {
        float d = j->g[i] * j->gs;
        if (j->wd != 0.0f) d = fmaf(j->p[i], j->wd, d);
        if (s) {
            const float buf = j->first ? d : fmaf(d, j->c2, s[k] * j->b1);
            s[k] = buf;
            d = j->nesterov ? fmaf(buf, j->b1, d) : buf;
        }
        j->p[i] = fmaf(d, -j->lr, j->p[i]);
    })
}

// p, g, buf: (n); buf.data NULL without momentum
void sj_cpu_sgd(float *p, void *p_act, float *g, int zero_grads, sj_state buf, int64_t n,
                float lr_mult, float wd, const sj_optim_hp *hp) {
    (void)p_act;
    int update;
    const float scale = sj_cpu_clip_scale(hp, &update);
    rule_job j = { p, g, buf, n, hp->lr * lr_mult, wd, scale, hp->momentum, 0.0f, 0.0f,
                   hp->one_minus_dampening, hp->step == 1, hp->nesterov, update, zero_grads, hp };
    sj_parallel_for(SJ_CDIV(n, SJ_Q8_BLOCK), 64, sgd_blocks, &j);
}

/* ---- Adafactor ------------------------------------------------------------ */

typedef struct {
    float *p, *g, *row, *col;
    int64_t rows, cols;
    float gs, w, eps1_sq, row_mean, alpha;
    double *part;               /* per-row sums of the update's squares */
} fact_job;

/* row i: mean of g^2 into the row factor */
static void fact_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fact_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->g + r * j->cols;
        double s = 0.0;
        for (int64_t c = 0; c < j->cols; c++) s += (double)(g[c] * j->gs) * (g[c] * j->gs);
        j->row[r] = lerp_torch(j->row[r], (float)(s / (double)j->cols), j->w);
    }
}

/* column c: mean of g^2 over the rows into the column factor */
static void fact_cols(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const fact_job *j = ctx;
    for (int64_t c = c0; c < c1; c++) {
        double s = 0.0;
        for (int64_t r = 0; r < j->rows; r++) {
            const float v = j->g[r * j->cols + c] * j->gs;
            s += (double)v * v;
        }
        j->col[c] = lerp_torch(j->col[c], (float)(s / (double)j->rows), j->w);
    }
}

/* The update g / sqrt(max(row col / mean(row), eps1^2)): pass 0 sums its
 * squares per row, pass 1 applies it with alpha. */
static float fact_update(const fact_job *j, int64_t r, int64_t c) {
    const float v = j->row[r] * j->col[c] / j->row_mean;
    return 1.0f / sqrtf(fmaxf(v, j->eps1_sq)) * (j->g[r * j->cols + c] * j->gs);
}

static void fact_update_sumsq(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fact_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        double s = 0.0;
        for (int64_t c = 0; c < j->cols; c++) {
            const float u = fact_update(j, r, c);
            s += (double)u * u;
        }
        j->part[r] = s;
    }
}

static void fact_apply(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const fact_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = 0; c < j->cols; c++)
            j->p[r * j->cols + c] += j->alpha * fact_update(j, r, c);
}

// p, g: (rows, cols), row: (rows), col: (cols); a vector (rows) when cols == 0
void sj_cpu_adafactor(float *p, void *p_act, float *g, int zero_grads, float *row, float *col,
                      int64_t rows, int64_t cols, float lr_mult, float wd, double *sums,
                      const sj_optim_hp *hp) {
    (void)p_act;
    int update;
    const float scale = sj_cpu_clip_scale(hp, &update);
    const int64_t n = cols ? rows * cols : rows;
    if (update) {
        const double step = (double)hp->step, lr = (double)hp->lr * lr_mult;
        const float w = (float)pow(step, (double)hp->beta2_decay);   /* 1 - beta2_t */
        const double rho = fmin(lr, 1.0 / sqrt(step));
        const double alpha = fmax((double)hp->eps2, sqrt(sj_cpu_sumsq(p, n)) / sqrt((double)n)) * rho;
        const float eps1 = hp->eps;
        if (wd != 0.0f) {
            const float decay = (float)(1.0 - lr * wd);
            for (int64_t i = 0; i < n; i++) p[i] *= decay;
        }
        if (cols) {
            double *part = sums + 3;
            fact_job j = { p, g, row, col, rows, cols, scale, w, eps1 * eps1, 0, 0, part };
            sj_parallel_for(rows, 16, fact_rows, &j);
            sj_parallel_for(cols, 64, fact_cols, &j);
            double rs = 0.0;
            for (int64_t r = 0; r < rows; r++) rs += row[r];
            j.row_mean = fmaxf((float)(rs / (double)rows), eps1);
            sj_parallel_for(rows, 16, fact_update_sumsq, &j);
            double us = 0.0;
            for (int64_t r = 0; r < rows; r++) us += part[r];
            const double denom = fmax(1.0, sqrt(us) / (sqrt((double)n) * hp->d));
            j.alpha = (float)(-alpha / denom);
            sj_parallel_for(rows, 16, fact_apply, &j);
        } else {
            double us = 0.0;
            for (int64_t i = 0; i < n; i++) {
                const float gi = g[i] * scale;
                row[i] = lerp_torch(row[i], gi * gi, w);
                const float u = 1.0f / sqrtf(fmaxf(row[i], eps1 * eps1)) * gi;
                us += (double)u * u;
            }
            const float step_size = (float)(-alpha / fmax(1.0, sqrt(us) / (sqrt((double)n) * hp->d)));
            for (int64_t i = 0; i < n; i++) {
                const float gi = g[i] * scale;
                p[i] += step_size * (1.0f / sqrtf(fmaxf(row[i], eps1 * eps1)) * gi);
            }
        }
    }
    if (zero_grads) for (int64_t i = 0; i < n; i++) g[i] = 0.0f;
}

/* ---- Muon's elementwise parts --------------------------------------------- */

typedef struct {
    float *u, *g;
    sj_state buf;
    int64_t n;
    float gs, mom, one_minus_mom;
    int nesterov, update, zero_grads;
    const sj_optim_hp *hp;
} momentum_job;

/* u is written even on a skipped step (the Newton-Schulz GEMMs read it);
 * the buffer only on an update. */
static void momentum_blocks(void *ctx, int64_t c0, int64_t c1, int tid) {
    (void)tid;
    const momentum_job *j = ctx;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t i0 = c * SJ_Q8_BLOCK;
        const int cnt = (int)SJ_MIN(SJ_Q8_BLOCK, j->n - i0);
        float sbuf[SJ_Q8_BLOCK];
        float *s = sj_cpu_state_load(&j->buf, i0, cnt, sbuf);
        for (int k = 0; k < cnt; k++) {
            const int64_t i = i0 + k;
            const float g = j->g[i] * j->gs, b = lerp_torch(s[k], g, j->one_minus_mom);
            j->u[i] = j->nesterov ? lerp_torch(g, b, j->mom) : b;
            if (j->update) s[k] = b;
            if (j->zero_grads) j->g[i] = 0.0f;
        }
        if (j->update) sj_cpu_state_store(&j->buf, i0, cnt, s, j->hp);
    }
}

// u, buf, g: (n)
void sj_cpu_muon_momentum(float *u, sj_state buf, float *g, int zero_grads, int64_t n,
                          const sj_optim_hp *hp) {
    int update;
    const float scale = sj_cpu_clip_scale(hp, &update);
    momentum_job j = { u, g, buf, n, scale, hp->momentum, hp->one_minus_momentum, hp->nesterov,
                       update, zero_grads, hp };
    sj_parallel_for(SJ_CDIV(n, SJ_Q8_BLOCK), 64, momentum_blocks, &j);
}

// x, u: (n); x act dtype (f32 here)
void sj_cpu_muon_normalize(void *x, const float *u, int64_t n, const double *sumsq, float eps) {
    const float d = fmaxf((float)sqrt(*sumsq), eps);
    float *out = x;
    for (int64_t i = 0; i < n; i++) out[i] = u[i] / d;
}

// p, o: (n)
void sj_cpu_muon_apply(float *p, void *p_act, const void *o, int64_t n, float lr_mult,
                       float ratio, float wd, const sj_optim_hp *hp) {
    (void)p_act;
    int update;
    sj_cpu_clip_scale(hp, &update);
    if (!update) return;
    const double lr = (double)hp->lr * lr_mult;
    const float decay = (float)(1.0 - lr * wd), step = (float)(lr * ratio);
    const float *x = o;
    for (int64_t i = 0; i < n; i++) p[i] = p[i] * decay - step * x[i];
}
