// FlashAttention backward main kernel for Hopper (sm_90a), KV-parallel: TMA loads through an mbarrier
// pipeline, wgmma for all five products, a producer warpgroup and two consumer warpgroups with setmaxnreg.
// It replaces attention_bwd_sm80 in the same host pipeline (preprocess -> this -> postprocess, see
// bwd_sm80.cu): the same parameters, the same outputs, the same dq_accum layout.
//
// attention_bwd_sm90
//   grid  = num_n_blocks * batch * heads_k CTAs, head-major (BwdCoords::head_major, bwd_common.cuh),
//           num_n_blocks = ceil(seqlen_k / CF_BLOCK_N); block = 384 threads; dynamic smem = cf_bwd_sm90_smem_bytes.
//   Below: head dims 64 and 128. Head dims 192 and 256 keep the producer, the dQ drain and the pipeline and
//   split a step's work between the consumer warpgroups another way (64 keys a CTA: bwd_sm90_wide.cuh).
//   A CTA owns 128 keys of kv head hk: K and V stay in shared memory while it walks every query tile of
//   CF_BLOCK_M rows, of every query head of its GQA group, that can see them (dK/dV are exact group sums,
//   written once).
//   Warpgroup 0 is the producer: thread 0 issues the TMA loads (K, V once; per query tile Q and dO into a
//   ring of CF_STAGES stages), warp 1 copies the tile's LSE and delta rows into shared memory, +inf / 0 past
//   seqlen_q so that those rows give P = 0 without a mask, in the exponent form it picks for the tile
//   (below), and thread 64 drains dQ (below).
//   The rest of it idles.
//   Consumer warpgroup w owns keys [64w, 64w + 64) and, per query tile it, runs
//     S^T = K.Q^T, dP^T = V.dO^T      (wgmma SS: 64 keys x BM queries; rows are keys, so P^T and dS^T come
//                                      out of the accumulators already in the A-operand layout of the next two)
//     P^T, dS^T elementwise in fp32   (bwd_score_element, as in the sm80 kernel)
//     dV += P^T.dO, dK += dS^T.Q      (wgmma RS: A from registers, B = dO / Q read MN-major)
//     dS^T -> shared memory (16-bit), for
//     dQ = dS.K                       (wgmma SS, both operands MN-major: dS^T's rows are keys, and so are K's)
//                                      BM 64: warpgroup w takes head-dim columns [w D/2, (w + 1) D/2);
//                                      BM 128: it takes query rows [64w, 64w + 64) and all D columns,
//     -> a 64 x 64 fp32 block in shared memory (dq_accum's column order, bwd_prepost.cu), which the drain
//        thread adds into dq_accum with TMA reductions (cp.reduce.async.bulk.tensor .add). Issuing the
//        same sums as 16-byte red.global.add from the consumers cost 30-45% of the kernel's time on an H100.
//   dQ needs both warpgroups' dS^T rows. Two schedules (kDeferDq):
//   - lockstep (BM 64): dV; dS^T stored while it runs; a named barrier of both warpgroups; dQ of tile it;
//     dK, which runs while dQ's block is stored (with kPrefetchScores, together with S^T of tile it + 1).
//   - deferred (BM 128): dV, dK, then dQ of tile it - 1 back to back; dS^T of tile it stored while dQ runs,
//     then dQ's block. The hand-off becomes an mbarrier wait (ds_full) on rows stored an iteration earlier,
//     not a rendezvous, so the warpgroups drift apart and one's exponentials and stores run while the
//     other's products keep the tensor cores busy; dS^T buffer it % 2 is rewritten once both warpgroups'
//     dQ products of tile it - 2, its last readers, have retired (ds_empty).
//   The dS^T buffer is double-buffered in both: in lockstep, a warpgroup writes buffer it % 2 only after
//   passing the barrier of iteration it - 1, which the other reaches only after its dQ product of tile
//   it - 2 has retired.
//   The fp32 dQ block is stored as boxes of 32 columns with the 128-byte swizzle (32 floats are the widest
//   box that swizzle allows): a warp's 16-byte stores then spread over all 32 banks (4 wavefronts for 512
//   bytes), where 256-byte unswizzled rows put its 8 rows on the same 16 banks (8 wavefronts).
//   Epilogue: dK * softmax_scale and dV to 16 bits, written from registers, rows < seqlen_k, cols < head_dim.
//   CF_DETERMINISTIC=1: the fp32 additions into a dQ row happen in one fixed order, so dQ is bitwise the
//   same on every run. The CTAs whose key blocks a query tile sees take turns: before adding tile m's
//   blocks the drain thread waits until m's turn counter (dq_turn_counter) equals the number of key blocks
//   that go before its own; once its reductions have completed (not only read shared memory) it advances
//   the counter. The consumers see it only as a later dq_empty. The key blocks of a head run on
//   consecutive CTAs and the turns follow launch order, so a CTA waits only on CTAs launched before it and
//   every wait ends even when the grid is many waves deep:
//   - full attention: ascending key blocks. All walk the query tiles in the same order, so block n runs
//     one reduction's latency behind block n - 1: 0.85-0.99x the default mode on the H200.
//   - causal and windows (kKeyBlocksDescending): descending key blocks, launched in that order. Block n
//     starts its walk at its diagonal, which blocks above it passed BN / BM tiles earlier, so it rarely
//     waits. In ascending order every block of a head finished with block 0, the longest walk, and the
//     short ones held their SMs idle meanwhile: 0.55-0.58x.
//
// P's exponent (bwd_common.cuh, BwdExponent) is picked per query tile by warp 1, which reads the tile's LSE
// rows anyway: the fast form 2^(s c2 - lse log2 e), or, when a row's |LSE| reaches kFastLseLimit, the exact
// one, which the consumers run as a pass s <- s * softmax_scale - lse (one FMA an element, exact near the
// row max) before the same loop with c2 = log2 e and a row term of 0. The choice reaches them as one
// shared-memory word per stage, so an ordinary tile pays a load and a branch, not an instruction an element.
// Softcap and ALiBi transform s inside the loop, where no pre-pass can shift it: they always take the exact
// form (kChooseExponent).
//
// Compile-time configuration (cuflash/dispatch.py): CF_DTYPE, CF_HEAD_DIM (64, 128, 192 or 256; a smaller real
// head dim is zero-filled by TMA), CF_BLOCK_M (64 at head dim 128, 128 at head dim 64: the dK, dV, S^T and dP^T
// accumulators then take 64 + 64 + 32 + 32 or 32 + 32 + 64 + 64 of the 240 registers; 64 at 192 / 256),
// CF_BLOCK_N (128; 64 at 192 / 256),
// CF_STAGES, CF_IS_LOCAL, CF_SOFTCAP, CF_ALIBI, CF_DETERMINISTIC, CF_VARLEN (optional, default 0),
// CF_ATTN_MASK (optional, default 0; attn_mask.cuh, dense builds without ALiBi: each element of P^T takes the
// mask's term, read from global memory per element as bwd_sm80.cu does, or for a boolean mask of 16-byte
// aligned rows at head dim 128 staged in shared memory (CF_MASK_STAGE, below); an additive mask takes the
// exact exponent form on every tile, as softcap does).
// CF_BLOCK_SPARSE (optional, default 0; with a boolean CF_ATTN_MASK, block_sparse.cuh): a CTA walks its
// (KV head, key tile) list of (query head, query tile) pairs instead of every visible query tile of the
// group's heads, and applies the element mask only on tiles of partial blocks; causal and window
// visibility come folded into the lists and masks (no CF_IS_LOCAL). Not deterministic (the turns count
// every key tile of a query tile).
// CF_DROPOUT (optional, default 0; dense builds, philox.cuh): the forward's keep mask Z is drawn again per
// tile (the transposed draws of bwd_sm80.cu) while S^T and dP^T run; dV takes P Z / (1 - p) and
// dS = P (dP Z / (1 - p) - delta), delta = rowsum(dO O) of the dropped O (the preprocess).
//
// Variable-length batches (CF_VARLEN, seq_context.cuh): the tensor maps cover the packed arrays and a CTA
// offsets its TMA rows by its sequence's first rows; CTAs past a sequence's keys return at once. Tiles at a
// sequence's end bring in another sequence's rows (or NaN in rows no sequence covers), and a masked P of 0
// does not cancel them (0 x NaN is NaN, and every product sums over both tile dimensions), so their rows are
// zeroed in shared memory before use: K and V once (each warpgroup its kBN / 2 keys, then a barrier of both,
// since dQ reads all kBN), Q and dO per query tile at the sequence's end (the rows split between the warpgroups,
// then a barrier of both). Rows past the sequence's queries then give P = 0 (LSE +inf) and
// dS = 0, so the dQ reductions add +0 into the next sequence's rows. dK and dV go out clipped at the
// sequence's keys. Deterministic mode is not built for it (the sm80 kernels serve it).
#include "ptx/cp_async.cuh"
#include "ptx/global_flags.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/warpgroup.cuh"
#include "ptx/wgmma.cuh"
#include "attention/params.cuh"
#include "attention/mask.cuh"
#include "attention/fragments.cuh"
#include "attention/score_product.cuh"
#include "attention/bwd_common.cuh"

