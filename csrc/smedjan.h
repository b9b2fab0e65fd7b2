/* smedjan.h — the one public C header of the smedjan engine.
 *
 * Opaque handles, verbs named sj_<noun>_<verb>, and sj_status codes. Every
 * fallible call returns a status; on failure sj_last_error() says what and
 * where. Library code never exits, aborts or asserts on user input.
 * Valid in C and C++ (the CUDA backend includes it).
 */
#ifndef SMEDJAN_H
#define SMEDJAN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status and errors ------------------------------------------------ */

typedef enum {
    SJ_OK = 0,
    SJ_ERR_ARG,          /* bad argument: shape, dtype, range      -> ValueError   */
    SJ_ERR_IO,           /* file could not be read or written      -> OSError      */
    SJ_ERR_FORMAT,       /* file is malformed, truncated, corrupt  -> ValueError   */
    SJ_ERR_NOMEM,        /* an allocation failed                   -> MemoryError  */
    SJ_ERR_INTERRUPTED,  /* sj_interrupt() was called mid-work     -> KeyboardInterrupt */
    SJ_ERR_RUNTIME,      /* anything else (device errors ...)      -> RuntimeError */
} sj_status;

/* The message of the last failure on this thread ("" if none). */
const char *sj_last_error(void);

/* Ask long-running engine calls to stop at the next safe point; they return
 * SJ_ERR_INTERRUPTED. Async-signal-safe. sj_interrupt_clear() re-arms. */
void sj_interrupt(void);
void sj_interrupt_clear(void);

/* ---- dtypes ----------------------------------------------------------- */

typedef enum { SJ_F32 = 0, SJ_BF16, SJ_F16, SJ_I32, SJ_U16, SJ_U8 } sj_dtype;
size_t sj_dtype_size(sj_dtype t);

/* ---- threads ---------------------------------------------------------- */

/* Worker threads for CPU kernels. Defaults to $SMEDJAN_THREADS, else the
 * number of online CPUs. Setting it rebuilds the pool. */
int sj_threads_get(void);
sj_status sj_threads_set(int n);

/* ---- model configuration ---------------------------------------------- */

/* Architecture options. Zero everywhere is the plain model: RMSNorm, RoPE,
 * GQA attention over the whole causal context, SwiGLU, tied head. */
enum { SJ_MIXER_ATTENTION = 0,
       SJ_MIXER_MLA,           /* multi-head latent attention (DeepSeek-V2/V3), sj_mla */
       SJ_MIXER_MAMBA2,        /* Mamba-2 (SSD): conv, chunked scan, gated RMSNorm (ssm) */
       SJ_MIXER_LINEAR,        /* linear attention over the chunked scan (linear)       */
       SJ_MIXER__COUNT };
enum { SJ_LINEAR_IDENTITY = 0, SJ_LINEAR_ELU1, SJ_LINEAR__COUNT };        /* feature maps */
enum { SJ_LINEAR_DECAY_NONE = 0, SJ_LINEAR_DECAY_GATED, SJ_LINEAR_DECAY__COUNT };
enum { SJ_FFN_SWIGLU = 0,      /* silu(gate) * up            */
       SJ_FFN_RELU2,           /* relu(gate)^2 * up           */
       SJ_FFN_MOE,             /* routed SwiGLU experts (+ shared ones): sj_moe_config */
       SJ_FFN_NONE,            /* no channel mixer: norm + mixer + residual (Mamba-2) */
       SJ_FFN__COUNT };
enum { SJ_QK_NORM_NONE = 0,
       SJ_QK_NORM_WEIGHTED,    /* per-head RMSNorm of q and k, learnable gains (Qwen3) */
       SJ_QK_NORM_PLAIN,       /* ... without gains (seed 001)                         */
       SJ_QK_NORM__COUNT };
/* RoPE scaling as transformers defines it (rope_type): */
enum { SJ_ROPE_DEFAULT = 0,
       SJ_ROPE_LINEAR,         /* positions divided by factor                        */
       SJ_ROPE_DYNAMIC,        /* NTK-aware base, grown once a run passes the original */
       SJ_ROPE_YARN,           /* NTK-by-parts frequencies, attention temperature     */
       SJ_ROPE__COUNT };
enum { SJ_MAX_LAYERS = 1024 };

typedef struct {
    uint8_t mixer;    /* SJ_MIXER_*                                       */
    uint8_t ffn;      /* SJ_FFN_*                                         */
    uint8_t qk_norm;  /* SJ_QK_NORM_*                                     */
    uint8_t unused_;
    int32_t window;   /* sliding window: query t sees keys t-window < s <= t; 0: all */
} sj_layer;

typedef struct {
    int type;                   /* SJ_ROPE_*                               */
    float factor;               /* > 1 (linear, dynamic, yarn)             */
    int original_max_seq_len;   /* dynamic, yarn: the pretraining context  */
    float beta_fast, beta_slow; /* yarn: the ramp's bounds in rotations (32, 1) */
    float attention_factor;     /* yarn: cos and sin scale; 0: 0.1 ln(factor) + 1 */
    int truncate;               /* yarn: round the ramp's bounds to whole dims
                                 * (transformers' default, true) */
} sj_rope_scaling;

/* Mixture-of-experts channel mixers (layers whose ffn is SJ_FFN_MOE). Each
 * token goes to top_k of n_experts SwiGLU experts of hidden expert_dim,
 * dropless; n_shared experts (DeepSeek's: one dense SwiGLU of hidden
 * n_shared * expert_dim) see every token. */
enum { SJ_MOE_SOFTMAX = 0,     /* softmax scores, top-k (Mixtral, OLMoE, Qwen2-MoE)      */
       SJ_MOE_SIGMOID,         /* sigmoid scores, top-k on score + bias, weights
                                * normalised (DeepSeek-V3)                             */
       SJ_MOE__COUNT };
typedef struct {
    int n_experts, top_k, expert_dim, n_shared;
    int router;                 /* SJ_MOE_*                                */
    int norm_topk;              /* softmax: the k weights renormalised to sum 1 */
    float aux_loss;             /* switch load-balancing loss coefficient  */
    float z_loss;               /* router z-loss coefficient               */
    float bias_update_rate;     /* sigmoid: aux-loss-free balancing; each backward moves
                                 * the per-expert bias by rate * sign(mean load - load) */
} sj_moe_config;
/* Multi-head latent attention's sizes (DeepSeek-V2/V3; the "mla" mixer). Per
 * head, q = (q_nope, q_pe) of qk_nope_head_dim + qk_rope_head_dim; keys are
 * (k_nope, k_pe) with k_pe one RoPE key shared by all heads; values have
 * v_head_dim. k_nope and v come from a latent of kv_lora_rank values, which
 * with k_pe is all that generation caches. */
