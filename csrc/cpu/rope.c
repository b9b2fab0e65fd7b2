/* rope.c — rotary position embedding, Hugging Face Llama convention
 * (rotate-half: pairs (i, i + hd/2)), forward and backward. Angles are
 * computed in float from sj_rope's frequencies like HF's fp32 path, cos and
 * sin scaled by mscale as HF scales them, so real checkpoints match. */
#include "cpu.h"

typedef struct {
    float *out; const float *in; int T, n_heads, n_rot, hd, pos0, inverse, accum;
    const sj_rope *rope;
} rope_job;

static void rope_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const rope_job *j = ctx;
    const int half = j->hd / 2, row = j->n_heads * j->hd;
    float cs[half], sn[half];
    for (int64_t r = r0; r < r1; r++) {
        sj_rope_angles(j->rope, (int)(j->pos0 + r % j->T), j->inverse, half, cs, sn);
        const float *x = j->in + r * row;
        float *y = j->out + r * row;
        for (int h = 0; h < j->n_rot; h++) {
            sj_rope_turn(y + h * j->hd, x + h * j->hd, cs, sn, half, j->accum);
        }
        if (y != x)   /* in place: the heads past n_rot are already there */
            for (int c = j->n_rot * j->hd; c < row; c++) y[c] = j->accum ? y[c] + x[c] : x[c];
    }
}

// out, in: (B, T, n_heads*hd); out may be in (each pair is read, then written)
void sj_cpu_rope_forward(void *out, const void *in, int B, int T, int n_heads,
                         int n_rot, int hd, int pos0, const sj_rope *rope) {
    rope_job j = { out, in, T, n_heads, n_rot, hd, pos0, 0, 0, rope };
    sj_parallel_for((int64_t)B * T, 16, rope_rows, &j);
}

/* The rotation is orthogonal: its gradient is the rotation by -angle,
 * scaled by mscale as the forward is. */
void sj_cpu_rope_backward(void *din, const void *dout, int B, int T, int n_heads,
                          int n_rot, int hd, int pos0, const sj_rope *rope, int accum) {
    rope_job j = { din, dout, T, n_heads, n_rot, hd, pos0, 1, accum, rope };
    sj_parallel_for((int64_t)B * T, 16, rope_rows, &j);
}
