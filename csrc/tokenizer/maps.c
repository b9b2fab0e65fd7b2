/* maps.c — the tokenizer's two hash maps: byte strings -> int64 (vocab,
 * word counts, caches) and id pairs -> int32 (merge ranks). Open addressing
 * with linear probing; the byte map grows, the pair map is sized once. */
#include "tok.h"
#include <stdlib.h>

sj_status sj_tok_bytemap_init(sj_tok_bytemap *m, size_t cap) {
    size_t c = 16;
    while (c < cap) c <<= 1;
    memset(m, 0, sizeof *m);
    m->slots = calloc(c, sizeof *m->slots);
    m->arena_cap = c * 8;
    m->arena = malloc(m->arena_cap);
    if (!m->slots || !m->arena) {
        free(m->slots); free(m->arena);
        memset(m, 0, sizeof *m);
        return sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory for a hash map of %zu slots", c);
    }
    m->cap = c;
    return SJ_OK;
}

void sj_tok_bytemap_free(sj_tok_bytemap *m) {
    free(m->slots);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

void sj_tok_bytemap_clear(sj_tok_bytemap *m) {
    memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->n = 0;
    m->arena_n = 0;
}

int64_t *sj_tok_bytemap_get(const sj_tok_bytemap *m, const uint8_t *k, size_t n, uint64_t h) {
    size_t mask = m->cap - 1, i = (size_t)(h ^ (h >> 29)) & mask;
    for (;;) {
        sj_tok_slot *s = &m->slots[i];
        if (s->hash == 0) return NULL;
        if (s->hash == h && s->klen == n && memcmp(m->arena + s->key, k, n) == 0) return &s->val;
        i = (i + 1) & mask;
    }
}

static sj_status grow(sj_tok_bytemap *m) {
    size_t nc = m->cap * 2, mask = nc - 1;
    sj_tok_slot *ns = calloc(nc, sizeof *ns);
    if (!ns) return sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory growing a hash map to %zu slots", nc);
    for (size_t j = 0; j < m->cap; j++) {
        sj_tok_slot *s = &m->slots[j];
        if (!s->hash) continue;
        size_t i = (size_t)(s->hash ^ (s->hash >> 29)) & mask;
        while (ns[i].hash) i = (i + 1) & mask;
        ns[i] = *s;
    }
    free(m->slots);
    m->slots = ns;
    m->cap = nc;
    return SJ_OK;
}

sj_status sj_tok_bytemap_put(sj_tok_bytemap *m, const uint8_t *k, size_t n, uint64_t h,
                             int64_t **val, int *inserted) {
    if (n > UINT32_MAX) return sj_fail(SJ_ERR_ARG, "tokenizer: a key of %zu bytes is too long", n);
    if ((m->n + 1) * 4 > m->cap * 3) SJ_TRY(grow(m));   /* load <= 3/4 */
    size_t mask = m->cap - 1, i = (size_t)(h ^ (h >> 29)) & mask;
    for (;;) {
        sj_tok_slot *s = &m->slots[i];
        if (s->hash == 0) break;
        if (s->hash == h && s->klen == n && memcmp(m->arena + s->key, k, n) == 0) {
            *val = &s->val;
            if (inserted) *inserted = 0;
            return SJ_OK;
        }
        i = (i + 1) & mask;
    }
    if (m->arena_n + n > m->arena_cap) {
        size_t nc = m->arena_cap * 2;
        while (nc < m->arena_n + n) nc *= 2;
        uint8_t *na = realloc(m->arena, nc);
        if (!na) return sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory for %zu key bytes", nc);
        m->arena = na;
        m->arena_cap = nc;
    }
    memcpy(m->arena + m->arena_n, k, n);
    sj_tok_slot *s = &m->slots[i];
    s->hash = h;
    s->key = (int64_t)m->arena_n;
    s->klen = (uint32_t)n;
    s->val = 0;
    m->arena_n += n;
    m->n++;
    *val = &s->val;
    if (inserted) *inserted = 1;
    return SJ_OK;
}

sj_status sj_tok_pairmap_init(sj_tok_pairmap *m, size_t n_max) {
    size_t c = 16;
    int bits = 4;
    while (c < n_max * 2) { c <<= 1; bits++; }
    m->keys = malloc(c * sizeof *m->keys);
    m->vals = malloc(c * sizeof *m->vals);
    if (!m->keys || !m->vals) {
        free(m->keys); free(m->vals);
        m->keys = NULL; m->vals = NULL;
        return sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory for a pair map of %zu slots", c);
    }
    memset(m->keys, 0xff, c * sizeof *m->keys);
    m->mask = c - 1;
    m->shift = 64 - bits;
    return SJ_OK;
}

void sj_tok_pairmap_free(sj_tok_pairmap *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

int32_t sj_tok_pairmap_put(sj_tok_pairmap *m, uint64_t k, int32_t v) {
    size_t i = sj_tok_pairslot(m, k);
    for (;;) {
        if (m->keys[i] == k) return m->vals[i];
        if (m->keys[i] == UINT64_MAX) {
            m->keys[i] = k;
            m->vals[i] = v;
            return v;
        }
        i = (i + 1) & m->mask;
    }
}
