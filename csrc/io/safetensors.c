/* safetensors.c — the checkpoint container: a streaming atomic writer that
 * adds a CRC-32 per tensor to __metadata__, and a reader that maps the file
 * and trusts nothing in it: the header length, every offset, every size and
 * the tensor layout (contiguous, no overlaps, no holes) are checked against
 * the file length before a byte of data is handed out. Compatible both ways
 * with the reference implementation (pip `safetensors`). */
#include "io.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HEADER (100u << 20)   /* as the reference implementation */
#define CRC_PREFIX "crc32:"

static const struct { const char *name; size_t size; } dtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
    {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1},
    {"F8_E5M2", 1}, {"F8_E4M3", 1},
};

size_t sj_st_dtype_size(const char *dtype) {
    if (!dtype) return 0;
    for (size_t k = 0; k < sizeof dtypes / sizeof *dtypes; k++)
        if (strcmp(dtypes[k].name, dtype) == 0) return dtypes[k].size;
    return 0;
}

/* Bytes of a tensor; SJ_ERR_ARG/FORMAT on a bad dtype, shape or overflow. */
static sj_status tensor_bytes(const char *what, const char *name, const char *dtype, int ndim,
                              const int64_t *shape, sj_status code, uint64_t *out) {
    size_t es = sj_st_dtype_size(dtype);
    if (!es) return sj_fail(code, "%s: tensor '%s' has unknown dtype '%s'", what, name,
                            dtype ? dtype : "(null)");
    if (ndim < 0 || ndim > SJ_ST_MAX_DIMS)
        return sj_fail(code, "%s: tensor '%s' has %d dimensions (at most %d)", what, name, ndim,
                       SJ_ST_MAX_DIMS);
    uint64_t n = es;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return sj_fail(code, "%s: tensor '%s' has a negative dimension", what, name);
        if (__builtin_mul_overflow(n, (uint64_t)shape[d], &n))
            return sj_fail(code, "%s: tensor '%s' is too large (size overflows)", what, name);
    }
    *out = n;
    return SJ_OK;
}

/* ---- the header's own CRC ------------------------------------------------
 * "crc32:__header__" covers what the per-tensor CRCs cannot: the metadata
 * (config, step, ...) and each tensor's name, dtype and shape. It is taken
 * over a canonical form — non-CRC metadata sorted by key, then tensors
 * sorted by name — and leaves out data offsets, so a reader that re-lays
 * the same tensors out (the reference implementation sorts them) keeps it
 * valid; offsets are checked structurally and by the per-tensor CRCs. */
#define HEADER_CRC_KEY CRC_PREFIX "__header__"

static int cmp_meta(const void *a, const void *b) {
    return strcmp((*(const sj_st_meta *const *)a)->key, (*(const sj_st_meta *const *)b)->key);
}

/* Names sorted with their positions: duplicates end up side by side, and a
 * name is found by binary search. Every check over all names is O(n log n):
 * a header may index a million tensors (and as many CRC entries). `head`
 * holds the first 8 bytes big-endian, so most comparisons are one integer
 * compare. */
typedef struct { uint64_t head; const char *s; int i; } name_ix;
static uint64_t name_head(const char *s) {
    uint64_t h = 0;
    int k = 0;
    for (; k < 8 && s[k]; k++) h = h << 8 | (unsigned char)s[k];
    return k ? h << (8 * (8 - k)) : 0;   /* zero padded: a shorter name sorts first */
}
static name_ix name_at(const char *s, int i) { return (name_ix){ name_head(s), s, i }; }
/* strcmp order of the names. */
static int name_cmp(const name_ix *x, const name_ix *y) {
    if (x->head != y->head) return x->head < y->head ? -1 : 1;
    if ((x->head & 0xff) == 0) return 0;   /* equal and shorter than 8 bytes */
    return strcmp(x->s + 8, y->s + 8);
}
static int cmp_name_ix(const void *a, const void *b) {
    const name_ix *x = a, *y = b;
    int c = name_cmp(x, y);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}
