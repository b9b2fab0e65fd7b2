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

typedef enum { SJ_F32 = 0, SJ_BF16, SJ_F16, SJ_I32, SJ_U16 } sj_dtype;
size_t sj_dtype_size(sj_dtype t);

/* ---- threads ---------------------------------------------------------- */

/* Worker threads for CPU kernels. Defaults to $SMEDJAN_THREADS, else the
 * number of online CPUs. Setting it rebuilds the pool. */
int sj_threads_get(void);
sj_status sj_threads_set(int n);

/* ---- model configuration ---------------------------------------------- */

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
} sj_config;

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

/* ---- model ------------------------------------------------------------ */

typedef struct sj_model sj_model;

/* Parameters live in one flat f32 buffer; each named tensor is a view. */
typedef struct {
    const char *name;     /* "tok_emb", "layers.3.wq", "final_norm" ...   */
    int ndim;
    int64_t shape[2];
    int64_t offset;       /* in elements, into the flat buffer            */
    int64_t numel;
    int decay;            /* 1 if AdamW weight decay applies              */
} sj_tensor_info;

sj_status sj_model_create(const sj_config *c, uint64_t seed, sj_model **out);
void sj_model_free(sj_model *m);

/* ---- devices ------------------------------------------------------------ */

typedef enum {
    SJ_DEVICE_CPU = 0,
    SJ_DEVICE_CUDA = 1,
    SJ_DEVICE_CPU_STAGED = 99,   /* testing: CPU kernels through the device code path */
} sj_device;

/* A model on a device with a compute dtype: SJ_F32 (CPU or CUDA; on CUDA
 * with TF32 off, for parity) or SJ_BF16 (CUDA: bf16 activations and compute
 * copy of the weights, f32 master weights, optimizer state and accumulation).
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
 * model's device memory (host memory on the CPU). */
float *sj_model_params(sj_model *m, int64_t *n);
float *sj_model_grads(sj_model *m, int64_t *n);
void sj_model_zero_grad(sj_model *m);
/* Bytes of engine memory now held, and the most ever held, by this model
 * (parameters, gradients, optimizer state, activation arenas). */
int64_t sj_model_bytes(const sj_model *m);
int64_t sj_model_peak_bytes(const sj_model *m);

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

/* ---- optimisation ----------------------------------------------------- */

typedef struct {
    float max_lr, min_lr;
    int warmup_steps;     /* lr rises linearly min_lr -> max_lr over these */
    int total_steps;      /* cosine back to min_lr at step total_steps-1   */
    float beta1, beta2, eps;
    float weight_decay;   /* decoupled; not applied to norm gains          */
    float clip;           /* global grad-norm clip; <= 0 disables           */
} sj_train_config;

/* Learning rate of the schedule at a 0-based step. */
float sj_lr_at(const sj_train_config *tc, int64_t step);

typedef struct sj_optimizer sj_optimizer;
sj_status sj_optimizer_create(sj_model *m, const sj_train_config *tc, sj_optimizer **out);
void sj_optimizer_free(sj_optimizer *o);
int64_t sj_optimizer_step_count(const sj_optimizer *o);
/* The two AdamW moment buffers (f32, one per parameter). */
float *sj_optimizer_state(sj_optimizer *o, int which, int64_t *n);
void sj_optimizer_set_step(sj_optimizer *o, int64_t step);
/* Clip, then AdamW with the scheduled lr; zeroes the grads afterwards.
 * Reports the unclipped global norm and the lr used. */
sj_status sj_optimizer_step(sj_optimizer *o, float *grad_norm, float *lr);

/* One training step: forward, backward, clip, AdamW. */
sj_status sj_train_step(sj_optimizer *o, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T,
                        float *loss, float *grad_norm, float *lr);

/* ---- testing hooks ---- */

/* Finite-difference check of one op's backward (embedding, rmsnorm, matmul,
 * rope, attention, swiglu, add, cross_entropy) on random inputs; with
 * accumulate, gradients must add onto existing values. *max_err is the
 * largest relative error over the op's inputs; detail names each. */
sj_status sj_op_gradcheck(const char *op, uint64_t seed, int accumulate, double *max_err,
                          char *detail, size_t detail_len);

#ifdef __cplusplus
}
#endif
#endif /* SMEDJAN_H */
