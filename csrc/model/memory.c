/* memory.c — the model's memory budget: one accounting for every big
 * allocation (parameters, gradients, the compute copy, AdamW moments,
 * activation arenas), checked before anything is allocated against the
 * memory_limit lever and against what the machine can give. On Linux an
 * allocation larger than the free memory succeeds and the kernel kills the
 * process later, when the pages are touched; these checks are what turns
 * that into an error the caller can recover from. Never allocates. */
#include "model.h"
#ifdef SJ_HAVE_CUDA
#include "../../cuda/sj_cuda.h"
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tests point SMEDJAN_SYS_ROOT at a directory holding a fake
 * proc/meminfo, proc/self/cgroup and sys/fs/cgroup/... */
static FILE *sys_open(const char *path) {
    const char *root = getenv("SMEDJAN_SYS_ROOT");
    char full[1400];
    snprintf(full, sizeof full, "%s%s", root ? root : "", path);
    return fopen(full, "r");
}

/* "Key:   123 kB" in /proc/meminfo, in bytes; -1 when absent. */
static int64_t meminfo(const char *key) {
    FILE *f = sys_open("/proc/meminfo");
    if (!f) return -1;
    char line[256];
    int64_t out = -1;
    const size_t n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':') {
            out = 1024 * strtoll(line + n + 1, NULL, 10);
            break;
        }
    fclose(f);
    return out;
}

/* The first integer in a file ("max" and absent files: -1). */
static int64_t read_int(const char *dir, const char *name) {
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = sys_open(path);
    if (!f) return -1;
    char buf[64] = "";
    int64_t v = fgets(buf, sizeof buf, f) && buf[0] >= '0' && buf[0] <= '9'
                ? strtoll(buf, NULL, 10) : -1;
    fclose(f);
    return v;
}

/* "key value" in a cgroup memory.stat; 0 when absent. */
static int64_t stat_field(const char *dir, const char *key) {
    char path[1100], line[256];
    snprintf(path, sizeof path, "%s/memory.stat", dir);
    FILE *f = sys_open(path);
    if (!f) return 0;
    int64_t out = 0;
    const size_t n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ' ') { out = strtoll(line + n + 1, NULL, 10); break; }
    fclose(f);
    return out;
}

/* What this process's memory cgroup (v2, else v1) lets it have beyond its
 * use (the reclaimable inactive page cache counts as free, as in the
 * kubelet's working set); -1 when there is no limit. The cgroup's own
 * directory first, then the root of the mount (a container sees its own
 * cgroup there). */
static int64_t cgroup_room(int64_t *limit_out) {
    FILE *f = sys_open("/proc/self/cgroup");
    char line[1024], v2[512] = "", v1[512] = "";
    int have_v2 = 0, have_v1 = 0;
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *a = strchr(line, ':'), *b = a ? strchr(a + 1, ':') : NULL;
        if (!b) continue;
        *b = 0;
        if (!strcmp(a + 1, "")) { snprintf(v2, sizeof v2, "%s", b + 1); have_v2 = 1; }
        else if (strstr(a + 1, "memory")) { snprintf(v1, sizeof v1, "%s", b + 1); have_v1 = 1; }
    }
    if (f) fclose(f);
    static const struct { const char *base, *limit, *usage, *inactive; } kinds[] = {
        { "/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file" },
        { "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
          "total_inactive_file" },
    };
    for (int k = 0; k < 2; k++) {
        if (!(k == 0 ? have_v2 : have_v1)) continue;
        const char *own = k == 0 ? v2 : v1;
        for (int pass = 0; pass < 2; pass++) {
            char dir[1024];
            snprintf(dir, sizeof dir, "%s%s", kinds[k].base, pass == 0 ? own : "");
            const int64_t limit = read_int(dir, kinds[k].limit);
            const int64_t usage = read_int(dir, kinds[k].usage);
            if (usage < 0) continue;                      /* not this directory */
            if (limit < 0 || limit >= ((int64_t)1 << 60)) break;   /* no limit here */
            int64_t room = limit - usage + stat_field(dir, kinds[k].inactive);
            *limit_out = limit;
            return room < 0 ? 0 : room > limit ? limit : room;
        }
    }
    return -1;
}

