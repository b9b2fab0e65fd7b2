/* gguf.c — GGUF v2/v3 files: a defensive reader and an atomic writer.
 *
 * The reader maps the file read-only and checks every count, length, type,
 * dimension and offset against the file size and sane limits before anything
 * is dereferenced: a malformed file gets a message naming the file and the
 * key or tensor ("m.gguf: tensor 'blk.3.attn_q.weight' data runs past the end
 * of the file"), never a read out of bounds. It must never trust a size it
 * has not checked. The writer lays out header, metadata, tensor infos and
 * 32-byte-aligned data, written to a temp file and renamed (io/atomic.c). */
#include "io.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u          /* "GGUF" little-endian */
#define MAX_KV (1u << 20)
#define MAX_TENSORS (1u << 20)
#define MAX_STR (1ull << 30)
#define MAX_ARR (1ull << 32)
#define MAX_DIMS 4

struct sj_gguf_file {
    char *path;
    const uint8_t *map;
    uint64_t size;
    int version;
    uint64_t n_kv, n_tensors, alignment, data_start;
    sj_gguf_kv *kv;
    sj_gguf_tensor *t;
    char *names;                /* NUL-terminated copies of keys and tensor names */
    uint32_t *by_name;          /* tensor indices sorted by name (find_tensor) */
};

