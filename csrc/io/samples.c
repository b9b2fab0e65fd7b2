/* samples.c — the bin2d sample file reader (format: smedjan.h, docs/formats.md)
 * and batch assembly. Open checks every header field against the file
 * length before anything is allocated from it, then every length, the span
 * index and every span. Tokens are read into memory at open (MEMORY) or with
 * pread() per batch (MMAP: never through a mapping, see pread.c). Must never
 * allocate from a field it has not checked against the file's size. */
#include "io.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


struct sj_samples {
    int fd;
    char *path;
    uint64_t size;              /* the length checked at open */
    sj_samples_info info;
    int64_t vocab_size;         /* 0: ids unchecked */
    uint32_t *tokens;           /* (n_rows, stride) in MEMORY mode, else NULL */
    uint32_t *lengths;          /* (n_rows) */
    uint64_t *span_start;       /* (n_rows + 1), with a label index */
    uint32_t *spans;            /* (n_spans, 2) */
};

static uint64_t get_le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int k = 0; k < bytes; k++) v |= (uint64_t)p[k] << (8 * k);
    return v;
}

/* Little-endian words read from the file into host order, in place. */
static void host_order(void *p, size_t n, int width) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++, b += width)
        for (int k = 0; k < width / 2; k++) {
            unsigned char t = b[k]; b[k] = b[width - 1 - k]; b[width - 1 - k] = t;
        }
#else
    (void)p; (void)n; (void)width;
#endif
}

/* Read `count` words of `width` bytes at `at` into a new allocation. */
static sj_status read_array(sj_samples *f, uint64_t at, uint64_t count, int width, const char *what,
                            void **out) {
    *out = sj_alloc((size_t)(count * width), what);
    if (!*out) return SJ_ERR_NOMEM;
    SJ_TRY(sj_pread_exact(f->fd, f->path, *out, (size_t)(count * width), at, f->size));
    host_order(*out, (size_t)count, width);
    return SJ_OK;
}

/* The header against the file length: *sections gets the byte offsets of
 * tokens, lengths, span_start and spans. */
