/* optim.c — the learning-rate schedule, global-norm clipping and AdamW
 * over the model's flat buffers, and the fused train step. */
#include "../model/model.h"
#include <math.h>
#include <stdlib.h>

struct sj_optimizer {
    sj_model *model;
    sj_train_config tc;
    float *m, *v;     /* AdamW moments, one per parameter */
    int64_t step;     /* optimizer steps taken */
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
    NEED(tc->max_lr >= 0 && isfinite(tc->max_lr), "lr must be >= 0, got %g", (double)tc->max_lr);
    NEED(tc->min_lr >= 0 && tc->min_lr <= tc->max_lr, "min_lr must be in [0, lr], got %g",
         (double)tc->min_lr);
    NEED(tc->warmup_steps >= 0, "warmup must be >= 0, got %d", tc->warmup_steps);
    NEED(tc->total_steps >= 1, "steps must be >= 1, got %d", tc->total_steps);
    NEED(tc->beta1 >= 0 && tc->beta1 < 1 && tc->beta2 >= 0 && tc->beta2 < 1,
         "betas must be in [0, 1), got (%g, %g)", (double)tc->beta1, (double)tc->beta2);
    NEED(tc->eps > 0, "eps must be > 0, got %g", (double)tc->eps);
    NEED(tc->weight_decay >= 0, "weight_decay must be >= 0, got %g", (double)tc->weight_decay);
    return SJ_OK;
    #undef NEED
}

sj_status sj_optimizer_create(sj_model *m, const sj_train_config *tc, sj_optimizer **out) {
    *out = NULL;
    SJ_TRY(check(tc));
    sj_optimizer *o = calloc(1, sizeof *o);
    if (!o) return sj_fail(SJ_ERR_NOMEM, "optimizer: out of memory");
    o->model = m;
    o->tc = *tc;
    o->m = m->be->alloc(sizeof(float) * m->n_params, "AdamW first moment");
    o->v = o->m ? m->be->alloc(sizeof(float) * m->n_params, "AdamW second moment") : NULL;
    if (!o->m || !o->v) { sj_optimizer_free(o); return SJ_ERR_NOMEM; }
    m->be->fill(o->m, 0.0f, m->n_params);
    m->be->fill(o->v, 0.0f, m->n_params);
    sj_model_account(m, 2 * (int64_t)sizeof(float) * m->n_params);
    *out = o;
    return SJ_OK;
}

void sj_optimizer_free(sj_optimizer *o) {
    if (!o) return;
    if (o->m) { o->model->be->free(o->m); sj_model_account(o->model, -4 * o->model->n_params); }
    if (o->v) { o->model->be->free(o->v); sj_model_account(o->model, -4 * o->model->n_params); }
    free(o);
}

int64_t sj_optimizer_step_count(const sj_optimizer *o) { return o->step; }
void sj_optimizer_set_step(sj_optimizer *o, int64_t step) { o->step = step; }
float *sj_optimizer_state(sj_optimizer *o, int which, int64_t *n) {
    if (n) *n = o->model->n_params;
    return which == 0 ? o->m : which == 1 ? o->v : NULL;
}

sj_status sj_optimizer_step(sj_optimizer *o, float *grad_norm, float *lr) {
    sj_model *md = o->model;
    const sj_backend *be = md->be;
    double norm = sqrt(be->sumsq(md->grads, md->n_params));
    float rate = sj_lr_at(&o->tc, o->step);
    if (grad_norm) *grad_norm = (float)norm;
    if (lr) *lr = rate;
    if (!isfinite(norm)) {  /* a NaN/Inf gradient would poison every weight: skip it */
        sj_model_zero_grad(md);
        return SJ_OK;
    }
    /* PyTorch's clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)). */
    float scale = 1.0f;
    if (o->tc.clip > 0) scale = fminf(1.0f, (float)(o->tc.clip / (norm + 1e-6)));
    be->adamw(md->params, md->grads, o->m, o->v, md->n_params, md->n_decay, rate, o->tc.beta1,
              o->tc.beta2, o->tc.eps, o->tc.weight_decay, scale, o->step + 1);
    o->step++;
    sj_model_zero_grad(md);
    return SJ_OK;
}

sj_status sj_train_step(sj_optimizer *o, const void *tokens, const void *targets,
                        sj_dtype tok_dtype, int B, int T,
                        float *loss, float *grad_norm, float *lr) {
    SJ_TRY(sj_model_loss(o->model, tokens, targets, tok_dtype, B, T, -1, 1, loss));
    return sj_optimizer_step(o, grad_norm, lr);
}
