// Which (query block, batch, head) a CTA of a query-parallel kernel owns (the forward and the
// deterministic dQ kernel share the grid layout), and its base pointers.
#pragma once
#include "attention/params.cuh"

// Which (query block, batch, head) a CTA owns. Rebuilt from blockIdx and the parameter bank where a
// pointer is needed instead of being kept live: at 255 registers, every 64-bit pointer held across the
// main loop is a spill.
struct BlockCoords {
    int m_block, b, h, hk;
    // Query-block-major order, heaviest query blocks first (with causal masking the last blocks see the
    // most keys): cheap enough to rebuild inside the sm80 kernels' loops.
    __device__ __forceinline__ explicit BlockCoords(const AttentionParams& p) {
        const int bh_count = p.batch * p.heads_q;
        m_block = p.num_m_blocks - 1 - (int)(blockIdx.x / bh_count);
        set_head(p, blockIdx.x % bh_count);
    }

    // L2-grouped order of work tile `tile` (the Hopper forward): (batch, head) pairs are taken in groups of p.bh_group, sized
    // on the host so that one group's K and V fit in L2; inside a group, query blocks go heaviest first
    // and each wave spreads over the group's heads, which then read the same K/V tiles from L2 instead
    // of DRAM (at seqlen 2k, head dim 128 this is 1.5x faster than the query-block-major order).
    __device__ __forceinline__ static BlockCoords grouped(const AttentionParams& p, int tile) {
        const int per_group = p.bh_group * p.num_m_blocks;
        const int group = tile / per_group;
        const int first = group * p.bh_group;
        const int width = min(p.bh_group, p.batch * p.heads_q - first);
        const int r = tile - group * per_group;
        return BlockCoords(p, p.num_m_blocks - 1 - r / width, first + r % width);
    }

    // Work tile `tile` of a block-sparse launch (block_sparse.cuh): the host orders them by list length,
    // longest first, so that the static schedule pairs heavy tiles with light ones instead of ending on a
    // long one; tiles of equal length keep query-block order within a head, whose neighbours share K / V.
    __device__ __forceinline__ static BlockCoords listed(const AttentionParams& p, int tile) {
        const int cell = p.block_order[tile];
        return BlockCoords(p, cell % p.num_m_blocks, cell / p.num_m_blocks);
    }

private:
    __device__ __forceinline__ BlockCoords(const AttentionParams& p, int m, int bh) : m_block(m) { set_head(p, bh); }
    __device__ __forceinline__ void set_head(const AttentionParams& p, int bh) {
        b = bh / p.heads_q;
        h = bh % p.heads_q;
        hk = h / (p.heads_q / p.heads_k);
    }
};
__device__ __forceinline__ const u16* q_ptr(const AttentionParams& p, const BlockCoords& c) {
    return (const u16*)p.q + (i64)c.b * p.q_batch_stride + (i64)c.h * p.q_head_stride;
}
__device__ __forceinline__ const u16* k_ptr(const AttentionParams& p, const BlockCoords& c) {
    return (const u16*)p.k + (i64)c.b * p.k_batch_stride + (i64)c.hk * p.k_head_stride;
}
__device__ __forceinline__ const u16* v_ptr(const AttentionParams& p, const BlockCoords& c) {
    return (const u16*)p.v + (i64)c.b * p.v_batch_stride + (i64)c.hk * p.v_head_stride;
}
__device__ __forceinline__ u16* o_ptr(const AttentionParams& p, const BlockCoords& c) {
    return (u16*)p.o + (i64)c.b * p.o_batch_stride + (i64)c.h * p.o_head_stride;
}
__device__ __forceinline__ float* lse_ptr(const AttentionParams& p, const BlockCoords& c) {
    return p.lse + ((i64)c.b * p.heads_q + c.h) * p.seqlen_q;
}
