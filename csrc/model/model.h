/* model.h — the model's state, shared with train/ and io/. */
#ifndef SJ_MODEL_H
#define SJ_MODEL_H

#include "../graph/tape.h"

/* LOGITS and LOSS run forward; TRAIN runs backward too, adding into the
 * model's gradients; STEP is a whole train step (sj_train_step on a model
 * that holds no gradients): its gradients live in the arena, where the
 * activations that backward frees make room for them, and die with the
 * optimizer update that reads them, as PyTorch's do with the caching
 * allocator and zero_grad(set_to_none=True). */
typedef enum { SJ_RUN_LOGITS, SJ_RUN_LOSS, SJ_RUN_TRAIN, SJ_RUN_STEP } sj_run_mode;
static inline int sj_run_trains(sj_run_mode mode) { return mode >= SJ_RUN_TRAIN; }

/* A recorded and planned tape for one (B, T, mode, label rows), kept for reuse. */
typedef struct {
    int B, T, used;
    sj_run_mode mode;
    int label_rows;              /* sparse loss: rows the final norm, head and loss run over
                                  * (the batch's labels, padded to a bucket); 0: dense, all
                                  * B*T rows */
    int64_t last_use;
    sj_tape tape;
    int tokens, targets, logits, losses;   /* tensor ids */
    int label_idx;               /* sparse loss: the label rows' positions (tensor id) */
    int unfused;                 /* tests (SMEDJAN_UNFUSED): residuals as matmul + add */
    int casts;                   /* casts each weight from the master on use */
    sj_rope rope;                /* the run's RoPE frequencies (dynamic scaling: for T) */
    sj_rope rope_mla;            /* ... over mla's qk_rope_head_dim (mla layers only) */
    /* host side of the inputs and per-row losses; pinned on device backends:
     * tokens (2N int32: ids, then rows sorted by id) | targets (N int32) |
     * losses (N f32) | label positions (label_rows int32). With the sparse
     * loss, targets and losses are per label row (the first label_rows of
     * each); host backends then stage only those. */
    void *host;
    void *graph;                 /* the captured train step or logits run (device backends) */
    const void *graph_opt;       /* ... for this optimizer (train steps) */
    int64_t graph_epoch;         /* ... and these buffers */
    int eager_steps;             /* train steps (or logits runs) run eagerly: the first
                                  * is, so that lazy module loading and GEMM heuristics
                                  * happen outside a capture */
} sj_plan;

enum { SJ_MAX_PLANS = 4, SJ_MAX_LABEL_BUCKETS = 16 };
enum { SJ_NAME_MAX = 48 };   /* bytes of a tensor's name ("layers.1023.moe.router_bias") */

/* Memory levers: they change how a plan is recorded and laid out, never
 * what it computes (up to fp32 summation order for the fused loss). */
typedef struct {
    int gradient_checkpointing;   /* recompute each block's interior in backward */
    int cheap_recompute;   /* recompute only the RMSNorm and SwiGLU outputs in backward */
    int fused_ce;          /* LM head + loss in row chunks: no (N, V) logits */
    int ce_rows;           /* rows per chunk of the fused loss (0: default) */
    int fp16_activations;  /* activations kept for backward stored as fp16 (f32 compute) */
    int cast_on_use;       /* 16-bit models, forward and loss runs: each weight cast from the
                            * f32 master into the arena right before use, as they do anyway
                            * until the first training run makes the compute copy, which this
                            * drops (a training run makes it again) */
    int64_t memory_limit;  /* bytes; a plan whose peak would pass it is refused; 0: none */
    /* Loss and training runs: the final norm, LM head and cross-entropy run
     * only at the label rows (targets not ignored), gathered from the
     * residual stream; the other rows' logits never exist. Their count is
     * padded to the smallest label bucket that holds it (ascending; above
     * the largest, to a multiple of it; none: a multiple of 64), so that a
     * few shapes (plans, CUDA graphs) serve every batch. */
    int sparse_loss;
    int n_label_bucket_sizes;
    int label_bucket_sizes[SJ_MAX_LABEL_BUCKETS];
} sj_levers;

/* Start peak tracking afresh: peak = bytes held now. */
void sj_model_reset_peak(sj_model *m);
/* Set the levers (drops the cached plans when they change). */
sj_status sj_model_set_levers(sj_model *m, const sj_levers *lv);
/* Plan (B, T, mode) without allocating: the activation arena's bytes (with
 * STEP, the step's gradients too), and the activation bytes kept from
 * forward to backward. With the sparse loss, for the worst case: every
 * position labelled. */
sj_status sj_model_plan_bytes(sj_model *m, int B, int T, sj_run_mode mode,
                              int64_t *arena_bytes, int64_t *kept_bytes);
/* ... for batches of `labels` label positions (sparse loss; < 0: every
 * position), and the tape's census (sj_tape_census; nodes NULL: none). */
sj_status sj_model_plan_census(sj_model *m, int B, int T, sj_run_mode mode, int64_t labels,
                               int64_t *arena_bytes, int64_t *kept_bytes,
                               int nodes[SJ_OP__COUNT], int in_place[SJ_OP__COUNT]);
/* The rows a sparse loss runs for `labels` label positions out of n (the
 * bucket that holds them, at most n). */
int sj_model_label_rows(const sj_levers *lv, int64_t labels, int64_t n);
/* sj_model_loss with the loss's denominator given (grad accumulation: the
 * whole batch's counted targets, so that micro-batch gradients sum to the
 * big batch's mean gradient); denom <= 0: this batch's own count. The loss
 * returned is sum(row losses) / denom. */
