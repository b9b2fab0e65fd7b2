/* registry.c — the one place a device and compute dtype find their backend
 * table (the model, the kernel harness). */
#include "backend.h"
#ifdef SJ_HAVE_CUDA
#include "../../cuda/sj_cuda.h"
#endif

sj_status sj_backend_for(sj_device dev, sj_dtype dt, const sj_backend **out) {
    if (dev == SJ_DEVICE_CPU_STAGED) {
        if (dt != SJ_F32) return sj_fail(SJ_ERR_ARG, "cpu-staged is float32 only");
        *out = sj_cpu_staged_backend();
        return SJ_OK;
    }
    if (dev == SJ_DEVICE_CPU) {
        if (dt != SJ_F32)
            return sj_fail(SJ_ERR_ARG, "dtype %s is not available on the CPU (use float32, or "
                           "device='cuda')", dt == SJ_BF16 ? "bf16" : "fp16");
        *out = sj_cpu_backend();
        return SJ_OK;
    }
    if (dev != SJ_DEVICE_CUDA) return sj_fail(SJ_ERR_ARG, "unknown device %d", (int)dev);
    if (dt != SJ_F32 && dt != SJ_BF16 && dt != SJ_F16)
        return sj_fail(SJ_ERR_ARG, "CUDA compute dtype must be fp32, bf16 or fp16");
#ifdef SJ_HAVE_CUDA
    SJ_TRY(sj_cuda_check_device());
    *out = dt == SJ_BF16 ? &sj_cuda_backend_bf16 : dt == SJ_F16 ? &sj_cuda_backend_f16
                                                                : &sj_cuda_backend_f32;
    return SJ_OK;
#else
    return sj_fail(SJ_ERR_RUNTIME, "device='cuda': this build of smedjan has no CUDA backend "
                   "(nvcc was not found when it was built; rebuild with nvcc on PATH)");
#endif
}
