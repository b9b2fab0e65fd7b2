/* pread.c — checked reads of validated files (token files, bin2d samples):
 * pread() into the caller's memory, never through a mapping. When another
 * process cuts a file short, touching a mapped page past the new end raises
 * SIGBUS, which no library can turn into an error safely; a read that comes
 * back short is an error we can name. Reads from the page cache cost about
 * what a mapped gather does. */
#include "io.h"
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

sj_status sj_pread_exact(int fd, const char *path, void *dst, size_t n, uint64_t at,
                         uint64_t checked_size) {
    size_t got = 0;
    while (got < n) {
        size_t want = SJ_MIN(n - got, (size_t)1 << 30);   /* pread moves at most ~2 GiB a call */
        ssize_t k = pread(fd, (char *)dst + got, want, (off_t)(at + got));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0)
            return sj_fail(SJ_ERR_IO, "%s: read of %zu bytes at byte %llu failed: %s", path, n - got,
                           (unsigned long long)(at + got), strerror(errno));
        if (k == 0) {
            struct stat st;
            if (fstat(fd, &st) == 0 && (uint64_t)st.st_size < checked_size)
                return sj_fail(SJ_ERR_IO, "%s: file shrank from %llu to %llu bytes while open (byte "
                               "%llu is gone)", path, (unsigned long long)checked_size,
                               (unsigned long long)st.st_size, (unsigned long long)(at + got));
            return sj_fail(SJ_ERR_IO, "%s: short read at byte %llu (%zu of %zu bytes; was the file "
                           "changed while open?)", path, (unsigned long long)(at + got), got, n);
        }
        got += (size_t)k;
    }
    return SJ_OK;
}
