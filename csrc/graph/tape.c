/* tape.c — recording, planning and replay. See tape.h for the idea. */
#include "tape.h"
#include <stdlib.h>
#include <string.h>

void sj_tape_init(sj_tape *tp, int train, sj_dtype act_dtype, int device) {
    memset(tp, 0, sizeof *tp);
    tp->train = train;
    tp->act_dtype = act_dtype;
    tp->device = device;
    tp->budget = -1;
}

void sj_tape_free(sj_tape *tp, const sj_backend *be) {
    if (tp->arena) be->free(tp->arena);
    free(tp->nodes);
    free(tp->t);
    free(tp->blocks);
    free(tp->xnodes);
    free(tp->bsched);
    free(tp->fsched);
    free(tp->convs);
    memset(tp, 0, sizeof *tp);
}

static int grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap) return 0;
    int c = *cap ? *cap * 2 : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q) { sj_fail(SJ_ERR_NOMEM, "tape: out of memory"); return -1; }
    *p = q; *cap = c;
    return 0;
}

int sj_tape_tensor(sj_tape *tp, sj_tkind kind, int64_t numel) {
    if (grow((void **)&tp->t, &tp->cap_t, tp->n_t + 1, sizeof(sj_tval))) return -1;
    sj_tval *v = &tp->t[tp->n_t];
    memset(v, 0, sizeof *v);
    v->kind = kind; v->numel = numel; v->grad = -1; v->producer = -1;
    v->first = v->last = -1; v->alias = -1;
    v->dtype = kind == SJ_T_ACT ? tp->act_dtype : SJ_F32;
    return tp->n_t++;
}

int sj_tape_param(sj_tape *tp, int64_t offset, int64_t numel) {
    int id = sj_tape_tensor(tp, SJ_T_PARAM, numel);
    if (id >= 0) tp->t[id].offset = offset;
    return id;
}

int sj_tape_master(sj_tape *tp, int64_t offset, int64_t numel) {
    int id = sj_tape_tensor(tp, SJ_T_MASTER, numel);
    if (id >= 0) tp->t[id].offset = offset;
    return id;
}

int sj_tape_node(sj_tape *tp, sj_opcode op, const int in[3], const int out[2],
                 const int dim[12], float f) {
    if (grow((void **)&tp->nodes, &tp->cap_nodes, tp->n_nodes + 1, sizeof(sj_node))) return -1;
    sj_node *n = &tp->nodes[tp->n_nodes];
    memset(n, 0, sizeof *n);
    n->op = op; n->f = f; n->scratch = -1;
    memcpy(n->in, in, sizeof n->in);
    memcpy(n->out, out, sizeof n->out);
    memcpy(n->dim, dim, sizeof n->dim);
    for (int k = 0; k < 2; k++) if (out[k] >= 0) tp->t[out[k]].producer = tp->n_nodes;
    return tp->n_nodes++;
}

sj_status sj_tape_block_begin(sj_tape *tp) {
    if (grow((void **)&tp->blocks, &tp->cap_blocks, tp->n_blocks + 1, sizeof *tp->blocks))
        return SJ_ERR_NOMEM;
    tp->blocks[tp->n_blocks][0] = tp->blocks[tp->n_blocks][1] = tp->n_nodes;
    return SJ_OK;
}

sj_status sj_tape_block_end(sj_tape *tp) {
    if (tp->n_blocks < tp->cap_blocks) tp->blocks[tp->n_blocks++][1] = tp->n_nodes;
    return SJ_OK;
}

static int add_xnode(sj_tape *tp, const sj_node *n) {
    if (grow((void **)&tp->xnodes, &tp->cap_xnodes, tp->n_xnodes + 1, sizeof(sj_node))) return -1;
    tp->xnodes[tp->n_xnodes] = *n;
    return tp->n_xnodes++;
}

static void touch(sj_tval *v, int time) {
    if (v->first < 0 || time < v->first) v->first = time;
    if (time > v->last) v->last = time;
}

/* A tensor to lay out in the arena: its bytes and lifetime. */
typedef struct { int id; int64_t bytes; int first, last; } item;
static int by_size(const void *a, const void *b) {   /* largest first */
    const item *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    return x->id - y->id;
}
static int by_life(const void *a, const void *b) {   /* longest-lived first */
    const item *x = a, *y = b;
    if (x->last - x->first != y->last - y->first) return (y->last - y->first) - (x->last - x->first);
    return by_size(a, b);
}
static int by_birth(const void *a, const void *b) {  /* first made first */
    const item *x = a, *y = b;
    return x->first != y->first ? x->first - y->first : by_size(a, b);
}
typedef struct { int64_t lo, hi; } span;
static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}