/* Sorts ix; the first name (in sorted order) given twice, or NULL. */
static const char *sort_find_dup(name_ix *ix, int n) {
    qsort(ix, (size_t)n, sizeof *ix, cmp_name_ix);
    for (int k = 1; k < n; k++)
        if (name_cmp(&ix[k - 1], &ix[k]) == 0) return ix[k].s;
    return NULL;
}
/* Position of `s` in sorted ix, or -1. */
static int find_name(const name_ix *ix, int n, const char *s) {
    name_ix key = name_at(s, 0);
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, c = name_cmp(&ix[mid], &key);
        if (c == 0) return ix[mid].i;
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return -1;
}

static sj_status header_crc(const char *path, const sj_st_tensor *t, int n, const sj_st_meta *meta,
                            int n_meta, uint32_t *out) {
    const sj_st_meta **m = malloc(((size_t)n_meta + 1) * sizeof *m);
    name_ix *ix = malloc(((size_t)n + 1) * sizeof *ix);
    if (!m || !ix) { free(m); free(ix); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    int k = 0;
    for (int i = 0; i < n_meta; i++)
        if (strncmp(meta[i].key, CRC_PREFIX, strlen(CRC_PREFIX)) != 0) m[k++] = &meta[i];
    qsort(m, (size_t)k, sizeof *m, cmp_meta);
    for (int i = 0; i < n; i++) ix[i] = name_at(t[i].name, i);
    qsort(ix, (size_t)n, sizeof *ix, cmp_name_ix);
    uint32_t crc = 0;
    for (int i = 0; i < k; i++) {
        crc = sj_crc32(crc, m[i]->key, strlen(m[i]->key) + 1);      /* with the NUL */
        crc = sj_crc32(crc, m[i]->value, strlen(m[i]->value) + 1);
    }
    crc = sj_crc32(crc, "\1", 1);
    for (int i = 0; i < n; i++) {
        char dims[32];
        const sj_st_tensor *tp = &t[ix[i].i];
        crc = sj_crc32(crc, tp->name, strlen(tp->name) + 1);
        crc = sj_crc32(crc, tp->dtype, strlen(tp->dtype) + 1);
        for (int d = 0; d < tp->ndim; d++) {
            int len = snprintf(dims, sizeof dims, "%lld,", (long long)tp->shape[d]);
            crc = sj_crc32(crc, dims, (size_t)len);
        }
        crc = sj_crc32(crc, "", 1);
    }
    free(m); free(ix);
    *out = crc;
    return SJ_OK;
}

/* ---- a growable string ---------------------------------------------- */

typedef struct { char *p; size_t n, cap; int oom; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_fmt(sbuf *b, const char *fmt, long long v) {
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, fmt, v);
    sb_put(b, tmp, (size_t)k);
}
/* A JSON string literal; the caller guarantees valid UTF-8. */
static void sb_json(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\') { char e[2] = {'\\', (char)*c}; sb_put(b, e, 2); }
        else if (*c < 0x20) {
            char e[8];
            snprintf(e, sizeof e, "\\u%04x", *c);
            sb_put(b, e, 6);
        } else sb_put(b, (const char *)c, 1);
    }
    sb_put(b, "\"", 1);
}

/* Valid UTF-8, checked by the JSON parser itself (so the writer can never
 * produce a header that the reader refuses). */
static int valid_utf8(const char *s) {
    sbuf b = {0};
    sb_json(&b, s);
    if (b.oom) return 0;
    sj_json_doc j;
    sj_status st = sj_json_parse(b.p, b.n, "", &j);
    free(b.p);
    if (st) { sj_clear_error(); return 0; }
    sj_json_free(&j);
    return 1;
}

/* ---- writer ----------------------------------------------------------- */

struct sj_st_writer {
    sj_afile f;
    int n, cur;              /* tensors; the one being written          */
    uint64_t *size;          /* bytes per tensor                        */
    uint32_t *crc;
    size_t *crc_at;          /* where each CRC's 8 hex digits sit in hdr */
    uint64_t left;           /* bytes still owed to tensor cur          */
    char *hdr;               /* the 8-byte length + JSON + padding      */
    size_t hdr_len;
};

