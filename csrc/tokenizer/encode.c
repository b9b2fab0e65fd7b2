/* encode.c — text -> ids. Special tokens are cut out first (per-call
 * modes), the rest is split by the GPT-2 pre-tokeniser, and each pre-token
 * is merged by rank (lowest rank first, leftmost on ties: the rule of GPT-2's
 * encoder.py, tiktoken and HF) or taken from a per-call-borrowed cache.
 * Must never read past a text or write past len ids. */
#include "tok.h"
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#define NO_RANK INT32_MAX

static inline int32_t rank_of(const sj_tokenizer *t, int32_t a, int32_t b) {
    int32_t r = sj_tok_pairmap_get(&t->ranks, sj_tok_pairkey(a, b));
    return r < 0 ? NO_RANK : r;
}

/* Short pre-tokens: ranks of adjacent pairs in an array, the minimum found
 * by a scan; O(n^2) in the worst case, fastest for the usual n < 20. */
static size_t bpe_small(const sj_tokenizer *t, int32_t *sym, size_t m) {
    int32_t rank[128];
    for (size_t i = 0; i + 1 < m; i++) rank[i] = rank_of(t, sym[i], sym[i + 1]);
    while (m > 1) {
        int32_t best = NO_RANK;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rank[i] < best) { best = rank[i]; bi = i; }
        if (best == NO_RANK) break;
        sym[bi] = t->merges[3 * (size_t)best + 2];
        memmove(sym + bi + 1, sym + bi + 2, (m - bi - 2) * sizeof *sym);
        if (bi + 3 < m) memmove(rank + bi + 1, rank + bi + 2, (m - bi - 3) * sizeof *rank);
        m--;
        if (bi + 1 < m) rank[bi] = rank_of(t, sym[bi], sym[bi + 1]);
        if (bi > 0) rank[bi - 1] = rank_of(t, sym[bi - 1], sym[bi]);
    }
    return m;
}

/* Long pre-tokens (a megabyte of letters is one pre-token): a linked list
 * and a min-heap of (rank, position), stale entries skipped; O(n log n). */
static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (v <= h[c]) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

static size_t bpe_large(const sj_tokenizer *t, int32_t *sym, size_t m) {
    int64_t *next = malloc(m * sizeof *next);
    int32_t *cur = malloc(m * sizeof *cur);       /* rank of (i, next[i]) */
    int64_t *prev = malloc(m * sizeof *prev);
    uint64_t *heap = malloc(4 * m * sizeof *heap);  /* <= m initial + 2 per merge */
    if (!next || !cur || !prev || !heap) {
        free(next); free(cur); free(prev); free(heap);
        return bpe_small(t, sym, m);   /* cannot happen for sane sizes; still correct */
    }
    size_t hn = 0;
    for (size_t i = 0; i < m; i++) {
        next[i] = i + 1 < m ? (int64_t)i + 1 : -1;
        prev[i] = (int64_t)i - 1;
        cur[i] = i + 1 < m ? rank_of(t, sym[i], sym[i + 1]) : NO_RANK;
        if (cur[i] != NO_RANK) heap_push(heap, &hn, ((uint64_t)cur[i] << 32) | i);
    }
    while (hn) {
        uint64_t e = heap_pop(heap, &hn);
        size_t i = (size_t)(e & 0xffffffffu);
        int32_t r = (int32_t)(e >> 32);
        if (cur[i] != r || next[i] < 0) continue;   /* stale */
        size_t j = (size_t)next[i];
        sym[i] = t->merges[3 * (size_t)r + 2];
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = (int64_t)i;
        cur[j] = NO_RANK;
        next[j] = -1;
        cur[i] = next[i] >= 0 ? rank_of(t, sym[i], sym[next[i]]) : NO_RANK;
        if (cur[i] != NO_RANK) heap_push(heap, &hn, ((uint64_t)cur[i] << 32) | i);
        if (prev[i] >= 0) {
            size_t p = (size_t)prev[i];
            cur[p] = rank_of(t, sym[p], sym[i]);
            if (cur[p] != NO_RANK) heap_push(heap, &hn, ((uint64_t)cur[p] << 32) | p);
        }
    }
    size_t k = 0;
    for (int64_t i = 0; i >= 0; i = next[i]) sym[k++] = sym[i];
    free(next); free(cur); free(prev); free(heap);
    return k;
}

