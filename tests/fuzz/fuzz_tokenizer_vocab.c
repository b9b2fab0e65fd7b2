/* fuzz_tokenizer_vocab.c — sj_tokenizer_create on a fuzzed vocabulary and
 * merge list: the engine half of every tokenizer import (vocab.json +
 * merges.txt, tokenizer.json and GGUF tokenizers are parsed in Python, which
 * hands the token bytes, special flags and merge ids to this call).
 *
 * Input: u8 flags | token records (u8 length, 0 ends the list; u8 bit 0 =
 * special; the bytes) | merges as pairs of u16 ids (mod the vocab size).
 * flags bit 0: the 256 single bytes are tokens too, before (or with bit 2,
 * after) the records; bit 1: each multi-byte record also gets the merge of
 * its first split whose halves are both tokens, ahead of the fuzzed ones.
 * A vocabulary that is accepted must round-trip its own tokens and a sample
 * through encode and decode (fuzz.h) and survive save + load. */
#include "fuzz.h"

#define MAX_RECORDS 512

static const uint8_t SAMPLE[] = "Hello world! <|endoftext|> 123 don't  \xc3\xa9t\xc3\xa9 \xff\n\t x";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_single_thread();
    if (size < 1) return 0;
    uint8_t flags = data[0];
    size_t p = 1;
    int n_bytes_tok = flags & 1 ? 256 : 0, bytes_last = (flags >> 2) & 1;
    int n_rec = 0;
    size_t rec_at[MAX_RECORDS];
    while (p + 2 <= size && data[p] != 0 && n_rec < MAX_RECORDS) {
        size_t l = data[p];
        if (p + 2 + l > size) break;
        rec_at[n_rec++] = p;
        p += 2 + l;
    }
    if (p < size && data[p] == 0) p++;
    int n_vocab = n_bytes_tok + n_rec;
    if (n_vocab == 0) return 0;
    int64_t *off = malloc(((size_t)n_vocab + 1) * sizeof *off);
    uint8_t *special = calloc((size_t)n_vocab, 1);
    uint8_t *bytes = malloc(size + 256 + 1);
    uint8_t *text = malloc(size + sizeof SAMPLE);
    FUZZ_CHECK(off && special && bytes && text, "malloc");
    size_t nb = 0, nt = 0;
    off[0] = 0;
    for (int i = 0; i < n_vocab; i++) {
        int r = bytes_last ? i : i - n_bytes_tok;
        if (r >= 0 && r < n_rec) {
            size_t l = data[rec_at[r]];
            special[i] = data[rec_at[r] + 1] & 1;
            memcpy(bytes + nb, data + rec_at[r] + 2, l);
            memcpy(text + nt, data + rec_at[r] + 2, l);
            nb += l; nt += l;
        } else {
            bytes[nb++] = (uint8_t)(bytes_last ? i - n_rec : i);
        }
        off[i + 1] = (int64_t)nb;
    }
    memcpy(text + nt, SAMPLE, sizeof SAMPLE - 1);
    nt += sizeof SAMPLE - 1;

    int max_merges = 4 * n_vocab;
    int32_t *merges = malloc(((size_t)max_merges * 2 + 2) * sizeof *merges);
    FUZZ_CHECK(merges, "malloc");
    int n_merges = 0;
    if (flags & 2) {   /* derived merges need lookups: a first tokenizer without merges */
        sj_tokenizer *t0 = NULL;
        if (sj_tokenizer_create(n_vocab, bytes, off, special, 0, NULL, &t0) == SJ_OK) {
            for (int i = 0; i < n_vocab && n_merges < max_merges; i++) {
                size_t l = (size_t)(off[i + 1] - off[i]);
                if (special[i] || l < 2) continue;
                for (size_t k = 1; k < l; k++) {
                    int32_t a = sj_tokenizer_lookup(t0, bytes + off[i], k);
                    int32_t b = sj_tokenizer_lookup(t0, bytes + off[i] + k, l - k);
                    if (a >= 0 && b >= 0 && !special[a] && !special[b]) {
                        merges[2 * n_merges] = a;
                        merges[2 * n_merges + 1] = b;
                        n_merges++;
                        break;
                    }
                }
            }
            sj_tokenizer_free(t0);
        }
    }
    for (; p + 4 <= size && n_merges < max_merges; p += 4) {
        merges[2 * n_merges] = (int32_t)((data[p] | data[p + 1] << 8) % n_vocab);
        merges[2 * n_merges + 1] = (int32_t)((data[p + 2] | data[p + 3] << 8) % n_vocab);
        n_merges++;
    }

    sj_tokenizer *t = NULL;
    sj_status s = sj_tokenizer_create(n_vocab, bytes, off, special, n_merges, merges, &t);
    if (s != SJ_OK) {
        FUZZ_CHECK(t == NULL, "failed create left a handle");
        FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
    } else {
        FUZZ_CHECK(sj_tokenizer_vocab_size(t) == n_vocab && sj_tokenizer_n_merges(t) == n_merges, "sizes");
        for (int r = 0; r < n_merges; r++) {
            int32_t m[3];
            FUZZ_CHECK(sj_tokenizer_merge(t, r, m) == SJ_OK, "merge %d", r);
            size_t la, lb, lc;
            const uint8_t *a = sj_tokenizer_token(t, m[0], &la, NULL);
            const uint8_t *b = sj_tokenizer_token(t, m[1], &lb, NULL);
            const uint8_t *c = sj_tokenizer_token(t, m[2], &lc, NULL);
            FUZZ_CHECK(a && b && c && lc == la + lb && !memcmp(c, a, la) && !memcmp(c + la, b, lb),
                       "merge %d's result is not the concatenation of its halves", r);
        }
        fuzz_check_roundtrip(t, text, nt);
        char tmp[96];
        snprintf(tmp, sizeof tmp, "/dev/shm/sj_fuzz_vocab_%d", (int)getpid());
        FUZZ_CHECK(sj_tokenizer_save(t, tmp) == SJ_OK, "save: %s", sj_last_error());
        sj_tokenizer *t2 = NULL;
        FUZZ_CHECK(sj_tokenizer_load(tmp, &t2) == SJ_OK, "reload of a saved tokenizer: %s", sj_last_error());
        unlink(tmp);
        FUZZ_CHECK(sj_tokenizer_vocab_size(t2) == n_vocab && sj_tokenizer_n_merges(t2) == n_merges,
                   "save + load changed the sizes");
        size_t n1 = 0, n2 = 0;
        int32_t *i1 = malloc((nt + 1) * sizeof *i1), *i2 = malloc((nt + 1) * sizeof *i2);
        FUZZ_CHECK(i1 && i2, "malloc");
        FUZZ_CHECK(sj_tokenizer_encode(t, text, nt, NULL, i1, &n1) == SJ_OK &&
                   sj_tokenizer_encode(t2, text, nt, NULL, i2, &n2) == SJ_OK &&
                   n1 == n2 && memcmp(i1, i2, n1 * sizeof *i1) == 0,
                   "the reloaded tokenizer encodes differently");
        free(i1); free(i2);
        sj_tokenizer_free(t2);
        sj_tokenizer_free(t);
    }
    free(off); free(special); free(bytes); free(text); free(merges);
    return 0;
}
