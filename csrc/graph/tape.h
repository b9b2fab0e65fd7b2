/* tape.h — reverse-mode autograd on a tape. The model's forward records
 * nodes once for a given (batch, seq); the plan then gives every
 * activation, saved statistic and activation-gradient an offset in ONE
 * arena, chosen from their lifetimes, and each step replays the nodes
 * (forward in order, backward in reverse). Nothing is allocated per step.
 * Activations and their gradients are of the backend's act dtype; saved
 * statistics (rstd, lse, losses) are f32. On a device backend the token
 * inputs are staged into the arena too (int32, see backend.h). */
#ifndef SJ_TAPE_H
#define SJ_TAPE_H

#include "../ops/backend.h"

typedef enum {
    SJ_T_ACT,     /* lives in the arena                               */
    SJ_T_PARAM,   /* a view of the flat parameter (and grad) buffer     */
    SJ_T_EXTERN,  /* bound to a caller's buffer for each run (tokens) */
    SJ_T_MASTER,  /* a view of the f32 master weights (read by a cast node) */
} sj_tkind;

typedef struct {
    sj_tkind kind;
    int64_t numel;
    int64_t offset;     /* ACT/staged: bytes into the arena; PARAM, MASTER: elements into
                         * the compute copy, the f32 master */
    int grad;           /* ACT: id of its gradient tensor, or -1 */
    int producer;       /* node that writes it (-1 for PARAM / EXTERN) */
    int no_grad;        /* saved statistics and losses: never differentiated */
    int first, last;    /* lifetime on the schedule, for the plan */
    void *ptr;          /* EXTERN: bound before each run (host backends) */
    sj_dtype dtype;     /* ACT: act dtype or f32 (statistics); EXTERN: tokens' type */
    int staged;         /* EXTERN on a device backend: copied into the arena */
    int alias;          /* ACT sharing the storage of tensor `alias` (in place; always a
                         * root, never itself an alias), or -1 */
} sj_tval;

typedef enum {
    SJ_OP_EMBEDDING, SJ_OP_RMSNORM, SJ_OP_MATMUL, SJ_OP_MATMUL_ADD, SJ_OP_ROPE,
    SJ_OP_ATTENTION, SJ_OP_SWIGLU, SJ_OP_ADD, SJ_OP_CROSS_ENTROPY, SJ_OP_LM_HEAD_CE,
    SJ_OP_CAST, SJ_OP_MATMUL_SWIGLU, SJ_OP_MATMUL_ROPE, SJ_OP_PAIR_HEADS, SJ_OP_MIX,
    SJ_OP_AXPY, SJ_OP_QK_NORM, SJ_OP_GATHER_ROWS, SJ_OP_MOE_ROUTE, SJ_OP_MOE_PERMUTE,
    SJ_OP_MOE_MATMUL, SJ_OP_MOE_UNPERMUTE, SJ_OP_MLA_PACK, SJ_OP_HEAD_SLICE, SJ_OP_SCAN,
    SJ_OP_CONV1D_SILU, SJ_OP_SSD_PREP, SJ_OP_SSD_SKIP, SJ_OP_GATED_RMSNORM, SJ_OP_LINEAR_PREP,
    SJ_OP_LINEAR_NORM, SJ_OP__COUNT
} sj_opcode;

typedef struct {
    sj_opcode op;
    int in[3], out[2];  /* tensor ids, -1 when unused */
    int accum[3];       /* planned: backward adds into in[k]'s gradient (a parameter's
                         * too; else it overwrites it) */
    int dim[12];
    float f;
    int scratch;        /* ACT tensor the op uses as workspace in forward, or -1 */
    const void *aux;    /* the op's host-side table (rope, matmul_rope: an sj_rope),
                         * kept alive by the caller as long as the tape, or NULL */
} sj_node;

/* The backward pass as run: a node's backward, or (gradient checkpointing)
 * a block's forward node re-run into fresh tensors just before the block's
 * backward. Each step's node is nodes[idx] (SJ_STEP_BWD) or xnodes[idx]. */
enum { SJ_STEP_BWD, SJ_STEP_XBWD, SJ_STEP_XFWD, SJ_STEP_FWD, SJ_STEP_CONV };
typedef struct { int kind, idx; } sj_step;
/* fp16 activations: a kept activation is stored as f16 after its last
 * forward use (CONV src -> dst) and widened back into a fresh tensor right
 * before its first backward use. */
typedef struct { int src, dst; } sj_conv;