typedef struct {
    int q_lora_rank;        /* q through a (q_lora_rank) bottleneck; 0: one q projection */
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;   /* even */
    int v_head_dim;         /* <= qk_nope_head_dim + qk_rope_head_dim */
} sj_mla;
/* The epsilon of the mla latents' norms (q_a_norm, kv_a_norm): DeepSeek's,
 * whatever norm_eps is, as transformers' DeepseekV3 has it. */
#define SJ_MLA_NORM_EPS 1e-6f

/* Mamba-2 mixers' shape (transformers' Mamba2Config: state_size, conv_kernel,
 * expand, head_dim, n_groups, chunk_size). d_inner = expand * dim, split into
 * d_inner / head_dim heads; B and C shared by n_groups groups of heads. */
typedef struct {
    int d_state;      /* N: state per head and channel (128)     */
    int d_conv;       /* causal depthwise conv kernel (4)        */
    int expand;       /* d_inner = expand * dim (2)              */
    int head_dim;     /* P (64)                                  */
    int n_groups;     /* G (1)                                   */
    int chunk_size;   /* tokens per chunk of the training scan (64) */
} sj_ssm_config;

/* Linear attention layers: q, k, v of n_heads heads of dim / n_heads, the
 * scan with q = phi(q), k = phi(k), scale head_dim^-1/2. */
typedef struct {
    int feature;      /* SJ_LINEAR_*: phi = identity, or elu + 1                    */
    int normalize;    /* divide by scale q_t . sum_s decay k_s + norm_eps           */
    int decay;        /* SJ_LINEAR_DECAY_*: none, or gated: a_t = log sigmoid(g_t),
                       * g = x wg^T per head (wg: (n_heads, dim))                  */
    int chunk_size;   /* tokens per chunk of the training scan (64)                */
} sj_linear_config;

typedef struct {
    int dim;          /* model width C                                   */
    int n_layers;
    int n_heads;
    int n_kv_heads;   /* divides n_heads (GQA); == n_heads for MHA       */
    int ffn_dim;      /* SwiGLU hidden F                                 */
    int vocab_size;
    int max_seq_len;
    float rope_theta;
    float norm_eps;
    sj_rope_scaling rope_scaling;
    int untied_head;  /* a separate lm_head (V, C); 0: the head is tok_emb */
    int paired_heads; /* seed 001: q, k and v of adjacent heads averaged, attention at
                       * H/2 heads and KV/2 kv heads; wo reads (H/2)*hd */
    float value_mix;  /* seed 001: each layer's v = (1-a) v + a v of layer 0   */
    float embed_skip; /* seed 001: each layer after the first adds a * embedding to its input */
    sj_moe_config moe;   /* the SJ_FFN_MOE layers'                       */
    sj_mla mla;       /* the mla layers' sizes (read only where a layer's mixer is mla) */
    sj_ssm_config ssm;                /* Mamba-2 layers' shape (zeros where none) */
    sj_linear_config linear;          /* linear attention layers' options (zeros where none) */
    sj_layer layers[SJ_MAX_LAYERS];   /* [0, n_layers) */
} sj_config;

/* Names of the option values, as configs and checkpoints spell them
 * ("attention", "mla", "mamba2", "linear"; "swiglu", "relu2", "moe", "none"; "softmax",
 * "sigmoid"; "identity", "elu1"; "none", "gated"; "none", "weighted", "plain"; "default",
 * "linear", "dynamic", "yarn"); NULL out of range. */
const char *sj_mixer_name(int kind);
const char *sj_ffn_name(int kind);
const char *sj_qk_norm_name(int kind);
const char *sj_moe_router_name(int kind);
const char *sj_rope_type_name(int type);
const char *sj_linear_feature_name(int kind);   /* "identity", "elu1" */
const char *sj_linear_decay_name(int kind);     /* "none", "gated" */
/* The value of a name, or -1 (the caller names the field in its error). */
int sj_option_value(const char *(*name_of)(int), const char *name);

/* Fill *out with a named preset (tiny, small, medium, large, xl, max,
 * huge, 8b) at the given vocabulary size. */
sj_status sj_config_preset(const char *name, int vocab_size, sj_config *out);
/* Number of presets and the i-th name, for listings. */
int sj_preset_count(void);
const char *sj_preset_name(int i);
/* SwiGLU hidden size for a width and multiplier: ceil(trunc(mult*dim)/256)*256. */
int sj_ffn_dim_for(int dim, double mult);
/* Check every field; the message names the field and the constraint. */
sj_status sj_config_validate(const sj_config *c);
/* Exact number of parameters (tied head counted once). */
int64_t sj_config_param_count(const sj_config *c);
/* Those one token's forward reads: MoE layers count top_k routed experts
 * (and the shared ones, the router and its bias), not all of them. */
int64_t sj_config_active_param_count(const sj_config *c);

/* ---- model ------------------------------------------------------------ */

typedef struct sj_model sj_model;

/* Parameters live in one flat f32 buffer; each named tensor is a view. */
typedef struct {
    const char *name;     /* "tok_emb", "layers.3.wq", "final_norm" ...   */
    int ndim;
    int64_t shape[2];
    int64_t offset;       /* in elements, into the flat buffer            */
    int64_t numel;
    int decay;            /* 1 if weight decay applies by default (matrices) */
} sj_tensor_info;

sj_status sj_model_create(const sj_config *c, uint64_t seed, sj_model **out);
void sj_model_free(sj_model *m);

/* ---- devices ------------------------------------------------------------ */

typedef enum {
    SJ_DEVICE_CPU = 0,
    SJ_DEVICE_CUDA = 1,
    SJ_DEVICE_CPU_STAGED = 99,   /* testing: CPU kernels through the device code path */
} sj_device;

/* What the machine can give new allocations on a device, in bytes: on the
 * host, MemAvailable from /proc/meminfo, or less where this process's
 * memory cgroup (v2 or v1) leaves less; on CUDA, cudaMemGetInfo's free
 * memory. SMEDJAN_MEM_AVAILABLE (bytes) stands in for either (tests).
 * -1 when unknown (nothing is checked then). *total (may be NULL): the
 * whole (MemTotal, the cgroup limit, the GPU's memory); *source (may be
 * NULL): where the figure came from. */
int64_t sj_mem_available(sj_device dev, int64_t *total, const char **source);

/* The figures behind the last failure when it was a memory check's
 * SJ_ERR_NOMEM (bytes; -1 where not known); NULL after any other failure. */
typedef struct {
    int64_t requested;   /* what the refused allocation asked for */
    int64_t available;   /* what the device had available (-1: the limit refused it) */
    int64_t held;        /* what the model held at the time */
    int64_t limit;       /* the memory_limit lever (0: none) */
    sj_device device;
} sj_oom_info;
const sj_oom_info *sj_last_oom(void);

