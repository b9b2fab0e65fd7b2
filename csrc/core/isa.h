/* isa.h — one mechanism for instruction-set dispatch, used by the whole
 * engine.
 *
 * The hot sources (listed in csrc/isa_sources.txt) are compiled once per
 * x86-64 level, each compile defining SJ_ISA_SUFFIX:
 *   _v1  x86-64 baseline (SSE2)
 *   _v3  x86-64-v3 (AVX2, FMA, F16C, BMI)
 *   _v4  x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
 * A native build (SMEDJAN_NATIVE=1, defines SJ_ISA_NATIVE) or one for
 * another architecture compiles them once, with the suffix _one.
 * The symbols those files define carry the suffix (the headers that declare
 * them rename them with SJ_ISA(name)), so the copies link side by side;
 * code compiled once reaches them only through SJ_ISA_PICK, which picks the
 * copy of the level chosen at run time — a direct call fails to link.
 *
 * The level: the best this CPU runs, capped by the environment variable
 * SMEDJAN_ISA = scalar | avx2 | avx512 | avx512vnni, read once. avx512vnni
 * is avx512 plus the VNNI dot products of the quantised matmuls. Never
 * include from the public header. */
#ifndef SJ_ISA_H
#define SJ_ISA_H

typedef enum { SJ_ISA_SCALAR, SJ_ISA_AVX2, SJ_ISA_AVX512, SJ_ISA_AVX512VNNI, SJ_ISA_COUNT } sj_isa;

sj_isa sj_isa_best(void);            /* what this CPU runs */
sj_isa sj_isa_active(void);          /* sj_isa_best capped by SMEDJAN_ISA */
const char *sj_isa_name(sj_isa isa); /* "scalar", "avx2", "avx512", "avx512vnni" */
/* The compiled copy the engine runs: 0 (_v1), 1 (_v3), 2 (_v4); always 0
 * in a one-copy build. */
int sj_isa_variant(void);
/* Its name: "x86-64", "x86-64-v3", "x86-64-v4", or "native" / "default"
 * in a one-copy build. */
const char *sj_isa_variant_name(void);

#define SJ_ISA_CAT_(a, b) a##b
#define SJ_ISA_CAT(a, b) SJ_ISA_CAT_(a, b)
#ifdef SJ_ISA_SUFFIX
#define SJ_ISA(name) SJ_ISA_CAT(name, SJ_ISA_SUFFIX)
#else
#define SJ_ISA(name) name
#endif

#if defined(__x86_64__) && !defined(SJ_ISA_NATIVE)
#define SJ_ISA_MULTI 1
/* Declares every copy of a per-level symbol: SJ_ISA_EXTERN(const sj_backend, sj_cpu_table);
 * functions through a function typedef. */
#define SJ_ISA_EXTERN(type, name) \
    extern type name##_v1; extern type name##_v3; extern type name##_v4
/* The address of the copy of `name` the active level runs. */
#define SJ_ISA_PICK(name) \
    (sj_isa_variant() == 2 ? &name##_v4 : sj_isa_variant() == 1 ? &name##_v3 : &name##_v1)
#else
#define SJ_ISA_MULTI 0
#define SJ_ISA_EXTERN(type, name) extern type name##_one
#define SJ_ISA_PICK(name) (&name##_one)
#endif

#endif
