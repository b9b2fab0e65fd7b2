/* optim.c — the learning-rate schedule, global-norm clipping and the
 * update rules (AdamW, Lion, SGD, Adafactor, Muon) over the model's flat
 * buffers, and the fused train step. The rules run per segment: a run of
 * adjacent tensors with one rule and the same settings (AdamW, Lion, SGD),
 * or one tensor (Adafactor's per-tensor statistics, Muon's matrices). On
 * a device backend the whole step (inputs in, forward, losses out,
 * backward, norm, clip, update, norm out) is captured once per (B, T) as a
 * graph and replayed; the scalars that change per step travel through
 * pinned memory that the graph's copy nodes read at replay time. The
 * elementwise state is stored f32, bf16 or 8-bit (ops/ostate.h): one
 * allocation, each state buffer's part 256-byte aligned. */
#include "../model/model.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_STATES = 3 };

typedef struct {
    sj_optim_kind rule;
    int64_t offset, numel;       /* into the flat parameters */
    int64_t rows, cols;          /* one tensor's shape; cols 0: a vector */
    float lr_mult, weight_decay;
    float ratio;                 /* Muon: its lr adjustment for the shape */
    int64_t s0, s1;              /* into the state (-1: none) */
} segment;

/* Where each rule keeps its state: the kind's buffers (names in order) and
 * which of them a tensor's rule uses. The elements of all buffers are
 * numbered in order (segment.s0, .s1 and bf16 rounding's counter). */
typedef struct {
    const char *names[MAX_STATES];
    int64_t len[MAX_STATES];     /* elements (8-bit: each tensor's padded to whole blocks) */
    sj_state_dtype dtype;        /* of every buffer */
    int64_t first[MAX_STATES];   /* a buffer's first element's number */
    int64_t data_at[MAX_STATES], scale_at[MAX_STATES];   /* byte offsets; scales: 8-bit */
    int64_t bytes;               /* the whole state */
    int64_t max_matrix, max_gram;   /* Muon: the largest matrix and Gram matrix */
    int64_t max_rows;            /* Adafactor: the most rows of a matrix */
    int sums;                    /* the rule reduces per tensor (Adafactor, Muon) */
} state_plan;

struct sj_optimizer {
    sj_model *model;
    sj_train_config tc;
    segment *segs; int n_segs;
    state_plan plan;
    char *state;                 /* every state buffer, one after another (plan.bytes) */
    char names[2 * MAX_STATES][32];   /* the exposed buffers' names */
    void *scratch;               /* Muon's iterates, the reductions' sums */
    double *sums;
    float *u; void *x, *y, *gram, *gram2;
    int64_t step;     /* optimizer steps taken */
    const sj_backend *be;   /* where the state lives */
    int64_t epoch;          /* the model's epoch it was made for */
    sj_skip_state skips;    /* updates not made, and the last step's outcome */
};

float sj_lr_at(const sj_train_config *tc, int64_t step) {
    float lo = tc->min_lr, hi = tc->max_lr;
    if (step < tc->warmup_steps) return lo + (hi - lo) * (float)step / (float)tc->warmup_steps;
    int64_t decay = (int64_t)tc->total_steps - 1 - tc->warmup_steps;
    if (decay <= 0) return step >= tc->total_steps - 1 && tc->total_steps > 0 ? lo : hi;
    if (step >= tc->total_steps - 1) return lo;
    double progress = (double)(step - tc->warmup_steps) / (double)decay;
    return (float)(lo + 0.5 * (hi - lo) * (1.0 + cos(M_PI * progress)));
}

