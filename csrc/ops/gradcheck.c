/* gradcheck.c — finite-difference check of one op's backward, through the
 * same tape and backend dispatch the model uses. Random inputs (never
 * zeros), a random weighting r of the outputs as objective L = sum(r * y),
 * central differences at sampled elements of every differentiable input.
 * With accumulate, gradients start from random values that must survive. */
#include "../graph/tape.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_IN = 3, SAMPLES = 24 };

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
    int n_in, node, out;
    int32_t tokens[64];
    float *r;        /* objective weights over out */
} gc;

static float uni(sj_rng *g) { return 2.0f * sj_rng_uniform(g) - 1.0f; }

static int add_act(gc *c, const char *name, int64_t numel) {
    int id = sj_tape_tensor(&c->tp, SJ_T_ACT, numel);
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
    } else if (!strcmp(op, "matmul")) {
        int x = add_act(c, "x", N * 5);
        c->out = sj_op_matmul(tp, x, add_param(c, "w", 7 * 5), N, 7, 5);
    } else if (!strcmp(op, "matmul_add")) {
        int res = add_act(c, "res", N * 7), x = add_act(c, "x", N * 5);
        c->out = sj_op_matmul_add(tp, res, x, add_param(c, "w", 7 * 5), N, 7, 5);
    } else if (!strcmp(op, "rope")) {
        c->out = sj_op_rope(tp, add_act(c, "x", N * 3 * 4), B, T, 3, 2, 4, 100.0f);
    } else if (!strcmp(op, "attention")) {
        c->out = sj_op_attention(tp, add_act(c, "qkv", N * (4 + 2 * 2) * 4), B, T, 4, 2, 4);
    } else if (!strcmp(op, "swiglu")) {
        c->out = sj_op_swiglu(tp, add_act(c, "gu", N * 2 * 6), N, 6);
    } else if (!strcmp(op, "add")) {
        int a = add_act(c, "a", N * 6), b = add_act(c, "b", N * 6);
        c->out = sj_op_add(tp, a, b, N * 6);
    } else if (!strcmp(op, "cross_entropy")) {
        int logits = add_act(c, "logits", N * 9);
        c->out = sj_op_cross_entropy(tp, logits, add_tokens(c, N, 9, 1, g), N, 9, -1);
        tp->loss_scale = 0.3f;
    } else {
        return sj_fail(SJ_ERR_ARG, "gradcheck: unknown op '%s' (embedding, rmsnorm, matmul, "
                       "matmul_add, rope, attention, swiglu, add, cross_entropy)", op);
    }
    if (c->out < 0) return SJ_ERR_NOMEM;
    c->node = tp->t[c->out].producer;
    return SJ_OK;
}

/* Forward from the host copies; the objective in double. */
static double objective(gc *c, const sj_backend *be) {
    for (int k = 0; k < c->n_in; k++)
        if (!c->in[k].is_param)
            memcpy(sj_tape_ptr(&c->tp, c->in[k].id, c->params), c->in[k].host,
                   sizeof(float) * c->in[k].numel);
    sj_op_forward(&c->tp, &c->tp.nodes[c->node], be, c->params);
    const float *y = sj_tape_ptr(&c->tp, c->out, c->params);
    const sj_tval *v = &c->tp.t[c->out];
    double L = 0.0;
    for (int64_t i = 0; i < v->numel; i++)
        L += c->tp.nodes[c->node].op == SJ_OP_CROSS_ENTROPY ? c->tp.loss_scale * y[i] : c->r[i] * y[i];
    return L;
}

sj_status sj_op_gradcheck(const char *op, uint64_t seed, int accumulate, double *max_err,
                          char *detail, size_t detail_len) {
    const sj_backend *be = &sj_cpu_backend;
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
    for (int k = 0; s == SJ_OK && k < c.n_in; k++) {
        gc_input *in = &c.in[k];
        in->host = in->is_param ? c.params + c.tp.t[in->id].offset : malloc(sizeof(float) * in->numel);
        init_grad[k] = malloc(sizeof(float) * in->numel);
        analytic[k] = malloc(sizeof(float) * in->numel);
        if (!in->host || !init_grad[k] || !analytic[k]) { s = sj_fail(SJ_ERR_NOMEM, "gradcheck: out of memory"); break; }
        for (int64_t i = 0; i < in->numel; i++) {
            in->host[i] = uni(&g) * (strcmp(op, "rmsnorm") || in->is_param ? 1.0f : 2.0f);
            if (in->is_param && !strcmp(op, "rmsnorm")) in->host[i] += 1.5f;
            init_grad[k][i] = accumulate || in->is_param ? uni(&g) : 0.0f;
        }
    }
    if (s == SJ_OK) {
        for (int64_t i = 0; i < n_out; i++) c.r[i] = uni(&g);
        objective(&c, be);
        /* Seed dL/dy = r, start each input gradient from init_grad, run backward. */
        sj_node *n = &c.tp.nodes[c.node];
        if (c.tp.t[c.out].grad >= 0)
            memcpy(sj_tape_ptr(&c.tp, c.tp.t[c.out].grad, c.params), c.r, sizeof(float) * n_out);
        for (int k = 0; k < c.n_in; k++) {
            gc_input *in = &c.in[k];
            float *gp = in->is_param ? c.grads + c.tp.t[in->id].offset
                                     : sj_tape_ptr(&c.tp, c.tp.t[in->id].grad, c.params);
            memcpy(gp, init_grad[k], sizeof(float) * in->numel);
            for (int j = 0; j < 3; j++) if (n->in[j] == in->id) n->accum[j] = accumulate;
        }
        sj_op_backward(&c.tp, n, be, c.params, c.grads);
        for (int k = 0; k < c.n_in; k++) {
            gc_input *in = &c.in[k];
            const float *gp = in->is_param ? c.grads + c.tp.t[in->id].offset
                                           : sj_tape_ptr(&c.tp, c.tp.t[in->id].grad, c.params);
            for (int64_t i = 0; i < in->numel; i++) analytic[k][i] = gp[i] - init_grad[k][i];
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
