/* backend.cu — the CUDA backend's tables, memory, contexts (one stream,
 * scratch and cuBLASLt workspace per model), error reporting and graphs.
 * Never exits or aborts: every CUDA failure becomes an sj_status with the
 * call, file and line in its message. */
#include "common.cuh"
#include "kernels.h"
#include <mutex>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <atomic>
#include <unordered_map>

/* ---- errors and the bound context ------------------------------------- */

static thread_local sj_cuda_ctx *cur_ctx;
static thread_local char err_msg[512];
static thread_local bool err_set;

void sj_cuda_error(const char *what, const char *detail, const char *file, int line) {
    if (err_set) return;
    err_set = true;
    const char *f = strrchr(file, '/');
    snprintf(err_msg, sizeof err_msg, "CUDA error: %s (%s at %s:%d)", detail, what,
             f ? f + 1 : file, line);
}
bool sj_cuda_has_error(void) { return err_set; }

static sj_status take_error(void) {
    if (!err_set) return SJ_OK;
    err_set = false;
    return sj_fail(SJ_ERR_RUNTIME, "%s", err_msg);
}

static sj_cuda_ctx fallback_ctx;   /* stream 0, no scratch: only before any bind */
sj_cuda_ctx *sj_cuda_cur(void) { return cur_ctx ? cur_ctx : &fallback_ctx; }

/* ---- devices ------------------------------------------------------------ */

static std::once_flag init_once;
static int n_devices = -1;
static cudaError_t init_err = cudaSuccess;
static char names[16][256];

static void init_devices(void) {
    int n = 0;
    init_err = cudaGetDeviceCount(&n);
    if (init_err != cudaSuccess) { n = 0; cudaGetLastError(); }
    n_devices = n;
    for (int i = 0; i < n && i < 16; i++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) == cudaSuccess) snprintf(names[i], 256, "%s", p.name);
    }
    if (n > 0) {
        sj_cuda_attention_init();
        sj_cuda_matmul_init();
    }
}

extern "C" int sj_cuda_compiled(void) { return 1; }
extern "C" int sj_cuda_device_count(void) {
    std::call_once(init_once, init_devices);
    return n_devices;
}
extern "C" const char *sj_cuda_device_name(int i) {
    return i >= 0 && i < sj_cuda_device_count() && i < 16 ? names[i] : "";
}
extern "C" sj_status sj_cuda_check_device(void) {
    if (sj_cuda_device_count() > 0) return SJ_OK;
    if (init_err != cudaSuccess)
        return sj_fail(SJ_ERR_RUNTIME, "device='cuda' but no CUDA GPU is usable "
                       "(cudaGetDeviceCount: %s)", cudaGetErrorString(init_err));
    return sj_fail(SJ_ERR_RUNTIME, "device='cuda' but no CUDA GPU is present");
}

/* ---- memory --------------------------------------------------------------- */

static std::atomic<int64_t> bytes_in_use{0}, peak_bytes{0};
extern "C" int64_t sj_cuda_bytes_in_use(void) { return bytes_in_use.load(); }
extern "C" int64_t sj_cuda_peak_bytes(void) { return peak_bytes.load(); }
extern "C" void sj_cuda_reset_peak(void) { peak_bytes.store(bytes_in_use.load()); }

extern "C" int64_t sj_cuda_mem_free(int64_t *total) {
    size_t fr = 0, tot = 0;
    if (sj_cuda_device_count() <= 0 || cudaMemGetInfo(&fr, &tot) != cudaSuccess) {
        cudaGetLastError();
        if (total) *total = -1;
        return -1;
    }
    if (total) *total = (int64_t)tot;
    return (int64_t)fr;
}

/* Sizes of live blocks, for exact accounting. */
static std::mutex alloc_mu;
static std::unordered_map<void *, size_t> live;

static void *dev_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        cudaGetLastError();   /* out-of-memory is not sticky: clear it */
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        sj_fail(e == cudaErrorMemoryAllocation ? SJ_ERR_NOMEM : SJ_ERR_RUNTIME,
                "CUDA out of memory: cudaMalloc of %zu bytes for %s failed (%s; %zu of %zu "
                "bytes free)", bytes, what, cudaGetErrorString(e), fr, tot);
        return NULL;
    }
    std::lock_guard<std::mutex> lk(alloc_mu);
    live[p] = bytes;
    int64_t now = bytes_in_use += (int64_t)bytes;
    int64_t pk = peak_bytes.load();
    while (now > pk && !peak_bytes.compare_exchange_weak(pk, now)) {}
    return p;
}