typedef struct sj_tape {
    sj_node *nodes; int n_nodes, cap_nodes;
    sj_tval *t; int n_t, cap_t;
    int train;              /* record for backward too */
    sj_dtype act_dtype;     /* of activations and their gradients */
    int device;             /* backend memory is not host memory: stage inputs */
    int64_t arena_bytes;    /* planned size */
    void *arena;
    float loss_scale;       /* d(mean loss)/d(row loss), set before backward */
    float *loss_scale_ptr;  /* where backward reads it (backend memory); NULL: &loss_scale */
    float *grads;           /* parameter gradients, for ops that write them in forward */
    /* > 0: the parameter gradients (this many f32, laid out as the caller's
     * flat buffer) live at the arena's start for one run only, as a train
     * step's do: each parameter's first writer overwrites its gradient, and
     * until then those bytes hold activations. 0: they are the caller's
     * buffer, always added into (gradient accumulation). */
    int64_t arena_grads;
    const float *master;    /* f32 master weights, for MASTER tensors (set before a run) */
    /* Gradient checkpointing: node ranges [b, e) of the blocks whose interior
     * activations are not kept from forward to backward but recomputed. */
    int checkpoint;
    int (*blocks)[2]; int n_blocks, cap_blocks;
    sj_node *xnodes; int n_xnodes, cap_xnodes;   /* recompute and remapped backward nodes */
    sj_step *bsched; int n_bsched;               /* the backward pass, in order */
    int f16_act;            /* keep forward->backward activations in f16 (f32 tapes) */
    sj_step *fsched; int n_fsched;               /* forward with conversions; 0: plain */
    sj_conv *convs; int n_convs;
    int64_t budget;         /* the arena may take at most this; < 0: no limit */
    int dry;                /* plan only: lay out, allocate nothing */
    int64_t kept_bytes;     /* planned: activation bytes alive at the end of forward */
    int no_inplace;         /* share no storage in place but the loss's (sj_opinfo):
                             * gradcheck, and the tests' unfused reference */
} sj_tape;

void sj_tape_init(sj_tape *tp, int train, sj_dtype act_dtype, int device);
void sj_tape_free(sj_tape *tp, const sj_backend *be);
/* Returns a tensor id, or -1 on allocation failure (error set). */
int sj_tape_tensor(sj_tape *tp, sj_tkind kind, int64_t numel);
int sj_tape_param(sj_tape *tp, int64_t offset, int64_t numel);
int sj_tape_master(sj_tape *tp, int64_t offset, int64_t numel);
int sj_tape_node(sj_tape *tp, sj_opcode op, const int in[3], const int out[2],
                 const int dim[12], float f);
/* Mark the nodes recorded between begin and end as one checkpointable block. */
sj_status sj_tape_block_begin(sj_tape *tp);
sj_status sj_tape_block_end(sj_tape *tp);
/* Lifetimes, gradient tensors, accumulate flags, arena offsets; then the
 * arena itself from the backend. */
sj_status sj_tape_plan(sj_tape *tp, const sj_backend *be);
/* params: the compute copy of the weights (act dtype). */
static inline void *sj_tape_ptr(const sj_tape *tp, int id, void *params) {
    const sj_tval *v = &tp->t[id];
    if (v->kind == SJ_T_ACT || v->staged) return (char *)tp->arena + v->offset;
    if (v->kind == SJ_T_PARAM) return (char *)params + v->offset * (int64_t)sj_dtype_size(tp->act_dtype);
    if (v->kind == SJ_T_MASTER) return (void *)(tp->master + v->offset);
    return v->ptr;
}
/* Where a run's parameter gradients go: the arena (arena_grads) or own. */
static inline float *sj_tape_grads(const sj_tape *tp, float *own) {
    return tp->arena_grads ? (float *)tp->arena : own;
}
sj_status sj_tape_forward(sj_tape *tp, const sj_backend *be, void *params);
sj_status sj_tape_backward(sj_tape *tp, const sj_backend *be, void *params, float *grads);

/* ---- ops: record a node and return its output tensor (-1 on failure) --- */
int sj_op_embedding(sj_tape *tp, int tokens, int emb, int N, int C);
int sj_op_rmsnorm(sj_tape *tp, int x, int w, int N, int C, float eps);
/* RMSNorm of each q and k head of qkv: (N, (H + 2*KV)*hd) -> same, v heads
 * passed through (backend.h); wq, wk: parameters of hd elements, or both -1
 * for no gain. */
int sj_op_qk_norm(sj_tape *tp, int qkv, int wq, int wk, int N, int H, int KV, int hd,
                  float eps);
int sj_op_matmul(sj_tape *tp, int x, int w, int N, int out_features, int in_features);
/* res + x @ w^T in one GEMM (the residual add fused into the projection). */
int sj_op_matmul_add(sj_tape *tp, int res, int x, int w, int N, int out_features,
                     int in_features);
