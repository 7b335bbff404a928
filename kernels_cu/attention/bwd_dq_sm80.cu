// Deterministic dQ for the FlashAttention-2 backward (sm_80 and newer), Q-parallel, used instead of the
// atomic dQ of attention_bwd_sm80 when that kernel is built with CF_DETERMINISTIC=1.
//
// attention_bwd_dq_sm80
//   grid  = num_m_blocks * batch * heads_q CTAs (1-D), num_m_blocks = ceil(seqlen_q / CF_BLOCK_M);
//           blockIdx.x = (num_m_blocks - 1 - m_block) * (batch * heads_q) + b * heads_q + h (same order as
//           the forward: heaviest causal query blocks first).
//   block = CF_WARPS * 32;  dynamic smem = cf_bwd_dq_smem_bytes = 2*BM*D*2 + 3*BN*D*2
//           (Q, dO resident; K double-buffered; V single-buffered).
//   One CTA owns CF_BLOCK_M query rows of one (batch, query head); it walks the visible key tiles from
//   last to first (a fixed order: bitwise reproducible), recomputes S, P, dP and dS exactly like the
//   KV-parallel kernel, and accumulates dQ = dS.K in registers (warps split the query rows).
//   Reads : q, k, v, dout, lse, delta, alibi; q_* k_* v_* do_* strides; the same scalars as the forward.
//   Writes: dq (dq_* strides) = 16-bit(softmax_scale * dS.K), rows < seqlen_q, cols < head_dim (rows that
//           see no key get 0). Does not touch dq_accum.
//
// Tile table (4 warps = 128 threads, CF_MIN_BLOCKS 1; BLOCK_N 128 at hd64/128 and 64 at hd256 spill):
//   head dim | BM | BN | smem bytes
//   64       | 64 | 64 |  40960
//   128      | 64 | 64 |  81920
//   192      | 64 | 64 | 122880
//   256      | 64 | 32 | 114688
#include "ptx/cp_async.cuh"
#include "attention/build_flags.cuh"
#if CF_DROPOUT
#include "attention/philox.cuh"
#endif
#if CF_ATTN_MASK
#include "attention/attn_mask.cuh"
#endif
static_assert(!CF_ATTN_MASK || (!CF_VARLEN && !CF_DROPOUT), "attn_mask: the dense build only");
#include "attention/params.cuh"
#include "attention/block_coords.cuh"
#include "attention/query_tiles.cuh"
#include "attention/warp_gemm.cuh"
#include "attention/mask.cuh"
#include "attention/bwd_common.cuh"
#define CF_SEQ_BATCH BlockCoords(p).b
#include "attention/seq_rows.cuh"

namespace {
constexpr int kSmemQ = 0;
constexpr int kSmemDO = kSmemQ + QTile::kBytes;
constexpr int kSmemK = kSmemDO + QTile::kBytes;   // two buffers
constexpr int kSmemV = kSmemK + 2 * KVTile::kBytes;
constexpr int kSmemBytes = kSmemV + KVTile::kBytes;
}  // namespace

extern "C" __device__ const int cf_bwd_dq_smem_bytes = kSmemBytes;

