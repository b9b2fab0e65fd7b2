/* train.c — byte-level BPE training.
 *
 * 1. feed: pre-tokenise documents (GPT-2 split, special tokens cut out) and
 *    count distinct pre-tokens ("words"), in parallel over chunks with one
 *    map per thread, merged afterwards.
 * 2. begin: every word becomes a sequence of byte ids; count every adjacent
 *    pair (times the word's count) and remember which words hold it.
 * 3. step: take the best pair from a lazy max-heap, merge it in only the
 *    words that hold it, and update only the counts those merges touch.
 *
 * Best pair: the highest count; ties go to the smallest (left id, right id).
 * Base ids follow GPT-2's byte order (the order of bytes_to_unicode's
 * characters by code point), new tokens take ids in creation order. That is
 * exactly HF tokenizers' BpeTrainer rule with a ByteLevel alphabet, so the
 * two learn the same merges. Nothing depends on thread timing or hash order.
 */
#include "tok.h"
#include <stdlib.h>

#define CHUNK_BYTES ((size_t)1 << 20)

typedef struct { int32_t a, b; int64_t count; int32_t *w; int32_t nw, cw; int64_t stamp; } pair_t;
typedef struct { int64_t count; int32_t a, b; } heap_t;

struct sj_bpe_trainer {
    int n_special;
    uint8_t **special;
    size_t *special_len;
    uint8_t special_first[256];
    sj_tok_bytemap words;           /* pre-token bytes -> count */
    /* training state, after begin */
    int began, finished, target;
    int64_t min_frequency;
    int64_t n_words;
    int32_t *sym;                   /* all words' symbols */
    int64_t *wstart;
    int32_t *wlen;
    int64_t *wcount, *wstamp;
    pair_t *pairs;
    int32_t n_pairs, cap_pairs;
    uint64_t *pkeys;                /* pair map: (a, b) -> index into pairs */
    int32_t *pvals;
    size_t pmask, pn;
    heap_t *heap;
    size_t heap_n, heap_cap;
    int32_t *touched;
    size_t n_touched, cap_touched;
    int64_t stamp;
    sj_tok_bytemap tokmap;          /* token bytes -> id (dedupes merged tokens) */
    uint8_t *tok;                   /* token bytes */
    int64_t *tok_off;
    int32_t n_tok, cap_tok;
    size_t tok_n, tok_cap;
    int32_t *merges;                /* (n_merges, 2) */
    int32_t n_merges, cap_merges;
    int oom;
};

/* GPT-2's order: printable bytes first (as bytes_to_unicode keeps them),
 * then the rest, which it maps to U+0100.. in ascending order. */
static void gpt2_byte_order(uint8_t order[256]) {
    int k = 0;
    for (int b = 0; b < 256; b++)
        if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) order[k++] = (uint8_t)b;
    for (int b = 0; b < 256; b++)
        if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) order[k++] = (uint8_t)b;
}

