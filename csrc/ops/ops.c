/* ops.c — each op declared once: what it records on the tape, what its
 * backward needs kept alive, and how forward and backward call the
 * backend. Shapes in the comments; N = B*T rows. Outputs are of the act
 * dtype, except saved statistics and losses (f32). */
#include "../graph/tape.h"

#define NONE (-1)
#define IN(...) ((const int[3]){__VA_ARGS__})
#define OUT(...) ((const int[2]){__VA_ARGS__})
#define DIM(...) ((const int[12]){__VA_ARGS__})

const sj_opinfo sj_ops[SJ_OP__COUNT] = {
    [SJ_OP_EMBEDDING] = {"embedding", 1u << 0, 0},
    [SJ_OP_RMSNORM] = {"rmsnorm", 1u << 0 | 1u << 1, 1u << 1},
    [SJ_OP_MATMUL] = {"matmul", 1u << 0 | 1u << 1, 0},
    /* d(res) = dy: shared, the residual stream's gradient is one buffer */
    [SJ_OP_MATMUL_ADD] = {"matmul_add", 1u << 0 | 1u << 1, 0, .grad_on_dy = 1u << 2},
    /* in place over qkv: only the rotated heads are rewritten */
    [SJ_OP_ROPE] = {"rope", 0, 0, .out_on_in = 1u << 0, .grad_on_dy = 1u << 0},
    [SJ_OP_ATTENTION] = {"attention", 1u << 0, 1u << 0 | 1u << 1},
    [SJ_OP_SWIGLU] = {"swiglu", 1u << 0, 0},
    [SJ_OP_ADD] = {"add", 0, 0, .grad_on_dy = 1u << 0 | 1u << 1},
    [SJ_OP_CROSS_ENTROPY] = {"cross_entropy", 1u << 0 | 1u << 1, 1u << 1, .grad_on_in = 1u << 0},
    [SJ_OP_LM_HEAD_CE] = {"lm_head_ce", 0, 0, 1},   /* gradients made in forward */
    [SJ_OP_CAST] = {"cast", 0, 0},                  /* forward-only tapes: no backward */
    /* backward reads gu (out[1], training tapes only) */
    [SJ_OP_MATMUL_SWIGLU] = {"matmul_swiglu", 1u << 0 | 1u << 1, 1u << 1},
    [SJ_OP_MATMUL_ROPE] = {"matmul_rope", 1u << 0 | 1u << 1, 0},
    [SJ_OP_PAIR_HEADS] = {"pair_heads", 0, 0},
    /* in place over x: only the slice is rewritten, forward and backward */
    [SJ_OP_MIX] = {"mix", 0, 0, .out_on_in = 1u << 0, .grad_on_dy = 1u << 0},
    /* dx = dy: shared; dy_in = a dy needs its own (dx reads dy after it) */
    [SJ_OP_AXPY] = {"axpy", 0, 0, .grad_on_dy = 1u << 0},
    /* backward reads qkv, the gains and rstd (out[1]); both kernels work in place */
    /* backward reads only the indices */
    [SJ_OP_GATHER_ROWS] = {"gather_rows", 1u << 1, 0},
    /* backward reads the logits, the weights and the record */
    [SJ_OP_MOE_ROUTE] = {"moe_route", 1u << 0, 1u << 0 | 1u << 1},
    [SJ_OP_MOE_PERMUTE] = {"moe_permute", 1u << 1, 0},
    [SJ_OP_MOE_MATMUL] = {"moe_matmul", 1u << 0 | 1u << 1 | 1u << 2, 0},
    [SJ_OP_MOE_UNPERMUTE] = {"moe_unpermute", 1u << 0 | 1u << 1 | 1u << 2, 0},
    /* backward reads only dy */
    [SJ_OP_MLA_PACK] = {"mla_pack", 0, 0},
    [SJ_OP_HEAD_SLICE] = {"head_slice", 0, 0},
    [SJ_OP_QK_NORM] = {"qk_norm", 1u << 0 | 1u << 1 | 1u << 2, 1u << 1, .out_on_in = 1u << 0,
                       .grad_on_dy = 1u << 0},
    /* backward reads y: q . dq = y . dy gives the decays' gradient */
    [SJ_OP_SCAN] = {"scan", 1u << 0 | 1u << 1 | 1u << 2, 1u << 0},
    /* backward recomputes the pre-activation from x */
    [SJ_OP_CONV1D_SILU] = {"conv1d_silu", 1u << 0 | 1u << 1 | 1u << 2, 0},
    [SJ_OP_SSD_PREP] = {"ssd_prep", 1u << 0 | 1u << 1 | 1u << 2, 0},
    /* out = y + D x in place over y; dy = dout shared */
    [SJ_OP_SSD_SKIP] = {"ssd_skip", 1u << 1 | 1u << 2, 0, .out_on_in = 1u << 0,
                        .grad_on_dy = 1u << 0},
    [SJ_OP_GATED_RMSNORM] = {"gated_rmsnorm", 1u << 0 | 1u << 1 | 1u << 2, 1u << 1},
    [SJ_OP_LINEAR_PREP] = {"linear_prep", 1u << 0, 0},
    [SJ_OP_LINEAR_NORM] = {"linear_norm", 1u << 0, 0},
};

