/* json.c — a small strict JSON parser for file headers (safetensors). Input
 * is untrusted: every read is bounds-checked, depth is capped, strings are
 * checked to be valid UTF-8, and any deviation from RFC 8259 is an error that
 * names the byte position. It must never read past `len`.
 *
 * Memory: nodes and strings come from an arena of a few large blocks. A
 * container's children are parsed onto one shared stack and copied into an
 * exactly sized array when it closes, so the tree costs about 32 bytes a
 * value plus its strings, and the allocation count grows with the log of the
 * header size, not with the number of values. */
#include "io.h"
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_BLOCK ((size_t)64 << 20)

struct sj_json_block {
    sj_json_block *next;
    size_t cap, used;
    max_align_t data[];
};

typedef struct {
    const unsigned char *s;
    size_t n, i;
    const char *what;
    sj_json_block *arena;    /* newest block first */
    size_t next_block;
    sj_json *stack;          /* children of the open containers */
    size_t top, stack_cap;
} parser;

static void *arena_alloc(parser *p, size_t size, size_t align) {
    sj_json_block *b = p->arena;
    if (b) {
        size_t at = (b->used + align - 1) & ~(align - 1);
        if (at <= b->cap && size <= b->cap - at) { b->used = at + size; return (char *)b->data + at; }
    }
    size_t cap = SJ_MAX(p->next_block, size);
    if (cap > SIZE_MAX - sizeof *b || !(b = malloc(sizeof *b + cap))) return NULL;
    b->next = p->arena;
    b->cap = cap;
    b->used = size;
    p->arena = b;
    if (p->next_block < MAX_BLOCK) p->next_block *= 2;
    return b->data;
}

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

void sj_json_free(sj_json_doc *d) {
    if (!d) return;
    for (sj_json_block *b = d->arena, *next; b; b = next) { next = b->next; free(b); }
    memset(d, 0, sizeof *d);
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
static sj_status parse_string(parser *p, const char **out) {
    size_t start = ++p->i;
    size_t end = start;
    while (end < p->n && p->s[end] != '"') end += (p->s[end] == '\\') ? 2 : 1;
    if (end >= p->n) { p->i = start - 1; return perr(p, "unterminated string"); }
    char *buf = arena_alloc(p, end - start + 1, 1);
    if (!buf) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory parsing the header", p->what);
    size_t o = 0;
    while (p->s[p->i] != '"') {
        unsigned char c = p->s[p->i];
        if (c < 0x20) return perr(p, "control character in string");
        if (c != '\\') {
            int l = utf8_len(p->s + p->i, p->n - p->i);
            if (!l) return perr(p, "invalid UTF-8 in string");
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
        if (c != 'u') return perr(p, "invalid escape in string");
        p->i++;
        unsigned cp;
        if (hex4(p, &cp) < 0) return perr(p, "invalid \\u escape");
        if (cp >= 0xDC00 && cp <= 0xDFFF) return perr(p, "lone low surrogate");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            unsigned lo;
            if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
                return perr(p, "high surrogate without a low one");
            p->i += 2;
            if (hex4(p, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                return perr(p, "high surrogate without a low one");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp == 0) return perr(p, "\\u0000 (NUL) in string");
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

static sj_status push(parser *p, const sj_json *kid) {
    if (p->top == p->stack_cap) {
        size_t cap = p->stack_cap ? p->stack_cap * 2 : 64;
        sj_json *st = realloc(p->stack, cap * sizeof *st);
        if (!st) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory parsing the header", p->what);
        p->stack = st;
        p->stack_cap = cap;
    }
    p->stack[p->top++] = *kid;
    return SJ_OK;
}

/* The children above `base` on the stack become j's exactly sized array. */
static sj_status close_container(parser *p, sj_json *j, size_t base) {
    size_t n = p->top - base;
    if (n > INT_MAX) return perr(p, "too many elements");
    if (n) {
        j->kids = arena_alloc(p, n * sizeof *j->kids, _Alignof(sj_json));
        if (!j->kids) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory parsing the header", p->what);
        memcpy(j->kids, p->stack + base, n * sizeof *j->kids);
    }
    j->n = (int)n;
    p->top = base;
    p->i++;   /* the closing bracket */
    return SJ_OK;
}

static sj_status parse_value(parser *p, sj_json *j, int depth);

static sj_status parse_container(parser *p, sj_json *j, int depth, int obj) {
    char close = obj ? '}' : ']';
    size_t base = p->top;
    j->type = obj ? SJ_JSON_OBJ : SJ_JSON_ARR;
    p->i++;
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == close) return close_container(p, j, base);
    for (;;) {
        sj_json kid = {0};
        skip_ws(p);
        if (obj) {
            if (p->i >= p->n || p->s[p->i] != '"') return perr(p, "expected a string key");
            SJ_TRY(parse_string(p, &kid.key));
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') return perr(p, "expected ':'");
            p->i++;
        }
        SJ_TRY(parse_value(p, &kid, depth + 1));
        SJ_TRY(push(p, &kid));
        skip_ws(p);
        if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
        if (p->i < p->n && p->s[p->i] == close) return close_container(p, j, base);
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

sj_status sj_json_parse(const char *text, size_t len, const char *what, sj_json_doc *out) {
    parser p = { (const unsigned char *)text, len, 0, what, NULL, SJ_MIN(len + 64, (size_t)1 << 20),
                 NULL, 0, 0 };
    memset(out, 0, sizeof *out);
    sj_status s = parse_value(&p, &out->root, 0);
    if (s == SJ_OK) {
        skip_ws(&p);
        if (p.i != p.n) s = perr(&p, "trailing characters after the JSON value");
    }
    free(p.stack);
    out->arena = p.arena;
    if (s) sj_json_free(out);
    return s;
}
