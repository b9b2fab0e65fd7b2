/* io.c — the tokenizer's own file format. Little-endian:
 *   magic "SJBPETOK" | u32 version (1) | u32 pretokenizer (1 = GPT-2) |
 *   u32 n_vocab | u32 n_merges | u64 payload bytes | u32 CRC32 of payload |
 *   payload: per token u32 length, u8 flags (bit 0 = special), bytes;
 *            then n_merges x (i32 left, i32 right).
 * Loading checks every size against the file before reading, so a
 * truncated or corrupt file is an error that names the file, never a crash.
 * Saving writes path.tmp and renames it, so an old file is never half
 * overwritten. */
#include "tok.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#define MAGIC "SJBPETOK"
#define VERSION 1u
#define PRETOK_GPT2 1u
#define HEADER_BYTES 36

static uint32_t crc_table[256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    static int ready;
    if (!ready) { crc_init(); ready = 1; }   /* idempotent, so a race is harmless */
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

sj_status sj_tokenizer_save(const sj_tokenizer *t, const char *path) {
    size_t payload = (size_t)t->n_vocab * 5 + (size_t)t->off[t->n_vocab] + (size_t)t->n_merges * 8;
    uint8_t *buf = malloc(HEADER_BYTES + payload);
    if (!buf) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory for %zu bytes", path, payload);
    uint8_t *p = buf + HEADER_BYTES;
    for (int i = 0; i < t->n_vocab; i++) {
        uint32_t l = (uint32_t)(t->off[i + 1] - t->off[i]);
        put32(p, l);
        p[4] = t->special[i];
        memcpy(p + 5, t->data + t->off[i], l);
        p += 5 + l;
    }
    for (int r = 0; r < t->n_merges; r++) {
        put32(p, (uint32_t)t->merges[3 * r]);
        put32(p + 4, (uint32_t)t->merges[3 * r + 1]);
        p += 8;
    }
    memcpy(buf, MAGIC, 8);
    put32(buf + 8, VERSION);
    put32(buf + 12, PRETOK_GPT2);
    put32(buf + 16, (uint32_t)t->n_vocab);
    put32(buf + 20, (uint32_t)t->n_merges);
    put64(buf + 24, payload);
    put32(buf + 32, crc32_of(buf + HEADER_BYTES, payload));

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) { free(buf); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    sj_status s = SJ_OK;
    if (!f) {
        s = sj_fail(SJ_ERR_IO, "%s: cannot write: %s", tmp, strerror(errno));
    } else {
        size_t w = fwrite(buf, 1, HEADER_BYTES + payload, f);
        int e = fflush(f) != 0 || w != HEADER_BYTES + payload;
        if (fclose(f) != 0) e = 1;
        if (e) s = sj_fail(SJ_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
        else if (rename(tmp, path) != 0) s = sj_fail(SJ_ERR_IO, "%s: rename failed: %s", path, strerror(errno));
        if (s) remove(tmp);
    }
    free(tmp);
    free(buf);
    return s;
}

sj_status sj_tokenizer_load(const char *path, sj_tokenizer **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    uint8_t h[HEADER_BYTES];
    size_t got = fread(h, 1, HEADER_BYTES, f);
    if (got < 8 || memcmp(h, MAGIC, 8) != 0) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: not a smedjan tokenizer file (bad magic)", path);
    }
    if (got < HEADER_BYTES) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: truncated header (%zu of %d bytes)", path, got, HEADER_BYTES);
    }
    uint32_t version = get32(h + 8), pre = get32(h + 12);
    uint32_t n_vocab = get32(h + 16), n_merges = get32(h + 20), crc = get32(h + 32);
    uint64_t payload = get64(h + 24);
    if (version != VERSION) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: format version %u, this build reads version %u", path, version, VERSION);
    }
    if (pre != PRETOK_GPT2) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: unknown pre-tokeniser %u", path, pre);
    }
    fseek(f, 0, SEEK_END);
    long fsize = ftell(f);
    if (fsize < 0 || (uint64_t)fsize - HEADER_BYTES != payload) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: file is %ld bytes but its header promises %llu (truncated?)",
                       path, fsize, (unsigned long long)(payload + HEADER_BYTES));
    }
    if (n_vocab < 256 || n_vocab > (1u << 26) || n_merges > 4 * n_vocab ||
        payload < (uint64_t)n_vocab * 6 + (uint64_t)n_merges * 8) {
        fclose(f);
        return sj_fail(SJ_ERR_FORMAT, "%s: implausible sizes (vocab %u, merges %u, payload %llu)",
                       path, n_vocab, n_merges, (unsigned long long)payload);
    }
    uint8_t *buf = malloc((size_t)payload);
    int64_t *off = malloc(((size_t)n_vocab + 1) * sizeof *off);
    uint8_t *special = malloc(n_vocab);
    int32_t *merges = malloc(((size_t)n_merges * 2 + 1) * sizeof *merges);
    uint8_t *data = malloc((size_t)payload);
    sj_status s = SJ_OK;
    if (!buf || !off || !special || !merges || !data) {
        s = sj_fail(SJ_ERR_NOMEM, "%s: out of memory for %llu bytes", path, (unsigned long long)payload);
        goto done;
    }
    fseek(f, HEADER_BYTES, SEEK_SET);
    if (fread(buf, 1, (size_t)payload, f) != payload) {
        s = sj_fail(SJ_ERR_IO, "%s: read failed", path);
        goto done;
    }
    if (crc32_of(buf, (size_t)payload) != crc) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: CRC mismatch (the file is corrupt)", path);
        goto done;
    }
    size_t p = 0, d = 0;
    off[0] = 0;
    for (uint32_t i = 0; i < n_vocab; i++) {
        if (p + 5 > payload) { s = sj_fail(SJ_ERR_FORMAT, "%s: token %u runs past the payload", path, i); goto done; }
        uint32_t l = get32(buf + p);
        if (l == 0 || l > payload - p - 5) {
            s = sj_fail(SJ_ERR_FORMAT, "%s: token %u has a bad length %u", path, i, l);
            goto done;
        }
        special[i] = buf[p + 4] & 1;
        memcpy(data + d, buf + p + 5, l);
        d += l;
        off[i + 1] = (int64_t)d;
        p += 5 + (size_t)l;
    }
    if (payload - p != (uint64_t)n_merges * 8) {
        s = sj_fail(SJ_ERR_FORMAT, "%s: %llu bytes left for %u merges", path,
                    (unsigned long long)(payload - p), n_merges);
        goto done;
    }
    for (uint32_t r = 0; r < 2 * n_merges; r++) merges[r] = (int32_t)get32(buf + p + 4 * (size_t)r);
    s = sj_tokenizer_create((int)n_vocab, data, off, special, (int)n_merges, merges, out);
    if (s) {
        char msg[768];
        snprintf(msg, sizeof msg, "%s", sj_last_error());
        s = sj_fail(SJ_ERR_FORMAT, "%s: %s", path, msg);
    }
done:
    fclose(f);
    free(buf); free(off); free(special); free(merges); free(data);
    return s;
}
