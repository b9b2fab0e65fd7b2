/* gradcheck.c — finite-difference check of one op's backward (or of a few
 * nodes: an input read twice), through the same tape and backend dispatch
 * the model uses. Random inputs (never zeros), a random weighting r of the
 * outputs as objective L = sum(r * y), central differences at sampled
 * elements of every differentiable input. Gradients (of parameters too)
 * start from random values that must survive with accumulate and be
 * overwritten without. */
#include "../graph/tape.h"
#include "../model/mamba2.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_IN = 8, SAMPLES = 24 };

typedef struct {
    const char *name;
    int id;          /* tensor id */
    int is_param;
    int64_t numel;
    float *host;     /* values, copied into the arena before each forward */
} gc_input;

typedef struct {
    sj_tape tp;
    float *params, *grads;
    int64_t n_params;
    gc_input in[MAX_IN];
    int n_in, out;
    int32_t tokens[64];
    float *r;        /* objective weights over out */
    sj_rope rope;    /* the RoPE ops' frequencies, alive with the tape */
    sj_moe_route route;   /* the MoE route's settings and */
    float moe_stats[2 + 3];   /* statistics (3 experts) */
} gc;

static float uni(sj_rng *g) { return 2.0f * sj_rng_uniform(g) - 1.0f; }

static int add_act(gc *c, const char *name, int64_t numel) {
    int id = sj_tape_tensor(&c->tp, SJ_T_ACT, numel);
    if (id < 0) return id;
    c->tp.t[id].first = 0;   /* written before the first node: no node's output may take it */
    c->in[c->n_in++] = (gc_input){ name, id, 0, numel, NULL };
    return id;
}

static int add_param(gc *c, const char *name, int64_t numel) {
    int id = sj_tape_param(&c->tp, c->n_params, numel);
    c->in[c->n_in++] = (gc_input){ name, id, 1, numel, NULL };
    c->n_params += numel;
    return id;
}

static int add_tokens(gc *c, int N, int V, int with_ignored, sj_rng *g) {
    int id = sj_tape_tensor(&c->tp, SJ_T_EXTERN, N);
    for (int i = 0; i < N; i++)
        c->tokens[i] = with_ignored && i % 4 == 1 ? -1 : (int32_t)(sj_rng_next(g) % (uint64_t)V);
    c->tp.t[id].ptr = c->tokens;
    c->tp.t[id].dtype = SJ_I32;
    return id;
}

/* RoPE for heads of 4 (2 pairs) at base 100, so that both pairs turn
 * visibly over a few positions. YaRN (factor 4, original context 8): pair 0
 * kept, pair 1 interpolated, cos and sin scaled by 0.1 ln 4 + 1. */
static sj_status small_rope(sj_rope *r, int yarn) {
    sj_config c = { .dim = 4, .n_heads = 1, .rope_theta = 100.0f };
    if (yarn)
        c.rope_scaling = (sj_rope_scaling){ .type = SJ_ROPE_YARN, .factor = 4.0f,
                                            .original_max_seq_len = 8, .beta_fast = 32.0f,
                                            .beta_slow = 1.0f, .truncate = 1 };
    return sj_rope_init(r, &c, 8);
}

