/* error.c — thread-local error messages and the interrupt flag. */
#include "core.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static _Thread_local char last_error[1024];
static _Thread_local sj_oom_info last_oom;
static _Thread_local int have_oom;
atomic_int sj_interrupted_flag;

const char *sj_last_error(void) { return last_error; }
void sj_clear_error(void) { last_error[0] = 0; have_oom = 0; }
const sj_oom_info *sj_last_oom(void) { return have_oom ? &last_oom : NULL; }
void sj_set_oom(const sj_oom_info *info) { last_oom = *info; have_oom = 1; }

sj_status sj_fail(sj_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    have_oom = 0;
    return code;
}

void sj_interrupt(void) { atomic_store(&sj_interrupted_flag, 1); }
void sj_interrupt_clear(void) { atomic_store(&sj_interrupted_flag, 0); }

size_t sj_dtype_size(sj_dtype t) {
    switch (t) {
    case SJ_F32: case SJ_I32: return 4;
    case SJ_BF16: case SJ_F16: case SJ_U16: return 2;
    case SJ_U8: return 1;
    }
    return 0;
}

void *sj_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63) != 0 || !p) {
        sj_fail(SJ_ERR_NOMEM, "out of memory allocating %zu bytes for %s", bytes, what);
        return NULL;
    }
    return p;
}

void sj_free(void *p) { free(p); }