#include "attention/build_flags.cuh"
#if CF_VARLEN
#include "attention/seq_context.cuh"
#endif
#if CF_ATTN_MASK
#include "attention/attn_mask.cuh"
#endif
#if CF_BLOCK_SPARSE
#include "attention/block_sparse.cuh"
#endif
#if CF_DROPOUT
#include "attention/philox.cuh"
#endif
static_assert(!CF_ATTN_MASK || (!CF_VARLEN && !CF_ALIBI && !CF_DROPOUT), "attn_mask: the dense build, no ALiBi or dropout");
static_assert(!CF_DROPOUT || !CF_VARLEN, "dropout: the dense build");
static_assert(!CF_BLOCK_SPARSE || (CF_ATTN_MASK == 1 && !CF_DETERMINISTIC && !CF_IS_LOCAL),
              "block sparsity: boolean masks (causal / window folded in), not deterministic");
static_assert(!(CF_VARLEN && CF_DETERMINISTIC), "the variable-length build has no deterministic turns");

// A CTA's sequence: lengths and first rows in the packed arrays (variable-length build); empty in the dense
// build, where the parameter block's lengths and the batch coordinate place the rows.
struct SeqRows {
#if CF_VARLEN
    int seqlen_q, seqlen_k, row_q, row_k;
    __device__ __forceinline__ SeqRows(const AttentionParams& a, int b) {
        const SeqContext seq(a, b);
        seqlen_q = seq.seqlen_q;
        seqlen_k = seq.seqlen_k;
        row_q = seq_first_row(a.cu_seqlens_q, a.total_q, b);
        row_k = seq_first_row(a.cu_seqlens_k, a.total_k, b);
    }
#else
    __device__ __forceinline__ SeqRows(const AttentionParams&, int) {}
#endif
};
#if CF_VARLEN
#define CF_SEQLEN_Q(a, sr) (sr).seqlen_q
#define CF_SEQLEN_K(a, sr) (sr).seqlen_k
#define CF_Q_ROW(sr) (sr).row_q +
#define CF_K_ROW(sr) (sr).row_k +
#define CF_TMA_BATCH(bc) 0
#else
#define CF_SEQLEN_Q(a, sr) (a).seqlen_q
#define CF_SEQLEN_K(a, sr) (a).seqlen_k
#define CF_Q_ROW(sr)
#define CF_K_ROW(sr)
#define CF_TMA_BATCH(bc) (bc).b
#endif

// Launch parameters: the tensor maps, then the shared block (cuflash/ops.py packs the same bytes).
struct BackwardSm90Params {
    TmaMap q, k, v, dout;
    TmaMap dq_accum;  // fp32, boxes of 64 rows x kDqBoxCols, 128-byte swizzle
    AttentionParams a;
};
extern "C" __device__ const int cf_bwd_sm90_params_bytes = sizeof(BackwardSm90Params);

namespace {
constexpr int kD = CF_HEAD_DIM;
constexpr int kBM = CF_BLOCK_M;
constexpr int kBN = CF_BLOCK_N;
constexpr int kStages = CF_STAGES;
constexpr int kThreads = 384;
constexpr int kNT8 = kBM / 8;           // n8 column groups of a warpgroup's S^T / dP^T tile
constexpr int kCol64 = kD / 64;         // 128-byte swizzled column blocks of a Q / dO / K / V row
constexpr u32 kQBlock = kBM * 128;      // bytes of one column block of a Q or dO tile
constexpr u32 kKBlock = kBN * 128;
constexpr u32 kQBytes = kQBlock * kCol64;
constexpr u32 kKBytes = kKBlock * kCol64;
constexpr u32 kDSBlock = kBN * 128;     // dS^T tile: rows are keys, kBM / 64 column blocks of queries
constexpr u32 kDSBytes = kDSBlock * (kBM / 64);
// Head dims 192 and 256: 64 keys a CTA, the work of a step split another way (bwd_sm90_wide.cuh).
constexpr bool kWide = kD > 128;
// dQ split between the two consumer warpgroups (see the top and bwd_sm90_wide.cuh): N of each one's product
// (kDqCols0 for warpgroup 0, kDqCols1 for warpgroup 1), whole 64-column blocks of K.
constexpr int kDqCols0 = kWide ? 128 : (kBM == 64 ? kD / 2 : kD);
constexpr int kDqCols1 = kWide ? kD - 128 : kDqCols0;
constexpr int kDqN = kDqCols0;                // the head-dim-64/128 builds' one size
constexpr int kDqBoxCols = 32;                // fp32 columns of a dQ reduction box: 128 bytes, the swizzle span
constexpr u32 kDqBoxBytes = 64 * kDqBoxCols * 4;
static_assert(kWide ? (kBN == 64 && kBM == 64 && kD % 64 == 0)
                    : (kBN == 128 && ((kD == 128 && kBM == 64) || (kD == 64 && kBM == 128))),
              "two consumer warpgroups of 64 keys (head dims 64 / 128) or of 32 queries (192 / 256), whole column "
              "blocks per dQ split");
static_assert(!kWide || !CF_ATTN_MASK, "head dims 192 / 256: no element-mask build");
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
// P^T from S^T while dP^T is still running, dS^T once it has retired: keeps P^T in fp32 across the wait
// (kBM / 2 more live registers), which fits at head dim 128 and not at 64 (BM 128); softcap's dS also needs
// 1 - tanh^2 of every element, so it computes both at once after both products. An additive mask's causal
// and window builds spilled 4 bytes with it (its term adds a load and the scaled form per element).
constexpr bool kEarlyP = !CF_SOFTCAP && kBM == 64 && !(CF_ATTN_MASK == 2 && CF_IS_LOCAL);
// dQ one tile late with mbarrier hand-offs (kDeferDq, see the top) at BM 128 (head dim 64): +7-10% there on
// the H200. At BM 64 (head dim 128) it cost 5-12% in every order of the products tried (with dK's A from
// registers ptxas also spilled 20-48 bytes), so that tile keeps both warpgroups in step with a named barrier
// before dQ of the same tile.
constexpr bool kDeferDq = kBM == 128;
// Lockstep at head dim 128 (see consume's tile): S^T of the next query tile issued behind dQ and dK of this
// one, and the tile's LSE rows loaded in one batch ahead of the exponentials (with kLeanElements, below).
// H200, same process: +2-4% at 2k (full and causal, MHA and GQA), 0-2% at 16k (bench/NOTES.md, hb10). Not in
// the builds whose registers do not hold the extra 32 accumulators and 16 row terms (softcap, element masks,
// variable-length batches, ALiBi with dropout: 4-160 bytes of spills), nor with dropout (its draws
// overlapped S^T, which would now be done before they start) or deterministic turns (a CTA's dQ hand-off
// would also wait for its next Q tile), neither measured with it. It needs two stages: the next tile's S^T
// waits for its stage before this tile's is released.
constexpr bool kPrefetchScores = !kWide && !kDeferDq && !CF_SOFTCAP && !CF_ATTN_MASK && !CF_VARLEN && !CF_DROPOUT &&
                                 !CF_DETERMINISTIC;
static_assert(!kPrefetchScores || kStages >= 2, "S^T of the next tile waits for a stage of its own");
// The element loop compiled twice, with and without the visibility test, the lean copy on tiles that need no
// mask (see the loop): in every build that takes it without spilling more than hd64's 24 bytes (36 in its
// variable-length build; dispatch.allowed_spill_bytes), the prefetch builds among them. H200, same process: hd64 +4-19%
// (variable-length +26%), hd128 deterministic +4-9%, variable-length +8% (bench/NOTES.md, hb11; the hd128
// ALiBi builds among them were not measured apart). ALiBi at hd64 spilled 108-116 bytes, softcap about 300;
// dropout and hd128 softcap (4 bytes) are not measured.
constexpr bool kLeanElements = !CF_SOFTCAP && !CF_ATTN_MASK && !CF_DROPOUT && !(kBM == 128 && CF_ALIBI);
static_assert(kLeanElements || !kPrefetchScores, "the prefetch builds take the lean loop (hb10)");
constexpr int kDsBarrier = 1;  // named barrier (lockstep mode): both consumer warpgroups' dS^T rows are stored
#if CF_VARLEN
// Named barriers of the variable-length build (both consumer warpgroups): the K / V tail rows are zeroed; a
// stage's Q or dO tail rows are zeroed.
constexpr int kKvTailBarrier = 2;
constexpr int kQTailBarrier = 3;
#endif
// Deterministic turns in descending key-block order where the key blocks' walks are staggered (see the top).
constexpr bool kKeyBlocksDescending = CF_DETERMINISTIC && CF_IS_LOCAL;

constexpr u32 kSmemK = 0;
constexpr u32 kSmemV = kSmemK + kKBytes;
constexpr u32 kSmemQ = kSmemV + kKBytes;
constexpr u32 kSmemDO = kSmemQ + kStages * kQBytes;
constexpr u32 kSmemDS = kSmemDO + kStages * kQBytes;
constexpr u32 kSmemPT = kSmemDS + 2 * kDSBytes;  // head dims 192 / 256: the one P^T buffer
constexpr u32 kSmemLse = kSmemPT + (kWide ? kDSBytes : 0);
constexpr u32 kSmemDelta = kSmemLse + kStages * kBM * 4;
constexpr u32 kDqBytes0 = 64 * kDqCols0 * 4;  // warpgroup 0's fp32 dQ block, rows of kDqCols0 floats
constexpr u32 kDqBytes1 = 64 * kDqCols1 * 4;
constexpr u32 kSmemLseExact = kSmemDelta + kStages * kBM * 4;  // natural LSE rows of exact-form tiles
constexpr u32 kSmemTileForm = kSmemLseExact + kStages * kBM * 4;  // per stage: 1 = exact form; 128 bytes
constexpr u32 kSmemDq = (kSmemTileForm + 128 + 1023) / 1024 * 1024;  // the 128-byte swizzle wants 1024-byte boxes
constexpr u32 kSmemBars = kSmemDq + kDqBytes0 + kDqBytes1;
constexpr u32 kBarrierBytes = 8 * (9 + kWide + 3 * kStages);
// Staged boolean masks (CF_MASK_STAGE, head dim 128): each consumer warpgroup copies its 64 keys x kBM queries
// of the mask (a byte each) into one of two buffers with 16-byte cp.async, one query tile ahead, and reads
// its P^T elements from there; read from global memory per element, a tile's loads sat behind the score
// products with nothing to hide them (both warpgroups move in step): 3.8x below the unmasked kernel. A row
// (query) is 4 chunks of 16 bytes, chunk c of row r at c ^ ((r / 2) % 4): the 4 rows a warp reads at once
// (2t + e % 2 for its lanes' t) then fall in 4 different bank groups.
constexpr u32 kMaskBufBytes = kBM * 64;
constexpr u32 kSmemMask = (kSmemBars + kBarrierBytes + 15) / 16 * 16;
constexpr u32 kSmemEnd = CF_MASK_STAGE ? kSmemMask + 2 * 2 * kMaskBufBytes : kSmemBars + kBarrierBytes;
static_assert(!CF_MASK_STAGE || (CF_ATTN_MASK == 1 && kBM == 64), "staged masks: boolean ones, 64-query tiles");
constexpr int kMaskBarrier0 = 4;  // + cw: named barrier (one warpgroup): its mask copies of a tile have landed
}  // namespace

