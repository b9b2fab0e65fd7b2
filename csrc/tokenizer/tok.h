/* tok.h — internals of the byte-level BPE tokenizer, shared by its files:
 * the hash maps (byte strings -> value, id pairs -> rank), the GPT-2
 * pre-tokeniser, and the tokenizer struct. Never included by smedjan.h. */
#ifndef SJ_TOK_H
#define SJ_TOK_H

#include "../core/core.h"
#include <stdatomic.h>
#include <string.h>

/* ---- hashing ------------------------------------------------------------ */

/* Never returns 0: 0 marks an empty slot. */
static inline uint64_t sj_tok_hash(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        p += 8; n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, p, n);
    h = (h ^ v) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h | 1;
}

/* Byte strings -> int64, open addressing; keys copied into an arena. */
typedef struct {
    uint64_t hash;
    int64_t key;      /* offset into arena */
    uint32_t klen;
    int64_t val;
} sj_tok_slot;

typedef struct {
    sj_tok_slot *slots;
    size_t cap, n;        /* cap: power of two */
    uint8_t *arena;
    size_t arena_n, arena_cap;
} sj_tok_bytemap;

sj_status sj_tok_bytemap_init(sj_tok_bytemap *m, size_t cap);
void sj_tok_bytemap_free(sj_tok_bytemap *m);
void sj_tok_bytemap_clear(sj_tok_bytemap *m);
/* The value slot of a key, or NULL. */
int64_t *sj_tok_bytemap_get(const sj_tok_bytemap *m, const uint8_t *k, size_t n, uint64_t h);
/* Find or insert (value 0 when new; *inserted says which). */
sj_status sj_tok_bytemap_put(sj_tok_bytemap *m, const uint8_t *k, size_t n, uint64_t h,
                             int64_t **val, int *inserted);
static inline const uint8_t *sj_tok_bytemap_key(const sj_tok_bytemap *m, const sj_tok_slot *s) {
    return m->arena + s->key;
}

/* (left, right) id pairs -> int32, open addressing; fixed capacity. */
typedef struct {
    uint64_t *keys;       /* UINT64_MAX = empty */
    int32_t *vals;
    size_t mask;
    int shift;
} sj_tok_pairmap;

static inline uint64_t sj_tok_pairkey(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}
static inline size_t sj_tok_pairslot(const sj_tok_pairmap *m, uint64_t k) {
    return (size_t)((k * 0x9E3779B97F4A7C15ull) >> m->shift);
}
sj_status sj_tok_pairmap_init(sj_tok_pairmap *m, size_t n_max);
void sj_tok_pairmap_free(sj_tok_pairmap *m);
/* Inserts if absent; returns the stored value (the first one wins). */
int32_t sj_tok_pairmap_put(sj_tok_pairmap *m, uint64_t k, int32_t v);
static inline int32_t sj_tok_pairmap_get(const sj_tok_pairmap *m, uint64_t k) {
    size_t i = sj_tok_pairslot(m, k);
    for (;;) {
        uint64_t x = m->keys[i];
        if (x == k) return m->vals[i];
        if (x == UINT64_MAX) return -1;
        i = (i + 1) & m->mask;
    }
}

/* ---- pre-tokeniser ------------------------------------------------------ */

/* End of the GPT-2 pre-token that starts at s[i] (i < n). Invalid UTF-8
 * bytes count as one "other" character each (neither letter, number nor
 * space), so any byte string splits deterministically. */
size_t sj_tok_pretok_next(const uint8_t *s, size_t n, size_t i);

/* ---- the tokenizer ------------------------------------------------------ */

/* A pre-token -> ids cache. Each encode call borrows a free one; there are a
 * few more caches than threads so concurrent Python threads rarely go
 * uncached. Cleared wholesale when full (cheap, and keeps memory bounded). */
typedef struct {
    atomic_flag busy;
    sj_tok_bytemap map;   /* val = (offset into ids << 8) | count */
    int32_t *ids;
    size_t ids_n, ids_cap;
} sj_tok_cache;

#define SJ_TOK_CACHE_MAX_KEY 48      /* longer pre-tokens are not cached */
#define SJ_TOK_CACHE_SLOTS (1u << 16)

struct sj_tokenizer {
    int n_vocab;
    uint8_t *data;          /* token bytes, concatenated */
    int64_t *off;           /* (n_vocab + 1) */
    uint8_t *special;       /* (n_vocab) 1 = special */
    int n_merges;
    int32_t *merges;        /* (n_merges, 3): left, right, result */
    sj_tok_pairmap ranks;   /* (left, right) -> rank */
    sj_tok_bytemap ids;     /* bytes -> id, ordinary tokens before specials */
    int32_t byte_id[256];
    int n_special;
    int32_t *special_ids;   /* (n_special), id order */
    int max_special_len;
    uint8_t special_first[256];  /* bytes that start some special token */
    int n_caches;
    sj_tok_cache *caches;
};

/* Merge a pre-token's bytes into ids (no cache); out has room for n ids. */
size_t sj_tok_bpe(const sj_tokenizer *t, const uint8_t *s, size_t n, int32_t *out);

#endif