static sj_status check(const sj_train_config *tc) {
    #define NEED(cond, ...) do { if (!(cond)) return sj_fail(SJ_ERR_ARG, __VA_ARGS__); } while (0)
    #define FINITE_GE0(x, name) NEED((x) >= 0 && isfinite(x), \
        name " must be a finite number >= 0, got %g", (double)(x))
    /* Written so that NaN fails every test: a comparison with NaN is false. */
    NEED(tc->max_lr >= 0 && isfinite(tc->max_lr), "lr must be a finite number >= 0, got %g",
         (double)tc->max_lr);
    NEED(tc->min_lr >= 0 && tc->min_lr <= tc->max_lr, "min_lr must be in [0, lr], got %g",
         (double)tc->min_lr);
    NEED(tc->warmup_steps >= 0, "warmup must be >= 0, got %d", tc->warmup_steps);
    NEED(tc->total_steps >= 1, "steps must be >= 1, got %d", tc->total_steps);
    /* A longer warm-up never reaches lr and never decays: a typo, not a schedule. */
    NEED(tc->warmup_steps <= tc->total_steps, "warmup (%d) must be <= steps (%d)",
         tc->warmup_steps, tc->total_steps);
    FINITE_GE0(tc->weight_decay, "weight_decay");
    /* 0 turns clipping off (clip > 0 scales); a negative or NaN one would
     * silently do the same, and an infinite one is "off" spelled oddly. */
    NEED(tc->clip >= 0 && isfinite(tc->clip),
         "clip must be a finite number >= 0 (0: no clipping), got %g", (double)tc->clip);
    const sj_optim_kind k = tc->kind;
    NEED(k >= 0 && k < SJ_OPTIM__COUNT, "unknown optimizer kind %d", (int)k);
    NEED(tc->state_dtype >= 0 && tc->state_dtype < SJ_STATE__COUNT,
         "unknown optimizer state dtype %d", (int)tc->state_dtype);
    /* Muon's own eps is its Newton-Schulz floor; its AdamW part's are adamw_*. */
    const char *aux = k == SJ_OPTIM_MUON ? "adamw_" : "";
    if (k == SJ_OPTIM_ADAMW || k == SJ_OPTIM_LION || k == SJ_OPTIM_MUON)
        NEED(tc->beta1 >= 0 && tc->beta1 < 1 && tc->beta2 >= 0 && tc->beta2 < 1,
             "%sbetas must be in [0, 1), got (%g, %g)", aux, tc->beta1, tc->beta2);
    if (k == SJ_OPTIM_ADAMW || k == SJ_OPTIM_MUON)
        NEED(tc->eps > 0 && isfinite(tc->eps), "%seps must be a finite number > 0, got %g",
             aux, (double)tc->eps);
    if (k == SJ_OPTIM_SGD || k == SJ_OPTIM_MUON) {
        NEED(tc->momentum >= 0 && tc->momentum < 1, "momentum must be in [0, 1), got %g",
             tc->momentum);
        NEED(tc->dampening >= 0 && tc->dampening <= 1, "dampening must be in [0, 1], got %g",
             tc->dampening);
        /* torch.optim.SGD's rule: Nesterov needs momentum and no dampening. */
        NEED(!tc->nesterov || k == SJ_OPTIM_MUON || (tc->momentum > 0 && tc->dampening == 0),
             "nesterov needs momentum > 0 and dampening 0, got momentum %g, dampening %g",
             tc->momentum, tc->dampening);
    }
    if (k == SJ_OPTIM_ADAFACTOR) {
        NEED(tc->beta2_decay <= 0 && isfinite(tc->beta2_decay),
             "beta2_decay must be a finite number <= 0, got %g", (double)tc->beta2_decay);
        FINITE_GE0(tc->eps, "eps[0] (eps1)");
        FINITE_GE0(tc->eps2, "eps[1] (eps2)");
        NEED(tc->d >= 1 && isfinite(tc->d), "d must be a finite number >= 1, got %g",
             (double)tc->d);
    }
    if (k == SJ_OPTIM_MUON) {
        NEED(tc->ns_steps >= 1 && tc->ns_steps < 100, "ns_steps must be in [1, 100), got %d",
             tc->ns_steps);
        NEED(isfinite(tc->ns_a) && isfinite(tc->ns_b) && isfinite(tc->ns_c),
             "ns_coefficients must be finite, got (%g, %g, %g)", (double)tc->ns_a,
             (double)tc->ns_b, (double)tc->ns_c);
        FINITE_GE0(tc->ns_eps, "eps (the Newton-Schulz floor)");
        FINITE_GE0(tc->adamw_lr, "adamw_lr");
    }
    return SJ_OK;
    #undef FINITE_GE0
    #undef NEED
}

/* Muon's matrices are the hidden 2-D weights; the embedding and the head
 * (rows of the vocabulary) take AdamW, as the Muon reference routes them. */
static sj_optim_kind rule_of(const sj_train_config *tc, const sj_tensor_info *t) {
    if (tc->kind != SJ_OPTIM_MUON) return tc->kind;
    return t->ndim == 2 && strcmp(t->name, "tok_emb") && strcmp(t->name, "lm_head")
           ? SJ_OPTIM_MUON : SJ_OPTIM_ADAMW;
}

