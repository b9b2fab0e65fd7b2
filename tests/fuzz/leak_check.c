/* leak_check.c — load/save/free cycles through the public API (smedjan.h)
 * under LeakSanitizer: model + optimizer + train steps, checkpoints
 * (safetensors writer and reader), tokenizer training, save, load, encode
 * and decode, token files, GGUF save + open + model load, inference and
 * sampling — each done a few times, and each reader also fed a corrupt file
 * so its error paths free what they allocated. Built and run by
 * tests/fuzz/sanitize.py (`make sanitize`) with detect_leaks=1: a leak fails
 * the run. Prints one line per phase; exits non-zero on any engine error. */
#include "smedjan.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(call) do { sj_status s_ = (call); if (s_ != SJ_OK) { \
    fprintf(stderr, "leak_check: %s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, sj_last_error()); \
    exit(1); } } while (0)
#define EXPECT_FAIL(call) do { if ((call) == SJ_OK) { \
    fprintf(stderr, "leak_check: %s:%d: %s accepted a corrupt file\n", __FILE__, __LINE__, #call); \
    exit(1); } } while (0)

static char dir[256];
static char *at(const char *name) {
    static char buf[4][320];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f) != 0) { perror(path); exit(1); }
}

static void corrupt_copy(const char *src, const char *dst, size_t keep) {
    FILE *f = fopen(src, "rb");
    if (!f) { perror(src); exit(1); }
    char *buf = malloc(keep);
    size_t n = fread(buf, 1, keep, f);
    fclose(f);
    if (n > 16) buf[n / 2] ^= 0x5a;
    write_file(dst, buf, n);
    free(buf);
}

static const sj_config CFG = {.dim = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .ffn_dim = 64,
                              .vocab_size = 300, .max_seq_len = 32, .rope_theta = 10000.f, .norm_eps = 1e-5f};