static void writer_free(sj_st_writer *w) {
    free(w->size); free(w->crc); free(w->crc_at); free(w->hdr);
    free(w);
}

void sj_st_writer_abort(sj_st_writer *w) {
    if (!w) return;
    sj_afile_abort(&w->f);
    writer_free(w);
}

static sj_status check_names(const char *path, const sj_st_tensor *t, int n,
                             const sj_st_meta *meta, int n_meta) {
    for (int i = 0; i < n; i++) {
        if (!t[i].name || !*t[i].name) return sj_fail(SJ_ERR_ARG, "%s: tensor %d has an empty name", path, i);
        if (!valid_utf8(t[i].name))
            return sj_fail(SJ_ERR_ARG, "%s: tensor name '%s' is not valid UTF-8", path, t[i].name);
        if (strcmp(t[i].name, "__metadata__") == 0)
            return sj_fail(SJ_ERR_ARG, "%s: '__metadata__' cannot name a tensor", path);
    }
    for (int i = 0; i < n_meta; i++) {
        if (!meta[i].key || !meta[i].value) return sj_fail(SJ_ERR_ARG, "%s: metadata entry %d is NULL", path, i);
        if (!valid_utf8(meta[i].key) || !valid_utf8(meta[i].value))
            return sj_fail(SJ_ERR_ARG, "%s: metadata '%s' is not valid UTF-8", path, meta[i].key);
        if (strncmp(meta[i].key, CRC_PREFIX, strlen(CRC_PREFIX)) == 0)
            return sj_fail(SJ_ERR_ARG, "%s: metadata key '%s' is reserved (the writer adds CRCs)",
                           path, meta[i].key);
    }
    name_ix *ix = malloc(((size_t)SJ_MAX(n, n_meta) + 1) * sizeof *ix);
    if (!ix) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path);
    const char *dup;
    for (int i = 0; i < n; i++) ix[i] = name_at(t[i].name, i);
    if ((dup = sort_find_dup(ix, n))) {
        sj_status s = sj_fail(SJ_ERR_ARG, "%s: tensor name '%s' given twice", path, dup);
        free(ix);
        return s;
    }
    for (int i = 0; i < n_meta; i++) ix[i] = name_at(meta[i].key, i);
    if ((dup = sort_find_dup(ix, n_meta))) {
        sj_status s = sj_fail(SJ_ERR_ARG, "%s: metadata key '%s' given twice", path, dup);
        free(ix);
        return s;
    }
    free(ix);
    return SJ_OK;
}

