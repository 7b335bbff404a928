// Which (query block, batch, head) a CTA of a query-parallel kernel owns (the forward and the
// deterministic dQ kernel share the grid layout), and its base pointers.
#pragma once
#include "attention/params.cuh"

// Which (query block, batch, head) a CTA owns. Rebuilt from blockIdx and the parameter bank where a
// pointer is needed instead of being kept live: at 255 registers, every 64-bit pointer held across the
// main loop is a spill.
struct BlockCoords {
    int m_block, b, h, hk;
    __device__ __forceinline__ explicit BlockCoords(const AttentionParams& p) {
        // Heaviest query blocks first: with causal masking the last blocks see the most keys.
        const int bh_count = p.batch * p.heads_q;
        m_block = p.num_m_blocks - 1 - (int)(blockIdx.x / bh_count);
        const int bh = blockIdx.x % bh_count;
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