/* rope: its frequencies (rope->n_pairs == hd/2), read at every run: the
 * caller keeps it alive, unchanged, as long as the tape. */
int sj_op_rope(sj_tape *tp, int x, int B, int T, int n_heads, int n_rot, int hd,
               const sj_rope *rope);
int sj_op_attention(sj_tape *tp, int qkv, int B, int T, int H, int KV, int hd, int window);
/* The gated FFN activation: act(gate) * up, act by SJ_FFN_* (silu: SwiGLU;
 * relu^2). The name is its first kind's. */
int sj_op_swiglu(sj_tape *tp, int gu, int N, int F, int act);
int sj_op_add(sj_tape *tp, int a, int b, int64_t n);
/* x + a * y over n elements (embedding skip). */
int sj_op_axpy(sj_tape *tp, int x, int y, float a, int64_t n);
/* Paired heads: x: (N, n_heads*hd), n_heads even -> (N, n_heads/2*hd), head j
 * the mean of heads 2j and 2j+1. */
int sj_op_pair_heads(sj_tape *tp, int x, int N, int n_heads, int hd);
/* Mix (value mix): x, y: (N, ld) -> x, except columns [c0, c0+w) of each
 * row: (1 - a) x + a y. y may feed many mixes (layer 0's qkv): its
 * gradient then accumulates over them, zero off the slices. */
int sj_op_mix(sj_tape *tp, int x, int y, int N, int ld, int c0, int w, float a);
/* Rows by index (the sparse loss): x: (N, C), idx: (R) int32 EXTERN -> (R, C),
 * row r = x[idx[r]], zeros where idx[r] < 0 (padding); entries >= 0 distinct.
 * x's gradient is dy scattered back, zero on rows no entry names. */
int sj_op_gather_rows(sj_tape *tp, int x, int idx, int N, int R, int C);
/* Mixture of experts (backend.h's sj_moe_route and sj_moe_record), R = N k.
 * Route: logits (N, E), bias (E) parameter or -1 -> weights (N, k); *record
 * gets the routing record's tensor id. route: read at every run, kept alive
 * by the caller as long as the tape. Permute: x (N, C) -> (R, C) rows by
 * expert. Matmul: x (R, K), w (E, n, K) parameter -> (R, n), x W_e^T per
 * expert's rows. Unpermute: yp (R, C), weights (N, k) -> (N, C). */
int sj_op_moe_route(sj_tape *tp, int logits, int bias, int N, int E, int k,
                    const sj_moe_route *route, int *record);
int sj_op_moe_permute(sj_tape *tp, int x, int record, int N, int E, int k, int C);
int sj_op_moe_matmul(sj_tape *tp, int x, int w, int record, int N, int E, int k, int n, int K);
int sj_op_moe_unpermute(sj_tape *tp, int yp, int weights, int record, int N, int E, int k, int C);
int sj_op_cross_entropy(sj_tape *tp, int logits, int targets, int N, int V, int ignore_index);
/* Tied LM head + cross-entropy, `rows` rows at a time: only (rows, ld)
 * logits ever exist. h: (N, C), w: (V, C) -> losses (N). On a training tape
 * the gradients (dh, dw) are made in forward, chunk by chunk. */
int sj_op_lm_head_ce(sj_tape *tp, int h, int w, int targets, int N, int V, int ld, int C,
                     int ignore_index, int rows);
/* A weight in the act dtype, cast from its f32 master right before use
 * (forward-only tapes; autocast's cast): src is a MASTER tensor. */
int sj_op_cast(sj_tape *tp, int src);
/* A projection and the elementwise op that reads it as one node (the
 * backend fuses them where it can, else runs them apart).
 * swiglu(x @ w^T, act): x: (N, C), w: (2F, C) -> (N, F); a training tape keeps
 * the product gu (N, 2F) for backward, a forward-only one never has it
 * whole (the unfused pair goes through `rows` rows of scratch).
 * rope(x @ w^T): x: (B*T, C), w: (n_heads*hd, C) -> (B, T, n_heads*hd); its
 * backward un-rotates dy in place, then runs the projection's. */
int sj_op_matmul_swiglu(sj_tape *tp, int x, int w, int N, int F, int C, int act, int rows);
int sj_op_matmul_rope(sj_tape *tp, int x, int w, int B, int T, int n_heads, int n_rot, int hd,
                      int C, const sj_rope *rope);