static void model_cycle(int round) {
    sj_model *m;
    CHECK(sj_model_create(&CFG, (uint64_t)round, &m));
    sj_train_config tc = {3e-3f, 3e-4f, 1, 4, 0.9, 0.95, 1e-8f, 0.1f, 1.0f};
    sj_optimizer *o;
    CHECK(sj_optimizer_create(m, &tc, NULL, &o));
    int32_t x[2 * 8], y[2 * 8];
    for (int i = 0; i < 16; i++) { x[i] = (i * 7 + round) % CFG.vocab_size; y[i] = (i * 5 + 1) % CFG.vocab_size; }
    float loss, gn, lr;
    for (int s = 0; s < 2; s++) CHECK(sj_train_step(o, x, y, SJ_I32, 2, 8, &loss, &gn, &lr));
    float *logits = malloc(sizeof(float) * 2 * 8 * CFG.vocab_size);
    CHECK(sj_model_forward(m, x, SJ_I32, 2, 8, logits));
    free(logits);

    /* checkpoint: every parameter tensor plus the two moments, then read back */
    int nt = sj_model_n_tensors(m);
    sj_st_tensor *t = calloc((size_t)nt + 2, sizeof *t);
    int64_t np_;
    float *params = sj_model_params(m, &np_);
    for (int i = 0; i < nt; i++) {
        const sj_tensor_info *ti = sj_model_tensor(m, i);
        t[i].name = ti->name; t[i].dtype = "F32"; t[i].ndim = ti->ndim;
        for (int d = 0; d < ti->ndim; d++) t[i].shape[d] = ti->shape[d];
        t[i].data = params + ti->offset;
    }
    int64_t ns;
    const char *mom[2] = {"optim.exp_avg", "optim.exp_avg_sq"};
    for (int k = 0; k < 2; k++) {
        t[nt + k].name = mom[k]; t[nt + k].dtype = "F32"; t[nt + k].ndim = 1;
        t[nt + k].data = sj_optimizer_state(o, k, NULL, &ns);
        t[nt + k].shape[0] = ns;
    }
    sj_st_meta meta[2] = {{"format", "smedjan-checkpoint"}, {"step", "2"}};
    CHECK(sj_safetensors_save(at("ck.safetensors"), t, nt + 2, meta, 2));
    sj_st_writer *w;   /* a writer abandoned half way */
    CHECK(sj_st_writer_open(at("ab.safetensors"), t, nt + 2, meta, 2, &w));
    CHECK(sj_st_writer_write(w, params, 64));
    sj_st_writer_abort(w);
    free(t);
    sj_st_file *f;
    CHECK(sj_safetensors_open(at("ck.safetensors"), 1, &f));
    if (sj_safetensors_n_tensors(f) != nt + 2 || !sj_safetensors_meta_get(f, "step")) {
        fprintf(stderr, "leak_check: checkpoint read back wrong\n");
        exit(1);
    }
    sj_safetensors_close(f);
    corrupt_copy(at("ck.safetensors"), at("bad.safetensors"), 4096);
    EXPECT_FAIL(sj_safetensors_open(at("bad.safetensors"), 1, &f));
    EXPECT_FAIL(sj_safetensors_open(at("missing.safetensors"), 1, &f));

    /* inference from the model, and through a GGUF file written from it */
    sj_infer *h;
    CHECK(sj_infer_from_model(m, SJ_DEVICE_CPU, round % 2 ? SJ_INFER_Q8 : SJ_INFER_FP32, 16, &h));
    CHECK(sj_infer_prefill(h, x, 4, NULL));
    int32_t next[2];
    CHECK(sj_infer_decode(h, 3, next));
    CHECK(sj_infer_greedy(h, next[0], 2, next));
    sj_sampler *smp;
    CHECK(sj_sampler_create(CFG.vocab_size, 7, &smp));
    sj_sample_params sp = {0.8f, 20, 0.9f, 1.1f};
    int32_t tok;
    CHECK(sj_infer_sample(h, smp, &sp, x, 4, &tok));
    sj_sampler_free(smp);
    sj_infer_free(h);

    uint32_t u[6] = {(uint32_t)CFG.dim, (uint32_t)CFG.n_layers, (uint32_t)CFG.n_heads,
                     (uint32_t)CFG.n_kv_heads, (uint32_t)CFG.ffn_dim, (uint32_t)CFG.max_seq_len};
    float eps = CFG.norm_eps;
    sj_gguf_kv kv[8] = {
        {"general.architecture", SJ_GGUF_STRING, 0, 5, "llama", NULL, NULL},
        {"llama.embedding_length", SJ_GGUF_UINT32, 0, 1, &u[0], NULL, NULL},
        {"llama.block_count", SJ_GGUF_UINT32, 0, 1, &u[1], NULL, NULL},
        {"llama.attention.head_count", SJ_GGUF_UINT32, 0, 1, &u[2], NULL, NULL},
        {"llama.attention.head_count_kv", SJ_GGUF_UINT32, 0, 1, &u[3], NULL, NULL},
        {"llama.feed_forward_length", SJ_GGUF_UINT32, 0, 1, &u[4], NULL, NULL},
        {"llama.context_length", SJ_GGUF_UINT32, 0, 1, &u[5], NULL, NULL},
        {"llama.attention.layer_norm_rms_epsilon", SJ_GGUF_FLOAT32, 0, 1, &eps, NULL, NULL},
    };
    const int C = CFG.dim, F = CFG.ffn_dim, KV = CFG.n_kv_heads * (CFG.dim / CFG.n_heads);
    sj_gguf_tensor g[3 + 9 * 2];
    char names[3 + 9 * 2][64];
    int ng = 0;
#define GT(nm, s0, s1) do { snprintf(names[ng], 64, "%s", nm); g[ng] = (sj_gguf_tensor){names[ng], (s1) ? 2 : 1, \
    {(s0), (s1) ? (s1) : 1, 1, 1}, SJ_GGUF_F32, 0, 0, (int64_t)(s0) * ((s1) ? (s1) : 1), params}; ng++; } while (0)
    GT("token_embd.weight", C, CFG.vocab_size);
    GT("output_norm.weight", C, 0);
    for (int l = 0; l < CFG.n_layers; l++) {
        char nm[64];
#define GL(suffix, s0, s1) snprintf(nm, sizeof nm, "blk.%d.%s", l, suffix); GT(nm, s0, s1)
        GL("attn_q.weight", C, C); GL("attn_k.weight", C, KV); GL("attn_v.weight", C, KV);
        GL("attn_output.weight", C, C); GL("ffn_gate.weight", C, F); GL("ffn_up.weight", C, F);
        GL("ffn_down.weight", F, C); GL("attn_norm.weight", C, 0); GL("ffn_norm.weight", C, 0);
#undef GL
    }
