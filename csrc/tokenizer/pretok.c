/* pretok.c — GPT-2's pre-tokeniser without a regex library. It reproduces
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * exactly as tiktoken and HF tokenizers apply it (leftmost alternative that
 * matches, greedy runs, and the lookahead that leaves a run's last space to
 * the next word). Character classes come from the generated table
 * sj_unicode_tables.h. Bytes that are not valid UTF-8 are one "other"
 * character each, so every byte string splits, deterministically. */
#include "tok.h"
#include "sj_unicode_tables.h"

enum { C_OTHER = 0, C_LETTER = 1, C_NUMBER = 2, C_SPACE = 3 };

static int class_of(uint32_t cp) {
    int lo = 0, hi = SJ_UNI_N_RANGES - 1;
    while (lo <= hi) {
        int mid = (lo + hi) >> 1;
        if (cp < sj_uni_ranges[mid][0]) hi = mid - 1;
        else if (cp > sj_uni_ranges[mid][1]) lo = mid + 1;
        else return (int)sj_uni_ranges[mid][2];
    }
    return C_OTHER;
}

static inline int cont(uint8_t c) { return (c & 0xC0) == 0x80; }

/* Class of the character at s[i]; its byte length in *len. Strict UTF-8:
 * overlongs, surrogates and values past U+10FFFF are invalid. */
static inline int char_at(const uint8_t *s, size_t n, size_t i, size_t *len) {
    uint8_t c = s[i];
    if (c < 0x80) { *len = 1; return sj_uni_ascii[c]; }
    size_t r = n - i;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        if (r >= 2 && cont(s[i + 1])) {
            *len = 2;
            cp = ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
            return class_of(cp);
        }
    } else if (c >= 0xE0 && c <= 0xEF) {
        if (r >= 3 && cont(s[i + 1]) && cont(s[i + 2])) {
            uint8_t c1 = s[i + 1];
            if (!(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 > 0x9F)) {
                *len = 3;
                cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(c1 & 0x3F) << 6) | (s[i + 2] & 0x3F);
                return class_of(cp);
            }
        }
    } else if (c >= 0xF0 && c <= 0xF4) {
        if (r >= 4 && cont(s[i + 1]) && cont(s[i + 2]) && cont(s[i + 3])) {
            uint8_t c1 = s[i + 1];
            if (!(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 > 0x8F)) {
                *len = 4;
                cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(c1 & 0x3F) << 12) |
                     ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
                return class_of(cp);
            }
        }
    }
    *len = 1;
    return C_OTHER;
}

size_t sj_tok_pretok_next(const uint8_t *s, size_t n, size_t i) {
    /* Contractions: only ASCII lowercase, as in the pattern. */
    if (s[i] == '\'' && i + 1 < n) {
        uint8_t a = s[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            uint8_t b = s[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                return i + 3;
        }
    }
    size_t len, j = i;
    int cls = char_at(s, n, i, &len);
    if (s[i] == ' ' && i + 1 < n) {
        /* " ?X+": a single leading space joins a run of letters, numbers or others. */
        size_t l1;
        int c1 = char_at(s, n, i + 1, &l1);
        if (c1 != C_SPACE) { cls = c1; j = i + 1; len = l1; }
    }
    if (cls != C_SPACE) {
        j += len;
        while (j < n) {
            if (char_at(s, n, j, &len) != cls) break;
            j += len;
        }
        return j;
    }
    /* Whitespace run. Followed by text, \s+(?!\S) gives back the last
     * character (it may start " word"); a lone space char is \s+ itself. */
    size_t last = i;
    j = i + len;
    while (j < n) {
        size_t l;
        if (char_at(s, n, j, &l) != C_SPACE) break;
        last = j;
        j += l;
    }
    if (j == n || last == i) return j;
    return last;
}