sj_status sj_st_writer_open(const char *path, const sj_st_tensor *t, int n,
                            const sj_st_meta *meta, int n_meta, sj_st_writer **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "safetensors: no path given");
    if (n < 0 || n_meta < 0 || (n && !t) || (n_meta && !meta))
        return sj_fail(SJ_ERR_ARG, "%s: bad tensor or metadata list", path);
    SJ_TRY(check_names(path, t, n, meta, n_meta));
    sj_st_writer *w = calloc(1, sizeof *w);
    if (!w) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path);
    w->f.fd = -1;
    w->n = n;
    w->size = calloc((size_t)n + 1, sizeof *w->size);
    w->crc = calloc((size_t)n + 1, sizeof *w->crc);
    w->crc_at = calloc((size_t)n + 1, sizeof *w->crc_at);
    if (!w->size || !w->crc || !w->crc_at) { writer_free(w); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    for (int i = 0; i < n; i++) {
        sj_status s = tensor_bytes(path, t[i].name, t[i].dtype, t[i].ndim, t[i].shape, SJ_ERR_ARG,
                                   &w->size[i]);
        if (s) { writer_free(w); return s; }
    }

    /* The header: 8 placeholder bytes for its length, then the JSON. */
    uint32_t hcrc;
    sj_status hs = header_crc(path, t, n, meta, n_meta, &hcrc);
    if (hs) { writer_free(w); return hs; }
    sbuf b = {0};
    sb_put(&b, "12345678", 8);
    sb_str(&b, "{");
    {
        sb_str(&b, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) sb_str(&b, ",");
            sb_json(&b, meta[i].key);
            sb_str(&b, ":");
            sb_json(&b, meta[i].value);
        }
        char hex[16];
        snprintf(hex, sizeof hex, "%08x", hcrc);
        if (n_meta) sb_str(&b, ",");
        sb_json(&b, HEADER_CRC_KEY);
        sb_str(&b, ":");
        sb_json(&b, hex);
        for (int i = 0; i < n; i++) {
            sb_str(&b, ",");
            char *key = malloc(strlen(t[i].name) + sizeof CRC_PREFIX);
            if (!key) { b.oom = 1; break; }
            strcpy(key, CRC_PREFIX);
            strcat(key, t[i].name);
            sb_json(&b, key);
            free(key);
            sb_str(&b, ":\"");
            w->crc_at[i] = b.n;
            sb_str(&b, "00000000\"");
        }
        sb_str(&b, "}");
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        sb_str(&b, ",");
        sb_json(&b, t[i].name);
        sb_str(&b, ":{\"dtype\":");
        sb_json(&b, t[i].dtype);
        sb_str(&b, ",\"shape\":[");
        for (int d = 0; d < t[i].ndim; d++) sb_fmt(&b, d ? ",%lld" : "%lld", (long long)t[i].shape[d]);
        sb_str(&b, "],\"data_offsets\":[");
        sb_fmt(&b, "%lld", (long long)off);
        off += w->size[i];
        sb_fmt(&b, ",%lld]}", (long long)off);
    }
    sb_str(&b, "}");
    while (b.n % 8) sb_str(&b, " ");   /* data starts 8-byte aligned */
    if (b.oom) { free(b.p); writer_free(w); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    uint64_t json_len = b.n - 8;
    for (int k = 0; k < 8; k++) b.p[k] = (char)(json_len >> (8 * k));
    w->hdr = b.p;
    w->hdr_len = b.n;

    sj_status s = sj_afile_open(&w->f, path);
    if (!s) s = sj_afile_write(&w->f, w->hdr, w->hdr_len);
    if (s) { sj_st_writer_abort(w); return s; }
    w->cur = 0;
    while (w->cur < n && w->size[w->cur] == 0) w->cur++;
    w->left = w->cur < n ? w->size[w->cur] : 0;
    *out = w;
    return SJ_OK;
}

sj_status sj_st_writer_write(sj_st_writer *w, const void *data, uint64_t nbytes) {
    if (w->f.fd < 0) return sj_fail(SJ_ERR_ARG, "safetensors: write to a writer that failed");
    const char *p = data;
    while (nbytes) {
        if (w->cur >= w->n) {
            sj_status s = sj_fail(SJ_ERR_ARG, "%s: %llu bytes more than the tensors hold", w->f.path,
                                  (unsigned long long)nbytes);
            sj_afile_abort(&w->f);
            return s;
        }
        uint64_t k = SJ_MIN(nbytes, w->left);
        w->crc[w->cur] = sj_crc32(w->crc[w->cur], p, (size_t)k);
        SJ_TRY(sj_afile_write(&w->f, p, (size_t)k));   /* on failure it removed the temp file */
        p += k; nbytes -= k; w->left -= k;
        while (w->cur < w->n && w->left == 0) {
            w->cur++;
            while (w->cur < w->n && w->size[w->cur] == 0) w->cur++;
            w->left = w->cur < w->n ? w->size[w->cur] : 0;
        }
    }
    return SJ_OK;
}