__device__ __forceinline__ void load_kv_tile(const AttentionParams& p, bool is_v, u32 dst, int n_block, int tid) {
    const BlockCoords c(p);
#if CF_VARLEN
    const SeqContext seq(p, c.b);
#endif
    if (is_v) {
        const u16* v = v_ptr(p, c) CF_FIRST_ROW(cu_seqlens_k, total_k, v_row_stride);
        KVTile::load_async<kThreads>(dst, v, p.v_row_stride, n_block * kBN, CF_SEQLEN_K, p.head_dim, tid);
    } else {
        const u16* k = k_ptr(p, c) CF_FIRST_ROW(cu_seqlens_k, total_k, k_row_stride);
        KVTile::load_async<kThreads>(dst, k, p.k_row_stride, n_block * kBN, CF_SEQLEN_K, p.head_dim, tid);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads, CF_MIN_BLOCKS)
attention_bwd_dq_sm80(const __grid_constant__ AttentionParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sbase = smem_u32(smem);
    const u32 sQ = sbase + kSmemQ, sDO = sbase + kSmemDO, sV = sbase + kSmemV;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3, t2 = t * 2;
    const int m_start = BlockCoords(p).m_block * kBM;
#if CF_VARLEN
    const SeqContext seq(p, BlockCoords(p).b);
    if (m_start >= seq.seqlen_q) return;  // past this sequence's rows
#endif
    const int i_last = min(m_start + kBM, CF_SEQLEN_Q) - 1;
    const Visibility vis(CF_SEQLEN_Q, CF_SEQLEN_K, p.window_left, p.window_right);
    int n_lo, n_hi;
    vis.key_tiles(m_start, i_last, kBN, &n_lo, &n_hi);
    const int warp_row0 = warp * kMS * 16;

    if (n_hi > n_lo) {
        const BlockCoords c(p);
        const u16* q = q_ptr(p, c) CF_FIRST_ROW(cu_seqlens_q, total_q, q_row_stride);
        const u16* dout = (const u16*)p.dout + (i64)c.b * p.do_batch_stride + (i64)c.h * p.do_head_stride
                          CF_FIRST_ROW(cu_seqlens_q, total_q, do_row_stride);
        QTile::load_async<kThreads>(sQ, q, p.q_row_stride, m_start, CF_SEQLEN_Q, p.head_dim, tid);
        QTile::load_async<kThreads>(sDO, dout, p.do_row_stride, m_start, CF_SEQLEN_Q, p.head_dim, tid);
        load_kv_tile(p, false, sbase + kSmemK, n_hi - 1, tid);
        cp_async_commit();
        load_kv_tile(p, true, sV, n_hi - 1, tid);
        cp_async_commit();
    }

    // Per-row LSE (times log2 e) and delta; rows past seqlen_q get LSE = +inf, hence P = 0.
    float lse[kMS][2], delta[kMS][2];
    {
        const BlockCoords c(p);
        const i64 row_base = CF_ROW_STATS((i64)0, c.b, c.h);
#pragma unroll
        for (int s = 0; s < kMS; ++s)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = m_start + warp_row0 + s * 16 + g + hh * 8;
                const bool valid = i < CF_SEQLEN_Q;
                lse[s][hh] = valid ? p.lse[row_base + i] : CF_INF;
                delta[s][hh] = valid ? p.delta[row_base + i] : 0.f;
            }
    }

    float acc[kMS][kDT8][4];
    zero_fill(acc);

    const auto q_addr = a_operand<QTile>(sQ, warp_row0, lane);
    const auto do_addr = a_operand<QTile>(sDO, warp_row0, lane);
    const auto k_addr = b_operand<KVTile>(sbase + kSmemK, lane);   // plus the buffer offset
    const auto kt_addr = bt_operand<KVTile>(sbase + kSmemK, lane);
    const auto v_addr = b_operand<KVTile>(sV, lane);

#pragma unroll 1
    for (int n_block = n_hi - 1; n_block >= n_lo; --n_block) {
        const int buf = (n_hi - 1 - n_block) & 1;
        // Q, dO and this K have landed (V may still be in flight); every warp is done with the other K buffer.
        cp_async_wait<1>();
        __syncthreads();
        if (n_block > n_lo) load_kv_tile(p, false, sbase + kSmemK + (buf ^ 1) * KVTile::kBytes, n_block - 1, tid);
        cp_async_commit();

        float sc[kMS][kNT8][4], dp[kMS][kNT8][4];
        zero_fill(sc);
        zero_fill(dp);
        gemm_rows_rows<kMS, kBN, kD, QTile, KVTile>(sc, q_addr, k_addr, buf * KVTile::kBytes);
        // V has landed (the K prefetch may still be in flight).
        cp_async_wait<1>();
        __syncthreads();
        gemm_rows_rows<kMS, kBN, kD, QTile, KVTile>(dp, do_addr, v_addr);
        // Every warp is done with V: prefetch the next one under the elementwise work and dS.K.
        __syncthreads();
        if (n_block > n_lo) load_kv_tile(p, true, sV, n_block - 1, tid);
        cp_async_commit();

        {
            const int n_start = n_block * kBN;
            const bool need_mask = vis.tile_needs_mask<CF_IS_LOCAL>(m_start, i_last, n_start, kBN);
            const float slope = CF_ALIBI ? p.alibi[(i64)BlockCoords(p).b * p.alibi_batch_stride + BlockCoords(p).h] : 0.f;
            const float pre = CF_SOFTCAP ? p.softmax_scale / p.softcap : p.softmax_scale;
            // The exact exponent form on every tile (bwd_common.cuh: kernels without a per-tile choice).
            const auto ex = BwdExponent<true>::make<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(p.softmax_scale,
                                                                                          p.scale_log2);
            const float softcap = p.softcap;
#if CF_ATTN_MASK
            const unsigned char* mask_head = attn_mask_head(p, BlockCoords(p).b, BlockCoords(p).h);
#endif
#if CF_DROPOUT
            // dS = P (dP Z / (1 - p) - delta) with the forward's keep mask Z (philox.cuh).
            const DropoutCall drop = dropout_call(p.dropout_rng, p.dropout_seed, p.dropout_offset);
            dropout_fragments(dp, drop.key, drop.offset, (u32)(BlockCoords(p).b * p.heads_q + BlockCoords(p).h),
                              m_start + warp_row0, n_start, lane, (u32)p.dropout_threshold, p.dropout_scale);
#endif
#pragma unroll
            for (int s = 0; s < kMS; ++s)
#pragma unroll
                for (int n = 0; n < kNT8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = m_start + warp_row0 + s * 16 + g + (e >> 1) * 8;
                        const int j = n_start + n * 8 + t2 + (e & 1);
                        const bool visible = !need_mask || vis.visible(i, j);
#if CF_ATTN_MASK
                        const float add = attn_mask_add(mask_head, p, i, j, CF_SEQLEN_Q, CF_SEQLEN_K);
#else
                        const float add = 0.f;
#endif
                        bwd_score_element<CF_SOFTCAP, CF_ALIBI, true, CF_ATTN_MASK == 2, CF_ATTN_MASK != 0>(
                            sc[s][n][e], dp[s][n][e], lse[s][e >> 1], delta[s][e >> 1], visible, ex, pre, softcap,
                            slope, i + vis.off - j, add);
                    }
        }

        // dQ += dS.K: dS (rows = queries, k = keys) straight from the accumulators, K read transposed.
        gemm_accum_rows<kMS, kBN, kD, KVTile>(acc, dp, kt_addr, buf * KVTile::kBytes);
    }

    // Epilogue: dq = softmax_scale * acc, staged through this warp's own rows of the Q tile (only this warp
    // ever reads them), then 16-byte coalesced stores.
    const float scale = p.softmax_scale;
#pragma unroll
    for (int s = 0; s < kMS; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = warp_row0 + s * 16 + g + hh * 8;
#pragma unroll
            for (int d = 0; d < kDT8; ++d)
                *(u32*)(smem + kSmemQ + QTile::offset(row, d * 8) + t * 4) =
                    pack2(acc[s][d][2 * hh] * scale, acc[s][d][2 * hh + 1] * scale);
        }
    __syncthreads();
    const BlockCoords c(p);
    u16* dq = (u16*)p.dq + (i64)c.b * p.dq_batch_stride + (i64)c.h * p.dq_head_stride
              CF_FIRST_ROW(cu_seqlens_q, total_q, dq_row_stride);
#pragma unroll
    for (int i = 0; i < kBM * (kD / 8) / kThreads; ++i) {
        const int cidx = i * kThreads + tid;
        const int row = cidx / (kD / 8), col = (cidx % (kD / 8)) * 8;
        if (m_start + row < CF_SEQLEN_Q && col < p.head_dim)
            *(uint4*)(dq + (i64)(m_start + row) * p.dq_row_stride + col) = *(const uint4*)(smem + kSmemQ + QTile::offset(row, col));
    }
}
