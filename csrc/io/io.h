/* io.h — internals of the io layer: files that appear atomically under
 * their real name. Never included by the public header. */
#ifndef SJ_IO_H
#define SJ_IO_H

#include "../core/core.h"

/* A file written as "<path>.tmp.<pid>" and renamed over path on commit.
 * Until commit, an existing file at path is never touched; abort (or any
 * failed call below, which aborts itself) removes the temp file. */
typedef struct {
    int fd;          /* -1 once committed or aborted */
    char *path;      /* the real name, as the caller spelled it */
    char *tmp;
} sj_afile;

sj_status sj_afile_open(sj_afile *f, const char *path);
/* Append n bytes (partial writes and EINTR retried). */
sj_status sj_afile_write(sj_afile *f, const void *p, size_t n);
/* Overwrite n bytes at an absolute offset (headers patched at the end). */
sj_status sj_afile_pwrite(sj_afile *f, const void *p, size_t n, uint64_t offset);
/* fsync, close, rename over path, fsync the directory. */
sj_status sj_afile_commit(sj_afile *f);
void sj_afile_abort(sj_afile *f);

/* Read exactly n bytes at offset `at` of a file that was `checked_size`
 * bytes when it was validated (pread(): never through a mapping, so a file
 * cut short by another process is an error to name, not a SIGBUS). A short
 * read says whether the file shrank since, and the byte that is gone. */
sj_status sj_pread_exact(int fd, const char *path, void *dst, size_t n, uint64_t at,
                         uint64_t checked_size);

/* A strict JSON reader (RFC 8259) for file headers: strings with every
 * escape, numbers, arrays, objects, true/false/null; rejects anything else
 * with the byte position. Depth is capped so hostile input cannot overflow
 * the stack. The whole tree (nodes, child arrays sized exactly, strings)
 * lives in one arena owned by the document: a header with a million
 * entries costs a few allocations, not millions. */
typedef enum { SJ_JSON_NULL, SJ_JSON_BOOL, SJ_JSON_NUM, SJ_JSON_STR, SJ_JSON_ARR,
               SJ_JSON_OBJ } sj_json_type;
typedef struct sj_json {
    const char *key;         /* object members: the key (decoded)        */
    union {
        const char *str;     /* STR: decoded UTF-8, no NUL inside        */
        struct sj_json *kids;/* ARR elements / OBJ members, in order     */
        int64_t i;           /* NUM when is_int                          */
    };
    size_t pos;              /* byte offset of the value in the text    */
    int n;                   /* ARR/OBJ: number of kids                  */
    unsigned char type;      /* sj_json_type                             */
    unsigned char is_int;    /* NUM: an integer that fits in int64       */
    unsigned char b;         /* BOOL                                     */
} sj_json;
typedef struct sj_json_block sj_json_block;
typedef struct {
    sj_json root;
    sj_json_block *arena;    /* owns every node and string of the tree */
} sj_json_doc;
/* `what` prefixes error messages ("ckpt.safetensors: header JSON: ..."). */
sj_status sj_json_parse(const char *text, size_t len, const char *what, sj_json_doc *out);
void sj_json_free(sj_json_doc *d);
const char *sj_json_type_name(sj_json_type t);

/* A tensor's bytes [begin, end) in a file's data section, and the order
 * that sorts them by position (ties by index: the same messages every run):
 * overlap and gap checks in one pass over the sorted list. */
typedef struct { uint64_t begin, end; int64_t i; } sj_extent;
static inline int sj_extent_cmp(const void *a, const void *b) {
    const sj_extent *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

#endif