extern "C" __device__ const int cf_bwd_sm90_smem_bytes = kSmemEnd + 1024;
extern "C" __device__ const int cf_bwd_sm90_dq_box_cols = kDqBoxCols;  // the host's dq_accum tensor map box
extern "C" __device__ const int cf_dq_turn_rows = kDqTurnRows;  // the host's dq_semaphore size

// Offsets in the dynamic shared memory (1024-byte aligned base, as the 128-byte swizzle needs).
struct SmemLayout {
    u32 base;
    __device__ __forceinline__ explicit SmemLayout(u32 b) : base(b) {}
    __device__ __forceinline__ u32 k() const { return base + kSmemK; }
    __device__ __forceinline__ u32 v() const { return base + kSmemV; }
    __device__ __forceinline__ u32 q(int s) const { return base + kSmemQ + s * kQBytes; }
    __device__ __forceinline__ u32 dout(int s) const { return base + kSmemDO + s * kQBytes; }
    __device__ __forceinline__ u32 ds(int buf) const { return base + kSmemDS + buf * kDSBytes; }
    __device__ __forceinline__ u32 lse(int s) const { return base + kSmemLse + s * kBM * 4; }
    __device__ __forceinline__ u32 delta(int s) const { return base + kSmemDelta + s * kBM * 4; }
    __device__ __forceinline__ u32 lse_exact(int s) const { return base + kSmemLseExact + s * kBM * 4; }
    __device__ __forceinline__ u32 tile_form(int s) const { return base + kSmemTileForm + s * 4; }
    // Variable-length build: the CTA's sequence lengths (seqlen_q, seqlen_k), which the consumers re-read
    // per tile rather than keep in registers (kept, head dim 64 spilled 4 bytes).
    __device__ __forceinline__ u32 seq_lengths() const { return base + kSmemTileForm + 64; }
    __device__ __forceinline__ u32 pt() const { return base + kSmemPT; }
    __device__ __forceinline__ u32 dq(int cw) const { return base + kSmemDq + cw * kDqBytes0; }
    // kv_full: K and V landed. q_full[s]: Q and the LSE / delta rows (TMA bytes + 32 arrivals of warp 1).
    // do_full[s]: dO. empty[s]: both consumer warpgroups are done with stage s.
    // Every consumer thread arrives on empty[s] (each read LSE / delta rows that the producer overwrites
    // next); dq_full[cw] takes one arrival per warp, after a __syncwarp that orders the lanes' stores (the
    // copy engine, not a thread, reads that block): per-warp arrivals on both measured +3-8% on an H100,
    // but on empty[s] compute-sanitizer's racecheck cannot see the other lanes' reads ordered before lane
    // 0's arrival and reports hazards.
    __device__ __forceinline__ u32 kv_full() const { return base + kSmemBars; }
    __device__ __forceinline__ u32 q_full(int s) const { return base + kSmemBars + 8 * (1 + s); }
    __device__ __forceinline__ u32 do_full(int s) const { return base + kSmemBars + 8 * (1 + kStages + s); }
    __device__ __forceinline__ u32 empty(int s) const { return base + kSmemBars + 8 * (1 + 2 * kStages + s); }
    // dq_full[cw]: warpgroup cw's dQ block is in shared memory; dq_empty[cw]: its reduction has read it.
    __device__ __forceinline__ u32 dq_full(int cw) const { return base + kSmemBars + 8 * (1 + 3 * kStages + cw); }
    __device__ __forceinline__ u32 dq_empty(int cw) const { return base + kSmemBars + 8 * (3 + 3 * kStages + cw); }
    // ds_full[b]: all 8 consumer warps stored their dS^T rows into buffer b; ds_empty[b]: all 8 have retired
    // the dQ product that read it. One arrival per warp, as on dq_full.
    __device__ __forceinline__ u32 ds_full(int b) const { return base + kSmemBars + 8 * (5 + 3 * kStages + b); }
    __device__ __forceinline__ u32 ds_empty(int b) const { return base + kSmemBars + 8 * (7 + 3 * kStages + b); }
    // Head dims 192 / 256: warpgroup 0's dV^T product of the step has retired, so the P^T buffer is free (one
    // arrival per warp of warpgroup 0).
    __device__ __forceinline__ u32 pt_free() const { return base + kSmemBars + 8 * (9 + 3 * kStages); }
    // Staged masks: consumer warpgroup cw's buffer `buf` (0 or 1).
    __device__ __forceinline__ u32 mask_stage(int cw, int buf) const {
        return base + kSmemMask + (2 * cw + buf) * kMaskBufBytes;
    }
};