uint64_t sj_gguf_value_size(int t) {
    switch (t) {
    case SJ_GGUF_UINT8: case SJ_GGUF_INT8: case SJ_GGUF_BOOL: return 1;
    case SJ_GGUF_UINT16: case SJ_GGUF_INT16: return 2;
    case SJ_GGUF_UINT32: case SJ_GGUF_INT32: case SJ_GGUF_FLOAT32: return 4;
    case SJ_GGUF_UINT64: case SJ_GGUF_INT64: case SJ_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

int sj_gguf_type_block(int type, int *block_elems, int *block_bytes) {
    int e = 1, b = 0;
    switch (type) {
    case SJ_GGUF_F32: b = 4; break;
    case SJ_GGUF_F16: case SJ_GGUF_BF16: b = 2; break;
    case SJ_GGUF_Q4_0: e = 32; b = 18; break;
    case SJ_GGUF_Q4_1: e = 32; b = 20; break;
    case SJ_GGUF_Q8_0: e = 32; b = 34; break;
    default: return 0;
    }
    if (block_elems) *block_elems = e;
    if (block_bytes) *block_bytes = b;
    return 1;
}

const char *sj_gguf_type_name(int type) {
    switch (type) {
    case SJ_GGUF_F32: return "F32"; case SJ_GGUF_F16: return "F16"; case SJ_GGUF_BF16: return "BF16";
    case SJ_GGUF_Q4_0: return "Q4_0"; case SJ_GGUF_Q4_1: return "Q4_1"; case SJ_GGUF_Q8_0: return "Q8_0";
    case 6: return "Q5_0"; case 7: return "Q5_1"; case 9: return "Q8_1"; case 10: return "Q2_K";
    case 11: return "Q3_K"; case 12: return "Q4_K"; case 13: return "Q5_K"; case 14: return "Q6_K";
    case 15: return "Q8_K";
    default: return "unknown";
    }
}

typedef struct { const sj_gguf_file *f; uint64_t pos; const char *what; } cursor;

static sj_status need(cursor *c, uint64_t n) {
    if (n > c->f->size || c->pos > c->f->size - n)
        return sj_fail(SJ_ERR_FORMAT, "%s: truncated: %s needs %llu bytes at offset %llu but the "
                       "file has %llu", c->f->path, c->what, (unsigned long long)n,
                       (unsigned long long)c->pos, (unsigned long long)c->f->size);
    return SJ_OK;
}
static sj_status rd(cursor *c, void *out, uint64_t n) {
    SJ_TRY(need(c, n));
    memcpy(out, c->f->map + c->pos, n);
    c->pos += n;
    return SJ_OK;
}
static sj_status rd_u32(cursor *c, uint32_t *v) { return rd(c, v, 4); }
static sj_status rd_u64(cursor *c, uint64_t *v) { return rd(c, v, 8); }
/* A string: u64 length then bytes (not NUL-terminated in the file). */
static sj_status rd_str(cursor *c, const char **s, uint64_t *len) {
    SJ_TRY(rd_u64(c, len));
    if (*len > MAX_STR)
        return sj_fail(SJ_ERR_FORMAT, "%s: %s: string length %llu is not plausible", c->f->path,
                       c->what, (unsigned long long)*len);
    SJ_TRY(need(c, *len));
    *s = (const char *)c->f->map + c->pos;
    c->pos += *len;
    return SJ_OK;
}

/* Keys and tensor names must be UTF-8 without NUL (GGUF says so; callers print them). */
static int valid_name(const char *s, uint64_t n) {
    const uint8_t *p = (const uint8_t *)s;
    for (uint64_t i = 0; i < n;) {
        uint8_t c = p[i];
        int k = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
        if (c == 0 || k < 0 || (c >= 0x80 && c < 0xC2) || c > 0xF4 || i + k >= n) return 0;
        for (int j = 1; j <= k; j++) if ((p[i + j] & 0xC0) != 0x80) return 0;
        i += (uint64_t)k + 1;
    }
    return n > 0;
}

void sj_gguf_close(sj_gguf_file *f) {
    if (!f) return;
    if (f->kv)
        for (uint64_t i = 0; i < f->n_kv; i++) { free((void *)f->kv[i].strs); free((void *)f->kv[i].str_lens); }
    if (f->map) munmap((void *)f->map, f->size);
    free(f->kv); free(f->t); free(f->names); free(f->by_name); free(f->path); free(f);
}

static char *dupn(const char *s, uint64_t n) {
    char *p = malloc(n + 1);
    if (p) { memcpy(p, s, n); p[n] = 0; }
    return p;
}

/* ---- whole-file checks, O(n log n) in the counts ------------------------- */

typedef struct { const char *s; uint32_t i; } name_ix;
static int cmp_name_ix(const void *a, const void *b) {
    const name_ix *x = a, *y = b;
    int c = strcmp(x->s, y->s);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}

/* Keys are unique (llama.cpp refuses duplicates too; with one, our lookups
 * and a Python dict of the metadata would disagree on the value). */
static sj_status check_keys(const sj_gguf_file *f) {
    if (f->n_kv < 2) return SJ_OK;
    name_ix *ix = malloc(f->n_kv * sizeof *ix);
    if (!ix) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", f->path);
    for (uint64_t i = 0; i < f->n_kv; i++) ix[i] = (name_ix){ f->kv[i].key, (uint32_t)i };
    qsort(ix, f->n_kv, sizeof *ix, cmp_name_ix);
    sj_status s = SJ_OK;
    for (uint64_t k = 1; k < f->n_kv && !s; k++)
        if (!strcmp(ix[k - 1].s, ix[k].s))
            s = sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' appears twice", f->path, ix[k].s);
    free(ix);
    return s;
}

/* Tensor names are unique, and the name index that find_tensor searches. */
static sj_status index_tensors(sj_gguf_file *f) {
    name_ix *ix = malloc((f->n_tensors + 1) * sizeof *ix);
    f->by_name = malloc((f->n_tensors + 1) * sizeof *f->by_name);
    if (!ix || !f->by_name) { free(ix); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", f->path); }
    for (uint64_t i = 0; i < f->n_tensors; i++) ix[i] = (name_ix){ f->t[i].name, (uint32_t)i };
    qsort(ix, f->n_tensors, sizeof *ix, cmp_name_ix);
    sj_status s = SJ_OK;
    for (uint64_t k = 0; k < f->n_tensors && !s; k++) {
        if (k && !strcmp(ix[k - 1].s, ix[k].s))
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' appears twice", f->path, ix[k].s);
        f->by_name[k] = ix[k].i;
    }
    free(ix);
    return s;
}

/* No two tensors share a byte of the data section: a writer never lays
 * them out so, and data that is two tensors at once is a corrupt index. */
static sj_status check_overlaps(const sj_gguf_file *f) {
    if (f->n_tensors < 2) return SJ_OK;
    sj_extent *e = malloc(f->n_tensors * sizeof *e);
    if (!e) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", f->path);
    for (uint64_t i = 0; i < f->n_tensors; i++)
        e[i] = (sj_extent){ f->t[i].offset, f->t[i].offset + f->t[i].nbytes, (int64_t)i };   /* in bounds: checked */
    qsort(e, f->n_tensors, sizeof *e, sj_extent_cmp);
    sj_status s = SJ_OK;
    uint64_t reach = 0;   /* the extent ending last so far */
    for (uint64_t k = 0; k < f->n_tensors && !s; k++) {
        if (k && e[k].begin < e[reach].end) {
            const sj_gguf_tensor *a = &f->t[e[reach].i], *b = &f->t[e[k].i];
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensors '%s' (data bytes %llu..%llu) and '%s' (%llu..%llu) "
                        "overlap", f->path, a->name, (unsigned long long)a->offset,
                        (unsigned long long)(a->offset + a->nbytes), b->name, (unsigned long long)b->offset,
                        (unsigned long long)(b->offset + b->nbytes));
        }
        if (!k || e[k].end > e[reach].end) reach = k;
    }
    free(e);
    return s;
}

/* bos/eos ids index the vocabulary: the tokenizer's token list and the
 * embedding's rows, whichever the file has (the smaller, if both). */
static sj_status check_special_ids(const sj_gguf_file *f) {
    static const char *keys[] = { "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id" };
    int64_t n_vocab = -1;
    char from[96] = "";
    const sj_gguf_kv *toks = sj_gguf_find_kv(f, "tokenizer.ggml.tokens");
    if (toks && toks->type == SJ_GGUF_ARRAY && toks->n <= INT64_MAX) {
        n_vocab = (int64_t)toks->n;
        snprintf(from, sizeof from, "tokenizer.ggml.tokens has %lld entries", (long long)n_vocab);
    }
    char emb_name[32];
    SJ_TRY(sj_tensor_name_map("tok_emb", SJ_NAMES_OURS, SJ_NAMES_GGUF, emb_name, sizeof emb_name));
    const sj_gguf_tensor *emb = sj_gguf_find_tensor(f, emb_name);
    if (emb && emb->ndim == 2 && (n_vocab < 0 || emb->shape[1] < n_vocab)) {
        n_vocab = emb->shape[1];
        snprintf(from, sizeof from, "%s has %lld rows", emb_name, (long long)n_vocab);
    }
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
        if (!sj_gguf_find_kv(f, keys[k])) continue;
        int64_t v;
        SJ_TRY(sj_gguf_get_int(f, keys[k], &v));
        if (v < 0)
            return sj_fail(SJ_ERR_FORMAT, "%s: %s = %lld is not a token id", f->path, keys[k], (long long)v);
        if (n_vocab >= 0 && v >= n_vocab)
            return sj_fail(SJ_ERR_FORMAT, "%s: %s = %lld is not a token id: the vocabulary has %lld (%s)",
                           f->path, keys[k], (long long)v, (long long)n_vocab, from);
    }
    return SJ_OK;
}

sj_status sj_gguf_open(const char *path, sj_gguf_file **out) {
    *out = NULL;
    sj_gguf_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) { free(f); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { sj_gguf_close(f); return sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno)); }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno; close(fd); sj_gguf_close(f);
        return sj_fail(SJ_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    f->size = (uint64_t)st.st_size;
    if (f->size < 24) {
        close(fd); sj_gguf_close(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: %llu bytes is too short for a GGUF header (24)", path,
                       (unsigned long long)st.st_size);
    }
    void *map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { sj_gguf_close(f); return sj_fail(SJ_ERR_IO, "%s: cannot map: %s", path, strerror(errno)); }
    f->map = map;
    sj_status s = SJ_OK;
    cursor c = { f, 0, "header" };
    uint32_t magic = 0, version = 0;
    rd_u32(&c, &magic); rd_u32(&c, &version);
    if (magic != GGUF_MAGIC) { s = sj_fail(SJ_ERR_FORMAT, "%s: not a GGUF file (bad magic)", path); goto fail; }
    if (version != 2 && version != 3) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: GGUF version %u is not supported (2 and 3 are)", path, version);
        goto fail;
    }
    f->version = (int)version;
    rd_u64(&c, &f->n_tensors); rd_u64(&c, &f->n_kv);
    if (f->n_tensors > MAX_TENSORS || f->n_kv > MAX_KV) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: implausible counts (%llu tensors, %llu metadata entries)", path,
                    (unsigned long long)f->n_tensors, (unsigned long long)f->n_kv);
        goto fail;
    }
    /* Each kv needs >= 12 bytes and each tensor info >= 24: refuse counts the file cannot hold
     * before allocating for them. */
    if (f->n_kv * 12 + f->n_tensors * 24 > f->size) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: truncated: %llu metadata entries and %llu tensors cannot fit "
                    "in %llu bytes", path, (unsigned long long)f->n_kv,
                    (unsigned long long)f->n_tensors, (unsigned long long)f->size);
        goto fail;
    }
    f->kv = calloc(f->n_kv ? f->n_kv : 1, sizeof *f->kv);
    f->t = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *f->t);
    if (!f->kv || !f->t) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail; }
    /* Names are copied into one block: sized after a first pass would cost a second parse;
     * instead each name is strdup'd into a growing block (realloc moves are fixed up below). */
    size_t names_cap = 4096, names_len = 0;
    f->names = malloc(names_cap);
    if (!f->names) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail; }
    uint64_t *key_off = calloc(f->n_kv + f->n_tensors + 1, sizeof *key_off);
    if (!key_off) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail; }
    f->alignment = 32;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        sj_gguf_kv *kv = &f->kv[i];
        const char *k; uint64_t klen;
        c.what = "metadata key";
        if ((s = rd_str(&c, &k, &klen))) goto fail_k;
        if (!valid_name(k, klen)) { s = sj_fail(SJ_ERR_FORMAT, "%s: metadata key %llu is empty or not valid UTF-8", path, (unsigned long long)i); goto fail_k; }
        if (names_len + klen + 1 > names_cap) {
            while (names_len + klen + 1 > names_cap) names_cap *= 2;
            char *p = realloc(f->names, names_cap);
            if (!p) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail_k; }
            f->names = p;
        }
        memcpy(f->names + names_len, k, klen);
        f->names[names_len + klen] = 0;
        key_off[i] = names_len;
        names_len += klen + 1;
        const char *kname = f->names + key_off[i];
        uint32_t vt;
        c.what = kname;
        if ((s = rd_u32(&c, &vt))) goto fail_k;
        kv->type = (int)vt;
        if (vt == SJ_GGUF_STRING) {
            const char *sv; uint64_t n;
            if ((s = rd_str(&c, &sv, &n))) goto fail_k;
            kv->data = sv; kv->n = n;
        } else if (vt == SJ_GGUF_ARRAY) {
            uint32_t at; uint64_t n;
            if ((s = rd_u32(&c, &at)) || (s = rd_u64(&c, &n))) goto fail_k;
            kv->arr_type = (int)at; kv->n = n;
            if (n > MAX_ARR) { s = sj_fail(SJ_ERR_FORMAT, "%s: key '%s': array of %llu elements is not plausible", path, kname, (unsigned long long)n); goto fail_k; }
            if (at == SJ_GGUF_STRING) {
                if (n * 8 > f->size - c.pos) { s = sj_fail(SJ_ERR_FORMAT, "%s: truncated: key '%s' claims %llu strings", path, kname, (unsigned long long)n); goto fail_k; }
                kv->strs = malloc((n ? n : 1) * sizeof(char *));
                kv->str_lens = malloc((n ? n : 1) * sizeof(uint64_t));
                if (!kv->strs || !kv->str_lens) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail_k; }
                for (uint64_t j = 0; j < n; j++) {
                    const char *sv; uint64_t len;
                    if ((s = rd_str(&c, &sv, &len))) goto fail_k;
                    ((const char **)kv->strs)[j] = sv;
                    ((uint64_t *)kv->str_lens)[j] = len;
                }
            } else {
                uint64_t es = sj_gguf_value_size((int)at);
                if (!es) { s = sj_fail(SJ_ERR_FORMAT, "%s: key '%s': array element type %u is not valid", path, kname, at); goto fail_k; }
                if ((s = need(&c, n * es))) goto fail_k;
                kv->data = f->map + c.pos;
                c.pos += n * es;
            }
        } else {
            uint64_t es = sj_gguf_value_size((int)vt);
            if (!es) { s = sj_fail(SJ_ERR_FORMAT, "%s: key '%s': value type %u is not valid", path, kname, vt); goto fail_k; }
            if ((s = need(&c, es))) goto fail_k;
            kv->data = f->map + c.pos; kv->n = 1;
            c.pos += es;
        }
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        sj_gguf_tensor *t = &f->t[i];
        const char *nm; uint64_t nlen;
        c.what = "tensor name";
        if ((s = rd_str(&c, &nm, &nlen))) goto fail_k;
        if (!valid_name(nm, nlen)) { s = sj_fail(SJ_ERR_FORMAT, "%s: tensor %llu: name is empty or not valid UTF-8", path, (unsigned long long)i); goto fail_k; }
        if (names_len + nlen + 1 > names_cap) {
            while (names_len + nlen + 1 > names_cap) names_cap *= 2;
            char *p = realloc(f->names, names_cap);
            if (!p) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); goto fail_k; }
            f->names = p;
        }
        memcpy(f->names + names_len, nm, nlen);
        f->names[names_len + nlen] = 0;
        key_off[f->n_kv + i] = names_len;
        names_len += nlen + 1;
        const char *tname = f->names + key_off[f->n_kv + i];
        c.what = tname;
        uint32_t nd, ty;
        if ((s = rd_u32(&c, &nd))) goto fail_k;
        if (nd < 1 || nd > MAX_DIMS) { s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' has %u dimensions (1 to %d allowed)", path, tname, nd, MAX_DIMS); goto fail_k; }
        t->ndim = (int)nd;
        uint64_t numel = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t v;
            if ((s = rd_u64(&c, &v))) goto fail_k;
            if (v == 0 || v > (1ull << 40) || numel > (1ull << 42) / v) {
                s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' dimension %u is %llu (not plausible)", path, tname, d, (unsigned long long)v);
                goto fail_k;
            }
            t->shape[d] = (int64_t)v;
            numel *= v;
        }
        for (int d = (int)nd; d < MAX_DIMS; d++) t->shape[d] = 1;
        if ((s = rd_u32(&c, &ty)) || (s = rd_u64(&c, &t->offset))) goto fail_k;
        t->type = (int)ty;
        int be, bb;
        if (!sj_gguf_type_block(t->type, &be, &bb)) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' has type %s (%u), which is not supported "
                        "(F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)", path, tname, sj_gguf_type_name(t->type), ty);
            goto fail_k;
        }
        if (t->shape[0] % be) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': row length %lld is not a multiple of the %s block (%d)", path, tname, (long long)t->shape[0], sj_gguf_type_name(t->type), be);
            goto fail_k;
        }
        t->numel = (int64_t)numel;
        t->nbytes = numel / be * bb;
    }
    /* Fix up name pointers now that the block no longer moves. */
    for (uint64_t i = 0; i < f->n_kv; i++) f->kv[i].key = f->names + key_off[i];
    for (uint64_t i = 0; i < f->n_tensors; i++) f->t[i].name = f->names + key_off[f->n_kv + i];
    free(key_off);
    const sj_gguf_kv *al = sj_gguf_find_kv(f, "general.alignment");
    if (al) {
        uint32_t a = 0;
        if (al->type != SJ_GGUF_UINT32) { s = sj_fail(SJ_ERR_FORMAT, "%s: general.alignment must be a uint32", path); goto fail; }
        memcpy(&a, al->data, 4);
        if (a == 0 || (a & (a - 1)) || a > 65536) { s = sj_fail(SJ_ERR_FORMAT, "%s: general.alignment %u is not a power of two <= 65536", path, a); goto fail; }
        f->alignment = a;
    }
    f->data_start = (c.pos + f->alignment - 1) / f->alignment * f->alignment;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        sj_gguf_tensor *t = &f->t[i];
        if (t->offset % f->alignment) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' data offset %llu is not aligned to %llu", path, t->name, (unsigned long long)t->offset, (unsigned long long)f->alignment);
            goto fail;
        }
        if (f->data_start > f->size || t->offset > f->size - f->data_start ||
            t->nbytes > f->size - f->data_start - t->offset) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' data runs past the end of the file (%llu bytes at %llu, file %llu)", path, t->name, (unsigned long long)t->nbytes, (unsigned long long)(f->data_start + t->offset), (unsigned long long)f->size);
            goto fail;
        }
        t->data = f->map + f->data_start + t->offset;
    }
    if ((s = check_keys(f)) || (s = index_tensors(f)) || (s = check_overlaps(f)) ||
        (s = check_special_ids(f)))
        goto fail;
    *out = f;
    return SJ_OK;