sj_status sj_st_writer_close(sj_st_writer *w) {
    if (w->f.fd < 0) {
        writer_free(w);
        return sj_fail(SJ_ERR_ARG, "safetensors: close of a writer that already failed");
    }
    if (w->cur < w->n) {
        sj_status s = sj_fail(SJ_ERR_ARG, "%s: closed before all tensor data was written "
                              "(tensor %d still owes %llu bytes)", w->f.path, w->cur,
                              (unsigned long long)w->left);
        sj_st_writer_abort(w);
        return s;
    }
    for (int i = 0; i < w->n; i++) {
        char hex[9];
        snprintf(hex, sizeof hex, "%08x", w->crc[i]);
        memcpy(w->hdr + w->crc_at[i], hex, 8);
    }
    sj_status s = sj_afile_pwrite(&w->f, w->hdr, w->hdr_len, 0);
    if (!s) s = sj_afile_commit(&w->f);
    writer_free(w);   /* on failure the afile already removed the temp file */
    return s;
}

sj_status sj_safetensors_save(const char *path, const sj_st_tensor *t, int n,
                              const sj_st_meta *meta, int n_meta) {
    sj_st_writer *w;
    SJ_TRY(sj_st_writer_open(path, t, n, meta, n_meta, &w));
    for (int i = 0; i < n; i++) {
        if (w->size[i] && !t[i].data) {
            sj_status s = sj_fail(SJ_ERR_ARG, "%s: tensor '%s' has no data", path, t[i].name);
            sj_st_writer_abort(w);
            return s;
        }
        sj_status s = sj_st_writer_write(w, t[i].data, w->size[i]);
        if (s) { sj_st_writer_abort(w); return s; }
    }
    return sj_st_writer_close(w);
}

/* ---- reader ----------------------------------------------------------- */

struct sj_st_file {
    char *path;
    unsigned char *map;
    uint64_t size;
    sj_st_tensor *t;
    int n;
    sj_st_meta *meta;
    int n_meta;
    sj_json_doc root;        /* owns every string the entries point at */
};

void sj_safetensors_close(sj_st_file *f) {
    if (!f) return;
    if (f->map && f->size) munmap(f->map, f->size);
    free(f->t);
    free(f->meta);
    sj_json_free(&f->root);
    free(f->path);
    free(f);
}

int sj_safetensors_n_tensors(const sj_st_file *f) { return f->n; }
const sj_st_tensor *sj_safetensors_tensor(const sj_st_file *f, int i) {
    return i >= 0 && i < f->n ? &f->t[i] : NULL;
}
int sj_safetensors_n_meta(const sj_st_file *f) { return f->n_meta; }
const sj_st_meta *sj_safetensors_meta(const sj_st_file *f, int i) {
    return i >= 0 && i < f->n_meta ? &f->meta[i] : NULL;
}
const char *sj_safetensors_meta_get(const sj_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0) return f->meta[i].value;
    return NULL;
}
void *sj_safetensors_bytes(sj_st_file *f, uint64_t *size) {
    *size = f->size;
    return f->map;
}

/* A key that an object holds twice, or NULL; *oom on allocation failure. */
static const char *dup_member(const sj_json *obj, int *oom) {
    *oom = 0;
    if (obj->n < 2) return NULL;
    name_ix *ix = malloc((size_t)obj->n * sizeof *ix);
    if (!ix) { *oom = 1; return NULL; }
    for (int k = 0; k < obj->n; k++) ix[k] = name_at(obj->kids[k].key, k);
    const char *dup = sort_find_dup(ix, obj->n);
    free(ix);
    return dup;
}