/* Adafactor's statistics are O(rows + cols) a matrix: f32 whatever is asked. */
static sj_state_dtype stored_dtype(const sj_train_config *tc) {
    return tc->kind == SJ_OPTIM_ADAFACTOR ? SJ_STATE_F32 : tc->state_dtype;
}

static int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Which state buffers (of the kind's, in order) a tensor uses, and how
 * many elements in each (8-bit: whole blocks, so that a range's blocks
 * are its own). */
static void tensor_state(const sj_train_config *tc, const sj_tensor_info *t, int slot[2],
                         int64_t len[2]) {
    const int matrix = t->ndim == 2;
    slot[0] = slot[1] = -1;
    len[0] = len[1] = t->numel;
    switch (rule_of(tc, t)) {
    case SJ_OPTIM_ADAMW:
        slot[0] = tc->kind == SJ_OPTIM_MUON ? 1 : 0;
        slot[1] = slot[0] + 1;
        break;
    case SJ_OPTIM_LION: slot[0] = 0; break;
    case SJ_OPTIM_SGD: if (tc->momentum > 0) slot[0] = 0; break;
    case SJ_OPTIM_ADAFACTOR:
        if (matrix) { slot[0] = 0; slot[1] = 1; len[0] = t->shape[0]; len[1] = t->shape[1]; }
        else slot[0] = 2;
        break;
    case SJ_OPTIM_MUON: slot[0] = 0; break;
    default: break;
    }
    if (stored_dtype(tc) == SJ_STATE_Q8)
        for (int k = 0; k < 2; k++) len[k] = round_up(len[k], SJ_Q8_BLOCK);
}

static int64_t align256(int64_t bytes) { return (bytes + 255) & ~(int64_t)255; }
static const int64_t ELEMENT_BYTES[SJ_STATE__COUNT] = { 4, 2, 1 };

static const char *const STATE_NAMES[SJ_OPTIM__COUNT][MAX_STATES] = {
    [SJ_OPTIM_ADAMW] = {"exp_avg", "exp_avg_sq"},
    [SJ_OPTIM_LION] = {"exp_avg"},
    [SJ_OPTIM_SGD] = {"momentum_buffer"},
    [SJ_OPTIM_ADAFACTOR] = {"row_var", "col_var", "variance"},
    [SJ_OPTIM_MUON] = {"momentum_buffer", "exp_avg", "exp_avg_sq"},
};

/* The state's buffers for a model, and, with segs, the segments with their
 * state offsets (segs: room for one per tensor). */
static void lay_out(const sj_model *m, const sj_train_config *tc, const sj_param_group *groups,
                    state_plan *sp, segment *segs, int *n_segs) {
    memset(sp, 0, sizeof *sp);
    for (int k = 0; k < MAX_STATES; k++) sp->names[k] = STATE_NAMES[tc->kind][k];
    sp->dtype = stored_dtype(tc);
    sp->sums = tc->kind == SJ_OPTIM_ADAFACTOR || tc->kind == SJ_OPTIM_MUON;
    int slot[2];
    int64_t len[2];
    for (int i = 0; i < m->n_tensors; i++) {
        const sj_tensor_info *t = &m->tensors[i];
        tensor_state(tc, t, slot, len);
        for (int k = 0; k < 2; k++) if (slot[k] >= 0) sp->len[slot[k]] += len[k];
        if (rule_of(tc, t) == SJ_OPTIM_ADAFACTOR && t->ndim == 2)
            sp->max_rows = SJ_MAX(sp->max_rows, t->shape[0]);
        if (rule_of(tc, t) == SJ_OPTIM_MUON) {
            const int64_t small = SJ_MIN(t->shape[0], t->shape[1]);
            sp->max_matrix = SJ_MAX(sp->max_matrix, t->numel);
            sp->max_gram = SJ_MAX(sp->max_gram, small * small);
        }
    }
    int64_t first = 0;
    for (int k = 0; k < MAX_STATES; first += sp->len[k++]) {
        sp->first[k] = first;
        sp->data_at[k] = sp->bytes;
        sp->bytes += align256(ELEMENT_BYTES[sp->dtype] * sp->len[k]);
        sp->scale_at[k] = sp->bytes;
        if (sp->dtype == SJ_STATE_Q8) sp->bytes += align256(4 * (sp->len[k] / SJ_Q8_BLOCK));
    }
    if (!segs) return;
    int64_t next[MAX_STATES];
    for (int k = 0; k < MAX_STATES; k++) next[k] = sp->first[k];
    const float adamw_mult = tc->kind == SJ_OPTIM_MUON && tc->max_lr > 0
                             ? tc->adamw_lr / tc->max_lr : 1.0f;
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const sj_tensor_info *t = &m->tensors[i];
        tensor_state(tc, t, slot, len);
        segment sg = { rule_of(tc, t), t->offset, t->numel, t->shape[0],
                       t->ndim == 2 ? t->shape[1] : 0,
                       groups ? groups[i].lr_mult : 1.0f,
                       groups ? groups[i].weight_decay : t->decay ? tc->weight_decay : 0.0f,
                       1.0f, -1, -1 };
        int64_t *at[2] = { &sg.s0, &sg.s1 };
        for (int k = 0; k < 2; k++)
            if (slot[k] >= 0) { *at[k] = next[slot[k]]; next[slot[k]] += len[k]; }
        if (sg.rule == SJ_OPTIM_ADAMW && tc->kind == SJ_OPTIM_MUON) sg.lr_mult *= adamw_mult;
        if (sg.rule == SJ_OPTIM_MUON) {
            const double a = (double)sg.rows, b = (double)sg.cols;
            sg.ratio = (float)(tc->match_rms_adamw ? 0.2 * sqrt(fmax(a, b)) : sqrt(fmax(1.0, a / b)));
        }
        /* Elementwise rules run adjacent tensors with the same settings as one. */
        segment *prev = n ? &segs[n - 1] : NULL;
        const int elementwise = sg.rule == SJ_OPTIM_ADAMW || sg.rule == SJ_OPTIM_LION ||
                                sg.rule == SJ_OPTIM_SGD;
        if (elementwise && prev && prev->rule == sg.rule &&
            prev->offset + prev->numel == sg.offset && prev->lr_mult == sg.lr_mult &&
            prev->weight_decay == sg.weight_decay &&
            (sg.s0 < 0 || prev->s0 + prev->numel == sg.s0) &&
            (sg.s1 < 0 || prev->s1 + prev->numel == sg.s1)) {
            prev->numel += sg.numel;
            prev->rows = prev->numel;
            prev->cols = 0;
            continue;
        }
        segs[n++] = sg;
    }
    *n_segs = n;
}

