/* threads.c — a persistent fork-join pool. Work is handed out in chunks
 * from an atomic counter, so uneven rows (causal attention) balance; what
 * a chunk computes never depends on which thread runs it, so results are
 * deterministic. Workers spin briefly before sleeping: engine calls come
 * in quick bursts of many small kernels. */
#include "core.h"
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    pthread_t *threads;
    int n_threads;                 /* including the caller */
    atomic_uint_fast64_t generation;
    uint64_t start_generation;     /* generation when the workers were started */
    atomic_int pending;            /* workers still in the current job */
    atomic_int_fast64_t next;      /* next index to hand out */
    sj_range_fn fn;
    void *ctx;
    int64_t n, chunk;
    int stop;
} pool_t;

static pool_t pool = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                       PTHREAD_COND_INITIALIZER };
static pthread_mutex_t submit_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static _Thread_local int in_pool;

static void run_chunks(int tid) {
    for (;;) {
        int64_t b = atomic_fetch_add(&pool.next, pool.chunk);
        if (b >= pool.n) break;
        pool.fn(pool.ctx, b, SJ_MIN(b + pool.chunk, pool.n), tid);
    }
}

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    /* Not 0: a worker started after earlier jobs would take the current
     * generation for a new job, run it, and count itself done twice. */
    uint64_t seen = pool.start_generation;
    in_pool = 1;
    for (;;) {
        int spins = 0;
        while (atomic_load(&pool.generation) == seen && spins < 20000) { cpu_relax(); spins++; }
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.generation) == seen && !pool.stop)
                pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        if (pool.stop) return NULL;
        seen = atomic_load(&pool.generation);
        run_chunks(tid);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
}

static void pool_stop(void) {
    if (!pool.threads) return;
    pthread_mutex_lock(&pool.mu);
    pool.stop = 1;
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < pool.n_threads - 1; i++) pthread_join(pool.threads[i], NULL);
    free(pool.threads);
    pool.threads = NULL;
    pool.stop = 0;
}

/* Called with no job in flight (pool_once, or holding submit_mu). */
static sj_status pool_start(int n) {
    pool.n_threads = 1;
    if (n <= 1) return SJ_OK;
    pool.start_generation = atomic_load(&pool.generation);
    pool.threads = calloc((size_t)n - 1, sizeof(pthread_t));
    if (!pool.threads) return sj_fail(SJ_ERR_NOMEM, "thread pool: out of memory");
    for (int i = 0; i < n - 1; i++) {
        if (pthread_create(&pool.threads[i], NULL, worker, (void *)(intptr_t)(i + 1)) != 0) {
            pool.n_threads = i + 1;
            pool_stop();
            pool.n_threads = 1;
            return sj_fail(SJ_ERR_RUNTIME, "thread pool: could not start thread %d", i + 1);
        }
        pool.n_threads = i + 2;
    }
    return SJ_OK;
}

static void pool_init(void) {
    const char *env = getenv("SMEDJAN_THREADS");
    long n = env && *env ? strtol(env, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    if (pool_start((int)n) != SJ_OK) pool.n_threads = 1;
}

int sj_threads_get(void) { pthread_once(&pool_once, pool_init); return pool.n_threads; }
int sj_parallel_threads(void) { return sj_threads_get(); }

sj_status sj_threads_set(int n) {
    if (n < 1 || n > 256) return sj_fail(SJ_ERR_ARG, "threads must be in 1..256, got %d", n);
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&submit_mu);
    pool_stop();
    sj_status s = pool_start(n);
    pthread_mutex_unlock(&submit_mu);
    return s;
}

void sj_parallel_for(int64_t n, int64_t grain, sj_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    pthread_once(&pool_once, pool_init);
    int P = pool.n_threads;
    /* Serial when small, nested, or another caller owns the pool. */
    if (P == 1 || n <= grain || in_pool || pthread_mutex_trylock(&submit_mu) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    /* About four chunks per thread, never smaller than grain. */
    int64_t chunk = SJ_MAX(grain, SJ_CDIV(n, 4 * (int64_t)P));
    pool.fn = fn; pool.ctx = ctx; pool.n = n; pool.chunk = chunk;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.pending, P - 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    in_pool = 1;
    run_chunks(0);
    in_pool = 0;
    int spins = 0;
    while (atomic_load(&pool.pending) > 0 && spins < 200000) { cpu_relax(); spins++; }
    if (atomic_load(&pool.pending) > 0) {
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.done, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&submit_mu);
}