#undef GT
    for (int i = 0; i < ng; i++) g[i].nbytes = (uint64_t)g[i].numel * 4;
    CHECK(sj_gguf_save(at("m.gguf"), kv, 8, g, ng));
    sj_gguf_file *gf;
    CHECK(sj_gguf_open(at("m.gguf"), &gf));
    sj_gguf_close(gf);
    CHECK(sj_infer_load_gguf(at("m.gguf"), SJ_DEVICE_CPU, (sj_infer_mode)(round % 4), 8, &h));
    CHECK(sj_infer_prefill(h, x, 3, NULL));
    sj_infer_free(h);
    corrupt_copy(at("m.gguf"), at("bad.gguf"), 700);
    EXPECT_FAIL(sj_gguf_open(at("bad.gguf"), &gf));
    EXPECT_FAIL(sj_infer_load_gguf(at("bad.gguf"), SJ_DEVICE_CPU, SJ_INFER_FP32, 8, &h));

    sj_optimizer_free(o);
    sj_model_free(m);
}

static void tokenizer_cycle(int round) {
    const char *text = "the cat sat on the mat; the dog sat on the log. <|endoftext|> 123 caf\xc3\xa9 ";
    const uint8_t *texts[3] = {(const uint8_t *)text, (const uint8_t *)"the the the", (const uint8_t *)"\xff\xfe"};
    size_t lens[3] = {strlen(text), 11, 2};
    const uint8_t *sp[1] = {(const uint8_t *)"<|endoftext|>"};
    size_t spl[1] = {13};
    sj_bpe_trainer *tr;
    CHECK(sj_bpe_trainer_create(1, sp, spl, &tr));
    CHECK(sj_bpe_trainer_feed(tr, 3, texts, lens));
    int todo, done;
    CHECK(sj_bpe_trainer_begin(tr, 256 + 1 + 20 + round, 0, &todo));
    CHECK(sj_bpe_trainer_step(tr, 5, &done));
    CHECK(sj_bpe_trainer_step(tr, 1000, &done));
    sj_tokenizer *t;
    CHECK(sj_bpe_trainer_finish(tr, &t));
    sj_bpe_trainer_free(tr);
    CHECK(sj_tokenizer_save(t, at("tok.sjtok")));
    sj_tokenizer *t2;
    CHECK(sj_tokenizer_load(at("tok.sjtok"), &t2));
    int32_t ids[256];
    size_t n, len;
    CHECK(sj_tokenizer_encode(t2, (const uint8_t *)text, lens[0], NULL, ids, &n));
    int64_t offs[4];
    int32_t bids[512];
    CHECK(sj_tokenizer_encode_batch(t2, 3, texts, lens, NULL, bids, offs));
    CHECK(sj_tokenizer_decoded_len(t2, ids, n, &len));
    uint8_t *out = malloc(len + 1);
    sj_tokenizer_decode(t2, ids, n, out);
    free(out);
    uint8_t modes[1] = {SJ_SPECIAL_REFUSE};
    EXPECT_FAIL(sj_tokenizer_encode(t2, (const uint8_t *)text, lens[0], modes, ids, &n));
    sj_tokenizer_free(t2);
    sj_tokenizer_free(t);
    corrupt_copy(at("tok.sjtok"), at("bad.sjtok"), 1u << 20);
    EXPECT_FAIL(sj_tokenizer_load(at("bad.sjtok"), &t));

    sj_tokens_writer *w;
    CHECK(sj_tokens_writer_open(at("t.tok"), 2, &w));
    uint16_t toks[5] = {1, 2, 3, 4, 5};
    CHECK(sj_tokens_writer_append(w, toks, 5));
    int64_t count;
    CHECK(sj_tokens_writer_close(w, &count));
    sj_tokens_info info;
    CHECK(sj_tokens_inspect(at("t.tok"), &info));
    CHECK(sj_tokens_writer_open(at("u.tok"), 4, &w));
    sj_tokens_writer_abort(w);
    corrupt_copy(at("t.tok"), at("bad.tok"), 20);
    EXPECT_FAIL(sj_tokens_inspect(at("bad.tok"), &info));
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/sj_leak_check_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    for (int round = 0; round < 3; round++) {
        model_cycle(round);
        tokenizer_cycle(round);
        printf("leak_check: round %d: model, optimizer, checkpoint, GGUF, inference, tokenizer, token files\n",
               round);
    }
    const char *files[] = {"ck.safetensors", "bad.safetensors", "m.gguf", "bad.gguf", "tok.sjtok",
                           "bad.sjtok", "t.tok", "bad.tok"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) unlink(at(files[i]));
    rmdir(dir);
    printf("leak_check: done (LeakSanitizer reports any leak at exit)\n");
    return 0;
}