/* One tensor entry: {"dtype": str, "shape": [int...], "data_offsets": [b, e]}. */
static sj_status parse_entry(const char *path, const sj_json *e, uint64_t data_len, sj_st_tensor *t,
                             uint64_t *begin, uint64_t *end) {
    const char *name = e->key;
    if (e->type != SJ_JSON_OBJ)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': expected an object, got %s", path, name,
                       sj_json_type_name(e->type));
    const sj_json *dt = NULL, *sh = NULL, *off = NULL;
    for (int k = 0; k < e->n; k++) {
        const char *key = e->kids[k].key;
        const sj_json **slot = !strcmp(key, "dtype") ? &dt : !strcmp(key, "shape") ? &sh
                             : !strcmp(key, "data_offsets") ? &off : NULL;
        if (!slot) return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': unknown field '%s'", path, name, key);
        if (*slot) return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': field '%s' given twice", path, name, key);
        *slot = &e->kids[k];
    }
    if (!dt || !sh || !off)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': missing '%s'", path, name,
                       !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    if (dt->type != SJ_JSON_STR || !sj_st_dtype_size(dt->str))
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': unknown dtype %s%s%s", path, name,
                       dt->type == SJ_JSON_STR ? "'" : "", dt->type == SJ_JSON_STR ? dt->str
                       : sj_json_type_name(dt->type), dt->type == SJ_JSON_STR ? "'" : "");
    if (sh->type != SJ_JSON_ARR || sh->n > SJ_ST_MAX_DIMS)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': shape must be a list of at most %d sizes",
                       path, name, SJ_ST_MAX_DIMS);
    t->name = name;
    t->dtype = dt->str;
    t->ndim = sh->n;
    for (int d = 0; d < sh->n; d++) {
        if (sh->kids[d].type != SJ_JSON_NUM || !sh->kids[d].is_int || sh->kids[d].i < 0)
            return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer",
                           path, name, d);
        t->shape[d] = sh->kids[d].i;
    }
    if (off->type != SJ_JSON_ARR || off->n != 2)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': data_offsets must be [begin, end]", path, name);
    for (int k = 0; k < 2; k++)
        if (off->kids[k].type != SJ_JSON_NUM || !off->kids[k].is_int || off->kids[k].i < 0)
            return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': data_offsets[%d] is not a non-negative integer",
                           path, name, k);
    *begin = (uint64_t)off->kids[0].i;
    *end = (uint64_t)off->kids[1].i;
    if (*begin > *end)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] run backwards",
                       path, name, (unsigned long long)*begin, (unsigned long long)*end);
    if (*end > data_len)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] lie outside the "
                       "%llu bytes of data (file truncated?)", path, name, (unsigned long long)*begin,
                       (unsigned long long)*end, (unsigned long long)data_len);
    uint64_t need;
    SJ_TRY(tensor_bytes(path, name, t->dtype, t->ndim, t->shape, SJ_ERR_FORMAT, &need));
    if (need != *end - *begin)
        return sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': data_offsets span %llu bytes but its shape "
                       "and dtype %s need %llu", path, name, (unsigned long long)(*end - *begin),
                       t->dtype, (unsigned long long)need);
    return SJ_OK;
}


typedef struct { sj_st_file *f; int *idx; uint32_t *got; } crc_job;
static void crc_range(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    crc_job *j = ctx;
    for (int64_t k = b; k < e; k++) {
        const sj_st_tensor *t = &j->f->t[j->idx[k]];
        j->got[k] = sj_crc32(0, t->data, (size_t)t->nbytes);
    }
}