/* A model on a device with a compute dtype: SJ_F32 (CPU or CUDA; on CUDA
 * with TF32 off, for parity) or SJ_BF16 (CUDA: bf16 activations and compute
 * copy of the weights, f32 master weights, optimizer state and accumulation)
 * or SJ_F16 (CUDA: the same with fp16, every cast to fp16 clamped to the
 * finite range +-65504; no loss scaling).
 * Parameters are initialised on the host (the same values for every device)
 * and uploaded. sj_model_create(c, seed, out) == (c, seed, CPU, F32, out). */
sj_status sj_model_create_ex(const sj_config *c, uint64_t seed, sj_device device,
                             sj_dtype dtype, sj_model **out);
/* Move the model (parameters, gradients; an optimizer's state follows at
 * its next step) to another device/dtype. Plans are dropped. */
sj_status sj_model_to(sj_model *m, sj_device device, sj_dtype dtype);
sj_device sj_model_device(const sj_model *m);
sj_dtype sj_model_dtype(const sj_model *m);
/* After writing parameters from outside (host copies, DLPack views), refresh
 * the compute copy of the weights (a no-op for f32). */
sj_status sj_model_params_updated(sj_model *m);
/* Capture whole train steps as CUDA graphs (default on; SMEDJAN_GRAPHS=0). */
void sj_model_set_graphs(sj_model *m, int on);

/* Forward on a device model, logits left in device memory: *logits points
 * at (B, T, vocab) of *dtype (the compute dtype) inside the model's arena,
 * valid until the model's next call. For zero-copy consumers (DLPack). */
sj_status sj_model_forward_device(sj_model *m, const void *tokens, sj_dtype tok_dtype,
                                  int B, int T, void **logits, sj_dtype *dtype);

/* 1 when the CUDA backend was compiled in. */
int sj_cuda_compiled(void);
/* Number of usable CUDA GPUs (0 when none or not compiled in). */
int sj_cuda_device_count(void);
/* Name of GPU i ("" when none). */
const char *sj_cuda_device_name(int i);
/* Synchronous copy between host and CUDA device memory (to_host: device ->
 * host); the engine's streams are idle between engine calls. */
sj_status sj_cuda_memcpy(void *dst, const void *src, size_t bytes, int to_host);
const sj_config *sj_model_config(const sj_model *m);
int sj_model_n_tensors(const sj_model *m);
const sj_tensor_info *sj_model_tensor(const sj_model *m, int i);
/* The flat parameter and gradient buffers (f32, n elements each), in the
 * model's device memory (host memory on the CPU). Gradients exist only once
 * needed: a backward, an optimizer step, sj_model_grads or
 * sj_model_need_grads brings them into being, zeroed (sj_model_grads returns
 * NULL, error recorded, when that fails). zero_grad without them does nothing. */
float *sj_model_params(sj_model *m, int64_t *n);
float *sj_model_grads(sj_model *m, int64_t *n);
sj_status sj_model_need_grads(sj_model *m);
void sj_model_zero_grad(sj_model *m);
/* Bytes of engine memory now held, and the most ever held, by this model
 * (parameters, gradients, optimizer state, activation arenas). */
int64_t sj_model_bytes(const sj_model *m);
int64_t sj_model_peak_bytes(const sj_model *m);
/* *finite = 1 when every value of parameter tensor i (-1: all of them) is
 * finite; computed where the parameters live. */
sj_status sj_model_params_finite(sj_model *m, int i, int *finite);

/* tokens: (B, T) of SJ_I32 or SJ_U16, read in place.
 * logits: (B, T, vocab) f32, written. */
sj_status sj_model_forward(sj_model *m, const void *tokens, sj_dtype tok_dtype,
                           int B, int T, float *logits);

/* Mean cross-entropy over targets != ignore_index (targets same dtype as
 * tokens; ignore_index only meaningful for SJ_I32, -1 by convention).
 * With backward != 0 the gradients are ADDED into the grad buffer. */
sj_status sj_model_loss(sj_model *m, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T, int ignore_index,
                        int backward, float *loss);

/* The MoE layers' statistics of the last forward pass (training or not), on
 * the host: per layer l, *per_layer = 2 + n_experts floats from l *
 * per_layer: the aux (switch) loss, the router z-loss, then the tokens routed
 * to each expert (zeros for dense layers). NULL for a model without MoE
 * layers. A loss or train step reports the CE loss plus each MoE layer's
 * aux_loss * aux + z_loss * z. */
const float *sj_model_moe_stats(const sj_model *m, int *per_layer);

/* ---- optimisation ----------------------------------------------------- */

/* The update rules, as torch.optim (and lion-pytorch for Lion) define them. */
typedef enum {
    SJ_OPTIM_ADAMW = 0,
    SJ_OPTIM_LION,
    SJ_OPTIM_SGD,
    SJ_OPTIM_ADAFACTOR,
    SJ_OPTIM_MUON,        /* 2-D hidden matrices; AdamW for the embedding, head and norms */
    SJ_OPTIM__COUNT
} sj_optim_kind;

/* How the elementwise state (moments, momenta) is stored; the math is f32
 * either way. Adafactor's statistics (O(rows + cols) a matrix) stay f32. */
typedef enum {
    SJ_STATE_F32 = 0,
    SJ_STATE_BF16,        /* stochastically rounded, seeded: see ops/ostate.h */
    SJ_STATE_Q8,          /* 8-bit dynamic map, blocks of 256 with an f32 absmax */
    SJ_STATE__COUNT
} sj_state_dtype;

typedef struct {
    float max_lr, min_lr;
    int warmup_steps;     /* lr rises linearly min_lr -> max_lr over these */
    int total_steps;      /* cosine back to min_lr at step total_steps-1   */
    double beta1, beta2;  /* AdamW (and Muon's AdamW part), Lion; double, as
                           * torch's 1 - beta is formed before it turns f32 */
    float eps;            /* AdamW; Adafactor: eps1 (>= 0)                 */
    float weight_decay;   /* each tensor's default (sj_param_group)        */
    float clip;           /* global grad-norm clip; 0 disables, < 0 refused */
    sj_optim_kind kind;
    double momentum;      /* SGD (0: no buffer), Muon                      */
    double dampening;     /* SGD                                           */
    int nesterov;         /* SGD, Muon                                     */
    float beta2_decay, eps2, d;   /* Adafactor                             */
    int ns_steps;         /* Muon: Newton-Schulz iterations, coefficients a, b, c, */
    float ns_a, ns_b, ns_c, ns_eps;   /* and the normalisation's floor     */
    int match_rms_adamw;  /* Muon's lr adjustment: 0 "original" sqrt(max(1, rows/cols)),
                           * 1 "match_rms_adamw" 0.2 sqrt(max(rows, cols)) */
    float adamw_lr;       /* Muon: peak lr of its AdamW part (scheduled alike) */
    sj_state_dtype state_dtype;
    uint64_t state_seed;  /* bf16 state: its rounding's seed */
} sj_train_config;