sj_status sj_bpe_trainer_create(int n_special, const uint8_t *const *special,
                                const size_t *special_lens, sj_bpe_trainer **out) {
    *out = NULL;
    if (n_special < 0 || n_special > 65536)
        return sj_fail(SJ_ERR_ARG, "trainer: %d special tokens", n_special);
    sj_bpe_trainer *tr = calloc(1, sizeof *tr);
    if (!tr) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    tr->special = calloc((size_t)n_special + 1, sizeof *tr->special);
    tr->special_len = calloc((size_t)n_special + 1, sizeof *tr->special_len);
    if (!tr->special || !tr->special_len) {
        sj_bpe_trainer_free(tr);
        return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    }
    tr->n_special = n_special;
    for (int i = 0; i < n_special; i++) {
        if (special_lens[i] == 0 || special_lens[i] > 1024) {
            sj_bpe_trainer_free(tr);
            return sj_fail(SJ_ERR_ARG, "trainer: special token %d has length %zu (must be 2..1024)",
                           i, special_lens[i]);
        }
        /* Every byte is already an ordinary token, and the tokenizer's
         * tokens must be distinct. Longer ones are cut out of the text
         * before counting, so no learned token can spell them. */
        if (special_lens[i] == 1) {
            sj_bpe_trainer_free(tr);
            return sj_fail(SJ_ERR_ARG, "trainer: special token %d is the single byte 0x%02x, "
                           "which is already an ordinary token", i, special[i][0]);
        }
        for (int j = 0; j < i; j++)
            if (special_lens[j] == special_lens[i] && memcmp(special[j], special[i], special_lens[i]) == 0) {
                sj_bpe_trainer_free(tr);
                return sj_fail(SJ_ERR_ARG, "trainer: special tokens %d and %d are the same", j, i);
            }
        tr->special[i] = malloc(special_lens[i]);
        if (!tr->special[i]) { sj_bpe_trainer_free(tr); return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory"); }
        memcpy(tr->special[i], special[i], special_lens[i]);
        tr->special_len[i] = special_lens[i];
        tr->special_first[special[i][0]] = 1;
    }
    sj_status s = sj_tok_bytemap_init(&tr->words, 1 << 16);
    if (s) { sj_bpe_trainer_free(tr); return s; }
    *out = tr;
    return SJ_OK;
}

void sj_bpe_trainer_free(sj_bpe_trainer *tr) {
    if (!tr) return;
    for (int i = 0; i < tr->n_special; i++) free(tr->special ? tr->special[i] : NULL);
    free(tr->special);
    free(tr->special_len);
    sj_tok_bytemap_free(&tr->words);
    free(tr->sym); free(tr->wstart); free(tr->wlen); free(tr->wcount); free(tr->wstamp);
    for (int32_t i = 0; i < tr->n_pairs; i++) free(tr->pairs[i].w);
    free(tr->pairs); free(tr->pkeys); free(tr->pvals); free(tr->heap); free(tr->touched);
    sj_tok_bytemap_free(&tr->tokmap);
    free(tr->tok); free(tr->tok_off); free(tr->merges);
    free(tr);
}

int64_t sj_bpe_trainer_n_words(const sj_bpe_trainer *tr) { return (int64_t)tr->words.n; }

/* ---- feed: count pre-tokens ---------------------------------------------- */

typedef struct { const uint8_t *p; size_t n; } chunk_t;

typedef struct {
    sj_bpe_trainer *tr;
    chunk_t *chunks;
    sj_tok_bytemap *maps;           /* one per thread */
    atomic_int failed;
} feed_ctx;

/* Length of the special token starting at s[i] (longest), or 0. */
static size_t special_at(const sj_bpe_trainer *tr, const uint8_t *s, size_t n, size_t i) {
    size_t best = 0;
    for (int k = 0; k < tr->n_special; k++) {
        size_t l = tr->special_len[k];
        if (l <= n - i && l > best && memcmp(s + i, tr->special[k], l) == 0) best = l;
    }
    return best;
}

static int count_segment(sj_tok_bytemap *m, const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t e = sj_tok_pretok_next(s, n, i);
        int64_t *v;
        if (sj_tok_bytemap_put(m, s + i, e - i, sj_tok_hash(s + i, e - i), &v, NULL) != SJ_OK) return -1;
        (*v)++;
        i = e;
    }
    return 0;
}

static void feed_range(void *p, int64_t b, int64_t e, int tid) {
    feed_ctx *x = p;
    sj_bpe_trainer *tr = x->tr;
    sj_tok_bytemap *m = &x->maps[tid];
    if (!m->slots && sj_tok_bytemap_init(m, 1 << 15) != SJ_OK) { atomic_store(&x->failed, 1); return; }
    for (int64_t c = b; c < e; c++) {
        if (atomic_load(&x->failed) || sj_interrupted()) return;
        const uint8_t *s = x->chunks[c].p;
        size_t n = x->chunks[c].n, start = 0;
        for (size_t i = 0; tr->n_special && i < n; i++) {
            if (!tr->special_first[s[i]]) continue;
            size_t l = special_at(tr, s, n, i);
            if (!l) continue;
            if (count_segment(m, s + start, i - start) < 0) { atomic_store(&x->failed, 1); return; }
            start = i + l;
            i = start - 1;
        }
        if (count_segment(m, s + start, n - start) < 0) { atomic_store(&x->failed, 1); return; }
    }
}