static sj_status check_header(sj_samples *f, uint64_t sections[4]) {
    const char *path = f->path;
    struct stat st;
    unsigned char h[SJ_SAMPLES_HEADER_BYTES];
    if (fstat(f->fd, &st) != 0) return sj_fail(SJ_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return sj_fail(SJ_ERR_IO, "%s: not a regular file", path);
    f->size = (uint64_t)st.st_size;
    if (f->size < SJ_SAMPLES_HEADER_BYTES)
        return sj_fail(SJ_ERR_FORMAT, "%s: %llu bytes is too short for a bin2d file (the header alone "
                       "is %d)", path, (unsigned long long)f->size, SJ_SAMPLES_HEADER_BYTES);
    SJ_TRY(sj_pread_exact(f->fd, path, h, sizeof h, 0, f->size));
    if (memcmp(h, SJ_SAMPLES_MAGIC, 8) != 0)
        return sj_fail(SJ_ERR_FORMAT, "%s: not a bin2d sample file (magic is not \"SMJBIN2D\")", path);
    sj_samples_info *i = &f->info;
    i->version = (uint32_t)get_le(h + 8, 4);
    i->stride = (uint32_t)get_le(h + 12, 4);
    uint64_t n_rows = get_le(h + 16, 8), n_spans = get_le(h + 24, 8);
    i->flags = (uint32_t)get_le(h + 32, 4);
    i->pad_id = (uint32_t)get_le(h + 36, 4);
    if (i->version != 1)
        return sj_fail(SJ_ERR_FORMAT, "%s: bin2d version %u (this smedjan reads version 1)", path,
                       i->version);
    if (i->flags & ~(uint32_t)SJ_SAMPLES_LABEL_INDEX)
        return sj_fail(SJ_ERR_FORMAT, "%s: flags 0x%x has unknown bits (only bit 0, the label index, "
                       "is defined)", path, i->flags);
    for (int k = 40; k < SJ_SAMPLES_HEADER_BYTES; k++)
        if (h[k]) return sj_fail(SJ_ERR_FORMAT, "%s: reserved header byte %d is 0x%02x, not 0", path, k, h[k]);
    if (i->stride < 2)
        return sj_fail(SJ_ERR_FORMAT, "%s: stride %u (a row needs at least 2 tokens)", path, i->stride);
    const int labelled = (i->flags & SJ_SAMPLES_LABEL_INDEX) != 0;
    if (!labelled && n_spans)
        return sj_fail(SJ_ERR_FORMAT, "%s: n_spans is %llu but flags say there is no label index",
                       path, (unsigned long long)n_spans);
    /* 64 + 4 n stride + 4 n (+ 8 (n + 1) + 8 n_spans), each step checked. */
    uint64_t row_bytes = 4 * (uint64_t)i->stride + 4 + (labelled ? 8 : 0), body, need;
    int overflow = __builtin_mul_overflow(n_rows, row_bytes, &body) |
                   __builtin_add_overflow(body, (uint64_t)SJ_SAMPLES_HEADER_BYTES + (labelled ? 8 : 0), &need);
    uint64_t span_bytes;
    overflow |= __builtin_mul_overflow(n_spans, (uint64_t)8, &span_bytes) |
                __builtin_add_overflow(need, span_bytes, &need);
    if (overflow || need != f->size || n_rows > (uint64_t)INT64_MAX / 2) {
        if (labelled)
            return sj_fail(SJ_ERR_FORMAT, "%s: header says %llu rows of stride %u and %llu spans, which "
                           "%s, but the file is %llu bytes (wrong stride, or cut short?)", path,
                           (unsigned long long)n_rows, i->stride, (unsigned long long)n_spans,
                           overflow ? "is out of range" : "need a different size", (unsigned long long)f->size);
        return sj_fail(SJ_ERR_FORMAT, "%s: header says %llu rows of stride %u, which %s, but the file is "
                       "%llu bytes (wrong stride, or cut short?)", path, (unsigned long long)n_rows,
                       i->stride, overflow ? "is out of range" : "need a different size",
                       (unsigned long long)f->size);
    }
    if (f->vocab_size > 0 && i->pad_id >= (uint64_t)f->vocab_size)
        return sj_fail(SJ_ERR_FORMAT, "%s: pad_id %u is not below the vocabulary size %lld", path,
                       i->pad_id, (long long)f->vocab_size);
    i->n_rows = (int64_t)n_rows;
    i->n_spans = (int64_t)n_spans;
    sections[0] = SJ_SAMPLES_HEADER_BYTES;
    sections[1] = sections[0] + 4 * n_rows * i->stride;
    sections[2] = sections[1] + 4 * n_rows;
    sections[3] = sections[2] + 8 * (n_rows + 1);
    return SJ_OK;
}

static sj_status check_lengths(const sj_samples *f) {
    for (int64_t r = 0; r < f->info.n_rows; r++)
        if (f->lengths[r] < 2 || f->lengths[r] > f->info.stride)
            return sj_fail(SJ_ERR_FORMAT, "%s: row %lld: length %u is outside [2, stride %u]", f->path,
                           (long long)r, f->lengths[r], f->info.stride);
    return SJ_OK;
}

static sj_status check_spans(const sj_samples *f) {
    const uint64_t *ss = f->span_start;
    const int64_t n = f->info.n_rows;
    if (ss[0] != 0)
        return sj_fail(SJ_ERR_FORMAT, "%s: span_start[0] is %llu, not 0", f->path, (unsigned long long)ss[0]);
    if (ss[n] != (uint64_t)f->info.n_spans)
        return sj_fail(SJ_ERR_FORMAT, "%s: span_start[%lld] (the last) is %llu, not n_spans %lld", f->path,
                       (long long)n, (unsigned long long)ss[n], (long long)f->info.n_spans);
    for (int64_t r = 0; r < n; r++) {
        if (ss[r + 1] < ss[r])
            return sj_fail(SJ_ERR_FORMAT, "%s: row %lld: span_start goes back from %llu to %llu", f->path,
                           (long long)r, (unsigned long long)ss[r], (unsigned long long)ss[r + 1]);
        if (ss[r + 1] > (uint64_t)f->info.n_spans)
            return sj_fail(SJ_ERR_FORMAT, "%s: row %lld: span_start %llu is past n_spans %lld", f->path,
                           (long long)r, (unsigned long long)ss[r + 1], (long long)f->info.n_spans);
        uint32_t prev_end = 1;
        for (uint64_t k = ss[r]; k < ss[r + 1]; k++) {
            uint32_t b = f->spans[2 * k], e = f->spans[2 * k + 1];
            if (b < prev_end || b >= e || e > f->lengths[r])
                return sj_fail(SJ_ERR_FORMAT, "%s: row %lld (length %u): span %llu [%u, %u) is %s", f->path,
                               (long long)r, f->lengths[r], (unsigned long long)k, b, e,
                               b >= e ? "empty or reversed" : e > f->lengths[r] ? "past the row's end" :
                               b == 0 ? "at position 0 (which has no previous token)" :
                               "out of order or overlapping the previous span");
            prev_end = e;
        }
    }
    return SJ_OK;
}

/* Real tokens of row r (n of them, from `tok`) below the vocabulary size. */
static sj_status check_ids(const sj_samples *f, int64_t r, const uint32_t *tok, uint32_t n) {
    const uint64_t vocab = (uint64_t)f->vocab_size;
    for (uint32_t t = 0; t < n; t++)
        if (tok[t] >= vocab)
            return sj_fail(SJ_ERR_FORMAT, "%s: row %lld, position %u: token id %u is not below the "
                           "vocabulary size %lld", f->path, (long long)r, t, tok[t], (long long)f->vocab_size);
    return SJ_OK;
}

sj_status sj_samples_open(const char *path, sj_samples_load load, int64_t vocab_size, sj_samples **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "samples: no path given");
    if (load != SJ_SAMPLES_MMAP && load != SJ_SAMPLES_MEMORY)
        return sj_fail(SJ_ERR_ARG, "%s: load mode %d (expected memory or mmap)", path, (int)load);
    if (vocab_size < 0) return sj_fail(SJ_ERR_ARG, "%s: vocab_size %lld < 0", path, (long long)vocab_size);
    sj_samples *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) { free(f); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    f->vocab_size = vocab_size;
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        sj_status s = sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        free(f->path); free(f);
        return s;
    }
    uint64_t at[4] = {0};
    const sj_samples_info *i = &f->info;
    sj_status s = check_header(f, at);
    if (!s) s = read_array(f, at[1], (uint64_t)i->n_rows, 4, "bin2d lengths", (void **)&f->lengths);
    if (!s) s = check_lengths(f);
    if (!s && (i->flags & SJ_SAMPLES_LABEL_INDEX)) {
        s = read_array(f, at[2], (uint64_t)i->n_rows + 1, 8, "bin2d span index", (void **)&f->span_start);
        if (!s) s = read_array(f, at[3], 2 * (uint64_t)i->n_spans, 4, "bin2d spans", (void **)&f->spans);
        if (!s) s = check_spans(f);
    }
    if (!s && load == SJ_SAMPLES_MEMORY) {
        s = read_array(f, at[0], (uint64_t)i->n_rows * i->stride, 4, "bin2d tokens", (void **)&f->tokens);
        for (int64_t r = 0; !s && vocab_size > 0 && r < i->n_rows; r++)
            s = check_ids(f, r, f->tokens + r * i->stride, f->lengths[r]);
    }
    if (s) { sj_samples_close(f); return s; }
    *out = f;
    return SJ_OK;
}

