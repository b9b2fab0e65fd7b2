/* core.h — internals shared by every engine layer: errors, threads, rng,
 * aligned memory. Never included by the public header. */
#ifndef SJ_CORE_H
#define SJ_CORE_H

#include "../smedjan.h"
#include <stdatomic.h>
#include <stdbool.h>

/* Record a printf-style message for sj_last_error(); returns code so that
 * callers can write `return sj_fail(SJ_ERR_ARG, "...", ...)`. */
sj_status sj_fail(sj_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sj_clear_error(void);
/* After sj_fail(SJ_ERR_NOMEM, ...) from a memory check: its figures, for
 * sj_last_oom() (sj_fail forgets them). */
void sj_set_oom(const sj_oom_info *info);

/* Propagate a failure without touching its message. */
#define SJ_TRY(expr) do { sj_status _s = (expr); if (_s != SJ_OK) return _s; } while (0)

extern atomic_int sj_interrupted_flag;
static inline bool sj_interrupted(void) {
    return atomic_load_explicit(&sj_interrupted_flag, memory_order_relaxed) != 0;
}

/* 64-byte aligned allocation, counted; NULL on failure with the error set. */
void *sj_alloc(size_t bytes, const char *what);
void sj_free(void *p);

/* ---- thread pool: fork-join over an index range --------------------- */

/* fn(ctx, begin, end, thread_id) is called on disjoint chunks covering
 * [0, n). The calling thread takes part. Nested calls run serially. */
typedef void (*sj_range_fn)(void *ctx, int64_t begin, int64_t end, int tid);
void sj_parallel_for(int64_t n, int64_t grain, sj_range_fn fn, void *ctx);
/* Run fn(ctx, 0..n_threads) once per thread: fn(ctx, tid, tid+1, tid). */
int sj_parallel_threads(void);

/* ---- rng: splitmix64 seeding + xoshiro256** ---------------------------- */

typedef struct { uint64_t s[4]; } sj_rng;
void sj_rng_seed(sj_rng *r, uint64_t seed);
uint64_t sj_rng_next(sj_rng *r);
float sj_rng_uniform(sj_rng *r);          /* [0, 1) */
float sj_rng_normal(sj_rng *r);           /* N(0, 1), Box-Muller */

/* Element i of a token array (int32 or uint16). */
static inline int64_t sj_token_at(const void *tok, sj_dtype t, int64_t i) {
    return t == SJ_U16 ? (int64_t)((const uint16_t *)tok)[i] : (int64_t)((const int32_t *)tok)[i];
}

uint32_t sj_crc32(uint32_t crc, const void *data, size_t n); /* zlib.crc32; chain from 0 */
#define SJ_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SJ_MAX(a, b) ((a) > (b) ? (a) : (b))
#define SJ_CDIV(a, b) (((a) + (b) - 1) / (b))

#endif
