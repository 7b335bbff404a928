// FlashAttention-2 forward for sm_80 and newer: mma.sync m16n8k16 (fp32 accumulation), ldmatrix,
// cp.async, XOR-swizzled shared memory, online softmax in registers, P kept in registers.
//
// One CTA owns BLOCK_M query rows of one (batch, head) and streams the visible key tiles from last to
// first: the first tile processed is the only one that can hold the seqlen_k tail, and causal/window
// diagonals are the first few, so the mask branch is taken only on boundary tiles. Warps split the query
// rows (MS m16 slabs each) and never share softmax state.
//
// Compile-time configuration (defines set by cuflash/dispatch.py):
//   CF_DTYPE (CF_FP16 / CF_BF16), CF_HEAD_DIM (multiple of 64; the real head_dim may be smaller and is
//   zero-padded on load), CF_BLOCK_M, CF_BLOCK_N, CF_WARPS, CF_MIN_BLOCKS, CF_IS_LOCAL (causal or
//   window), CF_SOFTCAP, CF_ALIBI, CF_VARLEN (optional, default 0).
//
// An element mask (CF_ATTN_MASK, optional, default 0; attn_mask.cuh): each score tile takes the mask's terms
// after the visibility mask; a row the mask leaves without keys gives zeros and LSE +inf as any empty row.
//
// Variable-length batches (CF_VARLEN, seq_context.cuh): a CTA's rows and keys are those of its sequence;
// the q, k, v, o, lse pointers start at the sequence's first row and every load is clipped at its length,
// so a tile never reads the next sequence's rows. The grid covers max_seqlen_q rows per sequence; CTAs
// past their sequence's end return at once. Rows are addressed through seq_rows.cuh.
//
// Split-KV (CF_SPLIT_KV, optional, default 0; decoding, where batch x heads x query blocks leaves most SMs
// idle): gridDim.y CTAs share a query block's visible key tiles in contiguous runs, and each writes its
// normalized partial output (fp32) and LSE to o_accum / lse_accum; merge_states.cu combines them. A split
// whose run is empty writes 0 and LSE +inf, which the merge skips.
//
// Dropout (CF_DROPOUT, optional, default 0): the probabilities of P.V are dropped by philox.cuh's draws for
// (batch, head, query row, key) and the kept ones scaled by 1 / (1 - p), as cuflash/dropout.py keys them.
//
// Paged K / V (CF_PAGED, optional, default 0; with CF_VARLEN): a sequence's key rows come through its row of
// the block table (pages of any size: smem_tile.cuh PagedRows, load_async_rows); its queries as without paging.
#include "ptx/cp_async.cuh"
#include "attention/params.cuh"
#include "attention/block_coords.cuh"
#define CF_SEQ_BATCH BlockCoords(p).b
#include "attention/seq_rows.cuh"
#include "attention/query_tiles.cuh"
#include "attention/warp_gemm.cuh"
#include "attention/score_mods.cuh"
#include "attention/online_softmax.cuh"