/* The backward pass as a list of steps. Without checkpointing: every node's
 * backward in reverse. A checkpointed block [b, e) instead gets, in front of
 * its backward, a re-run of the forward nodes whose outputs its backward
 * needs (directly or through another re-run node), writing into fresh
 * "recomputed" tensors; its backward nodes read those. The forward copies
 * of the block's interior activations then die inside forward, and the
 * recomputed copies live only from the re-run to the block's backward: the
 * plan packs both short lifetimes. Interior = written inside the block and
 * read by no node outside it. Kernels are deterministic, so the recomputed
 * values, and the gradients, are bit-identical to the kept ones. */
static sj_status build_schedule(sj_tape *tp) {
    const int F = tp->n_nodes, nt = tp->n_t;
    tp->bsched = malloc(sizeof(sj_step) * (size_t)(2 * F + 1));
    int *block_of = malloc(sizeof(int) * (size_t)(nt + F));   /* tensor: block+1, or 0 */
    int *prime = malloc(sizeof(int) * (size_t)nt);            /* tensor -> recomputed id */
    char *need = calloc((size_t)nt + (size_t)F, 1);           /* tensors, then nodes */
    if (!tp->bsched || !block_of || !prime || !need) {
        free(block_of); free(prime); free(need);
        return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
    }
    int *node_block = block_of + nt;
    for (int id = 0; id < nt; id++) { block_of[id] = 0; prime[id] = -1; }
    for (int i = 0; i < F; i++) node_block[i] = -1;
    if (tp->checkpoint)
        for (int b = 0; b < tp->n_blocks; b++)
            for (int i = tp->blocks[b][0]; i < tp->blocks[b][1]; i++) {
                node_block[i] = b;
                for (int k = 0; k < 2; k++) {
                    int o = tp->nodes[i].out[k];
                    if (o >= 0 && tp->t[o].kind == SJ_T_ACT) block_of[o] = b + 1;
                }
            }
    for (int i = 0; i < F; i++)   /* read outside its block: kept, not interior */
        for (int k = 0; k < 3; k++) {
            int id = tp->nodes[i].in[k];
            if (id >= 0 && block_of[id] && node_block[i] != block_of[id] - 1) block_of[id] = 0;
        }
    sj_status s = SJ_OK;
    int n = 0;
    for (int i = F - 1; i >= 0 && s == SJ_OK; ) {
        int b = node_block[i];
        if (b < 0) { tp->bsched[n++] = (sj_step){ SJ_STEP_BWD, i }; i--; continue; }
        const int lo = tp->blocks[b][0], hi = tp->blocks[b][1];
        char *need_node = need + nt;
        /* Interior tensors the block's backward reads, then (reverse order)
         * the nodes that make them and, in turn, their interior inputs. */
        for (int j = lo; j < hi; j++) {
            const sj_node *nd = &tp->nodes[j];
            for (int k = 0; k < 3; k++)
                if (nd->in[k] >= 0 && (sj_ops[nd->op].bwd_reads_in >> k & 1)) need[nd->in[k]] = 1;
            for (int k = 0; k < 2; k++)
                if (nd->out[k] >= 0 && (sj_ops[nd->op].bwd_reads_out >> k & 1)) need[nd->out[k]] = 1;
        }
        for (int j = hi - 1; j >= lo; j--) {
            const sj_node *nd = &tp->nodes[j];
            for (int k = 0; k < 2; k++)
                if (nd->out[k] >= 0 && block_of[nd->out[k]] && need[nd->out[k]]) need_node[j] = 1;
            if (need_node[j])
                for (int k = 0; k < 3; k++)
                    if (nd->in[k] >= 0 && block_of[nd->in[k]]) need[nd->in[k]] = 1;
        }
        /* Recomputed twins of every output of a re-run node. */
        for (int j = lo; j < hi && s == SJ_OK; j++) {
            if (!need_node[j]) continue;
            for (int k = 0; k < 2; k++) {
                int o = tp->nodes[j].out[k];
                if (o < 0) continue;
                int r = sj_tape_tensor(tp, SJ_T_ACT, tp->t[o].numel);
                if (r < 0) { s = SJ_ERR_NOMEM; break; }
                tp->t[r].dtype = tp->t[o].dtype;
                tp->t[r].no_grad = tp->t[o].no_grad;
                tp->t[r].grad = tp->t[o].grad;   /* one gradient for both copies */
                prime[o] = r;
            }
        }
        for (int j = lo; j < hi && s == SJ_OK; j++) {
            if (!need_node[j]) continue;
            sj_node x = tp->nodes[j];
            for (int k = 0; k < 3; k++) if (x.in[k] >= 0 && prime[x.in[k]] >= 0) x.in[k] = prime[x.in[k]];
            for (int k = 0; k < 2; k++) if (x.out[k] >= 0) x.out[k] = prime[x.out[k]];
            int xi = add_xnode(tp, &x);
            if (xi < 0) { s = SJ_ERR_NOMEM; break; }
            tp->bsched[n++] = (sj_step){ SJ_STEP_XFWD, xi };
        }
        for (int j = hi - 1; j >= lo && s == SJ_OK; j--) {
            sj_node x = tp->nodes[j];
            for (int k = 0; k < 3; k++) if (x.in[k] >= 0 && prime[x.in[k]] >= 0) x.in[k] = prime[x.in[k]];
            for (int k = 0; k < 2; k++) if (x.out[k] >= 0 && prime[x.out[k]] >= 0) x.out[k] = prime[x.out[k]];
            int xi = add_xnode(tp, &x);
            if (xi < 0) { s = SJ_ERR_NOMEM; break; }
            tp->bsched[n++] = (sj_step){ SJ_STEP_XBWD, xi };
        }
        i = lo - 1;
    }
    tp->n_bsched = n;
    free(block_of); free(prime); free(need);
    return s;
}

