// FlashAttention-2 backward for sm_80 and newer, KV-parallel: mma.sync m16n8k16 (fp32 accumulation),
// ldmatrix, cp.async, XOR-swizzled shared memory.
//
// ---------------------------------------------------------------------------------------------------------
// Backward pipeline (host side, in this order)
//   1. attention_bwd_preprocess   (bwd_prepost.cu)  delta = rowsum(dO * O) from the stored 16-bit O; zeroes
//                                                   dq_accum rows when p.dq_accum != nullptr.
//   2. attention_bwd_sm80         (this file)       dK, dV (and, unless CF_DETERMINISTIC, dQ via fp32
//                                                   atomics into dq_accum, UNSCALED).
//   3a. non-deterministic: attention_bwd_postprocess (bwd_prepost.cu) dq = 16-bit(dq_accum * softmax_scale).
//   3b. CF_DETERMINISTIC=1: attention_bwd_dq_sm80 (bwd_dq_sm80.cu) writes dq directly (scaled, 16-bit);
//       no dq_accum needed (pass p.dq_accum = nullptr to the preprocess so that it zeroes nothing).
//
// attention_bwd_sm80
//   grid  = num_n_blocks * batch * heads_k CTAs (1-D), num_n_blocks = ceil(seqlen_k / CF_BLOCK_N);
//           blockIdx.x = n_block * (batch * heads_k) + b * heads_k + hk  (key block 0 first: with causal
//           masking it sees the most query tiles).
//   block = CF_WARPS * 32 threads;  dynamic smem = cf_bwd_smem_bytes (formula below).
//   One CTA owns CF_BLOCK_N keys of kv head hk and loops over all heads_q / heads_k query heads of its
//   group, and for each over the query tiles that can see its keys, so dK/dV of a kv head are the exact
//   group sums, written once, with no atomics and no extra memory (GQA/MQA option (a)).
//   Reads : q, k, v, dout, lse, delta, alibi (CF_ALIBI), all strides q_* k_* v_* do_*, alibi_batch_stride,
//           batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim, window_left, window_right,
//           softmax_scale, softcap (CF_SOFTCAP).
//   Writes: dk, dv (dk_*, dv_* strides; dK scaled by softmax_scale; only rows < seqlen_k, cols < head_dim);
//           unless CF_DETERMINISTIC: atomically adds the unscaled dS.K into dq_accum, fp32, contiguous
//           (batch, seqlen_q, heads_q, CF_HEAD_DIM) with the columns of each 16-column group in the order
//           bwd_prepost.cu describes, only rows < seqlen_q and 16-column groups that start below head_dim.
//           dq_accum must be zero before this kernel (the preprocess does it).
//
// Dynamic shared memory (bytes), with D = CF_HEAD_DIM, BM = CF_BLOCK_M, BN = CF_BLOCK_N,
// S = CF_Q_STAGES (1 or 2, default 2), A = CF_BWD_A_REGS (default 0; only honoured when one warp owns whole
// key rows, i.e. CF_WARPS == BN / 16):
//   smem = 2*BN*D*2                  (K, V, resident for the whole CTA)
//        + 2*S*BM*D*2                (Q, dO tiles, S buffers each)
//        + (A ? 1 : 2)*BN*BM*2       (dS^T tile; P^T tile unless A)
//        + 2*S*BM*4                  (LSE, delta of the query tile)
// also exported as the __device__ constant `int cf_bwd_smem_bytes` (Module.get_global_var) so the host need
// not repeat the formula.
//
// Tile table (8 warps = 256 threads, CF_MIN_BLOCKS 1, A = 0 unless noted; registers over the flag combos
// checked, deterministic or not):
//   head dim | BM  | BN  | S | smem bytes | fits                      | regs sm_80 / sm_90a (before the 32-key split)
//   64       | 128 | 128 | 2 | 165888     | A100, H100 (recommended)  | 255 (deterministic: spills, uses A=1 below)
//   64       | 64  | 128 | 2 |  99328     | A100, H100                | 232-246 / 227-243
//   64 (A=1) | 64  | 128 | 2 |  82944     | 100 KB GPUs; deterministic| 212-244 / 220-241  (~4% faster than A=0)
//   64 (A=1) | 64  | 64  | 1 |  41472     | fallback                  | 137-164 / 141-158
//   128      | 64  | 128 | 2 | 164864     | A100 (<= 166912), H100    | 251-255 / 248-255
//   192      | 64  | 64  | 2 | 164864     | A100 (<= 166912), H100    | 209-214 / 202-212
//   256      | 64  | 64  | 2 | 214016     | H100 only (<= 232448)     | 242-244 / 242-246
//   256      | 64  | 64  | 1 | 147968     | A100                      | 242-254 / 240-252
// Every fp16/bf16 x IS_LOCAL x SOFTCAP x ALIBI x DETERMINISTIC variant of these compiles with 0 bytes of
// spill and stack for sm_80 and sm_90a. CF_BWD_A_REGS=1 is spill-free at hd64 only (it spills at hd128).
//
// Shared-memory addressing: every ldmatrix address is a per-lane base (WarpLaneAddr, bwd_common.cuh: four
// per operand, one per swizzle phase) plus a compile-time immediate; the k16 loops are unrolled over a
// 64-column block for that. The bases are rebuilt in each phase from an opaque copy of the lane id
// (loop_variant) rather than kept across the query-tile loop: that costs a few integer ops per phase, and
// keeping them (about 20 registers) makes the hd128 / hd256 variants spill. Before this, the swizzle math
// was ~35 integer instructions per 8 mma's in the inner loops (SASS), about 15% of the run time.
//
// Work split inside a CTA (per query tile of BM rows), all products mma m16n8k16:
//   score products: warp (wn, wm) owns keys [wn*kSK, +kSK) and queries [wm*kSN, +kSN) of the transposed
//   score tile; dK, dV: the same keys and head-dim columns [wm*kKD, +kKD). kSK = 32 (two m16 slabs that share
//   every B fragment) unless CF_BWD_A_REGS, where kSK = 16 and a warp owns all BM queries (kWM = 1).
//     dP^T = V.dO^T and S^T = K.Q^T       (A = K/V rows from smem, B = dO/Q rows via ldmatrix)
//     P^T, dS^T elementwise in registers  (LSE, delta per query column from smem)
//     dV += P^T.dO,  dK += dS^T.Q         (A = P^T / dS^T from smem, or from registers with CF_BWD_A_REGS;
//                                          B = dO / Q via ldmatrix.trans)
//     dQ  = dS.K -> red.global.add        (dS^T from smem via ldmatrix.trans; warps split BM x D; v4 on sm_90)
//   Shared-memory reads per query tile at hd128 (BM 64, BN 128): 16 keys a warp (before) read the whole Q
//   and dO tiles in every warp for both products, ~770 KB; 32 keys x (32 queries | 64 columns) reads ~600 KB
//   (256 KB score products, 192 KB dK/dV, 160 KB dQ). Measured on an H100: +8% at hd128 (not the +28% a
//   pure shared-memory bound predicts), +3% at hd256; hd64 keeps the 16-key split (A = 1).
//   Rows of the transposed tiles are keys, so P^T and dS^T come out of the mma accumulators already in the
//   A-fragment layout of the dV / dK products; dS (for dQ) is read back transposed with ldmatrix.trans.
//   Q/dO/LSE/delta of the next (head, query tile) are prefetched with cp.async at the top of each iteration
//   (S = 2), or after dK/dV, under the dQ product (S = 1).
//
// Numerics: P = 2^((s * score_scale - lse) * log2 e) with ex2.approx (bwd_common.cuh) (rows with lse = +inf give P = 0; the
// zero-filled LSE of rows past seqlen_q is never used: the last query tile always takes the masked path);
// P and dS are rounded to 16 bits only as mma operands, dS = P (dP - D) itself is fp32; the softcap factor
// 1 - tanh^2 recomputes tanh with tanh_accurate. Validated on an H100 (fp16 / bf16, hd 64/96/128/160/192/256,
// seqlen tails, causal Sq != Sk, windows, softcap, ALiBi, GQA/MQA, deterministic bitwise-repeatable): max
// error within 2x of the same-dtype naive autograd error vs a float64 reference in all 112 cases tried.
// ---------------------------------------------------------------------------------------------------------
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "attention/params.cuh"
#include "attention/smem_tile.cuh"
#include "attention/warp_gemm.cuh"
#include "attention/mask.cuh"
#include "attention/bwd_common.cuh"
#define CF_SEQ_BATCH BwdCoords(p).b
#include "attention/seq_rows.cuh"