fail_k:
    free(key_off);
    for (uint64_t i = 0; i < f->n_kv; i++) f->kv[i].key = NULL;
fail:
    sj_gguf_close(f);
    return s ? s : SJ_ERR_FORMAT;
}

int sj_gguf_version(const sj_gguf_file *f) { return f->version; }
int sj_gguf_n_kv(const sj_gguf_file *f) { return (int)f->n_kv; }
const sj_gguf_kv *sj_gguf_kv_at(const sj_gguf_file *f, int i) {
    return i >= 0 && (uint64_t)i < f->n_kv ? &f->kv[i] : NULL;
}
const sj_gguf_kv *sj_gguf_find_kv(const sj_gguf_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++) if (!strcmp(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}
int sj_gguf_n_tensors(const sj_gguf_file *f) { return (int)f->n_tensors; }
const sj_gguf_tensor *sj_gguf_tensor_at(const sj_gguf_file *f, int i) {
    return i >= 0 && (uint64_t)i < f->n_tensors ? &f->t[i] : NULL;
}
const sj_gguf_tensor *sj_gguf_find_tensor(const sj_gguf_file *f, const char *name) {
    uint64_t lo = 0, hi = f->n_tensors;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->t[f->by_name[mid]].name, name);
        if (!c) return &f->t[f->by_name[mid]];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}