/* The scratch, each part 256-byte aligned: the reductions' sums (doubles:
 * Muon's norm; Adafactor's 3 sums and per-row partials), then Muon's u
 * (f32), x, y (act, its largest matrix), gram, gram2 (act, Gram matrices). */
static int64_t scratch_bytes(const state_plan *sp, sj_dtype act) {
    const int64_t a = (int64_t)sj_dtype_size(act);
    if (!sp->sums) return 0;
    return align256(8 * (4 + sp->max_rows)) + align256(4 * sp->max_matrix) +
           2 * align256(a * sp->max_matrix) + 2 * align256(a * sp->max_gram);
}

sj_status sj_optimizer_plan_bytes(const sj_model *m, const sj_train_config *tc, int64_t *bytes) {
    SJ_TRY(check(tc));
    state_plan sp;
    lay_out(m, tc, NULL, &sp, NULL, NULL);
    *bytes = sp.bytes + scratch_bytes(&sp, m->be->act_dtype);
    return SJ_OK;
}

static int64_t held_bytes(const sj_optimizer *o, sj_dtype act) {
    return o->plan.bytes + scratch_bytes(&o->plan, act);
}

static sj_status alloc_state(sj_optimizer *o) {
    sj_model *m = o->model;
    const sj_backend *be = m->be;
    const int64_t sb = scratch_bytes(&o->plan, be->act_dtype);
    /* (backends give a small block for 0 bytes: SGD without momentum has no state) */
    o->state = be->alloc((size_t)o->plan.bytes, "optimizer state");
    o->scratch = o->state ? be->alloc((size_t)sb, "optimizer scratch") : NULL;
    if (!o->scratch) {
        if (o->state) be->free(o->state);
        o->state = NULL;
        return SJ_ERR_NOMEM;
    }
    const int64_t a = (int64_t)sj_dtype_size(be->act_dtype), mm = o->plan.max_matrix,
                  mg = o->plan.max_gram;
    char *c = o->scratch;
    o->sums = (double *)c;        c += align256(8 * (4 + o->plan.max_rows));
    o->u = (float *)c;            c += align256(4 * mm);
    o->x = c;                     c += align256(a * mm);
    o->y = c;                     c += align256(a * mm);
    o->gram = c;                  c += align256(a * mg);
    o->gram2 = c;
    o->be = be;
    o->epoch = m->epoch;
    sj_model_account(m, held_bytes(o, be->act_dtype));
    return SJ_OK;
}