static int record(sj_tape *tp, sj_opcode op, const int in[3], int64_t n0, int64_t n1,
                  int no_grad1, const int dim[12], float f) {
    for (int k = 0; k < 3; k++) if (in[k] < NONE) return -1;  /* failed upstream */
    int o0 = sj_tape_tensor(tp, SJ_T_ACT, n0), o1 = NONE;
    if (o0 < 0) return -1;
    if (n1) {
        if ((o1 = sj_tape_tensor(tp, SJ_T_ACT, n1)) < 0) return -1;
        tp->t[o1].no_grad = no_grad1;
        if (no_grad1) tp->t[o1].dtype = SJ_F32;
    }
    if (sj_tape_node(tp, op, in, OUT(o0, o1), dim, f) < 0) return -1;
    return o0;
}

// tokens: (N) -> x: (N, C)
int sj_op_embedding(sj_tape *tp, int tokens, int emb, int N, int C) {
    return record(tp, SJ_OP_EMBEDDING, IN(tokens, emb, NONE), (int64_t)N * C, 0, 0,
                  DIM(N, C), 0);
}
// x: (N, C) -> y: (N, C), rstd: (N)
int sj_op_rmsnorm(sj_tape *tp, int x, int w, int N, int C, float eps) {
    return record(tp, SJ_OP_RMSNORM, IN(x, w, NONE), (int64_t)N * C, N, 1, DIM(N, C), eps);
}
// qkv: (N, (H+2KV)*hd) -> y: (N, (H+2KV)*hd), rstd: (N, H+KV)
int sj_op_qk_norm(sj_tape *tp, int qkv, int wq, int wk, int N, int H, int KV, int hd,
                  float eps) {
    return record(tp, SJ_OP_QK_NORM, IN(qkv, wq, wk), (int64_t)N * (H + 2 * KV) * hd,
                  (int64_t)N * (H + KV), 1, DIM(N, H, KV, hd), eps);
}
// x: (N, in) @ w^T, w: (out, in) -> (N, out)
int sj_op_matmul(sj_tape *tp, int x, int w, int N, int out_features, int in_features) {
    return record(tp, SJ_OP_MATMUL, IN(x, w, NONE), (int64_t)N * out_features, 0, 0,
                  DIM(N, out_features, in_features), 0);
}
// res: (N, out) + x: (N, in) @ w^T, w: (out, in) -> (N, out)
int sj_op_matmul_add(sj_tape *tp, int res, int x, int w, int N, int out_features,
                     int in_features) {
    return record(tp, SJ_OP_MATMUL_ADD, IN(x, w, res), (int64_t)N * out_features, 0, 0,
                  DIM(N, out_features, in_features), 0);
}
/* The node of a RoPE op's output gets the table its kernels read. */
static int with_rope(sj_tape *tp, int o, const sj_rope *rope) {
    if (o >= 0) tp->nodes[tp->t[o].producer].aux = rope;
    return o;
}
static int rope_fits(const sj_rope *rope, int hd) {
    if (rope && rope->n_pairs == hd / 2) return 1;
    sj_fail(SJ_ERR_ARG, "rope: a table of %d frequency pairs for head dim %d",
            rope ? rope->n_pairs : 0, hd);
    return 0;
}