/* A tensor's own settings (torch's param groups): its lr is the schedule's
 * times lr_mult, its decoupled (SGD: L2) weight decay weight_decay. */
typedef struct {
    float lr_mult, weight_decay;
} sj_param_group;

/* Learning rate of the schedule at a 0-based step. */
float sj_lr_at(const sj_train_config *tc, int64_t step);

typedef struct sj_optimizer sj_optimizer;
/* groups: one per model tensor (sj_model_tensor order), or NULL: lr_mult 1
 * and tc->weight_decay where the tensor's decay flag is set, else 0. */
sj_status sj_optimizer_create(sj_model *m, const sj_train_config *tc,
                              const sj_param_group *groups, sj_optimizer **out);
/* Bytes the optimizer's state and scratch take on the model's device,
 * without creating it (memory planning). */
sj_status sj_optimizer_plan_bytes(const sj_model *m, const sj_train_config *tc, int64_t *bytes);
void sj_optimizer_free(sj_optimizer *o);
int64_t sj_optimizer_step_count(const sj_optimizer *o);
/* The state: named flat buffers, in this order where present.
 * AdamW: exp_avg, exp_avg_sq. Lion: exp_avg. SGD (momentum > 0):
 * momentum_buffer. Adafactor: row_var, col_var (the 2-D tensors' factored
 * second moments), variance (the 1-D tensors'). Muon: momentum_buffer (its
 * matrices), exp_avg, exp_avg_sq (the tensors AdamW updates). Each buffer
 * holds its tensors' state packed in tensor order: SJ_F32, or SJ_BF16 bits
 * with bf16 state; with 8-bit state each is two, NAME.q8 (SJ_U8 codes, each
 * tensor's run padded to whole blocks of 256) and NAME.scale (SJ_F32, a
 * block's absmax). sj_optimizer_state returns buffer `which` where the
 * state lives (device memory on CUDA), its dtype and element count; NULL
 * with the error set when out of range or when following a moved model
 * failed. */
int sj_optimizer_n_states(const sj_optimizer *o);
const char *sj_optimizer_state_name(const sj_optimizer *o, int which);
void *sj_optimizer_state(sj_optimizer *o, int which, sj_dtype *dtype, int64_t *n);
void sj_optimizer_set_step(sj_optimizer *o, int64_t step);
/* Clip, then the update with the scheduled lr; zeroes the grads afterwards.
 * Reports the unclipped global norm and the lr used. */
sj_status sj_optimizer_step(sj_optimizer *o, float *grad_norm, float *lr);

/* One training step: forward, backward, clip, update. A non-finite global
 * gradient norm skips the update: weights, moments and step count stay as
 * they were and the gradients are dropped. A batch whose every target is
 * ignored is skipped too, before any work: *loss = 0, *grad_norm = 0. */
sj_status sj_train_step(sj_optimizer *o, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T,
                        float *loss, float *grad_norm, float *lr);

/* What the updates did: the last step's outcome and the running counts. */
typedef struct {
    int64_t tokens;         /* targets counted in the last sj_train_step's loss
                             * (-1 after sj_optimizer_step: not known) */
    int skipped;            /* the last step made no update */
    int64_t skipped_steps;  /* steps that made no update, in all */
    int64_t skip_run;       /* consecutive updates skipped for a non-finite
                             * gradient norm, up to the last step (0 after an
                             * update; batches with no targets leave it be) */
} sj_skip_state;
void sj_optimizer_skip_state(const sj_optimizer *o, sj_skip_state *out);
/* Restore the running counts (a resumed run). */
sj_status sj_optimizer_set_skips(sj_optimizer *o, int64_t skipped_steps, int64_t skip_run);

/* ---- testing hooks ---- */

/* Finite-difference check of one op's backward (embedding, rmsnorm, matmul,
 * rope, rope_yarn, attention, swiglu, add, axpy, pair_heads, mix, cross_entropy, moe,
 * moe_sigmoid (route, permute, expert GEMMs, un-permute), mla_pack, head_slice, the
 * fused projections; "swiglu_relu2" and "matmul_swiglu_relu2" for relu2;
 * "mix_shared_y": one y read by two mixes) on random inputs; with
 * accumulate, gradients must add onto existing values. *max_err is the
 * largest relative error over the op's inputs; detail names each. */
sj_status sj_op_gradcheck(const char *op, uint64_t seed, int accumulate, double *max_err,
                          char *detail, size_t detail_len);
/* ---- tokenizer ---- */

/* Byte-level BPE with GPT-2's pre-tokenisation. A token is a byte string;
 * every one of the 256 single bytes is a token, so any input encodes.
 * Special tokens (e.g. "<|endoftext|>") are never split or merged. */
typedef struct sj_tokenizer sj_tokenizer;

/* What encode does with the text of one special token. */
typedef enum {
    SJ_SPECIAL_AS_TEXT = 0,  /* encode it as ordinary text                 */
    SJ_SPECIAL_ALLOW = 1,    /* emit the special token's id                */
    SJ_SPECIAL_REFUSE = 2,   /* fail with SJ_ERR_ARG naming token and offset */
} sj_special_mode;

/* Build from a vocabulary and a merge list. Token i's bytes are
 * data[offsets[i] .. offsets[i+1]); is_special may be NULL (none special).
 * merges: (n_merges, 2) ids (left, right) in rank order; each result is the
 * token whose bytes are the concatenation. No two tokens, special or not, may
 * have the same bytes (SJ_ERR_ARG names both ids). */
sj_status sj_tokenizer_create(int n_vocab, const uint8_t *data, const int64_t *offsets,
                              const uint8_t *is_special, int n_merges,
                              const int32_t *merges, sj_tokenizer **out);
void sj_tokenizer_free(sj_tokenizer *t);
int sj_tokenizer_vocab_size(const sj_tokenizer *t);
int sj_tokenizer_n_merges(const sj_tokenizer *t);
/* Bytes of token id (NULL if out of range); *is_special may be NULL. */
const uint8_t *sj_tokenizer_token(const sj_tokenizer *t, int id, size_t *len, int *is_special);
/* merge of a rank: out[0] left, out[1] right, out[2] result id. */
sj_status sj_tokenizer_merge(const sj_tokenizer *t, int rank, int32_t out[3]);
/* The id of a byte string (tokens are distinct), or -1. */
int32_t sj_tokenizer_lookup(const sj_tokenizer *t, const uint8_t *bytes, size_t len);
/* Special tokens in id order: how many, and the id of the i-th. The
 * special_modes arrays below have one sj_special_mode per special token in
 * this order; NULL means all SJ_SPECIAL_AS_TEXT. */
int sj_tokenizer_n_special(const sj_tokenizer *t);
int32_t sj_tokenizer_special_id(const sj_tokenizer *t, int i);