static void free_state(sj_optimizer *o) {
    if (!o->state) return;
    sj_model_account(o->model, -held_bytes(o, o->be->act_dtype));
    o->be->free(o->state);
    o->be->free(o->scratch);
    o->state = NULL;
    o->scratch = NULL;
}

/* After the model moved (sj_model_to), the state follows it. */
static sj_status follow_model(sj_optimizer *o) {
    sj_model *m = o->model;
    if (o->epoch == m->epoch) return SJ_OK;
    const size_t bytes = (size_t)o->plan.bytes;
    /* Checked before the old state goes: a refusal leaves it usable. */
    SJ_TRY(sj_model_check_memory(m, SJ_DEVICE_CPU, (int64_t)bytes, 0,
                                 "the optimizer state's host staging"));
    if (o->be->device != m->be->device)
        SJ_TRY(sj_model_check_memory(m, m->device, held_bytes(o, m->be->act_dtype), 0,
                                     "the optimizer state"));
    char *hs = sj_alloc(bytes + sizeof(float), "optimizer state (host staging)");
    if (!hs) return SJ_ERR_NOMEM;
    o->be->to_host(hs, o->state, bytes);
    free_state(o);
    sj_status s = alloc_state(o);
    if (s == SJ_OK) {
        m->be->bind(m->ctx);
        m->be->from_host(o->state, hs, bytes);
        s = m->be->sync();
    }
    sj_free(hs);
    return s;
}

static void name_states(sj_optimizer *o);

sj_status sj_optimizer_create(sj_model *m, const sj_train_config *tc,
                              const sj_param_group *groups, sj_optimizer **out) {
    *out = NULL;
    SJ_TRY(check(tc));
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    for (int i = 0; groups && i < m->n_tensors; i++)
        if (!(groups[i].lr_mult >= 0 && isfinite(groups[i].lr_mult) &&
              groups[i].weight_decay >= 0 && isfinite(groups[i].weight_decay)))
            return sj_fail(SJ_ERR_ARG, "tensor '%s': lr_mult and weight_decay must be finite "
                           "numbers >= 0, got %g and %g", m->tensors[i].name,
                           (double)groups[i].lr_mult, (double)groups[i].weight_decay);
    sj_optimizer *o = calloc(1, sizeof *o);
    segment *segs = calloc((size_t)m->n_tensors, sizeof *segs);
    if (!o || !segs) {
        free(o); free(segs);
        return sj_fail(SJ_ERR_NOMEM, "optimizer: out of memory");
    }
    o->model = m;
    o->tc = *tc;
    o->segs = segs;
    lay_out(m, tc, groups, &o->plan, segs, &o->n_segs);
    name_states(o);
    /* Planned like activations, before anything is allocated: the state,
     * and what training brings besides (the gradients, held or in a step's
     * arena, and a 16-bit model's compute copy). The activation arena is
     * checked at the first step, when its shape is known. */
    const int64_t n = m->n_params;
    const int64_t want = held_bytes(o, m->be->act_dtype) + (m->grads ? 0 : 4 * n) +
                         (m->be->act_dtype != SJ_F32 && !m->params_act
                          ? (int64_t)sj_dtype_size(m->be->act_dtype) * n : 0);
    static const char *const NAMES[SJ_OPTIM__COUNT] = { "AdamW", "Lion", "SGD", "Adafactor",
                                                         "Muon" };
    static const char *const DTYPES[SJ_STATE__COUNT] = { "", "bf16, ", "8-bit, " };
    char what[160];
    snprintf(what, sizeof what, "a Trainer's %s state (%s%lld bytes) with the gradients and "
             "compute copy it brings", NAMES[tc->kind], DTYPES[o->plan.dtype],
             (long long)held_bytes(o, m->be->act_dtype));
    sj_status s = sj_model_check_memory(m, m->device, want, 1, what);
    if (s == SJ_OK && alloc_state(o) != SJ_OK) s = SJ_ERR_NOMEM;
    if (s != SJ_OK) { free(segs); free(o); return s; }
    m->be->bind(m->ctx);
    /* zero bits: zero in every dtype (8-bit: a zero absmax scales any code to 0) */
    m->be->fill((float *)o->state, 0.0f, o->plan.bytes / 4);
    s = m->be->sync();
    if (s != SJ_OK) { sj_optimizer_free(o); return s; }
    *out = o;
    return SJ_OK;
}

