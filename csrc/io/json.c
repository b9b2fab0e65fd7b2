/* json.c — a small strict JSON parser for file headers (safetensors). Input
 * is untrusted: every read is bounds-checked, depth is capped, strings are
 * checked to be valid UTF-8, and any deviation from RFC 8259 is an error that
 * names the byte position. It must never read past `len`. */
#include "io.h"
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
    const unsigned char *s;
    size_t n, i;
    const char *what;
} parser;

static sj_status perr(parser *p, const char *msg) {
    if (p->i >= p->n) return sj_fail(SJ_ERR_FORMAT, "%s: header JSON: %s at byte %zu (end of header)",
                                     p->what, msg, p->i);
    unsigned char c = p->s[p->i];
    if (c >= 0x20 && c < 0x7f)
        return sj_fail(SJ_ERR_FORMAT, "%s: header JSON: %s at byte %zu ('%c')", p->what, msg, p->i, c);
    return sj_fail(SJ_ERR_FORMAT, "%s: header JSON: %s at byte %zu (0x%02x)", p->what, msg, p->i, c);
}

static void skip_ws(parser *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' ||
                           p->s[p->i] == '\r'))
        p->i++;
}

const char *sj_json_type_name(sj_json_type t) {
    static const char *names[] = {"null", "boolean", "number", "string", "array", "object"};
    return (unsigned)t < 6 ? names[t] : "?";
}

void sj_json_free(sj_json *j) {
    if (!j) return;
    for (int k = 0; k < j->n; k++) sj_json_free(&j->kids[k]);
    free(j->kids);
    free(j->key);
    free(j->str);
    memset(j, 0, sizeof *j);
}

