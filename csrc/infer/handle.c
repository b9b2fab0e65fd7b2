/* handle.c — the one inference handle of smedjan.h: an engine (engine.h:
 * a backend table + its state) behind the verbs, the way the training ops
 * sit behind csrc/ops/backend.h. Everything a caller can get wrong is
 * checked here, once, for every device: tokens inside the vocabulary, free
 * cache positions, counts; the position lives here and moves only when an
 * engine call succeeded. It must never call an engine with a request it
 * did not check. */
#include "engine.h"
#include <stdlib.h>
#include <string.h>

struct sj_infer {
    const sj_infer_backend *be;
    void *e;
    sj_config c;
    sj_device device;
    sj_infer_mode mode;
    int max_ctx, pos;
};

sj_status sj_infer_resolve_ctx(const sj_config *c, int *max_ctx) {
    if (*max_ctx <= 0) *max_ctx = SJ_MIN(c->max_seq_len, 4096);
    if (*max_ctx > (1 << 20)) return sj_fail(SJ_ERR_ARG, "max_ctx %d is too large", *max_ctx);
    return SJ_OK;
}

static sj_status check_mode(sj_infer_mode mode) {
    if (mode < SJ_INFER_FP32 || mode > SJ_INFER_Q4) return sj_fail(SJ_ERR_ARG, "inference mode %d is not valid", (int)mode);
    return SJ_OK;
}

static sj_status wrap(sj_infer_engine *en, sj_device device, sj_infer_mode mode, sj_infer **out) {
    sj_infer *h = calloc(1, sizeof *h);
    if (!h) {
        en->be->free(en->e);
        return sj_fail(SJ_ERR_NOMEM, "inference handle: out of memory");
    }
    h->be = en->be; h->e = en->e; h->c = en->c;
    h->device = device; h->mode = mode; h->max_ctx = en->max_ctx;
    *out = h;
    return SJ_OK;
}

sj_status sj_infer_from_model(sj_model *m, sj_device device, sj_infer_mode mode, int max_ctx, sj_infer **out) {
    *out = NULL;
    SJ_TRY(check_mode(mode));
    sj_infer_engine en;
    if (device == SJ_DEVICE_CPU) SJ_TRY(sj_infer_cpu_from_model(m, mode, max_ctx, &en));
    else if (device == SJ_DEVICE_CUDA) SJ_TRY(sj_infer_cuda_from_model(m, mode, max_ctx, &en));
    else return sj_fail(SJ_ERR_ARG, "inference device %d is not valid (cpu or cuda)", (int)device);
    return wrap(&en, device, mode, out);
}

sj_status sj_infer_load_gguf(const char *path, sj_device device, sj_infer_mode mode, int max_ctx, sj_infer **out) {
    *out = NULL;
    SJ_TRY(check_mode(mode));
    sj_infer_engine en;
    if (device == SJ_DEVICE_CPU) SJ_TRY(sj_infer_cpu_load_gguf(path, mode, max_ctx, &en));
    else if (device == SJ_DEVICE_CUDA) SJ_TRY(sj_infer_cuda_load_gguf(path, mode, max_ctx, &en));
    else return sj_fail(SJ_ERR_ARG, "inference device %d is not valid (cpu or cuda)", (int)device);
    return wrap(&en, device, mode, out);
}

void sj_infer_free(sj_infer *h) {
    if (!h) return;
    h->be->free(h->e);
    free(h);
}

sj_infer_cpu *sj_infer_cpu_of(const sj_infer *h) { return h->be == &sj_infer_cpu_backend ? h->e : NULL; }

sj_device sj_infer_device(const sj_infer *h) { return h->device; }
const sj_config *sj_infer_config(const sj_infer *h) { return &h->c; }
int sj_infer_max_ctx(const sj_infer *h) { return h->max_ctx; }
int sj_infer_pos(const sj_infer *h) { return h->pos; }
sj_infer_mode sj_infer_get_mode(const sj_infer *h) { return h->mode; }
int64_t sj_infer_weight_bytes(const sj_infer *h) { return h->be->weight_bytes(h->e); }
int64_t sj_infer_cache_bytes(const sj_infer *h) { return h->be->cache_bytes(h->e); }

void sj_infer_reset(sj_infer *h) {
    if (h->be->reset) h->be->reset(h->e);
    h->pos = 0;
}

/* Moving the position back forgets the later tokens only where they live
 * in per-position cache rows: a recurrent state (mamba2, linear) folded
 * them in, and a sliding window's ring overwrote the rows it would need. */
static sj_status check_rewindable(const sj_infer *h) {
    for (int l = 0; l < h->c.n_layers; l++) {
        const sj_layer *y = &h->c.layers[l];
        if (y->mixer == SJ_MIXER_MAMBA2 || y->mixer == SJ_MIXER_LINEAR)
            return sj_fail(SJ_ERR_ARG, "rewind: layer %d's mixer %s keeps a recurrent state, which "
                           "cannot move back", l, sj_mixer_name(y->mixer));
        if (y->window > 0 && y->window < h->max_ctx)
            return sj_fail(SJ_ERR_ARG, "rewind: layer %d's sliding window (%d < max_ctx %d) keeps a "
                           "ring buffer, which cannot move back", l, y->window, h->max_ctx);
    }
    return SJ_OK;
}