void sj_optimizer_free(sj_optimizer *o) {
    if (!o) return;
    /* Graphs captured for this optimizer must not outlive its state. */
    for (int i = 0; i < SJ_MAX_PLANS; i++) {
        sj_plan *pl = &o->model->plans[i];
        if (pl->used && pl->graph && pl->graph_opt == o) {
            o->model->be->graph_free(pl->graph);
            pl->graph = NULL;
            pl->graph_opt = NULL;
        }
    }
    free_state(o);
    free(o->segs);
    free(o);
}

int64_t sj_optimizer_step_count(const sj_optimizer *o) { return o->step; }
void sj_optimizer_skip_state(const sj_optimizer *o, sj_skip_state *out) { *out = o->skips; }
sj_status sj_optimizer_set_skips(sj_optimizer *o, int64_t skipped_steps, int64_t skip_run) {
    if (skipped_steps < 0 || skip_run < 0 || skip_run > skipped_steps)
        return sj_fail(SJ_ERR_ARG, "skip counts must satisfy 0 <= run <= total, got %lld, %lld",
                       (long long)skip_run, (long long)skipped_steps);
    o->skips.skipped_steps = skipped_steps;
    o->skips.skip_run = skip_run;
    return SJ_OK;
}
void sj_optimizer_set_step(sj_optimizer *o, int64_t step) { o->step = step; }

/* The which-th exposed buffer: the slot of a state buffer that holds
 * anything, and the part (8-bit: 0 the codes, 1 the scales); -1 if none. */
static int nth_state(const sj_optimizer *o, int which, int *part) {
    const int parts = o->plan.dtype == SJ_STATE_Q8 ? 2 : 1;
    if (which < 0) return -1;
    for (int k = 0; k < MAX_STATES; k++)
        if (o->plan.len[k] > 0) {
            if (which < parts) { *part = which; return k; }
            which -= parts;
        }
    return -1;
}

int sj_optimizer_n_states(const sj_optimizer *o) {
    int n = 0, part;
    while (nth_state(o, n, &part) >= 0) n++;
    return n;
}

const char *sj_optimizer_state_name(const sj_optimizer *o, int which) {
    return which >= 0 && which < sj_optimizer_n_states(o) ? o->names[which] : NULL;
}

static void name_states(sj_optimizer *o) {
    int part;
    for (int i = 0, k; (k = nth_state(o, i, &part)) >= 0; i++)
        snprintf(o->names[i], sizeof o->names[i], "%s%s", o->plan.names[k],
                 o->plan.dtype != SJ_STATE_Q8 ? "" : part ? ".scale" : ".q8");
}

void *sj_optimizer_state(sj_optimizer *o, int which, sj_dtype *dtype, int64_t *n) {
    int part;
    const int k = nth_state(o, which, &part);
    if (k < 0) {
        sj_fail(SJ_ERR_ARG, "optimizer state %d out of range [0, %d)", which,
                sj_optimizer_n_states(o));
        return NULL;
    }
    static const sj_dtype STORED[SJ_STATE__COUNT] = { SJ_F32, SJ_BF16, SJ_U8 };
    const int scales = o->plan.dtype == SJ_STATE_Q8 && part == 1;
    if (dtype) *dtype = scales ? SJ_F32 : STORED[o->plan.dtype];
    if (n) *n = scales ? o->plan.len[k] / SJ_Q8_BLOCK : o->plan.len[k];
    if (follow_model(o) != SJ_OK) return NULL;
    return o->state + (scales ? o->plan.scale_at[k] : o->plan.data_at[k]);
}

/* A segment's range of state buffer element `at` (-1: none) as its kernel sees it. */
static sj_state state_ref(const sj_optimizer *o, int64_t at) {
    sj_state st = { NULL, NULL, o->plan.dtype, 0, at };
    if (at < 0) return st;
    int k = MAX_STATES - 1;
    while (at < o->plan.first[k] || o->plan.len[k] == 0) k--;
    const int64_t e = at - o->plan.first[k];
    st.data = o->state + o->plan.data_at[k] + ELEMENT_BYTES[o->plan.dtype] * e;
    st.absmax = (float *)(o->state + o->plan.scale_at[k]) + e / SJ_Q8_BLOCK;
    st.q8_signed = strcmp(o->plan.names[k], "exp_avg_sq") != 0;   /* second moments are >= 0 */
    return st;
}

