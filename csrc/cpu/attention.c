/* attention.c — causal self-attention, MHA and GQA, optionally within a
 * sliding window, forward and backward.
 * Like flash attention, only the log-sum-exp of each score row is kept;
 * backward recomputes the probabilities, so no (T, T) matrix is stored.
 * qkv rows are [q heads (H) | k heads (KV) | v heads (KV)], head size hd.
 * Query t sees keys first_key(t, window)..t: work is O(T * window). */
#include "cpu.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *out, *lse, *dqkv; const float *qkv, *dout, *o;
    int B, T, H, KV, hd, window, accum;
} attn_job;

/* The first key query t sees: t - window + 1 (window 0: every earlier key). */
static inline int first_key(int t, int window) {
    return window > 0 && t >= window ? t - window + 1 : 0;
}

/* One task = one query row (b, h, t). */
static void fwd_rows(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const attn_job *j = ctx;
    const int T = j->T, H = j->H, hd = j->hd, rs = (H + 2 * j->KV) * hd, grp = H / j->KV;
    const float scale = 1.0f / sqrtf((float)hd);
    float sc[j->window > 0 && j->window < T ? j->window : T];   /* scores of keys s0..t */
    for (int64_t i = i0; i < i1; i++) {
        int t = (int)(i % T), h = (int)((i / T) % H), b = (int)(i / ((int64_t)T * H));
        const int s0 = first_key(t, j->window), n = t - s0 + 1;
        const float *base = j->qkv + (int64_t)b * T * rs;
        const float *q = base + (int64_t)t * rs + h * hd;
        const float *k0 = base + (int64_t)s0 * rs + (H + h / grp) * hd;
        const float *v0 = base + (int64_t)s0 * rs + (H + j->KV + h / grp) * hd;
        float m = -INFINITY;
        for (int s = 0; s < n; s++) {
            sc[s] = scale * sj_dot(q, k0 + (int64_t)s * rs, hd);
            m = sc[s] > m ? sc[s] : m;
        }
        float sum = 0.f;
        for (int s = 0; s < n; s++) { sc[s] = expf(sc[s] - m); sum += sc[s]; }
        float *o = j->out + ((int64_t)b * T + t) * H * hd + h * hd;
        memset(o, 0, sizeof(float) * hd);
        float inv = 1.0f / sum;
        for (int s = 0; s < n; s++) sj_axpy(o, sc[s] * inv, v0 + (int64_t)s * rs, hd);
        j->lse[((int64_t)b * H + h) * T + t] = m + logf(sum);
    }
}

// out: (B, T, H*hd); lse: (B, H, T); qkv: (B, T, (H+2KV)*hd)
void sj_cpu_attention_forward(void *out, float *lse, const void *qkv,
                              int B, int T, int H, int KV, int hd, int window) {
    attn_job j = { out, lse, NULL, qkv, NULL, NULL, B, T, H, KV, hd, window, 0 };
    sj_parallel_for((int64_t)B * H * T, 16, fwd_rows, &j);
}

/* One task = one (b, kv head): it owns dk and dv of that head and dq of
 * every query head that shares it, so no two threads write one element. */
static void bwd_groups(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const attn_job *j = ctx;
    const int T = j->T, H = j->H, KV = j->KV, hd = j->hd, rs = (H + 2 * KV) * hd, grp = H / KV;
    const float scale = 1.0f / sqrtf((float)hd);
    float dq[hd];
    for (int64_t i = i0; i < i1; i++) {
        int g = (int)(i % KV), b = (int)(i / KV);
        const float *base = j->qkv + (int64_t)b * T * rs;
        float *dbase = j->dqkv + (int64_t)b * T * rs;
        const float *k0 = base + (H + g) * hd, *v0 = base + (H + KV + g) * hd;
        float *dk0 = dbase + (H + g) * hd, *dv0 = dbase + (H + KV + g) * hd;
        if (!j->accum)
            for (int s = 0; s < T; s++) {
                memset(dk0 + (int64_t)s * rs, 0, sizeof(float) * hd);
                memset(dv0 + (int64_t)s * rs, 0, sizeof(float) * hd);
            }
        for (int h = g * grp; h < (g + 1) * grp; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = base + (int64_t)t * rs + h * hd;
                const float *go = j->dout + ((int64_t)b * T + t) * H * hd + h * hd;
                const float *o = j->o + ((int64_t)b * T + t) * H * hd + h * hd;
                float lse = j->lse[((int64_t)b * H + h) * T + t], D = sj_dot(go, o, hd);
                memset(dq, 0, sizeof dq);
                for (int s = first_key(t, j->window); s <= t; s++) {
                    const float *k = k0 + (int64_t)s * rs, *v = v0 + (int64_t)s * rs;
                    float pr = expf(scale * sj_dot(q, k, hd) - lse);
                    float ds = pr * (sj_dot(go, v, hd) - D) * scale;
                    sj_axpy(dq, ds, k, hd);
                    sj_axpy(dk0 + (int64_t)s * rs, ds, q, hd);
                    sj_axpy(dv0 + (int64_t)s * rs, pr, go, hd);
                }
                float *dqd = dbase + (int64_t)t * rs + h * hd;
                for (int d = 0; d < hd; d++) dqd[d] = j->accum ? dqd[d] + dq[d] : dq[d];
            }
        }
    }
}

// dqkv: (B, T, (H+2KV)*hd) (+)=; dout, out: (B, T, H*hd); lse: (B, H, T)
void sj_cpu_attention_backward(void *dqkv, const void *dout, const void *qkv,
                               const void *out, const float *lse,
                               int B, int T, int H, int KV, int hd, int window, int accum) {
    attn_job j = { NULL, (float *)lse, dqkv, qkv, dout, out, B, T, H, KV, hd, window, accum };
    sj_parallel_for((int64_t)B * KV, 1, bwd_groups, &j);
}