#ifndef CF_Q_STAGES
#define CF_Q_STAGES 2
#endif
#include "attention/build_flags.cuh"
#if CF_DROPOUT
#include "attention/philox.cuh"
#endif
#if CF_ATTN_MASK
#include "attention/attn_mask.cuh"  // the forward's element mask, read again per score (every tile)
#endif
static_assert(!CF_ATTN_MASK || (!CF_VARLEN && !CF_DROPOUT), "attn_mask: the dense build only");

namespace {
constexpr int kD = CF_HEAD_DIM;
constexpr int kBM = CF_BLOCK_M;
constexpr int kBN = CF_BLOCK_N;
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = CF_Q_STAGES;
#ifndef CF_BWD_A_REGS
#define CF_BWD_A_REGS 0
#endif
// P^T, dS^T A fragments for dV, dK from registers: needs one warp to own whole key rows of the score tile.
constexpr bool kARegs = CF_BWD_A_REGS && kWarps == kBN / 16;
// Score products (S^T, dP^T): kSWN warps along keys x kSWM along queries, warp tile kSK keys x kSN queries.
// dK, dV: kKWN warps along keys x kKWD along head dim, warp tile kKK keys x kKD columns.
// Without kARegs warps own 32 keys (two m16 slabs share every B fragment): per query tile that halves the
// B-operand (Q, dO) shared-memory reads of the dK/dV products and of the score products, the kernel's
// shared-memory bandwidth bound (see the split notes at the top).
constexpr int kSWN = kARegs ? kBN / 16 : kBN / 32;
constexpr int kSWM = kWarps / kSWN;
constexpr int kSK = kBN / kSWN, kSKS = kSK / 16;
constexpr int kSN = kBM / kSWM, kSNT8 = kSN / 8;
constexpr int kKWN = kSWN, kKWD = kWarps / kKWN;
constexpr int kKK = kBN / kKWN, kKKS = kKK / 16;
constexpr int kKD = kD / kKWD, kKDT8 = kKD / 8;
// dQ = dS.K: kQW warps along queries (kQS 16-row slabs each) x kQWD along head dim (kQD columns, kQC at a
// time). Two slabs that share every K fragment take 4 ldmatrix per 8 mma's instead of 5 (H100, bf16, against
// one slab: hd128 +2%, hd256 16k +8% but 2k -4%; hd64 within 1%, so it keeps one).
// Softcap keeps one slab (and 32 columns at hd128): its tanh leaves too few registers for more (spills).
constexpr int kQS = (kD >= 128 && !CF_SOFTCAP) ? 2 : 1;
constexpr int kQW = kBM / (16 * kQS);
constexpr int kQWD = kWarps / kQW;
constexpr int kQD = kD / kQWD;
constexpr int kQC = kQS == 2 ? kQD : (kQD % 64 == 0 && kD != 128) ? 64 : 32;
// The key loop is unrolled with step kk + 1's fragments loaded under step kk's mma's, except at hd128, which
// has no registers for the second fragment set (it spills) and runs it rolled (measured as fast there).
constexpr bool kQPipelined = kD != 128;
static_assert(kStages == 1 || kStages == 2, "CF_Q_STAGES must be 1 or 2");
static_assert(kBN % 32 == 0 && kWarps % kSWN == 0, "BLOCK_N / 32 must divide the warp count");
static_assert(kBM % 64 == 0 && kSN % 16 == 0 && kKD % 16 == 0, "bad query / head-dim split");
static_assert(kWarps % kQW == 0 && kQD % kQC == 0 && kQC % 16 == 0, "bad dQ split");
static_assert(kThreads >= 2 * kBM, "LSE / delta loads need 2 * BLOCK_M threads");
static_assert(kBN * (kD / 8) % kThreads == 0, "epilogue copy must split evenly");

using QTile = SmemTile<kBM, kD>;
using KVTile = SmemTile<kBN, kD>;
using STile = SmemTile<kBN, kBM>;  // transposed score tiles: rows are keys, columns queries
// dQ operand addresses: at hd128 one register per operand (WarpLaneAddrXor), which its rolled loop needs
// to stay spill-free; elsewhere the four bases (the XOR form spills a few hd256 variants instead).
#if CF_HEAD_DIM == 128
template <class Tile> using DqAddr = WarpLaneAddrXor<Tile>;
static_assert((kQC == 16 || kQC == 32 || kQC == 64) && kQS <= 2, "WarpLaneAddrXor: 1, 2 or 4 steps per warp");
#else
template <class Tile> using DqAddr = WarpLaneAddr<Tile>;
#endif

constexpr int kSmemK = 0;
constexpr int kSmemV = kSmemK + KVTile::kBytes;
constexpr int kSmemQ = kSmemV + KVTile::kBytes;
constexpr int kSmemDO = kSmemQ + kStages * QTile::kBytes;
constexpr int kSmemDS = kSmemDO + kStages * QTile::kBytes;
constexpr int kSmemP = kSmemDS + STile::kBytes;
constexpr int kSmemLSE = kSmemP + (kARegs ? 0 : STile::kBytes);
constexpr int kSmemDelta = kSmemLSE + kStages * kBM * 4;
constexpr int kSmemBytes = kSmemDelta + kStages * kBM * 4;
}  // namespace

