/* tokens.c — the token file of `smedjan prepare`: a 32-byte header
 * ("SMJTOKEN", u32 version 1, u32 width 2|4, u64 count, u64 reserved 0, all
 * little-endian) and then the tokens, little-endian. Written streaming and
 * atomically (the count is patched in at close, then the rename); read back
 * only after the header is checked against the file length, and then only
 * with pread() (see the reader below): never through a mapping. */
#include "io.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char MAGIC[8] = {'S', 'M', 'J', 'T', 'O', 'K', 'E', 'N'};

struct sj_tokens_writer {
    sj_afile f;
    int width;
    int64_t count;
};

static void put_le(unsigned char *p, uint64_t v, int bytes) {
    for (int k = 0; k < bytes; k++) p[k] = (unsigned char)(v >> (8 * k));
}
static uint64_t get_le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int k = 0; k < bytes; k++) v |= (uint64_t)p[k] << (8 * k);
    return v;
}

static void header(unsigned char h[SJ_TOKENS_HEADER_BYTES], int width, int64_t count) {
    memcpy(h, MAGIC, 8);
    put_le(h + 8, 1, 4);
    put_le(h + 12, (uint64_t)width, 4);
    put_le(h + 16, (uint64_t)count, 8);
    put_le(h + 24, 0, 8);
}

sj_status sj_tokens_writer_open(const char *path, int width, sj_tokens_writer **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "tokens: no path given");
    if (width != 2 && width != 4)
        return sj_fail(SJ_ERR_ARG, "%s: token width must be 2 (uint16) or 4 (uint32), got %d", path, width);
    sj_tokens_writer *w = calloc(1, sizeof *w);
    if (!w) return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path);
    w->width = width;
    unsigned char h[SJ_TOKENS_HEADER_BYTES];
    header(h, width, 0);   /* count 0 until close: a stray temp file reads as empty */
    sj_status s = sj_afile_open(&w->f, path);
    if (!s) s = sj_afile_write(&w->f, h, sizeof h);
    if (s) { free(w); return s; }
    *out = w;
    return SJ_OK;
}

sj_status sj_tokens_writer_append(sj_tokens_writer *w, const void *tokens, int64_t n) {
    if (w->f.fd < 0) return sj_fail(SJ_ERR_ARG, "tokens: append to a writer that failed");
    if (n < 0) return sj_fail(SJ_ERR_ARG, "%s: negative token count", w->f.path);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    unsigned char buf[4096];
    const unsigned char *src = tokens;
    while (n > 0) {
        int64_t k = SJ_MIN(n, (int64_t)(sizeof buf / w->width));
        for (int64_t i = 0; i < k; i++)
            for (int b = 0; b < w->width; b++) buf[i * w->width + b] = src[i * w->width + w->width - 1 - b];
        SJ_TRY(sj_afile_write(&w->f, buf, (size_t)(k * w->width)));
        src += k * w->width; n -= k; w->count += k;
    }
    return SJ_OK;
#else
    SJ_TRY(sj_afile_write(&w->f, tokens, (size_t)n * (size_t)w->width));
    w->count += n;
    return SJ_OK;
#endif
}

sj_status sj_tokens_writer_close(sj_tokens_writer *w, int64_t *count) {
    if (w->f.fd < 0) {
        free(w);
        return sj_fail(SJ_ERR_ARG, "tokens: close of a writer that already failed");
    }
    unsigned char h[SJ_TOKENS_HEADER_BYTES];
    header(h, w->width, w->count);
    sj_status s = sj_afile_pwrite(&w->f, h, sizeof h, 0);
    if (!s) s = sj_afile_commit(&w->f);
    if (!s && count) *count = w->count;
    free(w);
    return s;
}

void sj_tokens_writer_abort(sj_tokens_writer *w) {
    if (!w) return;
    sj_afile_abort(&w->f);
    free(w);
}