#include "attention/build_flags.cuh"
#if CF_DROPOUT
#include "attention/philox.cuh"
#endif
#if CF_ATTN_MASK
#include "attention/attn_mask.cuh"
#endif
static_assert(!CF_ATTN_MASK || (!CF_SPLIT_KV && !CF_VARLEN && !CF_PAGED && !CF_DROPOUT), "attn_mask: the dense build only");
// (draws keyed by rows within the sequence need the dense layout's row numbers: no varlen, split or paged)
static_assert(!CF_DROPOUT || (!CF_SPLIT_KV && !CF_VARLEN && !CF_PAGED), "dropout: the dense build only");
// The K or V tile of key tile n_block of this CTA's sequence and key/value head into `tile`: with CF_PAGED
// through the tile's physical rows (PagedRows, in one of two stages of kBN ints after the V tile: the next
// tile's rows are written while this tile's V is still being read), else from the sequence's first row.
#if CF_PAGED
#define CF_LOAD_KV(tile, x, n_block)                                                                       \
    KVTile::load_async_rows<kThreads>(tile, (const u16*)p.x + (i64)BlockCoords(p).hk * p.x##_head_stride,    \
                                      page_rows + ((n_block) & 1) * kBN, p.x##_row_stride, p.head_dim, tid)
#else
#define CF_LOAD_KV(tile, x, n_block)                                                                       \
    KVTile::load_async<kThreads>(tile,                                                                     \
                                 x##_ptr(p, BlockCoords(p)) CF_FIRST_ROW(cu_seqlens_k, total_k, x##_row_stride), \
                                 p.x##_row_stride, (n_block) * kBN, CF_SEQLEN_K, p.head_dim, tid)
#endif
// Dynamic shared memory: Q, K and V tiles, and with CF_PAGED two stages of a key tile's physical rows
// (dispatch.forward_smem_bytes computes the same; tests compare the two).
constexpr int kPageRowsBytes = CF_PAGED ? 2 * kBN * (int)sizeof(int) : 0;
extern "C" __device__ const int cf_fwd_sm80_smem_bytes = QTile::kBytes + 2 * KVTile::kBytes + kPageRowsBytes;
#if CF_SPLIT_KV
// The split's partial states are indexed compactly, query i of sequence b at row b * seqlen_q + i (seqlen_q:
// the max_seqlen_q bound), whatever the packing of q: (splits, batch * seqlen_q, heads_q, kD) fp32 outputs
// and (splits, heads_q, batch * seqlen_q) LSEs. Decoding packs a group's query heads as rows spaced heads_q
// apart in q, and the partial states would otherwise span all of them.
__device__ __forceinline__ float* split_output_row(const AttentionParams& p, const BlockCoords& c, int m_start) {
    return p.o_accum + blockIdx.y * p.o_accum_split_stride
           + (((i64)c.b * p.seqlen_q + m_start) * p.heads_q + c.h) * kD;
}
__device__ __forceinline__ float* split_lse_rows(const AttentionParams& p, const BlockCoords& c) {
    return p.lse_accum + blockIdx.y * p.lse_accum_split_stride + (i64)c.h * p.batch * p.seqlen_q
           + (i64)c.b * p.seqlen_q;
}
#endif

extern "C" __global__ void __launch_bounds__(kThreads, CF_MIN_BLOCKS)
attention_fwd_sm80(const __grid_constant__ AttentionParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem);
    const u32 sK = sQ + QTile::kBytes;
    const u32 sV = sK + KVTile::kBytes;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const BlockCoords bc(p);
    const int m_block = bc.m_block;
    const int m_start = m_block * kBM;
#if CF_VARLEN
    const SeqContext seq(p, bc.b);
    if (m_start >= seq.seqlen_q) return;  // past this sequence's rows
#endif
    const int i_last = min(m_start + kBM, CF_SEQLEN_Q) - 1;
    const Visibility vis(CF_SEQLEN_Q, CF_SEQLEN_K, p.window_left, p.window_right);
    int n_lo, n_hi;
    vis.key_tiles(m_start, i_last, kBN, &n_lo, &n_hi);
#if CF_SPLIT_KV
    {
        const int per_split = (n_hi - n_lo + (int)gridDim.y - 1) / (int)gridDim.y;
        n_lo += (int)blockIdx.y * per_split;
        n_hi = min(n_hi, n_lo + per_split);
    }
#endif

    if (n_hi <= n_lo) {
        // No query row of this block sees any key: zeros and LSE = +inf, without touching K or V.
#if CF_SPLIT_KV
        float* lse = split_lse_rows(p, bc);
        float* oa = split_output_row(p, bc, m_start);
        for (int c = tid; c < kBM * kD; c += kThreads)
            if (m_start + c / kD < CF_SEQLEN_Q) oa[(i64)(c / kD) * p.heads_q * kD + c % kD] = 0.f;
#else
        float* lse = CF_ROW_STATS(p.lse, bc.b, bc.h);
        u16* o = o_ptr(p, bc) CF_FIRST_ROW(cu_seqlens_q, total_q, o_row_stride);
        for (int c = tid; c < kBM * (kD / 8); c += kThreads) {
            const int row = c / (kD / 8), col = (c % (kD / 8)) * 8;
            if (m_start + row < CF_SEQLEN_Q && col < p.head_dim)
                *(uint4*)(o + (i64)(m_start + row) * p.o_row_stride + col) = make_uint4(0, 0, 0, 0);
        }
#endif
        for (int row = tid; row < kBM; row += kThreads)
            if (m_start + row < CF_SEQLEN_Q) lse[m_start + row] = CF_INF;
        return;
    }

    const float slope = CF_ALIBI ? p.alibi[(i64)bc.b * p.alibi_batch_stride + bc.h] : 0.f;
    const int warp_row0 = warp * kMS * 16;

    QTile::load_async<kThreads>(sQ, q_ptr(p, BlockCoords(p)) CF_FIRST_ROW(cu_seqlens_q, total_q, q_row_stride),
                                p.q_row_stride, m_start, CF_SEQLEN_Q, p.head_dim, tid);
#if CF_PAGED
    int* const page_rows = (int*)(smem + QTile::kBytes + 2 * KVTile::kBytes);
    PagedRows<kBN, kThreads> next_rows;
    const int* const block_table = p.block_table + (i64)bc.b * p.block_table_batch_stride;
#define CF_STORE_PAGE_ROWS(n_block) next_rows.store(page_rows + ((n_block) & 1) * kBN, p.page_size, p.page_shift, \
                                                   p.num_pages, (n_block) * kBN, CF_SEQLEN_K, tid)
    next_rows.fetch(block_table, p.page_size, p.page_shift, (n_hi - 1) * kBN, CF_SEQLEN_K, tid);
    CF_STORE_PAGE_ROWS(n_hi - 1);
    __syncthreads();
#endif
    CF_LOAD_KV(sK, k, n_hi - 1);
    cp_async_commit();

    float acc_o[kMS][kDT8][4];
    zero_fill(acc_o);
    OnlineSoftmax<kMS, kNT8> softmax;
    const auto q_addr = a_operand<QTile>(sQ, warp_row0, lane);
    const auto k_addr = b_operand<KVTile>(sK, lane);
    const auto v_addr = bt_operand<KVTile>(sV, lane);

    for (int n_block = n_hi - 1; n_block >= n_lo; --n_block) {
        // K of this tile has landed, and every warp is done reading the previous V: V may be overwritten.
        cp_async_wait<0>();
        __syncthreads();
        CF_LOAD_KV(sV, v, n_block);
        cp_async_commit();
#if CF_PAGED
        // The next tile's page indices, loaded now and stored to the other stage after the score tile: the
        // stage's last readers (tile n_block + 1's V and K loads) are behind the barrier above.
        if (n_block > n_lo)
            next_rows.fetch(block_table, p.page_size, p.page_shift, (n_block - 1) * kBN, CF_SEQLEN_K, tid);
#endif

        float sc[kMS][kNT8][4];
        zero_fill(sc);
        gemm_rows_rows<kMS, kBN, kD, QTile, KVTile>(sc, q_addr, k_addr);

        const TileCoords<kMS, kNT8> tc(m_start + warp_row0, n_block * kBN, lane);
        apply_score_mods<kMS, kNT8, CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(sc, tc, p.softmax_scale, p.softcap, slope,
                                                                         vis.off);
        mask_tile<CF_IS_LOCAL>(sc, tc, vis, m_start, i_last, n_block * kBN, kBN);
#if CF_ATTN_MASK
        apply_attn_mask(sc, tc, p, attn_mask_head(p, BlockCoords(p).b, BlockCoords(p).h), CF_SEQLEN_Q, CF_SEQLEN_K);
#endif

#if CF_PAGED
        if (n_block > n_lo) CF_STORE_PAGE_ROWS(n_block - 1);
#endif
        // V of this tile has landed and every warp is done with K: prefetch the next K under softmax + PV.
        cp_async_wait<0>();
        __syncthreads();
        if (n_block > n_lo) {
            CF_LOAD_KV(sK, k, n_block - 1);
            cp_async_commit();
        }

        softmax.update(sc, acc_o, p.scale_log2);
#if CF_DROPOUT
        // After the row sums took every probability (the LSE is the softmax's, before dropout): the dropped
        // ones leave P.V; the kept ones' 1 / (1 - p) is applied to O once, at the end.
        with_dropout_call(p.dropout_rng, p.dropout_seed, p.dropout_offset, [&](const DropoutCall& drop) {
            dropout_fragments(sc, drop.key, drop.offset, (u32)(bc.b * p.heads_q + bc.h), m_start + warp_row0,
                              n_block * kBN, lane, (u32)p.dropout_threshold);
        });
#endif

        gemm_accum_rows<kMS, kBN, kD, KVTile>(acc_o, sc, v_addr);
    }

    float row_lse[kMS][2];
    softmax.finalize(acc_o, row_lse, p.scale_log2,
                     natural_score_scale<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(p.softmax_scale));
#if CF_DROPOUT
#pragma unroll
    for (int s = 0; s < kMS; ++s)
#pragma unroll
        for (int d = 0; d < kDT8; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[s][d][e] *= p.dropout_scale;
#endif

#if CF_SPLIT_KV
    {
        // fp32 partial output straight from the accumulators: two adjacent columns per store.
        const BlockCoords c(p);
        float* oa = split_output_row(p, c, m_start);
        float* lse = split_lse_rows(p, c);
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int s = 0; s < kMS; ++s)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = warp_row0 + s * 16 + g + hh * 8;
                if (m_start + row >= CF_SEQLEN_Q) continue;
                float* dst = oa + (i64)row * p.heads_q * kD + t * 2;
#pragma unroll
                for (int d = 0; d < kDT8; ++d)
                    *(float2*)(dst + d * 8) = make_float2(acc_o[s][d][2 * hh], acc_o[s][d][2 * hh + 1]);
                if (t == 0) lse[m_start + row] = row_lse[s][hh];
            }
        return;
    }
