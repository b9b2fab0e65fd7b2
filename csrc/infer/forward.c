/* forward.c — the CPU inference engine's forward pass: prefill and decode
 * (engine.h's verbs) over the state infer.c built. Compiled once per ISA
 * level (core/isa.h); infer.c's table calls the active level's copy.
 * Semantics follow the training model exactly (see infer.c). It must never
 * allocate per token nor read past the KV cache. */
#include "infer_cpu.h"
#include <math.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* f32 -> f16 rounded to nearest even, as ggml's f16 cache (F16C does the same). */
static void to_f16(uint16_t *out, const float *x, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) out[i] = sj_f32_to_f16(x[i]);
}

static const sj_qmat *out_head(const sj_infer_cpu *h) { return h->output.mem ? &h->output : &h->tok_emb; }

/* ---- forward ------------------------------------------------------------------- */

typedef struct { float *out; const float *x, *w; int C; float eps; } norm_job;
static void norm_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const norm_job *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->C;
        float *y = j->out + r * j->C, ss = 0.f;
#pragma omp simd reduction(+:ss)
        for (int c = 0; c < j->C; c++) ss += x[c] * x[c];
        float rs = 1.0f / sqrtf(ss / j->C + j->eps);
        if (j->w) for (int c = 0; c < j->C; c++) y[c] = x[c] * rs * j->w[c];
        else for (int c = 0; c < j->C; c++) y[c] = x[c] * rs;
    }
}
/* out (n, C) = RMSNorm of each row of x, times the gains w (NULL: none); in place is fine. */
static void rmsnorm(float *out, const float *x, const float *w, int n, int C, float eps) {
    norm_job j = { out, x, w, C, eps };
    if (n < 8) norm_rows(&j, 0, n, 0);
    else sj_parallel_for(n, 4, norm_rows, &j);
}