/* A cut at p is safe when s[p] is a line break ('\n' or '\r') and s[p-1] a
 * printable ASCII non-space: the pre-token before p ends there (none holds
 * both), and the whitespace run starts at p. Not after a '\n': it may end a
 * longer run ("\n\n" before text is "\n" + "\n" in the whole text but one
 * pre-token at a chunk's end). No special token may straddle p. */
static int safe_cut(const sj_bpe_trainer *tr, const uint8_t *s, size_t n, size_t p) {
    if ((s[p] != '\n' && s[p] != '\r') || s[p - 1] <= 0x20 || s[p - 1] >= 0x7F) return 0;
    for (int k = 0; k < tr->n_special; k++) {
        size_t l = tr->special_len[k];
        for (size_t back = 1; back < l && back <= p; back++)
            if (p - back + l <= n && memcmp(s + p - back, tr->special[k], l) == 0) return 0;
    }
    return 1;
}

size_t sj_bpe_trainer_last_cut(const sj_bpe_trainer *tr, const uint8_t *s, size_t n) {
    /* s may go on past n: s[p] and every special token through p must be in it */
    size_t keep = 1;
    for (int k = 0; k < tr->n_special; k++)
        if (tr->special_len[k] > keep) keep = tr->special_len[k];
    for (size_t p = n > keep ? n - keep : 0; p > 0; p--)
        if (safe_cut(tr, s, n, p)) return p;
    return 0;
}