static void dev_free(void *p) {
    if (!p) return;
    {
        std::lock_guard<std::mutex> lk(alloc_mu);
        auto it = live.find(p);
        if (it != live.end()) { bytes_in_use -= (int64_t)it->second; live.erase(it); }
    }
    cudaFree(p);
}

static void *pinned_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 64);
    if (e != cudaSuccess) {
        cudaGetLastError();
        sj_fail(SJ_ERR_NOMEM, "cudaMallocHost of %zu bytes for %s failed (%s)", bytes, what,
                cudaGetErrorString(e));
        return NULL;
    }
    return p;
}
static void pinned_free(void *p) { if (p) cudaFreeHost(p); }

/* Synchronous copies, off the hot path (moves, logits out, tests). They do
 * not depend on a bound context: every engine call leaves its stream idle,
 * and callers sync() before reading what a kernel wrote. */
/* Blocking copies are ordered on the model's stream: it is non-blocking, so
 * a plain cudaMemcpy (legacy stream) would race the kernels that produce or
 * consume the data. */
static void to_host(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, sj_stream()));
    CUDA_CHECK(cudaStreamSynchronize(sj_stream()));
}
static void from_host(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, sj_stream()));
    CUDA_CHECK(cudaStreamSynchronize(sj_stream()));
}
static void to_host_async(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, sj_stream()));
}
static void from_host_async(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, sj_stream()));
}

extern "C" sj_status sj_cuda_memcpy(void *dst, const void *src, size_t bytes, int to_host_) {
    if (sj_cuda_device_count() <= 0) return sj_cuda_check_device();
    /* Models work on their own non-blocking streams: finish that work first. */
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(dst, src, bytes, to_host_ ? cudaMemcpyDeviceToHost
                                                          : cudaMemcpyHostToDevice);
    if (e != cudaSuccess)
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (cudaMemcpy of %zu bytes %s)",
                       cudaGetErrorString(e), bytes, to_host_ ? "to host" : "to device");
    return SJ_OK;
}

/* ---- contexts ------------------------------------------------------------ */

static void *ctx_create(void) {
    if (sj_cuda_check_device() != SJ_OK) return NULL;
    sj_cuda_ctx *c = (sj_cuda_ctx *)calloc(1, sizeof *c);
    if (!c) { sj_fail(SJ_ERR_NOMEM, "CUDA context: out of host memory"); return NULL; }
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        free(c);
        sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (cudaStreamCreate)", cudaGetErrorString(e));
        return NULL;
    }
    c->scratch = dev_alloc(SJ_CUDA_SCRATCH, "CUDA scratch");
    c->workspace = c->scratch ? dev_alloc(SJ_CUDA_WORKSPACE, "cuBLASLt workspace") : NULL;
    if (!c->workspace) {
        dev_free(c->scratch);
        cudaStreamDestroy(c->stream);
        free(c);
        return NULL;
    }
    c->scratch_bytes = SJ_CUDA_SCRATCH;
    c->workspace_bytes = SJ_CUDA_WORKSPACE;
    return c;
}

static void ctx_free(void *p) {
    sj_cuda_ctx *c = (sj_cuda_ctx *)p;
    if (!c) return;
    cudaStreamSynchronize(c->stream);
    dev_free(c->scratch);
    dev_free(c->workspace);
    cudaStreamDestroy(c->stream);
    if (cur_ctx == c) cur_ctx = NULL;
    free(c);
}

static void bind(void *p) { cur_ctx = (sj_cuda_ctx *)p; }

static sj_status sync(void) {
    cudaError_t e = cudaStreamSynchronize(sj_stream());
    if (e != cudaSuccess) sj_cuda_error("cudaStreamSynchronize", cudaGetErrorString(e), __FILE__, __LINE__);
    return take_error();
}

/* ---- graphs ------------------------------------------------------------ */

static sj_status capture_begin(void) {

    if (sj_cuda_has_error()) return take_error();
    cudaError_t e = cudaStreamBeginCapture(sj_stream(), cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess)
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (cudaStreamBeginCapture)", cudaGetErrorString(e));
    return SJ_OK;
}

static sj_status capture_end(void **out) {
    *out = NULL;
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(sj_stream(), &g);
    sj_status s = take_error();   /* a launch that failed while capturing */
    if (e != cudaSuccess && s == SJ_OK)
        s = sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (cudaStreamEndCapture)", cudaGetErrorString(e));
    if (s != SJ_OK) {
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return s;
    }
    cudaGraphExec_t x = NULL;
    e = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess)
        return sj_fail(SJ_ERR_RUNTIME, "CUDA error: %s (cudaGraphInstantiate)", cudaGetErrorString(e));
    *out = x;
    return SJ_OK;
}

