/* fuzz_decode.c — decode of arbitrary ids with a real tokenizer
 * ($SJ_FUZZ_TOKENIZER): the input is little-endian int32 ids, or with its
 * first byte odd, u16 ids (mostly in range). decoded_len must refuse every
 * id outside the vocabulary; accepted ids decode into a buffer of exactly
 * that length, and the bytes must survive encode + decode. */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_single_thread();
    if (size < 1) return 0;
    sj_tokenizer *t = fuzz_tokenizer();
    int nv = sj_tokenizer_vocab_size(t);
    int narrow = data[0] & 1;
    data++; size--;
    size_t n = narrow ? size / 2 : size / 4;
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    FUZZ_CHECK(ids, "malloc");
    int in_range = 1;
    for (size_t i = 0; i < n; i++) {
        ids[i] = narrow ? (int32_t)(data[2 * i] | data[2 * i + 1] << 8)
                        : (int32_t)((uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 |
                                    (uint32_t)data[4 * i + 2] << 16 | (uint32_t)data[4 * i + 3] << 24);
        if (ids[i] < 0 || ids[i] >= nv) in_range = 0;
    }
    size_t len = 0;
    sj_status s = sj_tokenizer_decoded_len(t, ids, n, &len);
    FUZZ_CHECK((s == SJ_OK) == in_range, "decoded_len returned %d for %s ids", (int)s,
               in_range ? "valid" : "out-of-range");
    if (s == SJ_OK) {
        uint8_t *out = malloc(len + 1);   /* +1: malloc(0) may be NULL */
        FUZZ_CHECK(out, "malloc");
        sj_tokenizer_decode(t, ids, n, out);
        if (len <= (1 << 16)) fuzz_check_roundtrip(t, out, len);
        free(out);
    }
    free(ids);
    return 0;
}
