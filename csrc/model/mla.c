/* mla.c — the mla mixer: DeepSeek-V2/V3 multi-head latent attention
 * (transformers' DeepseekV3Attention is the reference) recorded from tape
 * ops. Per layer:
 *   q      = q_b_proj(rmsnorm(q_a_proj(h)))   or wq(h)         (N, H*(dn+dr))
 *   ckv    = kv_a_proj rows [0, kvr)     @ h, normed           (N, kvr)  the latent
 *   kpe    = kv_a_proj rows [kvr, kvr+dr) @ h                   (N, dr)   one key for all heads
 *   kv     = kv_b_proj(ckv)                                    (N, H*(dn+dv)) k_nope, v
 *   out    = attention(q, (k_nope, rope(kpe)), v) per head, scale 1/sqrt(dn+dr)
 * Attention is the existing op at head dim dn+dr with each v head padded by
 * zeros to that size (mla_pack), and the padding sliced off its output
 * (head_slice): the padded columns of the output are exactly zero, so the
 * result and every gradient are the unpadded ones, and the CPU and CUDA
 * attention kernels (flash forward and backward) serve unchanged. The cost is
 * dn+dr-dv wasted columns in P V (DeepSeek-V3: 192 vs 128), against a second
 * head dim through every attention kernel. kv_a_proj is one tensor whose two
 * row ranges are read as two matmuls, so the latent's norm needs no strided
 * kernel. Generation (infer/mla.c) caches only ckv and rope(kpe). */
#include "model.h"

int64_t sj_mla_param_count(const sj_config *c) {
    const sj_mla *a = &c->mla;
    const int64_t C = c->dim, H = c->n_heads, hq = a->qk_nope_head_dim + a->qk_rope_head_dim,
                  qr = a->q_lora_rank, kvr = a->kv_lora_rank;
    const int64_t q = qr ? qr * C + qr + H * hq * qr : H * hq * C;
    return q + (kvr + a->qk_rope_head_dim) * C + kvr + H * (a->qk_nope_head_dim + a->v_head_dim) * kvr +
           C * H * a->v_head_dim;
}

int sj_mla_record(sj_model *m, sj_plan *pl, int l, int h, int end_block) {
    const sj_config *c = &m->cfg;
    const sj_mla *a = &c->mla;
    sj_tape *tp = &pl->tape;
    const int B = pl->B, T = pl->T, N = B * T, C = c->dim, H = c->n_heads,
              dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim,
              hq = dn + dr, qr = a->q_lora_rank, kvr = a->kv_lora_rank;
    #define W(name, row0, rows) sj_model_weight(m, pl, "layers.%d.mla." name, l, row0, rows)
    const int wq = qr ? W("q_a_proj", 0, qr) : sj_model_weight(m, pl, "layers.%d.wq", l, 0, H * hq);
    int q = sj_op_matmul(tp, h, wq, N, qr ? qr : H * hq, C);
    const int ckv = sj_op_matmul(tp, h, W("kv_a_proj", 0, kvr), N, kvr, C);
    const int kpe = sj_op_matmul(tp, h, W("kv_a_proj", kvr, dr), N, dr, C);
    if (end_block && sj_tape_block_end(tp) != SJ_OK) return -1;
    if (qr) {
        q = sj_op_rmsnorm(tp, q, W("q_a_norm", 0, qr), N, qr, SJ_MLA_NORM_EPS);
        q = sj_op_matmul(tp, q, W("q_b_proj", 0, H * hq), N, H * hq, qr);
    }
    const int latent = sj_op_rmsnorm(tp, ckv, W("kv_a_norm", 0, kvr), N, kvr, SJ_MLA_NORM_EPS);
    const int kv = sj_op_matmul(tp, latent, W("kv_b_proj", 0, H * (dn + dv)), N, H * (dn + dv), kvr);
    #undef W
    const int qkv = sj_op_mla_pack(tp, q, kv, kpe, B, T, H, dn, dr, dv, &pl->rope_mla);
    const int att = sj_op_attention(tp, qkv, B, T, H, H, hq, 0);
    return sj_op_head_slice(tp, att, N, H, hq, dv);
}
