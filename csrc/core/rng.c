/* rng.c — xoshiro256** seeded through splitmix64: small, fast, and its
 * whole state is 32 bytes, so checkpoints can save it exactly. */
#include "core.h"
#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void sj_rng_seed(sj_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t sj_rng_next(sj_rng *r) {
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl(s[3], 45);
    return result;
}

float sj_rng_uniform(sj_rng *r) { return (float)(sj_rng_next(r) >> 40) * (1.0f / 16777216.0f); }

float sj_rng_normal(sj_rng *r) {
    double u1 = ((sj_rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);  /* (0, 1] */
    double u2 = (sj_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}
