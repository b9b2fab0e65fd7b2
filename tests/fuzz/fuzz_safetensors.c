/* fuzz_safetensors.c — sj_safetensors_open on arbitrary bytes: the checkpoint
 * container (header length, JSON header, dtypes, shapes, offsets, layout,
 * CRC entries). A file that opens must describe only bytes inside itself:
 * every tensor's range is checked against the mapping and read in full, and
 * every metadata string is read and found again by key. */
#include "fuzz.h"

static void check_open(const sj_st_file *cf, sj_st_file *f, size_t size) {
    uint64_t fsize;
    const uint8_t *base = sj_safetensors_bytes(f, &fsize);
    FUZZ_CHECK(fsize == size, "mapped %llu bytes of a %zu-byte file", (unsigned long long)fsize, size);
    volatile uint8_t acc = 0;
    for (int i = 0; i < sj_safetensors_n_tensors(cf); i++) {
        const sj_st_tensor *t = sj_safetensors_tensor(cf, i);
        FUZZ_CHECK(t && t->name && t->dtype, "tensor %d lacks a name or dtype", i);
        size_t es = sj_st_dtype_size(t->dtype);
        FUZZ_CHECK(es > 0, "tensor '%s' opened with unknown dtype '%s'", t->name, t->dtype);
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= SJ_ST_MAX_DIMS, "tensor '%s': ndim %d", t->name, t->ndim);
        unsigned __int128 numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            FUZZ_CHECK(t->shape[d] >= 0, "tensor '%s': negative dimension", t->name);
            numel *= (uint64_t)t->shape[d];
        }
        FUZZ_CHECK(numel * es == t->nbytes, "tensor '%s': %llu bytes for its shape and dtype",
                   t->name, (unsigned long long)t->nbytes);
        FUZZ_CHECK(t->offset <= size && t->nbytes <= size - t->offset,
                   "tensor '%s': bytes %llu+%llu outside the %zu-byte file", t->name,
                   (unsigned long long)t->offset, (unsigned long long)t->nbytes, size);
        FUZZ_CHECK(t->nbytes == 0 || (const uint8_t *)t->data == base + t->offset,
                   "tensor '%s': data pointer is not the mapping + offset", t->name);
        const uint8_t *p = t->data;
        for (uint64_t k = 0; k < t->nbytes; k++) acc ^= p[k];
        acc ^= (uint8_t)strlen(t->name);
    }
    for (int i = 0; i < sj_safetensors_n_meta(cf); i++) {
        const sj_st_meta *m = sj_safetensors_meta(cf, i);
        FUZZ_CHECK(m && m->key && m->value, "metadata %d lacks a key or value", i);
        acc ^= (uint8_t)(strlen(m->key) + strlen(m->value));
        FUZZ_CHECK(sj_safetensors_meta_get(cf, m->key) != NULL, "metadata key '%s' not found again", m->key);
    }
    (void)acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    /* With CRC checks first (as smedjan loads checkpoints); when they fail,
     * without, so mutated data still reaches the layout checks past them. */
    for (int verify = 1; verify >= 0; verify--) {
        sj_st_file *f = NULL;
        sj_status s = sj_safetensors_open(path, verify, &f);
        if (s != SJ_OK) {
            FUZZ_CHECK(f == NULL, "failed open left a handle");
            FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
            continue;
        }
        check_open(f, f, size);
        sj_safetensors_close(f);
        break;
    }
    return 0;
}