size_t sj_tok_bpe(const sj_tokenizer *t, const uint8_t *s, size_t n, int32_t *out) {
    for (size_t i = 0; i < n; i++) out[i] = t->byte_id[s[i]];
    if (n < 2) return n;
    /* positions are 32-bit in the heap entries: split absurdly long runs */
    if (n > ((size_t)1 << 31)) return n;
    return n <= 128 ? bpe_small(t, out, n) : bpe_large(t, out, n);
}

/* ---- cache -------------------------------------------------------------- */

static sj_tok_cache *cache_borrow(sj_tokenizer *t) {
    for (int i = 0; i < t->n_caches; i++) {
        sj_tok_cache *c = &t->caches[i];
        if (!atomic_flag_test_and_set_explicit(&c->busy, memory_order_acquire)) {
            if (!c->map.slots && sj_tok_bytemap_init(&c->map, SJ_TOK_CACHE_SLOTS) != SJ_OK) {
                atomic_flag_clear_explicit(&c->busy, memory_order_release);
                return NULL;   /* uncached is still correct */
            }
            return c;
        }
    }
    return NULL;
}

static void cache_return(sj_tok_cache *c) {
    if (c) atomic_flag_clear_explicit(&c->busy, memory_order_release);
}

static size_t encode_piece(const sj_tokenizer *t, sj_tok_cache *c, const uint8_t *s, size_t n,
                           int32_t *out) {
    if (n == 1) { out[0] = t->byte_id[s[0]]; return 1; }
    if (!c || n > SJ_TOK_CACHE_MAX_KEY) return sj_tok_bpe(t, s, n, out);
    uint64_t h = sj_tok_hash(s, n);
    int64_t *v = sj_tok_bytemap_get(&c->map, s, n, h);
    if (v) {
        size_t k = (size_t)(*v & 0xff);
        memcpy(out, c->ids + (*v >> 8), k * sizeof *out);
        return k;
    }
    size_t k = sj_tok_bpe(t, s, n, out);
    /* Full: start over rather than evict; keeps lookups branch-light. */
    if (c->map.n * 2 >= c->map.cap || c->ids_n + k > c->ids_cap) {
        if (!c->ids) {
            c->ids_cap = (size_t)SJ_TOK_CACHE_SLOTS * 4;
            c->ids = malloc(c->ids_cap * sizeof *c->ids);
            if (!c->ids) { c->ids_cap = 0; return k; }
        }
        sj_tok_bytemap_clear(&c->map);
        c->ids_n = 0;
    }
    int ins;
    if (sj_tok_bytemap_put(&c->map, s, n, h, &v, &ins) != SJ_OK) return k;
    memcpy(c->ids + c->ids_n, out, k * sizeof *out);
    *v = ((int64_t)c->ids_n << 8) | (int64_t)k;
    c->ids_n += k;
    return k;
}

static size_t encode_ordinary(const sj_tokenizer *t, sj_tok_cache *c, const uint8_t *s, size_t n,
                              int32_t *out) {
    size_t k = 0, i = 0;
    while (i < n) {
        size_t e = sj_tok_pretok_next(s, n, i);
        k += encode_piece(t, c, s + i, e - i, out + k);
        i = e;
    }
    return k;
}

/* The special token (with mode != AS_TEXT) that starts at s[i], longest
 * first; its index in special order, or -1. */
static int special_at(const sj_tokenizer *t, const uint8_t *modes, const uint8_t *s, size_t n,
                      size_t i) {
    int best = -1;
    size_t best_len = 0;
    for (int k = 0; k < t->n_special; k++) {
        if (modes[k] == SJ_SPECIAL_AS_TEXT) continue;
        int32_t id = t->special_ids[k];
        size_t l = (size_t)(t->off[id + 1] - t->off[id]);
        if (l <= n - i && l > best_len && memcmp(s + i, t->data + t->off[id], l) == 0) {
            best = k;
            best_len = l;
        }
    }
    return best;
}