sj_status sj_model_loss_ex(sj_model *m, const void *tokens, const void *targets,
                           sj_dtype tok_dtype, int B, int T, int ignore_index,
                           int backward, int64_t denom, float *loss);

/* Scalars the kernels read from backend memory, so that a replayed graph
 * sees this step's values. The host writes `in` (pinned), copies it over;
 * `out` comes back after the step. */
typedef struct {
    float loss_scale, pad_;
    sj_optim_hp hp;
} sj_scalars;

struct sj_model {
    sj_config cfg;
    const sj_backend *be;
    sj_device device;
    sj_dtype dtype;                 /* of activations and the compute copy */
    float *params, *grads;          /* (n_params) each, f32, backend memory */
    void *params_act;               /* compute copy of params (== params when f32; NULL
                                     * until a training run makes it, or while
                                     * cast_on_use keeps it away) */
    int64_t n_params;
    sj_tensor_info *tensors; int n_tensors;
    char *names;
    sj_plan plans[SJ_MAX_PLANS];
    int64_t clock;
    int64_t plans_recorded;         /* tapes recorded so far (tests: shapes reused) */
    int64_t bytes, peak_bytes;
    float *rows_host; int64_t n_rows_host;   /* per-row losses (per label row with the
                                              * sparse loss), copied to host; read only
                                              * by sj_model_mean_loss, which sums them */
    void *ctx;                      /* backend context: stream, scratch */
    sj_scalars *scalars;            /* backend memory */
    sj_scalars *scalars_host;       /* [0] in, [1] out; pinned on device backends */
    int32_t *sort_count;            /* (vocab + 1) host ints for the token sort */
    int vocab_ld;                   /* row stride of the logits inside loss and train runs */
    int64_t epoch;                  /* bumps when the buffers move (to()) */
    int use_graphs;                 /* capture train steps (device backends) */
    sj_levers lv;                   /* memory levers: how plans are recorded */
    sj_moe_route *moe_routes;       /* (n_layers) the MoE layers' routing, read by their tapes */
    float *moe_stats;               /* (n_layers, 2 + E) backend memory: sj_moe_route's stats */
    float *moe_stats_host;          /* ... copied to the host after each forward */
};

/* Rows [row0, row0 + rows) of the tensor named fmt % l as a tape input of
 * plan pl (a vector: its elements), cast from the master where the plan casts
 * weights; -1 (error set) when there is none. */
int sj_model_weight(const sj_model *m, sj_plan *pl, const char *fmt, int l, int64_t row0,
                    int64_t rows);

/* The mla mixer (mla.c). Exact parameters of one mla layer's mixer (wo
 * included, attn_norm not); the layer's mixer recorded on pl's tape from the
 * normed input h: (B*T, dim) to the (B*T, n_heads*v_head_dim) that wo reads.
 * end_block: close the open checkpoint block once h's readers are recorded. */
int64_t sj_mla_param_count(const sj_config *c);
int sj_mla_record(sj_model *m, sj_plan *pl, int l, int h, int end_block);

/* Count engine memory held by the model (positive: allocated). */
void sj_model_account(sj_model *m, int64_t delta);

/* The one memory budget (memory.c). Before the model allocates `bytes`
 * more on dev for `what` (now, or soon: the caller adds up what a use will
 * bring): SJ_OK, or SJ_ERR_NOMEM with the figures (sj_last_oom) when, with
 * use_limit, what it holds plus bytes would pass the memory_limit lever,
 * or when bytes pass what dev has available (sj_mem_available). */
sj_status sj_model_check_memory(sj_model *m, sj_device dev, int64_t bytes, int use_limit,
                                const char *what);
/* What a use holds besides its activation arena, planned: the f32
 * parameters; the model's gradients (TRAIN: backward adds into them; a STEP
 * keeps its own in its arena); the 16-bit compute copy (made by training,
 * or already held); and optimizer_bytes, an optimizer's state
 * (sj_optimizer_plan_bytes). */
int64_t sj_model_fixed_bytes(const sj_model *m, sj_run_mode mode, int64_t optimizer_bytes);

/* The pieces of a run, used by sj_model_loss and the optimizer's train step.
 * prepare: check inputs, find the plan, bring the gradients into being for
 * a training run, stage the inputs on the host side and set the loss scale;
 * count = rows that count in the loss. */
sj_status sj_model_prepare(sj_model *m, const void *tokens, const void *targets,
                           sj_dtype tok_dtype, int B, int T, int ignore_index,
                           sj_run_mode mode, int64_t denom, sj_plan **out, int64_t *count);
/* enqueue: copy the staged inputs in, forward (then per-row losses out),
 * backward when the plan trains. On the bound context; capturable. */
sj_status sj_model_enqueue(sj_model *m, sj_plan *pl);
/* Capture sj_model_enqueue (then then(arg), on the same stream) as the
 * plan's CUDA graph, replacing any it had; device backends. */
sj_status sj_model_capture(sj_model *m, sj_plan *pl, void (*then)(void *), void *arg);
/* The mean loss from the per-row losses (after the work completed). */
float sj_model_mean_loss(sj_model *m, sj_plan *pl, int64_t count);

/* Mixture of experts (moe.c). The number of MoE layers; layer l's routed
 * experts recorded on h (N, C) -> (N, C) (cast: weights from the master);
 * the routing state's buffers made with the model's (attach) and freed
 * (detach); the aux and z losses times their coefficients, from the last
 * forward's statistics. */
int sj_moe_layers(const sj_config *c);
int sj_moe_record_layer(sj_model *m, sj_tape *tp, int l, int h, int N, int cast);
sj_status sj_moe_attach(sj_model *m);
void sj_moe_detach(sj_model *m);
double sj_moe_loss(const sj_model *m);

#endif