/* ids: capacity >= len (a token is never empty). Thread-safe. */
sj_status sj_tokenizer_encode(sj_tokenizer *t, const uint8_t *text, size_t len,
                              const uint8_t *special_modes, int32_t *ids, size_t *n_ids);
/* n texts on the thread pool. ids: capacity >= sum(lens); text i's ids are
 * written to ids[offsets[i] .. offsets[i+1]), offsets: (n+1). */
sj_status sj_tokenizer_encode_batch(sj_tokenizer *t, int64_t n, const uint8_t *const *texts,
                                    const size_t *lens, const uint8_t *special_modes,
                                    int32_t *ids, int64_t *offsets);
/* Decoding is two calls: the byte length (validating ids), then the bytes. */
sj_status sj_tokenizer_decoded_len(const sj_tokenizer *t, const int32_t *ids, size_t n,
                                   size_t *len);
void sj_tokenizer_decode(const sj_tokenizer *t, const int32_t *ids, size_t n, uint8_t *out);

/* Our own file format: magic, version, sizes, CRC32 (see docs/tokenizer.md).
 * Saving writes a temp file and renames it over path. */
sj_status sj_tokenizer_save(const sj_tokenizer *t, const char *path);
sj_status sj_tokenizer_load(const char *path, sj_tokenizer **out);

/* Training: feed text (any number of calls), begin, step until done, finish.
 * Deterministic: the most frequent pair wins; ties go to the smallest
 * (left id, right id), where ids are ordered as in GPT-2's and HF's
 * byte-level vocabularies (see docs/tokenizer.md). */
typedef struct sj_bpe_trainer sj_bpe_trainer;
/* Special tokens: distinct, 2..1024 bytes each (every single byte is already
 * an ordinary token). */
sj_status sj_bpe_trainer_create(int n_special, const uint8_t *const *special,
                                const size_t *special_lens, sj_bpe_trainer **out);
void sj_bpe_trainer_free(sj_bpe_trainer *tr);
/* Each text is a document: pre-tokens never span two; special tokens in it
 * are cut out and not learned from. Pre-tokens are counted on the pool. */
sj_status sj_bpe_trainer_feed(sj_bpe_trainer *tr, int64_t n, const uint8_t *const *texts,
                              const size_t *lens);
int64_t sj_bpe_trainer_n_words(const sj_bpe_trainer *tr);
/* The last p in 1..n-1 where a document may be cut so that s[0..p) and the
 * rest count exactly as the whole would, whatever follows s[0..n); 0 if
 * none. feed cuts big documents by the same rule. */
size_t sj_bpe_trainer_last_cut(const sj_bpe_trainer *tr, const uint8_t *s, size_t n);
/* vocab_size counts the 256 bytes, the merges' new tokens and the specials.
 * *n_todo: how many merges at most remain. */
sj_status sj_bpe_trainer_begin(sj_bpe_trainer *tr, int vocab_size, int64_t min_frequency,
                               int *n_todo);
/* Up to max_merges merges; *n_done < max_merges means training has ended. */
sj_status sj_bpe_trainer_step(sj_bpe_trainer *tr, int max_merges, int *n_done);
sj_status sj_bpe_trainer_finish(sj_bpe_trainer *tr, sj_tokenizer **out);
/* ---- io ---------------------------------------------------------------- */

/* safetensors files: an 8-byte little-endian header length N, N bytes of
 * JSON ({"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {}}),
 * then the tensor data, contiguous and without holes. Ours add one
 * metadata entry "crc32:<name>" (8 hex digits, zlib's CRC-32) per tensor
 * and "crc32:__header__" over the metadata, names, dtypes and shapes
 * (docs/formats.md); readers verify the entries present and accept files
 * without them. */
#define SJ_ST_MAX_DIMS 8

typedef struct {
    const char *name;
    const char *dtype;    /* safetensors name: "F32", "BF16", "F16", "I32", "U16", "U8", "I64" ... */
    int ndim;
    int64_t shape[SJ_ST_MAX_DIMS];
    const void *data;     /* save: the bytes; open: into the mapped file */
    uint64_t nbytes;      /* open: end - begin; save: ignored (from shape) */
    uint64_t offset;      /* open: of the data, from the start of the file */
} sj_st_tensor;

typedef struct { const char *key, *value; } sj_st_meta;

/* Bytes per element of a safetensors dtype name; 0 when unknown. */
size_t sj_st_dtype_size(const char *dtype);

/* Streaming writer: the header is laid out from the tensor list (data
 * pointers unused), then the data is appended in list order in any chunk
 * sizes, then close fills in the CRCs and atomically renames
 * "<path>.tmp.<pid>" over path. On any failure the temp file is removed
 * and an existing file at path is left untouched. A failed write leaves w
 * inert (temp file gone); close and abort always free w. */
typedef struct sj_st_writer sj_st_writer;
sj_status sj_st_writer_open(const char *path, const sj_st_tensor *t, int n,
                            const sj_st_meta *meta, int n_meta, sj_st_writer **out);
sj_status sj_st_writer_write(sj_st_writer *w, const void *data, uint64_t nbytes);
sj_status sj_st_writer_close(sj_st_writer *w);
void sj_st_writer_abort(sj_st_writer *w);
/* The same in one call, every tensor's data given. */
sj_status sj_safetensors_save(const char *path, const sj_st_tensor *t, int n,
                              const sj_st_meta *meta, int n_meta);

/* Reader: maps the file copy-on-write (writes to the mapping never reach
 * the file), parses and checks the header against the file length, and
 * with verify_crc checks every crc32:<name> entry. */
typedef struct sj_st_file sj_st_file;
sj_status sj_safetensors_open(const char *path, int verify_crc, sj_st_file **out);
void sj_safetensors_close(sj_st_file *f);
int sj_safetensors_n_tensors(const sj_st_file *f);
const sj_st_tensor *sj_safetensors_tensor(const sj_st_file *f, int i);   /* header order */
int sj_safetensors_n_meta(const sj_st_file *f);
const sj_st_meta *sj_safetensors_meta(const sj_st_file *f, int i);
const char *sj_safetensors_meta_get(const sj_st_file *f, const char *key); /* NULL if absent */
/* The whole mapped file (writable, private). */
void *sj_safetensors_bytes(sj_st_file *f, uint64_t *size);

/* Token files (smedjan prepare): a 32-byte header — "SMJTOKEN", u32 version
 * (1), u32 token width in bytes (2 or 4), u64 token count, u64 reserved (0),
 * all little-endian — then the tokens, little-endian. */
#define SJ_TOKENS_HEADER_BYTES 32
typedef struct { uint32_t version, width; int64_t count; } sj_tokens_info;

/* Streaming, atomic like the safetensors writer: tokens are n values of
 * `width` bytes each in host order; close writes the count and renames.
 * A failed append leaves w inert; close and abort always free w. */