extern "C" __device__ const int cf_bwd_smem_bytes = kSmemBytes;

// Loads Q, dO, LSE and delta of flat iteration `it` (query head hk * group + it / n_m, query tile
// m_lo + it % n_m) into stage `st`. Pointers are rebuilt here, never kept across the main loop.
__device__ __forceinline__ void load_query_tile(const AttentionParams& p, int it, int m_lo, int n_m, int st,
                                                u32 sbase, int tid) {
    const BwdCoords bc(p);
#if CF_VARLEN
    const SeqContext seq(p, bc.b);
#endif
    const int h = bc.hk * (p.heads_q / p.heads_k) + it / n_m;
    const int m_start = (m_lo + it % n_m) * kBM;
    const u16* q = (const u16*)p.q + (i64)bc.b * p.q_batch_stride + (i64)h * p.q_head_stride
                   CF_FIRST_ROW(cu_seqlens_q, total_q, q_row_stride);
    const u16* dout = (const u16*)p.dout + (i64)bc.b * p.do_batch_stride + (i64)h * p.do_head_stride
                      CF_FIRST_ROW(cu_seqlens_q, total_q, do_row_stride);
    QTile::load_async<kThreads>(sbase + kSmemQ + st * QTile::kBytes, q, p.q_row_stride, m_start, CF_SEQLEN_Q,
                                p.head_dim, tid);
    QTile::load_async<kThreads>(sbase + kSmemDO + st * QTile::kBytes, dout, p.do_row_stride, m_start,
                                CF_SEQLEN_Q, p.head_dim, tid);
    const i64 row_base = CF_ROW_STATS((i64)0, bc.b, h);
    if (tid < 2 * kBM) {
        const int r = tid % kBM;
        const bool valid = m_start + r < CF_SEQLEN_Q;
        const float* src = (tid < kBM ? (const float*)p.lse : (const float*)p.delta) + row_base + (valid ? m_start + r : 0);
        const u32 dst = sbase + (tid < kBM ? kSmemLSE : kSmemDelta) + (st * kBM + r) * 4;
        cp_async_4(dst, src, valid);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads, CF_MIN_BLOCKS)
attention_bwd_sm80(const __grid_constant__ AttentionParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sbase = smem_u32(smem);
    const u32 sK = sbase + kSmemK;
    const u32 sV = sbase + kSmemV;
    const u32 sDS = sbase + kSmemDS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp % kSWN, wm = warp / kSWN;  // same key rows for the score and the dK/dV tiles
    const int g = lane >> 2, t = lane & 3, t2 = t * 2;
    const int n_start = BwdCoords(p).n_block * kBN;
#if CF_VARLEN
    const SeqContext seq(p, BwdCoords(p).b);
    if (n_start >= seq.seqlen_k) return;  // past this sequence's keys: no dK / dV rows, no dQ terms
#endif
    const Visibility vis(CF_SEQLEN_Q, CF_SEQLEN_K, p.window_left, p.window_right);
    int m_lo, m_hi;
    vis.query_tiles(n_start, min(n_start + kBN, CF_SEQLEN_K) - 1, kBM, &m_lo, &m_hi);
    const int n_m = max(m_hi - m_lo, 0);
    const int group = p.heads_q / p.heads_k;
    const int n_iters = n_m * group;

    float acc_dk[kKKS][kKDT8][4], acc_dv[kKKS][kKDT8][4];
    zero_fill(acc_dk);
    zero_fill(acc_dv);

    if (n_iters > 0) {
        const BwdCoords bc(p);
        const u16* k = (const u16*)p.k + (i64)bc.b * p.k_batch_stride + (i64)bc.hk * p.k_head_stride
                       CF_FIRST_ROW(cu_seqlens_k, total_k, k_row_stride);
        const u16* v = (const u16*)p.v + (i64)bc.b * p.v_batch_stride + (i64)bc.hk * p.v_head_stride
                       CF_FIRST_ROW(cu_seqlens_k, total_k, v_row_stride);
        KVTile::load_async<kThreads>(sK, k, p.k_row_stride, n_start, CF_SEQLEN_K, p.head_dim, tid);
        KVTile::load_async<kThreads>(sV, v, p.v_row_stride, n_start, CF_SEQLEN_K, p.head_dim, tid);
        load_query_tile(p, 0, m_lo, n_m, 0, sbase, tid);
        cp_async_commit();
    }

    // Warp-relative origins of the transposed score tile.
    const int key_row0 = wn * kSK;       // key rows of this warp (within the CTA tile), kSK == kKK
    const int q_col0 = wm * kSN;         // query columns of this warp's score tile
    const int d_col0 = wm * kKD;         // head-dim columns of this warp's dK / dV

#pragma unroll 1
    for (int it = 0; it < n_iters; ++it) {
        const int st = kStages == 2 ? (it & 1) : 0;
        const u32 sQ = sbase + kSmemQ + st * QTile::kBytes;
        const u32 sDO = sbase + kSmemDO + st * QTile::kBytes;
        // This tile (and K, V) have landed, and every warp is done with the previous iteration.
        cp_async_wait<0>();
        __syncthreads();
        if (kStages == 2 && it + 1 < n_iters) {
            load_query_tile(p, it + 1, m_lo, n_m, st ^ 1, sbase, tid);
            cp_async_commit();
        }
        const int h = BwdCoords(p).hk * group + it / n_m;
        const int m_start = (m_lo + it % n_m) * kBM;

        // dP^T = V.dO^T and S^T = K.Q^T, both (kSK keys) x (kSN queries) per warp.
        // Unrolled over the four k16 steps of a 64-wide column block, so that every ldmatrix address is a base,
        // one register for the block, and an immediate. Each B fragment (dO / Q) feeds all kSKS key slabs.
        float dp[kSKS][kSNT8][4], sc[kSKS][kSNT8][4];
        zero_fill(dp);
        zero_fill(sc);
        {
            const int ln = (int)loop_variant(lane);
            const WarpLaneAddr<KVTile> kv_a(sK, key_row0 + (ln & 15), ln >> 4, 0);
            const WarpLaneAddr<QTile> q_b(sQ, q_col0 + (ln & 7) + (ln >> 4) * 8, (ln >> 3) & 1, 0);
#pragma unroll 1
            for (int blk = 0; blk < kD / 64; ++blk)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                u32 a[kSKS][4];
#pragma unroll
                for (int s = 0; s < kSKS; ++s)
                    ldmatrix_x4(a[s], kv_a.at(kk, s * 16) + KVTile::kBytes + blk * KVTile::kBlockBytes);  // V
#pragma unroll
                for (int nn = 0; nn < kSNT8 / 2; ++nn) {
                    u32 b[4];
                    ldmatrix_x4(b, q_b.at(kk, nn * 16) + (sDO - sQ) + blk * QTile::kBlockBytes);
#pragma unroll
                    for (int s = 0; s < kSKS; ++s) {
                        mma_16816(dp[s][2 * nn], a[s], b[0], b[1]);
                        mma_16816(dp[s][2 * nn + 1], a[s], b[2], b[3]);
                    }
                }
            }
#pragma unroll 1
            for (int blk = 0; blk < kD / 64; ++blk)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                u32 a[kSKS][4];
#pragma unroll
                for (int s = 0; s < kSKS; ++s)
                    ldmatrix_x4(a[s], kv_a.at(kk, s * 16) + blk * KVTile::kBlockBytes);  // K
#pragma unroll
                for (int nn = 0; nn < kSNT8 / 2; ++nn) {
                    u32 b[4];
                    ldmatrix_x4(b, q_b.at(kk, nn * 16) + blk * QTile::kBlockBytes);
#pragma unroll
                    for (int s = 0; s < kSKS; ++s) {
                        mma_16816(sc[s][2 * nn], a[s], b[0], b[1]);
                        mma_16816(sc[s][2 * nn + 1], a[s], b[2], b[3]);
                    }
                }
            }
        }

        // P^T and dS^T in place (sc <- P, dp <- dS). Rows past seqlen_q have zero-filled LSE, so the last
        // query tile is always masked.
        {
            const int i_last = min(m_start + kBM, CF_SEQLEN_Q) - 1;
            const bool need_mask = vis.tile_needs_mask<CF_IS_LOCAL>(m_start, i_last, n_start, kBN) || (m_start + kBM > CF_SEQLEN_Q);
            const float slope = CF_ALIBI ? p.alibi[(i64)BwdCoords(p).b * p.alibi_batch_stride + h] : 0.f;
            const float pre = CF_SOFTCAP ? p.softmax_scale / p.softcap : p.softmax_scale;
            // The exact exponent form on every tile (bwd_common.cuh: kernels without a per-tile choice).
            const auto ex = BwdExponent<true>::make<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(p.softmax_scale,
                                                                                          p.scale_log2);
            const float softcap = p.softcap;
#if CF_ATTN_MASK
            const unsigned char* mask_head = attn_mask_head(p, BwdCoords(p).b, h);
#endif
            const unsigned char* s_lse = smem + kSmemLSE + st * kBM * 4;
            const unsigned char* s_delta = smem + kSmemDelta + st * kBM * 4;
#if CF_DROPOUT
            // Dropout (philox.cuh, the forward's draws): dS = P (dP Z / (1 - p) - delta) with the keep mask Z,
            // and dV takes P Z / (1 - p); delta = rowsum(dO O) already holds the dropped O.
            const DropoutCall drop = dropout_call(p.dropout_rng, p.dropout_seed, p.dropout_offset);
            const u32 drop_bh = (u32)(BwdCoords(p).b * p.heads_q + h);
            u32 draws[kSKS];
#endif
#pragma unroll
            for (int n = 0; n < kSNT8; ++n) {
                const int qc = q_col0 + n * 8 + t2;
                const float2 lse2 = *(const float2*)(s_lse + qc * 4);
                const float2 del2 = *(const float2*)(s_delta + qc * 4);
#if CF_DROPOUT
                if ((n & 1) == 0) {
#pragma unroll
                    for (int s = 0; s < kSKS; ++s)
                        draws[s] = dropout_draw_transposed(drop.key, drop.offset, drop_bh, m_start + q_col0,
                                                           n_start + key_row0 + s * 16, n, lane,
                                                           (u32)p.dropout_threshold);
                }
#endif
#pragma unroll
                for (int s = 0; s < kSKS; ++s)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = m_start + qc + (e & 1);
                    const int j = n_start + key_row0 + s * 16 + g + (e >> 1) * 8;
                    const bool visible = !need_mask || (i < CF_SEQLEN_Q && vis.visible(i, j));
#if CF_DROPOUT
                    const bool kept = transposed_keep(draws[s], n & 1, e, lane);
                    dp[s][n][e] = kept ? dp[s][n][e] * p.dropout_scale : 0.f;
#endif
#if CF_ATTN_MASK
                    const float add = attn_mask_add(mask_head, p, i, j, CF_SEQLEN_Q, CF_SEQLEN_K);
#else
                    const float add = 0.f;
#endif
                    sc[s][n][e] = bwd_score_element<CF_SOFTCAP, CF_ALIBI, true, CF_ATTN_MASK == 2, CF_ATTN_MASK != 0>(
                        sc[s][n][e], dp[s][n][e], (e & 1) ? lse2.y : lse2.x, (e & 1) ? del2.y : del2.x,
                        visible, ex, pre, softcap, slope, i + vis.off - j, add);
#if CF_DROPOUT
                    sc[s][n][e] = kept ? sc[s][n][e] * p.dropout_scale : 0.f;
#endif
                }
            }
        }
        // A fragments (rows = keys, k = queries) of P^T and dS^T, 16-bit.
        u32 ap[kSKS][kSNT8 / 2][4], ads[kSKS][kSNT8 / 2][4];
