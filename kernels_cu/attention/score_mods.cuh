// Score modifications and masking on a warp's accumulator tile, shared by the forward and backward.
// Element e of n8 tile n in m16 slab s of a warp sits at row  row0 + 16 s + lane/4 + 8 (e/2)
//                                                    and col  col0 + 8 n + 2 (lane%4) + e%2.
#pragma once
#include "attention/mask.cuh"
#include "ptx/math.cuh"

template <int MS, int NT8>
struct TileCoords {
    int row0, col0, g, t2;
    __device__ __forceinline__ TileCoords(int r0, int c0, int lane) : row0(r0), col0(c0), g(lane >> 2), t2((lane & 3) * 2) {}
    __device__ __forceinline__ int row(int s, int e) const { return row0 + s * 16 + g + (e >> 1) * 8; }
    __device__ __forceinline__ int col(int n, int e) const { return col0 + n * 8 + t2 + (e & 1); }
};

// Turns raw q.k products into final scores: softcap * tanh(scale * x / softcap), then the ALiBi bias
// -slope * |i + off - j|. Without either modification the raw products stay as they are and the softmax
// folds the scale into its exponent instead (one FMA fewer per element). ADD (an additive attn_mask, added
// after this in attn_mask.cuh) needs the scaled form too: its values are natural-log units and may be
// bfloat16's lowest finite value (Hugging Face's masks), which divided by the scale would overflow to -inf
// and turn a row masked whole into an empty one (zeros) where the math has the uniform average.
template <int MS, int NT8, bool SOFTCAP, bool ALIBI, bool ADD = false>
__device__ __forceinline__ void apply_score_mods(float (&sc)[MS][NT8][4], const TileCoords<MS, NT8>& tc,
                                                 float softmax_scale, float softcap, float slope, int off) {
    if (!SOFTCAP && !ALIBI && !ADD) return;
    const float pre = SOFTCAP ? softmax_scale / softcap : softmax_scale;
#pragma unroll
    for (int s = 0; s < MS; ++s)
#pragma unroll
        for (int n = 0; n < NT8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = sc[s][n][e] * pre;
                if (SOFTCAP) x = softcap * tanh_accurate(x);
                if (ALIBI) x -= slope * fabsf((float)(tc.row(s, e) + off - tc.col(n, e)));
                sc[s][n][e] = x;
            }
}

// The factor that turns the values the softmax sees into natural-log scores: raw q.k products still need
// softmax_scale, while apply_score_mods has applied it already when softcap, ALiBi or an additive mask is on.
template <bool SOFTCAP, bool ALIBI, bool ADD = false>
__device__ __forceinline__ float natural_score_scale(float softmax_scale) {
    return (SOFTCAP || ALIBI || ADD) ? 1.f : softmax_scale;
}

// Per row, the visible columns relative to this thread's first one are [lo, hi]; an element's own offset
// n * 8 + (e & 1) is a compile-time constant, so each element costs two compares against immediates and a
// select, instead of rebuilding its (row, column) pair and testing Visibility::visible's three bounds.
// LEFT = false drops the lo compare, for tiles no window's left edge crosses (mask_tile decides).
template <int MS, int NT8, bool LEFT>
__device__ __forceinline__ void apply_mask(float (&sc)[MS][NT8][4], const TileCoords<MS, NT8>& tc, const Visibility& vis) {
    const int col = tc.col(0, 0);
#pragma unroll
    for (int s = 0; s < MS; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = tc.row(s, 2 * hh);
            const int hi = min(vis.seqlen_k - 1, i + vis.off + vis.window_right) - col;
            const int lo = i + vis.off - vis.window_left - col;
#pragma unroll
            for (int n = 0; n < NT8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (n * 8 + e > hi || (LEFT && n * 8 + e < lo)) sc[s][n][2 * hh + e] = -CF_INF;
        }
}

// Masks the score tile of queries [i0, i1] x keys [j0, j0 + bn) only as far as it needs: interior tiles not
// at all, and the left window bound only where some row's left edge crosses the tile (never with causal
// masking or a tail tile alone), which saves a compare per element.
template <bool IS_LOCAL, int MS, int NT8>
__device__ __forceinline__ void mask_tile(float (&sc)[MS][NT8][4], const TileCoords<MS, NT8>& tc, const Visibility& vis,
                                          int i0, int i1, int j0, int bn) {
    if (!vis.tile_needs_mask<IS_LOCAL>(i0, i1, j0, bn)) return;
    if (IS_LOCAL && vis.tile_crosses_left_edge(i1, j0)) apply_mask<MS, NT8, true>(sc, tc, vis);
    else apply_mask<MS, NT8, false>(sc, tc, vis);
}