#if CF_BLOCK_SPARSE
// Query tiles of this CTA from its list: iteration it is entry it, ((head in group) << 16 | query tile,
// partial-block mask or -1).
struct QueryWalk {
    const int2* list;
    int n_iters, group;
    __device__ __forceinline__ QueryWalk(const AttentionParams& a, const BwdCoords& bc) {
        const i64 row = block_row(a, bc.b, bc.hk, bc.n_block);
        list = a.block_lists + row * a.block_list_len;
        n_iters = block_count(a, row);
        group = a.heads_q / a.heads_k;
    }
    __device__ __forceinline__ int head(int hk, int it) const { return hk * group + (list[it].x >> 16); }
    __device__ __forceinline__ int m_start(int it) const { return (list[it].x & 0xffff) * kBM; }
    __device__ __forceinline__ int partial(int it) const { return list[it].y; }
};
#else
// Query tiles of this CTA: iteration it is query head hk * group + it / n_m, query tile m_lo + it % n_m.
struct QueryWalk {
    int m_lo, n_m, n_iters, group;
    __device__ __forceinline__ QueryWalk(const AttentionParams& a, const SeqRows& sr, const Visibility& vis,
                                         int n_start) {
        int m_hi;
        vis.query_tiles(n_start, min(n_start + kBN, CF_SEQLEN_K(a, sr)) - 1, kBM, &m_lo, &m_hi);
        n_m = max(m_hi - m_lo, 0);
        group = a.heads_q / a.heads_k;
        n_iters = n_m * group;
    }
    __device__ __forceinline__ int head(int hk, int it) const { return hk * group + it / n_m; }
    __device__ __forceinline__ int m_start(int it) const { return (m_lo + it % n_m) * kBM; }
};
#endif

__device__ __forceinline__ int stage_of(int it) { return it % kStages; }
__device__ __forceinline__ u32 parity_of(int it) { return (it / kStages) & 1; }

__device__ __forceinline__ void produce_tiles(const BackwardSm90Params& p, const SmemLayout& sm, const QueryWalk& qw,
                                              const BwdCoords& bc, const SeqRows& sr) {
    tma_prefetch_map(&p.q);
    tma_prefetch_map(&p.dout);
    const int n_start = bc.n_block * kBN;
    mbar_arrive_expect_tx(sm.kv_full(), 2 * kKBytes);
    for (int c = 0; c < kCol64; ++c) {
        tma_load_4d(sm.k() + c * kKBlock, &p.k, sm.kv_full(), c * 64, CF_K_ROW(sr) n_start, bc.hk, CF_TMA_BATCH(bc));
        tma_load_4d(sm.v() + c * kKBlock, &p.v, sm.kv_full(), c * 64, CF_K_ROW(sr) n_start, bc.hk, CF_TMA_BATCH(bc));
    }
    for (int it = 0; it < qw.n_iters; ++it) {
        const int s = stage_of(it), h = qw.head(bc.hk, it), m0 = qw.m_start(it);
        mbar_wait(sm.empty(s), parity_of(it) ^ 1);
        mbar_arrive_expect_tx(sm.q_full(s), kQBytes);
        for (int c = 0; c < kCol64; ++c)
            tma_load_4d(sm.q(s) + c * kQBlock, &p.q, sm.q_full(s), c * 64, CF_Q_ROW(sr) m0, h, CF_TMA_BATCH(bc));
        mbar_arrive_expect_tx(sm.do_full(s), kQBytes);
        for (int c = 0; c < kCol64; ++c)
            tma_load_4d(sm.dout(s) + c * kQBlock, &p.dout, sm.do_full(s), c * 64, CF_Q_ROW(sr) m0, h,
                        CF_TMA_BATCH(bc));
    }
}

// LSE and delta rows are fp32 at arbitrary seqlen_q offsets (no 16-byte alignment for a bulk copy), so a
// warp moves them with ordinary loads; its mbarrier arrival (release) publishes the stores.
__device__ __forceinline__ void produce_row_stats(const BackwardSm90Params& p, const SmemLayout& sm,
                                                  const QueryWalk& qw, const BwdCoords& bc, const SeqRows& sr,
                                                  int lane) {
    for (int it = 0; it < qw.n_iters; ++it) {
        const int s = stage_of(it), h = qw.head(bc.hk, it), m0 = qw.m_start(it);
#if CF_VARLEN
        const i64 row_base = (i64)h * p.a.varlen_lse_head_stride + sr.row_q;  // (heads_q, total_q) rows
#else
        const i64 row_base = ((i64)bc.b * p.a.heads_q + h) * p.a.seqlen_q;
#endif
        float lse[kBM / 32], delta[kBM / 32];
        bool exact = !kChooseExponent;
#pragma unroll
        for (int k = 0; k < kBM / 32; ++k) {
            const int i = m0 + k * 32 + lane;
            const bool valid = i < CF_SEQLEN_Q(p.a, sr);
            lse[k] = valid ? p.a.lse[row_base + i] : CF_INF;
            delta[k] = valid ? p.a.delta[row_base + i] : 0.f;
            exact |= lse_needs_exact(lse[k]);
        }
        exact = __any_sync(0xffffffffu, exact);
        mbar_wait(sm.empty(s), parity_of(it) ^ 1);
#pragma unroll
        for (int k = 0; k < kBM / 32; ++k) {
            const u32 r4 = (k * 32 + lane) * 4;
            // Exact tiles: row term 0 for the common loop, the natural LSE for the consumers' pre-pass (without
            // kChooseExponent the loop itself takes the natural LSE).
            const float row = kChooseExponent ? (exact ? 0.f : BwdExponent<false>::row_term(lse[k])) : lse[k];
            asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(sm.lse(s) + r4), "f"(row) : "memory");
            asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(sm.delta(s) + r4), "f"(delta[k]) : "memory");
            if (kChooseExponent && exact)
                asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(sm.lse_exact(s) + r4), "f"(lse[k]) : "memory");
        }
        if (kChooseExponent && lane == 0)
            asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(sm.tile_form(s)), "r"((u32)exact) : "memory");
        mbar_arrive(sm.q_full(s));
    }
}

// Warpgroup w's dQ block of an iteration: 64 rows x dq_cols(w) head-dim columns of dq_accum, at these
// coordinates.
__device__ __forceinline__ int dq_cols(int cw) { return cw == 0 ? kDqCols0 : kDqCols1; }
__device__ __forceinline__ int dq_col0(int cw) { return kBM == 64 ? cw * kDqCols0 : 0; }
__device__ __forceinline__ int dq_row0(int m0, int cw) { return m0 + (kBM == 128 ? cw * 64 : 0); }

