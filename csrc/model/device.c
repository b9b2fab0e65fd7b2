/* device.c — what the public device queries answer when the CUDA backend
 * was not compiled in (cuda/backend.cu defines them otherwise). */
#include "../core/core.h"

#ifndef SJ_HAVE_CUDA
int sj_cuda_compiled(void) { return 0; }
int sj_cuda_device_count(void) { return 0; }
const char *sj_cuda_device_name(int i) { (void)i; return ""; }
sj_status sj_cuda_memcpy(void *dst, const void *src, size_t bytes, int to_host) {
    (void)dst; (void)src; (void)bytes; (void)to_host;
    return sj_fail(SJ_ERR_RUNTIME, "this build of smedjan has no CUDA backend");
}
#endif
