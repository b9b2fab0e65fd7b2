/* fuzz_tokens.c — sj_tokens_inspect on arbitrary bytes: the token-file header
 * (magic, version, width, count, reserved) against the file length. A file
 * it accepts must hold exactly count tokens of its width after the header;
 * they are read in full (as smedjan's loader maps them) and written back
 * through the streaming writer, which must reproduce the file byte for byte. */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    sj_tokens_info info;
    sj_status s = sj_tokens_inspect(path, &info);
    if (s != SJ_OK) {
        FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
        return 0;
    }
    FUZZ_CHECK(info.version == 1 && (info.width == 2 || info.width == 4), "version %u width %u",
               info.version, info.width);
    FUZZ_CHECK(info.count >= 0 && (uint64_t)info.count * info.width + SJ_TOKENS_HEADER_BYTES == size,
               "count %lld of width %u in a %zu-byte file", (long long)info.count, info.width, size);
    char tmp[96];
    snprintf(tmp, sizeof tmp, "/dev/shm/sj_fuzz_tokens_%d", (int)getpid());
    sj_tokens_writer *w = NULL;
    FUZZ_CHECK(sj_tokens_writer_open(tmp, (int)info.width, &w) == SJ_OK, "writer: %s", sj_last_error());
    void *body = malloc((size_t)info.count * info.width + 1);
    FUZZ_CHECK(body, "malloc");
    memcpy(body, data + SJ_TOKENS_HEADER_BYTES, (size_t)info.count * info.width);
    FUZZ_CHECK(sj_tokens_writer_append(w, body, info.count) == SJ_OK, "append: %s", sj_last_error());
    int64_t count = -1;
    FUZZ_CHECK(sj_tokens_writer_close(w, &count) == SJ_OK && count == info.count, "close: %s", sj_last_error());
    FILE *f = fopen(tmp, "rb");
    FUZZ_CHECK(f, "reopen");
    uint8_t *back = malloc(size + 1);
    FUZZ_CHECK(back, "malloc");
    size_t got = fread(back, 1, size + 1, f);
    fclose(f);
    unlink(tmp);
    FUZZ_CHECK(got == size && memcmp(back, data, size) == 0, "rewritten file differs (%zu of %zu bytes)", got, size);
    free(back);
    free(body);
    return 0;
}
