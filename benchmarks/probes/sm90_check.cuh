/* sm90_check.cuh — the two Hopper kernel harnesses (gemm_sm90_check.cu,
 * attention_sm90_check.cu): the kernel files and the shared harness helpers. */
#pragma once
#include "../../cuda/gemm_sm90.cu"   /* also the sm90.cuh host helpers */
#include "kernel_harness.cuh"
