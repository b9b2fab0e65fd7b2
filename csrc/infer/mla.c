/* mla.c — generation through an mla layer (multi-head latent attention,
 * model/mla.c is its definition). The cache holds, per position, only the
 * normed latent ckv (kv_lora_rank) and the turned shared key k_pe
 * (qk_rope_head_dim): never per-head keys or values. Attention runs with the
 * absorbed matrices: kv_b's rows split per head into W_uk (nope, kvr) and
 * W_uv (v, kvr), and
 *   q_nope . k_nope = q_nope . (W_uk ckv) = (W_uk^T q_nope) . ckv
 *   out_h = sum_t p_t W_uv ckv_t = W_uv (sum_t p_t ckv_t),
 * so each head's query becomes (W_uk^T q_nope, rot(q_pe)), scored against
 * the cache rows (ckv, rot(k_pe)) as they are, and the softmax-weighted row
 * sum goes through W_uv once. Compiled once per ISA level with forward.c. It
 * must never allocate per token nor read past the cache. */
#include "infer_cpu.h"
#include <string.h>

static void matmul(sj_infer_cpu *h, float *out, const sj_qmat *W, const float *x, int n) {
    if (W->type == SJ_W_Q8 || W->type == SJ_W_Q4) sj_qact_quantize(&h->qa, x, n, W->cols);
    sj_qmat_mul(out, W, x, &h->qa, n);
}

/* The first C values of n rows ld apart, RMS-normed in place with gains w. */
static void rmsnorm_rows(float *x, int n, int C, int64_t ld, const float *w) {
    for (int t = 0; t < n; t++) {
        float *r = x + t * ld, ss = 0.f;
        for (int c = 0; c < C; c++) ss += r[c] * r[c];
        const float rs = 1.0f / sqrtf(ss / C + SJ_MLA_NORM_EPS);
        for (int c = 0; c < C; c++) r[c] = r[c] * rs * w[c];
    }
}

/* x (dr) turned for position pos, as the training kernels turn it. */
static void rope(const sj_rope *r, float *x, int pos) {
    float cs[SJ_ROPE_MAX_PAIRS], sn[SJ_ROPE_MAX_PAIRS];
    sj_rope_angles(r, pos, 0, r->n_pairs, cs, sn);
    sj_rope_turn(x, x, cs, sn, r->n_pairs, 0);
}

typedef struct { sj_infer_cpu *h; int l, n, pos; } mla_job;

/* One task = one token's head: its absorbed query, attention over the
 * cache rows 0 .. its position, W_uv of the weighted latent. */
static void head_rows(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const mla_job *j = ctx;
    sj_infer_cpu *h = j->h;
    const layer_w *w = &h->L[j->l];
    const sj_mla *a = &h->c.mla;
    const int H = h->c.n_heads, dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim,
              dv = a->v_head_dim, kvr = a->kv_lora_rank, R = kvr + dr;
    const float scale = 1.0f / sqrtf((float)(dn + dr));
    float sc[j->pos + j->n];
    for (int64_t i = i0; i < i1; i++) {
        const int t = (int)(i / H), hh = (int)(i % H);
        const float *q = h->mq + ((int64_t)t * H + hh) * (dn + dr);
        const float *kvb = w->kv_b + (int64_t)hh * (dn + dv) * kvr;   /* W_uk rows, then W_uv */
        float *qabs = h->mqabs + ((int64_t)t * H + hh) * 2 * R, *olat = qabs + R;
        memset(qabs, 0, sizeof(float) * kvr);
        for (int d = 0; d < dn; d++)
            for (int c = 0; c < kvr; c++) qabs[c] += q[d] * kvb[(int64_t)d * kvr + c];
        memcpy(qabs + kvr, q + dn, sizeof(float) * dr);
        rope(&h->rope_mla, qabs + kvr, j->pos + t);
        /* one "KV head" of row size R whose values are the rows themselves:
         * the output's first kvr values are the weighted latent */
        const float *rows = h->lcache + w->lat_at;
        const sj_kv_span sp = { rows, rows, j->pos + t + 1 };
        sj_attn_group(olat, qabs, &sp, 1, 0, 1, R, R, scale, sc);
        float *out = h->att + ((int64_t)t * H + hh) * dv;
        for (int e = 0; e < dv; e++) {
            const float *wv = kvb + (int64_t)(dn + e) * kvr;
            float s = 0.f;
            for (int c = 0; c < kvr; c++) s += wv[c] * olat[c];
            out[e] = s;
        }
    }
}

void sj_infer_mla_mixer(sj_infer_cpu *h, int l, int n, int pos) {
    const layer_w *w = &h->L[l];
    const sj_mla *a = &h->c.mla;
    const int kvr = a->kv_lora_rank, R = kvr + a->qk_rope_head_dim;
    if (a->q_lora_rank) {
        matmul(h, h->mqa, &w->q_a, h->xb, n);
        rmsnorm_rows(h->mqa, n, a->q_lora_rank, a->q_lora_rank, w->q_a_norm);
        matmul(h, h->mq, &w->wq, h->mqa, n);
    } else {
        matmul(h, h->mq, &w->wq, h->xb, n);
    }
    /* the chunk's latents and shared keys straight into their cache rows,
     * before attention: each token reads its own and the earlier ones */
    float *rows = h->lcache + w->lat_at + (int64_t)pos * R;
    matmul(h, rows, &w->kv_a, h->xb, n);
    rmsnorm_rows(rows, n, kvr, R, w->kv_a_norm);
    for (int t = 0; t < n; t++) rope(&h->rope_mla, rows + (int64_t)t * R + kvr, pos + t);
    mla_job j = { h, l, n, pos };
    const int64_t tasks = (int64_t)n * h->c.n_heads;
    if (tasks < 4) head_rows(&j, 0, tasks, 0);
    else sj_parallel_for(tasks, 1, head_rows, &j);
}