/* Multi-head latent attention's heads as attention's qkv (backend.h's
 * mla_pack): q: (B*T, H*(dn+dr)), kv: (B*T, H*(dn+dv)), kpe: (B*T, dr) ->
 * (B, T, 3*H*(dn+dr)), v heads zero-padded; rope: dr/2 pairs (kept alive as
 * for sj_op_rope). */
int sj_op_mla_pack(sj_tape *tp, int q, int kv, int kpe, int B, int T, int H, int dn, int dr,
                   int dv, const sj_rope *rope);
/* x: (N, H*hd_in) -> (N, H*hd_out): each head's first hd_out values. */
int sj_op_head_slice(sj_tape *tp, int x, int N, int H, int hd_in, int hd_out);

/* The chunked scan (backend.h's scan_forward): qk rows hold q and k (shape
 * and layout in d), v rows hold v, a: (B*T, H) log decays or -1 for none
 * -> y: (B*T, H*dv). qk and v may be one tensor. */
int sj_op_scan(sj_tape *tp, int qk, int v, int a, const sj_scan_dims *d, float scale);
/* Mamba-2 (backend.h): x: rows of ld, W channels at off; w: (W, K), bias: (W)
 * -> (B*T, W). */
int sj_op_conv1d_silu(sj_tape *tp, int x, int w, int bias, int B, int T, int ld, int off,
                      int W, int K);
/* xbc: rows of ldx (x at 0), zxbcdt: rows of ld (dt_raw at off), p: [dt_bias |
 * A_log] (2H) -> v: (N, H*P); *a: (N, H). */
int sj_op_ssd_prep(sj_tape *tp, int xbc, int zxbcdt, int p, int N, int H, int P, int ldx,
                   int ld, int off, int *a);
/* y: (N, H*P) + D_h x, x at 0 of rows of ldx; D: (H). */
int sj_op_ssd_skip(sj_tape *tp, int y, int xbc, int D, int N, int H, int P, int ldx);
/* y: (N, Din), z at off of rows of ld, w: (Din) -> rmsnorm per G groups of y silu(z), times w. */
int sj_op_gated_rmsnorm(sj_tape *tp, int y, int z, int w, int N, int Din, int G, int ld, int off,
                        float eps);

/* Linear attention (backend.h): p: (N, 3 H hd [+ H]) -> u: (N, 2 H hd + H dv);
 * a: NULL for no gate, else *a = the log-sigmoid gate (N, H). */
int sj_op_linear_prep(sj_tape *tp, int p, int N, int H, int hd, int feature, int normalize, int *a);
/* y: (N, H, hd + 1) -> (N, H hd), divided by the last channel of each head (+ eps). */
int sj_op_linear_norm(sj_tape *tp, int y, int N, int H, int hd, float eps);

/* How each op's backward uses its tensors (for lifetimes) and runs, and
 * which of its writes may land on storage it reads (in place). The plan
 * shares storage only when the shared tensor is read by nothing after the
 * step and the written one is touched by nothing before it; otherwise the
 * kernels get separate buffers (and a pass-through becomes a copy). */
typedef struct {
    const char *name;
    unsigned bwd_reads_in;   /* bit k: backward reads in[k] */
    unsigned bwd_reads_out;  /* bit k: backward reads out[k] */
    int fwd_grads;           /* on a training tape, forward writes the input gradients */
    unsigned out_on_in;      /* bit k: out[0] may be in[k] (forward kernel works in place) */
    unsigned grad_on_dy;     /* bit k: in[k]'s gradient may be out[0]'s gradient (backward
                              * in place; a gradient that is just dy then costs nothing) */
    unsigned grad_on_in;     /* bit k: in[k]'s gradient may be in[k] itself (device
                              * backends only, as before: the loss overwrites the logits) */
} sj_opinfo;
extern const sj_opinfo sj_ops[SJ_OP__COUNT];
void sj_op_forward(const sj_tape *tp, const sj_node *n, const sj_backend *be, void *params);
void sj_op_backward(const sj_tape *tp, const sj_node *n, const sj_backend *be,
                    void *params, float *grads);

/* A planned tape in numbers (tests, tools): nodes recorded per op, and per
 * op the steps (forward, recompute or backward) that write in place. */
void sj_tape_census(const sj_tape *tp, int nodes[SJ_OP__COUNT], int in_place[SJ_OP__COUNT]);
/* A small tape on which every in-place rule binds, run as planned and with
 * nothing shared: the largest difference of its output and gradients, and
 * the census's in_place of the shared run (gradcheck.c; tests). */
sj_status sj_tape_inplace_check(uint64_t seed, double *max_diff, int in_place[SJ_OP__COUNT]);

#endif
