/* sample_loader.c — batches over a bin2d file in a deterministic schedule
 * (shuffle buffer, length buckets; smedjan.h says how), assembled on the
 * caller's thread or ahead of it on one prefetch thread into a ring of
 * buffers. The schedule of an epoch is a pure function of (config, epoch),
 * so a position is just (epoch, batch) and seeking reads no token. The
 * prefetch thread never changes what is handed out, only when it is made. */
#include "io.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t epoch;               /* -1: none computed yet */
    int32_t *T;                  /* (n_batches) */
    int64_t *rows;               /* (n_batches, B), -1: padding */
} schedule;

typedef struct {
    int32_t *x, *y;              /* (B, max_T) each */
    int T;
    int64_t labels, epoch, index;
    sj_status status;            /* != SJ_OK: making this batch failed, with `error` */
    char error[1024];
} slot;

struct sj_sample_loader {
    sj_samples *f;
    int B, max_T, n_buckets;
    int *buckets;                /* (n_buckets) ascending; one bucket of seq_len without sizes */
    int64_t shuffle, n_rows, n_batches;
    uint64_t seed;
    int64_t *rows;               /* (n_rows) the epoch's rows, file order */
    schedule sched;              /* the producer's */
    int64_t next_epoch, next_batch;   /* the next batch the producer makes */
    /* prefetch: a ring of n_slots; the consumer takes ring[head], the
     * producer fills ring[(head + count) % n_slots] outside the lock (the
     * consumer cannot see it until count grows) */
    int n_slots;
    slot *ring;
    int64_t head, count;
    int thread_live, stop, failed;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t filled, freed;
};

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), n >= 1, without modulo bias (Lemire's method). */
static uint64_t below(sj_rng *r, uint64_t n) {
    unsigned __int128 m = (unsigned __int128)sj_rng_next(r) * n;
    if ((uint64_t)m < n) {
        const uint64_t threshold = (0 - n) % n;
        while ((uint64_t)m < threshold) m = (unsigned __int128)sj_rng_next(r) * n;
    }
    return (uint64_t)(m >> 64);
}

static int bucket_of(const sj_sample_loader *l, uint32_t length) {
    for (int b = 0; b < l->n_buckets; b++)
        if ((uint32_t)l->buckets[b] >= length - 1) return b;
    return l->n_buckets - 1;
}

/* The epoch's batches: rows through the shuffle buffer, then the buckets. */
static sj_status make_schedule(sj_sample_loader *l, int64_t epoch) {
    schedule *s = &l->sched;
    const int B = l->B;
    const uint32_t *lengths = sj_samples_lengths(l->f);
    const int64_t K = SJ_MIN(l->shuffle, l->n_rows);
    int64_t *buf = sj_alloc((size_t)SJ_MAX(K, 1) * sizeof *buf, "shuffle buffer");
    int64_t *pending = sj_alloc((size_t)l->n_buckets * B * sizeof *pending, "bucket rows");
    int *filled = calloc((size_t)l->n_buckets, sizeof *filled);
    if (!buf || !pending || !filled) {
        sj_free(buf); sj_free(pending); free(filled);
        return sj_fail(SJ_ERR_NOMEM, "sample loader: out of memory for the schedule");
    }
    sj_rng rng;
    sj_rng_seed(&rng, mix64(l->seed) ^ mix64((uint64_t)epoch + 0x9E3779B97F4A7C15ull));
    int64_t made = 0, next = 0, live = K;
    if (K) memcpy(buf, l->rows, (size_t)K * sizeof *buf);
    next = K;
    for (int64_t i = 0; i < l->n_rows; i++) {
        int64_t row;
        if (!K) {
            row = l->rows[i];
        } else {
            int64_t j = (int64_t)below(&rng, (uint64_t)live);
            row = buf[j];
            buf[j] = next < l->n_rows ? l->rows[next++] : buf[--live];
        }
        int b = bucket_of(l, lengths[row]);
        pending[(int64_t)b * B + filled[b]++] = row;
        if (filled[b] == B) {
            s->T[made] = l->buckets[b];
            memcpy(s->rows + made * B, pending + (int64_t)b * B, (size_t)B * sizeof *pending);
            made++;
            filled[b] = 0;
        }
    }
    for (int b = 0; b < l->n_buckets; b++) {
        if (!filled[b]) continue;
        for (int k = filled[b]; k < B; k++) pending[(int64_t)b * B + k] = -1;
        s->T[made] = l->buckets[b];
        memcpy(s->rows + made * B, pending + (int64_t)b * B, (size_t)B * sizeof *pending);
        made++;
    }
    sj_free(buf); sj_free(pending); free(filled);
    s->epoch = epoch;
    return SJ_OK;
}

/* Make the producer's next batch into x, y (B, T); advance. */
static sj_status produce(sj_sample_loader *l, int32_t *x, int32_t *y, int *T, int64_t *labels,
                         int64_t *epoch, int64_t *index) {
    if (l->next_batch == l->n_batches) { l->next_epoch++; l->next_batch = 0; }
    if (l->sched.epoch != l->next_epoch) SJ_TRY(make_schedule(l, l->next_epoch));
    const int64_t k = l->next_batch;
    *T = l->sched.T[k];
    SJ_TRY(sj_samples_batch(l->f, l->sched.rows + k * l->B, l->B, *T, x, y, labels));
    *epoch = l->next_epoch;
    *index = k;
    l->next_batch++;
    return SJ_OK;
}

static void *prefetch_main(void *arg) {
    sj_sample_loader *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (!l->stop && l->count == l->n_slots) pthread_cond_wait(&l->freed, &l->mu);
        if (l->stop) break;
        slot *s = &l->ring[(l->head + l->count) % l->n_slots];
        pthread_mutex_unlock(&l->mu);
        s->status = produce(l, s->x, s->y, &s->T, &s->labels, &s->epoch, &s->index);
        if (s->status) snprintf(s->error, sizeof s->error, "%s", sj_last_error());
        pthread_mutex_lock(&l->mu);
        l->count++;
        pthread_cond_signal(&l->filled);
        if (s->status) { l->failed = 1; break; }   /* the error waits in the ring for next() */
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static sj_status start_thread(sj_sample_loader *l) {
    if (!l->n_slots) return SJ_OK;
    l->stop = 0;
    l->failed = 0;
    int e = pthread_create(&l->thread, NULL, prefetch_main, l);
    if (e) return sj_fail(SJ_ERR_RUNTIME, "sample loader: cannot start the prefetch thread: %s", strerror(e));
    l->thread_live = 1;
    return SJ_OK;
}

static void stop_thread(sj_sample_loader *l) {
    if (!l->thread_live) return;
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_cond_broadcast(&l->freed);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
    l->thread_live = 0;
    l->head = l->count = 0;
}

sj_status sj_sample_loader_open(sj_samples *f, const sj_sample_loader_config *c, sj_sample_loader **out) {
    *out = NULL;
    const sj_samples_info *info = sj_samples_file_info(f);
    if (c->batch_size < 1) return sj_fail(SJ_ERR_ARG, "sample loader: batch_size %d < 1", c->batch_size);
    if (c->n_buckets < 0 || (c->n_buckets && !c->bucket_sizes))
        return sj_fail(SJ_ERR_ARG, "sample loader: %d bucket sizes given without a list", c->n_buckets);
    for (int b = 0; b < c->n_buckets; b++)
        if (c->bucket_sizes[b] < 1 || (b && c->bucket_sizes[b] <= c->bucket_sizes[b - 1]))
            return sj_fail(SJ_ERR_ARG, "sample loader: bucket sizes must be ascending integers >= 1 "
                           "(bucket %d is %d)", b, c->bucket_sizes[b]);
    if (!c->n_buckets && c->seq_len < 1)
        return sj_fail(SJ_ERR_ARG, "sample loader: seq_len %d < 1", c->seq_len);
    if (c->shuffle_buffer < 0 || c->prefetch_batches < 0)
        return sj_fail(SJ_ERR_ARG, "sample loader: shuffle_buffer %lld and prefetch_batches %d must be >= 0",
                       (long long)c->shuffle_buffer, c->prefetch_batches);
    if (c->n_rows < 1) return sj_fail(SJ_ERR_ARG, "sample loader: no rows to visit");
    for (int64_t i = 0; i < c->n_rows; i++)
        if (c->rows[i] < 0 || c->rows[i] >= info->n_rows)
            return sj_fail(SJ_ERR_ARG, "sample loader: row %lld is outside the file's %lld rows",
                           (long long)c->rows[i], (long long)info->n_rows);
    sj_sample_loader *l = calloc(1, sizeof *l);
    if (!l) return sj_fail(SJ_ERR_NOMEM, "sample loader: out of memory");
    l->f = f;
    l->B = c->batch_size;
    l->n_buckets = c->n_buckets ? c->n_buckets : 1;
    l->shuffle = c->shuffle_buffer;
    l->seed = c->seed;
    l->n_rows = c->n_rows;
    l->n_slots = c->prefetch_batches;
    l->sched.epoch = -1;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->filled, NULL);
    pthread_cond_init(&l->freed, NULL);
    sj_status s = SJ_ERR_NOMEM;
    l->buckets = malloc((size_t)l->n_buckets * sizeof *l->buckets);
    l->rows = sj_alloc((size_t)c->n_rows * sizeof *l->rows, "sample loader rows");
    if (!l->buckets || !l->rows) goto fail;
    if (c->n_buckets) memcpy(l->buckets, c->bucket_sizes, (size_t)c->n_buckets * sizeof *l->buckets);
    else l->buckets[0] = c->seq_len;
    l->max_T = l->buckets[l->n_buckets - 1];
    memcpy(l->rows, c->rows, (size_t)c->n_rows * sizeof *l->rows);
    /* Rows per bucket do not depend on the order: neither does the count. */
    int64_t *per_bucket = calloc((size_t)l->n_buckets, sizeof *per_bucket);
    if (!per_bucket) goto fail;
    const uint32_t *lengths = sj_samples_lengths(f);
    for (int64_t i = 0; i < l->n_rows; i++) per_bucket[bucket_of(l, lengths[l->rows[i]])]++;
    for (int b = 0; b < l->n_buckets; b++) l->n_batches += SJ_CDIV(per_bucket[b], (int64_t)l->B);
    free(per_bucket);
    l->sched.T = sj_alloc((size_t)l->n_batches * sizeof *l->sched.T, "schedule");
    l->sched.rows = sj_alloc((size_t)l->n_batches * l->B * sizeof *l->sched.rows, "schedule");
    if (!l->sched.T || !l->sched.rows) goto fail;
    if (l->n_slots) {
        l->ring = calloc((size_t)l->n_slots, sizeof *l->ring);
        if (!l->ring) goto fail;
        for (int i = 0; i < l->n_slots; i++) {
            size_t bytes = (size_t)l->B * l->max_T * sizeof(int32_t);
            if (!(l->ring[i].x = sj_alloc(bytes, "prefetch ring")) ||
                !(l->ring[i].y = sj_alloc(bytes, "prefetch ring")))
                goto fail;
        }
    }
    if ((s = start_thread(l)) != SJ_OK) goto fail;
    *out = l;
    return SJ_OK;
fail:
    if (s == SJ_ERR_NOMEM) sj_fail(SJ_ERR_NOMEM, "sample loader: out of memory");
    sj_sample_loader_close(l);
    return s;
}

void sj_sample_loader_close(sj_sample_loader *l) {
    if (!l) return;
    stop_thread(l);
    for (int i = 0; l->ring && i < l->n_slots; i++) { sj_free(l->ring[i].x); sj_free(l->ring[i].y); }
    free(l->ring);
    sj_free(l->sched.T);
    sj_free(l->sched.rows);
    sj_free(l->rows);
    free(l->buckets);
    pthread_cond_destroy(&l->filled);
    pthread_cond_destroy(&l->freed);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

int64_t sj_sample_loader_epoch_batches(const sj_sample_loader *l) { return l->n_batches; }

sj_status sj_sample_loader_seek(sj_sample_loader *l, int64_t epoch, int64_t batch) {
    if (epoch < 0 || batch < 0 || batch > l->n_batches)
        return sj_fail(SJ_ERR_ARG, "sample loader: position (epoch %lld, batch %lld) is outside an epoch "
                       "of %lld batches", (long long)epoch, (long long)batch, (long long)l->n_batches);
    stop_thread(l);
    l->next_epoch = epoch;
    l->next_batch = batch;
    return start_thread(l);
}

/* With prefetch: wait for the oldest slot; its error, if making it failed. */
static sj_status oldest(sj_sample_loader *l, slot **out) {
    pthread_mutex_lock(&l->mu);
    while (l->count == 0 && l->thread_live && !l->failed) pthread_cond_wait(&l->filled, &l->mu);
    slot *s = l->count ? &l->ring[l->head] : NULL;
    pthread_mutex_unlock(&l->mu);
    if (!s) return sj_fail(SJ_ERR_RUNTIME, "sample loader: the prefetch thread is not running");
    if (s->status) return sj_fail(s->status, "%s", s->error);
    *out = s;
    return SJ_OK;
}

sj_status sj_sample_loader_peek(sj_sample_loader *l, int *T) {
    if (l->n_slots) {
        slot *s = NULL;
        SJ_TRY(oldest(l, &s));
        *T = s->T;
        return SJ_OK;
    }
    if (l->next_batch == l->n_batches) { l->next_epoch++; l->next_batch = 0; }
    if (l->sched.epoch != l->next_epoch) SJ_TRY(make_schedule(l, l->next_epoch));
    *T = l->sched.T[l->next_batch];
    return SJ_OK;
}

sj_status sj_sample_loader_next(sj_sample_loader *l, int T, int32_t *x, int32_t *y, int64_t *labels,
                                int64_t *epoch, int64_t *index) {
    int want;
    SJ_TRY(sj_sample_loader_peek(l, &want));
    if (T != want)
        return sj_fail(SJ_ERR_ARG, "sample loader: the next batch has T = %d, not %d (peek first)", want, T);
    if (!l->n_slots) {
        int made;
        return produce(l, x, y, &made, labels, epoch, index);
    }
    slot *s = &l->ring[l->head];
    memcpy(x, s->x, (size_t)l->B * T * sizeof *x);
    memcpy(y, s->y, (size_t)l->B * T * sizeof *y);
    *labels = s->labels;
    *epoch = s->epoch;
    *index = s->index;
    pthread_mutex_lock(&l->mu);
    l->head = (l->head + 1) % l->n_slots;
    l->count--;
    pthread_cond_signal(&l->freed);
    pthread_mutex_unlock(&l->mu);
    return SJ_OK;
}