void sj_samples_close(sj_samples *f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    sj_free(f->tokens);
    sj_free(f->lengths);
    sj_free(f->span_start);
    sj_free(f->spans);
    free(f->path);
    free(f);
}

const sj_samples_info *sj_samples_file_info(const sj_samples *f) { return &f->info; }
const uint32_t *sj_samples_lengths(const sj_samples *f) { return f->lengths; }
const uint64_t *sj_samples_span_start(const sj_samples *f) { return f->span_start; }
const uint32_t *sj_samples_spans(const sj_samples *f) { return f->spans; }

/* Row r's first n tokens into x (T of them at most) and the (T+1)-th, when
 * n = T + 1, into *last. */
static sj_status row_tokens(const sj_samples *f, int64_t r, uint32_t n, int T, uint32_t *x, uint32_t *last) {
    const uint32_t in_x = SJ_MIN(n, (uint32_t)T);
    if (f->tokens) {
        const uint32_t *src = f->tokens + r * f->info.stride;
        memcpy(x, src, (size_t)in_x * 4);
        if (n > in_x) *last = src[in_x];
        return SJ_OK;
    }
    const uint64_t at = SJ_SAMPLES_HEADER_BYTES + 4 * (uint64_t)r * f->info.stride;
    SJ_TRY(sj_pread_exact(f->fd, f->path, x, (size_t)in_x * 4, at, f->size));
    host_order(x, in_x, 4);
    if (n > in_x) {
        SJ_TRY(sj_pread_exact(f->fd, f->path, last, 4, at + 4 * (uint64_t)in_x, f->size));
        host_order(last, 1, 4);
    }
    if (f->vocab_size > 0) {
        SJ_TRY(check_ids(f, r, x, in_x));
        if (n > in_x && *last >= (uint64_t)f->vocab_size)
            return sj_fail(SJ_ERR_FORMAT, "%s: row %lld, position %u: token id %u is not below the "
                           "vocabulary size %lld", f->path, (long long)r, in_x, *last,
                           (long long)f->vocab_size);
    }
    return SJ_OK;
}