/* Record the op under test on a fresh tape. */
static sj_status build(gc *c, const char *op, sj_rng *g) {
    const int B = 2, T = 5, N = B * T;
    sj_tape *tp = &c->tp;
    if (!strcmp(op, "embedding")) {
        int tok = add_tokens(c, N, 7, 0, g);
        c->out = sj_op_embedding(tp, tok, add_param(c, "emb", 7 * 6), N, 6);
    } else if (!strcmp(op, "rmsnorm")) {
        int x = add_act(c, "x", N * 6);
        c->out = sj_op_rmsnorm(tp, x, add_param(c, "w", 6), N, 6, 1e-5f);
    } else if (!strcmp(op, "qk_norm") || !strcmp(op, "qk_norm_plain")) {   /* 2 q, 1 k, 1 v head of 6 */
        int qkv = add_act(c, "qkv", N * (2 + 2 * 1) * 6), wq = -1, wk = -1;
        if (!strcmp(op, "qk_norm")) { wq = add_param(c, "wq", 6); wk = add_param(c, "wk", 6); }
        c->out = sj_op_qk_norm(tp, qkv, wq, wk, N, 2, 1, 6, 1e-5f);
    } else if (!strcmp(op, "matmul")) {
        int x = add_act(c, "x", N * 5);
        c->out = sj_op_matmul(tp, x, add_param(c, "w", 7 * 5), N, 7, 5);
    } else if (!strcmp(op, "matmul_add")) {
        int res = add_act(c, "res", N * 7), x = add_act(c, "x", N * 5);
        c->out = sj_op_matmul_add(tp, res, x, add_param(c, "w", 7 * 5), N, 7, 5);
    } else if (!strcmp(op, "matmul_rope")) {   /* 3 heads of 4, 2 rotated */
        SJ_TRY(small_rope(&c->rope, 0));
        int x = add_act(c, "x", N * 5);
        c->out = sj_op_matmul_rope(tp, x, add_param(c, "w", 3 * 4 * 5), B, T, 3, 2, 4, 5, &c->rope);
    } else if (!strcmp(op, "matmul_swiglu") || !strcmp(op, "matmul_swiglu_relu2")) {
        int x = add_act(c, "x", N * 5), act = strcmp(op, "matmul_swiglu") ? SJ_FFN_RELU2 : SJ_FFN_SWIGLU;
        c->out = sj_op_matmul_swiglu(tp, x, add_param(c, "w", 2 * 6 * 5), N, 6, 5, act, 0);
    } else if (!strcmp(op, "rope") || !strcmp(op, "rope_yarn")) {
        SJ_TRY(small_rope(&c->rope, !strcmp(op, "rope_yarn")));
        c->out = sj_op_rope(tp, add_act(c, "x", N * 3 * 4), B, T, 3, 2, 4, &c->rope);
    } else if (!strcmp(op, "attention")) {
        c->out = sj_op_attention(tp, add_act(c, "qkv", N * (4 + 2 * 2) * 4), B, T, 4, 2, 4, 0);
    } else if (!strcmp(op, "attention_window")) {   /* 3 keys: less than T, not dividing it */
        c->out = sj_op_attention(tp, add_act(c, "qkv", N * (4 + 2 * 2) * 4), B, T, 4, 2, 4, 3);
    } else if (!strcmp(op, "mla_pack")) {   /* 2 heads: nope 3, rope 4 (2 pairs), v 5 */
        SJ_TRY(small_rope(&c->rope, 1));
        int q = add_act(c, "q", N * 2 * 7), kv = add_act(c, "kv", N * 2 * 8),
            kpe = add_act(c, "kpe", N * 4);
        c->out = sj_op_mla_pack(tp, q, kv, kpe, B, T, 2, 3, 4, 5, &c->rope);
    } else if (!strcmp(op, "head_slice")) {   /* 3 heads of 5 -> 3 */
        c->out = sj_op_head_slice(tp, add_act(c, "x", N * 3 * 5), N, 3, 5, 3);
    } else if (!strcmp(op, "swiglu") || !strcmp(op, "swiglu_relu2")) {
        int act = strcmp(op, "swiglu") ? SJ_FFN_RELU2 : SJ_FFN_SWIGLU;
        c->out = sj_op_swiglu(tp, add_act(c, "gu", N * 2 * 6), N, 6, act);
    } else if (!strcmp(op, "add")) {
        int a = add_act(c, "a", N * 6), b = add_act(c, "b", N * 6);
        c->out = sj_op_add(tp, a, b, N * 6);
    } else if (!strcmp(op, "axpy")) {
        int x = add_act(c, "x", N * 6), y = add_act(c, "y", N * 6);
        c->out = sj_op_axpy(tp, x, y, -0.7f, N * 6);
    } else if (!strcmp(op, "pair_heads")) {   /* 4 heads of 3 -> 2 */
        c->out = sj_op_pair_heads(tp, add_act(c, "x", N * 4 * 3), N, 4, 3);
    } else if (!strcmp(op, "mix")) {          /* rows of 7, columns 2..4 mixed */
        int x = add_act(c, "x", N * 7), y = add_act(c, "y", N * 7);
        c->out = sj_op_mix(tp, x, y, N, 7, 2, 3, 0.3f);
    } else if (!strcmp(op, "mix_shared_y")) {
        /* one y mixed into two rows-of-7 tensors on overlapping slices (1..3,
         * 3..4), summed: y's gradient is written by one mix and added to by
         * the other, zero where neither reads y */
        int x1 = add_act(c, "x1", N * 7), x2 = add_act(c, "x2", N * 7), y = add_act(c, "y", N * 7);
        int m1 = sj_op_mix(tp, x1, y, N, 7, 1, 3, 0.3f), m2 = sj_op_mix(tp, x2, y, N, 7, 3, 2, 0.6f);
        c->out = sj_op_add(tp, m1, m2, N * 7);
    } else if (!strcmp(op, "gather_rows")) {
        /* 6 of 10 rows, out of order, with two padding entries: rows never
         * gathered get a zero gradient, padding gathers a zero row */
        static const int32_t rows[] = { 7, 2, -1, 0, 9, -1 };
        int idx = sj_tape_tensor(tp, SJ_T_EXTERN, 6);
        if (idx < 0) return SJ_ERR_NOMEM;
        memcpy(c->tokens, rows, sizeof rows);
        tp->t[idx].ptr = c->tokens;
        tp->t[idx].dtype = SJ_I32;
        c->out = sj_op_gather_rows(tp, add_act(c, "x", N * 6), idx, N, 6, 6);
    } else if (!strcmp(op, "moe") || !strcmp(op, "moe_sigmoid")) {
        /* route (z-loss on) -> permute -> expert GEMM -> SwiGLU -> expert GEMM
         * -> un-permute; every token to all 3 experts of rows of 4, hidden 3,
         * so that no difference step changes the choice */
        const int E = 3, C = 4, Fe = 3, sig = !strcmp(op, "moe_sigmoid");
        c->route = (sj_moe_route){ sig ? SJ_MOE_SIGMOID : SJ_MOE_SOFTMAX, 0, 0.3f, 0.2f, 0.0f,
                                   c->moe_stats };
        int logits = add_act(c, "logits", N * E), x = add_act(c, "x", N * C), rec;
        int w = sj_op_moe_route(tp, logits, -1, N, E, E, &c->route, &rec);
        int xp = sj_op_moe_permute(tp, x, rec, N, E, E, C);
        int gu = sj_op_moe_matmul(tp, xp, add_param(c, "w_gate_up", E * 2 * Fe * C), rec, N, E, E, 2 * Fe, C);
        int yp = sj_op_moe_matmul(tp, sj_op_swiglu(tp, gu, N * E, Fe, SJ_FFN_SWIGLU),
                                  add_param(c, "w_down", E * C * Fe), rec, N, E, E, C, Fe);
        c->out = sj_op_moe_unpermute(tp, yp, w, rec, N, E, E, C);
    } else if (!strcmp(op, "scan") || !strcmp(op, "scan_fused")) {
        /* 4 heads of dv 2 over 2 groups of dk 3, chunks of 3 (not dividing T);
         * scan: q and k in rows of 13 (k at 1, q at 7), v apart, a decay;
         * fused: q, k and v slices of one row, no decay */
        const int fused = !strcmp(op, "scan_fused");
        sj_scan_dims d = { .B = B, .T = T, .H = 4, .G = 2, .dk = 3, .dv = 2, .ld_qk = 13,
                           .q_off = 7, .k_off = 1, .ld_v = 8, .v_off = 0, .chunk = 3 };
        if (fused) { d.ld_qk = d.ld_v = 20; d.q_off = 0; d.k_off = 6; d.v_off = 12; }
        int qk = add_act(c, "qk", N * d.ld_qk);
        int v = fused ? qk : add_act(c, "v", N * d.ld_v), a = fused ? -1 : add_act(c, "a", N * 4);
        c->out = sj_op_scan(tp, qk, v, a, &d, 0.8f);
    } else if (!strcmp(op, "conv1d_silu")) {   /* 5 channels at 2 of rows of 9, kernel 3 */
        int x = add_act(c, "x", N * 9);
        c->out = sj_op_conv1d_silu(tp, x, add_param(c, "w", 5 * 3), add_param(c, "b", 5), B, T, 9, 2, 5, 3);
    } else if (!strcmp(op, "ssd_skip")) {   /* 2 heads of 3; x at 0 of rows of 8 */
        int y = add_act(c, "y", N * 6), x = add_act(c, "xbc", N * 8);
        c->out = sj_op_ssd_skip(tp, y, x, add_param(c, "D", 2), N, 2, 3, 8);
    } else if (!strcmp(op, "gated_rmsnorm")) {   /* 2 groups of 3; z at 1 of rows of 9 */
        int y = add_act(c, "y", N * 6), z = add_act(c, "z", N * 9);
        c->out = sj_op_gated_rmsnorm(tp, y, z, add_param(c, "w", 6), N, 6, 2, 9, 1, 1e-5f);
    } else if (!strcmp(op, "mamba2")) {
        /* the whole mixer between the projections (ssd_prep's both outputs
         * read by the scan; zx read by three ops, xbc by three): d_inner 4 =
         * 2 heads of 2, 1 group of state 2, kernel 3: conv_dim 8, rows of 14 */
        sj_config cfg = { .dim = 2, .norm_eps = 1e-5f,
                          .ssm = { .d_state = 2, .d_conv = 3, .expand = 2, .head_dim = 2, .n_groups = 1,
                                   .chunk_size = 3 } };
        int zx = add_act(c, "zx", N * 14);
        const sj_mamba2_params w = { add_param(c, "conv_w", 8 * 3), add_param(c, "conv_b", 8),
                                     add_param(c, "dt", 4), add_param(c, "D", 2), add_param(c, "norm", 4) };
        c->out = sj_mamba2_record(tp, &cfg, &w, zx, B, T);
    } else if (!strncmp(op, "linear", 6)) {
        /* linear attention between the projection and wo: 2 heads of 3, chunks
         * of 2; linear: identity, none; linear_elu1_gated_norm: elu + 1 features,
         * the log-sigmoid gate, normalised (prep's both outputs read by the scan) */
        const int all = !strcmp(op, "linear_elu1_gated_norm");
        sj_config cfg = { .dim = 6, .n_heads = 2, .norm_eps = 1e-5f,
                          .linear = { .feature = all ? SJ_LINEAR_ELU1 : SJ_LINEAR_IDENTITY, .normalize = all,
                                      .decay = all ? SJ_LINEAR_DECAY_GATED : SJ_LINEAR_DECAY_NONE,
                                      .chunk_size = 2 } };
        c->out = sj_linear_record(tp, &cfg, add_act(c, "p", N * (18 + (all ? 2 : 0))), B, T);
    } else if (!strcmp(op, "cross_entropy")) {
        int logits = add_act(c, "logits", N * 9);
        c->out = sj_op_cross_entropy(tp, logits, add_tokens(c, N, 9, 1, g), N, 9, -1);
        tp->loss_scale = 0.3f;
    } else {
        return sj_fail(SJ_ERR_ARG, "gradcheck: unknown op '%s' (embedding, rmsnorm, qk_norm, qk_norm_plain, matmul, "
                       "matmul_add, matmul_rope, matmul_swiglu[_relu2], rope, rope_yarn, attention, attention_window, "
                       "swiglu[_relu2], add, axpy, pair_heads, mix, mix_shared_y, "
                       "gather_rows, moe, moe_sigmoid, cross_entropy, mla_pack, head_slice, scan, "
                       "scan_fused, conv1d_silu, ssd_skip, gated_rmsnorm, mamba2, linear, "
                       "linear_elu1_gated_norm)", op);
    }
    return c->out < 0 ? SJ_ERR_NOMEM : SJ_OK;
}

