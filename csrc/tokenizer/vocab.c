/* vocab.c — the tokenizer object: building it from a vocabulary and merge
 * list (checking both, since they come from users' files), accessors, and
 * decoding. Encoding lives in encode.c, files in io.c. */
#include "tok.h"
#include <stdio.h>
#include <stdlib.h>

void sj_tokenizer_free(sj_tokenizer *t) {
    if (!t) return;
    free(t->data);
    free(t->off);
    free(t->special);
    free(t->merges);
    free(t->special_ids);
    sj_tok_pairmap_free(&t->ranks);
    sj_tok_bytemap_free(&t->ids);
    if (t->caches) {
        for (int i = 0; i < t->n_caches; i++) {
            sj_tok_bytemap_free(&t->caches[i].map);
            free(t->caches[i].ids);
        }
        free(t->caches);
    }
    free(t);
}

/* Up to a few dozen bytes of b, printable ASCII as is and the rest as \xNN,
 * for error messages; "..." marks a cut. */
static const char *escape_bytes(const uint8_t *b, size_t n, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (o + 8 > cap) { memcpy(out + o, "...", 4); return out; }
        if (b[i] >= 0x20 && b[i] < 0x7F && b[i] != '\\') out[o++] = (char)b[i];
        else o += (size_t)snprintf(out + o, cap - o, "\\x%02x", b[i]);
    }
    out[o] = 0;
    return out;
}

static sj_status fail_free(sj_tokenizer *t, sj_status s) {
    sj_tokenizer_free(t);
    return s;
}

