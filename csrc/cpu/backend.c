/* backend.c — the CPU backend's table. */
#include "cpu.h"
#include <string.h>

static void copy_bytes(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }

const sj_backend sj_cpu_backend = {
    .name = "cpu",
    .alloc = sj_alloc,
    .free = sj_free,
    .fill = sj_cpu_fill,
    .to_host = copy_bytes,
    .from_host = copy_bytes,
    .matmul = sj_cpu_matmul,
    .embedding_forward = sj_cpu_embedding_forward,
    .embedding_backward = sj_cpu_embedding_backward,
    .rmsnorm_forward = sj_cpu_rmsnorm_forward,
    .rmsnorm_backward = sj_cpu_rmsnorm_backward,
    .rope_forward = sj_cpu_rope_forward,
    .rope_backward = sj_cpu_rope_backward,
    .attention_forward = sj_cpu_attention_forward,
    .attention_backward = sj_cpu_attention_backward,
    .swiglu_forward = sj_cpu_swiglu_forward,
    .swiglu_backward = sj_cpu_swiglu_backward,
    .add = sj_cpu_add,
    .copy = sj_cpu_copy,
    .cross_entropy_forward = sj_cpu_cross_entropy_forward,
    .cross_entropy_backward = sj_cpu_cross_entropy_backward,
    .sumsq = sj_cpu_sumsq,
    .adamw = sj_cpu_adamw,
};