/* Where input k's gradient is (parameters': the flat gradient buffer). */
static float *input_grad(gc *c, int k) {
    const sj_tval *v = &c->tp.t[c->in[k].id];
    return v->kind == SJ_T_PARAM ? c->grads + v->offset : sj_tape_ptr(&c->tp, v->grad, c->params);
}

/* Forward from the host copies; the objective in double. */
static double objective(gc *c, const sj_backend *be) {
    for (int k = 0; k < c->n_in; k++)
        if (!c->in[k].is_param)
            memcpy(sj_tape_ptr(&c->tp, c->in[k].id, c->params), c->in[k].host,
                   sizeof(float) * c->in[k].numel);
    for (int i = 0; i < c->tp.n_nodes; i++) sj_op_forward(&c->tp, &c->tp.nodes[i], be, c->params);
    const float *y = sj_tape_ptr(&c->tp, c->out, c->params);
    const sj_tval *v = &c->tp.t[c->out];
    const int loss = c->tp.nodes[v->producer].op == SJ_OP_CROSS_ENTROPY;
    double L = 0.0;
    for (int64_t i = 0; i < v->numel; i++) L += loss ? c->tp.loss_scale * y[i] : c->r[i] * y[i];
    if (c->route.stats)   /* the MoE route's own losses */
        L += (double)c->route.aux_coef * c->moe_stats[0] + (double)c->route.z_coef * c->moe_stats[1];
    return L;
}

