/* sj_cuda.h — what the C engine sees of the CUDA backend. Valid C and C++;
 * everything here has C linkage. Included by csrc/ only under SJ_HAVE_CUDA. */
#ifndef SJ_CUDA_H
#define SJ_CUDA_H

#include "../csrc/ops/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The tables: act dtype f32 (TF32 off: parity mode), bf16, and f16 (every
 * narrowing cast clamped to +-65504; no loss scaling). */
extern const sj_backend sj_cuda_backend_f32;
extern const sj_backend sj_cuda_backend_bf16;
extern const sj_backend sj_cuda_backend_f16;

/* SJ_OK when a usable GPU is present; otherwise the error says why. */
sj_status sj_cuda_check_device(void);

/* Attention kernel choice, for tests and fallbacks: 0 = automatic (tensor
 * cores for bf16 and f16 with head_dim 32/64/128: wgmma on Hopper at
 * head_dim 64, else mma.sync; otherwise the simple kernel), 1 = always the
 * simple kernel, 2 = never wgmma. Also set by SMEDJAN_ATTENTION=simple|mma. */
void sj_cuda_set_attention_variant(int v);

/* Bytes of device memory the CUDA backend has allocated now / at most. */
int64_t sj_cuda_bytes_in_use(void);
int64_t sj_cuda_peak_bytes(void);
void sj_cuda_reset_peak(void);   /* peak := now */
/* Free device memory now (cudaMemGetInfo), and the GPU's total; -1 when
 * it cannot be asked. */
int64_t sj_cuda_mem_free(int64_t *total);

/* CUDA events on the bound stream (kernel benchmarks): begin, then end
 * returns the milliseconds between them (waiting for the stream). */
void *sj_cuda_timer_begin(void);
float sj_cuda_timer_end(void *timer);

#ifdef __cplusplus
}
#endif
#endif