#pragma unroll
        for (int s = 0; s < kSKS; ++s)
#pragma unroll
        for (int kk = 0; kk < kSNT8 / 2; ++kk) {
            ap[s][kk][0] = pack2(sc[s][2 * kk][0], sc[s][2 * kk][1]);
            ap[s][kk][1] = pack2(sc[s][2 * kk][2], sc[s][2 * kk][3]);
            ap[s][kk][2] = pack2(sc[s][2 * kk + 1][0], sc[s][2 * kk + 1][1]);
            ap[s][kk][3] = pack2(sc[s][2 * kk + 1][2], sc[s][2 * kk + 1][3]);
            ads[s][kk][0] = pack2(dp[s][2 * kk][0], dp[s][2 * kk][1]);
            ads[s][kk][1] = pack2(dp[s][2 * kk][2], dp[s][2 * kk][3]);
            ads[s][kk][2] = pack2(dp[s][2 * kk + 1][0], dp[s][2 * kk + 1][1]);
            ads[s][kk][3] = pack2(dp[s][2 * kk + 1][2], dp[s][2 * kk + 1][3]);
        }
        // dS^T to shared memory for dQ (and for dK when warps split the query columns), P^T too when needed.
        if (!CF_DETERMINISTIC || !kARegs) {
#pragma unroll
            for (int s = 0; s < kSKS; ++s)
#pragma unroll
            for (int kk = 0; kk < kSNT8 / 2; ++kk)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const u32 off = STile::offset(key_row0 + s * 16 + g + (r & 1) * 8, q_col0 + kk * 16 + (r >> 1) * 8) + t * 4;
                    *(u32*)(smem + kSmemDS + off) = ads[s][kk][r];
                    if (!kARegs) *(u32*)(smem + kSmemP + off) = ap[s][kk][r];
                }
        }
        if (!kARegs) __syncthreads();

        // dV += P^T.dO, dK += dS^T.Q over this warp's (kKK keys) x (kKD head-dim columns); each B fragment
        // (dO / Q) feeds all kKKS key slabs.
        const int ln = (int)loop_variant(lane);
        const WarpLaneAddr<QTile> q_bt(sQ, (ln & 7) + ((ln >> 3) & 1) * 8, ln >> 4, d_col0 / 16);
        if constexpr (kARegs) {
#pragma unroll
            for (int kk = 0; kk < kBM / 16; ++kk) {
#pragma unroll
                for (int dd = 0; dd < kKDT8 / 2; ++dd) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, q_bt.at(dd, kk * 16) + (sDO - sQ));
                    mma_16816(acc_dv[0][2 * dd], ap[0][kk], b[0], b[1]);
                    mma_16816(acc_dv[0][2 * dd + 1], ap[0][kk], b[2], b[3]);
                }