/* This step's hyper-parameters into the pinned `in` scalars. */
static float set_hp(sj_optimizer *o) {
    const sj_train_config *tc = &o->tc;
    sj_optim_hp *hp = &o->model->scalars_host[0].hp;
    float rate = sj_lr_at(tc, o->step);
    *hp = (sj_optim_hp){ rate, (float)tc->beta1, (float)tc->beta2, tc->eps, tc->clip,
                         (float)tc->momentum, (float)tc->dampening,
                         (float)(1.0 - tc->beta1), (float)(1.0 - tc->beta2),
                         (float)(1.0 - tc->momentum), (float)(1.0 - tc->dampening),
                         tc->nesterov, tc->beta2_decay, tc->eps2, tc->d, tc->state_seed,
                         o->step + 1, 0.0 };
    return rate;
}

/* Muon on one matrix (rows, cols): momentum, then the Newton-Schulz
 * iterations X <- a X + (b G + c G G) X with G = X X^T, in the backend's
 * compute dtype; a tall matrix works on X^T without moving it (G = X^T X,
 * X <- a X + X (b G + c G G)^T), as torch transposes it. */
static void muon_matrix(sj_optimizer *o, const segment *sg, float *g, int zero_grads,
                        const sj_optim_hp *hp) {
    sj_model *md = o->model;
    const sj_backend *be = md->be;
    const sj_train_config *tc = &o->tc;
    const int R = (int)sg->rows, C = (int)sg->cols, tall = R > C, s = tall ? C : R;
    const int64_t n = sg->numel;
    be->muon_momentum(o->u, state_ref(o, sg->s0), g + sg->offset, zero_grads, n, hp);
    be->sumsq(o->sums, o->u, n);
    be->muon_normalize(o->x, o->u, n, o->sums, tc->ns_eps);
    for (int it = 0; it < tc->ns_steps; it++) {
        if (tall) sj_matmul(be, o->gram, o->x, o->x, s, s, R, 1, 0, 0, 0);
        else sj_matmul(be, o->gram, o->x, o->x, s, s, C, 0, 1, 0, 0);
        sj_matmul(be, o->gram2, o->gram, o->gram, s, s, s, 0, 0, 0, 0);
        be->copy(o->gram2, o->gram2, (int64_t)s * s, tc->ns_c, 0);
        be->add(o->gram2, o->gram2, o->gram, (int64_t)s * s, tc->ns_b);
        if (tall) sj_matmul(be, o->y, o->x, o->gram2, R, C, C, 0, 1, 0, 0);
        else sj_matmul(be, o->y, o->gram2, o->x, R, C, R, 0, 0, 0, 0);
        be->add(o->x, o->y, o->x, n, tc->ns_a);
    }
    void *p_act = md->params_act == md->params ? NULL
                  : (char *)md->params_act + sg->offset * (int64_t)sj_dtype_size(be->act_dtype);
    be->muon_apply(md->params + sg->offset, p_act, o->x, n, sg->lr_mult, sg->ratio,
                   sg->weight_decay, hp);
}

/* Norm, clip and the update over the gradients g on the bound context
 * (capturable): scalars in, the global squared norm back out. The model's
 * own gradients are zeroed after; a step's own (in its arena) die with it. */
static void enqueue_update(sj_optimizer *o, float *g) {
    sj_model *md = o->model;
    const sj_backend *be = md->be;
    const sj_optim_hp *hp = &md->scalars->hp;
    const int zero = g == md->grads;
    const size_t act = sj_dtype_size(be->act_dtype);
    be->from_host_async(&md->scalars->hp, &md->scalars_host[0].hp, sizeof(sj_optim_hp));
    be->sumsq(&md->scalars->hp.sumsq, g, md->n_params);
    for (int i = 0; i < o->n_segs; i++) {
        const segment *sg = &o->segs[i];
        float *p = md->params + sg->offset, *gs = g + sg->offset;
        const sj_state s0 = state_ref(o, sg->s0), s1 = state_ref(o, sg->s1);
        void *pa = md->params_act == md->params ? NULL
                   : (char *)md->params_act + sg->offset * (int64_t)act;
        switch (sg->rule) {
        case SJ_OPTIM_ADAMW:
            be->adamw(p, pa, gs, zero, s0, s1, sg->numel, sg->lr_mult, sg->weight_decay, hp);
            break;
        case SJ_OPTIM_LION:
            be->lion(p, pa, gs, zero, s0, sg->numel, sg->lr_mult, sg->weight_decay, hp);
            break;
        case SJ_OPTIM_SGD:
            be->sgd(p, pa, gs, zero, s0, sg->numel, sg->lr_mult, sg->weight_decay, hp);
            break;
        case SJ_OPTIM_ADAFACTOR:
            be->adafactor(p, pa, gs, zero, s0.data, s1.data, sg->rows, sg->cols, sg->lr_mult,
                          sg->weight_decay, o->sums, hp);
            break;
        case SJ_OPTIM_MUON: muon_matrix(o, sg, g, zero, hp); break;
        default: break;
        }
    }
    be->to_host_async(&md->scalars_host[1].hp.sumsq, &md->scalars->hp.sumsq, sizeof(double));
}