static int hexval(const char *s, uint32_t *out) {
    if (strlen(s) != 8) return -1;
    uint32_t v = 0;
    for (int k = 0; k < 8; k++) {
        char c = s[k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static sj_status verify_crcs(sj_st_file *f) {
    size_t pl = strlen(CRC_PREFIX);
    int n = 0;
    for (int m = 0; m < f->n_meta; m++) n += strncmp(f->meta[m].key, CRC_PREFIX, pl) == 0;
    if (!n) return SJ_OK;
    int *idx = malloc((size_t)n * sizeof *idx);
    uint32_t *want = malloc((size_t)n * sizeof *want), *got = malloc((size_t)n * sizeof *got);
    name_ix *by_name = malloc(((size_t)f->n + 1) * sizeof *by_name);
    sj_status s = SJ_OK;
    int have_header = 0;
    if (!idx || !want || !got || !by_name) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", f->path); goto done; }
    for (int i = 0; i < f->n; i++) by_name[i] = name_at(f->t[i].name, i);
    qsort(by_name, (size_t)f->n, sizeof *by_name, cmp_name_ix);   /* names are unique (checked) */
    n = 0;
    for (int m = 0; m < f->n_meta && !s; m++) {
        const char *key = f->meta[m].key;
        if (strncmp(key, CRC_PREFIX, pl) != 0) continue;
        if (strcmp(key, HEADER_CRC_KEY) == 0) {
            uint32_t want_h, got_h;
            have_header = 1;
            if (hexval(f->meta[m].value, &want_h) < 0)
                s = sj_fail(SJ_ERR_FORMAT, "%s: header CRC entry '%s' is not 8 hex digits", f->path,
                            f->meta[m].value);
            else if (!(s = header_crc(f->path, f->t, f->n, f->meta, f->n_meta, &got_h)) && got_h != want_h)
                s = sj_fail(SJ_ERR_FORMAT, "%s: header CRC mismatch (stored %08x, header gives %08x): "
                            "metadata or tensor index corrupt", f->path, want_h, got_h);
            continue;
        }
        int i = find_name(by_name, f->n, key + pl);
        if (i < 0)
            s = sj_fail(SJ_ERR_FORMAT, "%s: metadata has a CRC for tensor '%s' but the file holds "
                        "no such tensor (corrupt header?)", f->path, key + pl);
        else if (hexval(f->meta[m].value, &want[n]) < 0)
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s': CRC entry '%s' is not 8 hex digits",
                        f->path, key + pl, f->meta[m].value);
        else idx[n++] = i;
    }
    /* Our writer always pairs them: per-tensor CRCs without the header's
     * mean its key was damaged. */
    if (!s && n && !have_header)
        s = sj_fail(SJ_ERR_FORMAT, "%s: tensor CRCs present but the header CRC '%s' is missing "
                    "(corrupt header?)", f->path, HEADER_CRC_KEY);
    if (s) goto done;
    crc_job job = { f, idx, got };
    sj_parallel_for(n, 1, crc_range, &job);
    for (int k = 0; k < n; k++)
        if (got[k] != want[k]) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: tensor '%s' CRC mismatch (stored %08x, data gives %08x): "
                        "the file is corrupt", f->path, f->t[idx[k]].name, want[k], got[k]);
            break;
        }
done:
    free(idx); free(want); free(got); free(by_name);
    return s;
}