// One thread drains dQ: as each consumer warpgroup's block lands in shared memory, a TMA reduction adds it
// into dq_accum; the block's buffer is handed back once the copy engine has read it. Deterministic: in
// turns (see the top).
__device__ __forceinline__ void drain_dq(const BackwardSm90Params& p, const SmemLayout& sm, const QueryWalk& qw,
                                         const BwdCoords& bc, const SeqRows& sr, const Visibility& vis) {
    tma_prefetch_map(&p.dq_accum);
    static_assert(kBM % kDqTurnRows == 0, "a query tile's rows share the turn counter of its first rows");
    for (int it = 0; it < qw.n_iters; ++it) {
        const int h = qw.head(bc.hk, it), m0 = qw.m_start(it);
        int* turn_counter = nullptr;
        if (CF_DETERMINISTIC) {
            int n_lo, n_hi;
            vis.key_tiles(m0, min(m0 + kBM, p.a.seqlen_q) - 1, kBN, &n_lo, &n_hi);
            turn_counter = dq_turn_counter(p.a, bc.b, h, m0);
            wait_flag_equals(turn_counter, kKeyBlocksDescending ? n_hi - 1 - bc.n_block : bc.n_block - n_lo);
            fence_proxy_async_global();  // the earlier turns' sums, seen through the acquire, before our reductions
        }
#pragma unroll
        for (int cw = 0; cw < 2; ++cw) {
            mbar_wait(sm.dq_full(cw), it & 1);
#pragma unroll
            for (int c = 0; c < dq_cols(cw) / kDqBoxCols; ++c)
                tma_reduce_add_4d(&p.dq_accum, sm.dq(cw) + c * kDqBoxBytes, dq_col0(cw) + c * kDqBoxCols,
                                  CF_Q_ROW(sr) dq_row0(m0, cw), h, CF_TMA_BATCH(bc));
            tma_store_commit();
        }
        tma_store_wait_read();
        mbar_arrive(sm.dq_empty(0));
        mbar_arrive(sm.dq_empty(1));
        if (CF_DETERMINISTIC) {
            tma_store_wait_all();
            fence_proxy_async_global();
            red_release_gpu_add(turn_counter, 1);
        }
    }
    tma_store_wait_all();
}

// A consumer warpgroup's retired dQ block of iteration j (64 query rows x N head-dim columns, as wgmma left it)
// into its shared buffer, once the drain's reduction of iteration j - 1 has read that, in dq_accum's layout
// (bwd_prepost.cu: a lane's columns 2t, 2t+1 of both n8 groups of a 16-column group are four consecutive
// floats, chunk 4 (n % 2) + t of a 128-byte box row, swizzled); then dq_full for the drain thread.
template <int N>
__device__ __forceinline__ void hand_over_dq(const SmemLayout& sm, const float (&acc)[N / 8][4], int cw, int j,
                                             int warp_in_wg, int lane) {
    const int g = lane >> 2, t = lane & 3;
    mbar_wait(sm.dq_empty(cw), (j & 1) ^ 1);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_in_wg * 16 + g + 8 * hh;
#pragma unroll
        for (int n = 0; n < N / 16; ++n) {
            const u32 addr = sm.dq(cw) + (n / 2) * kDqBoxBytes + r * 128 + (((4 * (n % 2) + t) ^ (r & 7)) << 4);
            asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n"
                         :: "r"(addr), "f"(acc[2 * n][2 * hh]), "f"(acc[2 * n][2 * hh + 1]),
                            "f"(acc[2 * n + 1][2 * hh]), "f"(acc[2 * n + 1][2 * hh + 1]) : "memory");
        }
    }
    fence_proxy_async_smem();
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.dq_full(cw));
}

// S^T = K.Q^T or dP^T = V.dO^T of one consumer warpgroup: its 64 key rows at `key_rows` (A) against the N
// query rows at `query_rows` (B), both K-major (score_product.cuh). `query_rows` may start a whole number of
// 8-row swizzle groups into the tile (bwd_sm90_wide.cuh's 32-query halves).
template <int N>
__device__ __forceinline__ void issue_score_product(float (&acc)[N / 8][4], u32 key_rows, u32 query_rows) {
    const u64 key_desc = wgmma::desc_sw128(key_rows, 16, 1024);
    const u64 query_desc = wgmma::desc_sw128(query_rows, 16, 1024);
    wgmma::fence();
    kmajor_score_product<N, kD>(reinterpret_cast<float(&)[N / 2]>(acc), key_desc, kKBlock, query_desc, kQBlock);
    wgmma::commit();
}

#if CF_DROPOUT
// A lane's keep bits of a transposed score tile (S^T: rows keys from key_row0, NT8 n8 groups of queries from
// q0): the forward's draws (philox.cuh; the sm80 KV-parallel kernel's transposed fragment, one draw per lane
// per pair of n8 groups), element e of n8 group n = 2 p + nn at bit 4 (4 nn + 2 (e / 2) + e % 2) + p % 4 of
// word p / 4 (transposed_keep_bits).
template <int NT8>
struct TransposedKeep {
    u32 words[(NT8 + 7) / 8] = {};
    __device__ __forceinline__ void draw(const AttentionParams& a, int b, int h, int q0, int key_row0, int lane) {
        // The key through loop_variant: hoisted out of the tile loop, its ten round keys (20 registers) would
        // stay live across every product.
        const DropoutCall drop = dropout_call(a.dropout_rng, a.dropout_seed, a.dropout_offset);
        const PhiloxKey drop_key{loop_variant(drop.key.k0), loop_variant(drop.key.k1)};
        const u32 drop_bh = (u32)(b * a.heads_q + h);
#pragma unroll
        for (int n = 0; n < NT8; n += 2) {
            const u32 draw = dropout_draw_transposed(drop_key, drop.offset, drop_bh, q0, key_row0, n, lane,
                                                     (u32)a.dropout_threshold);
            words[n / 8] |= transposed_keep_bits(draw, lane) << ((n / 2) % 4);
        }
    }
    __device__ __forceinline__ bool kept(int n, int e) const {
        const int bit = 4 * (4 * (n % 2) + 2 * (e / 2) + e % 2) + (n / 2) % 4;
        return ((words[n / 8] >> bit) & 1u) != 0;
    }
};
#endif

#if CF_VARLEN
// Variable-length build: zeroes rows [from, to) of a 128-byte-swizzled tile (column blocks of block_bytes,
// 128-byte rows: a whole row is zeroed, so the swizzle does not matter), `threads` threads from `tid`.
__device__ __forceinline__ void zero_tile_rows(u32 tile, u32 block_bytes, int from, int to, int tid, int threads) {
    for (int c = tid; c < (to - from) * kCol64 * 8; c += threads) {
        const int rc = c / 8;
        const u32 addr = tile + (rc % kCol64) * block_bytes + (from + rc / kCol64) * 128 + (c % 8) * 16;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" :: "r"(addr), "r"(0u) : "memory");
    }
}

// Key rows of K and V past the sequence's keys, zeroed by both consumer warpgroups (warpgroup cw takes rows
// [cw kBN / 2, (cw + 1) kBN / 2) of the CTA's kBN) before either's products read them: S^T / dP^T read a
// warpgroup's own rows, but dQ reads all of them, hence the barrier.
__device__ __forceinline__ void zero_key_tail(const SmemLayout& sm, int n_start, int seqlen_k, int cw, int wg_tid) {
    if (n_start + kBN <= seqlen_k) return;  // CTA-uniform: both warpgroups reach the barrier or neither
    constexpr int kHalf = kBN / 2;
    const int from = cw * kHalf + max(0, min(kHalf, seqlen_k - n_start - cw * kHalf));
    zero_tile_rows(sm.k(), kKBlock, from, cw * kHalf + kHalf, wg_tid, 128);
    zero_tile_rows(sm.v(), kKBlock, from, cw * kHalf + kHalf, wg_tid, 128);
    fence_proxy_async_smem();
    named_barrier_sync(kKvTailBarrier, 256);
}

// Q or dO rows of a stage past the sequence's queries, split between both consumer warpgroups (both take
// every query tile, so both reach the barrier), before either's products read the stage.
__device__ __forceinline__ void zero_query_tail(u32 tile, int m0, int seqlen_q, int cw, int wg_tid) {
    if (m0 + kBM <= seqlen_q) return;
    zero_tile_rows(tile, kQBlock, seqlen_q - m0, kBM, cw * 128 + wg_tid, 256);
    fence_proxy_async_smem();
    named_barrier_sync(kQTailBarrier, 256);
}
#endif

