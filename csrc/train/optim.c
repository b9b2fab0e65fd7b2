/* optim.c — the learning-rate schedule, global-norm clipping and AdamW
 * over the model's flat buffers, and the fused train step. On a device
 * backend the whole step (inputs in, forward, losses out, backward, norm,
 * clip, AdamW, norm out) is captured once per (B, T) as a graph and
 * replayed; the scalars that change per step travel through pinned memory
 * that the graph's copy nodes read at replay time. */
#include "../model/model.h"
#include <math.h>
#include <stdlib.h>

struct sj_optimizer {
    sj_model *model;
    sj_train_config tc;
    float *m, *v;     /* AdamW moments, one per parameter */
    int64_t step;     /* optimizer steps taken */
    const sj_backend *be;   /* where m and v live */
    int64_t epoch;          /* the model's epoch they were made for */
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
    NEED(tc->beta1 >= 0 && tc->beta1 < 1 && tc->beta2 >= 0 && tc->beta2 < 1,
         "betas must be in [0, 1), got (%g, %g)", (double)tc->beta1, (double)tc->beta2);
    NEED(tc->eps > 0 && isfinite(tc->eps), "eps must be a finite number > 0, got %g",
         (double)tc->eps);
    NEED(tc->weight_decay >= 0 && isfinite(tc->weight_decay),
         "weight_decay must be a finite number >= 0, got %g", (double)tc->weight_decay);
    /* 0 turns clipping off (adamw: clip > 0 scales); a negative or NaN one
     * would silently do the same, and an infinite one is "off" spelled oddly. */
    NEED(tc->clip >= 0 && isfinite(tc->clip),
         "clip must be a finite number >= 0 (0: no clipping), got %g", (double)tc->clip);
    return SJ_OK;
    #undef NEED
}

static sj_status alloc_moments(sj_optimizer *o) {
    sj_model *m = o->model;
    const sj_backend *be = m->be;
    const size_t bytes = sizeof(float) * (size_t)m->n_params;
    o->m = be->alloc(bytes, "AdamW first moment");
    o->v = o->m ? be->alloc(bytes, "AdamW second moment") : NULL;
    if (!o->v) {
        if (o->m) be->free(o->m);
        o->m = NULL;
        return SJ_ERR_NOMEM;
    }
    o->be = be;
    o->epoch = m->epoch;
    sj_model_account(m, 2 * (int64_t)bytes);
    return SJ_OK;
}

static void free_moments(sj_optimizer *o) {
    if (!o->m) return;
    o->be->free(o->m);
    o->be->free(o->v);
    o->m = o->v = NULL;
    sj_model_account(o->model, -8 * o->model->n_params);
}

/* After the model moved (sj_model_to), the moments follow it. */
static sj_status follow_model(sj_optimizer *o) {
    sj_model *m = o->model;
    if (o->epoch == m->epoch) return SJ_OK;
    const size_t bytes = sizeof(float) * (size_t)m->n_params;
    /* Checked before the old moments go: a refusal leaves them usable. */
    SJ_TRY(sj_model_check_memory(m, SJ_DEVICE_CPU, 2 * (int64_t)bytes, 0,
                                 "the AdamW moments' host staging"));
    if (o->be->device != m->be->device)
        SJ_TRY(sj_model_check_memory(m, m->device, 2 * (int64_t)bytes, 0, "the AdamW moments"));
    float *hm = sj_alloc(2 * bytes, "AdamW moments (host staging)");
    if (!hm) return SJ_ERR_NOMEM;
    o->be->to_host(hm, o->m, bytes);
    o->be->to_host(hm + m->n_params, o->v, bytes);
    free_moments(o);
    sj_status s = alloc_moments(o);
    if (s == SJ_OK) {
        m->be->bind(m->ctx);
        m->be->from_host(o->m, hm, bytes);
        m->be->from_host(o->v, hm + m->n_params, bytes);
        s = m->be->sync();
    }
    sj_free(hm);
    return s;
}

sj_status sj_optimizer_create(sj_model *m, const sj_train_config *tc, sj_optimizer **out) {
    *out = NULL;
    SJ_TRY(check(tc));
    if (!m->params) return sj_fail(SJ_ERR_RUNTIME, "model has no buffers (a move failed)");
    /* Planned like activations, before anything is allocated: the moments,
     * and what training brings besides (the gradients, held or in a step's
     * arena, and a 16-bit model's compute copy). The activation arena is
     * checked at the first step, when its shape is known. */
    const int64_t n = m->n_params;
    const int64_t want = 8 * n + (m->grads ? 0 : 4 * n) +
                         (m->be->act_dtype != SJ_F32 && !m->params_act
                          ? (int64_t)sj_dtype_size(m->be->act_dtype) * n : 0);
    SJ_TRY(sj_model_check_memory(m, m->device, want, 1, "a Trainer's AdamW state (8 bytes a "
                                 "parameter) with the gradients and compute copy it brings"));
    sj_optimizer *o = calloc(1, sizeof *o);
    if (!o) return sj_fail(SJ_ERR_NOMEM, "optimizer: out of memory");
    o->model = m;
    o->tc = *tc;
    if (alloc_moments(o) != SJ_OK) { free(o); return SJ_ERR_NOMEM; }
    m->be->bind(m->ctx);
    m->be->fill(o->m, 0.0f, m->n_params);
    m->be->fill(o->v, 0.0f, m->n_params);
    sj_status s = m->be->sync();
    if (s != SJ_OK) { sj_optimizer_free(o); return s; }
    *out = o;
    return SJ_OK;
}

void sj_optimizer_free(sj_optimizer *o) {
    if (!o) return;
    /* Graphs captured for this optimizer must not outlive its moments. */
    for (int i = 0; i < SJ_MAX_PLANS; i++) {
        sj_plan *pl = &o->model->plans[i];
        if (pl->used && pl->graph && pl->graph_opt == o) {
            o->model->be->graph_free(pl->graph);
            pl->graph = NULL;
            pl->graph_opt = NULL;
        }
    }
    free_moments(o);
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
float *sj_optimizer_state(sj_optimizer *o, int which, int64_t *n) {
    if (n) *n = o->model->n_params;
    if (follow_model(o) != SJ_OK) return NULL;
    return which == 0 ? o->m : which == 1 ? o->v : NULL;
}

/* This step's hyper-parameters into the pinned `in` scalars. */
static float set_hp(sj_optimizer *o) {
    sj_adamw_hp *hp = &o->model->scalars_host[0].hp;
    float rate = sj_lr_at(&o->tc, o->step);
    *hp = (sj_adamw_hp){ rate, o->tc.beta1, o->tc.beta2, o->tc.eps, o->tc.weight_decay,
                         o->tc.clip, o->step + 1, 0.0 };
    return rate;
}

/* Norm, clip and AdamW over the gradients g on the bound context
 * (capturable): scalars in, the global squared norm back out. The model's
 * own gradients are zeroed after; a step's own (in its arena) die with it. */
static void enqueue_update(sj_optimizer *o, float *g) {
    sj_model *md = o->model;
    const sj_backend *be = md->be;
    be->from_host_async(&md->scalars->hp, &md->scalars_host[0].hp, sizeof(sj_adamw_hp));
    be->grad_sumsq(&md->scalars->hp, g, md->n_params);
    be->adamw(md->params, md->params_act == md->params ? NULL : md->params_act, g,
              g == md->grads, o->m, o->v, md->n_params, md->n_decay, &md->scalars->hp);
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