#endif
    u16* o = o_ptr(p, BlockCoords(p)) CF_FIRST_ROW(cu_seqlens_q, total_q, o_row_stride);
    float* lse = CF_ROW_STATS(p.lse, BlockCoords(p).b, BlockCoords(p).h);
    // Stage O through this warp's own rows of the Q tile (no other warp reads them), then write it out in
    // 16-byte coalesced chunks.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int s = 0; s < kMS; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = warp_row0 + s * 16 + g + hh * 8;
#pragma unroll
            for (int d = 0; d < kDT8; ++d)
                *(u32*)(smem + QTile::offset(row, d * 8) + t * 4) = pack2(acc_o[s][d][2 * hh], acc_o[s][d][2 * hh + 1]);
            if (t == 0 && m_start + row < CF_SEQLEN_Q) lse[m_start + row] = row_lse[s][hh];
        }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kBM * (kD / 8) / kThreads; ++i) {
        const int c = i * kThreads + tid;
        const int row = c / (kD / 8), col = (c % (kD / 8)) * 8;
        if (m_start + row < CF_SEQLEN_Q && col < p.head_dim)
            *(uint4*)(o + (i64)(m_start + row) * p.o_row_stride + col) = *(const uint4*)(smem + QTile::offset(row, col));
    }
}