#if CF_HEAD_DIM > 128
#include "attention/bwd_sm90_wide.cuh"
#else
__device__ __forceinline__ void consume(const BackwardSm90Params& p, const SmemLayout& sm, const QueryWalk& qw,
                                        const BwdCoords& bc, const SeqRows& sr, const Visibility& vis, int cw,
                                        int warp_in_wg, int lane) {
    const AttentionParams& a = p.a;
    const int n_start = bc.n_block * kBN;
    const int g = lane >> 2, t = lane & 3;
    // This warpgroup's 64 keys: the A operand of the score products starts at its row 64 cw of K / V.
    const u32 k_rows = sm.k() + cw * 64 * 128;
    const u32 v_rows = sm.v() + cw * 64 * 128;
    const int key_row0 = n_start + cw * 64 + warp_in_wg * 16;  // key of this warp's accumulator row 0

    float acc_dk[kD / 8][4], acc_dv[kD / 8][4];
    zero_fill(reinterpret_cast<float(&)[1][kD / 8][4]>(acc_dk));
    zero_fill(reinterpret_cast<float(&)[1][kD / 8][4]>(acc_dv));
    mbar_wait(sm.kv_full(), 0);
#if CF_VARLEN
    const int wg_tid = warp_in_wg * 32 + lane;
    zero_key_tail(sm, n_start, sr.seqlen_k, cw, wg_tid);  // this CTA holds the sequence's last keys (see the top)
#endif

    const float pre = CF_SOFTCAP ? a.softmax_scale / a.softcap : a.softmax_scale;
    const float score_scale = natural_score_scale<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(a.softmax_scale);
    using Exponent = BwdExponent<!kChooseExponent>;

    // dQ = dS.K of tile j over all 128 keys, once both warpgroups have stored its dS^T: A = dS read from dS^T
    // (M-major), B = K (N-major); the k16 step moves 16 key rows = 2048 bytes in both.
    auto issue_dq = [&](float (&acc)[kDqN / 8][4], int j) {
        if (kDeferDq) mbar_wait(sm.ds_full(j & 1), (j >> 1) & 1);
        const u64 a_desc = wgmma::desc_sw128(sm.ds(j & 1) + (kBM == 128 ? cw * kDSBlock : 0), kDSBlock, 1024);
        const u64 b_desc = wgmma::desc_sw128(sm.k() + (kBM == 64 ? cw * (kDqN / 64) * kKBlock : 0), kKBlock, 1024);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
            WgmmaShape<kDqN>::ss_tt(reinterpret_cast<float(&)[kDqN / 2]>(acc),
                                    wgmma::desc_advance(a_desc, kk * 16 * 128),
                                    wgmma::desc_advance(b_desc, kk * 16 * 128), kk > 0);
        wgmma::commit();
    };
    // Tile j's retired dQ product: its dS^T buffer is handed back, and the block goes to this warpgroup's shared
    // buffer in dq_accum's layout (bwd_prepost.cu: a lane's columns 2t, 2t+1 of both n8 groups of a 16-column
    // group are four consecutive floats, chunk 4 (n % 2) + t of a 128-byte box row) once the reduction of
    // tile j - 1 has read it; the drain thread adds it into dq_accum.
    auto store_dq = [&](float (&acc)[kDqN / 8][4], int j) {
        wgmma::fence_operand(reinterpret_cast<float(&)[kDqN / 2]>(acc));
        if (kDeferDq) {
            __syncwarp();
            if (lane == 0) mbar_arrive(sm.ds_empty(j & 1));
        }
        hand_over_dq<kDqN>(sm, acc, cw, j, warp_in_wg, lane);
    };
    // Staged masks: this warpgroup's 64 keys x the queries of query tile `it` into buffer it % 2
    // (attn_mask.cuh: stage_mask_tile; its rows are queries, P is 0 past seqlen_q anyway).
    auto stage_mask = [&](int it) {
#if CF_MASK_STAGE && CF_BLOCK_SPARSE
        const int pidx = qw.partial(it), m0 = qw.m_start(it);
        if (pidx >= 0)  // (a full block: nothing staged)
            stage_mask_tile<kBM, 4, 1, 128>(sm.mask_stage(cw, it & 1), partial_mask_head(a, pidx, m0, n_start), a, m0,
                                            n_start + cw * 64, warp_in_wg * 32 + lane);
#elif CF_MASK_STAGE
        stage_mask_tile<kBM, 4, 1, 128>(sm.mask_stage(cw, it & 1), attn_mask_head(a, bc.b, qw.head(bc.hk, it)), a,
                                        qw.m_start(it), n_start + cw * 64, warp_in_wg * 32 + lane);
#else
        (void)it;
#endif
    };
    // S^T = K.Q^T of query tile it (issue_score_product), once its Q and row statistics have landed.
    auto begin_scores = [&](int it, float (&acc)[kNT8][4]) {
        mbar_wait(sm.q_full(stage_of(it)), parity_of(it));
        issue_score_product<kBM>(acc, k_rows, sm.q(stage_of(it)));
    };
    // One query tile; with_prev: the dQ product of tile it - 1 is interleaved (deferred). kPrefetchScores: S^T
    // of the tile is already in sc_prefetched, and with next, S^T of tile it + 1 goes there, issued behind dQ
    // and dK so that the tensor cores have it to run while dQ's block is stored and handed over (ncu, hd128
    // 16k: those stores and their proxy fence were 18% of the consumers' samples, and dK alone did not cover
    // them).
    // with_prev and next are constants at each inlined call (the first or last tile is a call of its own, not
    // a run-time test in the loop) so that ptxas sees straight-line wgmma pipelines: with the test, it
    // serialized every wgmma (C7514) and spilled 380 bytes.
    auto tile = [&](int it, bool with_prev, float (&sc_prefetched)[kNT8][4], bool next) {
        const int s = stage_of(it);
        const u32 ph = parity_of(it);
        const int h = qw.head(bc.hk, it), m0 = qw.m_start(it);

        // Without kPrefetchScores S^T's accumulators are this tile's own (sc_prefetched is a dummy): declared
        // here, they are not live across the loop.
        float sc_local[kNT8][4], dp[kNT8][4];
        float (&sc)[kNT8][4] = kPrefetchScores ? sc_prefetched : sc_local;
#if CF_DROPOUT
        // This lane's keep bits of the tile (TransposedKeep). Drawn while S^T runs at BM 64; at BM 128, whose
        // S^T alone is 64 registers, before it is issued (with it in flight the draws spilled 12 bytes).
        TransposedKeep<kNT8> keep;
        auto draw_keep = [&]() { keep.draw(a, bc.b, h, m0, key_row0, lane); };
        auto kept = [&](int n, int e) { return keep.kept(n, e); };
        if (kBM == 128) draw_keep();
#endif
        if (!kPrefetchScores) mbar_wait(sm.q_full(s), ph);
#if CF_VARLEN
        int tile_seqlen_q, tile_seqlen_k;
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(tile_seqlen_q), "=r"(tile_seqlen_k) : "r"(sm.seq_lengths()) : "memory");
        const Visibility tv(tile_seqlen_q, tile_seqlen_k, a.window_left, a.window_right);
        zero_query_tail(sm.q(s), m0, tile_seqlen_q, cw, wg_tid);
#define CF_TILE_SEQLEN_Q tile_seqlen_q
#else
#define CF_TILE_SEQLEN_Q a.seqlen_q
        const Visibility& tv = vis;
#endif
        if (!kPrefetchScores) issue_score_product<kBM>(sc, k_rows, sm.q(s));
#if CF_DROPOUT
        if (kBM == 64) draw_keep();
#endif
        bool exact_tile = false;  // warp 1's exponent form for this tile (see the top)
        if (kChooseExponent) {
            u32 form;
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(form) : "r"(sm.tile_form(s)));
            exact_tile = form != 0;
        }
        const Exponent ex = kChooseExponent ? Exponent{exact_tile ? kLog2e : a.scale_log2}
                                          : Exponent::template make<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(a.softmax_scale,
                                                                                            a.scale_log2);
        mbar_wait(sm.do_full(s), ph);
#if CF_VARLEN
        zero_query_tail(sm.dout(s), m0, tile_seqlen_q, cw, wg_tid);
