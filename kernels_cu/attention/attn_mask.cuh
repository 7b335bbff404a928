// An element mask over the scores (CF_ATTN_MASK; SDPA's attn_mask, broadcast to (batch, heads_q, seqlen_q,
// seqlen_k) through its strides, a broadcast dimension with stride 0): 1 = boolean, one byte per element,
// nonzero = attend; 2 = additive, q's 16-bit dtype, added to the scaled score (natural-log units, so the
// kernels take score_mods.cuh's scaled form: ADD). Built into the dense forward and backward kernels, sm80
// and Hopper. Here elements are read straight from global memory where a score needs them (a mask is read
// once per (query, key) pair a CTA computes, as the scores are); the Hopper kernels stage boolean masks of
// 16-byte aligned rows in shared memory instead (CF_MASK_STAGE, fwd_sm90.cu and bwd_sm90.cu).
#pragma once
#include "attention/build_flags.cuh"
#include "attention/params.cuh"
#include "attention/score_mods.cuh"
#include "ptx/cp_async.cuh"

constexpr bool kAdditiveMask = CF_ATTN_MASK == 2;
constexpr int kMaskBytes = kAdditiveMask ? 2 : 1;
static_assert(CF_ATTN_MASK >= 0 && CF_ATTN_MASK <= 2, "CF_ATTN_MASK: 0 none, 1 boolean, 2 additive");

// The first mask byte of (batch b, query head h).
__device__ __forceinline__ const unsigned char* attn_mask_head(const AttentionParams& p, int b, int h) {
    return (const unsigned char*)p.attn_mask + ((i64)b * p.mask_batch_stride + (i64)h * p.mask_head_stride) * kMaskBytes;
}

// The term query i and key j add to their scaled score: 0 or -inf (boolean), the mask's value (additive).
__device__ __forceinline__ float attn_mask_term(const unsigned char* head, const AttentionParams& p, int i, int j) {
    const unsigned char* e = head + ((i64)i * p.mask_row_stride + (i64)j * p.mask_col_stride) * kMaskBytes;
    if (kAdditiveMask) return to_float(*(const u16*)e);
    return *e ? 0.f : -CF_INF;
}

// attn_mask_term inside the (seqlen_q, seqlen_k) problem, 0 outside it without a read (the visibility mask
// removes those elements): what every kernel adds per score.
__device__ __forceinline__ float attn_mask_add(const unsigned char* head, const AttentionParams& p, int i, int j,
                                               int seqlen_q, int seqlen_k) {
    return i < seqlen_q && j < seqlen_k ? attn_mask_term(head, p, i, j) : 0.f;
}

// Adds the mask's terms to a warp's score tile (score_mods.cuh's layout): a pointer per row (rows past
// seqlen_q skipped), then each element's offset its compile-time column n * 8 + e times the column stride.
// (Offsets from one pointer for all of a thread's elements made the Hopper forward spill 4-104 bytes at head
// dim 128; this form, none but one variant's 4, which -O1 removes.)
template <int MS, int NT8>
__device__ __forceinline__ void apply_attn_mask(float (&sc)[MS][NT8][4], const TileCoords<MS, NT8>& tc,
                                                const AttentionParams& p, const unsigned char* head, int seqlen_q,
                                                int seqlen_k) {
    const i64 col_step = p.mask_col_stride * kMaskBytes;
    const int col0 = tc.col(0, 0);
    const int cols = seqlen_k - col0;  // this thread's columns n * 8 + e below this exist
#pragma unroll
    for (int s = 0; s < MS; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = tc.row(s, 2 * hh);
            if (i >= seqlen_q) continue;
            const unsigned char* row = head + ((i64)i * p.mask_row_stride * kMaskBytes + (i64)col0 * col_step);
#pragma unroll
            for (int n = 0; n < NT8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (n * 8 + e >= cols) continue;
                    const unsigned char* el = row + (n * 8 + e) * col_step;
                    sc[s][n][2 * hh + e] += kAdditiveMask ? to_float(*(const u16*)el) : (*el ? 0.f : -CF_INF);
                }
        }
}

// Staged boolean masks (CF_MASK_STAGE, the Hopper kernels): a warpgroup's ROWS x (16 CHUNKS) bytes of the mask,
// queries i0.. by keys j0.., in shared memory, a row's 16-byte chunk c at chunk c ^ ((row >> SHIFT) % CHUNKS):
// the swizzle that spreads the rows one warp reads at once over different bank groups (SHIFT 0 when those
// are consecutive rows, 1 when they are every other row).
template <int CHUNKS, int SHIFT>
__device__ __forceinline__ u32 staged_mask_offset(int row, int chunk) {
    return row * CHUNKS * 16 + ((chunk ^ ((row >> SHIFT) % CHUNKS)) << 4);
}

// Issues the copies of one staged tile with 16-byte cp.async (one commit group): bytes past seqlen_q or
// seqlen_k are zero-filled, i.e. masked (those scores are masked or never stored anyway). The rows must be
// 16-byte aligned runs of bytes (dispatch.mask_stageable).
template <int ROWS, int CHUNKS, int SHIFT, int THREADS>
__device__ __forceinline__ void stage_mask_tile(u32 buf, const unsigned char* head, const AttentionParams& p, int i0,
                                                int j0, int tid) {
    static_assert(ROWS * CHUNKS % THREADS == 0 && (CHUNKS & (CHUNKS - 1)) == 0, "whole copies per thread");
#pragma unroll
    for (int k = 0; k < ROWS * CHUNKS / THREADS; ++k) {
        const int c = tid + THREADS * k;
        const int r = c / CHUNKS, cc = c % CHUNKS;
        const int i = i0 + r, j = j0 + cc * 16;
        const int bytes = i < p.seqlen_q ? min(max(p.seqlen_k - j, 0), 16) : 0;
        cp_async_16_bytes(buf + staged_mask_offset<CHUNKS, SHIFT>(r, cc),
                          bytes > 0 ? head + ((i64)i * p.mask_row_stride + j) : head, bytes);
    }
    cp_async_commit();
}