// x: (B, T, n_heads*hd) -> same, first n_rot heads rotated
int sj_op_rope(sj_tape *tp, int x, int B, int T, int n_heads, int n_rot, int hd,
               const sj_rope *rope) {
    if (!rope_fits(rope, hd)) return -1;
    return with_rope(tp, record(tp, SJ_OP_ROPE, IN(x, NONE, NONE), (int64_t)B * T * n_heads * hd,
                                0, 0, DIM(B, T, n_heads, n_rot, hd), 0), rope);
}
// qkv: (B, T, (H+2KV)*hd) -> y: (B, T, H*hd), lse: (B, H, T); window 0: full causal
int sj_op_attention(sj_tape *tp, int qkv, int B, int T, int H, int KV, int hd, int window) {
    return record(tp, SJ_OP_ATTENTION, IN(qkv, NONE, NONE), (int64_t)B * T * H * hd,
                  (int64_t)B * H * T, 1, DIM(B, T, H, KV, hd, window), 0);
}
// gu: (N, 2F) -> h: (N, F) = act(gate) * up
int sj_op_swiglu(sj_tape *tp, int gu, int N, int F, int act) {
    return record(tp, SJ_OP_SWIGLU, IN(gu, NONE, NONE), (int64_t)N * F, 0, 0, DIM(N, F, act), 0);
}
int sj_op_add(sj_tape *tp, int a, int b, int64_t n) {
    return record(tp, SJ_OP_ADD, IN(a, b, NONE), n, 0, 0, DIM(0), 0);
}
// x, y: (n) -> x + a * y
int sj_op_axpy(sj_tape *tp, int x, int y, float a, int64_t n) {
    return record(tp, SJ_OP_AXPY, IN(x, y, NONE), n, 0, 0, DIM(0), a);
}
// x: (N, n_heads*hd) -> (N, n_heads/2*hd), adjacent heads averaged
int sj_op_pair_heads(sj_tape *tp, int x, int N, int n_heads, int hd) {
    return record(tp, SJ_OP_PAIR_HEADS, IN(x, NONE, NONE), (int64_t)N * (n_heads / 2) * hd, 0, 0,
                  DIM(N, n_heads, hd), 0);
}
// x, y: (N, ld) -> x with columns [c0, c0+w) of each row = (1-a) x + a y
int sj_op_mix(sj_tape *tp, int x, int y, int N, int ld, int c0, int w, float a) {
    return record(tp, SJ_OP_MIX, IN(x, y, NONE), (int64_t)N * ld, 0, 0, DIM(N, ld, c0, w), a);
}
// x: (N, C), idx: (R) -> (R, C)
int sj_op_gather_rows(sj_tape *tp, int x, int idx, int N, int R, int C) {
    return record(tp, SJ_OP_GATHER_ROWS, IN(x, idx, NONE), (int64_t)R * C, 0, 0, DIM(N, R, C), 0);
}
// logits: (N, E) -> weights: (N, k), record: sj_moe_record
int sj_op_moe_route(sj_tape *tp, int logits, int bias, int N, int E, int k,
                    const sj_moe_route *route, int *rec) {
    int o = record(tp, SJ_OP_MOE_ROUTE, IN(logits, bias, NONE), (int64_t)N * k,
                   sj_moe_record_numel(N, E, k), 1, DIM(N, E, k), 0);
    if (o < 0) return -1;
    tp->nodes[tp->t[o].producer].aux = route;
    *rec = tp->nodes[tp->t[o].producer].out[1];
    return o;
}
// x: (N, C) -> (N k, C)
int sj_op_moe_permute(sj_tape *tp, int x, int rec, int N, int E, int k, int C) {
    return record(tp, SJ_OP_MOE_PERMUTE, IN(x, rec, NONE), (int64_t)N * k * C, 0, 0,
                  DIM(N, E, k, C), 0);
}
// x: (N k, K), w: (E, n, K) -> (N k, n)
int sj_op_moe_matmul(sj_tape *tp, int x, int w, int rec, int N, int E, int k, int n, int K) {
    return record(tp, SJ_OP_MOE_MATMUL, IN(x, w, rec), (int64_t)N * k * n, 0, 0,
                  DIM(N, E, k, n, K), 0);
}
// yp: (N k, C), weights: (N, k) -> (N, C)
int sj_op_moe_unpermute(sj_tape *tp, int yp, int weights, int rec, int N, int E, int k, int C) {
    return record(tp, SJ_OP_MOE_UNPERMUTE, IN(yp, weights, rec), (int64_t)N * C, 0, 0,
                  DIM(N, E, k, C), 0);
}

// logits: (N, V), targets: (N) -> losses: (N), lse: (N)
int sj_op_cross_entropy(sj_tape *tp, int logits, int targets, int N, int V, int ignore_index) {
    int o = record(tp, SJ_OP_CROSS_ENTROPY, IN(logits, targets, NONE), N, N, 1,
                   DIM(N, V, ignore_index), 0);
    if (o >= 0) { tp->t[o].no_grad = 1; tp->t[o].dtype = SJ_F32; }
    return o;
}

// w: (numel) f32 master -> (numel) act dtype
int sj_op_cast(sj_tape *tp, int src) {
    if (src < 0) return -1;
    return record(tp, SJ_OP_CAST, IN(src, NONE, NONE), tp->t[src].numel, 0, 0, DIM(0), 0);
}

// x: (N, C), w: (2F, C) -> h: (N, F), gu: (N, 2F) on a training tape. Forward-only:
// scratch (rows, 2F) for backends that do not fuse, at most half the rows: with x
// alive through the node it still plans less than the unfused pair's gu (C < F)
int sj_op_matmul_swiglu(sj_tape *tp, int x, int w, int N, int F, int C, int act, int rows) {
    if (rows < 1 || rows > N / 2) rows = N / 2 > 0 ? N / 2 : 1;
    int o = record(tp, SJ_OP_MATMUL_SWIGLU, IN(x, w, NONE), (int64_t)N * F,
                   tp->train ? (int64_t)N * 2 * F : 0, 0, DIM(N, F, C, rows, act), 0);
    if (o < 0 || tp->train) return o;
    int sc = sj_tape_tensor(tp, SJ_T_ACT, (int64_t)rows * 2 * F);
    if (sc < 0) return -1;
    tp->nodes[tp->t[o].producer].scratch = sc;
    return o;
}
// x: (B*T, C), w: (n_heads*hd, C) -> (B, T, n_heads*hd), first n_rot heads rotated
int sj_op_matmul_rope(sj_tape *tp, int x, int w, int B, int T, int n_heads, int n_rot, int hd,
                      int C, const sj_rope *rope) {
    if (!rope_fits(rope, hd)) return -1;
    return with_rope(tp, record(tp, SJ_OP_MATMUL_ROPE, IN(x, w, NONE),
                                (int64_t)B * T * n_heads * hd, 0, 0,
                                DIM(B, T, n_heads, n_rot, hd, C), 0), rope);
}

// q: (B*T, H*(dn+dr)), kv: (B*T, H*(dn+dv)), kpe: (B*T, dr) -> (B, T, 3*H*(dn+dr))
int sj_op_mla_pack(sj_tape *tp, int q, int kv, int kpe, int B, int T, int H, int dn, int dr,
                   int dv, const sj_rope *rope) {
    if (!rope_fits(rope, dr)) return -1;
    return with_rope(tp, record(tp, SJ_OP_MLA_PACK, IN(q, kv, kpe),
                                (int64_t)B * T * 3 * H * (dn + dr), 0, 0,
                                DIM(B, T, H, dn, dr, dv), 0), rope);
}
// x: (N, H*hd_in) -> (N, H*hd_out)
int sj_op_head_slice(sj_tape *tp, int x, int N, int H, int hd_in, int hd_out) {
    return record(tp, SJ_OP_HEAD_SLICE, IN(x, NONE, NONE), (int64_t)N * H * hd_out, 0, 0,
                  DIM(N, H, hd_in, hd_out), 0);
}

