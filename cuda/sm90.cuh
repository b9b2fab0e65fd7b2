/* sm90.cuh — Hopper building blocks shared by the sm_90a kernels
 * (gemm_sm90.cu, attention_sm90.cu): TMA tensor maps and copies, mbarriers,
 * wgmma with shared-memory descriptors (128-byte swizzle, the layout TMA
 * writes) or a register A operand. The device wrappers exist in the host
 * pass and the sm_90a pass only: other architectures compile none of the
 * kernels' bodies (the launchers check the device first). */
#pragma once
#include "common.cuh"
#include <cuda.h>

/* Host: an sm_90 device with the driver's tensor-map encoder, its SM count,
 * and a 2-D tensor map over rows x cols 16-bit elements (row stride ld
 * elements, a multiple of 8) in boxes of box_rows x box_cols (box_cols * 2
 * <= 128 bytes: the 128-byte swizzle). The first call must come before any
 * graph capture (launchers run eagerly first). */
bool sm90_usable(void);
int sm90_sm_count(void);
bool sm90_map(CUtensorMap *map, const void *p, int64_t rows, int64_t cols, int64_t ld,
              int box_rows, int box_cols, bool f16);
/* Let kernel K use `bytes` of dynamic shared memory (past the 48 KiB
 * default): once per kernel, on its first launch, which is eager (before
 * any capture). */
template <auto K> static void sm90_smem(size_t bytes) {
    static bool set;
    if (set) return;
    CUDA_CHECK(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    set = true;
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(uint64_t *bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                 "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
    } while (!done);
}
/* A box of the tensor map at (inner, outer) into smem; completion counted on bar. */
__device__ __forceinline__ void tma_load(void *dst, const CUtensorMap *map, int inner, int outer,
                                         uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(inner), "r"(outer), "r"(smem_u32(bar))
                 : "memory");
}
/* 128-byte-swizzled K-major operand: rows of 128 bytes, 8-row groups 1024
 * bytes apart (SBO); the leading offset is unused with this swizzle. A k
 * step of 16 elements is +32 bytes on the start address. */
__device__ __forceinline__ uint64_t desc_sw128(const void *p) {
    return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t)1 << 16 |
           (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}

/* The same rows read as an MN-major operand (wgmma's transposed B): 8-row
 * groups along K 1024 bytes apart; the field for the stride between
 * 64-element MN blocks is set to the same (one block at N = 64). */
__device__ __forceinline__ uint64_t desc_sw128_mn(const void *p) {
    return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t)(1024 >> 4) << 16 |
           (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}
/* Thread 0: a ring of barriers laid out as full[stages], empty[stages]
 * (full_count and empty_count arrivals a phase), then n_once single-arrival
 * ones (tiles loaded a single time), then the fence that shows them to the
 * TMA unit. The caller's __syncthreads follows. */
__device__ __forceinline__ void ring_init(uint64_t *bars, int stages, int full_count,
                                          int empty_count, int n_once) {
    if (threadIdx.x != 0) return;
    for (int s = 0; s < stages; s++) {
        mbar_init(&bars[s], full_count);
        mbar_init(&bars[stages + s], empty_count);
    }
    for (int i = 0; i < n_once; i++) mbar_init(&bars[2 * stages + i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

#define SJ_R32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SJ_R64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
    "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, "  \
    "%54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SJ_R128 SJ_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, "     \
    "%77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, "  \
    "%95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "  \
    "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, "   \
    "%126, %127"
#define SJ_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),    \
    "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define SJ_F32 SJ_F8(0), SJ_F8(8), SJ_F8(16), SJ_F8(24)
#define SJ_F64 SJ_F8(0), SJ_F8(8), SJ_F8(16), SJ_F8(24), SJ_F8(32), SJ_F8(40), SJ_F8(48), SJ_F8(56)
#define SJ_F128 SJ_F64, SJ_F8(64), SJ_F8(72), SJ_F8(80), SJ_F8(88), SJ_F8(96), SJ_F8(104),       \
    SJ_F8(112), SJ_F8(120)

/* d (64 x N, f32, the warpgroup's registers) += a (64 x 16) b (N x 16)^T;
 * acc == 0 overwrites d instead. Asynchronous: wgmma_commit / wgmma_wait. */
template <int N, class T>
__device__ __forceinline__ void wgmma(float *d, uint64_t a, uint64_t b, int acc);
#define SJ_WGMMA(N, TY, PTX, REGS, PA, PB, PP, OPS)                                            \
    template <>                                                                                \
    __device__ __forceinline__ void wgmma<N, TY>(float *d, uint64_t a, uint64_t b, int acc) {  \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" PP ", 0;\n"                           \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " {" REGS    \
                     "}, %" PA ", %" PB ", p, 1, 1, 0, 0;\n}\n"                                  \
                     : OPS : "l"(a), "l"(b), "r"(acc));                                         \
    }
SJ_WGMMA(64, bf16, "bf16", SJ_R32, "32", "33", "34", SJ_F32)
SJ_WGMMA(64, f16, "f16", SJ_R32, "32", "33", "34", SJ_F32)
SJ_WGMMA(128, bf16, "bf16", SJ_R64, "64", "65", "66", SJ_F64)
SJ_WGMMA(128, f16, "f16", SJ_R64, "64", "65", "66", SJ_F64)
SJ_WGMMA(256, bf16, "bf16", SJ_R128, "128", "129", "130", SJ_F128)
SJ_WGMMA(256, f16, "f16", SJ_R128, "128", "129", "130", SJ_F128)
#undef SJ_WGMMA

/* d (64 x 64) += a (64 x 16, registers: the m16n8k16 A fragment of each
 * warp's 16 rows) b, with b stored MN-major (n contiguous: row-major
 * (16 x 64) in 8-row groups 1024 bytes apart) and read transposed. */
template <class T>
__device__ __forceinline__ void wgmma_rs_tb(float *d, const uint32_t a[4], uint64_t b, int acc);
#define SJ_WGMMA_RS(TY, PTX)                                                                    \
    template <>                                                                                 \
    __device__ __forceinline__ void wgmma_rs_tb<TY>(float *d, const uint32_t a[4], uint64_t b,   \
                                                    int acc) {                                  \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                               \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {" SJ_R32      \
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                            \
                     : SJ_F32                                                                   \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc));           \
    }
SJ_WGMMA_RS(bf16, "bf16")
SJ_WGMMA_RS(f16, "f16")
#undef SJ_WGMMA_RS

__device__ __forceinline__ void wgmma_fence(void) { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit(void) { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait(void) {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keep the accumulators live across the asynchronous wgmma (no copies). */
template <int NR> __device__ __forceinline__ void fence_regs(float *d) {
#pragma unroll
    for (int i = 0; i < NR; i++) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void named_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

#endif