sj_status sj_bpe_trainer_feed(sj_bpe_trainer *tr, int64_t n, const uint8_t *const *texts,
                              const size_t *lens) {
    if (tr->began) return sj_fail(SJ_ERR_ARG, "trainer: feed after training began");
    if (n < 0) return sj_fail(SJ_ERR_ARG, "trainer: n = %lld", (long long)n);
    size_t n_chunks = 0, cap = (size_t)n + 16;
    chunk_t *chunks = malloc(cap * sizeof *chunks);
    if (!chunks) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    for (int64_t d = 0; d < n; d++) {
        const uint8_t *s = texts[d];
        size_t len = lens[d], at = 0;
        while (at < len) {
            size_t end = len;
            if (len - at > CHUNK_BYTES) {
                /* look for a safe cut after CHUNK_BYTES; none found -> one big chunk */
                for (size_t p = at + CHUNK_BYTES; p < len; p++)
                    if (safe_cut(tr, s, len, p)) { end = p; break; }
            }
            if (n_chunks == cap) {
                cap *= 2;
                chunk_t *nc = realloc(chunks, cap * sizeof *chunks);
                if (!nc) { free(chunks); return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory"); }
                chunks = nc;
            }
            chunks[n_chunks++] = (chunk_t){ s + at, end - at };
            at = end;
        }
    }
    int nt = sj_threads_get();
    feed_ctx x = { .tr = tr, .chunks = chunks, .maps = calloc((size_t)nt, sizeof(sj_tok_bytemap)) };
    atomic_init(&x.failed, 0);
    if (!x.maps) { free(chunks); return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory"); }
    sj_parallel_for((int64_t)n_chunks, 1, feed_range, &x);
    sj_status s = SJ_OK;
    if (atomic_load(&x.failed)) s = sj_fail(SJ_ERR_NOMEM, "trainer: out of memory counting pre-tokens");
    else if (sj_interrupted()) s = sj_fail(SJ_ERR_INTERRUPTED, "trainer: interrupted");
    for (int t = 0; t < nt; t++) {
        sj_tok_bytemap *m = &x.maps[t];
        for (size_t i = 0; s == SJ_OK && i < m->cap; i++) {
            sj_tok_slot *sl = &m->slots[i];
            if (!sl->hash) continue;
            int64_t *v;
            s = sj_tok_bytemap_put(&tr->words, sj_tok_bytemap_key(m, sl), sl->klen, sl->hash, &v, NULL);
            if (s == SJ_OK) *v += sl->val;
        }
        sj_tok_bytemap_free(m);
    }
    free(x.maps);
    free(chunks);
    return s;
}

/* ---- pair index ------------------------------------------------------------ */

static int pmap_grow(sj_bpe_trainer *tr) {
    size_t nc = tr->pkeys ? (tr->pmask + 1) * 2 : 1 << 16;
    uint64_t *nk = malloc(nc * sizeof *nk);
    int32_t *nv = malloc(nc * sizeof *nv);
    if (!nk || !nv) { free(nk); free(nv); return -1; }
    memset(nk, 0xff, nc * sizeof *nk);
    for (size_t i = 0; tr->pkeys && i <= tr->pmask; i++) {
        if (tr->pkeys[i] == UINT64_MAX) continue;
        size_t j = (size_t)((tr->pkeys[i] * 0x9E3779B97F4A7C15ull) >> 20) & (nc - 1);
        while (nk[j] != UINT64_MAX) j = (j + 1) & (nc - 1);
        nk[j] = tr->pkeys[i];
        nv[j] = tr->pvals[i];
    }
    free(tr->pkeys); free(tr->pvals);
    tr->pkeys = nk; tr->pvals = nv; tr->pmask = nc - 1;
    return 0;
}

/* Index of pair (a, b), created with count 0 when absent; -1 on OOM. */
static int32_t pair_index(sj_bpe_trainer *tr, int32_t a, int32_t b) {
    if ((tr->pn + 1) * 2 > tr->pmask + 1 && pmap_grow(tr) < 0) return -1;
    uint64_t k = sj_tok_pairkey(a, b);
    size_t j = (size_t)((k * 0x9E3779B97F4A7C15ull) >> 20) & tr->pmask;
    while (tr->pkeys[j] != UINT64_MAX) {
        if (tr->pkeys[j] == k) return tr->pvals[j];
        j = (j + 1) & tr->pmask;
    }
    if (tr->n_pairs == tr->cap_pairs) {
        int32_t nc = tr->cap_pairs ? tr->cap_pairs * 2 : 1 << 16;
        pair_t *np = realloc(tr->pairs, (size_t)nc * sizeof *np);
        if (!np) return -1;
        tr->pairs = np;
        tr->cap_pairs = nc;
    }
    int32_t idx = tr->n_pairs++;
    tr->pairs[idx] = (pair_t){ .a = a, .b = b, .stamp = -1 };
    tr->pkeys[j] = k;
    tr->pvals[j] = idx;
    tr->pn++;
    return idx;
}

/* Add delta occurrences of (a, b) in word w. */
static void pair_add(sj_bpe_trainer *tr, int32_t a, int32_t b, int64_t delta, int32_t w) {
    int32_t i = pair_index(tr, a, b);
    if (i < 0) { tr->oom = 1; return; }
    pair_t *p = &tr->pairs[i];
    p->count += delta;
    if (delta <= 0) return;
    if (!(p->nw && p->w[p->nw - 1] == w)) {
        if (p->nw == p->cw) {
            int32_t nc = p->cw ? p->cw * 2 : 4;
            int32_t *nw = realloc(p->w, (size_t)nc * sizeof *nw);
            if (!nw) { tr->oom = 1; return; }
            p->w = nw;
            p->cw = nc;
        }
        p->w[p->nw++] = w;
    }
    if (p->stamp != tr->stamp) {    /* re-queue once per step */
        p->stamp = tr->stamp;
        if (tr->n_touched == tr->cap_touched) {
            size_t nc = tr->cap_touched ? tr->cap_touched * 2 : 1024;
            int32_t *nt = realloc(tr->touched, nc * sizeof *nt);
            if (!nt) { tr->oom = 1; return; }
            tr->touched = nt;
            tr->cap_touched = nc;
        }
        tr->touched[tr->n_touched++] = i;
    }
}

/* ---- heap: max count, then min (a, b) --------------------------------------- */

static inline int heap_before(const heap_t *x, const heap_t *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static int heap_push(sj_bpe_trainer *tr, heap_t v) {
    if (tr->heap_n == tr->heap_cap) {
        size_t nc = tr->heap_cap ? tr->heap_cap * 2 : 1 << 16;
        heap_t *nh = realloc(tr->heap, nc * sizeof *nh);
        if (!nh) return -1;
        tr->heap = nh;
        tr->heap_cap = nc;
    }
    size_t i = tr->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_before(&v, &tr->heap[p])) break;
        tr->heap[i] = tr->heap[p];
        i = p;
    }
    tr->heap[i] = v;
    return 0;
}

static heap_t heap_pop(sj_bpe_trainer *tr) {
    heap_t top = tr->heap[0], v = tr->heap[--tr->heap_n];
    size_t i = 0, n = tr->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_before(&tr->heap[c + 1], &tr->heap[c])) c++;
        if (!heap_before(&tr->heap[c], &v)) break;
        tr->heap[i] = tr->heap[c];
        i = c;
    }
    if (n) tr->heap[i] = v;
    return top;
}

