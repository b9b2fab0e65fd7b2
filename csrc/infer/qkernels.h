/* qkernels.h — the Q8/Q4 matmul kernels of one instruction set each, behind
 * one signature so quant.c can pick one at run time. Internal to csrc/infer. */
#ifndef SJ_QKERNELS_H
#define SJ_QKERNELS_H

#include "infer.h"

/* out[t * ldo + r] = row r of W . token t of X, for r in [r0, r1), t in [t0, t1).
 * W is Q8 or Q4; X its input quantised by sj_qact_quantize. */
typedef void (*sj_qkernel)(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                           const sj_qact *X, int t0, int t1);

void sj_qkernel_avx512vnni(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                           const sj_qact *X, int t0, int t1);
void sj_qkernel_avx2(float *out, int ldo, const sj_qmat *W, int r0, int r1,
                     const sj_qact *X, int t0, int t1);

/* The quantised kernels an ISA level runs: avx512vnni, avx2 (also for
 * AVX-512 without VNNI) or the scalar reference. */
static inline sj_isa sj_qkernel_isa(sj_isa level) {
    return level >= SJ_ISA_AVX512VNNI ? SJ_ISA_AVX512VNNI : level >= SJ_ISA_AVX2 ? SJ_ISA_AVX2 : SJ_ISA_SCALAR;
}

#endif