#pragma unroll
                for (int dd = 0; dd < kKDT8 / 2; ++dd) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, q_bt.at(dd, kk * 16));
                    mma_16816(acc_dk[0][2 * dd], ads[0][kk], b[0], b[1]);
                    mma_16816(acc_dk[0][2 * dd + 1], ads[0][kk], b[2], b[3]);
                }
            }
        } else {
            const WarpLaneAddr<STile> s_a(sDS, key_row0 + (ln & 15), ln >> 4, 0);
#pragma unroll
            for (int kk = 0; kk < kBM / 16; ++kk) {
                u32 a[kKKS][4];
#pragma unroll
                for (int s = 0; s < kKKS; ++s) ldmatrix_x4(a[s], s_a.at(kk, s * 16) + (kSmemP - kSmemDS));
#pragma unroll
                for (int dd = 0; dd < kKDT8 / 2; ++dd) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, q_bt.at(dd, kk * 16) + (sDO - sQ));
#pragma unroll
                    for (int s = 0; s < kKKS; ++s) {
                        mma_16816(acc_dv[s][2 * dd], a[s], b[0], b[1]);
                        mma_16816(acc_dv[s][2 * dd + 1], a[s], b[2], b[3]);
                    }
                }
#pragma unroll
                for (int s = 0; s < kKKS; ++s) ldmatrix_x4(a[s], s_a.at(kk, s * 16));
