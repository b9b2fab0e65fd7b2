/* backend.c — the CPU backend's table, and the small adapters between it
 * and kernels whose signatures differ (gemm.c is shared with other users). */
#include "cpu.h"
#include <string.h>

static void copy_bytes(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }

/* f32 is the only dtype on the CPU: conversion is a copy. */
static void convert(void *dst, sj_dtype dt, const void *src, sj_dtype st, int64_t n) {
    (void)dt; (void)st;
    if (dst != src) memcpy(dst, src, sizeof(float) * (size_t)n);
}

static void matmul(void *C, const void *A, const void *B, int M, int N, int K,
                   int transA, int transB, int accum, int c_f32) {
    (void)c_f32;   /* act dtype is f32 here */
    sj_cpu_matmul(C, A, B, M, N, K, transA, transB, accum);
}

static void *ctx_create(void) { static char ctx; return &ctx; }
static void ctx_free(void *ctx) { (void)ctx; }
static void bind(void *ctx) { (void)ctx; }
static sj_status sync_ok(void) { return SJ_OK; }
static sj_status no_graph(void) { return sj_fail(SJ_ERR_RUNTIME, "cpu backend: no graphs"); }
static sj_status no_graph_end(void **g) { *g = NULL; return no_graph(); }
static sj_status no_graph_launch(void *g) { (void)g; return no_graph(); }
static void graph_free(void *g) { (void)g; }

#define SJ_CPU_TABLE(NAME, DEVICE)                \
    .name = NAME,                                 \
    .act_dtype = SJ_F32,                          \
    .device = DEVICE,                             \
    .alloc = sj_alloc,                            \
    .free = sj_free,                              \
    .fill = sj_cpu_fill,                          \
    .to_host = copy_bytes,                        \
    .from_host = copy_bytes,                      \
    .to_host_async = copy_bytes,                  \
    .from_host_async = copy_bytes,                \
    .convert = convert,                           \
    .matmul = matmul,                             \
    .embedding_forward = sj_cpu_embedding_forward,\
    .embedding_backward = sj_cpu_embedding_backward,\
    .rmsnorm_forward = sj_cpu_rmsnorm_forward,    \
    .rmsnorm_backward = sj_cpu_rmsnorm_backward,  \
    .rope_forward = sj_cpu_rope_forward,          \
    .rope_backward = sj_cpu_rope_backward,        \
    .attention_forward = sj_cpu_attention_forward,\
    .attention_backward = sj_cpu_attention_backward,\
    .swiglu_forward = sj_cpu_swiglu_forward,      \
    .swiglu_backward = sj_cpu_swiglu_backward,    \
    .add = sj_cpu_add,                            \
    .copy = sj_cpu_copy,                          \
    .cross_entropy_forward = sj_cpu_cross_entropy_forward,\
    .cross_entropy_backward = sj_cpu_cross_entropy_backward,\
    .grad_sumsq = sj_cpu_grad_sumsq,              \
    .adamw = sj_cpu_adamw,                        \
    .ctx_create = ctx_create,                     \
    .ctx_free = ctx_free,                         \
    .bind = bind,                                 \
    .sync = sync_ok,                              \
    .host_alloc = sj_alloc,                       \
    .host_free = sj_free,                         \
    .capture_begin = no_graph,                    \
    .capture_end = no_graph_end,                  \
    .graph_launch = no_graph_launch,              \
    .graph_free = graph_free,

const sj_backend sj_cpu_backend = { SJ_CPU_TABLE("cpu", 0) };
/* Testing: the CPU kernels behind the device code path (inputs staged into
 * the arena, in-place loss gradient, scalars read through pointers), so
 * that path is checked against the plain one on machines without a GPU. */
const sj_backend sj_cpu_staged_backend = { SJ_CPU_TABLE("cpu-staged", 1) };