int64_t sj_mem_available(sj_device dev, int64_t *total, const char **source) {
    int64_t t = -1, avail = -1;
    const char *src = "unknown";
    const char *fake = getenv("SMEDJAN_MEM_AVAILABLE");
    if (fake && *fake) {
        avail = strtoll(fake, NULL, 10);
        src = "SMEDJAN_MEM_AVAILABLE";
    } else if (dev == SJ_DEVICE_CUDA) {
#ifdef SJ_HAVE_CUDA
        avail = sj_cuda_mem_free(&t);
        src = "cudaMemGetInfo";
#endif
    } else {
        avail = meminfo("MemAvailable");
        t = meminfo("MemTotal");
        src = "MemAvailable";
        int64_t limit = -1;
        const int64_t room = cgroup_room(&limit);
        if (room >= 0 && (avail < 0 || room < avail)) {
            avail = room;
            t = limit;
            src = "cgroup memory limit";
        }
    }
    if (total) *total = t;
    if (source) *source = src;
    return avail;
}

/* "10.24 GiB" */
static const char *human(char *buf, size_t n, int64_t b) {
    const double x = (double)b;
    if (b < 0) snprintf(buf, n, "unknown");
    else if (x >= 1024.0 * 1024 * 1024) snprintf(buf, n, "%.2f GiB", x / (1024.0 * 1024 * 1024));
    else if (x >= 1024.0 * 1024) snprintf(buf, n, "%.1f MiB", x / (1024.0 * 1024));
    else if (x >= 1024.0) snprintf(buf, n, "%.1f KiB", x / 1024.0);
    else snprintf(buf, n, "%lld bytes", (long long)b);
    return buf;
}

static const char *device_words(sj_device dev) {
    return dev == SJ_DEVICE_CUDA ? "cuda:0" : "the cpu";
}

sj_status sj_model_check_memory(sj_model *m, sj_device dev, int64_t bytes, int use_limit,
                                const char *what) {
    const int64_t held = m->bytes, limit = m->lv.memory_limit;
    char a[32], h[32], l[32], v[32], t[32], all[64] = "";
    if (use_limit && limit > 0 && held + bytes > limit) {
        sj_fail(SJ_ERR_NOMEM, "memory limit on %s: %s (%lld bytes) asked for %s; with the %s "
                "the model holds now that is %s, over the limit of %s. Nothing was allocated "
                "for it.", device_words(dev), human(a, sizeof a, bytes), (long long)bytes, what,
                human(h, sizeof h, held), human(t, sizeof t, held + bytes),
                human(l, sizeof l, limit));
        sj_set_oom(&(sj_oom_info){ bytes, -1, held, limit, dev });
        return SJ_ERR_NOMEM;
    }
    int64_t total;
    const char *src;
    const int64_t avail = sj_mem_available(dev, &total, &src);
    if (avail >= 0 && bytes > avail) {
        if (total >= 0) snprintf(all, sizeof all, "; %s in all", human(t, sizeof t, total));
        sj_fail(SJ_ERR_NOMEM, "out of memory on %s: %s (%lld bytes) asked for %s, %s available "
                "(%s%s); the model holds %s now. Nothing was allocated for it: use a smaller "
                "model or batch, pull a memory lever (gradient_checkpointing, fused_ce, "
                "grad_accum), or free memory elsewhere.",
                device_words(dev), human(a, sizeof a, bytes), (long long)bytes, what,
                human(v, sizeof v, avail), src, all, human(h, sizeof h, held));
        sj_set_oom(&(sj_oom_info){ bytes, avail, held, limit, dev });
        return SJ_ERR_NOMEM;
    }
    return SJ_OK;
}