typedef struct sj_tokens_writer sj_tokens_writer;
sj_status sj_tokens_writer_open(const char *path, int width, sj_tokens_writer **out);
sj_status sj_tokens_writer_append(sj_tokens_writer *w, const void *tokens, int64_t n);
sj_status sj_tokens_writer_close(sj_tokens_writer *w, int64_t *count);
void sj_tokens_writer_abort(sj_tokens_writer *w);
/* Validate a token file's header against its length; fills *out. */
sj_status sj_tokens_inspect(const char *path, sj_tokens_info *out);
/* A token file open for reading: the header is checked once, then tokens
 * are read with pread() into the caller's memory. A file cut short by
 * another process after open makes a read fail with SJ_ERR_IO ("data.tok:
 * file shrank from N to M bytes while open ...") instead of a SIGBUS, which
 * reading through a mapping would raise. Reads may run on several threads. */
typedef struct sj_tokens_reader sj_tokens_reader;
sj_status sj_tokens_open(const char *path, sj_tokens_reader **out);
void sj_tokens_close(sj_tokens_reader *r);
const sj_tokens_info *sj_tokens_reader_info(const sj_tokens_reader *r);
int sj_tokens_reader_fd(const sj_tokens_reader *r);   /* stays owned by r */
/* n tokens from token `first`, at the file's width, in host order. */
sj_status sj_tokens_read(sj_tokens_reader *r, int64_t first, int64_t n, void *out);
/* n windows as int32: x[i] (len) = tokens[starts[i] .. +len); y, when not
 * NULL, gets the same windows shifted by one token (next-token targets).
 * x, y: (n, len). Every window is range-checked before anything is read. */
sj_status sj_tokens_read_windows(sj_tokens_reader *r, const int64_t *starts, int64_t n, int64_t len,
                                 int32_t *x, int32_t *y);

/* bin2d sample files (docs/formats.md): one row per sample, padded with
 * pad_id to `stride` tokens, and with `labels` a label index of (begin, end)
 * spans per row. Streaming and atomic like the token writer: rows go to a
 * temporary file, close writes lengths and index, patches the header and
 * renames. A row holds 2 <= n <= stride tokens; is_label (n bytes, nonzero =
 * the token is a training target; required with labels, ignored without)
 * becomes the row's maximal runs, position 0 excluded (nothing predicts it).
 * A refused row writes nothing; after a failed write w is inert. Close and
 * abort always free w. */
typedef struct sj_samples_writer sj_samples_writer;
sj_status sj_samples_writer_open(const char *path, uint32_t stride, uint32_t pad_id, int labels,
                                 sj_samples_writer **out);
sj_status sj_samples_writer_append(sj_samples_writer *w, const uint32_t *tokens, uint32_t n,
                                   const uint8_t *is_label);
sj_status sj_samples_writer_close(sj_samples_writer *w, int64_t *rows);
void sj_samples_writer_abort(sj_samples_writer *w);

/* bin2d sample files (docs/formats.md "bin2d"): a 64-byte header —
 * "SMJBIN2D", u32 version (1), u32 stride, u64 n_rows, u64 n_spans, u32
 * flags (bit 0: a label index follows), u32 pad_id, 24 reserved zero bytes —
 * then tokens u32[n_rows][stride], lengths u32[n_rows] and, with a label
 * index, span_start u64[n_rows + 1] and spans (u32 begin, u32 end)[n_spans],
 * all little-endian. Row r's labels are the positions inside its spans
 * (every position 1..L-1 without a label index). */
#define SJ_SAMPLES_MAGIC "SMJBIN2D"
#define SJ_SAMPLES_HEADER_BYTES 64
enum { SJ_SAMPLES_LABEL_INDEX = 1 };
typedef struct {
    uint32_t version, stride, flags, pad_id;
    int64_t n_rows, n_spans;
} sj_samples_info;
typedef enum {
    SJ_SAMPLES_MMAP = 0,     /* tokens read with pread() per batch; ids checked per batch */
    SJ_SAMPLES_MEMORY = 1,   /* the tokens read into memory at open; ids checked there, once */
} sj_samples_load;
/* An open bin2d file. Open validates every header field against the file
 * length, then every length, the span index and every span (errors name the
 * file and the field or row); lengths and the label index stay in memory
 * (12 bytes a row + 8 a span) in both modes. vocab_size > 0: token ids and
 * pad_id must be below it. In MMAP mode a file cut short after open makes a
 * batch fail with SJ_ERR_IO naming the file, never a SIGBUS. Batches may be
 * assembled on several threads at once. */
typedef struct sj_samples sj_samples;
sj_status sj_samples_open(const char *path, sj_samples_load load, int64_t vocab_size,
                          sj_samples **out);
void sj_samples_close(sj_samples *f);
const sj_samples_info *sj_samples_file_info(const sj_samples *f);
/* The validated index: lengths (n_rows); span_start (n_rows + 1) and spans
 * (2 * n_spans: begin, end), NULL without a label index. Owned by f. */
const uint32_t *sj_samples_lengths(const sj_samples *f);
const uint64_t *sj_samples_span_start(const sj_samples *f);
const uint32_t *sj_samples_spans(const sj_samples *f);
/* One batch of training pairs. rows: (B) row ids, -1 for a padding row.
 * x, y: (B, T). Row r (length L, cut to n = min(L, T + 1) tokens) gives
 * x[t] = tok[t] for t < n - 1, y[t] = tok[t + 1] where position t + 1 is a
 * label, else -1; positions from n - 1 on hold x = pad_id, y = -1; a
 * padding row is all pad_id / -1. *labels (may be NULL): targets that are
 * not -1. */
sj_status sj_samples_batch(sj_samples *f, const int64_t *rows, int B, int T, int32_t *x, int32_t *y,
                           int64_t *labels);

/* Batches over a sample file in a deterministic schedule, a pure function of
 * (config, epoch): the epoch's rows (`rows`, in file order) go through a
 * streaming shuffle buffer of shuffle_buffer rows (fill it, emit a uniformly
 * random slot, refill it from the stream; seeded from (seed, epoch); 0: file
 * order), then each row joins the smallest bucket >= its length - 1 (rows
 * longer than the largest are cut to it); a full bucket emits a batch of
 * (batch_size, bucket); at the epoch's end the partial buckets, smallest
 * first, emit batches filled up with padding rows. No bucket sizes: one
 * bucket of seq_len. With prefetch_batches N > 0 a thread assembles the next
 * N batches into a ring of buffers; the batches are the same either way. */
typedef struct {
    int batch_size;
    int seq_len;                 /* T without bucket sizes */
    const int *bucket_sizes;     /* ascending, >= 1; NULL: none */
    int n_buckets;
    int64_t shuffle_buffer;      /* rows; 0: file order */
    uint64_t seed;
    int prefetch_batches;        /* 0: batches assembled on the caller's thread */
    const int64_t *rows;         /* the rows an epoch visits, in file order */
    int64_t n_rows;
} sj_sample_loader_config;
typedef struct sj_sample_loader sj_sample_loader;
/* f must outlive the loader; config arrays are copied. */
sj_status sj_sample_loader_open(sj_samples *f, const sj_sample_loader_config *c,
                                sj_sample_loader **out);