// h: (N, C), w: (V, C), targets: (N) -> losses: (N), lse: (N); scratch (rows, ld)
int sj_op_lm_head_ce(sj_tape *tp, int h, int w, int targets, int N, int V, int ld, int C,
                     int ignore_index, int rows) {
    if (rows < 1 || rows > N) rows = N;
    int o = record(tp, SJ_OP_LM_HEAD_CE, IN(h, w, targets), N, N, 1,
                   DIM(N, V, ignore_index, C, rows, ld), 0);
    if (o < 0) return -1;
    tp->t[o].no_grad = 1; tp->t[o].dtype = SJ_F32;
    /* scratch: the chunk's logits, and the head weight padded to ld rows */
    int sc = sj_tape_tensor(tp, SJ_T_ACT, (int64_t)rows * ld + (ld > V ? (int64_t)ld * C : 0));
    if (sc < 0) return -1;
    tp->t[sc].no_grad = 1;
    tp->nodes[tp->t[o].producer].scratch = sc;
    return o;
}

// qk, v: rows holding q, k and v (d) ; a: (N, H) or -1 -> y: (N, H*dv)
int sj_op_scan(sj_tape *tp, int qk, int v, int a, const sj_scan_dims *d, float scale) {
    return record(tp, SJ_OP_SCAN, IN(qk, v, a), (int64_t)d->B * d->T * d->H * d->dv, 0, 0,
                  DIM(d->B, d->T, d->H, d->G, d->dk, d->dv, d->ld_qk, d->q_off, d->k_off,
                      d->ld_v, d->v_off, d->chunk), scale);
}
// x: rows of ld (W channels at off) -> (B*T, W)
int sj_op_conv1d_silu(sj_tape *tp, int x, int w, int bias, int B, int T, int ld, int off,
                      int W, int K) {
    return record(tp, SJ_OP_CONV1D_SILU, IN(x, w, bias), (int64_t)B * T * W, 0, 0,
                  DIM(B, T, ld, off, W, K), 0);
}
// -> v: (N, H*P), a: (N, H) (out[1], differentiable)
int sj_op_ssd_prep(sj_tape *tp, int xbc, int zxbcdt, int p, int N, int H, int P, int ldx,
                   int ld, int off, int *a) {
    int o = record(tp, SJ_OP_SSD_PREP, IN(xbc, zxbcdt, p), (int64_t)N * H * P, (int64_t)N * H, 0,
                   DIM(N, H, P, ldx, ld, off), 0);
    *a = o >= 0 ? tp->nodes[tp->t[o].producer].out[1] : -2;   /* failed: not 'none' */
    return o;
}
// y: (N, H*P) -> y + D_h x
int sj_op_ssd_skip(sj_tape *tp, int y, int xbc, int D, int N, int H, int P, int ldx) {
    return record(tp, SJ_OP_SSD_SKIP, IN(y, xbc, D), (int64_t)N * H * P, 0, 0, DIM(N, H, P, ldx), 0);
}
// y: (N, Din) -> (N, Din), rstd: (N, G)
int sj_op_gated_rmsnorm(sj_tape *tp, int y, int z, int w, int N, int Din, int G, int ld, int off,
                        float eps) {
    return record(tp, SJ_OP_GATED_RMSNORM, IN(y, z, w), (int64_t)N * Din, (int64_t)N * G, 1,
                  DIM(N, Din, G, ld, off), eps);
}
// p: (N, 3 H hd [+ H]) -> u: (N, 2 H hd + H (hd [+ 1])); a: (N, H) (out[1]) when gated
int sj_op_linear_prep(sj_tape *tp, int p, int N, int H, int hd, int feature, int normalize, int *a) {
    const int64_t ldu = 2 * (int64_t)H * hd + (int64_t)H * (hd + (normalize ? 1 : 0));
    int o = record(tp, SJ_OP_LINEAR_PREP, IN(p, NONE, NONE), N * ldu, a ? (int64_t)N * H : 0, 0,
                   DIM(N, H, hd, feature, normalize), 0);
    if (a) *a = o >= 0 ? tp->nodes[tp->t[o].producer].out[1] : -2;   /* failed: not 'none' */
    return o;
}
// y: (N, H, hd + 1) -> (N, H hd)
int sj_op_linear_norm(sj_tape *tp, int y, int N, int H, int hd, float eps) {
    return record(tp, SJ_OP_LINEAR_NORM, IN(y, NONE, NONE), (int64_t)N * H * hd, 0, 0,
                  DIM(N, H, hd), eps);
}

#define P(id) sj_tape_ptr(tp, (id), params)
#define G(id) sj_tape_ptr(tp, tp->t[id].grad, params)

#define OPT(id) ((id) >= 0 ? P(id) : NULL)   /* an optional input: NULL when NONE */