const char *sj_gguf_path(const sj_gguf_file *f) { return f->path; }

sj_status sj_gguf_get_int(const sj_gguf_file *f, const char *key, int64_t *out) {
    const sj_gguf_kv *kv = sj_gguf_find_kv(f, key);
    if (!kv) return sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' is missing", f->path, key);
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32; uint64_t u64; int64_t i64; } v;
    uint64_t es = sj_gguf_value_size((int)kv->type);
    if (kv->type == SJ_GGUF_FLOAT32 || kv->type == SJ_GGUF_FLOAT64 || kv->type == SJ_GGUF_BOOL || !es)
        return sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' must be an integer", f->path, key);
    memcpy(&v, kv->data, es);
    switch (kv->type) {
    case SJ_GGUF_UINT8: *out = v.u8; break; case SJ_GGUF_INT8: *out = v.i8; break;
    case SJ_GGUF_UINT16: *out = v.u16; break; case SJ_GGUF_INT16: *out = v.i16; break;
    case SJ_GGUF_UINT32: *out = v.u32; break; case SJ_GGUF_INT32: *out = v.i32; break;
    case SJ_GGUF_UINT64:
        if (v.u64 > INT64_MAX) return sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' is too large", f->path, key);
        *out = (int64_t)v.u64; break;
    default: *out = v.i64;
    }
    return SJ_OK;
}

