/* fuzz_gguf.c — sj_gguf_open on arbitrary bytes: header, metadata (scalars,
 * strings, arrays, arrays of strings), tensor infos, alignment, data ranges.
 * A file that opens must describe only bytes inside itself: every value and
 * tensor is read in full, typed getters are called on every key, and small
 * tensors of a supported type are dequantised into a heap buffer of exactly
 * numel floats (so ASan sees any write past it). */
#include "fuzz.h"

static volatile uint8_t acc;
static void touch(const void *p, uint64_t n) {
    const uint8_t *b = p;
    for (uint64_t k = 0; k < n; k++) acc ^= b[k];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    sj_gguf_file *f = NULL;
    sj_status s = sj_gguf_open(path, &f);
    if (s != SJ_OK) {
        FUZZ_CHECK(f == NULL, "failed open left a handle");
        FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
        return 0;
    }
    FUZZ_CHECK(sj_gguf_version(f) == 2 || sj_gguf_version(f) == 3, "version %d", sj_gguf_version(f));
    for (int i = 0; i < sj_gguf_n_kv(f); i++) {
        const sj_gguf_kv *kv = sj_gguf_kv_at(f, i);
        FUZZ_CHECK(kv && kv->key, "kv %d has no key", i);
        touch(kv->key, strlen(kv->key));
        FUZZ_CHECK(sj_gguf_find_kv(f, kv->key) != NULL, "key '%s' not found again", kv->key);
        if (kv->type == SJ_GGUF_STRING) {
            FUZZ_CHECK(kv->n <= size, "string '%s' of %llu bytes", kv->key, (unsigned long long)kv->n);
            touch(kv->data, kv->n);
        } else if (kv->type == SJ_GGUF_ARRAY && kv->arr_type == SJ_GGUF_STRING) {
            FUZZ_CHECK(kv->n <= size, "array '%s' of %llu strings", kv->key, (unsigned long long)kv->n);
            for (uint64_t j = 0; j < kv->n; j++) touch(kv->strs[j], kv->str_lens[j]);
        } else if (kv->type == SJ_GGUF_ARRAY) {
            uint64_t es = sj_gguf_value_size(kv->arr_type);
            FUZZ_CHECK(es > 0, "array '%s' of element type %d opened", kv->key, kv->arr_type);
            FUZZ_CHECK(kv->n <= size / es, "array '%s' of %llu elements", kv->key, (unsigned long long)kv->n);
            touch(kv->data, kv->n * es);
        } else {
            FUZZ_CHECK(sj_gguf_value_size(kv->type) > 0, "key '%s' has value type %d", kv->key, kv->type);
            touch(kv->data, sj_gguf_value_size(kv->type));
        }
        int64_t iv;
        double fv;
        (void)sj_gguf_get_int(f, kv->key, &iv);
        (void)sj_gguf_get_float(f, kv->key, &fv);
    }
    const uint8_t *section = NULL;
    for (int i = 0; i < sj_gguf_n_tensors(f); i++) {
        const sj_gguf_tensor *t = sj_gguf_tensor_at(f, i);
        FUZZ_CHECK(t && t->name, "tensor %d has no name", i);
        FUZZ_CHECK(sj_gguf_find_tensor(f, t->name) != NULL, "tensor '%s' not found again", t->name);
        FUZZ_CHECK(t->ndim >= 1 && t->ndim <= 4, "tensor '%s': ndim %d", t->name, t->ndim);
        int be, bb;
        FUZZ_CHECK(sj_gguf_type_block(t->type, &be, &bb), "tensor '%s': type %d opened", t->name, t->type);
        unsigned __int128 numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            FUZZ_CHECK(t->shape[d] > 0, "tensor '%s': dimension %d is %lld", t->name, d, (long long)t->shape[d]);
            numel *= (uint64_t)t->shape[d];
        }
        FUZZ_CHECK(numel == (unsigned __int128)t->numel, "tensor '%s': numel", t->name);
        FUZZ_CHECK(t->numel % be == 0 && (uint64_t)(t->numel / be) * (uint64_t)bb == t->nbytes,
                   "tensor '%s': %llu bytes for %lld elements of %s", t->name,
                   (unsigned long long)t->nbytes, (long long)t->numel, sj_gguf_type_name(t->type));
        FUZZ_CHECK(t->offset <= size && t->nbytes <= size - t->offset,
                   "tensor '%s': data %llu+%llu outside the %zu-byte file", t->name,
                   (unsigned long long)t->offset, (unsigned long long)t->nbytes, size);
        const uint8_t *sec = (const uint8_t *)t->data - t->offset;
        FUZZ_CHECK(!section || sec == section, "tensor '%s': data pointer off its data section", t->name);
        section = sec;
        touch(t->data, t->nbytes);
        if (t->numel <= (1 << 16)) {
            float *out = malloc((size_t)t->numel * sizeof *out);
            FUZZ_CHECK(out, "malloc");
            (void)sj_gguf_dequantize(t->type, t->data, t->numel, out);
            free(out);
        }
    }
    sj_gguf_close(f);
    return 0;
}