/* Stops and joins the prefetch thread, frees everything. */
void sj_sample_loader_close(sj_sample_loader *l);
/* Batches in an epoch (the same for every epoch). */
int64_t sj_sample_loader_epoch_batches(const sj_sample_loader *l);
/* Continue from batch `batch` (0..epoch_batches) of epoch `epoch`: the
 * schedule is recomputed, no token is read for the batches skipped. */
sj_status sj_sample_loader_seek(sj_sample_loader *l, int64_t epoch, int64_t batch);
/* T of the batch next() hands out (with prefetch: waits until it is made;
 * an error the thread met surfaces here or in next(), with its message). */
sj_status sj_sample_loader_peek(sj_sample_loader *l, int *T);
/* The next batch into x, y (batch_size, T), T as peek() gave it; labels:
 * targets that are not -1; epoch and index: where it is in the schedule. */
sj_status sj_sample_loader_next(sj_sample_loader *l, int T, int32_t *x, int32_t *y, int64_t *labels,
                                int64_t *epoch, int64_t *index);

/* ---- inference ---- */

/* GGUF files (v2 and v3). Tensor types the engine reads: */
typedef enum {
    SJ_GGUF_F32 = 0, SJ_GGUF_F16 = 1, SJ_GGUF_Q4_0 = 2, SJ_GGUF_Q4_1 = 3,
    SJ_GGUF_Q8_0 = 8, SJ_GGUF_BF16 = 30,
} sj_gguf_type;
/* Metadata value types. */
typedef enum {
    SJ_GGUF_UINT8 = 0, SJ_GGUF_INT8, SJ_GGUF_UINT16, SJ_GGUF_INT16, SJ_GGUF_UINT32,
    SJ_GGUF_INT32, SJ_GGUF_FLOAT32, SJ_GGUF_BOOL, SJ_GGUF_STRING, SJ_GGUF_ARRAY,
    SJ_GGUF_UINT64, SJ_GGUF_INT64, SJ_GGUF_FLOAT64,
} sj_gguf_vtype;

typedef struct {
    const char *key;
    int type;                    /* sj_gguf_vtype                                   */
    int arr_type;                /* ARRAY: element type                             */
    uint64_t n;                  /* ARRAY: elements; STRING: bytes; scalar: 1       */
    const void *data;            /* scalar / numeric array / string bytes (LE, unaligned) */
    const char *const *strs;     /* ARRAY of STRING: element j is strs[j] ...       */
    const uint64_t *str_lens;    /* ... of str_lens[j] bytes (not NUL-terminated)   */
} sj_gguf_kv;

typedef struct {
    const char *name;
    int ndim;
    int64_t shape[4];            /* GGUF order: shape[0] is the row length (fastest) */
    int type;                    /* sj_gguf_type                                     */
    uint64_t offset;             /* from the start of the data section               */
    uint64_t nbytes;
    int64_t numel;
    const void *data;            /* open: into the read-only mapping; save: the bytes */
} sj_gguf_tensor;

typedef struct sj_gguf_file sj_gguf_file;
/* Map and validate a GGUF file: every count, string, type, dimension and
 * data range is checked against the file before use. */
sj_status sj_gguf_open(const char *path, sj_gguf_file **out);
void sj_gguf_close(sj_gguf_file *f);
int sj_gguf_version(const sj_gguf_file *f);
const char *sj_gguf_path(const sj_gguf_file *f);
int sj_gguf_n_kv(const sj_gguf_file *f);
const sj_gguf_kv *sj_gguf_kv_at(const sj_gguf_file *f, int i);
const sj_gguf_kv *sj_gguf_find_kv(const sj_gguf_file *f, const char *key);   /* NULL if absent */
int sj_gguf_n_tensors(const sj_gguf_file *f);
const sj_gguf_tensor *sj_gguf_tensor_at(const sj_gguf_file *f, int i);
const sj_gguf_tensor *sj_gguf_find_tensor(const sj_gguf_file *f, const char *name);
/* Typed scalar reads; a missing key or a wrong type is SJ_ERR_FORMAT. */
sj_status sj_gguf_get_int(const sj_gguf_file *f, const char *key, int64_t *out);
sj_status sj_gguf_get_float(const sj_gguf_file *f, const char *key, double *out);
/* Bytes of one metadata value of a scalar type; 0 for string, array, unknown. */
uint64_t sj_gguf_value_size(int type);
/* Elements and bytes per block of a tensor type; 0 when unsupported. */
int sj_gguf_type_block(int type, int *block_elems, int *block_bytes);
const char *sj_gguf_type_name(int type);
/* Write a GGUF v3 file (32-byte alignment) atomically: temp file + rename. */
sj_status sj_gguf_save(const char *path, const sj_gguf_kv *kv, int n_kv,
                       const sj_gguf_tensor *t, int n_t);
/* GGML-compatible block (de)quantisation of n values (n % 32 == 0 for the
 * block types): F32, F16, BF16, Q8_0, Q4_0 (write), and Q4_1 (read). */
sj_status sj_gguf_quantize(int type, const float *x, int64_t n, void *out);
sj_status sj_gguf_dequantize(int type, const void *in, int64_t n, float *out);

/* ---- tensor names (csrc/io/names.c) ------------------------------------ */

/* Each tensor kind once, in three spellings: ours, Hugging Face Llama's and
 * GGUF's (llama.cpp's). A per-layer row spells what follows the layer
 * prefix ("layers.{i}.", "model.layers.{i}.", "blk.{i}."); a global row the
 * whole name. */
typedef enum { SJ_NAMES_OURS = 0, SJ_NAMES_HF, SJ_NAMES_GGUF } sj_names;
typedef struct {
    const char *name[3];   /* indexed by sj_names */
    int per_layer;
    int rope_rows;         /* GGUF files of architecture llama hold these rows
                            * in interleaved-pair RoPE order: sj_gguf_rope_row */
} sj_tensor_name;
/* The table; returns its length. */
int sj_tensor_names(const sj_tensor_name **rows);
/* The row of a whole name spelled `from`, and its layer (-1: a global);
 * NULL when the table has no such name. */
const sj_tensor_name *sj_tensor_name_find(const char *name, sj_names from, int *layer);
/* A whole name spelled `from` in spelling `to`: SJ_ERR_ARG naming it when
 * the table has no such name. */
