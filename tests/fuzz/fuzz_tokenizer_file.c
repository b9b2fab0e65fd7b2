/* fuzz_tokenizer_file.c — sj_tokenizer_load on arbitrary bytes: smedjan's own
 * tokenizer format (header, sizes, token records, merges). The harness
 * writes the right CRC-32 into the header before loading, so mutations reach
 * the record parser instead of stopping at the checksum (which the seeds
 * cover as written). A file that loads must round-trip text (fuzz.h) and
 * survive save + load unchanged. */
#include "fuzz.h"

static const uint8_t SAMPLE[] = "Hello world! <|endoftext|> 123 don't  \xc3\xa9t\xc3\xa9 \xff\n\t x";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_single_thread();
    uint8_t *buf = malloc(size + 1);
    FUZZ_CHECK(buf, "malloc");
    memcpy(buf, data, size);
    if (size >= 36) {
        uint32_t c = fuzz_crc32(buf + 36, size - 36);
        for (int k = 0; k < 4; k++) buf[32 + k] = (uint8_t)(c >> (8 * k));
    }
    const char *path = fuzz_file(buf, size);
    sj_tokenizer *t = NULL;
    sj_status s = sj_tokenizer_load(path, &t);
    if (s != SJ_OK) {
        FUZZ_CHECK(t == NULL, "failed load left a handle");
        FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
        free(buf);
        return 0;
    }
    int nv = sj_tokenizer_vocab_size(t);
    FUZZ_CHECK(nv >= 256, "vocab %d", nv);
    for (int i = 0; i < nv; i++) {
        size_t len = 0;
        const uint8_t *tok = sj_tokenizer_token(t, i, &len, NULL);
        FUZZ_CHECK(tok && len > 0, "token %d", i);
    }
    fuzz_check_roundtrip(t, SAMPLE, sizeof SAMPLE - 1);
    fuzz_check_roundtrip(t, data, size < 4096 ? size : 4096);

    char tmp[96];
    snprintf(tmp, sizeof tmp, "/dev/shm/sj_fuzz_tok_%d", (int)getpid());
    FUZZ_CHECK(sj_tokenizer_save(t, tmp) == SJ_OK, "save: %s", sj_last_error());
    sj_tokenizer *t2 = NULL;
    FUZZ_CHECK(sj_tokenizer_load(tmp, &t2) == SJ_OK, "reload of a saved tokenizer: %s", sj_last_error());
    unlink(tmp);
    FUZZ_CHECK(sj_tokenizer_vocab_size(t2) == nv && sj_tokenizer_n_merges(t2) == sj_tokenizer_n_merges(t) &&
               sj_tokenizer_n_special(t2) == sj_tokenizer_n_special(t), "save + load changed the sizes");
    sj_tokenizer_free(t2);
    sj_tokenizer_free(t);
    free(buf);
    return 0;
}
