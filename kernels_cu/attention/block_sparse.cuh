// Block sparsity (CF_BLOCK_SPARSE; cuflash/block_mask.py builds the tables): for each (batch, head, tile)
// of a kernel's grid, a list of the tiles on the other side that it visits, each with the index of its
// block's element mask in a store of partial-block masks (-1: a full block, attended without one). The
// lists are at the kernel's own tile granularity, whose tiles nest inside the mask's blocks, so an entry
// names one block and a tile reads its element mask from that block alone. Causal and window visibility
// are folded into the lists and the masks by the host, so the kernels' builds for them are not needed.
// The store is bool (P, block_q, block_k) at p.attn_mask with p.mask_row_stride = block_k and column
// stride 1, so the element-mask code of attn_mask.cuh reads it through partial_mask_head's pointer.
#pragma once
#include "attention/params.cuh"

// Row `tile` of (b, h)'s lists (h: the query head in the forward, the KV head in the backward).
__device__ __forceinline__ i64 block_row(const AttentionParams& p, int b, int h, int tile) {
    return (i64)b * p.block_batch_stride + (i64)h * p.block_head_stride + tile;
}
__device__ __forceinline__ int2 block_entry(const AttentionParams& p, i64 row, int pos) {
    return p.block_lists[row * p.block_list_len + pos];
}
__device__ __forceinline__ int block_count(const AttentionParams& p, i64 row) { return p.block_counts[row]; }

// A pointer `head` into the store such that head + i * block_k + j is element (i, j) of partial block
// `pidx`, the block that holds query i0 and key j0 (attn_mask_head's role for a dense mask).
__device__ __forceinline__ const unsigned char* partial_mask_head(const AttentionParams& p, int pidx, int i0, int j0) {
    const i64 bk = p.mask_row_stride;
    const i64 first_row = i0 - i0 % p.block_q, first_col = j0 - j0 % bk;  // (once a tile)
    return (const unsigned char*)p.attn_mask + ((i64)pidx * p.block_q - first_row) * bk - first_col;
}
