/* sample.c — choosing the next token from a row of logits: repetition
 * penalty (once per distinct token of the history), temperature, top-k,
 * top-p (nucleus), greedy, all seeded through our xoshiro RNG so the same
 * seed gives the same tokens. Scratch is allocated once per sampler; no
 * full sort of the vocabulary on the hot path (top-k selects, top-p sorts
 * only the candidates that can matter). */
#include "infer.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct { float v; int32_t id; } cand;

struct sj_sampler {
    int V;
    sj_rng rng;
    cand *c;
    float *z;
    uint8_t *seen;
};

sj_status sj_sampler_create(int vocab_size, uint64_t seed, sj_sampler **out) {
    *out = NULL;
    if (vocab_size <= 0) return sj_fail(SJ_ERR_ARG, "sampler: vocab_size %d", vocab_size);
    sj_sampler *s = calloc(1, sizeof *s);
    if (!s) return sj_fail(SJ_ERR_NOMEM, "sampler: out of memory");
    s->V = vocab_size;
    s->c = malloc(sizeof(cand) * (size_t)vocab_size);
    s->z = malloc(sizeof(float) * (size_t)vocab_size);
    s->seen = calloc((size_t)vocab_size, 1);
    if (!s->c || !s->z || !s->seen) { sj_sampler_free(s); return sj_fail(SJ_ERR_NOMEM, "sampler: out of memory"); }
    sj_rng_seed(&s->rng, seed);
    *out = s;
    return SJ_OK;
}

void sj_sampler_free(sj_sampler *s) {
    if (!s) return;
    free(s->c); free(s->z); free(s->seen); free(s);
}

/* Descending value, then ascending id: a total order, so results never
 * depend on the sort algorithm. */
static int cmp_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}
static inline int before(const cand *x, const cand *y) { return x->v > y->v || (x->v == y->v && x->id < y->id); }

/* Quickselect: the k first (in cmp_desc order) end up in c[0..k). */
static void select_top(cand *c, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        cand piv = c[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (before(&c[i], &piv)) i++;
            while (before(&piv, &c[j])) j--;
            if (i <= j) { cand t = c[i]; c[i] = c[j]; c[j] = t; i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* The one greedy rule of the host side: decode chains (infer.c) and
 * temperature 0 here. The GPU's argmax (cuda/decode.cu) keeps the same ties. */
int32_t sj_argmax(const float *logits, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    return best;
}

/* The candidates sj_sample draws from: c[0..*n) with their probabilities
 * (summing to *mass: top-p keeps part of the unit mass), or at temperature
 * <= 0 *n = 0 and the greedy choice in *greedy. */
static sj_status candidates(sj_sampler *s, const float *logits, const sj_sample_params *p,
                            const int32_t *history, int n_history, int *n_out, double *mass_out,
                            int32_t *greedy) {
    const int V = s->V;
    float *z = s->z;
    memcpy(z, logits, sizeof(float) * V);
    if (p->repetition_penalty <= 0.f) return sj_fail(SJ_ERR_ARG, "repetition_penalty must be > 0, got %g", p->repetition_penalty);
    if (p->repetition_penalty != 1.f && n_history > 0) {
        for (int i = 0; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= V || s->seen[t]) continue;
            s->seen[t] = 1;
            z[t] = z[t] > 0 ? z[t] / p->repetition_penalty : z[t] * p->repetition_penalty;
        }
        for (int i = 0; i < n_history; i++) if (history[i] >= 0 && history[i] < V) s->seen[history[i]] = 0;
    }
    if (p->temperature <= 0.f) {
        *n_out = 0;
        *greedy = sj_argmax(z, V);
        return SJ_OK;
    }
    cand *c = s->c;
    int n = V;
    for (int i = 0; i < V; i++) { c[i].v = z[i] / p->temperature; c[i].id = i; }
    if (p->top_k > 0 && p->top_k < n) { select_top(c, n, p->top_k); n = p->top_k; }
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = fmaxf(m, c[i].v);
    double sum = 0.0;
    for (int i = 0; i < n; i++) { c[i].v = expf(c[i].v - m); sum += c[i].v; }
    for (int i = 0; i < n; i++) c[i].v = (float)(c[i].v / sum);
    double mass = 1.0;
    if (p->top_p > 0.f && p->top_p < 1.f) {
        /* Only candidates above (1 - top_p) / (n - 1) can be in the nucleus (llama2.c). */
        const float cut = n > 1 ? (1.0f - p->top_p) / (float)(n - 1) : 0.f;
        int k = 0;
        for (int i = 0; i < n; i++) if (c[i].v >= cut) c[k++] = c[i];
        qsort(c, (size_t)k, sizeof(cand), cmp_desc);
        double cum = 0.0;
        int last = k - 1;
        for (int i = 0; i < k; i++) { cum += c[i].v; if (cum >= p->top_p) { last = i; break; } }
        n = last + 1;
        mass = 0.0;
        for (int i = 0; i < n; i++) mass += c[i].v;
    } else if (n < V) {
        qsort(c, (size_t)n, sizeof(cand), cmp_desc);   /* top-k: a canonical order of the k */
    }
    *n_out = n;
    *mass_out = mass;
    return SJ_OK;
}

sj_status sj_sample(sj_sampler *s, const float *logits, const sj_sample_params *p,
                    const int32_t *history, int n_history, int32_t *token) {
    int n;
    double mass;
    SJ_TRY(candidates(s, logits, p, history, n_history, &n, &mass, token));
    if (!n) return SJ_OK;
    const cand *c = s->c;
    double r = (double)sj_rng_uniform(&s->rng) * mass, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += c[i].v;
        if (r < acc) { *token = c[i].id; return SJ_OK; }
    }
    *token = c[n - 1].id;
    return SJ_OK;
}

sj_status sj_sample_probs(sj_sampler *s, const float *logits, const sj_sample_params *p,
                          const int32_t *history, int n_history, float *probs) {
    int n;
    double mass;
    int32_t greedy;
    SJ_TRY(candidates(s, logits, p, history, n_history, &n, &mass, &greedy));
    memset(probs, 0, sizeof(float) * (size_t)s->V);
    if (!n) { probs[greedy] = 1.f; return SJ_OK; }
    for (int i = 0; i < n; i++) probs[s->c[i].id] = (float)(s->c[i].v / mass);
    return SJ_OK;
}

double sj_sampler_uniform(sj_sampler *s) { return sj_rng_uniform(&s->rng); }

int sj_sampler_vocab(const sj_sampler *s) { return s->V; }
