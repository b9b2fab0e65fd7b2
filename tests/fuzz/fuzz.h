/* fuzz.h — what the libFuzzer targets share: the fuzz input as a file (a
 * memfd named by /proc/self/fd/N, so parsers that only take a path read it
 * without touching the disk), a tokenizer loaded once per process, and a
 * check that stops the run with a message when an invariant breaks.
 * Targets use the public API (smedjan.h) only. Never include this from csrc/. */
#ifndef SJ_FUZZ_H
#define SJ_FUZZ_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* memfd_create */
#endif

#include "smedjan.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Stop with a message: libFuzzer reports the abort as a crash and saves the input. */
#define FUZZ_CHECK(cond, ...) do { if (!(cond)) { \
    fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); abort(); } } while (0)

/* The input as a file; the returned path stays valid until the next call. */
static inline const char *fuzz_file(const uint8_t *data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("sj_fuzz", 0);
        FUZZ_CHECK(fd >= 0, "memfd_create failed");
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    FUZZ_CHECK(ftruncate(fd, 0) == 0, "ftruncate failed");
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fd, data + done, size - done, (off_t)done);
        FUZZ_CHECK(w > 0, "pwrite failed");
        done += (size_t)w;
    }
    return path;
}

/* zlib's CRC-32 (the checksum of smedjan's tokenizer files). */
static inline uint32_t fuzz_crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return c ^ 0xFFFFFFFFu;
}

/* A tokenizer must give back any text it encodes, byte for byte, with its
 * special tokens as text or as ids; encoding twice (the second time through
 * its pre-token cache) and in a batch of two pieces must give the same ids. */
static inline void fuzz_check_roundtrip(sj_tokenizer *t, const uint8_t *text, size_t len) {
    int n_special = sj_tokenizer_n_special(t);
    uint8_t *modes = malloc((size_t)n_special + 1);
    int32_t *ids = malloc((len + 1) * sizeof *ids), *again = malloc((len + 1) * sizeof *again);
    FUZZ_CHECK(modes && ids && again, "malloc");
    for (int mode = SJ_SPECIAL_AS_TEXT; mode <= SJ_SPECIAL_REFUSE; mode++) {
        memset(modes, mode, (size_t)n_special + 1);
        size_t n = 0, n2 = 0, dlen = 0;
        sj_status s = sj_tokenizer_encode(t, text, len, modes, ids, &n);
        if (mode == SJ_SPECIAL_REFUSE && s == SJ_ERR_ARG) continue;
        FUZZ_CHECK(s == SJ_OK, "encode (special mode %d) failed: %s", mode, sj_last_error());
        FUZZ_CHECK(n <= len, "%zu ids for %zu bytes", n, len);
        FUZZ_CHECK(sj_tokenizer_decoded_len(t, ids, n, &dlen) == SJ_OK, "decoded_len: %s", sj_last_error());
        FUZZ_CHECK(dlen == len, "special mode %d: %zu bytes decode to %zu", mode, len, dlen);
        uint8_t *back = malloc(dlen + 1);
        FUZZ_CHECK(back, "malloc");
        sj_tokenizer_decode(t, ids, n, back);
        FUZZ_CHECK(memcmp(back, text, len) == 0, "special mode %d: decode(encode(text)) != text", mode);
        free(back);
        s = sj_tokenizer_encode(t, text, len, modes, again, &n2);
        FUZZ_CHECK(s == SJ_OK && n2 == n && memcmp(ids, again, n * sizeof *ids) == 0,
                   "special mode %d: a second encode gave other ids", mode);
        if (mode == SJ_SPECIAL_AS_TEXT) {
            size_t cut = len / 2;
            const uint8_t *texts[2] = {text, text + cut};
            size_t lens[2] = {cut, len - cut};
            int64_t offs[3];
            FUZZ_CHECK(sj_tokenizer_encode_batch(t, 2, texts, lens, modes, again, offs) == SJ_OK,
                       "encode_batch: %s", sj_last_error());
            size_t na = 0, nb = 0;
            int32_t *one = malloc((len + 1) * sizeof *one);
            FUZZ_CHECK(one, "malloc");
            FUZZ_CHECK(sj_tokenizer_encode(t, text, cut, modes, one, &na) == SJ_OK, "encode");
            FUZZ_CHECK(sj_tokenizer_encode(t, text + cut, len - cut, modes, one + na, &nb) == SJ_OK, "encode");
            FUZZ_CHECK(offs[0] == 0 && offs[1] == (int64_t)na && offs[2] == (int64_t)(na + nb) &&
                       memcmp(one, again, (na + nb) * sizeof *one) == 0,
                       "encode_batch differs from encoding the pieces one by one");
            free(one);
        }
    }
    free(modes); free(ids); free(again);
}

/* A real tokenizer in smedjan's format: $SJ_FUZZ_TOKENIZER, written by
 * tests/fuzz/make_seeds.py (SmolLM2's 49152-token BPE). Loaded once. */
static inline sj_tokenizer *fuzz_tokenizer(void) {
    static sj_tokenizer *tok;
    if (!tok) {
        const char *p = getenv("SJ_FUZZ_TOKENIZER");
        FUZZ_CHECK(p && *p, "set SJ_FUZZ_TOKENIZER to a tokenizer file (tests/fuzz/run.py does)");
        sj_status s = sj_tokenizer_load(p, &tok);
        FUZZ_CHECK(s == SJ_OK, "%s", sj_last_error());
    }
    return tok;
}

/* Fuzz-driven threads would only add noise: one worker, set once. */
static inline void fuzz_single_thread(void) {
    static int done;
    if (!done) { sj_threads_set(1); done = 1; }
}

#endif