/* After the work completed: report, and count the step, or the skip when
 * a non-finite norm skipped the update (weights, moments and step count
 * as they were; the gradients dropped). */
static void finish_update(sj_optimizer *o, float rate, float *grad_norm, float *lr) {
    double norm = sqrt(o->model->scalars_host[1].hp.sumsq);
    if (grad_norm) *grad_norm = (float)norm;
    if (lr) *lr = rate;
    o->skips.skipped = !isfinite(norm);
    if (o->skips.skipped) {
        o->skips.skipped_steps++;
        o->skips.skip_run++;
    } else {
        o->step++;
        o->skips.skip_run = 0;
    }
}

sj_status sj_optimizer_step(sj_optimizer *o, float *grad_norm, float *lr) {
    sj_model *md = o->model;
    if (!md->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    SJ_TRY(sj_model_need_grads(md));   /* a step before any backward sees zeros */
    SJ_TRY(follow_model(o));
    float rate = set_hp(o);
    o->skips.tokens = -1;   /* the gradients' batches are not known here */
    md->be->bind(md->ctx);
    enqueue_update(o, md->grads);
    SJ_TRY(md->be->sync());
    finish_update(o, rate, grad_norm, lr);
    return SJ_OK;
}

/* Capture the whole step into the plan's graph. */
typedef struct { sj_optimizer *o; sj_plan *pl; } step_ctx;
static void update_after(void *arg) {
    const step_ctx *c = arg;
    enqueue_update(c->o, c->pl->tape.grads);
}

static sj_status capture(sj_optimizer *o, sj_plan *pl) {
    step_ctx c = { o, pl };
    SJ_TRY(sj_model_capture(o->model, pl, update_after, &c));
    pl->graph_opt = o;
    return SJ_OK;
}

sj_status sj_train_step(sj_optimizer *o, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T,
                        float *loss, float *grad_norm, float *lr) {
    sj_model *md = o->model;
    const sj_backend *be = md->be;
    SJ_TRY(follow_model(o));
    /* Gradients the model already holds are added to, as a backward would;
     * otherwise this step's live in its arena and die with it. */
    sj_plan *pl;
    int64_t count;
    SJ_TRY(sj_model_prepare(md, tokens, targets, tok_dtype, B, T, -1,
                            md->grads ? SJ_RUN_TRAIN : SJ_RUN_STEP, 0, &pl, &count));
    float rate = set_hp(o);
    o->skips.tokens = count;
    if (count == 0) {
        /* Every target ignored: no signal. Nothing runs and nothing moves
         * (AdamW would decay the weights and replay its momentum on no
         * data); the loss is the sum over no tokens. */
        *loss = 0.0f;
        if (grad_norm) *grad_norm = 0.0f;
        if (lr) *lr = rate;
        o->skips.skipped = 1;
        o->skips.skipped_steps++;
        return SJ_OK;
    }
    be->bind(md->ctx);
    sj_status s;
    if (md->use_graphs && pl->eager_steps > 0) {
        if (!pl->graph || pl->graph_opt != o || pl->graph_epoch != md->epoch)
            SJ_TRY(capture(o, pl));
        s = be->graph_launch(pl->graph);
    } else {
        pl->eager_steps++;
        s = sj_model_enqueue(md, pl);
        if (s == SJ_OK) enqueue_update(o, pl->tape.grads);
    }
    if (s == SJ_OK) s = be->sync();
    if (s != SJ_OK) return s;
    *loss = sj_model_mean_loss(md, pl, count);
    finish_update(o, rate, grad_norm, lr);
    return SJ_OK;
}