#pragma unroll
                for (int dd = 0; dd < kKDT8 / 2; ++dd) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, q_bt.at(dd, kk * 16));
#pragma unroll
                    for (int s = 0; s < kKKS; ++s) {
                        mma_16816(acc_dk[s][2 * dd], a[s], b[0], b[1]);
                        mma_16816(acc_dk[s][2 * dd + 1], a[s], b[2], b[3]);
                    }
                }
            }
        }

#if !CF_DETERMINISTIC
        // Every warp's dS^T is in shared memory (already true after the barrier above when the A fragments
        // come from shared memory) and, for one stage, every warp is done with this stage's Q and dO.
        if (kARegs || kStages == 1) __syncthreads();
        if (kStages == 1 && it + 1 < n_iters) {
            load_query_tile(p, it + 1, m_lo, n_m, 0, sbase, tid);
            cp_async_commit();
        }
        // dQ (unscaled) = dS.K, this warp's kQS 16-row slabs x kQD head-dim columns, kQC at a time.
        {
            const int qw = warp % kQW, qd = warp / kQW;
            const int ln = (int)loop_variant(lane);
            const DqAddr<STile> ds_at(sDS, (ln & 7) + ((ln >> 4) & 1) * 8, (ln >> 3) & 1, qw * kQS);
#pragma unroll 1
            for (int cc = 0; cc < kQD / kQC; ++cc) {
                const int col0 = qd * kQD + cc * kQC;
                const DqAddr<KVTile> k_bt(sK, (ln & 7) + ((ln >> 3) & 1) * 8, ln >> 4, col0 / 16);
                float acc[kQS][kQC / 8][4];
                zero_fill(acc);
                u32 fa[2][kQS][4], fb[2][kQC / 16][4];  // fragments of key steps kk and kk + 1 (pipelined)
                auto load_step = [&](int kk, int f) {
#pragma unroll
                    for (int s = 0; s < kQS; ++s) ldmatrix_x4_trans(fa[f][s], ds_at.at(s, kk * 16));
#pragma unroll
                    for (int dd = 0; dd < kQC / 16; ++dd) ldmatrix_x4_trans(fb[f][dd], k_bt.at(dd, kk * 16));
                };
                auto mma_step = [&](int f) {
#pragma unroll
                    for (int dd = 0; dd < kQC / 16; ++dd)
#pragma unroll
                    for (int s = 0; s < kQS; ++s) {
                        mma_16816(acc[s][2 * dd], fa[f][s], fb[f][dd][0], fb[f][dd][1]);
                        mma_16816(acc[s][2 * dd + 1], fa[f][s], fb[f][dd][2], fb[f][dd][3]);
                    }
                };
                if constexpr (kQPipelined) {
                    load_step(0, 0);
#pragma unroll
                    for (int kk = 0; kk < kBN / 16; ++kk) {
                        if (kk + 1 < kBN / 16) load_step(kk + 1, (kk + 1) & 1);
                        mma_step(kk & 1);
                    }
                } else {
#pragma unroll 1
                    for (int kk = 0; kk < kBN / 16; ++kk) {
                        load_step(kk, 0);
                        mma_step(0);
                    }
                }
                // dq_accum's column order (bwd_prepost.cu): this lane's columns 2t, 2t+1 of both n8 tiles of a
                // 16-column group are four consecutive floats, one vector atomic. Groups past head_dim are
                // skipped; a group's upper half past it adds the zeros of K's zero-filled columns.
#pragma unroll
                for (int s = 0; s < kQS; ++s)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int i = m_start + (qw * kQS + s) * 16 + g + hh * 8;
                    if (i < CF_SEQLEN_Q) {
                        float* dst = p.dq_accum + (CF_ACCUM_ROW(BwdCoords(p).b, i) * p.heads_q + h) * kD + col0 + t * 4;
#pragma unroll
                        for (int n = 0; n < kQC / 16; ++n)
                            if (col0 + n * 16 < p.head_dim)
                                red_add_f32x4(dst + n * 16, acc[s][2 * n][2 * hh], acc[s][2 * n][2 * hh + 1],
                                              acc[s][2 * n + 1][2 * hh], acc[s][2 * n + 1][2 * hh + 1]);
                    }
                }
            }
        }