static sj_status encode_one(sj_tokenizer *t, sj_tok_cache *c, const uint8_t *s, size_t n,
                            const uint8_t *modes, int32_t *out, size_t *n_out) {
    size_t k = 0, start = 0;
    int any = 0;
    if (modes)
        for (int i = 0; i < t->n_special; i++) any |= modes[i] != SJ_SPECIAL_AS_TEXT;
    if (any) {
        for (size_t i = 0; i < n; i++) {
            if (!t->special_first[s[i]]) continue;
            int sp = special_at(t, modes, s, n, i);
            if (sp < 0) continue;
            int32_t id = t->special_ids[sp];
            size_t l = (size_t)(t->off[id + 1] - t->off[id]);
            if (modes[sp] == SJ_SPECIAL_REFUSE)
                return sj_fail(SJ_ERR_ARG,
                    "encode: the text contains special token '%.*s' at byte %zu, which this "
                    "call does not allow (allow it, or encode it as text)", (int)l,
                    (const char *)(t->data + t->off[id]), i);
            k += encode_ordinary(t, c, s + start, i - start, out + k);
            out[k++] = id;
            start = i + l;
            i = start - 1;
        }
    }
    k += encode_ordinary(t, c, s + start, n - start, out + k);
    *n_out = k;
    return SJ_OK;
}

sj_status sj_tokenizer_encode(sj_tokenizer *t, const uint8_t *text, size_t len,
                              const uint8_t *special_modes, int32_t *ids, size_t *n_ids) {
    sj_tok_cache *c = cache_borrow(t);
    sj_status s = encode_one(t, c, text, len, special_modes, ids, n_ids);
    cache_return(c);
    return s;
}

typedef struct {
    sj_tokenizer *t;
    const uint8_t *const *texts;
    const size_t *lens;
    const uint8_t *modes;
    int32_t *ids;
    int64_t *starts;     /* where text i's ids may begin (prefix sums of lens) */
    int64_t *counts;
    atomic_int failed;
    sj_status status;
    char msg[512];
} batch_ctx;

static void batch_range(void *p, int64_t b, int64_t e, int tid) {
    (void)tid;
    batch_ctx *x = p;
    sj_tok_cache *c = cache_borrow(x->t);
    for (int64_t i = b; i < e; i++) {
        if (atomic_load(&x->failed) || sj_interrupted()) break;
        size_t k;
        sj_status s = encode_one(x->t, c, x->texts[i], x->lens[i], x->modes, x->ids + x->starts[i], &k);
        if (s != SJ_OK) {
            /* error messages are thread-local: carry the first one back */
            if (atomic_exchange(&x->failed, 1) == 0) {
                x->status = s;
                snprintf(x->msg, sizeof x->msg, "text %lld: %s", (long long)i, sj_last_error());
            }
            break;
        }
        x->counts[i] = (int64_t)k;
    }
    cache_return(c);
}

sj_status sj_tokenizer_encode_batch(sj_tokenizer *t, int64_t n, const uint8_t *const *texts,
                                    const size_t *lens, const uint8_t *special_modes,
                                    int32_t *ids, int64_t *offsets) {
    if (n < 0) return sj_fail(SJ_ERR_ARG, "encode_batch: n = %lld", (long long)n);
    int64_t *tmp = malloc(2 * ((size_t)n + 1) * sizeof *tmp);
    if (!tmp) return sj_fail(SJ_ERR_NOMEM, "encode_batch: out of memory for %lld texts", (long long)n);
    batch_ctx x = { .t = t, .texts = texts, .lens = lens, .modes = special_modes, .ids = ids,
                    .starts = tmp, .counts = tmp + n + 1 };
    atomic_init(&x.failed, 0);
    tmp[0] = 0;
    for (int64_t i = 0; i < n; i++) tmp[i + 1] = tmp[i] + (int64_t)lens[i];
    int64_t grain = 1;
    sj_parallel_for(n, grain, batch_range, &x);
    sj_status s = SJ_OK;
    if (atomic_load(&x.failed)) s = sj_fail(x.status, "%s", x.msg);
    else if (sj_interrupted()) s = sj_fail(SJ_ERR_INTERRUPTED, "encode_batch: interrupted");
    if (s == SJ_OK) {
        /* Compact in place: text i's ids move left to offsets[i]; never past
         * its start, so a forward memmove never clobbers unread ids. */
        offsets[0] = 0;
        for (int64_t i = 0; i < n; i++) {
            if (offsets[i] != x.starts[i])
                memmove(ids + offsets[i], ids + x.starts[i], (size_t)x.counts[i] * sizeof *ids);
            offsets[i + 1] = offsets[i] + x.counts[i];
        }
    }
    free(tmp);
    return s;
}