sj_status sj_tokenizer_create(int n_vocab, const uint8_t *data, const int64_t *offsets,
                              const uint8_t *is_special, int n_merges,
                              const int32_t *merges, sj_tokenizer **out) {
    *out = NULL;
    if (n_vocab < 256 || n_vocab > INT32_MAX / 2)
        return sj_fail(SJ_ERR_ARG, "tokenizer: vocab size %d must be in 256..%d", n_vocab, INT32_MAX / 2);
    if (n_merges < 0 || n_merges > n_vocab * 4)
        return sj_fail(SJ_ERR_ARG, "tokenizer: %d merges for a vocab of %d", n_merges, n_vocab);
    if (offsets[0] != 0) return sj_fail(SJ_ERR_ARG, "tokenizer: offsets[0] must be 0");
    for (int i = 0; i < n_vocab; i++) {
        if (offsets[i + 1] <= offsets[i])
            return sj_fail(SJ_ERR_ARG, "tokenizer: token %d is empty (every token needs bytes)", i);
        if (offsets[i + 1] - offsets[i] > (1 << 20))
            return sj_fail(SJ_ERR_ARG, "tokenizer: token %d is longer than 1 MiB", i);
    }
    sj_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory");
    size_t nbytes = (size_t)offsets[n_vocab];
    t->n_vocab = n_vocab;
    t->data = malloc(nbytes);
    t->off = malloc(((size_t)n_vocab + 1) * sizeof *t->off);
    t->special = calloc((size_t)n_vocab, 1);
    t->merges = malloc(((size_t)n_merges * 3 + 1) * sizeof *t->merges);
    if (!t->data || !t->off || !t->special || !t->merges)
        return fail_free(t, sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory for %d tokens", n_vocab));
    memcpy(t->data, data, nbytes);
    memcpy(t->off, offsets, ((size_t)n_vocab + 1) * sizeof *t->off);
    for (int i = 0; i < n_vocab; i++) t->special[i] = is_special && is_special[i] ? 1 : 0;
    sj_status st = sj_tok_bytemap_init(&t->ids, (size_t)n_vocab * 2);
    if (st) return fail_free(t, st);

    /* Every token's bytes are unique. Two ids with one spelling make the
     * vocabulary ambiguous: encode can only ever give one of them, a merge
     * result names one arbitrarily, and a special token spelled like an
     * ordinary one would turn that text into the special id. */
    for (int i = 0; i < n_vocab; i++) {
        const uint8_t *k = t->data + t->off[i];
        size_t n = (size_t)(t->off[i + 1] - t->off[i]);
        int64_t *v;
        int ins;
        sj_status s = sj_tok_bytemap_put(&t->ids, k, n, sj_tok_hash(k, n), &v, &ins);
        if (s) return fail_free(t, s);
        if (!ins) {
            char shown[64];
            return fail_free(t, sj_fail(SJ_ERR_ARG,
                "tokenizer: tokens %lld and %d are both \"%s\" (every token's bytes must be distinct)",
                (long long)*v, i, escape_bytes(k, n, shown, sizeof shown)));
        }
        *v = i;
        if (t->special[i]) t->n_special++;
    }
    for (int b = 0; b < 256; b++) {
        uint8_t c = (uint8_t)b;
        int64_t *v = sj_tok_bytemap_get(&t->ids, &c, 1, sj_tok_hash(&c, 1));
        if (!v || t->special[*v])
            return fail_free(t, sj_fail(SJ_ERR_ARG,
                "tokenizer: byte 0x%02x has no token (all 256 bytes must be ordinary tokens)", b));
        t->byte_id[b] = (int32_t)*v;
    }
    t->special_ids = malloc(((size_t)t->n_special + 1) * sizeof *t->special_ids);
    if (!t->special_ids) return fail_free(t, sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory"));
    for (int i = 0, k = 0; i < n_vocab; i++) {
        if (!t->special[i]) continue;
        t->special_ids[k++] = i;
        int len = (int)(t->off[i + 1] - t->off[i]);
        if (len > t->max_special_len) t->max_special_len = len;
        t->special_first[t->data[t->off[i]]] = 1;
    }

    sj_status s = sj_tok_pairmap_init(&t->ranks, (size_t)n_merges + 1);
    if (s) return fail_free(t, s);
    uint8_t *buf = NULL;
    size_t buf_cap = 0;
    for (int r = 0; r < n_merges; r++) {
        int32_t a = merges[2 * r], b = merges[2 * r + 1];
        if (a < 0 || a >= n_vocab || b < 0 || b >= n_vocab || t->special[a] || t->special[b]) {
            free(buf);
            return fail_free(t, sj_fail(SJ_ERR_ARG,
                "tokenizer: merge %d (%d, %d) names an id that is not an ordinary token", r, a, b));
        }
        size_t la = (size_t)(t->off[a + 1] - t->off[a]), lb = (size_t)(t->off[b + 1] - t->off[b]);
        if (la + lb > buf_cap) {
            buf_cap = (la + lb) * 2;
            uint8_t *nb = realloc(buf, buf_cap);
            if (!nb) { free(buf); return fail_free(t, sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory")); }
            buf = nb;
        }
        memcpy(buf, t->data + t->off[a], la);
        memcpy(buf + la, t->data + t->off[b], lb);
        int64_t *v = sj_tok_bytemap_get(&t->ids, buf, la + lb, sj_tok_hash(buf, la + lb));
        if (!v || t->special[*v]) {
            free(buf);
            return fail_free(t, sj_fail(SJ_ERR_ARG,
                "tokenizer: merge %d (%d, %d): the merged bytes are not in the vocabulary", r, a, b));
        }
        t->merges[3 * r] = a;
        t->merges[3 * r + 1] = b;
        t->merges[3 * r + 2] = (int32_t)*v;
        sj_tok_pairmap_put(&t->ranks, sj_tok_pairkey(a, b), r);  /* a repeated pair keeps its first rank */
    }
    free(buf);
    t->n_merges = n_merges;

    t->n_caches = sj_threads_get() + 4;
    t->caches = calloc((size_t)t->n_caches, sizeof *t->caches);
    if (!t->caches) return fail_free(t, sj_fail(SJ_ERR_NOMEM, "tokenizer: out of memory"));
    for (int i = 0; i < t->n_caches; i++) atomic_flag_clear(&t->caches[i].busy);
    *out = t;
    return SJ_OK;
}

int sj_tokenizer_vocab_size(const sj_tokenizer *t) { return t->n_vocab; }
int sj_tokenizer_n_merges(const sj_tokenizer *t) { return t->n_merges; }
int sj_tokenizer_n_special(const sj_tokenizer *t) { return t->n_special; }

int32_t sj_tokenizer_special_id(const sj_tokenizer *t, int i) {
    return i >= 0 && i < t->n_special ? t->special_ids[i] : -1;
}

const uint8_t *sj_tokenizer_token(const sj_tokenizer *t, int id, size_t *len, int *is_special) {
    if (id < 0 || id >= t->n_vocab) return NULL;
    *len = (size_t)(t->off[id + 1] - t->off[id]);
    if (is_special) *is_special = t->special[id];
    return t->data + t->off[id];
}

sj_status sj_tokenizer_merge(const sj_tokenizer *t, int rank, int32_t out[3]) {
    if (rank < 0 || rank >= t->n_merges)
        return sj_fail(SJ_ERR_ARG, "tokenizer: merge rank %d out of range 0..%d", rank, t->n_merges - 1);
    memcpy(out, t->merges + 3 * (size_t)rank, 3 * sizeof *out);
    return SJ_OK;
}

int32_t sj_tokenizer_lookup(const sj_tokenizer *t, const uint8_t *bytes, size_t len) {
    int64_t *v = sj_tok_bytemap_get(&t->ids, bytes, len, sj_tok_hash(bytes, len));
    return v ? (int32_t)*v : -1;
}

sj_status sj_tokenizer_decoded_len(const sj_tokenizer *t, const int32_t *ids, size_t n,
                                   size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_vocab)
            return sj_fail(SJ_ERR_ARG, "decode: id %d at position %zu is not in 0..%d",
                           id, i, t->n_vocab - 1);
        total += (size_t)(t->off[id + 1] - t->off[id]);
    }
    *len = total;
    return SJ_OK;
}

void sj_tokenizer_decode(const sj_tokenizer *t, const int32_t *ids, size_t n, uint8_t *out) {
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        size_t l = (size_t)(t->off[id + 1] - t->off[id]);
        memcpy(out, t->data + t->off[id], l);
        out += l;
    }
}