#else
        if (kStages == 1 && it + 1 < n_iters) {
            __syncthreads();  // every warp is done with this stage's Q and dO
            load_query_tile(p, it + 1, m_lo, n_m, 0, sbase, tid);
            cp_async_commit();
        }
#endif
    }

    // Epilogue: dK * softmax_scale and dV to 16 bits, staged through the K and V tiles (every warp is done
    // with them after this barrier, and no copy is in flight), then written in 16-byte chunks.
    __syncthreads();
    const float scale = p.softmax_scale;
#pragma unroll
    for (int s = 0; s < kKKS; ++s)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int row = key_row0 + s * 16 + g + hh * 8;
#pragma unroll
        for (int d = 0; d < kKDT8; ++d) {
            const u32 off = KVTile::offset(row, d_col0 + d * 8) + t * 4;
            *(u32*)(smem + kSmemK + off) = pack2(acc_dk[s][d][2 * hh] * scale, acc_dk[s][d][2 * hh + 1] * scale);
            *(u32*)(smem + kSmemV + off) = pack2(acc_dv[s][d][2 * hh], acc_dv[s][d][2 * hh + 1]);
        }
    }
    __syncthreads();
    const BwdCoords bc(p);
    u16* dk = (u16*)p.dk + (i64)bc.b * p.dk_batch_stride + (i64)bc.hk * p.dk_head_stride
              CF_FIRST_ROW(cu_seqlens_k, total_k, dk_row_stride);
    u16* dv = (u16*)p.dv + (i64)bc.b * p.dv_batch_stride + (i64)bc.hk * p.dv_head_stride
              CF_FIRST_ROW(cu_seqlens_k, total_k, dv_row_stride);
#pragma unroll
    for (int i = 0; i < kBN * (kD / 8) / kThreads; ++i) {
        const int c = i * kThreads + tid;
        const int row = c / (kD / 8), col = (c % (kD / 8)) * 8;
        if (n_start + row < CF_SEQLEN_K && col < p.head_dim) {
            const u32 off = KVTile::offset(row, col);
            *(uint4*)(dk + (i64)(n_start + row) * p.dk_row_stride + col) = *(const uint4*)(smem + kSmemK + off);
            *(uint4*)(dv + (i64)(n_start + row) * p.dv_row_stride + col) = *(const uint4*)(smem + kSmemV + off);
        }
    }
}
