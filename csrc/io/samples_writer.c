/* samples_writer.c — writes bin2d sample files (docs/formats.md, "bin2d"):
 * a 64-byte header, the rows padded to a fixed stride, their lengths, and a
 * label index (span_start per row, then (begin, end) spans). Rows stream to
 * disk as they come; lengths and spans, a few bytes a row, are kept in memory
 * and written at close, when the header's counts are patched in and the file
 * is renamed into place (atomic.c). Never writes a row the format forbids. */
#include "io.h"
#include <stdlib.h>
#include <string.h>

#define HEADER_BYTES SJ_SAMPLES_HEADER_BYTES

/* A growable array of u32; bytes = 4 * n. */
typedef struct { uint32_t *v; size_t n, cap; } u32_list;

static sj_status u32_push(u32_list *l, uint32_t x, const char *path) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 1024;
        uint32_t *v = realloc(l->v, cap * sizeof *v);
        if (!v) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory for the row index", path);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = x;
    return SJ_OK;
}

struct sj_samples_writer {
    sj_afile f;
    uint32_t stride, pad_id;
    int labels;
    unsigned char *row;      /* one padded row, little-endian: 4 * stride bytes */
    u32_list lengths;        /* per row */
    u32_list row_spans;      /* spans per row (labels only) */
    u32_list spans;          /* begin, end, begin, end, ... (labels only) */
};

static void put_le(unsigned char *p, uint64_t v, int bytes) {
    for (int k = 0; k < bytes; k++) p[k] = (unsigned char)(v >> (8 * k));
}

static void header(const sj_samples_writer *w, unsigned char h[HEADER_BYTES]) {
    memset(h, 0, HEADER_BYTES);
    memcpy(h, SJ_SAMPLES_MAGIC, 8);
    put_le(h + 8, 1, 4);
    put_le(h + 12, w->stride, 4);
    put_le(h + 16, w->lengths.n, 8);
    put_le(h + 24, w->spans.n / 2, 8);
    put_le(h + 32, w->labels ? SJ_SAMPLES_LABEL_INDEX : 0, 4);
    put_le(h + 36, w->pad_id, 4);
}

static void writer_free(sj_samples_writer *w) {
    free(w->row);
    free(w->lengths.v);
    free(w->row_spans.v);
    free(w->spans.v);
    free(w);
}

sj_status sj_samples_writer_open(const char *path, uint32_t stride, uint32_t pad_id, int labels,
                                 sj_samples_writer **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "samples: no path given");
    if (stride < 2) return sj_fail(SJ_ERR_ARG, "%s: stride must be >= 2 tokens, got %u", path, stride);
    sj_samples_writer *w = calloc(1, sizeof *w);
    if (w) w->row = malloc((size_t)stride * 4);
    if (!w || !w->row) {
        if (w) writer_free(w);
        return sj_fail(SJ_ERR_NOMEM, "%s: out of memory for a row of %u tokens", path, stride);
    }
    w->stride = stride;
    w->pad_id = pad_id;
    w->labels = labels != 0;
    unsigned char h[HEADER_BYTES];
    header(w, h);            /* 0 rows until close: a stray temp file reads as empty */
    sj_status s = sj_afile_open(&w->f, path);
    if (!s) s = sj_afile_write(&w->f, h, sizeof h);
    if (s) { writer_free(w); return s; }
    *out = w;
    return SJ_OK;
}

sj_status sj_samples_writer_append(sj_samples_writer *w, const uint32_t *tokens, uint32_t n,
                                   const uint8_t *is_label) {
    if (w->f.fd < 0) return sj_fail(SJ_ERR_ARG, "samples: append to a writer that failed");
    const char *path = w->f.path;
    if (n < 2 || n > w->stride)
        return sj_fail(SJ_ERR_ARG, "%s: row %zu has %u tokens; rows hold 2 to %u (the stride)", path,
                       w->lengths.n, n, w->stride);
    if (w->labels && !is_label)
        return sj_fail(SJ_ERR_ARG, "%s: row %zu has no label mask but the file has a label index",
                       path, w->lengths.n);
    for (uint32_t t = 0; t < w->stride; t++) put_le(w->row + 4 * (size_t)t, t < n ? tokens[t] : w->pad_id, 4);
    /* Record the index before the tokens are written: a failed push leaves
     * the file unchanged, so the writer stays usable for an abort. */
    size_t spans_before = w->spans.n;
    uint32_t n_spans = 0;
    sj_status s = SJ_OK;
    if (w->labels) {
        /* Maximal runs of labels; position 0 has no input before it, so it is never one. */
        for (uint32_t t = 1; t < n && !s;) {
            if (!is_label[t]) { t++; continue; }
            uint32_t begin = t;
            while (t < n && is_label[t]) t++;
            s = u32_push(&w->spans, begin, path);
            if (!s) s = u32_push(&w->spans, t, path);
            n_spans++;
        }
        if (!s) s = u32_push(&w->row_spans, n_spans, path);
    }
    if (!s) s = u32_push(&w->lengths, n, path);
    if (s) {
        w->spans.n = spans_before;
        if (w->labels && w->row_spans.n > w->lengths.n) w->row_spans.n--;
        return s;
    }
    return sj_afile_write(&w->f, w->row, (size_t)w->stride * 4);
}

/* n u32 values (widened to `bytes` each, little-endian) through a small buffer. */
static sj_status write_values(sj_samples_writer *w, const uint32_t *v, size_t n, int bytes) {
    unsigned char buf[4096];
    size_t per = sizeof buf / (size_t)bytes;
    for (size_t i = 0; i < n; i += per) {
        size_t k = SJ_MIN(per, n - i);
        for (size_t j = 0; j < k; j++) put_le(buf + j * (size_t)bytes, v[i + j], bytes);
        SJ_TRY(sj_afile_write(&w->f, buf, k * (size_t)bytes));
    }
    return SJ_OK;
}

static sj_status write_index(sj_samples_writer *w) {
    SJ_TRY(write_values(w, w->lengths.v, w->lengths.n, 4));
    if (!w->labels) return SJ_OK;
    unsigned char buf[4096];
    uint64_t start = 0;
    size_t used = 0;
    for (size_t r = 0; r <= w->row_spans.n; r++) {   /* span_start: n_rows + 1 prefix sums */
        put_le(buf + used, start, 8);
        used += 8;
        if (r < w->row_spans.n) start += w->row_spans.v[r];
        if (used == sizeof buf || r == w->row_spans.n) {
            SJ_TRY(sj_afile_write(&w->f, buf, used));
            used = 0;
        }
    }
    return write_values(w, w->spans.v, w->spans.n, 4);
}

sj_status sj_samples_writer_close(sj_samples_writer *w, int64_t *rows) {
    if (w->f.fd < 0) {
        writer_free(w);
        return sj_fail(SJ_ERR_ARG, "samples: close of a writer that already failed");
    }
    unsigned char h[HEADER_BYTES];
    header(w, h);
    sj_status s = write_index(w);
    if (!s) s = sj_afile_pwrite(&w->f, h, sizeof h, 0);
    if (!s) s = sj_afile_commit(&w->f);
    if (!s && rows) *rows = (int64_t)w->lengths.n;
    writer_free(w);
    return s;
}

void sj_samples_writer_abort(sj_samples_writer *w) {
    if (!w) return;
    sj_afile_abort(&w->f);
    writer_free(w);
}