/* x (n, n_heads, hd) turned by the angles of positions pos .. pos + n - 1. */
static void rope(const sj_infer_cpu *h, float *x, int n, int n_heads, int pos) {
    const int half = h->hd / 2;
    for (int t = 0; t < n; t++) {
        const float *cs = h->rope_cos + (int64_t)(pos + t) * half, *sn = h->rope_sin + (int64_t)(pos + t) * half;
        for (int hh = 0; hh < n_heads; hh++) {
            float *v = x + ((int64_t)t * n_heads + hh) * h->hd;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
}

/* paired_heads: x (n, 2 m, hd) -> (n, m, hd), head j the mean of heads 2j
 * and 2j + 1. In place: each output row lies at or before its inputs. */
static void pair_heads(float *x, int n, int m, int hd) {
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < m; j++) {
            const float *a = x + (t * 2 * m + 2 * j) * hd, *b = a + hd;
            float *o = x + (t * m + j) * hd;
            for (int e = 0; e < hd; e++) o[e] = (a[e] + b[e]) / 2;
        }
}

typedef struct {
    sj_infer_cpu *h;
    int layer, n, pos0, sub, tiles;
    const char *fresh_k, *fresh_v;   /* windowed layers: the chunk's k/v rows, in the cache's element type */
} attn_job;

/* Token t's keys as spans of rows in position order, for the KV head at
 * element offset kvh of a row. Whole context: cache rows 0 .. pos. Window:
 * positions max(0, pos - window + 1) .. pos; those before the chunk from
 * the ring (one run, or two where it wraps), the chunk's own from its
 * fresh rows (the ring gets them after the chunk's attention: they would
 * overwrite rows earlier tokens of the chunk still read). */
static int key_spans(const attn_job *j, int t, int64_t kvh, sj_kv_span *sp) {
    const sj_infer_cpu *h = j->h;
    const layer_w *w = &h->L[j->layer];
    const int64_t es = h->kv_f16 ? 2 : 4, ld = (int64_t)h->kv_dim * es;
    const char *kc = (const char *)h->kcache + (w->kv_at + kvh) * es, *vc = (const char *)h->vcache + (w->kv_at + kvh) * es;
    const int pos = j->pos0 + t;
    if (!w->window) {
        sp[0] = (sj_kv_span){ kc, vc, pos + 1 };
        return 1;
    }
    const int W = w->window, lo = SJ_MAX(0, pos - W + 1);
    int nsp = 0;
    if (lo < j->pos0) {
        const int at = lo % W, m = j->pos0 - lo, run = SJ_MIN(m, W - at);
        sp[nsp++] = (sj_kv_span){ kc + at * ld, vc + at * ld, run };
        if (m > run) sp[nsp++] = (sj_kv_span){ kc, vc, m - run };
    }
    const int f0 = SJ_MAX(lo, j->pos0) - j->pos0;
    sp[nsp++] = (sj_kv_span){ j->fresh_k + f0 * ld + kvh * es, j->fresh_v + f0 * ld + kvh * es, t - f0 + 1 };
    return nsp;
}

/* One task = one token's `sub` query heads of one KV head (sj_attn_group
 * reads each K/V row once for them), or with tiles ATTN_TQ consecutive
 * tokens of one query head (whole-context layers only). */
static void attn_rows(void *ctx, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    const attn_job *j = ctx;
    sj_infer_cpu *h = j->h;
    const int H = h->n_att, hd = h->hd, KVd = h->kv_dim, grp = H / (KVd / hd), per = H / j->sub;
    const float scale = 1.0f / sqrtf((float)hd);
    float sc[(j->tiles ? SJ_ATTN_TQ : j->sub) * (j->pos0 + j->n)];
    if (j->tiles) {
        const int es = h->kv_f16 ? 2 : 4;
        const char *kc = (const char *)h->kcache + h->L[j->layer].kv_at * es;
        const char *vc = (const char *)h->vcache + h->L[j->layer].kv_at * es;
        for (int64_t i = i0; i < i1; i++) {
            int t0 = (int)(i / H) * SJ_ATTN_TQ, hh = (int)(i % H), nt = SJ_MIN(SJ_ATTN_TQ, j->n - t0);
            int64_t at = (int64_t)t0 * H * hd + hh * hd;
            sj_attn_tile(h->att + at, h->q + at, H * hd, kc + (int64_t)(hh / grp) * hd * es,
                         vc + (int64_t)(hh / grp) * hd * es, h->kv_f16, j->pos0 + t0 + 1, nt, hd, KVd, scale, sc);
        }
        return;
    }
    for (int64_t i = i0; i < i1; i++) {
        int t = (int)(i / per), h0 = (int)(i % per) * j->sub;
        int64_t at = (int64_t)t * H * hd + h0 * hd;
        sj_kv_span sp[3];
        const int nsp = key_spans(j, t, (int64_t)(h0 / grp) * hd, sp);
        sj_attn_group(h->att + at, h->q + at, sp, nsp, h->kv_f16, j->sub, hd, KVd, scale, sc);
    }
}

/* The chunk's n rows of k and v (n, kv_dim), at positions pos .., into
 * layer l's cache, and their attention into h->att (n, n_att * hd). */
static void attention(sj_infer_cpu *h, int l, int n, int pos) {
    const layer_w *w = &h->L[l];
    const int KVd = h->kv_dim, H = h->n_att, grp = H / (KVd / h->hd), es = h->kv_f16 ? 2 : 4;
    char *kc = (char *)h->kcache + w->kv_at * es, *vc = (char *)h->vcache + w->kv_at * es;
    attn_job aj = { h, l, n, pos, 1, 0, NULL, NULL };
    if (!w->window) {   /* rows pos .. pos + n - 1 first: the chunk's tokens read them */
        const int64_t at = (int64_t)pos * KVd * es;
        if (h->kv_f16) {   /* rounded to nearest even, as ggml's f16 cache */
            to_f16((uint16_t *)(kc + at), h->k, (int64_t)n * KVd);
            to_f16((uint16_t *)(vc + at), h->v, (int64_t)n * KVd);
        } else {
            memcpy(kc + at, h->k, sizeof(float) * n * KVd);
            memcpy(vc + at, h->v, sizeof(float) * n * KVd);
        }
    } else if (h->kv_f16) {   /* the fresh rows as the cache will hold them */
        to_f16(h->k16, h->k, (int64_t)n * KVd);
        to_f16(h->v16, h->v, (int64_t)n * KVd);
        aj.fresh_k = (const char *)h->k16; aj.fresh_v = (const char *)h->v16;
    } else {
        aj.fresh_k = (const char *)h->k; aj.fresh_v = (const char *)h->v;
    }
    /* whole GQA groups per task (f32 cache), unless that leaves threads idle
     * (decode on several threads) or its scores would not fit the stack */
    const int P = sj_parallel_threads(), KV = KVd / h->hd;
    aj.sub = (P == 1 || n * KV >= 4 * P) && grp * (pos + n) <= (1 << 16) ? grp : 1;
    /* prefill: tiles of tokens per head where the tile kernel is the fast one */
    aj.tiles = !w->window && n >= SJ_ATTN_TQ && sj_attn_tile_fast(h->hd) && SJ_ATTN_TQ * (pos + n) <= (1 << 16);
    const int64_t tasks = aj.tiles ? SJ_CDIV(n, SJ_ATTN_TQ) * H : (int64_t)n * (H / aj.sub);
    if (tasks < 4) attn_rows(&aj, 0, tasks, 0);
    else sj_parallel_for(tasks, 1, attn_rows, &aj);
    if (w->window)   /* the ring keeps the chunk's last `window` rows: position p at row p % window */
        for (int t = SJ_MAX(0, n - w->window); t < n; t++) {
            const int64_t row = (int64_t)((pos + t) % w->window) * KVd * es, src = (int64_t)t * KVd * es;
            memcpy(kc + row, aj.fresh_k + src, (size_t)KVd * es);
            memcpy(vc + row, aj.fresh_v + src, (size_t)KVd * es);
        }
}

/* g (n) = silu(g) * u: exp512 where there is AVX-512 (a scalar expf call per
 * element was ~1.5% of prefill), expf elsewhere and in the tail. */
static void swiglu(float *restrict g, const float *restrict u, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* g (n) = relu(g)^2 * u. */
static void relu2(float *restrict g, const float *restrict u, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const float r = g[i] > 0.f ? g[i] : 0.f;
        g[i] = r * r * u[i];
    }
}

/* x (n) += a * y: the residual adds (restrict: the compiler need not check overlap). */
static void add_to(float *restrict x, float a, const float *restrict y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += a * y[i];
}

static void matmul(sj_infer_cpu *h, float *out, const sj_qmat *W, const float *x, int n, int quantize) {
    if ((W->type == SJ_W_Q8 || W->type == SJ_W_Q4) && quantize) sj_qact_quantize(&h->qa, x, n, W->cols);
    sj_qmat_mul(out, W, x, &h->qa, n);
}

/* Layer l's attention for the chunk (its input normed in h->xb), added into h->x. */
static void attention_mixer(sj_infer_cpu *h, int l, int n, int pos) {
    const sj_config *c = &h->c;
    const int C = c->dim, H = c->n_heads, KV = c->n_kv_heads, hd = h->hd, KVd = h->kv_dim;
    layer_w *w = &h->L[l];
    {   /* q, k, v: one quantised input, one parallel loop */
        float *outs[3] = { h->q, h->k, h->v };
        const sj_qmat *Ws[3] = { &w->wq, &w->wk, &w->wv };
        if (w->wq.type == SJ_W_Q8 || w->wq.type == SJ_W_Q4) sj_qact_quantize(&h->qa, h->xb, n, C);
        sj_qmat_mul_multi(3, outs, Ws, h->xb, &h->qa, n);
    }
    if (c->paired_heads) {
        pair_heads(h->q, n, H / 2, hd);
        pair_heads(h->k, n, KV / 2, hd);
        pair_heads(h->v, n, KV / 2, hd);
    }
    if (c->layers[l].qk_norm != SJ_QK_NORM_NONE) {   /* per head, before RoPE; gains NULL when plain */
        rmsnorm(h->q, h->q, w->q_norm, n * h->n_att, hd, c->norm_eps);
        rmsnorm(h->k, h->k, w->k_norm, n * (KVd / hd), hd, c->norm_eps);
    }
    rope(h, h->q, n, h->n_att, pos);
    rope(h, h->k, n, KVd / hd, pos);
    if (h->v0 && l == 0) memcpy(h->v0, h->v, sizeof(float) * n * KVd);
    else if (h->v0) {   /* value_mix: v = (1 - a) v + a v of layer 0 */
        const float a = c->value_mix, keep = 1.0f - a;
        for (int64_t i = 0; i < (int64_t)n * KVd; i++) h->v[i] = keep * h->v[i] + a * h->v0[i];
    }
    attention(h, l, n, pos);
    matmul(h, h->xb, &w->wo, h->att, n, 1);
    add_to(h->x, 1.0f, h->xb, (int64_t)n * C);
}

/* n (<= CHUNK) tokens at positions pos .. pos+n-1 through the layers; the
 * final-normed hidden states are left in h->xb. */
static void forward_chunk(sj_infer_cpu *h, const int32_t *tok, int n, int pos) {
    const sj_config *c = &h->c;
    const int C = c->dim;
    float rowbuf[C];
    for (int t = 0; t < n; t++) {
        if (h->tok_emb.type == SJ_W_F32) memcpy(h->x + (int64_t)t * C, h->tok_emb.f + (int64_t)tok[t] * C, sizeof(float) * C);
        else { sj_qmat_get_row(&h->tok_emb, tok[t], rowbuf); memcpy(h->x + (int64_t)t * C, rowbuf, sizeof(float) * C); }
    }
    if (h->emb) memcpy(h->emb, h->x, sizeof(float) * n * C);
    for (int l = 0; l < c->n_layers; l++) {
        layer_w *w = &h->L[l];
        if (l > 0 && h->emb) add_to(h->x, c->embed_skip, h->emb, (int64_t)n * C);
        rmsnorm(h->xb, h->x, w->attn_norm, n, C, c->norm_eps);
        if (c->layers[l].mixer == SJ_MIXER_MAMBA2) {
            matmul(h, h->zx, &w->in_proj, h->xb, n, 1);
            sj_infer_mamba2_mix(h, l, n);
            matmul(h, h->xb, &w->out_proj, h->ssm_y, n, 1);
            add_to(h->x, 1.0f, h->xb, (int64_t)n * C);
        } else if (c->layers[l].mixer == SJ_MIXER_LINEAR) {
            float *outs[4] = { h->q, h->lin_k, h->lin_v, h->lin_g };
            const sj_qmat *Ws[4] = { &w->wq, &w->wk, &w->wv, &w->wg };
            if (w->wq.type == SJ_W_Q8 || w->wq.type == SJ_W_Q4) sj_qact_quantize(&h->qa, h->xb, n, C);
            sj_qmat_mul_multi(w->wg.mem ? 4 : 3, outs, Ws, h->xb, &h->qa, n);
            sj_infer_linear_mix(h, l, n);
            matmul(h, h->xb, &w->wo, h->att, n, 1);
            add_to(h->x, 1.0f, h->xb, (int64_t)n * C);
        } else if (w->mla) {
            sj_infer_mla_mixer(h, l, n, pos);
            matmul(h, h->xb, &w->wo, h->att, n, 1);
            add_to(h->x, 1.0f, h->xb, (int64_t)n * C);
        } else {
            attention_mixer(h, l, n, pos);
        }
        if (c->layers[l].ffn == SJ_FFN_NONE) continue;
        rmsnorm(h->xb, h->x, w->ffn_norm, n, C, c->norm_eps);
        if (w->experts) sj_infer_moe_ffn(h, w, h->x, h->xb, n);   /* routed; then any shared */
        if (!w->w_gate.mem) continue;
        const int F = w->w_gate.rows;
        {
            float *outs[2] = { h->hb, h->hb2 };
            const sj_qmat *Ws[2] = { &w->w_gate, &w->w_up };
            if (w->w_gate.type == SJ_W_Q8 || w->w_gate.type == SJ_W_Q4) sj_qact_quantize(&h->qa, h->xb, n, C);
            sj_qmat_mul_multi(2, outs, Ws, h->xb, &h->qa, n);
        }
        if (c->layers[l].ffn == SJ_FFN_RELU2) relu2(h->hb, h->hb2, (int64_t)n * F);
        else swiglu(h->hb, h->hb2, (int64_t)n * F);
        matmul(h, h->xb, &w->w_down, h->hb, n, 1);
        add_to(h->x, 1.0f, h->xb, (int64_t)n * C);
    }
    rmsnorm(h->xb, h->x, h->norms + (int64_t)2 * c->n_layers * C, n, C, c->norm_eps);
}

/* ---- the verbs ------------------------------------------------------------------ */

sj_status sj_infer_cpu_prefill(void *e, int pos, const int32_t *tokens, int n, float *logits_all) {
    sj_infer_cpu *h = e;
    const int V = h->c.vocab_size;
    for (int i = 0; i < n; i += CHUNK) {
        if (sj_interrupted()) return SJ_ERR_INTERRUPTED;
        int m = SJ_MIN(CHUNK, n - i);
        forward_chunk(h, tokens + i, m, pos + i);
        if (logits_all) {
            matmul(h, logits_all + (int64_t)i * V, out_head(h), h->xb, m, 1);
        }
        if (i + m == n) {
            if (logits_all) memcpy(h->logits, logits_all + (int64_t)(n - 1) * V, sizeof(float) * V);
            else matmul(h, h->logits, out_head(h), h->xb + (int64_t)(m - 1) * h->c.dim, 1, 1);
        }
    }
    return SJ_OK;
}

/* Greedy chains choose on the host: sj_argmax, the sampler's own greedy rule. */
sj_status sj_infer_cpu_decode(void *e, int pos, int32_t token, int n, int32_t *next) {
    sj_infer_cpu *h = e;
    for (int i = 0; i < n; i++) {
        SJ_TRY(sj_infer_cpu_prefill(h, pos + i, &token, 1, NULL));
        if (next) token = next[i] = sj_argmax(h->logits, h->c.vocab_size);
    }
    return SJ_OK;
}