sj_status sj_infer_rewind(sj_infer *h, int pos) {
    SJ_TRY(check_rewindable(h));
    if (pos < 0 || pos > h->pos)
        return sj_fail(SJ_ERR_ARG, "rewind: position %d is outside 0..%d (the tokens in the cache)", pos, h->pos);
    h->pos = pos;
    return SJ_OK;
}

/* n tokens from the current position: tokens (may be NULL: only the count
 * is checked) in the vocabulary, and room in the cache. */
static sj_status check_tokens(const sj_infer *h, const char *verb, const int32_t *tokens, int n) {
    if (n <= 0) return sj_fail(SJ_ERR_ARG, "%s: no tokens (n = %d)", verb, n);
    if (n > h->max_ctx - h->pos)
        return sj_fail(SJ_ERR_ARG, "%s: %d token(s) after %d in the cache exceed its %d positions "
                       "(reset, or load with a larger max_ctx)", verb, n, h->pos, h->max_ctx);
    for (int i = 0; tokens && i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= h->c.vocab_size)
            return sj_fail(SJ_ERR_ARG, "%s: token %d at %d is outside the vocabulary (%d)", verb, tokens[i], i,
                           h->c.vocab_size);
    return SJ_OK;
}

sj_status sj_infer_prefill(sj_infer *h, const int32_t *tokens, int n, float *logits_all) {
    SJ_TRY(check_tokens(h, "prefill", tokens, n));
    SJ_TRY(h->be->prefill(h->e, h->pos, tokens, n, logits_all));
    h->pos += n;
    return SJ_OK;
}

/* n greedy-chained steps after token; next: NULL (n == 1) or (n). */
static sj_status steps(sj_infer *h, const char *verb, int32_t token, int n, int32_t *next) {
    SJ_TRY(check_tokens(h, verb, &token, 1));
    SJ_TRY(check_tokens(h, verb, NULL, n));
    SJ_TRY(h->be->decode(h->e, h->pos, token, n, next));
    h->pos += n;
    return SJ_OK;
}

sj_status sj_infer_decode(sj_infer *h, int32_t token, int32_t *next) { return steps(h, "decode", token, 1, next); }

sj_status sj_infer_greedy(sj_infer *h, int32_t token, int n, int32_t *out) {
    if (n <= 0) return sj_fail(SJ_ERR_ARG, "greedy: n must be positive, got %d", n);
    return steps(h, "greedy", token, n, out);
}

sj_status sj_infer_logits(sj_infer *h, float *out) {
    const float *l;
    SJ_TRY(h->be->logits(h->e, &l));
    memcpy(out, l, sizeof(float) * (size_t)h->c.vocab_size);
    return SJ_OK;
}

sj_status sj_infer_sample(sj_infer *h, sj_sampler *s, const sj_sample_params *p, const int32_t *history,
                          int n_history, int32_t *token) {
    if (sj_sampler_vocab(s) != h->c.vocab_size)
        return sj_fail(SJ_ERR_ARG, "sample: the sampler's vocab_size %d differs from the model's %d",
                       sj_sampler_vocab(s), h->c.vocab_size);
    const float *l;
    SJ_TRY(h->be->logits(h->e, &l));
    return sj_sample(s, l, p, history, n_history, token);
}

static sj_status not_here(const sj_infer *h, const char *what) {
    return sj_fail(SJ_ERR_ARG, "%s: not available on %s", what, h->be->device);
}

sj_status sj_infer_set_kv_f16(sj_infer *h, int f16) {
    if (!h->be->set_kv_f16)
        return f16 ? not_here(h, "kv_dtype='f16' (the K/V cache is kept in the weights' mode)") : SJ_OK;
    if (!!f16 != h->be->kv_f16(h->e) && h->pos)
        return sj_fail(SJ_ERR_ARG, "KV cache type: set it before any tokens (%d are cached; reset first)", h->pos);
    return h->be->set_kv_f16(h->e, !!f16);
}
int sj_infer_kv_f16(const sj_infer *h) { return h->be->kv_f16 ? h->be->kv_f16(h->e) : 0; }

sj_status sj_infer_set_options(sj_infer *h, int graphs, int persistent) {
    if (!h->be->set_options) return not_here(h, "execution options (graphs, persistent)");
    h->be->set_options(h->e, !!graphs, !!persistent);
    return SJ_OK;
}
sj_status sj_infer_get_options(const sj_infer *h, int *graphs, int *persistent) {
    if (!h->be->get_options) return not_here(h, "execution options (graphs, persistent)");
    h->be->get_options(h->e, graphs, persistent);
    return SJ_OK;
}
