// The sequence a work tile belongs to: how many of its query and key rows take part and where its first
// row sits in the q / k views. Dense batches take the lengths from the parameter block (every sequence has
// seqlen_q x seqlen_k, row 0 at the batch stride); variable-length ones (cu_seqlens, FlashAttention-3's
// seqused) read them from device memory here. The host does not read those values (that would synchronize
// it), so they are clamped: whatever they hold, every row touched lies inside the q / k views.
#pragma once
#include "attention/params.cuh"
#include "attention/block_coords.cuh"

// VARLEN is the kernel's CF_VARLEN: false compiles every lookup away (the dense sequence is the parameter
// block's seqlen_q x seqlen_k, first row 0), so dense variants are the code they were without this header.

// First row of sequence b in a packed view of `total` rows.
template <bool VARLEN>
__device__ __forceinline__ int seq_first_row(const int* cu, int total, int b) {
    return VARLEN ? min(max(cu[b], 0), total) : 0;
}

// The lengths of sequence b, kept by a kernel for its masks and clipping. The first rows are not kept: the
// pointer helpers below re-read them where a pointer is formed, as BlockCoords is rebuilt, so that no
// 64-bit offset is held across the main loop.
template <bool VARLEN>
struct SeqContext {
    int seqlen_q, seqlen_k;  // rows of this sequence that take part (the masks align to these)

    __device__ __forceinline__ SeqContext(const AttentionParams& p, int b)
        : seqlen_q(length(p.cu_seqlens_q, p.seqused_q, p.total_q, p.seqlen_q, b)),
          seqlen_k(length(p.cu_seqlens_k, p.seqused_k, p.total_k, p.seqlen_k, b)) {}

private:
    // cu_seqlens and seqused are both optional in a variable-length call (seqused alone shortens dense rows).
    __device__ __forceinline__ static int length(const int* cu, const int* used, int total, int dense_len, int b) {
        if (!VARLEN) return dense_len;
        int len = dense_len;
        if (cu != nullptr) {
            const int start = min(max(cu[b], 0), total);
            len = min(max(cu[b + 1], start), total) - start;
        }
        return used != nullptr ? min(max(used[b], 0), len) : len;
    }
};

// Pointers to the first row of this CTA's sequence (BlockCoords of the query-parallel kernels).
template <bool VARLEN>
__device__ __forceinline__ const u16* seq_q_ptr(const AttentionParams& p, const BlockCoords& c) {
    return q_ptr(p, c) + (i64)seq_first_row<VARLEN>(p.cu_seqlens_q, p.total_q, c.b) * p.q_row_stride;
}
template <bool VARLEN>
__device__ __forceinline__ const u16* seq_k_ptr(const AttentionParams& p, const BlockCoords& c) {
    return k_ptr(p, c) + (i64)seq_first_row<VARLEN>(p.cu_seqlens_k, p.total_k, c.b) * p.k_row_stride;
}
template <bool VARLEN>
__device__ __forceinline__ const u16* seq_v_ptr(const AttentionParams& p, const BlockCoords& c) {
    return v_ptr(p, c) + (i64)seq_first_row<VARLEN>(p.cu_seqlens_k, p.total_k, c.b) * p.v_row_stride;
}
template <bool VARLEN>
__device__ __forceinline__ u16* seq_o_ptr(const AttentionParams& p, const BlockCoords& c) {
    return o_ptr(p, c) + (i64)seq_first_row<VARLEN>(p.cu_seqlens_q, p.total_q, c.b) * p.o_row_stride;
}
template <bool VARLEN>
__device__ __forceinline__ float* seq_lse_ptr(const AttentionParams& p, const BlockCoords& c) {
    return lse_ptr(p, c) + seq_first_row<VARLEN>(p.cu_seqlens_q, p.total_q, c.b);
}