/* Gradient of in[k], or NULL when it has none (params, tokens, saved stats). */
static void *in_grad(const sj_tape *tp, const sj_node *n, int k, void *params) {
    int id = n->in[k];
    return id >= 0 && tp->t[id].kind == SJ_T_ACT && tp->t[id].grad >= 0 ? G(id) : NULL;
}

/* Fused CE, chunk by chunk: logits = h_chunk @ W^T into the scratch, the
 * rows' losses; on a training tape at once dlogits (in place, scaled by the
 * loss scale), dh_chunk = dlogits @ W and dW += dlogits^T h_chunk. Each
 * chunk is the unfused op restricted to its rows, so the loss equals the
 * unfused one and the gradients differ only by dW's summation order. */
static void lm_head_ce(const sj_tape *tp, const sj_node *n, const sj_backend *be, void *params) {
    const int N = n->dim[0], V = n->dim[1], ign = n->dim[2], C = n->dim[3], R = n->dim[4],
              ld = n->dim[5];
    const size_t es = sj_dtype_size(tp->act_dtype);
    const sj_dtype tdt = tp->t[n->in[2]].dtype;
    const size_t ts = sj_dtype_size(tdt);
    char *h = P(n->in[0]);
    const char *tg = P(n->in[2]);
    void *W = P(n->in[1]), *L = P(n->scratch);
    float *losses = P(n->out[0]), *lse = P(n->out[1]);
    const int train = tp->train && tp->grads;
    char *dh = train ? in_grad(tp, n, 0, params) : NULL;
    float *dW = train ? tp->grads + tp->t[n->in[1]].offset : NULL;
    const float *scale = tp->loss_scale_ptr ? tp->loss_scale_ptr : &tp->loss_scale;
    /* The logits and dh GEMMs at the padded vocabulary ld, over a copy of W
     * whose rows past V are zero (an odd V costs the GEMMs their aligned
     * kernels): the extra logits are zeros, which the cross-entropy never
     * touches, so dh's extra products add zero. dW keeps its V rows. The
     * zero rows are written as f32 zeros (the same bits in 16-bit types). */
    const void *Wg = W;
    int Vg = V;
    if (ld > V && ((size_t)C * es) % 4 == 0) {
        char *Wp = (char *)L + (size_t)R * ld * es;
        be->copy(Wp, W, (int64_t)V * C, 1.0f, 0);
        be->fill((float *)(Wp + (size_t)V * C * es), 0.0f, (int64_t)(ld - V) * C * (int64_t)es / 4);
        Wg = Wp;
        Vg = ld;
    }
    for (int r0 = 0; r0 < N; r0 += R) {
        const int rows = N - r0 < R ? N - r0 : R;
        char *hc = h + (size_t)r0 * C * es;
        be->matmul(L, ld, hc, C, Wg, C, rows, Vg, C, 0, 1, 0, 0);   /* (rows, ld) = hc Wg^T */
        be->cross_entropy_forward(losses + r0, lse + r0, L, tg + (size_t)r0 * ts, tdt, rows, V,
                                  ld, ign);
        if (!train) continue;
        be->cross_entropy_backward(L, L, lse + r0, tg + (size_t)r0 * ts, tdt, rows, V, ld, ign,
                                   scale, 0);
        if (dh) be->matmul(dh + (size_t)r0 * C * es, C, L, ld, Wg, C, rows, C, Vg, 0, 0, n->accum[0], 0);
        be->matmul(dW, C, L, ld, hc, C, V, C, rows, 1, 0, r0 > 0 || n->accum[1], 1);
    }
}

/* The fused projections, or their two ops apart: SwiGLU into the kept gu
 * (training) or through the scratch a chunk of rows at a time, RoPE in
 * place on the product. */
static void matmul_swiglu(const sj_tape *tp, const sj_node *n, const sj_backend *be,
                          void *params) {
    const int N = n->dim[0], F = n->dim[1], C = n->dim[2], R = n->dim[3], act = n->dim[4];
    const size_t es = sj_dtype_size(tp->act_dtype);
    char *h = P(n->out[0]), *x = P(n->in[0]);
    void *W = P(n->in[1]), *gu = n->out[1] >= 0 ? P(n->out[1]) : NULL;
    if (be->matmul_swiglu && be->matmul_swiglu(h, gu, x, W, N, F, C, act)) return;
    if (gu) {
        sj_matmul(be, gu, x, W, N, 2 * F, C, 0, 1, 0, 0);
        be->swiglu_forward(h, gu, N, F, act);
        return;
    }
    void *S = P(n->scratch);
    for (int r0 = 0; r0 < N; r0 += R) {
        const int rows = N - r0 < R ? N - r0 : R;
        sj_matmul(be, S, x + (size_t)r0 * C * es, W, rows, 2 * F, C, 0, 1, 0, 0);
        be->swiglu_forward(h + (size_t)r0 * F * es, S, rows, F, act);
    }
}
static void matmul_rope(const sj_tape *tp, const sj_node *n, const sj_backend *be, void *params) {
    const int *d = n->dim;
    void *out = P(n->out[0]), *x = P(n->in[0]), *W = P(n->in[1]);
    if (be->matmul_rope && be->matmul_rope(out, x, W, d[0], d[1], d[2], d[3], d[4], d[5], n->aux))
        return;
    sj_matmul(be, out, x, W, d[0] * d[1], d[2] * d[4], d[5], 0, 1, 0, 0);
    be->rope_forward(out, out, d[0], d[1], d[2], d[3], d[4], 0, n->aux);
}

