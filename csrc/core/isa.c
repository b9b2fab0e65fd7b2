/* isa.c — which instruction-set level this CPU runs, capped by SMEDJAN_ISA
 * (see isa.h). Compiled once, at the baseline level: it must run anywhere. */
#include "isa.h"
#include "../smedjan.h"
#include <stdlib.h>
#include <string.h>

static const char *const isa_names[SJ_ISA_COUNT] = { "scalar", "avx2", "avx512", "avx512vnni" };

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>

/* CPUID and XGETBV by hand: __builtin_cpu_supports has no "f16c" in clang
 * and no level names before GCC 12. A level counts only when the OS saves
 * its registers (XCR0). */
static unsigned xcr0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return lo;
}

static sj_isa detect(void) {
    unsigned a, b, c1, d, b7 = 0, c7 = 0, cx = 0;
    if (!__get_cpuid(1, &a, &b, &c1, &d)) return SJ_ISA_SCALAR;
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b7, c7, d);
    if (__get_cpuid_max(0x80000000u, NULL) >= 0x80000001u) __cpuid(0x80000001u, a, b, cx, d);
#define ALL(reg, ...) ((reg & (__VA_ARGS__)) == (__VA_ARGS__))
    /* x86-64-v2 and v3 bits: SSE3 SSSE3 FMA CX16 SSE4.1 SSE4.2 MOVBE POPCNT
     * OSXSAVE AVX F16C; BMI1 AVX2 BMI2; LAHF LZCNT */
    const unsigned v3_c1 = 1u << 0 | 1u << 9 | 1u << 12 | 1u << 13 | 1u << 19 | 1u << 20 |
                           1u << 22 | 1u << 23 | 1u << 27 | 1u << 28 | 1u << 29;
    if (!ALL(c1, v3_c1) || !ALL(b7, 1u << 3 | 1u << 5 | 1u << 8) || !ALL(cx, 1u << 0 | 1u << 5) ||
        !ALL(xcr0(), 0x6u))
        return SJ_ISA_SCALAR;
    /* x86-64-v4: AVX512F DQ CD BW VL, and the OS saving opmask and zmm state */
    if (!ALL(b7, 1u << 16 | 1u << 17 | 1u << 28 | 1u << 30 | 1u << 31) || !ALL(xcr0(), 0xE6u))
        return SJ_ISA_AVX2;
    return ALL(c7, 1u << 11) ? SJ_ISA_AVX512VNNI : SJ_ISA_AVX512;
#undef ALL
}
#else
static sj_isa detect(void) { return SJ_ISA_SCALAR; }
#endif

static int best = -1, active = -1;

sj_isa sj_isa_best(void) {
    if (best < 0) best = (int)detect();
    return (sj_isa)best;
}

sj_isa sj_isa_active(void) {
    if (active < 0) {
        int lvl = (int)sj_isa_best();
        const char *e = getenv("SMEDJAN_ISA");
        if (!e || !*e) e = getenv("SMEDJAN_INFER_ISA");   /* the older name */
        for (int i = 0; e && i < SJ_ISA_COUNT; i++)
            if (!strcmp(e, isa_names[i]) && i < lvl) lvl = i;
        active = lvl;
    }
    return (sj_isa)active;
}

const char *sj_isa_name(sj_isa isa) { return isa_names[isa]; }

int sj_isa_variant(void) {
#if SJ_ISA_MULTI
    const sj_isa a = sj_isa_active();
    return a >= SJ_ISA_AVX512 ? 2 : a >= SJ_ISA_AVX2 ? 1 : 0;
#else
    return 0;
#endif
}

const char *sj_isa_variant_name(void) {
#if SJ_ISA_MULTI
    static const char *const names[] = { "x86-64", "x86-64-v3", "x86-64-v4" };
    return names[sj_isa_variant()];
#elif defined(SJ_ISA_NATIVE)
    return "native";
#else
    return "default";
#endif
}

const char *sj_cpu_isa(void) { return sj_isa_name(sj_isa_active()); }
const char *sj_cpu_isa_best(void) { return sj_isa_name(sj_isa_best()); }
const char *sj_cpu_isa_build(void) { return sj_isa_variant_name(); }