/* ---- tokens ----------------------------------------------------------------- */

#define TOK(tr, i) ((tr)->tok + (tr)->tok_off[i])
#define TOKLEN(tr, i) ((size_t)((tr)->tok_off[(i) + 1] - (tr)->tok_off[i]))

/* The id of the token spelled bytes(a) + bytes(b): an existing one with those
 * bytes (as HF does), else a new one; -1 on OOM. Takes ids, not pointers:
 * a and b's bytes live in tr->tok, which growing may move, so they are read
 * only after it has grown. */
static int32_t token_add(sj_bpe_trainer *tr, int32_t a, int32_t b) {
    size_t la = TOKLEN(tr, a), lb = TOKLEN(tr, b), l = la + lb;
    if (tr->tok_n + l > tr->tok_cap) {
        size_t nc = (tr->tok_n + l) * 2;
        uint8_t *nt = realloc(tr->tok, nc);
        if (!nt) return -1;
        tr->tok = nt;
        tr->tok_cap = nc;
    }
    uint8_t *dst = tr->tok + tr->tok_n;
    memcpy(dst, TOK(tr, a), la);
    memcpy(dst + la, TOK(tr, b), lb);
    int64_t *v;
    int ins;
    if (sj_tok_bytemap_put(&tr->tokmap, dst, l, sj_tok_hash(dst, l), &v, &ins) != SJ_OK) return -1;
    if (!ins) return (int32_t)*v;     /* same bytes from another pair: reuse the id, as HF does */
    if (tr->n_tok == tr->cap_tok) {
        int32_t nc = tr->cap_tok * 2;
        int64_t *no = realloc(tr->tok_off, ((size_t)nc + 1) * sizeof *no);
        if (!no) return -1;
        tr->tok_off = no;
        tr->cap_tok = nc;
    }
    *v = tr->n_tok;
    tr->tok_n += l;
    tr->tok_off[++tr->n_tok] = (int64_t)tr->tok_n;
    return (int32_t)*v;
}

/* ---- begin / step / finish -------------------------------------------------- */