void sj_op_forward(const sj_tape *tp, const sj_node *n, const sj_backend *be, void *params) {
    const int *d = n->dim, *in = n->in, *out = n->out;
    switch (n->op) {
    case SJ_OP_EMBEDDING:
        be->embedding_forward(P(out[0]), P(in[0]), tp->t[in[0]].dtype, P(in[1]), d[0], d[1]);
        break;
    case SJ_OP_RMSNORM:
        be->rmsnorm_forward(P(out[0]), P(out[1]), P(in[0]), P(in[1]), d[0], d[1], n->f);
        break;
    case SJ_OP_QK_NORM:
        be->qk_norm_forward(P(out[0]), P(out[1]), P(in[0]), OPT(in[1]), OPT(in[2]),
                            d[0], d[1], d[2], d[3], n->f);
        break;
    case SJ_OP_MATMUL:
        sj_matmul(be, P(out[0]), P(in[0]), P(in[1]), d[0], d[1], d[2], 0, 1, 0, 0);
        break;
    case SJ_OP_MATMUL_ADD:
        be->matmul_add(P(out[0]), P(in[2]), P(in[0]), P(in[1]), d[0], d[1], d[2], 0, 1);
        break;
    case SJ_OP_ROPE:
        be->rope_forward(P(out[0]), P(in[0]), d[0], d[1], d[2], d[3], d[4], 0, n->aux);
        break;
    case SJ_OP_ATTENTION:
        be->attention_forward(P(out[0]), P(out[1]), P(in[0]), d[0], d[1], d[2], d[3], d[4], d[5]);
        break;
    case SJ_OP_SWIGLU:
        be->swiglu_forward(P(out[0]), P(in[0]), d[0], d[1], d[2]);
        break;
    case SJ_OP_ADD:
    case SJ_OP_AXPY:
        be->add(P(out[0]), P(in[0]), P(in[1]), tp->t[out[0]].numel, n->op == SJ_OP_AXPY ? n->f : 1.0f);
        break;
    case SJ_OP_PAIR_HEADS:
        be->pair_heads_forward(P(out[0]), P(in[0]), d[0], d[1], d[2]);
        break;
    case SJ_OP_MIX:
        be->mix_forward(P(out[0]), P(in[0]), P(in[1]), d[0], d[1], d[2], d[3], n->f);
        break;
    case SJ_OP_GATHER_ROWS:
        be->gather_rows_forward(P(out[0]), P(in[0]), P(in[1]), d[1], d[2]);
        break;
    case SJ_OP_MOE_ROUTE:
        be->moe_route_forward(P(out[0]), P(out[1]), P(in[0]), OPT(in[1]), d[0], d[1], d[2], n->aux);
        break;
    case SJ_OP_MOE_PERMUTE:
        be->moe_permute_forward(P(out[0]), P(in[0]), P(in[1]), d[0], d[1], d[2], d[3]);
        break;
    case SJ_OP_MOE_MATMUL:
        be->moe_matmul(P(out[0]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3], d[4], 1, 0);
        break;
    case SJ_OP_MOE_UNPERMUTE:
        be->moe_unpermute_forward(P(out[0]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3]);
        break;
    case SJ_OP_SCAN: {
        const sj_scan_dims sd = { d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9],
                                  d[10], d[11] };
        be->scan_forward(P(out[0]), P(in[0]), P(in[1]), OPT(in[2]), &sd, n->f);
        break;
    }
    case SJ_OP_CONV1D_SILU:
        be->conv1d_silu_forward(P(out[0]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3],
                                d[4], d[5]);
        break;
    case SJ_OP_SSD_PREP:
        be->ssd_prep_forward(P(out[0]), P(out[1]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2],
                             d[3], d[4], d[5]);
        break;
    case SJ_OP_SSD_SKIP:
        be->ssd_skip_forward(P(out[0]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3]);
        break;
    case SJ_OP_GATED_RMSNORM:
        be->gated_rmsnorm_forward(P(out[0]), P(out[1]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1],
                                  d[2], d[3], d[4], n->f);
        break;
    case SJ_OP_LINEAR_PREP:
        be->linear_prep_forward(P(out[0]), OPT(out[1]), P(in[0]), d[0], d[1], d[2], d[3], d[4]);
        break;
    case SJ_OP_LINEAR_NORM:
        be->linear_norm_forward(P(out[0]), P(in[0]), d[0], d[1], d[2], n->f);
        break;
    case SJ_OP_CROSS_ENTROPY:
        be->cross_entropy_forward(P(out[0]), P(out[1]), P(in[0]), P(in[1]),
                                  tp->t[in[1]].dtype, d[0], d[1], d[1], d[2]);   /* packed: ld = V */
        break;
    case SJ_OP_CAST:
        be->convert(P(out[0]), tp->t[out[0]].dtype, P(in[0]), SJ_F32, tp->t[out[0]].numel);
        break;
    case SJ_OP_LM_HEAD_CE:
        lm_head_ce(tp, n, be, params);
        break;
    case SJ_OP_MATMUL_SWIGLU:
        matmul_swiglu(tp, n, be, params);
        break;
    case SJ_OP_MATMUL_ROPE:
        matmul_rope(tp, n, be, params);
        break;
    case SJ_OP_MLA_PACK:
        be->mla_pack_forward(P(out[0]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3],
                             d[4], d[5], n->aux);
        break;
    case SJ_OP_HEAD_SLICE:
        be->head_slice_forward(P(out[0]), P(in[0]), d[0], d[1], d[2], d[3]);
        break;
    case SJ_OP__COUNT: break;
    }
}