sj_status sj_op_gradcheck(const char *op, uint64_t seed, int accumulate, double *max_err,
                          char *detail, size_t detail_len) {
    const sj_backend *be = sj_cpu_backend();
    gc c;
    memset(&c, 0, sizeof c);
    sj_tape_init(&c.tp, 1, SJ_F32, 0);
    c.tp.no_inplace = 1;   /* gradients are seeded and accum flags set by hand: none shared */
    sj_rng g;
    sj_rng_seed(&g, seed);
    sj_status s = build(&c, op, &g);
    if (s == SJ_OK) s = sj_tape_plan(&c.tp, be);
    const int64_t n_out = s == SJ_OK ? c.tp.t[c.out].numel : 0;
    float *init_grad[MAX_IN] = {0}, *analytic[MAX_IN] = {0};
    if (s == SJ_OK) {
        c.params = calloc((size_t)c.n_params + 1, sizeof(float));
        c.grads = calloc((size_t)c.n_params + 1, sizeof(float));
        c.r = calloc((size_t)n_out, sizeof(float));
        if (!c.params || !c.grads || !c.r) s = sj_fail(SJ_ERR_NOMEM, "gradcheck: out of memory");
    }
    /* norms: inputs of larger norm, gains away from zero */
    const int norm = !strcmp(op, "rmsnorm") || !strncmp(op, "qk_norm", 7) || !strcmp(op, "gated_rmsnorm");
    for (int k = 0; s == SJ_OK && k < c.n_in; k++) {
        gc_input *in = &c.in[k];
        in->host = in->is_param ? c.params + c.tp.t[in->id].offset : malloc(sizeof(float) * in->numel);
        init_grad[k] = malloc(sizeof(float) * in->numel);
        analytic[k] = malloc(sizeof(float) * in->numel);
        if (!in->host || !init_grad[k] || !analytic[k]) { s = sj_fail(SJ_ERR_NOMEM, "gradcheck: out of memory"); break; }
        for (int64_t i = 0; i < in->numel; i++) {
            in->host[i] = uni(&g) * (norm && !in->is_param ? 2.0f : 1.0f);
            if (in->is_param && norm) in->host[i] += 1.5f;
            init_grad[k][i] = uni(&g);   /* kept (accumulate) or overwritten */
        }
    }
    if (s == SJ_OK) {
        for (int64_t i = 0; i < n_out; i++) c.r[i] = uni(&g);
        objective(&c, be);
        /* Seed dL/dy = r and run backward, node by node in reverse. Each input
         * gradient starts from init_grad right before its first writer (its
         * storage may be an earlier-dead gradient's), which then adds into it
         * with accumulate and overwrites it without; later writers add. It
         * is read right after its last writer (its storage may be reused). */
        if (c.tp.t[c.out].grad >= 0)
            memcpy(sj_tape_ptr(&c.tp, c.tp.t[c.out].grad, c.params), c.r, sizeof(float) * n_out);
        int first_writer[MAX_IN], last_writer[MAX_IN];
        for (int k = 0; k < c.n_in; k++) {
            first_writer[k] = -1;
            for (int i = 0; i < c.tp.n_nodes; i++)
                for (int j = 0; j < 3; j++)
                    if (c.tp.nodes[i].in[j] == c.in[k].id) {
                        if (first_writer[k] < 0) last_writer[k] = i;   /* backward runs in reverse */
                        first_writer[k] = i;
                    }
        }
        for (int i = c.tp.n_nodes - 1; i >= 0; i--) {
            sj_node *n = &c.tp.nodes[i];
            for (int k = 0; k < c.n_in; k++) {
                if (first_writer[k] != i) continue;
                memcpy(input_grad(&c, k), init_grad[k], sizeof(float) * c.in[k].numel);
                for (int j = 0; j < 3; j++) if (n->in[j] == c.in[k].id) { n->accum[j] = accumulate; break; }
            }
            sj_op_backward(&c.tp, n, be, c.params, c.grads);
            for (int k = 0; k < c.n_in; k++) {
                if (last_writer[k] != i) continue;
                const float *gp = input_grad(&c, k);
                for (int64_t e = 0; e < c.in[k].numel; e++)
                    analytic[k][e] = gp[e] - (accumulate ? init_grad[k][e] : 0.0f);
            }
        }
        /* Central differences at sampled elements. */
        *max_err = 0.0;
        size_t used = 0;
        if (detail_len) detail[0] = 0;
        for (int k = 0; k < c.n_in; k++) {
            gc_input *in = &c.in[k];
            double num2 = 0, diff2 = 0;
            for (int sidx = 0; sidx < SAMPLES; sidx++) {
                int64_t i = (int64_t)(sj_rng_next(&g) % (uint64_t)in->numel);
                const float h = 1e-2f, x0 = in->host[i];
                in->host[i] = x0 + h;
                double Lp = objective(&c, be);
                in->host[i] = x0 - h;
                double Lm = objective(&c, be);
                in->host[i] = x0;
                double num = (Lp - Lm) / (2.0 * h), d = num - analytic[k][i];
                num2 += num * num;
                diff2 += d * d;
            }
            double err = sqrt(diff2) / fmax(sqrt(num2), 1e-6);
            if (err > *max_err) *max_err = err;
            if (detail_len > used)
                used += (size_t)snprintf(detail + used, detail_len - used, "%s%s: %.2e",
                                         k ? ", " : "", in->name, err);
        }
    }
    for (int k = 0; k < c.n_in; k++) {
        if (!c.in[k].is_param) free(c.in[k].host);
        free(init_grad[k]);
        free(analytic[k]);
    }
    free(c.params); free(c.grads); free(c.r);
    sj_tape_free(&c.tp, be);
    return s;
}

