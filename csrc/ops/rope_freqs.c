/* rope_freqs.c — RoPE's inverse frequencies and cos/sin scale for each
 * scaling type, as transformers 5.x computes them (modeling_rope_utils.py:
 * _compute_default/linear_scaling/dynamic_ntk/yarn_parameters), so that
 * every kernel, CPU and CUDA, training and generation, turns by the same
 * f32 angles. Each f32 step is one statement in transformers' order, each
 * Python-float step is done in double; nothing here may be fused or
 * reordered (hence FP_CONTRACT off). base ** e is taken in double and
 * rounded once: the correctly rounded value, where torch's CPU pow (SLEEF,
 * 1 ulp) is off by one ulp in about one of a hundred entries. */
#include "backend.h"
#include <math.h>

#pragma STDC FP_CONTRACT OFF

/* YaRN's ramp bound: the dimension whose wavelength makes num_rotations
 * turns over the original context (transformers' find_correction_dim). */
static double correction_dim(double num_rotations, int hd, double base, int original) {
    return (hd * log(original / (num_rotations * 2 * 3.141592653589793))) / (2 * log(base));
}

sj_status sj_rope_init(sj_rope *r, const sj_config *c, int seq_len) {
    if (c->n_heads <= 0 || c->dim % c->n_heads)
        return sj_fail(SJ_ERR_ARG, "RoPE: n_heads %d must divide dim %d", c->n_heads, c->dim);
    return sj_rope_init_hd(r, c, seq_len, c->dim / c->n_heads);
}

sj_status sj_rope_init_hd(sj_rope *r, const sj_config *c, int seq_len, int hd) {
    if (hd <= 0 || hd % 2 || hd > 2 * SJ_ROPE_MAX_PAIRS)
        return sj_fail(SJ_ERR_ARG, "RoPE: head dim %d must be even and at most %d", hd,
                       2 * SJ_ROPE_MAX_PAIRS);
    const sj_rope_scaling *s = &c->rope_scaling;
    const int half = hd / 2;
    const float factor = s->factor;
    float base = c->rope_theta;
    if (s->type == SJ_ROPE_DYNAMIC && seq_len > s->original_max_seq_len) {
        /* transformers' dynamic update passes seq_len as a tensor: f32 steps,
         * the power of a tensor by a Python float taken in double */
        float g = (float)seq_len * factor;
        g = g / (float)s->original_max_seq_len;
        g = g - (float)((double)factor - 1.0);
        g = (float)pow((double)g, (double)hd / (double)(hd - 2));
        base = base * g;
    }
    float pos_freq[SJ_ROPE_MAX_PAIRS];
    r->n_pairs = half;
    r->mscale = 1.0f;
    for (int i = 0; i < half; i++) {
        const float e = (float)(2 * i) / (float)hd;
        pos_freq[i] = (float)pow((double)base, (double)e);
        r->inv_freq[i] = 1.0f / pos_freq[i];
    }
    if (s->type == SJ_ROPE_LINEAR)
        for (int i = 0; i < half; i++) r->inv_freq[i] = r->inv_freq[i] / factor;
    if (s->type != SJ_ROPE_YARN) return SJ_OK;

    /* YaRN: interpolated (inv_freq / factor) below the ramp's low end,
     * extrapolated (unchanged) above its high end, a linear blend between */
    r->mscale = s->attention_factor > 0 ? s->attention_factor
                                        : (float)(0.1 * log((double)factor) + 1.0);
    double low = correction_dim(s->beta_fast, hd, c->rope_theta, s->original_max_seq_len);
    double high = correction_dim(s->beta_slow, hd, c->rope_theta, s->original_max_seq_len);
    if (s->truncate) { low = floor(low); high = ceil(high); }
    if (low < 0) low = 0;
    if (high > hd - 1) high = hd - 1;
    if (low == high) high += 0.001;   /* transformers' guard against a zero-width ramp */
    const float ramp_low = (float)low, ramp_width = (float)(high - low);
    for (int i = 0; i < half; i++) {
        float ramp = ((float)i - ramp_low) / ramp_width;
        ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
        const float extrapolation = 1.0f - ramp;
        const float interpolated = 1.0f / (factor * pos_freq[i]);
        const float a = interpolated * (1.0f - extrapolation);
        const float b = r->inv_freq[i] * extrapolation;
        r->inv_freq[i] = a + b;
    }
    return SJ_OK;
}
