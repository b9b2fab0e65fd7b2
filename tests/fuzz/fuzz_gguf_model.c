/* fuzz_gguf_model.c — sj_infer_load_gguf on arbitrary bytes: the GGUF
 * container and then the Llama model built from it (config keys, tensor
 * names, shapes and types, the four weight forms). The weight form is the
 * input's length mod 4. A model that loads runs a two-token prefill, one
 * decode step and a greedy sample with ids at both ends of its vocabulary,
 * and the handle's greedy choice equals the sampler's. */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_single_thread();
    const char *path = fuzz_file(data, size);
    sj_infer *h = NULL;
    sj_infer_mode mode = (sj_infer_mode)(size % 4);
    sj_status s = sj_infer_load_gguf(path, SJ_DEVICE_CPU, mode, 8, &h);
    if (s != SJ_OK) {
        FUZZ_CHECK(h == NULL, "failed load left a handle");
        FUZZ_CHECK(sj_last_error()[0] != '\0', "status %d without a message", (int)s);
        return 0;
    }
    const sj_config *c = sj_infer_config(h);
    FUZZ_CHECK(sj_config_validate(c) == SJ_OK, "loaded an invalid config: %s", sj_last_error());
    FUZZ_CHECK(sj_infer_max_ctx(h) >= 1 && sj_infer_max_ctx(h) <= 8, "max_ctx %d", sj_infer_max_ctx(h));
    int32_t toks[2] = {0, c->vocab_size - 1};
    int n = sj_infer_max_ctx(h) >= 3 ? 2 : 1;
    float *all = malloc((size_t)n * (size_t)c->vocab_size * sizeof *all);
    FUZZ_CHECK(all, "malloc");
    s = sj_infer_prefill(h, toks, n, all);
    FUZZ_CHECK(s == SJ_OK, "prefill of a loaded model failed: %s", sj_last_error());
    int32_t next = -1;
    s = sj_infer_decode(h, 1 % c->vocab_size, &next);
    FUZZ_CHECK(s == SJ_OK, "decode of a loaded model failed: %s", sj_last_error());
    sj_sampler *smp = NULL;
    if (sj_sampler_create(c->vocab_size, 1, &smp) == SJ_OK) {
        sj_sample_params p = {0.0f, 0, 1.0f, 1.0f};
        int32_t tok = -1;
        if (sj_infer_sample(h, smp, &p, toks, n, &tok) == SJ_OK)
            FUZZ_CHECK(tok == next, "sampled id %d, greedy decode %d", tok, next);
        sj_sampler_free(smp);
    }
    free(all);
    sj_infer_free(h);
    return 0;
}
