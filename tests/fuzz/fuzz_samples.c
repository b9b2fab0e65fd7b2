/* fuzz_samples.c — sj_samples_open (MMAP and MEMORY, vocabulary 512) on
 * arbitrary bytes, then batches and one epoch of a sample loader. A file the
 * MMAP reader accepts must describe exactly its own length; MEMORY must
 * accept it too unless an id is out of the vocabulary, and then give the
 * same batches; a batch of whole rows counts exactly the span lengths as
 * labels, and no target of a padding row or past a row's end is one. */
#include "fuzz.h"

enum { VOCAB = 512, B = 3 };

/* Every row once, B at a time, with T = stride - 1 (nothing cut). */
static int64_t whole_rows(sj_samples *f, sj_samples *same, int T, int64_t *labels_ok) {
    const sj_samples_info *i = sj_samples_file_info(f);
    int32_t *x = malloc((size_t)B * T * 4 * 4);
    FUZZ_CHECK(x, "malloc");
    int32_t *y = x + B * T, *x2 = y + B * T, *y2 = x2 + B * T;
    int64_t total = 0;
    for (int64_t r = 0; r < i->n_rows; r += B) {
        int64_t rows[B];
        for (int b = 0; b < B; b++) rows[b] = r + b < i->n_rows ? r + b : -1;
        int64_t labels = -1;
        sj_status s = sj_samples_batch(f, rows, B, T, x, y, &labels);
        if (s) {   /* MMAP only: an id past the vocabulary, named */
            FUZZ_CHECK(s == SJ_ERR_FORMAT && strstr(sj_last_error(), "vocabulary"), "batch: %s", sj_last_error());
            *labels_ok = 0;
            continue;
        }
        for (int b = 0; b < B; b++) {
            const int L = rows[b] < 0 ? 0 : (int)sj_samples_lengths(f)[rows[b]];
            for (int t = 0; t < T; t++) {
                FUZZ_CHECK(y[b * T + t] == -1 || (t < L - 1 && y[b * T + t] < VOCAB),
                           "row %lld: target %d at %d (length %d)", (long long)rows[b], y[b * T + t], t, L);
                if (t >= L - 1) FUZZ_CHECK(x[b * T + t] == (int32_t)i->pad_id, "padding input");
            }
        }
        total += labels;
        if (same) {
            int64_t labels2 = -1;
            FUZZ_CHECK(sj_samples_batch(same, rows, B, T, x2, y2, &labels2) == SJ_OK, "%s", sj_last_error());
            FUZZ_CHECK(labels2 == labels && !memcmp(x, x2, (size_t)B * T * 4) && !memcmp(y, y2, (size_t)B * T * 4),
                       "MEMORY and MMAP batches differ");
        }
    }
    free(x);
    return total;
}

/* One epoch of buckets + shuffle (+ prefetch on odd sizes) over every row
 * with a label: each batch is made, and its labels add up to at most all. */
static void one_epoch(sj_samples *f, size_t size, int T) {
    const sj_samples_info *i = sj_samples_file_info(f);
    int64_t *rows = malloc((size_t)i->n_rows * sizeof *rows + 8), n = 0;
    FUZZ_CHECK(rows, "malloc");
    for (int64_t r = 0; r < i->n_rows; r++)
        if (!sj_samples_span_start(f) || sj_samples_span_start(f)[r + 1] > sj_samples_span_start(f)[r])
            rows[n++] = r;
    int buckets[3], n_buckets = 0;
    for (int k = 0; k < 2; k++)
        if ((int[]){2, 5}[k] < T) buckets[n_buckets++] = (int[]){2, 5}[k];
    buckets[n_buckets++] = T;
    sj_sample_loader_config c = { B, T, buckets, n_buckets, (int64_t)(size % 7), size, (int)(size & 1),
                                  rows, n };
    sj_sample_loader *l = NULL;
    sj_status s = sj_sample_loader_open(f, &c, &l);
    if (n == 0) {
        FUZZ_CHECK(s == SJ_ERR_ARG, "a loader over no rows");
    } else {
        FUZZ_CHECK(s == SJ_OK, "loader: %s", sj_last_error());
        int32_t *x = malloc((size_t)B * T * 8);
        FUZZ_CHECK(x, "malloc");
        for (int64_t k = 0; k < sj_sample_loader_epoch_batches(l); k++) {
            int bt = 0;
            int64_t labels, epoch, index;
            FUZZ_CHECK(sj_sample_loader_peek(l, &bt) == SJ_OK && bt >= 1 && bt <= T, "peek: %s", sj_last_error());
            FUZZ_CHECK(sj_sample_loader_next(l, bt, x, x + B * bt, &labels, &epoch, &index) == SJ_OK,
                       "next: %s", sj_last_error());
            FUZZ_CHECK(epoch == 0 && index == k, "batch %lld came as (%lld, %lld)", (long long)k,
                       (long long)epoch, (long long)index);
        }
        free(x);
        sj_sample_loader_close(l);
    }
    free(rows);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    sj_samples *mm = NULL, *mem = NULL;
    sj_status s = sj_samples_open(path, SJ_SAMPLES_MMAP, VOCAB, &mm);
    if (s != SJ_OK) {
        FUZZ_CHECK(!mm && sj_last_error()[0] != '\0', "status %d without a message", (int)s);
        FUZZ_CHECK(sj_samples_open(path, SJ_SAMPLES_MEMORY, VOCAB, &mem) != SJ_OK && !mem,
                   "MEMORY accepted what MMAP refused");
        return 0;
    }
    const sj_samples_info *i = sj_samples_file_info(mm);
    const int labelled = (i->flags & SJ_SAMPLES_LABEL_INDEX) != 0;
    FUZZ_CHECK((uint64_t)SJ_SAMPLES_HEADER_BYTES + (uint64_t)i->n_rows * (4 * (uint64_t)i->stride + 4) +
               (labelled ? 8 * ((uint64_t)i->n_rows + 1) + 8 * (uint64_t)i->n_spans : 0) == size,
               "%lld rows of stride %u, %lld spans in a %zu-byte file", (long long)i->n_rows, i->stride,
               (long long)i->n_spans, size);
    s = sj_samples_open(path, SJ_SAMPLES_MEMORY, VOCAB, &mem);
    FUZZ_CHECK(s == SJ_OK || (s == SJ_ERR_FORMAT && strstr(sj_last_error(), "vocabulary")),
               "MEMORY refused what MMAP accepted: %s", sj_last_error());
    if (i->n_rows > 0) {
        int64_t want = 0, labels_ok = 1;
        for (int64_t r = 0; r < i->n_rows; r++) {
            if (!labelled) { want += sj_samples_lengths(mm)[r] - 1; continue; }
            for (uint64_t k = sj_samples_span_start(mm)[r]; k < sj_samples_span_start(mm)[r + 1]; k++)
                want += sj_samples_spans(mm)[2 * k + 1] - sj_samples_spans(mm)[2 * k];
        }
        const int T = (int)i->stride - 1;
        int64_t got = whole_rows(mm, mem, T, &labels_ok);
        FUZZ_CHECK(!labels_ok || got == want, "%lld labels of %lld", (long long)got, (long long)want);
        if (mem) {
            FUZZ_CHECK(whole_rows(mem, NULL, T, &labels_ok) == want, "MEMORY labels");
            one_epoch(mem, size, T);
        }
    }
    sj_samples_close(mem);
    sj_samples_close(mm);
    return 0;
}