/* Check an open token file's header against its length (st_size). */
static sj_status inspect_fd(const char *path, int fd, sj_tokens_info *out, uint64_t *size) {
    struct stat st;
    unsigned char h[SJ_TOKENS_HEADER_BYTES];
    ssize_t got = 0;
    if (fstat(fd, &st) != 0) return sj_fail(SJ_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return sj_fail(SJ_ERR_IO, "%s: not a regular file", path);
    if (st.st_size < SJ_TOKENS_HEADER_BYTES)
        return sj_fail(SJ_ERR_FORMAT, "%s: %lld bytes is too short for a token file (the header alone is %d)",
                       path, (long long)st.st_size, SJ_TOKENS_HEADER_BYTES);
    while ((got = pread(fd, h, sizeof h, 0)) < 0 && errno == EINTR) {}
    if (got != (ssize_t)sizeof h)
        return sj_fail(SJ_ERR_IO, "%s: cannot read the header: %s", path, got < 0 ? strerror(errno) : "short read");
    if (memcmp(h, MAGIC, 8) != 0)
        return sj_fail(SJ_ERR_FORMAT, "%s: not a smedjan token file (magic is not \"SMJTOKEN\")", path);
    uint32_t version = (uint32_t)get_le(h + 8, 4), width = (uint32_t)get_le(h + 12, 4);
    uint64_t count = get_le(h + 16, 8), reserved = get_le(h + 24, 8);
    if (version != 1)
        return sj_fail(SJ_ERR_FORMAT, "%s: token file version %u (this smedjan reads version 1)", path, version);
    if (width != 2 && width != 4)
        return sj_fail(SJ_ERR_FORMAT, "%s: token width %u bytes (expected 2 or 4)", path, width);
    if (reserved != 0)
        return sj_fail(SJ_ERR_FORMAT, "%s: reserved header field is %llu, not 0", path,
                       (unsigned long long)reserved);
    uint64_t body = (uint64_t)st.st_size - SJ_TOKENS_HEADER_BYTES;
    if (count > body / width || body != count * width) {
        if (body % width)
            return sj_fail(SJ_ERR_FORMAT, "%s: header says %llu tokens but the file holds %llu and %llu "
                           "stray bytes", path, (unsigned long long)count,
                           (unsigned long long)(body / width), (unsigned long long)(body % width));
        return sj_fail(SJ_ERR_FORMAT, "%s: header says %llu tokens but the file holds %llu", path,
                       (unsigned long long)count, (unsigned long long)(body / width));
    }
    if (count > (uint64_t)INT64_MAX)
        return sj_fail(SJ_ERR_FORMAT, "%s: token count %llu is out of range", path, (unsigned long long)count);
    out->version = version;
    out->width = width;
    out->count = (int64_t)count;
    *size = (uint64_t)st.st_size;
    return SJ_OK;
}

sj_status sj_tokens_inspect(const char *path, sj_tokens_info *out) {
    if (!path) return sj_fail(SJ_ERR_ARG, "tokens: no path given");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    uint64_t size;
    sj_status s = inspect_fd(path, fd, out, &size);
    close(fd);
    return s;
}

/* ---- reader ----------------------------------------------------------------
 * Tokens are read with pread() into the caller's memory, never through a
 * mapping (sj_pread_exact, pread.c, says why). */

struct sj_tokens_reader {
    int fd;
    char *path;
    uint64_t size;           /* the length that was checked at open */
    sj_tokens_info info;
};

sj_status sj_tokens_open(const char *path, sj_tokens_reader **out) {
    *out = NULL;
    if (!path) return sj_fail(SJ_ERR_ARG, "tokens: no path given");
    sj_tokens_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) { free(r); return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path); }
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        sj_status s = sj_fail(SJ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        free(r->path); free(r);
        return s;
    }
    sj_status s = inspect_fd(path, r->fd, &r->info, &r->size);
    if (s) { sj_tokens_close(r); return s; }
    *out = r;
    return SJ_OK;
}

void sj_tokens_close(sj_tokens_reader *r) {
    if (!r) return;
    if (r->fd >= 0) close(r->fd);
    free(r->path);
    free(r);
}

const sj_tokens_info *sj_tokens_reader_info(const sj_tokens_reader *r) { return &r->info; }
int sj_tokens_reader_fd(const sj_tokens_reader *r) { return r->fd; }

/* n tokens from token `first` into dst, in file (little-endian) order. */
static sj_status read_at(const sj_tokens_reader *r, void *dst, int64_t first, int64_t n) {
    return sj_pread_exact(r->fd, r->path, dst, (size_t)n * r->info.width,
                          SJ_TOKENS_HEADER_BYTES + (uint64_t)first * r->info.width, r->size);
}

static sj_status check_range(const sj_tokens_reader *r, int64_t first, int64_t n) {
    if (first < 0 || n < 0 || first > r->info.count || n > r->info.count - first)
        return sj_fail(SJ_ERR_ARG, "%s: tokens [%lld, %lld) lie outside the file's %lld tokens", r->path,
                       (long long)first, (long long)first + (long long)n, (long long)r->info.count);
    return SJ_OK;
}

sj_status sj_tokens_read(sj_tokens_reader *r, int64_t first, int64_t n, void *out) {
    SJ_TRY(check_range(r, first, n));
    SJ_TRY(read_at(r, out, first, n));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    unsigned char *p = out;
    for (int64_t i = 0; i < n; i++, p += r->info.width)
        for (uint32_t b = 0; b < r->info.width / 2; b++) {
            unsigned char t = p[b]; p[b] = p[r->info.width - 1 - b]; p[r->info.width - 1 - b] = t;
        }
#endif
    return SJ_OK;
}

/* Widen n little-endian tokens of `width` bytes to int32. */
static void widen(int32_t *dst, const unsigned char *src, int64_t n, uint32_t width) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (width == 2) {
        const uint16_t *s = (const uint16_t *)(const void *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = s[i];
    } else {
        memcpy(dst, src, (size_t)n * 4);
    }
#else
    for (int64_t i = 0; i < n; i++) dst[i] = (int32_t)(uint32_t)get_le(src + i * width, (int)width);
#endif
}

sj_status sj_tokens_read_windows(sj_tokens_reader *r, const int64_t *starts, int64_t n, int64_t len,
                                 int32_t *x, int32_t *y) {
    if (n < 0 || len < 1) return sj_fail(SJ_ERR_ARG, "%s: bad window count %lld or length %lld", r->path,
                                         (long long)n, (long long)len);
    int64_t span = len + (y != NULL);
    for (int64_t i = 0; i < n; i++) SJ_TRY(check_range(r, starts[i], span));
    /* The scratch holds one chunk of a window, plus y's extra token: 16 KiB
     * of stack, so one pread a window up to 4095 tokens. */
    enum { CHUNK = 4095 };
    uint32_t buf[CHUNK + 1];
    unsigned char *tmp = (unsigned char *)buf;
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < len; k += CHUNK) {
            int64_t c = SJ_MIN((int64_t)CHUNK, len - k);
            SJ_TRY(read_at(r, tmp, starts[i] + k, c + (y != NULL)));
            widen(x + i * len + k, tmp, c, r->info.width);
            if (y) widen(y + i * len + k, tmp + r->info.width, c, r->info.width);
        }
    return SJ_OK;
}