/* In-place planning where every rule binds: x = qk_norm(x0) feeds two
 * ropes (the first must not overwrite x, the second may); their sum's
 * gradient can be shared by only one of them; the residual gradient chains
 * through rope and add to the root dy; the second rope's input gradient is
 * then accumulated, not shared; x0's gradient takes x's (qk_norm's backward
 * in place), while x0 itself, read by that backward, keeps its storage.
 * Then a value mix over the product (in place, forward and backward) and an
 * axpy, both reading v (whose gradient the second adds into). One run as
 * planned, one with nothing shared: the forward output, x0's gradient and
 * the parameters' (W, the two gains) must agree bit for bit. */
enum { IPC_N = 10, IPC_ROW = 12, IPC_A = 5, IPC_PARAMS = IPC_ROW * IPC_A + 2 * 4 };

static sj_status inplace_run(uint64_t seed, int no_inplace, float *res, int in_place[SJ_OP__COUNT]) {
    const sj_backend *be = sj_cpu_backend();
    const int B = 2, T = IPC_N / 2, N = IPC_N, R = IPC_ROW;
    sj_rope rope;
    SJ_TRY(small_rope(&rope, 0));
    sj_tape tp;
    sj_tape_init(&tp, 1, SJ_F32, 0);
    tp.no_inplace = no_inplace;
    int x0 = sj_tape_tensor(&tp, SJ_T_ACT, N * R), a = sj_tape_tensor(&tp, SJ_T_ACT, N * IPC_A);
    int v = sj_tape_tensor(&tp, SJ_T_ACT, N * R);
    int w = sj_tape_param(&tp, 0, R * IPC_A);
    int wq = sj_tape_param(&tp, R * IPC_A, 4), wk = sj_tape_param(&tp, R * IPC_A + 4, 4);
    int x = sj_op_qk_norm(&tp, x0, wq, wk, N, 1, 1, 4, 1e-5f);   /* rows of 3 heads of 4 */
    int p = sj_op_rope(&tp, x, B, T, 3, 2, 4, &rope), q = sj_op_rope(&tp, x, B, T, 3, 2, 4, &rope);
    int z = sj_op_add(&tp, p, q, N * R);
    int r = sj_op_rope(&tp, z, B, T, 3, 2, 4, &rope);
    int o = sj_op_matmul_add(&tp, r, a, w, N, R, IPC_A);
    int out = sj_op_axpy(&tp, sj_op_mix(&tp, o, v, N, R, 4, 4, 0.3f), v, 0.25f, N * R);
    sj_status s = out < 0 ? SJ_ERR_NOMEM : SJ_OK;
    /* the inputs are written before the first node: alive from the start */
    if (s == SJ_OK) { tp.t[x0].first = tp.t[a].first = tp.t[v].first = 0; s = sj_tape_plan(&tp, be); }
    float params[IPC_PARAMS], grads[IPC_PARAMS] = {0};
    if (s == SJ_OK) {
        sj_rng g;
        sj_rng_seed(&g, seed);
        float *px = sj_tape_ptr(&tp, x0, params), *pa = sj_tape_ptr(&tp, a, params);
        float *pv = sj_tape_ptr(&tp, v, params);
        for (int i = 0; i < N * R; i++) px[i] = uni(&g);
        for (int i = 0; i < N * R; i++) pv[i] = uni(&g);
        for (int i = 0; i < N * IPC_A; i++) pa[i] = uni(&g);
        for (int i = 0; i < IPC_PARAMS; i++) params[i] = uni(&g);
        s = sj_tape_forward(&tp, be, params);
        memcpy(res, sj_tape_ptr(&tp, out, params), sizeof(float) * N * R);
        float *dy = sj_tape_ptr(&tp, tp.t[out].grad, params);
        for (int i = 0; i < N * R; i++) dy[i] = uni(&g);
    }
    if (s == SJ_OK) s = sj_tape_backward(&tp, be, params, grads);
    if (s == SJ_OK) {
        memcpy(res + N * R, sj_tape_ptr(&tp, tp.t[x0].grad, params), sizeof(float) * N * R);
        /* (a's and v's gradients are not compared: their storage is reused
         * once they are dead) */
        memcpy(res + 2 * N * R, grads, sizeof grads);
        int nodes[SJ_OP__COUNT];
        sj_tape_census(&tp, nodes, in_place);
    }
    sj_tape_free(&tp, be);
    return s;
}

sj_status sj_tape_inplace_check(uint64_t seed, double *max_diff, int in_place[SJ_OP__COUNT]) {
    enum { n = 2 * IPC_N * IPC_ROW + IPC_PARAMS };
    float shared[n], apart[n];
    int none[SJ_OP__COUNT];
    SJ_TRY(inplace_run(seed, 0, shared, in_place));
    SJ_TRY(inplace_run(seed, 1, apart, none));
    *max_diff = 0.0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)shared[i] - apart[i]);
        if (!(d <= *max_diff)) *max_diff = d;   /* NaN sticks */
    }
    return SJ_OK;
}