#endif
        issue_score_product<kBM>(dp, v_rows, sm.dout(s));
        // P^T, then dS^T, packed to 16-bit A fragments as they are made (two neighbouring n8 groups of an
        // accumulator are one k16 step of an A operand). Element e of n8 group n: key key_row0 + g + 8 (e / 2),
        // query m0 + 8 n + 2 t + e % 2. Rows past seqlen_q carry lse = +inf (P = 0), so only keys past
        // seqlen_k and causal/window tiles need the mask. With kEarlyP, P is computed while dP^T is still on
        // the tensor cores.
        u32 ap[kBM / 16][4], ads[kBM / 16][4];
        {
            const int i_last = min(m0 + kBM, CF_TILE_SEQLEN_Q) - 1;
            const bool need_mask = tv.tile_needs_mask<CF_IS_LOCAL>(m0, i_last, n_start, kBN);
#if CF_BLOCK_SPARSE
            const int pidx = qw.partial(it);
            const bool partial = pidx >= 0;  // full blocks take no element mask
#else
            constexpr bool partial = true;
#endif
            const float slope = CF_ALIBI ? a.alibi[(i64)bc.b * a.alibi_batch_stride + h] : 0.f;
#if CF_MASK_STAGE
            // Every copy of this tile has landed and every thread of the warpgroup is done with the other
            // buffer (the previous tile's): the next tile's copies may go there. This thread's element (n, e)
            // is query row 8n + 2t + e % 2, key column 16 warp + g + 8 (e / 2), chunk warp_in_wg ^ t.
            cp_async_wait<0>();
            named_barrier_sync(kMaskBarrier0 + cw, 128);
            if (it + 1 < qw.n_iters) stage_mask(it + 1);
            const u32 mask_lane = sm.mask_stage(cw, it & 1) + staged_mask_offset<4, 1>(2 * t, warp_in_wg) + g;
#elif CF_ATTN_MASK && CF_BLOCK_SPARSE
            const unsigned char* mask_head = partial_mask_head(a, max(pidx, 0), m0, n_start);
#elif CF_ATTN_MASK
            const unsigned char* mask_head = attn_mask_head(a, bc.b, h);
#endif
            auto load2 = [&](u32 addr) {
                float2 r;
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(r.x), "=f"(r.y) : "r"(addr));
                return r;
            };
            auto pack_pair = [](u32 (&frag)[kBM / 16][4], int n, const float (&x)[4]) {
                frag[n / 2][2 * (n % 2)] = pack2(x[0], x[1]);
                frag[n / 2][2 * (n % 2) + 1] = pack2(x[2], x[3]);
            };
            // kPrefetchScores: the tile's LSE row terms in registers in one batch; loaded beside their first
            // use, each load's latency stood in front of an exponential (ncu, hd128 16k: 4% of the consumers'
            // samples). BM 128 has no 32 registers to spare for them (28 bytes of spills).
            float2 lse_rows[kPrefetchScores ? kNT8 : 1];
#pragma unroll
            for (int n = 0; n < kNT8 && kPrefetchScores; ++n) lse_rows[n] = load2(sm.lse(s) + (n * 8 + 2 * t) * 4);
            wgmma::wait<kEarlyP ? 1 : 0>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kBM / 2]>(sc));
            if (!kEarlyP) wgmma::fence_operand(reinterpret_cast<float(&)[kBM / 2]>(dp));
            if (exact_tile) {  // s <- s * softmax_scale - lse: the loop below then runs with c2 = log2 e, row 0
#pragma unroll
                for (int n = 0; n < kNT8; ++n) {
                    const float2 lse2 = load2(sm.lse_exact(s) + (n * 8 + 2 * t) * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[n][e] = fmaf(sc[n][e], score_scale, -((e & 1) ? lse2.y : lse2.x));
                }
            }
            // kLeanElements: the element loop is compiled twice, with and without the visibility test. In one
            // loop the test's predicated instructions issued for every element of every tile (ncu, hd128 16k:
            // 10 of the 14 instructions an element), though only tiles at a mask's edge need it.
            auto elements = [&](const bool masked) {
#pragma unroll
                for (int n = 0; n < kNT8; ++n) {
                    const int qc = n * 8 + 2 * t;
                    const float2 lse2 = kPrefetchScores ? lse_rows[kPrefetchScores ? n : 0]
                                                        : load2(sm.lse(s) + qc * 4);
                    const float2 del2 = kEarlyP ? make_float2(0.f, 0.f) : load2(sm.delta(s) + qc * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = m0 + qc + (e & 1);
                        const int j = key_row0 + g + (e >> 1) * 8;
                        const bool visible = !masked || tv.visible(i, j);
                        const float row = (e & 1) ? lse2.y : lse2.x;  // the LSE's row term (warp 1)
#if CF_MASK_STAGE
                        u32 byte;
                        asm volatile("ld.shared.u8 %0, [%1];\n"
                                     : "=r"(byte) : "r"(mask_lane + (n * 8 + (e & 1)) * 64 + (e >> 1) * 8));
                        const float add = !partial || byte != 0 ? 0.f : -CF_INF;
#elif CF_ATTN_MASK
                        const float add =
                            partial ? attn_mask_add(mask_head, a, i, j, CF_TILE_SEQLEN_Q, a.seqlen_k) : 0.f;
#else
                        const float add = 0.f;
#endif
                        if (!kEarlyP) {
#if CF_DROPOUT
                            dp[n][e] = kept(n, e) ? dp[n][e] * a.dropout_scale : 0.f;
#endif
                            sc[n][e] = bwd_score_element<CF_SOFTCAP, CF_ALIBI, !kChooseExponent, CF_ATTN_MASK == 2,
                                                         CF_ATTN_MASK != 0>(
                                sc[n][e], dp[n][e], row, (e & 1) ? del2.y : del2.x, visible, ex, pre, a.softcap, slope,
                                i + tv.off - j, add);
#if CF_DROPOUT
                            sc[n][e] = kept(n, e) ? sc[n][e] * a.dropout_scale : 0.f;
#endif
                        } else {
                            float unused;
                            sc[n][e] = bwd_probability<CF_SOFTCAP, CF_ALIBI, !kChooseExponent, CF_ATTN_MASK == 2,
                                                       CF_ATTN_MASK != 0>(
                                sc[n][e], row, visible, ex, pre, a.softcap, slope, i + tv.off - j, unused, add);
                        }
                    }
#if CF_DROPOUT
                    if (kEarlyP) {  // dV takes P Z / (1 - p); dS below needs P itself
                        float dropped[4];
#pragma unroll
                        for (int e = 0; e < 4; ++e) dropped[e] = kept(n, e) ? sc[n][e] * a.dropout_scale : 0.f;
                        pack_pair(ap, n, dropped);
                    } else {
                        pack_pair(ap, n, sc[n]);
                    }
#else
                    pack_pair(ap, n, sc[n]);
#endif
                    if (!kEarlyP) pack_pair(ads, n, dp[n]);
                }
            };
            if (kLeanElements && !need_mask) elements(false);
            else elements(need_mask);
            if (kEarlyP) {
                wgmma::wait<0>();
                wgmma::fence_operand(reinterpret_cast<float(&)[kBM / 2]>(dp));
#pragma unroll
                for (int n = 0; n < kNT8; ++n) {
                    const float2 del2 = load2(sm.delta(s) + (n * 8 + 2 * t) * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
#if CF_DROPOUT
                        dp[n][e] = kept(n, e) ? dp[n][e] * a.dropout_scale : 0.f;
#endif
                        dp[n][e] = sc[n][e] * (dp[n][e] - ((e & 1) ? del2.y : del2.x));
                    }
                    pack_pair(ads, n, dp[n]);
                }
            }
        }
        // This tile's dS^T to shared memory, in the swizzled layout TMA would write (rows = keys, columns =
        // queries). Deferred: once both warpgroups' dQ products of tile it - 2 (the buffer's last readers) have
        // retired; lockstep: the named barrier of iteration it - 1 ordered that already.
        auto store_ds = [&]() {
            const u32 ds_buf = sm.ds(it & 1);
            if (kDeferDq) mbar_wait(sm.ds_empty(it & 1), ((it >> 1) & 1) ^ 1);
#pragma unroll
            for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int col = kk * 16 + half * 8;  // query column of this n8 group
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int r = cw * 64 + warp_in_wg * 16 + g + 8 * hh;
                    const u32 addr = ds_buf + (col / 64) * kDSBlock + r * 128 + ((((col % 64) / 8) ^ (r & 7)) << 4) + t * 4;
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(addr), "r"(ads[kk][2 * half + hh]) : "memory");
                }
            }
            fence_proxy_async_smem();
            if (kDeferDq) {
                __syncwarp();
                if (lane == 0) mbar_arrive(sm.ds_full(it & 1));
            } else {
                named_barrier_sync(kDsBarrier, 256);
            }
        };
        // dV += P^T.dO and dK += dS^T.Q: B is the query tile read MN-major (rows are queries, the k16 step
        // moves 16 rows = 2048 bytes; LBO steps between 64-column blocks of the head dim).
        const u64 dout_desc = wgmma::desc_sw128(sm.dout(s), kQBlock, 1024);
        const u64 q_desc = wgmma::desc_sw128(sm.q(s), kQBlock, 1024);
        auto issue_dk = [&]() {
#pragma unroll
            for (int kk = 0; kk < kBM / 16; ++kk)
                WgmmaShape<kD>::rs_tb(reinterpret_cast<float(&)[kD / 2]>(acc_dk), ads[kk],
                                      wgmma::desc_advance(q_desc, kk * 16 * 128), 1);
        };
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk)
            WgmmaShape<kD>::rs_tb(reinterpret_cast<float(&)[kD / 2]>(acc_dv), ap[kk],
                                  wgmma::desc_advance(dout_desc, kk * 16 * 128), 1);
        float acc_dq[kDqN / 8][4];  // declared per tile: its wgmma operands are read-write, so one outside the
                                    // loop would be live across the whole iteration
        if (kDeferDq) {
            // dV, dK, then dQ of the previous tile back to back; dS^T goes to shared memory while dQ runs,
            // and dQ's block once it has retired.
            issue_dk();
            wgmma::commit();
            if (with_prev) {
                issue_dq(acc_dq, it - 1);
                wgmma::wait<1>();
            } else {
                wgmma::wait<0>();
            }
            mbar_arrive(sm.empty(s));  // dV, dK retired: the stage's Q and dO are no longer read
            store_ds();
            if (with_prev) {
                wgmma::wait<0>();
                store_dq(acc_dq, it - 1);
            }
        } else {
            // dS^T goes to shared memory while dV runs; after the barrier, dQ of this tile, then dK, whose
            // product runs while dQ's block is stored.
            wgmma::commit();
            store_ds();
            issue_dq(acc_dq, it);
            issue_dk();
            wgmma::commit();
            wgmma::wait<1>();  // dV and dQ retired; dK still reads the stage's Q
            if (next) {
                // Issued once dV has retired, whose A operand (P^T, 16 registers) is then free.
                wgmma::discard_operand(reinterpret_cast<float(&)[kBM / 2]>(sc));  // P^T's values: dS^T is made
                begin_scores(it + 1, sc);
            }
            store_dq(acc_dq, it);
            wgmma::wait<0>();  // with next, S^T of tile it + 1 as well: ptxas serializes every wgmma (C7514)
                               // when one is still in flight at the loop's back edge
            mbar_arrive(sm.empty(s));
        }
    };
    if (qw.n_iters > 0) stage_mask(0);
    if (kPrefetchScores && qw.n_iters > 0) {
        float sc[kNT8][4];
        begin_scores(0, sc);
#pragma unroll 1
        for (int it = 0; it + 1 < qw.n_iters; ++it) tile(it, false, sc, true);
        tile(qw.n_iters - 1, false, sc, false);
    } else if (!kPrefetchScores && !kDeferDq) {
        float dummy[kNT8][4];
#pragma unroll 1
        for (int it = 0; it < qw.n_iters; ++it) tile(it, false, dummy, false);
    } else if (kDeferDq && qw.n_iters > 0) {
        float dummy[kNT8][4];
        tile(0, false, dummy, false);
#pragma unroll 1
        for (int it = 1; it < qw.n_iters; ++it) tile(it, true, dummy, false);
        float acc_dq[kDqN / 8][4];
        issue_dq(acc_dq, qw.n_iters - 1);
        wgmma::wait<0>();
        store_dq(acc_dq, qw.n_iters - 1);
    }
    wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_dk));
    wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_dv));

    // Epilogue: rows are keys key_row0 + g + 8 hh, columns 8 d + 2 t of the head dim.
    const float scale = a.softmax_scale;
    u16* dk = (u16*)a.dk + (i64)bc.b * a.dk_batch_stride + (i64)bc.hk * a.dk_head_stride;
    u16* dv = (u16*)a.dv + (i64)bc.b * a.dv_batch_stride + (i64)bc.hk * a.dv_head_stride;