/* One row of x, y (T each); returns the labels set through *labels. */
static sj_status fill_row(const sj_samples *f, int64_t r, int T, int32_t *x, int32_t *y, int64_t *labels) {
    const int32_t pad = (int32_t)f->info.pad_id;
    for (int t = 0; t < T; t++) y[t] = -1;
    if (r < 0) {
        for (int t = 0; t < T; t++) x[t] = pad;
        return SJ_OK;
    }
    const uint32_t n = SJ_MIN(f->lengths[r], (uint32_t)T + 1);
    uint32_t last = 0;
    SJ_TRY(row_tokens(f, r, n, T, (uint32_t *)x, &last));
    /* Position p (1 <= p < n) is a label: y[p - 1] = tok[p]. */
    uint64_t k0 = 0, k1 = 1;
    if (f->span_start) { k0 = f->span_start[r]; k1 = f->span_start[r + 1]; }
    int64_t count = 0;
    for (uint64_t k = k0; k < k1; k++) {
        uint32_t b = f->span_start ? f->spans[2 * k] : 1;
        uint32_t e = SJ_MIN(f->span_start ? f->spans[2 * k + 1] : n, n);
        for (uint32_t p = b; p < e; p++) y[p - 1] = p < (uint32_t)T ? x[p] : (int32_t)last;
        if (e > b) count += e - b;
    }
    for (uint32_t t = n - 1; t < (uint32_t)T; t++) x[t] = pad;
    *labels += count;
    return SJ_OK;
}

sj_status sj_samples_batch(sj_samples *f, const int64_t *rows, int B, int T, int32_t *x, int32_t *y,
                           int64_t *labels) {
    if (B < 1 || T < 1) return sj_fail(SJ_ERR_ARG, "%s: batch of %d x %d", f->path, B, T);
    for (int b = 0; b < B; b++)
        if (rows[b] < -1 || rows[b] >= f->info.n_rows)
            return sj_fail(SJ_ERR_ARG, "%s: row %lld is outside the file's %lld rows (-1: padding)", f->path,
                           (long long)rows[b], (long long)f->info.n_rows);
    int64_t count = 0;
    for (int b = 0; b < B; b++)
        SJ_TRY(fill_row(f, rows[b], T, x + (int64_t)b * T, y + (int64_t)b * T, &count));
    if (labels) *labels = count;
    return SJ_OK;
}