/* Length of the valid UTF-8 sequence at s[0..n), 0 if invalid. */
static int utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int len; unsigned cp;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return 0;
    if ((size_t)len > n) return 0;
    for (int k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

static int hex4(parser *p, unsigned *out) {
    if (p->n - p->i < 4) return -1;
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned char c = p->s[p->i + k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else { p->i += k; return -1; }
    }
    p->i += 4;
    *out = v;
    return 0;
}

/* At the opening quote. The decoded string is never longer than the raw. */
static sj_status parse_string(parser *p, char **out) {
    size_t start = ++p->i;
    size_t end = start;
    while (end < p->n && p->s[end] != '"') end += (p->s[end] == '\\') ? 2 : 1;
    if (end >= p->n) { p->i = start - 1; return perr(p, "unterminated string"); }
    char *buf = malloc(end - start + 1);
    if (!buf) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory parsing the header", p->what);
    size_t o = 0;
    while (p->s[p->i] != '"') {
        unsigned char c = p->s[p->i];
        if (c < 0x20) { free(buf); return perr(p, "control character in string"); }
        if (c != '\\') {
            int l = utf8_len(p->s + p->i, p->n - p->i);
            if (!l) { free(buf); return perr(p, "invalid UTF-8 in string"); }
            memcpy(buf + o, p->s + p->i, (size_t)l);
            o += (size_t)l;
            p->i += (size_t)l;
            continue;
        }
        p->i++;
        c = p->s[p->i];
        const char *simple = strchr("\"\\/bfnrt", c);
        if (c && simple) {
            static const char map[] = "\"\\/\b\f\n\r\t";
            buf[o++] = map[simple - "\"\\/bfnrt"];
            p->i++;
            continue;
        }
        if (c != 'u') { free(buf); return perr(p, "invalid escape in string"); }
        p->i++;
        unsigned cp;
        if (hex4(p, &cp) < 0) { free(buf); return perr(p, "invalid \\u escape"); }
        if (cp >= 0xDC00 && cp <= 0xDFFF) { free(buf); return perr(p, "lone low surrogate"); }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            unsigned lo;
            if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u') {
                free(buf); return perr(p, "high surrogate without a low one");
            }
            p->i += 2;
            if (hex4(p, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF) {
                free(buf); return perr(p, "high surrogate without a low one");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp == 0) { free(buf); return perr(p, "\\u0000 (NUL) in string"); }
        /* A \u escape (6 or 12 raw bytes) never decodes to more bytes. */
        if (cp < 0x80) buf[o++] = (char)cp;
        else if (cp < 0x800) { buf[o++] = (char)(0xC0 | cp >> 6); buf[o++] = (char)(0x80 | (cp & 0x3F)); }
        else if (cp < 0x10000) {
            buf[o++] = (char)(0xE0 | cp >> 12); buf[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            buf[o++] = (char)(0x80 | (cp & 0x3F));
        } else {
            buf[o++] = (char)(0xF0 | cp >> 18); buf[o++] = (char)(0x80 | ((cp >> 12) & 0x3F));
            buf[o++] = (char)(0x80 | ((cp >> 6) & 0x3F)); buf[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    p->i++;   /* closing quote */
    buf[o] = 0;
    *out = buf;
    return SJ_OK;
}

static sj_status parse_number(parser *p, sj_json *j) {
    size_t i = p->i;
    int neg = 0, is_int = 1, overflow = 0;
    uint64_t mag = 0;
    if (p->s[i] == '-') { neg = 1; i++; }
    if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') { p->i = i; return perr(p, "invalid number"); }
    if (p->s[i] == '0') {
        i++;
        if (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') { p->i = i; return perr(p, "leading zero in number"); }
    } else {
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') {
            unsigned d = p->s[i++] - '0';
            if (mag > (UINT64_MAX - d) / 10) overflow = 1;
            else mag = mag * 10 + d;
        }
    }
    if (i < p->n && p->s[i] == '.') {
        is_int = 0;
        i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') { p->i = i; return perr(p, "digit expected after '.'"); }
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
        is_int = 0;
        i++;
        if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') { p->i = i; return perr(p, "digit expected in exponent"); }
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    j->type = SJ_JSON_NUM;
    if (is_int && !overflow && mag <= (uint64_t)INT64_MAX) {
        j->is_int = 1;
        j->i = neg ? -(int64_t)mag : (int64_t)mag;
    }
    p->i = i;
    return SJ_OK;
}

static sj_status add_kid(parser *p, sj_json *j, sj_json **kid) {
    if (j->n == j->cap) {
        int cap = j->cap ? j->cap * 2 : 4;
        sj_json *k = realloc(j->kids, (size_t)cap * sizeof *k);
        if (!k) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory parsing the header", p->what);
        j->kids = k;
        j->cap = cap;
    }
    *kid = &j->kids[j->n++];
    memset(*kid, 0, sizeof **kid);
    return SJ_OK;
}

static sj_status parse_value(parser *p, sj_json *j, int depth);

static sj_status parse_container(parser *p, sj_json *j, int depth, int obj) {
    char close = obj ? '}' : ']';
    j->type = obj ? SJ_JSON_OBJ : SJ_JSON_ARR;
    p->i++;
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == close) { p->i++; return SJ_OK; }
    for (;;) {
        sj_json *kid = NULL;
        char *key = NULL;
        skip_ws(p);
        if (obj) {
            if (p->i >= p->n || p->s[p->i] != '"') return perr(p, "expected a string key");
            SJ_TRY(parse_string(p, &key));
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') { free(key); return perr(p, "expected ':'"); }
            p->i++;
        }
        sj_status s = add_kid(p, j, &kid);
        if (s) { free(key); return s; }
        kid->key = key;
        SJ_TRY(parse_value(p, kid, depth + 1));
        skip_ws(p);
        if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
        if (p->i < p->n && p->s[p->i] == close) { p->i++; return SJ_OK; }
        return perr(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static sj_status parse_value(parser *p, sj_json *j, int depth) {
    skip_ws(p);
    if (depth > MAX_DEPTH) return perr(p, "nesting too deep");
    if (p->i >= p->n) return perr(p, "value expected");
    j->pos = p->i;
    unsigned char c = p->s[p->i];
    if (c == '{' || c == '[') return parse_container(p, j, depth, c == '{');
    if (c == '"') { j->type = SJ_JSON_STR; return parse_string(p, &j->str); }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, j);
    static const struct { const char *word; sj_json_type t; int b; } words[] = {
        {"true", SJ_JSON_BOOL, 1}, {"false", SJ_JSON_BOOL, 0}, {"null", SJ_JSON_NULL, 0}};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(words[k].word);
        if (p->n - p->i >= l && memcmp(p->s + p->i, words[k].word, l) == 0) {
            j->type = words[k].t;
            j->b = words[k].b;
            p->i += l;
            return SJ_OK;
        }
    }
    return perr(p, "unexpected character");
}

sj_status sj_json_parse(const char *text, size_t len, const char *what, sj_json *out) {
    parser p = { (const unsigned char *)text, len, 0, what };
    memset(out, 0, sizeof *out);
    sj_status s = parse_value(&p, out, 0);
    if (s == SJ_OK) {
        skip_ws(&p);
        if (p.i != p.n) s = perr(&p, "trailing characters after the JSON value");
    }
    if (s) sj_json_free(out);
    return s;
}