static sj_status graph_launch(void *g) {
    CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)g, sj_stream()));
    return sj_cuda_has_error() ? take_error() : SJ_OK;
}

static void graph_free(void *g) { if (g) cudaGraphExecDestroy((cudaGraphExec_t)g); }

/* ---- the tables ---------------------------------------------------------- */

#define SJ_CU_TABLE(T, DT, MATMUL_SWIGLU, MATMUL_ROPE)             \
    {                                                              \
        "cuda-" #T, DT, 1,                                         \
        dev_alloc, dev_free, sj_cuda_fill,                         \
        to_host, from_host, to_host_async, from_host_async,        \
        sj_cuda_convert,                                           \
        sj_cuda_matmul_##T, sj_cuda_matmul_add_##T,               \
        sj_cuda_embedding_forward_##T, sj_cuda_embedding_backward_##T, \
        sj_cuda_gather_rows_forward_##T, sj_cuda_gather_rows_backward_##T, \
        sj_cuda_rmsnorm_forward_##T, sj_cuda_rmsnorm_backward_##T, \
        sj_cuda_qk_norm_forward_##T, sj_cuda_qk_norm_backward_##T, \
        sj_cuda_rope_forward_##T, sj_cuda_rope_backward_##T,       \
        sj_cuda_attention_forward_##T, sj_cuda_attention_backward_##T, \
        sj_cuda_swiglu_forward_##T, sj_cuda_swiglu_backward_##T,   \
        MATMUL_SWIGLU, MATMUL_ROPE,                                \
        sj_cuda_add_##T, sj_cuda_copy_##T,                         \
        sj_cuda_pair_heads_forward_##T, sj_cuda_pair_heads_backward_##T, \
        sj_cuda_mix_forward_##T, sj_cuda_mix_backward_##T,         \
        sj_cuda_cross_entropy_forward_##T, sj_cuda_cross_entropy_backward_##T, \
        sj_cuda_moe_route_forward_##T, sj_cuda_moe_route_backward_##T, \
        sj_cuda_moe_permute_forward_##T, sj_cuda_moe_permute_backward_##T, \
        sj_cuda_moe_unpermute_forward_##T, sj_cuda_moe_unpermute_backward_##T, \
        sj_cuda_moe_matmul_##T, sj_cuda_moe_matmul_wgrad_##T,     \
        sj_cuda_sumsq, sj_cuda_adamw_##T, sj_cuda_lion_##T,        \
        sj_cuda_sgd_##T, sj_cuda_adafactor_##T, sj_cuda_muon_momentum, \
        sj_cuda_muon_normalize_##T, sj_cuda_muon_apply_##T,        \
        sj_cuda_mla_pack_forward_##T, sj_cuda_mla_pack_backward_##T, \
        sj_cuda_head_slice_forward_##T, sj_cuda_head_slice_backward_##T, \
        sj_cuda_scan_forward_##T, sj_cuda_scan_backward_##T,       \
        sj_cuda_conv1d_silu_forward_##T, sj_cuda_conv1d_silu_backward_##T, \
        sj_cuda_ssd_prep_forward_##T, sj_cuda_ssd_prep_backward_##T, \
        sj_cuda_ssd_skip_forward_##T, sj_cuda_ssd_skip_backward_##T, \
        sj_cuda_gated_rmsnorm_forward_##T, sj_cuda_gated_rmsnorm_backward_##T, \
        sj_cuda_linear_prep_forward_##T, sj_cuda_linear_prep_backward_##T, \
        sj_cuda_linear_norm_forward_##T, sj_cuda_linear_norm_backward_##T, \
        ctx_create, ctx_free, bind, sync,                          \
        pinned_alloc, pinned_free,                                 \
        capture_begin, capture_end, graph_launch, graph_free,      \
    }

/* The fused projections are Hopper tensor-core kernels (gemm_sm90.cu): none in f32. */
extern "C" const sj_backend sj_cuda_backend_f32 = SJ_CU_TABLE(f32, SJ_F32, NULL, NULL);
extern "C" const sj_backend sj_cuda_backend_bf16 =
    SJ_CU_TABLE(bf16, SJ_BF16, sj_cuda_matmul_swiglu_bf16, sj_cuda_matmul_rope_bf16);
extern "C" const sj_backend sj_cuda_backend_f16 =
    SJ_CU_TABLE(f16, SJ_F16, sj_cuda_matmul_swiglu_f16, sj_cuda_matmul_rope_f16);
