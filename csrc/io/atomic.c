/* atomic.c — crash-safe file replacement: write "<path>.tmp.<pid>", fsync,
 * rename over path, fsync the directory. A crash or a failed write leaves
 * either the old file or the new one under the real name, never a half.
 * Must never touch the file at path before the final rename.
 *
 * Failpoints (tests): SMEDJAN_FAILPOINT="op:ERRNO[:n]" makes the n-th call
 * (default 1) of op — open, write, fsync, close, rename or dirsync (the
 * directory's fsync) — fail with ERRNO (ENOSPC, EIO, EDQUOT, EACCES or
 * EROFS), or with KILL end the process there by SIGKILL, as a power cut
 * would; the count restarts when the variable changes. */
#include "io.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The errno to inject into this call of op, or 0. */
static int failpoint(const char *op) {
    static char spec[64];
    static int calls;
    const char *e = getenv("SMEDJAN_FAILPOINT");
    if (!e || !*e) return 0;
    if (strncmp(spec, e, sizeof spec - 1) != 0) {   /* a new spec: count afresh */
        snprintf(spec, sizeof spec, "%s", e);
        calls = 0;
    }
    char name[16], err[16];
    int nth = 1;
    if (sscanf(spec, "%15[^:]:%15[^:]:%d", name, err, &nth) < 2 || strcmp(name, op) != 0) return 0;
    if (++calls != nth) return 0;
    if (!strcmp(err, "KILL")) raise(SIGKILL);
    static const struct { const char *name; int code; } codes[] = {
        { "ENOSPC", ENOSPC }, { "EIO", EIO }, { "EDQUOT", EDQUOT }, { "EACCES", EACCES },
        { "EROFS", EROFS },
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (!strcmp(err, codes[i].name)) return codes[i].code;
    return EIO;
}

sj_status sj_afile_open(sj_afile *f, const char *path) {
    f->fd = -1;
    f->path = f->tmp = NULL;
    if (!path || !*path) return sj_fail(SJ_ERR_ARG, "empty file name");
    size_t n = strlen(path) + 32;
    f->path = strdup(path);
    f->tmp = malloc(n);
    if (!f->path || !f->tmp) {
        free(f->path); free(f->tmp);
        f->path = f->tmp = NULL;
        return sj_fail(SJ_ERR_NOMEM, "%s: out of memory", path);
    }
    snprintf(f->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        sj_afile_abort(f);
        return sj_fail(SJ_ERR_IO, "%s: is a directory", path);
    }
    /* O_EXCL: two writers of one path in one process must not share a temp. */
    const int inject = failpoint("open");
    f->fd = inject ? -1 : open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (f->fd < 0) {
        int e = inject ? inject : errno;
        sj_status s = sj_fail(SJ_ERR_IO, "%s: cannot create temporary file %s: %s", path, f->tmp,
                              strerror(e));
        free(f->path); free(f->tmp);
        f->path = f->tmp = NULL;
        return s;
    }
    return SJ_OK;
}

void sj_afile_abort(sj_afile *f) {
    if (f->fd >= 0) {
        close(f->fd);
        unlink(f->tmp);
    }
    f->fd = -1;
    free(f->path); free(f->tmp);
    f->path = f->tmp = NULL;
}

static sj_status io_fail(sj_afile *f, const char *what, int e) {
    sj_status s = sj_fail(SJ_ERR_IO, "%s: %s failed: %s", f->path ? f->path : "?", what,
                          strerror(e));
    sj_afile_abort(f);
    return s;
}

sj_status sj_afile_write(sj_afile *f, const void *p, size_t n) {
    if (f->fd < 0) return sj_fail(SJ_ERR_ARG, "write to a file that is closed");
    const char *c = p;
    while (n) {
        const int inject = failpoint("write");
        if (inject) return io_fail(f, "write", inject);
        ssize_t k = write(f->fd, c, n > (1u << 30) ? (1u << 30) : n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return io_fail(f, "write", k < 0 ? errno : ENOSPC);
        c += k;
        n -= (size_t)k;
    }
    return SJ_OK;
}

sj_status sj_afile_pwrite(sj_afile *f, const void *p, size_t n, uint64_t offset) {
    if (f->fd < 0) return sj_fail(SJ_ERR_ARG, "write to a file that is closed");
    const char *c = p;
    while (n) {
        const int inject = failpoint("write");
        if (inject) return io_fail(f, "write", inject);
        ssize_t k = pwrite(f->fd, c, n, (off_t)offset);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return io_fail(f, "write", k < 0 ? errno : ENOSPC);
        c += k;
        n -= (size_t)k;
        offset += (uint64_t)k;
    }
    return SJ_OK;
}

sj_status sj_afile_commit(sj_afile *f) {
    if (f->fd < 0) return sj_fail(SJ_ERR_ARG, "commit of a file that is closed");
    int inject = failpoint("fsync");
    if (inject || fsync(f->fd) != 0) return io_fail(f, "fsync", inject ? inject : errno);
    int fd = f->fd;
    f->fd = -1;
    inject = failpoint("close");
    if (close(fd) != 0 || inject) {
        int e = inject ? inject : errno;
        unlink(f->tmp);
        return io_fail(f, "close", e);
    }
    inject = failpoint("rename");
    if (inject || rename(f->tmp, f->path) != 0) {
        int e = inject ? inject : errno;
        unlink(f->tmp);
        return io_fail(f, "rename", e);
    }
    /* Make the rename itself durable. Best effort: some filesystems refuse
     * fsync on directories, and the new file is already in place. */
    char *dir = strdup(f->path);
    if (dir) {
        char *slash = strrchr(dir, '/');
        const char *d = slash ? (slash == dir ? "/" : (*slash = 0, dir)) : ".";
        int dfd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { if (!failpoint("dirsync")) fsync(dfd); close(dfd); }
        free(dir);
    }
    sj_afile_abort(f);   /* frees names; fd is already -1 */
    return SJ_OK;
}
