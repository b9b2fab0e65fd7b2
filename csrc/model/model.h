/* model.h — the model's state, shared with train/ and io/. */
#ifndef SJ_MODEL_H
#define SJ_MODEL_H

#include "../graph/tape.h"

typedef enum { SJ_RUN_LOGITS, SJ_RUN_LOSS, SJ_RUN_TRAIN } sj_run_mode;

/* A recorded and planned tape for one (B, T, mode), kept for reuse. */
typedef struct {
    int B, T, used;
    sj_run_mode mode;
    int64_t last_use;
    sj_tape tape;
    int tokens, targets, logits, losses;   /* tensor ids */
} sj_plan;

enum { SJ_MAX_PLANS = 4 };

struct sj_model {
    sj_config cfg;
    const sj_backend *be;
    float *params, *grads;          /* (n_params) each */
    int64_t n_params, n_decay;      /* weight decay applies to [0, n_decay) */
    sj_tensor_info *tensors; int n_tensors;
    char *names;
    sj_plan plans[SJ_MAX_PLANS];
    int64_t clock;
    int64_t bytes, peak_bytes;
    float *rows_host; int64_t n_rows_host;   /* per-row losses, copied to host */
};

/* Count engine memory held by the model (positive: allocated). */
void sj_model_account(sj_model *m, int64_t delta);

#endif