sj_status sj_gguf_get_float(const sj_gguf_file *f, const char *key, double *out) {
    const sj_gguf_kv *kv = sj_gguf_find_kv(f, key);
    if (!kv) return sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' is missing", f->path, key);
    if (kv->type == SJ_GGUF_FLOAT32) { float x; memcpy(&x, kv->data, 4); *out = x; return SJ_OK; }
    if (kv->type == SJ_GGUF_FLOAT64) { memcpy(out, kv->data, 8); return SJ_OK; }
    int64_t i;
    SJ_TRY(sj_gguf_get_int(f, key, &i));
    *out = (double)i;
    return SJ_OK;
}

/* ---- writer ------------------------------------------------------------- */

typedef struct { uint8_t *p; size_t n, cap; int oom; } buf;
static void put(buf *b, const void *p, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (b->n + n > cap) cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = q; b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s, uint64_t n) { put_u64(b, n); put(b, s, n); }

sj_status sj_gguf_save(const char *path, const sj_gguf_kv *kv, int n_kv,
                       const sj_gguf_tensor *t, int n_t) {
    const uint64_t align = 32;
    buf b = { 0 };
    put_u32(&b, GGUF_MAGIC); put_u32(&b, 3); put_u64(&b, (uint64_t)n_t); put_u64(&b, (uint64_t)n_kv);
    for (int i = 0; i < n_kv; i++) {
        const sj_gguf_kv *k = &kv[i];
        put_str(&b, k->key, strlen(k->key));
        put_u32(&b, (uint32_t)k->type);
        if (k->type == SJ_GGUF_STRING) put_str(&b, k->data, k->n);
        else if (k->type == SJ_GGUF_ARRAY) {
            put_u32(&b, (uint32_t)k->arr_type); put_u64(&b, k->n);
            if (k->arr_type == SJ_GGUF_STRING)
                for (uint64_t j = 0; j < k->n; j++) put_str(&b, k->strs[j], k->str_lens[j]);
            else if (sj_gguf_value_size((int)k->arr_type)) put(&b, k->data, k->n * sj_gguf_value_size((int)k->arr_type));
            else { free(b.p); return sj_fail(SJ_ERR_ARG, "%s: key '%s': bad array element type %d", path, k->key, k->arr_type); }
        } else if (sj_gguf_value_size((int)k->type)) put(&b, k->data, sj_gguf_value_size((int)k->type));
        else { free(b.p); return sj_fail(SJ_ERR_ARG, "%s: key '%s': bad value type %d", path, k->key, k->type); }
    }
    uint64_t off = 0;
    for (int i = 0; i < n_t; i++) {
        int be, bb;
        if (!sj_gguf_type_block(t[i].type, &be, &bb) || t[i].ndim < 1 || t[i].ndim > MAX_DIMS ||
            t[i].shape[0] % be) {
            free(b.p);
            return sj_fail(SJ_ERR_ARG, "%s: tensor '%s': bad type or shape", path, t[i].name);
        }
        uint64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++) numel *= (uint64_t)t[i].shape[d];
        if (numel / be * bb != t[i].nbytes) {
            free(b.p);
            return sj_fail(SJ_ERR_ARG, "%s: tensor '%s': %llu data bytes, its shape and type need %llu", path, t[i].name, (unsigned long long)t[i].nbytes, (unsigned long long)(numel / be * bb));
        }
        put_str(&b, t[i].name, strlen(t[i].name));
        put_u32(&b, (uint32_t)t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) put_u64(&b, (uint64_t)t[i].shape[d]);
        put_u32(&b, (uint32_t)t[i].type);
        put_u64(&b, off);
        off = (off + t[i].nbytes + align - 1) / align * align;
    }
    static const uint8_t zeros[64];
    put(&b, zeros, (size_t)((align - b.n % align) % align));
    if (b.oom) { free(b.p); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    sj_afile af;
    sj_status s = sj_afile_open(&af, path);
    if (s) { free(b.p); return s; }
    s = sj_afile_write(&af, b.p, b.n);
    free(b.p);
    for (int i = 0; !s && i < n_t; i++) {
        s = sj_afile_write(&af, t[i].data, t[i].nbytes);
        uint64_t pad = (align - t[i].nbytes % align) % align;
        if (!s && pad && i + 1 < n_t) s = sj_afile_write(&af, zeros, pad);
    }
    if (s) return s;   /* failed writes abort (remove the temp file) themselves */
    return sj_afile_commit(&af);
}
