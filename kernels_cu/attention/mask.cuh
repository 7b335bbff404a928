// Which keys a query sees, and which tiles can be skipped or need no mask.
// Bottom-right alignment (FlashAttention >= 2.1): with off = seqlen_k - seqlen_q, query i sees key j iff
//   j < seqlen_k  and  i + off - window_left <= j <= i + off + window_right.
// Causal is window_right = 0. Unbounded sides arrive as seqlen_q + seqlen_k (see params.cuh).
#pragma once

struct Visibility {
    int off, window_left, window_right, seqlen_q, seqlen_k;

    __device__ __forceinline__ Visibility(int sq, int sk, int wl, int wr)
        : off(sk - sq), window_left(wl), window_right(wr), seqlen_q(sq), seqlen_k(sk) {}

    __device__ __forceinline__ bool visible(int i, int j) const {
        return j < seqlen_k && j <= i + off + window_right && j >= i + off - window_left;
    }

    // Key tiles of width bn that queries [i0, i1] can see: [*lo, *hi). Empty when *hi <= *lo.
    __device__ __forceinline__ void key_tiles(int i0, int i1, int bn, int* lo, int* hi) const {
        const int last = min(seqlen_k - 1, i1 + off + window_right);
        const int first = max(0, i0 + off - window_left);
        *lo = first / bn;
        *hi = last < first ? *lo : last / bn + 1;
    }

    // Query tiles of height bm that can see keys [j0, j1]: [*lo, *hi).
    __device__ __forceinline__ void query_tiles(int j0, int j1, int bm, int* lo, int* hi) const {
        const int first = max(0, j0 - off - window_right);
        const int last = min(seqlen_q - 1, j1 - off + window_left);
        *lo = first / bm;
        *hi = last < first ? *lo : last / bm + 1;
    }

    // True when some (query in [i0, i1], key in [j0, j0 + bn)) pair is invisible, i.e. the tile needs
    // per-element masking. Interior tiles skip the mask entirely.
    template <bool IS_LOCAL>
    __device__ __forceinline__ bool tile_needs_mask(int i0, int i1, int j0, int bn) const {
        if (j0 + bn > seqlen_k) return true;
        if (!IS_LOCAL) return false;
        return (j0 + bn - 1 > i0 + off + window_right) || tile_crosses_left_edge(i1, j0);
    }

    // True when some query in [.., i1] has its window's left edge past key j0 (only then does a mask of
    // the tile starting at j0 need the left bound).
    __device__ __forceinline__ bool tile_crosses_left_edge(int i1, int j0) const { return j0 < i1 + off - window_left; }
};