static sj_status parse_header(sj_st_file *f, uint64_t hlen) {
    const char *path = f->path;
    SJ_TRY(sj_json_parse((const char *)f->map + 8, (size_t)hlen, path, &f->root));
    const sj_json *r = &f->root.root;
    if (r->type != SJ_JSON_OBJ)
        return sj_fail(SJ_ERR_FORMAT, "%s: header JSON must be an object, got %s", path,
                       sj_json_type_name(r->type));
    uint64_t data_len = f->size - 8 - hlen;
    f->t = calloc((size_t)r->n + 1, sizeof *f->t);
    sj_extent *sp = calloc((size_t)r->n + 1, sizeof *sp);
    if (!f->t || !sp) { free(sp); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    sj_status s = SJ_OK;
    int oom;
    const char *dup = dup_member(r, &oom);
    if (oom) s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path);
    else if (dup) s = sj_fail(SJ_ERR_FORMAT, "%s: '%s' appears twice in the header", path, dup);
    for (int k = 0; k < r->n && !s; k++) {
        const sj_json *e = &r->kids[k];
        if (strcmp(e->key, "__metadata__") == 0) {
            if (e->type != SJ_JSON_OBJ) { s = sj_fail(SJ_ERR_FORMAT, "%s: __metadata__ must be an object", path); break; }
            f->meta = calloc((size_t)e->n + 1, sizeof *f->meta);
            if (!f->meta) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); break; }
            dup = dup_member(e, &oom);
            if (oom) { s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); break; }
            if (dup) { s = sj_fail(SJ_ERR_FORMAT, "%s: metadata key '%s' appears twice", path, dup); break; }
            for (int m = 0; m < e->n && !s; m++) {
                if (e->kids[m].type != SJ_JSON_STR)
                    s = sj_fail(SJ_ERR_FORMAT, "%s: metadata '%s' must be a string, got %s", path,
                                e->kids[m].key, sj_json_type_name(e->kids[m].type));
                else f->meta[f->n_meta++] = (sj_st_meta){ e->kids[m].key, e->kids[m].str };
            }
            continue;
        }
        sj_st_tensor *t = &f->t[f->n];
        uint64_t b = 0, en = 0;
        s = parse_entry(path, e, data_len, t, &b, &en);
        if (s) break;
        t->offset = 8 + hlen + b;
        t->nbytes = en - b;
        t->data = f->map + t->offset;
        sp[f->n] = (sj_extent){ b, en, f->n };
        f->n++;
    }
    if (!s) {
        /* The data must be covered exactly: no overlaps, no holes, nothing after. */
        qsort(sp, (size_t)f->n, sizeof *sp, sj_extent_cmp);
        uint64_t at = 0;
        for (int k = 0; k < f->n && !s; k++) {
            if (sp[k].begin < at)
                s = sj_fail(SJ_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap", path,
                            f->t[sp[k - 1].i].name, f->t[sp[k].i].name);
            else if (sp[k].begin > at)
                s = sj_fail(SJ_ERR_FORMAT, "%s: %llu bytes of data before tensor '%s' belong to no "
                            "tensor", path, (unsigned long long)(sp[k].begin - at), f->t[sp[k].i].name);
            at = sp[k].end;
        }
        if (!s && at != data_len)
            s = sj_fail(SJ_ERR_FORMAT, "%s: the header indexes %llu bytes of data but the file holds %llu "
                        "after the header", path, (unsigned long long)at, (unsigned long long)data_len);
    }
    free(sp);
    return s;
}

sj_status sj_safetensors_open(const char *path, int verify_crc, sj_st_file **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "safetensors: no path given");
    sj_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) { free(f); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    sj_status s = SJ_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { s = sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno)); goto fail; }
    if (fstat(fd, &st) != 0) { s = sj_fail(SJ_ERR_IO, "%s: cannot stat: %s", path, strerror(errno)); goto fail; }
    if (!S_ISREG(st.st_mode)) { s = sj_fail(SJ_ERR_IO, "%s: not a regular file", path); goto fail; }
    f->size = (uint64_t)st.st_size;
    if (f->size < 8) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: %llu bytes is too short for a safetensors file (the header "
                    "length alone is 8)", path, (unsigned long long)f->size);
        goto fail;
    }
    /* Private and writable: NumPy views over it are writable, and writes
     * stay in memory (copy-on-write) instead of reaching the file. */
    void *map = mmap(NULL, (size_t)f->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) { s = sj_fail(SJ_ERR_IO, "%s: cannot map: %s", path, strerror(errno)); goto fail; }
    close(fd);
    fd = -1;
    f->map = map;
    uint64_t hlen = 0;
    for (int k = 0; k < 8; k++) hlen |= (uint64_t)f->map[k] << (8 * k);
    if (hlen > f->size - 8) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: header length %llu exceeds the %llu bytes after it (truncated, "
                    "or not a safetensors file)", path, (unsigned long long)hlen,
                    (unsigned long long)(f->size - 8));
        goto fail;
    }
    if (hlen > MAX_HEADER) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: header length %llu is over the %u-byte limit", path,
                    (unsigned long long)hlen, MAX_HEADER);
        goto fail;
    }
    if (hlen < 2 || f->map[8] != '{') {
        s = sj_fail(SJ_ERR_FORMAT, "%s: not a safetensors file (header does not start with '{')", path);
        goto fail;
    }
    s = parse_header(f, hlen);
    if (!s && verify_crc) s = verify_crcs(f);
    if (s) goto fail;
    *out = f;
    return SJ_OK;
fail:
    if (fd >= 0) close(fd);
    sj_safetensors_close(f);
    return s;
}
