/* attention.cuh — which (query, key) pairs causal attention keeps, within
 * an optional sliding window, and which 64-row tiles hold any: one
 * definition for the kernels of attention.cu and attention_sm90.cu, so
 * that all of them visit, skip and mask the same tiles. window 0: every
 * earlier key; window > 0: query q sees keys q - window < k <= q. Tiles
 * wholly outside the window are never visited, so work is linear in T. */
#pragma once

namespace attn {

constexpr int TILE = 64;   /* query and key rows per tile, every kernel */

__host__ __device__ __forceinline__ bool visible(int q, int k, int window) {
    return k <= q && (window == 0 || q - k < window);
}
/* The first key query q sees. */
__host__ __device__ __forceinline__ int first_key(int q, int window) {
    return window > 0 && q >= window ? q - window + 1 : 0;
}
/* Every pair of query tile qt and key tile kt visible: no mask needed. */
__host__ __device__ __forceinline__ bool tile_unmasked(int qt, int kt, int window) {
    return kt < qt && (window == 0 || (qt - kt) * TILE + TILE - 1 < window);
}
/* The first key tile that query tile qt sees (its first row's first key). */
__host__ __device__ __forceinline__ int first_key_tile(int qt, int window) {
    return first_key(qt * TILE, window) / TILE;
}
/* The last query tile, of n_qt, that sees key tile kt (its last key's last query). */
__host__ __device__ __forceinline__ int last_query_tile(int kt, int n_qt, int window) {
    const int last = window == 0 ? n_qt - 1 : (kt * TILE + TILE - 1 + window - 1) / TILE;
    return last < n_qt - 1 ? last : n_qt - 1;
}

}  // namespace attn