void sj_op_backward(const sj_tape *tp, const sj_node *n, const sj_backend *be,
                    void *params, float *grads) {
    const int *d = n->dim, *in = n->in, *out = n->out, *acc = n->accum;
    void *dx = in_grad(tp, n, 0, params);
    if (sj_ops[n->op].fwd_grads) return;   /* done in forward */
    void *dy = n->op == SJ_OP_CROSS_ENTROPY ? NULL : G(out[0]);
    switch (n->op) {
    case SJ_OP_EMBEDDING: {   /* a scatter: it adds, so a first write starts from zeros */
        float *demb = grads + tp->t[in[1]].offset;
        if (!acc[1]) be->fill(demb, 0.0f, tp->t[in[1]].numel);
        be->embedding_backward(demb, dy, P(in[0]), tp->t[in[0]].dtype, d[0], d[1]);
        break;
    }
    case SJ_OP_RMSNORM:
        be->rmsnorm_backward(dx, grads + tp->t[in[1]].offset, dy, P(in[0]), P(in[1]),
                             P(out[1]), d[0], d[1], acc[0], acc[1]);
        break;
    case SJ_OP_QK_NORM: {
        float *dwq = in[1] >= 0 ? grads + tp->t[in[1]].offset : NULL;
        float *dwk = in[2] >= 0 ? grads + tp->t[in[2]].offset : NULL;
        /* one dw_accum for both gains: one written first here starts from zeros */
        if (acc[1] != acc[2]) be->fill(acc[1] ? dwk : dwq, 0.0f, d[3]);
        be->qk_norm_backward(dx, dwq, dwk, dy, P(in[0]), OPT(in[1]), OPT(in[2]),
                             P(out[1]), d[0], d[1], d[2], d[3], acc[0], acc[1] || acc[2]);
        break;
    }
    case SJ_OP_MATMUL:
    case SJ_OP_MATMUL_ADD: {
        if (dx) sj_matmul(be, dx, dy, P(in[1]), d[0], d[2], d[1], 0, 0, acc[0], 0);   // dy @ W
        sj_matmul(be, grads + tp->t[in[1]].offset, dy, P(in[0]), d[1], d[2], d[0], 1, 0, acc[1], 1);
        void *dr = n->op == SJ_OP_MATMUL_ADD ? in_grad(tp, n, 2, params) : NULL;
        if (dr && dr != dy) be->copy(dr, dy, tp->t[out[0]].numel, 1.0f, acc[2]);   /* not shared */
        break;
    }
    case SJ_OP_ROPE:
        be->rope_backward(dx, dy, d[0], d[1], d[2], d[3], d[4], 0, n->aux, acc[0]);
        break;
    case SJ_OP_ATTENTION:
        be->attention_backward(dx, dy, P(in[0]), P(out[0]), P(out[1]), d[0], d[1], d[2],
                               d[3], d[4], d[5], acc[0]);
        break;
    case SJ_OP_SWIGLU:
        be->swiglu_backward(dx, dy, P(in[0]), d[0], d[1], d[2], acc[0]);
        break;
    case SJ_OP_ADD:
    case SJ_OP_AXPY: {
        void *db = in_grad(tp, n, 1, params);   /* a gradient sharing dy's storage is done */
        const float b_scale = n->op == SJ_OP_AXPY ? n->f : 1.0f;
        if (dx && dx != dy) be->copy(dx, dy, tp->t[out[0]].numel, 1.0f, acc[0]);
        if (db && db != dy) be->copy(db, dy, tp->t[out[0]].numel, b_scale, acc[1]);
        break;
    }
    case SJ_OP_PAIR_HEADS:
        if (dx) be->pair_heads_backward(dx, dy, d[0], d[1], d[2], acc[0]);
        break;
    case SJ_OP_MIX:
        be->mix_backward(dx, in_grad(tp, n, 1, params), dy, d[0], d[1], d[2], d[3], n->f, acc[0],
                         acc[1]);
        break;
    case SJ_OP_MLA_PACK:
        be->mla_pack_backward(dx, in_grad(tp, n, 1, params), in_grad(tp, n, 2, params), dy, d[0],
                              d[1], d[2], d[3], d[4], d[5], n->aux, acc[0], acc[1], acc[2]);
        break;
    case SJ_OP_HEAD_SLICE:
        if (dx) be->head_slice_backward(dx, dy, d[0], d[1], d[2], d[3], acc[0]);
        break;
    case SJ_OP_GATHER_ROWS:
        if (dx) be->gather_rows_backward(dx, dy, P(in[1]), d[0], d[1], d[2], acc[0]);
        break;
    case SJ_OP_MOE_ROUTE: {
        /* the bias has no gradient (it only picks); a first writer zeroes its slot */
        float *db = in[1] >= 0 ? grads + tp->t[in[1]].offset : NULL;
        if (db && !acc[1]) be->fill(db, 0.0f, d[1]);
        float *bias_master = in[1] >= 0 && tp->master ? (float *)tp->master + tp->t[in[1]].offset : NULL;
        be->moe_route_backward(dx, bias_master, dy, P(in[0]), P(out[0]), P(out[1]), d[0], d[1], d[2],
                               n->aux, acc[0]);
        break;
    }
    case SJ_OP_MOE_PERMUTE:
        if (dx) be->moe_permute_backward(dx, dy, P(in[1]), d[0], d[1], d[2], d[3], acc[0]);
        break;
    case SJ_OP_MOE_MATMUL:
        if (dx) be->moe_matmul(dx, dy, P(in[1]), P(in[2]), d[0], d[1], d[2], d[4], d[3], 0, acc[0]);
        be->moe_matmul_wgrad(grads + tp->t[in[1]].offset, dy, P(in[0]), P(in[2]), d[0], d[1], d[2],
                             d[3], d[4], acc[1]);
        break;
    case SJ_OP_MOE_UNPERMUTE:
        be->moe_unpermute_backward(dx, in_grad(tp, n, 1, params), dy, P(in[0]), P(in[1]), P(in[2]),
                                   d[0], d[1], d[2], d[3], acc[0], acc[1]);
        break;
    case SJ_OP_SCAN: {
        const sj_scan_dims sd = { d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9],
                                  d[10], d[11] };
        /* qk and v one tensor: the tape plans v's slices to add (acc[1]) */
        be->scan_backward(dx, in_grad(tp, n, 1, params), in_grad(tp, n, 2, params), dy, P(in[0]),
                          P(in[1]), OPT(in[2]), P(out[0]), &sd, n->f, acc[0], acc[1], acc[2]);
        break;
    }
    case SJ_OP_CONV1D_SILU: {
        float *dw = grads + tp->t[in[1]].offset, *db = grads + tp->t[in[2]].offset;
        /* one dw_accum for both: one written first here starts from zeros */
        if (acc[1] != acc[2]) be->fill(acc[1] ? db : dw, 0.0f, acc[1] ? d[4] : (int64_t)d[4] * d[5]);
        be->conv1d_silu_backward(dx, dw, db, dy, P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2],
                                 d[3], d[4], d[5], acc[0], acc[1] || acc[2]);
        break;
    }
    case SJ_OP_SSD_PREP:
        be->ssd_prep_backward(dx, in_grad(tp, n, 1, params), grads + tp->t[in[2]].offset, dy,
                              G(out[1]), P(in[0]), P(in[1]), P(in[2]), d[0], d[1], d[2], d[3],
                              d[4], d[5], acc[0], acc[1], acc[2]);
        break;
    case SJ_OP_SSD_SKIP:
        be->ssd_skip_backward(dx, in_grad(tp, n, 1, params), grads + tp->t[in[2]].offset, dy,
                              P(in[1]), P(in[2]), d[0], d[1], d[2], d[3], acc[0], acc[1], acc[2]);
        break;
    case SJ_OP_GATED_RMSNORM:
        be->gated_rmsnorm_backward(dx, in_grad(tp, n, 1, params), grads + tp->t[in[2]].offset, dy,
                                   P(in[0]), P(in[1]), P(in[2]), P(out[1]), d[0], d[1], d[2], d[3],
                                   d[4], acc[0], acc[1], acc[2]);
        break;
    case SJ_OP_LINEAR_PREP:
        be->linear_prep_backward(dx, dy, out[1] >= 0 ? G(out[1]) : NULL, P(in[0]), d[0], d[1], d[2],
                                 d[3], d[4], acc[0]);
        break;
    case SJ_OP_LINEAR_NORM:
        be->linear_norm_backward(dx, dy, P(in[0]), d[0], d[1], d[2], n->f, acc[0]);
        break;
    case SJ_OP_CROSS_ENTROPY:
        be->cross_entropy_backward(dx, P(in[0]), P(out[1]), P(in[1]), tp->t[in[1]].dtype,
                                   d[0], d[1], d[1], d[2],
                                   tp->loss_scale_ptr ? tp->loss_scale_ptr : &tp->loss_scale,
                                   acc[0]);
        break;
    case SJ_OP_MATMUL_SWIGLU:   /* dgu in gu's own gradient, then the projection's backward */
    case SJ_OP_MATMUL_ROPE: {   /* dy un-rotated in place (read by nothing else), then ... */
        const int fused_swiglu = n->op == SJ_OP_MATMUL_SWIGLU;
        const int N = fused_swiglu ? d[0] : d[0] * d[1], C = fused_swiglu ? d[2] : d[5];
        const int n_out = fused_swiglu ? 2 * d[1] : d[2] * d[4];
        void *dp = fused_swiglu ? G(out[1]) : dy;
        if (fused_swiglu) be->swiglu_backward(dp, dy, P(out[1]), d[0], d[1], d[4], 0);
        else be->rope_backward(dy, dy, d[0], d[1], d[2], d[3], d[4], 0, n->aux, 0);
        if (dx) sj_matmul(be, dx, dp, P(in[1]), N, C, n_out, 0, 0, acc[0], 0);
        sj_matmul(be, grads + tp->t[in[1]].offset, dp, P(in[0]), n_out, C, N, 1, 0, acc[1], 1);
        break;
    }
    case SJ_OP_CAST:       /* only on forward-only tapes */
    case SJ_OP_LM_HEAD_CE:
    case SJ_OP__COUNT: break;
    }
}