sj_status sj_bpe_trainer_begin(sj_bpe_trainer *tr, int vocab_size, int64_t min_frequency,
                               int *n_todo) {
    if (tr->began) return sj_fail(SJ_ERR_ARG, "trainer: begin called twice");
    if (vocab_size < 256 + tr->n_special || vocab_size > (1 << 24))
        return sj_fail(SJ_ERR_ARG, "trainer: vocab_size %d must be in %d..%d (256 bytes + %d special)",
                       vocab_size, 256 + tr->n_special, 1 << 24, tr->n_special);
    tr->began = 1;
    tr->target = vocab_size - tr->n_special;
    tr->min_frequency = min_frequency < 1 ? 1 : min_frequency;
    uint8_t order[256];
    gpt2_byte_order(order);
    int32_t id_of[256];
    for (int i = 0; i < 256; i++) id_of[order[i]] = i;

    tr->cap_tok = 1024;
    tr->tok_cap = 1 << 16;
    tr->tok = malloc(tr->tok_cap);
    tr->tok_off = malloc(((size_t)tr->cap_tok + 1) * sizeof *tr->tok_off);
    tr->cap_merges = vocab_size + 16;
    tr->merges = malloc((size_t)tr->cap_merges * 2 * sizeof *tr->merges);
    if (!tr->tok || !tr->tok_off || !tr->merges) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    SJ_TRY(sj_tok_bytemap_init(&tr->tokmap, (size_t)vocab_size * 2));
    tr->tok_off[0] = 0;
    for (int i = 0; i < 256; i++) {
        int64_t *v;
        tr->tok[i] = order[i];
        tr->tok_off[i + 1] = i + 1;
        SJ_TRY(sj_tok_bytemap_put(&tr->tokmap, &order[i], 1, sj_tok_hash(&order[i], 1), &v, NULL));
        *v = i;
    }
    tr->n_tok = 256;
    tr->tok_n = 256;

    tr->n_words = (int64_t)tr->words.n;
    size_t total = tr->words.arena_n;
    tr->sym = malloc((total + 1) * sizeof *tr->sym);
    tr->wstart = malloc(((size_t)tr->n_words + 1) * sizeof *tr->wstart);
    tr->wlen = malloc(((size_t)tr->n_words + 1) * sizeof *tr->wlen);
    tr->wcount = malloc(((size_t)tr->n_words + 1) * sizeof *tr->wcount);
    tr->wstamp = calloc((size_t)tr->n_words + 1, sizeof *tr->wstamp);
    if (!tr->sym || !tr->wstart || !tr->wlen || !tr->wcount || !tr->wstamp)
        return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory for %lld words", (long long)tr->n_words);
    int64_t w = 0, at = 0;
    for (size_t i = 0; i < tr->words.cap; i++) {
        sj_tok_slot *s = &tr->words.slots[i];
        if (!s->hash) continue;
        const uint8_t *k = sj_tok_bytemap_key(&tr->words, s);
        tr->wstart[w] = at;
        tr->wlen[w] = (int32_t)s->klen;
        tr->wcount[w] = s->val;
        for (uint32_t j = 0; j < s->klen; j++) tr->sym[at + j] = id_of[k[j]];
        at += s->klen;
        w++;
    }
    sj_tok_bytemap_free(&tr->words);   /* the symbols hold it all now */
    if (pmap_grow(tr) < 0) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    tr->stamp = 0;
    for (int64_t i = 0; i < tr->n_words; i++) {
        const int32_t *s = tr->sym + tr->wstart[i];
        for (int32_t j = 0; j + 1 < tr->wlen[i]; j++) pair_add(tr, s[j], s[j + 1], tr->wcount[i], (int32_t)i);
        if (tr->oom) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory counting pairs");
    }
    for (int32_t i = 0; i < tr->n_pairs; i++)
        if (tr->pairs[i].count > 0 && heap_push(tr, (heap_t){ tr->pairs[i].count, tr->pairs[i].a, tr->pairs[i].b }) < 0)
            return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    tr->n_touched = 0;
    *n_todo = tr->target - tr->n_tok;
    return SJ_OK;
}

static void merge_word(sj_bpe_trainer *tr, int32_t w, int32_t a, int32_t b, int32_t c) {
    int32_t *s = tr->sym + tr->wstart[w];
    int32_t L = tr->wlen[w], i = 0, j = 0;
    int64_t cnt = tr->wcount[w];
    while (i < L) {
        if (i + 1 < L && s[i] == a && s[i + 1] == b) {
            /* The word is rewritten in place (j <= i), so s[j-1] is already the
             * merged left neighbour: the deltas stay exact for runs like "aaaa". */
            if (j > 0) { pair_add(tr, s[j - 1], a, -cnt, w); pair_add(tr, s[j - 1], c, cnt, w); }
            if (i + 2 < L) { pair_add(tr, b, s[i + 2], -cnt, w); pair_add(tr, c, s[i + 2], cnt, w); }
            pair_add(tr, a, b, -cnt, w);
            s[j++] = c;
            i += 2;
        } else {
            s[j++] = s[i++];
        }
    }
    tr->wlen[w] = j;
}

