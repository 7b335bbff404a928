// The sequence a work tile of a variable-length batch belongs to (cu_seqlens, FlashAttention-3's seqused):
// how many of its query and key rows take part and where its first rows sit in the packed q / k views.
// The host does not read these values (that would synchronize it), so they are clamped here: whatever
// they hold, every row touched lies inside the packed views. Kernels include this only in their
// variable-length build (CF_VARLEN), so that their dense build is the code it was without it.
#pragma once
#include "attention/params.cuh"

// First row of sequence b in a packed view of `total` rows.
__device__ __forceinline__ int seq_first_row(const int* cu, int total, int b) { return min(max(cu[b], 0), total); }

// The lengths of sequence b, which a kernel keeps for its masks and clipping. The first rows are re-read
// (seq_first_row) where a pointer is formed, as BlockCoords is rebuilt, so that no 64-bit offset is held
// across the main loop.
struct SeqContext {
    int seqlen_q, seqlen_k;  // rows of this sequence that take part (the masks align to these)

    __device__ __forceinline__ SeqContext(const AttentionParams& p, int b)
        : seqlen_q(length(p.cu_seqlens_q, p.seqused_q, p.total_q, b)),
          seqlen_k(length(p.cu_seqlens_k, p.seqused_k, p.total_k, b)) {}

private:
    __device__ __forceinline__ static int length(const int* cu, const int* used, int total, int b) {
        const int start = seq_first_row(cu, total, b);
        const int len = min(max(cu[b + 1], start), total) - start;
        return used != nullptr ? min(max(used[b], 0), len) : len;
    }
};