/* A step's node: recorded (forward, backward) or made by the plan (x). */
static sj_node *step_node(const sj_tape *tp, const sj_step *st) {
    return st->kind == SJ_STEP_BWD || st->kind == SJ_STEP_FWD ? &tp->nodes[st->idx]
                                                              : &tp->xnodes[st->idx];
}

/* The forward pass as run: the schedule with fp16 conversions, or else
 * the nodes in order. */
static int n_fwd_steps(const sj_tape *tp) { return tp->n_fsched ? tp->n_fsched : tp->n_nodes; }
static sj_step fwd_step(const sj_tape *tp, int k) {
    return tp->n_fsched ? tp->fsched[k] : (sj_step){ SJ_STEP_FWD, k };
}

static void touch_forward(sj_tape *tp, const sj_node *n, int time) {
    for (int k = 0; k < 2; k++) if (n->out[k] >= 0) touch(&tp->t[n->out[k]], time);
    for (int k = 0; k < 3; k++) if (n->in[k] >= 0) touch(&tp->t[n->in[k]], time);
    if (n->scratch >= 0) touch(&tp->t[n->scratch], time);
    if (tp->train && sj_ops[n->op].fwd_grads)
        for (int k = 0; k < 3; k++) {
            int id = n->in[k];
            if (id >= 0 && tp->t[id].kind == SJ_T_ACT && tp->t[id].grad >= 0)
                touch(&tp->t[tp->t[id].grad], time);
        }
}

static void touch_backward(sj_tape *tp, const sj_node *n, int time) {
    for (int k = 0; k < 3; k++)
        if (n->in[k] >= 0 && (sj_ops[n->op].bwd_reads_in >> k & 1)) touch(&tp->t[n->in[k]], time);
    for (int k = 0; k < 2; k++)
        if (n->out[k] >= 0 && (sj_ops[n->op].bwd_reads_out >> k & 1)) touch(&tp->t[n->out[k]], time);
    /* This node's backward reads its outputs' gradients (a kept output
     * nobody reads has one too: matmul_swiglu's gu, whose gradient the
     * node makes and uses itself) and writes its inputs'. */
    for (int k = 0; k < 2; k++)
        if (n->out[k] >= 0 && tp->t[n->out[k]].grad >= 0) touch(&tp->t[tp->t[n->out[k]].grad], time);
    for (int k = 0; k < 3; k++) {
        int id = n->in[k];
        if (id >= 0 && tp->t[id].kind == SJ_T_ACT && tp->t[id].grad >= 0)
            touch(&tp->t[tp->t[id].grad], time);
    }
}


/* Touch every tensor at the times the schedule uses it; returns the time
 * forward ends. */
static int lifetimes(sj_tape *tp) {
    int t = 0;
    for (int k = 0; k < n_fwd_steps(tp); k++, t++) {
        const sj_step st = fwd_step(tp, k);
        if (st.kind == SJ_STEP_CONV) {
            touch(&tp->t[tp->convs[st.idx].src], t);
            touch(&tp->t[tp->convs[st.idx].dst], t);
        } else {
            touch_forward(tp, &tp->nodes[st.idx], t);
        }
    }
    const int fwd_end = t;
    for (int k = 0; k < tp->n_bsched; k++, t++) {
        const sj_step *st = &tp->bsched[k];
        if (st->kind == SJ_STEP_CONV) {
            touch(&tp->t[tp->convs[st->idx].src], t);
            touch(&tp->t[tp->convs[st->idx].dst], t);
            continue;
        }
        sj_node *n = step_node(tp, st);
        if (st->kind == SJ_STEP_XFWD) touch_forward(tp, n, t);
        else touch_backward(tp, n, t);
    }
    return fwd_end;
}