sj_status sj_bpe_trainer_step(sj_bpe_trainer *tr, int max_merges, int *n_done) {
    *n_done = 0;
    if (!tr->began) return sj_fail(SJ_ERR_ARG, "trainer: step before begin");
    while (*n_done < max_merges && !tr->finished) {
        if (tr->n_tok >= tr->target) { tr->finished = 1; break; }
        if (sj_interrupted()) return sj_fail(SJ_ERR_INTERRUPTED, "trainer: interrupted");
        heap_t top;
        int32_t pi = -1;
        while (tr->heap_n) {
            top = heap_pop(tr);
            pi = pair_index(tr, top.a, top.b);
            if (pi < 0) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
            int64_t now = tr->pairs[pi].count;
            if (now == top.count) break;
            pi = -1;   /* stale entry: requeue with the true count */
            if (now > 0 && heap_push(tr, (heap_t){ now, top.a, top.b }) < 0)
                return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
        }
        if (pi < 0 || top.count < tr->min_frequency) { tr->finished = 1; break; }
        int32_t a = top.a, b = top.b;
        int32_t c = token_add(tr, a, b);
        if (c < 0) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
        if (tr->n_merges == tr->cap_merges) {
            int32_t nc = tr->cap_merges * 2;
            int32_t *nm = realloc(tr->merges, (size_t)nc * 2 * sizeof *nm);
            if (!nm) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
            tr->merges = nm;
            tr->cap_merges = nc;
        }
        tr->merges[2 * tr->n_merges] = a;
        tr->merges[2 * tr->n_merges + 1] = b;
        tr->n_merges++;

        /* Take the word list out: pair_add may grow (move) the pairs array,
         * and (a, b) never reappears once merged everywhere. */
        int32_t *list = tr->pairs[pi].w, nw = tr->pairs[pi].nw;
        tr->pairs[pi].w = NULL;
        tr->pairs[pi].nw = tr->pairs[pi].cw = 0;
        tr->stamp++;
        tr->n_touched = 0;
        for (int32_t k = 0; k < nw; k++) {
            int32_t w = list[k];
            if (tr->wstamp[w] == tr->stamp) continue;
            tr->wstamp[w] = tr->stamp;
            merge_word(tr, w, a, b, c);
        }
        free(list);
        if (tr->oom) return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory updating pairs");
        for (size_t k = 0; k < tr->n_touched; k++) {
            pair_t *p = &tr->pairs[tr->touched[k]];
            if (p->count > 0 && heap_push(tr, (heap_t){ p->count, p->a, p->b }) < 0)
                return sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
        }
        (*n_done)++;
    }
    return SJ_OK;
}

sj_status sj_bpe_trainer_finish(sj_bpe_trainer *tr, sj_tokenizer **out) {
    *out = NULL;
    if (!tr->began) return sj_fail(SJ_ERR_ARG, "trainer: finish before begin");
    int n = tr->n_tok + tr->n_special;
    size_t bytes = tr->tok_n;
    for (int i = 0; i < tr->n_special; i++) bytes += tr->special_len[i];
    uint8_t *data = malloc(bytes);
    int64_t *off = malloc(((size_t)n + 1) * sizeof *off);
    uint8_t *special = calloc((size_t)n, 1);
    sj_status s = SJ_ERR_NOMEM;
    if (!data || !off || !special) {
        sj_fail(SJ_ERR_NOMEM, "trainer: out of memory");
    } else {
        memcpy(data, tr->tok, tr->tok_n);
        memcpy(off, tr->tok_off, ((size_t)tr->n_tok + 1) * sizeof *off);
        size_t at = tr->tok_n;
        for (int i = 0; i < tr->n_special; i++) {
            memcpy(data + at, tr->special[i], tr->special_len[i]);
            at += tr->special_len[i];
            off[tr->n_tok + i + 1] = (int64_t)at;
            special[tr->n_tok + i] = 1;
        }
        s = sj_tokenizer_create(n, data, off, special, tr->n_merges, tr->merges, out);
    }
    free(data); free(off); free(special);
    return s;
}
