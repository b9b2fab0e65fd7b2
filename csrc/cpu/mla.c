/* mla.c — multi-head latent attention's layout ops (model/mla.c): its q, k
 * and v heads packed into attention's qkv with RoPE on the pe parts, and the
 * slice that drops the v heads' padding from attention's output. Forward and
 * backward; threaded over rows. RoPE turned as rope.c turns it (ops/backend.h). */
#include "cpu.h"
#include <string.h>

typedef struct {
    float *out, *dq, *dkv, *dkpe; const float *q, *kv, *kpe, *dout;
    int T, H, dn, dr, dv, acc_q, acc_kv, acc_kpe;
    const sj_rope *rope;
} pack_job;

static void put(float *y, const float *x, int n, int accum) {
    if (accum) for (int i = 0; i < n; i++) y[i] += x[i];
    else memcpy(y, x, sizeof(float) * (size_t)n);
}

static void pack_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const pack_job *j = ctx;
    const int H = j->H, dn = j->dn, dr = j->dr, dv = j->dv, hq = dn + dr, half = dr / 2;
    float cs[half], sn[half];
    for (int64_t r = r0; r < r1; r++) {
        sj_rope_angles(j->rope, (int)(r % j->T), 0, half, cs, sn);
        const float *q = j->q + r * H * hq, *kv = j->kv + r * H * (dn + dv), *kpe = j->kpe + r * dr;
        float *o = j->out + r * 3 * H * hq;
        for (int h = 0; h < H; h++) {
            float *oq = o + h * hq, *ok = o + (H + h) * hq, *ov = o + (2 * H + h) * hq;
            const float *kvh = kv + h * (dn + dv);
            memcpy(oq, q + h * hq, sizeof(float) * dn);
            sj_rope_turn(oq + dn, q + h * hq + dn, cs, sn, half, 0);
            memcpy(ok, kvh, sizeof(float) * dn);
            sj_rope_turn(ok + dn, kpe, cs, sn, half, 0);
            memcpy(ov, kvh + dn, sizeof(float) * dv);
            memset(ov + dv, 0, sizeof(float) * (hq - dv));
        }
    }
}

static void pack_back_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const pack_job *j = ctx;
    const int H = j->H, dn = j->dn, dr = j->dr, dv = j->dv, hq = dn + dr, half = dr / 2;
    float cs[half], sn[half];
    for (int64_t r = r0; r < r1; r++) {
        sj_rope_angles(j->rope, (int)(r % j->T), 1, half, cs, sn);
        const float *g = j->dout + r * 3 * H * hq;
        for (int h = 0; h < H; h++) {
            const float *gq = g + h * hq, *gk = g + (H + h) * hq, *gv = g + (2 * H + h) * hq;
            if (j->dq) {
                float *dq = j->dq + r * H * hq + h * hq;
                put(dq, gq, dn, j->acc_q);
                sj_rope_turn(dq + dn, gq + dn, cs, sn, half, j->acc_q);
            }
            if (j->dkv) {
                float *dkv = j->dkv + r * H * (dn + dv) + h * (dn + dv);
                put(dkv, gk, dn, j->acc_kv);
                put(dkv + dn, gv, dv, j->acc_kv);
            }
            /* the shared key: the first head sets (or adds), the rest add */
            if (j->dkpe) sj_rope_turn(j->dkpe + r * dr, gk + dn, cs, sn, half, j->acc_kpe || h > 0);
        }
    }
}

// out: (B, T, 3*H*(dn+dr)); q: (B, T, H*(dn+dr)); kv: (B, T, H*(dn+dv)); kpe: (B, T, dr)
void sj_cpu_mla_pack_forward(void *out, const void *q, const void *kv, const void *kpe, int B,
                             int T, int H, int dn, int dr, int dv, const sj_rope *rope) {
    pack_job j = { .out = out, .q = q, .kv = kv, .kpe = kpe, .T = T, .H = H, .dn = dn, .dr = dr,
                   .dv = dv, .rope = rope };
    sj_parallel_for((int64_t)B * T, 16, pack_rows, &j);
}

void sj_cpu_mla_pack_backward(void *dq, void *dkv, void *dkpe, const void *dout, int B, int T,
                              int H, int dn, int dr, int dv, const sj_rope *rope, int accum_q,
                              int accum_kv, int accum_kpe) {
    pack_job j = { .dq = dq, .dkv = dkv, .dkpe = dkpe, .dout = dout, .T = T, .H = H, .dn = dn,
                   .dr = dr, .dv = dv, .acc_q = accum_q, .acc_kv = accum_kv,
                   .acc_kpe = accum_kpe, .rope = rope };
    sj_parallel_for((int64_t)B * T, 16, pack_back_rows, &j);
}

typedef struct { float *dst; const float *src; int H, hd_in, hd_out, back, accum; } slice_job;

static void slice_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const slice_job *j = ctx;
    for (int64_t r = r0; r < r1; r++)
        for (int h = 0; h < j->H; h++) {
            const int64_t wide = (r * j->H + h) * j->hd_in, narrow = (r * j->H + h) * j->hd_out;
            if (!j->back) { memcpy(j->dst + narrow, j->src + wide, sizeof(float) * j->hd_out); continue; }
            put(j->dst + wide, j->src + narrow, j->hd_out, j->accum);
            if (!j->accum) memset(j->dst + wide + j->hd_out, 0, sizeof(float) * (j->hd_in - j->hd_out));
        }
}

// in: (N, H*hd_in) -> out: (N, H*hd_out)
void sj_cpu_head_slice_forward(void *out, const void *in, int N, int H, int hd_in, int hd_out) {
    slice_job j = { out, in, H, hd_in, hd_out, 0, 0 };
    sj_parallel_for(N, 64, slice_rows, &j);
}

void sj_cpu_head_slice_backward(void *din, const void *dout, int N, int H, int hd_in, int hd_out,
                                int accum) {
    slice_job j = { din, dout, H, hd_in, hd_out, 1, accum };
    sj_parallel_for(N, 64, slice_rows, &j);
}