/* Does step st read tensor id in backward (its backward's reads, or a
 * recompute's inputs)? */
static int step_reads(const sj_tape *tp, const sj_step *st, int id) {
    const sj_node *n = st->kind == SJ_STEP_BWD ? &tp->nodes[st->idx] : &tp->xnodes[st->idx];
    for (int k = 0; k < 3; k++)
        if (n->in[k] == id && (st->kind == SJ_STEP_XFWD || (sj_ops[n->op].bwd_reads_in >> k & 1)))
            return 1;
    for (int k = 0; k < 2; k++)
        if (n->out[k] == id && st->kind != SJ_STEP_XFWD && (sj_ops[n->op].bwd_reads_out >> k & 1))
            return 1;
    return 0;
}

/* fp16 activations, on lifetimes computed without them: every
 * differentiable f32 activation kept from forward to backward (not the
 * loss's inputs, which are used at once) is narrowed to an f16 tensor after
 * its last forward use and widened into a fresh f32 twin (same gradient)
 * just before its first backward reader; backward steps read the twin. */
static sj_status plan_f16(sj_tape *tp) {
    const int F = tp->n_nodes, nt = tp->n_t;
    int *last_fwd = malloc(sizeof(int) * (size_t)nt * 2);
    tp->fsched = malloc(sizeof(sj_step) * (size_t)(2 * F + nt));
    sj_step *bs = malloc(sizeof(sj_step) * (size_t)(tp->n_bsched + nt));
    tp->convs = malloc(sizeof(sj_conv) * (size_t)nt * 2);
    if (!last_fwd || !tp->fsched || !bs || !tp->convs) {
        free(last_fwd); free(bs);
        return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
    }
    int *twin = last_fwd + nt;
    for (int id = 0; id < nt; id++) { last_fwd[id] = -1; twin[id] = -1; }
    for (int i = 0; i < F; i++) {
        const sj_node *n = &tp->nodes[i];
        for (int k = 0; k < 3; k++) if (n->in[k] >= 0) last_fwd[n->in[k]] = i;
        for (int k = 0; k < 2; k++) if (n->out[k] >= 0) last_fwd[n->out[k]] = i;
    }
    char *skip = calloc((size_t)nt, 1);
    if (!skip) { free(last_fwd); free(bs); return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory"); }
    for (int i = 0; i < F; i++)
        if (tp->nodes[i].op == SJ_OP_CROSS_ENTROPY || tp->nodes[i].op == SJ_OP_LM_HEAD_CE)
            for (int k = 0; k < 3; k++) if (tp->nodes[i].in[k] >= 0) skip[tp->nodes[i].in[k]] = 1;
    sj_status s = SJ_OK;
    /* which tensors, and their f16 and f32 twins */
    for (int id = 0; id < nt && s == SJ_OK; id++) {
        const sj_tval v = tp->t[id];
        if (v.kind != SJ_T_ACT || v.no_grad || v.dtype != SJ_F32 || v.alias >= 0 || skip[id] ||
            v.first < 0 || v.first >= F || v.last < F || last_fwd[id] < 0 || v.numel < 1024)
            continue;
        int h = sj_tape_tensor(tp, SJ_T_ACT, v.numel), w = h < 0 ? -1 : sj_tape_tensor(tp, SJ_T_ACT, v.numel);
        if (w < 0) { s = SJ_ERR_NOMEM; break; }
        tp->t[h].dtype = SJ_F16; tp->t[h].no_grad = 1;
        tp->t[w].grad = v.grad;
        twin[id] = tp->n_convs;
        tp->convs[tp->n_convs++] = (sj_conv){ id, h };
        tp->convs[tp->n_convs++] = (sj_conv){ h, w };
    }
    free(skip);
    /* forward: each narrowing right after the tensor's last forward use */
    int nf = 0;
    for (int i = 0; i < F && s == SJ_OK; i++) {
        tp->fsched[nf++] = (sj_step){ SJ_STEP_FWD, i };
        for (int id = 0; id < nt; id++)
            if (twin[id] >= 0 && last_fwd[id] == i) tp->fsched[nf++] = (sj_step){ SJ_STEP_CONV, twin[id] };
    }
    tp->n_fsched = nf;
    /* backward: widen before the first reader; readers read the wide twin */
    char *widened = calloc((size_t)nt, 1);
    int nb = 0;
    if (!widened) s = sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
    for (int k = 0; k < tp->n_bsched && s == SJ_OK; k++) {
        sj_step st = tp->bsched[k];
        int remap = 0;
        for (int id = 0; id < nt; id++) {
            if (twin[id] < 0 || !step_reads(tp, &st, id)) continue;
            if (!widened[id]) { bs[nb++] = (sj_step){ SJ_STEP_CONV, twin[id] + 1 }; widened[id] = 1; }
            remap = 1;
        }
        if (remap) {
            sj_node x = *step_node(tp, &st);
            int wide_of[5];
            for (int k2 = 0; k2 < 3; k2++) {
                int id = x.in[k2];
                wide_of[k2] = id >= 0 && id < nt && twin[id] >= 0 ? tp->convs[twin[id] + 1].dst : -1;
                if (wide_of[k2] >= 0) x.in[k2] = wide_of[k2];
            }
            for (int k2 = 0; k2 < 2; k2++) {
                int id = x.out[k2];
                if (id >= 0 && id < nt && twin[id] >= 0) x.out[k2] = tp->convs[twin[id] + 1].dst;
            }
            if (st.kind == SJ_STEP_BWD) {
                int xi = add_xnode(tp, &x);
                if (xi < 0) { s = SJ_ERR_NOMEM; break; }
                st = (sj_step){ SJ_STEP_XBWD, xi };
            } else {
                tp->xnodes[st.idx] = x;
            }
        }
        bs[nb++] = st;
    }
    free(widened);
    free(last_fwd);
    if (s != SJ_OK) { free(bs); return s; }
    free(tp->bsched);
    tp->bsched = bs;
    tp->n_bsched = nb;
    return SJ_OK;
}

static int root(const sj_tape *tp, int id) {
    while (id >= 0 && tp->t[id].alias >= 0) id = tp->t[id].alias;
    return id;
}

/* dst takes src's storage if src (its root: storage may already be shared)
 * is read by nothing after time t and dst is touched by nothing before t,
 * the step at t being the one that reads src and writes dst in place. The
 * root then lives as long as either; dst points at the root, so chains
 * (a gradient sharing one that shares a third) resolve in one hop. */
static void share(sj_tape *tp, int dst, int src, int t) {
    if (dst < 0 || src < 0) return;
    src = root(tp, src);
    sj_tval *D = &tp->t[dst], *S = &tp->t[src];
    if (dst == src || D->kind != SJ_T_ACT || S->kind != SJ_T_ACT || D->alias >= 0 ||
        D->numel != S->numel || D->dtype != S->dtype || S->last > t || D->first < t)
        return;
    D->alias = src;
    if (D->last > S->last) S->last = D->last;
}

/* The step's in-place relations (sj_opinfo), on final lifetimes and accum
 * flags: forward and recompute steps may write out[0] over an input;
 * backward steps may write an input's gradient over dy (or, for the loss,
 * over the input) when they are its first writer (accumulating needs the
 * old value). */
static void share_step(sj_tape *tp, const sj_step *st, int t) {
    if (st->kind == SJ_STEP_CONV) return;
    const sj_node *n = step_node(tp, st);
    const sj_opinfo *op = &sj_ops[n->op];
    if (st->kind == SJ_STEP_FWD || st->kind == SJ_STEP_XFWD) {
        for (int k = 0; k < 3 && !tp->no_inplace; k++)
            if (op->out_on_in >> k & 1) share(tp, n->out[0], n->in[k], t);
        return;
    }
    for (int k = 0; k < 3; k++) {
        int id = n->in[k];
        if (id < 0 || tp->t[id].kind != SJ_T_ACT || tp->t[id].grad < 0 || n->accum[k]) continue;
        if ((op->grad_on_dy >> k & 1) && !tp->no_inplace)
            share(tp, tp->t[id].grad, tp->t[n->out[0]].grad, t);
        if ((op->grad_on_in >> k & 1) && tp->device)
            share(tp, tp->t[id].grad, id, t);
    }
}

/* In place, walking the schedule at the times lifetimes() gave each step. */
static void plan_in_place(sj_tape *tp) {
    int t = 0;
    for (int k = 0; k < n_fwd_steps(tp); k++, t++) {
        const sj_step st = fwd_step(tp, k);
        share_step(tp, &st, t);
    }
    for (int k = 0; k < tp->n_bsched && tp->train; k++, t++) share_step(tp, &tp->bsched[k], t);
}

/* A parameter's gradient: its elements in the flat buffer, and the time of
 * its first writer. */
typedef struct { int64_t off, numel; int first; } pgrad;

/* Node n, run at `time`, writes the gradients of its parameter inputs: it
 * adds into them unless it is the first writer of a step's own (arena)
 * gradients. New parameters are appended to pg. */
static sj_status param_writes(sj_tape *tp, sj_node *n, int time, pgrad **pg, int *np, int *cap) {
    for (int k = 0; k < 3; k++) {
        const int id = n->in[k];
        if (id < 0 || tp->t[id].kind != SJ_T_PARAM) continue;
        const int64_t off = tp->t[id].offset, numel = tp->t[id].numel;
        int seen = 0;
        for (int j = 0; j < *np && !seen; j++) {
            const pgrad *q = &(*pg)[j];
            seen = q->off == off && q->numel == numel;
            if (!seen && tp->arena_grads && q->off < off + numel && off < q->off + q->numel)
                return sj_fail(SJ_ERR_ARG, "tape plan: parameter views overlap in part");
        }
        n->accum[k] = !tp->arena_grads || seen;
        if (seen) continue;
        if (grow((void **)pg, cap, *np + 1, sizeof **pg))
            return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
        (*pg)[(*np)++] = (pgrad){ off, numel, time };
    }
    return SJ_OK;
}

/* Every write of a parameter gradient, at the times lifetimes() gave each
 * step: forward nodes that make their gradients in forward, then the
 * backward steps (recomputes and conversions write none). */
static sj_status plan_param_grads(sj_tape *tp, pgrad **pg, int *np) {
    int cap = 0, t = 0;
    *pg = NULL;
    *np = 0;
    sj_status s = SJ_OK;
    for (int k = 0; k < n_fwd_steps(tp) && s == SJ_OK; k++, t++) {
        const sj_step st = fwd_step(tp, k);
        sj_node *n = st.kind == SJ_STEP_CONV ? NULL : &tp->nodes[st.idx];
        if (n && sj_ops[n->op].fwd_grads) s = param_writes(tp, n, t, pg, np, &cap);
    }
    for (int k = 0; k < tp->n_bsched && s == SJ_OK; k++, t++) {
        const sj_step *st = &tp->bsched[k];
        if (st->kind == SJ_STEP_XFWD || st->kind == SJ_STEP_CONV) continue;
        sj_node *n = step_node(tp, st);
        if (!sj_ops[n->op].fwd_grads) s = param_writes(tp, n, t, pg, np, &cap);
    }
    if (s != SJ_OK) { free(*pg); *pg = NULL; }
    return s;
}

static int cmp_pgrad(const void *a, const void *b) {
    const pgrad *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static int64_t up256(int64_t b) { return (b + 255) & ~(int64_t)255; }

sj_status sj_tape_plan(sj_tape *tp, const sj_backend *be) {
    if (!tp->train) tp->arena_grads = 0;
    /* Gradient tensors for every differentiable activation (train only). */
    int n_fwd_t = tp->n_t;
    if (tp->train)
        for (int id = 0; id < n_fwd_t; id++) {
            if (tp->t[id].kind != SJ_T_ACT || tp->t[id].no_grad) continue;
            int g = sj_tape_tensor(tp, SJ_T_ACT, tp->t[id].numel);
            if (g < 0) return SJ_ERR_NOMEM;
            tp->t[g].no_grad = 1;
            tp->t[g].dtype = tp->t[id].dtype;
            tp->t[id].grad = g;
        }
    if (tp->train) SJ_TRY(build_schedule(tp));
    /* Lifetimes on the schedule: forward step i at time i, backward step k
     * at time (forward steps) + k (without levers: node i's backward at 2F-1-i). */
    int fwd_end = lifetimes(tp);
    if (tp->f16_act && tp->train && tp->act_dtype == SJ_F32) {
        SJ_TRY(plan_f16(tp));
        for (int id = 0; id < tp->n_t; id++) tp->t[id].first = tp->t[id].last = -1;
        fwd_end = lifetimes(tp);
    }
    /* The first backward writer of a gradient overwrites it; later ones add. */
    if (tp->train) {
        char *written = calloc((size_t)tp->n_t, 1);
        if (!written) return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
        for (int k = 0; k < tp->n_bsched; k++) {
            if (tp->bsched[k].kind == SJ_STEP_XFWD || tp->bsched[k].kind == SJ_STEP_CONV) continue;
            sj_node *n = step_node(tp, &tp->bsched[k]);
            for (int j = 0; j < 3; j++) {
                int id = n->in[j];
                if (id < 0 || tp->t[id].kind != SJ_T_ACT || tp->t[id].grad < 0) continue;
                n->accum[j] = written[tp->t[id].grad];
                written[tp->t[id].grad] = 1;
            }
        }
        free(written);
    }
    pgrad *pg = NULL;
    int n_pg = 0;
    if (tp->train) SJ_TRY(plan_param_grads(tp, &pg, &n_pg));
    /* A device backend reads the token inputs from its own memory: they get
     * arena room (int32, twice over for the embedding's sorted row order),
     * alive from the start, since they are copied in before the first node. */
    if (tp->device)
        for (int id = 0; id < tp->n_t; id++) {
            sj_tval *v = &tp->t[id];
            if (v->kind != SJ_T_EXTERN || v->first < 0) continue;
            v->staged = 1;
            v->first = 0;
        }
    plan_in_place(tp);
    /* Activation bytes alive when forward ends (what the levers shrink). */
    tp->kept_bytes = 0;
    for (int id = 0; id < tp->n_t; id++) {
        const sj_tval *v = &tp->t[id];
        if (v->kind == SJ_T_ACT && v->alias < 0 && v->first >= 0 && v->first < fwd_end &&
            v->last >= fwd_end)
            tp->kept_bytes += v->numel * (int64_t)sj_dtype_size(v->dtype);
    }
    /* A step's own parameter gradients (arena_grads) come first in the
     * arena, fixed: each parameter's bytes are busy from its first write to
     * the end of the run (the optimizer reads them), bytes that no parameter
     * of this tape writes are busy throughout (and zero). Activations fill
     * the rest of the time. */
    int n_fixed = 0;
    span *fixed = NULL, *gaps = NULL;
    int *fixed_first = NULL;
    if (tp->arena_grads) {
        qsort(pg, (size_t)n_pg, sizeof *pg, cmp_pgrad);
        fixed = malloc(sizeof(span) * (size_t)(2 * n_pg + 1));
        gaps = malloc(sizeof(span) * (size_t)(n_pg + 2));
        fixed_first = malloc(sizeof(int) * (size_t)(2 * n_pg + 1));
    }
    int n_gaps = 0;
    if (tp->arena_grads && (!fixed || !gaps || !fixed_first)) {
        free(pg); free(fixed); free(gaps); free(fixed_first);
        return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
    }
    int64_t end = 0;
    for (int j = 0; tp->arena_grads && j <= n_pg; j++) {
        const int64_t lo = j < n_pg ? pg[j].off : tp->arena_grads;
        if (lo > end) {
            gaps[n_gaps++] = (span){ end, lo };
            fixed_first[n_fixed] = 0;
            fixed[n_fixed++] = (span){ 4 * end & ~(int64_t)255, up256(4 * lo) };
        }
        if (j == n_pg) break;
        fixed_first[n_fixed] = pg[j].first;
        fixed[n_fixed++] = (span){ 4 * pg[j].off & ~(int64_t)255, up256(4 * (pg[j].off + pg[j].numel)) };
        if (pg[j].off + pg[j].numel > end) end = pg[j].off + pg[j].numel;
    }
    free(pg);
    /* Arena offsets: in some order, each tensor at the lowest address that
     * nothing alive at the same time occupies. Largest first packs plain
     * tapes tightest; around a step's gradients, whose holes open one
     * parameter at a time, longest-lived or first-made first often do
     * better. Each order is tried, and with a step's gradients each also
     * with them kept apart (busy throughout): the smallest arena is kept,
     * so sharing never costs more than the gradients' own bytes. */
    int n_act = 0;
    item *items = malloc(sizeof(item) * (size_t)tp->n_t);
    span *busy = malloc(sizeof(span) * (size_t)(tp->n_t + n_fixed));
    int64_t *off = malloc(sizeof(int64_t) * (size_t)tp->n_t);
    if (!items || !busy || !off) {
        free(items); free(busy); free(off); free(fixed); free(gaps); free(fixed_first);
        return sj_fail(SJ_ERR_NOMEM, "tape plan: out of memory");
    }
    for (int id = 0; id < tp->n_t; id++) {
        const sj_tval *v = &tp->t[id];
        if (v->first < 0 || v->alias >= 0) continue;
        int64_t bytes;
        if (v->kind == SJ_T_ACT) bytes = v->numel * (int64_t)sj_dtype_size(v->dtype);
        else if (v->staged) bytes = 2 * v->numel * 4;
        else continue;
        items[n_act++] = (item){ id, up256(bytes), v->first, v->last };
    }
    int (*const orders[])(const void *, const void *) = { by_size, by_life, by_birth };
    int64_t top = -1;
    for (int o = 0; o < (tp->arena_grads ? 6 : 3); o++) {
        const int apart = o >= 3;
        qsort(items, (size_t)n_act, sizeof *items, orders[o % 3]);
        int64_t end = up256(4 * tp->arena_grads);
        for (int a = 0; a < n_act; a++) {
            const item *v = &items[a];
            int nb = 0;
            for (int f = 0; f < n_fixed; f++)
                if (apart || fixed_first[f] <= v->last) busy[nb++] = fixed[f];
            for (int b = 0; b < a; b++) {
                const item *u = &items[b];
                if (u->first <= v->last && v->first <= u->last)
                    busy[nb++] = (span){ off[b], off[b] + u->bytes };
            }
            qsort(busy, (size_t)nb, sizeof *busy, cmp_span);
            off[a] = 0;
            for (int b = 0; b < nb; b++) {
                if (busy[b].lo >= off[a] + v->bytes) break;
                if (busy[b].hi > off[a]) off[a] = busy[b].hi;
            }
            if (off[a] + v->bytes > end) end = off[a] + v->bytes;
        }
        if (top >= 0 && end >= top) continue;
        top = end;
        for (int a = 0; a < n_act; a++) tp->t[items[a].id].offset = off[a];
    }
    free(busy); free(off);
    for (int id = 0; id < tp->n_t; id++)   /* aliases point at roots (share) */
        if (tp->t[id].alias >= 0) tp->t[id].offset = tp->t[tp->t[id].alias].offset;
    tp->arena_bytes = top;
    sj_status s = SJ_OK;
    if (tp->dry) goto done;
    if (tp->budget >= 0 && top > tp->budget) { s = SJ_ERR_NOMEM; goto done; }  /* the caller says why */
    tp->arena = be->alloc((size_t)(top ? top : 256), "activation arena");
    if (!tp->arena) { s = SJ_ERR_NOMEM; goto done; }
    if (getenv("SMEDJAN_POISON")) {  /* NaN everywhere: a stale read shows up */
        /* 0x7FC07FC0 is a NaN as one f32 and as two bf16 halves alike. */
        union { uint32_t u; float f; } nan = { 0x7FC07FC0u };
        be->fill(tp->arena, nan.f, top / 4);
    }
    for (int j = 0; j < n_gaps; j++)
        be->fill((float *)tp->arena + gaps[j].lo, 0.0f, gaps[j].hi - gaps[j].lo);
done:
    free(gaps); free(fixed); free(fixed_first); free(items);
    return s;
}

void sj_tape_census(const sj_tape *tp, int nodes[SJ_OP__COUNT], int in_place[SJ_OP__COUNT]) {
    for (int o = 0; o < SJ_OP__COUNT; o++) nodes[o] = in_place[o] = 0;
    for (int i = 0; i < tp->n_nodes; i++) nodes[tp->nodes[i].op]++;
    /* A step works in place when something it writes shares storage with
     * something it reads: its output with an input, or an input's gradient
     * with dy or the input. */
    const int nf = n_fwd_steps(tp);
    for (int k = 0; k < nf + (tp->train ? tp->n_bsched : 0); k++) {
        sj_step st = k >= nf ? tp->bsched[k - nf] : fwd_step(tp, k);
        if (st.kind == SJ_STEP_CONV) continue;
        const sj_node *n = step_node(tp, &st);
        const int fwd = st.kind == SJ_STEP_FWD || st.kind == SJ_STEP_XFWD;
        int hit = 0;
        for (int j = 0; j < 3; j++) {
            int id = n->in[j];
            if (id < 0 || tp->t[id].kind != SJ_T_ACT) continue;
            if (fwd) { hit |= root(tp, n->out[0]) == root(tp, id); continue; }
            int g = root(tp, tp->t[id].grad);
            hit |= g >= 0 && (g == root(tp, tp->t[n->out[0]].grad) || g == root(tp, id));
        }
        in_place[n->op] += hit;
    }
}

static void run_conv(sj_tape *tp, const sj_backend *be, const sj_conv *c, void *params) {
    be->convert(sj_tape_ptr(tp, c->dst, params), tp->t[c->dst].dtype,
                sj_tape_ptr(tp, c->src, params), tp->t[c->src].dtype, tp->t[c->src].numel);
}

sj_status sj_tape_forward(sj_tape *tp, const sj_backend *be, void *params) {
    for (int k = 0; k < n_fwd_steps(tp); k++) {
        if (sj_interrupted()) return sj_fail(SJ_ERR_INTERRUPTED, "interrupted");
        const sj_step st = fwd_step(tp, k);
        if (st.kind == SJ_STEP_CONV) run_conv(tp, be, &tp->convs[st.idx], params);
        else sj_op_forward(tp, &tp->nodes[st.idx], be, params);
    }
    return SJ_OK;
}

sj_status sj_tape_backward(sj_tape *tp, const sj_backend *be, void *params, float *grads) {
    tp->grads = grads;
    for (int k = 0; k < tp->n_bsched; k++) {
        if (sj_interrupted()) return sj_fail(SJ_ERR_INTERRUPTED, "interrupted");
        const sj_step *st = &tp->bsched[k];
        if (st->kind == SJ_STEP_CONV) run_conv(tp, be, &tp->convs[st->idx], params);
        else if (st->kind == SJ_STEP_XFWD) sj_op_forward(tp, &tp->xnodes[st->idx], be, params);
        else sj_op_backward(tp, st->kind == SJ_STEP_BWD ? &tp->nodes[st->idx]
                                                        : &tp->xnodes[st->idx], be, params, grads);
    }
    return SJ_OK;
}