#if CF_VARLEN
    // Re-read here rather than kept live through the loop: at head dim 64 that cost a 4-byte spill.
    const SeqRows keys(a, bc.b);
    dk += (i64)keys.row_k * a.dk_row_stride;
    dv += (i64)keys.row_k * a.dv_row_stride;
#endif
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = key_row0 + g + 8 * hh;
        if (j >= CF_SEQLEN_K(a, keys)) continue;
#pragma unroll
        for (int d = 0; d < kD / 8; ++d) {
            const int col = d * 8 + 2 * t;
            if (d * 8 < a.head_dim) {
                *(u32*)(dk + (i64)j * a.dk_row_stride + col) = pack2(acc_dk[d][2 * hh] * scale, acc_dk[d][2 * hh + 1] * scale);
                *(u32*)(dv + (i64)j * a.dv_row_stride + col) = pack2(acc_dv[d][2 * hh], acc_dv[d][2 * hh + 1]);
            }
        }
    }
}
#endif

extern "C" __global__ void __launch_bounds__(kThreads, 1)
attention_bwd_sm90(const __grid_constant__ BackwardSm90Params p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The dynamic window is not guaranteed 1024-aligned; the host adds 1024 bytes of slack for this.
    const SmemLayout sm((smem_u32(smem_raw) + 1023) & ~1023u);
    const int tid = threadIdx.x, warp = tid >> 5, warpgroup = warp >> 2;
#if CF_VARLEN
    const BwdCoords bc = BwdCoords::head_major(p.a, kKeyBlocksDescending);
    const SeqRows sr(p.a, bc.b);
    if (bc.n_block * kBN >= sr.seqlen_k) return;  // past this sequence's keys: the whole CTA
    const Visibility vis(sr.seqlen_q, sr.seqlen_k, p.a.window_left, p.a.window_right);
#else
    const Visibility vis(p.a.seqlen_q, p.a.seqlen_k, p.a.window_left, p.a.window_right);
    const BwdCoords bc = CF_BLOCK_SPARSE ? BwdCoords::listed(p.a) : BwdCoords::head_major(p.a, kKeyBlocksDescending);
    const SeqRows sr(p.a, bc.b);
#endif
#if CF_BLOCK_SPARSE
    const QueryWalk qw(p.a, bc);
#else
    const QueryWalk qw(p.a, sr, vis, bc.n_block * kBN);
#endif

    if (tid == 0) {
#if CF_VARLEN
        asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" :: "r"(sm.seq_lengths()), "r"(sr.seqlen_q), "r"(sr.seqlen_k)
                     : "memory");
#endif
        mbar_init(sm.kv_full(), 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(sm.q_full(s), 1 + 32);
            mbar_init(sm.do_full(s), 1);
            mbar_init(sm.empty(s), 256);
        }
        for (int cw = 0; cw < 2; ++cw) {
            mbar_init(sm.dq_full(cw), 4);
            mbar_init(sm.dq_empty(cw), 1);
            mbar_init(sm.ds_full(cw), 8);
            mbar_init(sm.ds_empty(cw), 8);
        }
        if (kWide) mbar_init(sm.pt_free(), 4);
        mbar_fence_init();
    }
    __syncthreads();

    if (warpgroup == 0) {
        setmaxnreg_dec<kProducerRegs>();
        if (tid == 0) produce_tiles(p, sm, qw, bc, sr);
        else if (warp == 1) produce_row_stats(p, sm, qw, bc, sr, tid & 31);
        else if (tid == 64) drain_dq(p, sm, qw, bc, sr, vis);
        return;
    }
    setmaxnreg_inc<kConsumerRegs>();
#if CF_HEAD_DIM > 128
    consume_wide(p, sm, qw, bc, sr, vis, warpgroup_index() - 1, warp & 3, tid & 31);
#else
    consume(p, sm, qw, bc, sr, vis, warpgroup_index() - 1, warp & 3, tid & 31);
#endif
}