sj_status sj_tensor_name_map(const char *name, sj_names from, sj_names to, char *out, size_t cap);
/* A rope_rows tensor in a GGUF file: its row r (of heads x head_dim rows,
 * or of a head_dim vector) is our row sj_gguf_rope_row(r, head_dim).
 * llama.cpp's converter stores each head's rows as (head_dim/2, 2) pairs,
 * ours (Hugging Face's rotate-half) are (2, head_dim/2). */
int sj_gguf_rope_row(int r, int head_dim);

/* The inference engine: a Llama-family model's weights, a KV cache
 * allocated once, prefill (a batched forward over many tokens) and decode
 * (one token), on the CPU or a CUDA GPU behind one handle
 * (docs/inference.md). Separate from the training model; not thread-safe
 * per handle.
 * CPU: weights in f32, bf16, Q8 or Q4 blocks. CUDA (cuda/infer.cu): bf16 or
 * f32 weights (quantised GGUF tensors are dequantised at load), the KV cache
 * in the same dtype; decode one persistent kernel per step (or one kernel
 * per phase, captured as a CUDA graph), greedy choice on the device.
 * Without a CUDA build or a GPU, device CUDA fails with SJ_ERR_RUNTIME
 * saying which. */
typedef enum { SJ_INFER_FP32 = 0, SJ_INFER_BF16, SJ_INFER_Q8, SJ_INFER_Q4 } sj_infer_mode;
typedef struct sj_infer sj_infer;

/* device: SJ_DEVICE_CPU or SJ_DEVICE_CUDA (m itself may be on either);
 * max_ctx <= 0: the model's max_seq_len (capped at 4096). */
sj_status sj_infer_from_model(sj_model *m, sj_device device, sj_infer_mode mode, int max_ctx,
                              sj_infer **out);
sj_status sj_infer_load_gguf(const char *path, sj_device device, sj_infer_mode mode, int max_ctx,
                             sj_infer **out);
void sj_infer_free(sj_infer *h);
sj_device sj_infer_device(const sj_infer *h);
const sj_config *sj_infer_config(const sj_infer *h);
int sj_infer_max_ctx(const sj_infer *h);
int sj_infer_pos(const sj_infer *h);                 /* tokens in the KV cache */
sj_infer_mode sj_infer_get_mode(const sj_infer *h);
int64_t sj_infer_weight_bytes(const sj_infer *h);    /* resident weights (on the device)      */
int64_t sj_infer_cache_bytes(const sj_infer *h);     /* KV cache + run state (on the device)  */
/* Forget the cache (position 0). */
void sj_infer_reset(sj_infer *h);
/* Move the position back to pos (0 <= pos <= the position): the tokens
 * after it are forgotten, their cache rows overwritten by later calls
 * (speculative decoding's rejected drafts). Refused (SJ_ERR_ARG, naming the
 * layer) at any pos for a model whose cache cannot move back: a mamba2 or
 * linear mixer (a recurrent state) or a sliding window shorter than max_ctx
 * (a ring buffer). */
sj_status sj_infer_rewind(sj_infer *h, int pos);
/* Append n > 0 tokens to the cache in one batched forward. logits_all:
 * NULL or (n, vocab) host memory, written with every position's logits. */
sj_status sj_infer_prefill(sj_infer *h, const int32_t *tokens, int n, float *logits_all);
/* One token at the next position; *next (may be NULL): the greedy choice
 * from its logits (smallest id of the maximum), on the device where it runs. */
sj_status sj_infer_decode(sj_infer *h, int32_t token, int32_t *next);
/* n greedy steps, the first consuming token: out[i] = the token chosen by
 * step i (step i+1's input). On a GPU chained on the device (one graph). */
sj_status sj_infer_greedy(sj_infer *h, int32_t token, int n, int32_t *out);
/* The last position's logits (vocab) into host memory. */
sj_status sj_infer_logits(sj_infer *h, float *out);
/* Store the K/V cache as IEEE f16 (f16 = 1, half its memory; entries rounded
 * to nearest even, as llama.cpp's default cache) or f32 (0, the default).
 * Only with an empty cache: it is reallocated. CPU only. */
sj_status sj_infer_set_kv_f16(sj_infer *h, int f16);
int sj_infer_kv_f16(const sj_infer *h);
/* Execution choices, for tests and benchmarks: graphs (capture the step as
 * a CUDA graph) and persistent (one cooperative kernel per step instead of
 * one kernel per phase). Both default on; the results are the same bits.
 * CUDA only. */
sj_status sj_infer_set_options(sj_infer *h, int graphs, int persistent);
sj_status sj_infer_get_options(const sj_infer *h, int *graphs, int *persistent);

/* Sampling from a row of logits. temperature <= 0: greedy (smallest id of
 * the maximum); top_k <= 0 and top_p >= 1 switch those filters off;
 * repetition_penalty (1 = off) divides positive / multiplies negative logits
 * once per DISTINCT token of history (CTRL / Hugging Face). */
typedef struct { float temperature; int top_k; float top_p; float repetition_penalty; } sj_sample_params;
typedef struct sj_sampler sj_sampler;
sj_status sj_sampler_create(int vocab_size, uint64_t seed, sj_sampler **out);
void sj_sampler_free(sj_sampler *s);
int sj_sampler_vocab(const sj_sampler *s);
sj_status sj_sample(sj_sampler *s, const float *logits, const sj_sample_params *p,
                    const int32_t *history, int n_history, int32_t *token);
/* The distribution sj_sample draws from for these logits and params, as
 * probs (vocab): zero outside the top-k / top-p candidates; at temperature
 * <= 0 one-hot on the greedy choice. Draws nothing. */
sj_status sj_sample_probs(sj_sampler *s, const float *logits, const sj_sample_params *p,
                          const int32_t *history, int n_history, float *probs);
/* The next uniform number in [0, 1) of the sampler's RNG (the one sj_sample uses). */
double sj_sampler_uniform(sj_sampler *s);
/* sj_sample on the handle's last logits (copied to the host first on a GPU). */
sj_status sj_infer_sample(sj_infer *h, sj_sampler *s, const sj_sample_params *p,
                          const int32_t *history, int n_history, int32_t *token);
/* The greedy choice of n logits: the smallest id of the maximum. */
int32_t sj_argmax(const float *logits, int n);
/* The name of the SIMD path the quantised kernels use ("avx512vnni", "avx2", "scalar"). */
const char *sj_infer_isa(void);
/* The instruction-set level the CPU kernels run at, chosen once at the first
 * call: the best this CPU runs ("scalar", "avx2", "avx512", "avx512vnni"),
 * capped by the environment variable SMEDJAN_ISA; and the compiled copy of
 * the kernels that runs it ("x86-64", "x86-64-v3", "x86-64-v4"; "native" in
 * a SMEDJAN_NATIVE=1 build, which has one copy). */
const char *sj_cpu_isa(void);
const char *sj_cpu_isa_best(void);
const char *sj_cpu_isa_build(void);

#ifdef __cplusplus
}
#endif
#endif /* SMEDJAN_H */
