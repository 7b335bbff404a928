// FlashAttention forward for Hopper (sm_90a): TMA loads through an mbarrier pipeline, wgmma for both
// products, a producer warpgroup and two or three consumer warpgroups with setmaxnreg.
//
// Persistent: a CTA loops over work tiles (query block, batch, head) in the L2-grouped, heaviest-first
// order of BlockCoords::grouped, so one tile's epilogue and the next tile's first loads overlap instead of
// waiting for a CTA to exit and another to start. The host picks the schedule: one CTA per tile; one CTA
// per SM in a static boustrophedon order (tiles of equal cost); or, in the causal/window variants, one CTA
// per SM taking tiles from a global counter (tiles of unequal cost: the tiles in flight then stay a
// contiguous window of the order).
// Warpgroup 0 is the producer: one thread issues every TMA load (per tile Q, then K and V of each visible
// key tile into a ring of CF_STAGES stages shared across tiles) and the rest of it idles.
// Warpgroups 1..CF_CONSUMERS each own 64 of a tile's 64 x CF_CONSUMERS query rows and run, per key tile,
//     S = Q.K^T (wgmma, both operands in shared memory) -> score mods, mask, online softmax in registers
//     -> O += P.V (wgmma, P from registers, V read transposed from shared memory),
// releasing each stage to the producer as soon as their products that read it have retired. Key tiles
// are walked last to first (as in the sm80 kernel): the first tile holds the seqlen_k tail and the
// causal/window diagonals, so interior tiles skip the mask.
// The epilogue stages O in shared memory and writes it with TMA stores, which clip rows past seqlen_q and
// columns past head_dim. O gets its own buffer where shared memory allows, so the producer can load the
// next tile's Q under the epilogue; at head dim 256 it goes through the warpgroup's rows of the Q buffer,
// and each CTA does one tile.
//
// Variable-length batches (CF_VARLEN, seq_context.cuh): the tensor maps cover the packed (total, heads, d)
// arrays and a work tile reads its sequence's rows from cu_seqlens / seqused, offsetting its TMA rows by the
// sequence's first row. A tile at a sequence's end then brings in the next sequence's rows (or, past the
// packed rows, TMA's zeros): their keys are masked like any tail, and, since 0 x NaN is NaN, the V rows past
// the sequence's keys are zeroed in shared memory before the tail tile's P.V; Q rows past it give rows of O
// that are never stored: a warpgroup's 64 rows leave by TMA store only when all lie inside the sequence, the
// sequence's last rows through ordinary stores clipped at its length (a TMA store would write them into the
// next sequence). Work tiles past a sequence's rows are skipped by the
// producer and the consumers alike; the tiles go in plain query-block order (no short first tile). A
// persistent launch takes them from the tile counter: with the static order, whose slots are mostly tiles
// past short sequences' ends, and tiles whose cost follows their sequence's length, some CTAs ran two or
// three times the work of others (bench/NOTES.md, "Variable-length batches").
//
// Compile-time configuration (cuflash/dispatch.py): CF_DTYPE, CF_HEAD_DIM (64, 128, 192 or 256; a smaller
// real head_dim is zero-filled by TMA), CF_BLOCK_N, CF_STAGES, CF_CONSUMERS (2 or 3), CF_PINGPONG, CF_IS_LOCAL,
// CF_SOFTCAP, CF_ALIBI, CF_VARLEN (optional, default 0), CF_SPLIT_KV (optional, default 0; with CF_VARLEN).
//
// An element mask (CF_ATTN_MASK, optional, default 0; attn_mask.cuh, dense builds without ALiBi): each score
// tile takes the mask's terms after the visibility mask, read from global memory per score as fwd_sm80.cu
// does, or for a boolean mask whose rows are 16-byte aligned runs of bytes staged in shared memory
// (CF_MASK_STAGE, below); a row the mask leaves without keys gives zeros and LSE +inf.
//
// Block sparsity (CF_BLOCK_SPARSE, with a staged or read boolean mask; block_sparse.cuh): a work tile walks
// the key tiles of its (batch, head, query tile) list instead of a range, last to first, and applies the
// element mask only on tiles of partial blocks (from the list's store). Causal and window visibility come
// folded into the lists and masks (a build without CF_IS_LOCAL: its per-warpgroup skip and its state
// made the local builds spill 4-12 bytes), so the tiles start at multiples of the tile height and both
// warpgroups walk the same list.
//
// Split-KV (CF_SPLIT_KV, decoding): each query tile's visible key tiles are shared by p.num_splits work
// tiles in contiguous runs (split s of tile t is work tile t * num_splits + s, so a tile's splits run side
// by side), each writing its normalized partial output in fp32 straight from the accumulators, and its LSE,
// to o_accum / lse_accum at the compact rows fwd_sm80.cu's split build uses; merge_states.cu combines them.
// An empty split writes 0 and LSE +inf, which the merge skips. Decoding's few CTAs per sequence get the
// TMA pipeline on every SM this way: unsplit, 8 to 64 CTAs read 0.47 to 3.7 TB/s on the H200.
#include "ptx/cp_async.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/vector_memory.cuh"
#include "ptx/prefetch.cuh"
#include "ptx/warpgroup.cuh"
#include "ptx/wgmma.cuh"
#include "attention/params.cuh"
#include "attention/block_coords.cuh"
#include "attention/score_mods.cuh"
#include "attention/online_softmax.cuh"
#include "attention/fragments.cuh"
#include "attention/score_product.cuh"

#include "attention/build_flags.cuh"
#ifndef CF_PAGE_GATHER  // (this kernel's alone: row gathers for pages TMA boxes do not take)
#define CF_PAGE_GATHER 0
#endif
#if CF_DROPOUT
#include "attention/philox.cuh"
#endif
#if CF_VARLEN
#include "attention/seq_context.cuh"
#endif
#if CF_ATTN_MASK
#include "attention/attn_mask.cuh"
#endif
#if CF_BLOCK_SPARSE
#include "attention/block_sparse.cuh"
#endif

// Launch parameters: the four tensor maps first (64-byte aligned, as TMA requires), then the shared
// block. cuflash/ops.py packs the same bytes.
struct ForwardSm90Params {
    TmaMap q, k, v, o;
    AttentionParams a;
};
extern "C" __device__ const int cf_fwd_sm90_params_bytes = sizeof(ForwardSm90Params);

namespace {
constexpr int kD = CF_HEAD_DIM;
constexpr int kBN = CF_BLOCK_N;
constexpr int kStages = CF_STAGES;
constexpr int kConsumers = CF_CONSUMERS;
constexpr int kBM = 64 * kConsumers;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kNT8 = kBN / 8;
constexpr int kDT8 = kD / 8;
constexpr int kCol64 = kD / 64;         // 128-byte swizzled column blocks per row
constexpr u32 kQBlock = kBM * 128;      // bytes of one column block of the Q tile
constexpr u32 kKVBlock = kBN * 128;
constexpr u32 kQBytes = kQBlock * kCol64;
constexpr u32 kKVBytes = kKVBlock * kCol64;
static_assert(kD % 64 == 0 && kBN % 16 == 0 && kBN <= 256, "tile shape");
// Register split of the 64K-register file: 128 x 32 + 256 x 232 = 63488 with two consumer warpgroups,
// 128 x 32 + 384 x 160 = 65536 with three (then S, P and O must fit 160: head dim 64 only). With two, the
// consumers peak near 200 registers (head dim 256), while 24 for the producer made ptxas spill its
// work-tile arithmetic in some causal/window variants. Row gathers (CF_PAGE_GATHER) hold a cache row per
// copied row besides (8 at 128-row tiles): ptxas spilled 4-12 bytes at 48 and 56 and none at 64, so
// 128 x 64 + 256 x 216 = 63488 (no consumer spills at 216); three consumers would keep 138 (the host
// builds two at hd64).
constexpr int kProducerRegs = CF_PAGE_GATHER ? 64 : 32;
constexpr int kConsumerRegs = kConsumers == 2 ? (CF_PAGE_GATHER ? 216 : 232) : 160;
static_assert(kConsumers == 2 || (kConsumers == 3 && kD == 64), "three consumer warpgroups only at head dim 64");
static_assert(!CF_PAGE_GATHER || kConsumers == 2, "row gathers: two consumer warpgroups");
static_assert(!CF_PAGE_GATHER || kStages >= 2, "row gathers: a V tile reads the rows its K tile left in its stage");
// Named barriers: 1..kConsumers for each warpgroup's epilogue, then one "your turn" barrier per consumer.
constexpr int kTurnBarrier0 = 1 + kConsumers;
// Row gathers: the producer warpgroup's barrier, at which its threads take the leader's work tile index.
constexpr int kGatherBarrier = kTurnBarrier0 + kConsumers;
static_assert(kGatherBarrier < 16, "named barriers");
// The last 8 bytes hold the current work tile index, with row gathers preceded by the producer warpgroup's
// two alternating slots for the next one (two: the leader writes one while lagging threads read the other).
constexpr int kBarrierBytes = 8 * (3 + 4 * kStages + (CF_PAGE_GATHER ? 1 : 0));
// Threads that gather K / V rows (CF_PAGE_GATHER): the whole producer warpgroup. One warp, each row's
// address a dependent chain behind its table read, read 0.72 TB/s at page 16 against 3.7 contiguous (b=8 x
// 32k, hd128, H200); four warps 2.1.
constexpr int kGatherThreads = 128;
// Row gathers: each K stage's cache rows, kept for the V tile that follows it into the same stage, one int
// per row and gathering thread (8 threads copy a row: each keeps its own, so none waits for another).
constexpr int kGatherRowStep = kGatherThreads / 8;  // rows between a thread's rows
constexpr int kGatherStageRowBytes = kBN * 8 * 4;
constexpr int kGatherRowBytes = CF_PAGE_GATHER ? kStages * kGatherStageRowBytes : 0;
constexpr int kSmemLimit = 232448;  // sm_90 opt-in maximum per CTA
// Staged boolean masks (CF_MASK_STAGE): each consumer warpgroup copies its 64 rows x kBN keys of the mask
// (a byte each) into one of two buffers with 16-byte cp.async, one key tile ahead, and reads its fragments
// from there. Read straight from global memory, a warp's byte loads touch 8 rows (8 cache lines) per
// instruction: ~4,000 L1 wavefronts per 128-key tile against ~2,000 cycles of products, 3.6x below the
// unmasked kernel at head dim 128 (bench/NOTES.md). Rows are XOR-swizzled by 16-byte chunk (chunk c of row r
// at c ^ (r % chunks)), so that the 8 rows a warp reads at once fall in 8 different bank groups.
constexpr int kMaskChunks = kBN / 16;        // 16-byte chunks of a mask row
constexpr u32 kMaskBufBytes = 64 * kBN;      // one warpgroup's rows of one key tile
constexpr u32 kMaskStageBytes = CF_MASK_STAGE ? kConsumers * 2 * kMaskBufBytes : 0;
static_assert(!CF_MASK_STAGE || CF_ATTN_MASK == 1, "staged masks: boolean ones");
constexpr bool kSeparateO = 2 * kQBytes + 2 * kStages * kKVBytes + kMaskStageBytes + kBarrierBytes + kGatherRowBytes
                            + 1024 <= kSmemLimit;
constexpr u32 kTileBytes = (kSeparateO ? 2 : 1) * kQBytes + 2 * kStages * kKVBytes;
// Without a separate O buffer the next Q would wait for the store, and the loop's extra live state spills at
// head dim 256: such variants process exactly one tile per CTA (cuflash/dispatch.py launches them so).
constexpr bool kPersistent = kSeparateO;
// Split-KV writes its partial outputs from registers; it is built only where O has its own buffer (the
// persistent variants), so the Q buffer's release stays the one the loop already makes.
static_assert(!CF_SPLIT_KV || (CF_VARLEN && kSeparateO), "split-KV: variable-length builds with a separate O");
static_assert(!CF_PAGED || CF_VARLEN, "paged K / V: variable-length builds");
static_assert(!CF_DROPOUT || (!CF_VARLEN && !CF_SPLIT_KV && !CF_PAGED), "dropout: the dense build only");
static_assert(!CF_ATTN_MASK || (!CF_VARLEN && !CF_DROPOUT && !CF_ALIBI), "attn_mask: the dense build, no ALiBi");
static_assert(!CF_PAGE_GATHER || CF_PAGED, "row gathers: a paged build");
static_assert(!CF_BLOCK_SPARSE || (CF_ATTN_MASK == 1 && !CF_IS_LOCAL && kConsumers == 2 && !CF_PINGPONG),
              "block sparsity: a boolean-mask build (causal / window folded into the masks), 128-row tiles");
// Arrivals that complete a K / V stage's full barrier: TMA's one expect_tx arrival, or with row gathers
// every gathering thread's, each once its own cp.async copies have landed.
constexpr int kKVFullArrivals = CF_PAGE_GATHER ? kGatherThreads : 1;

// A K / V stage's full barrier has completed: with row gathers its rows came through cp.async, generic-proxy
// writes, which the waiting thread fences before its wgmma reads them through the async proxy.
__device__ __forceinline__ void gathered_stage_ready() {
    if (CF_PAGE_GATHER) fence_proxy_async_smem();
}

// A gathering thread about to exit waits for its last copies (and so for their pending barrier arrivals):
// the PTX ISA does not say what becomes of them once the thread has exited.
__device__ __forceinline__ void gather_drain() {
    if (CF_PAGE_GATHER) asm volatile("cp.async.wait_all;\n" ::: "memory");
}
}  // namespace

// Offsets in the dynamic shared memory (1024-byte aligned base): Q, K stages, V stages, O, then barriers.
struct SmemLayout {
    u32 q, k, v, o, bars, tile, gather_tile, gather_rows;
    __device__ __forceinline__ explicit SmemLayout(u32 base)
        : q(base), k(base + kQBytes), v(base + kQBytes + kStages * kKVBytes),
          o(kSeparateO ? base + kQBytes + 2 * kStages * kKVBytes : base), bars(base + kTileBytes + kMaskStageBytes),
          tile(bars + kBarrierBytes - 8), gather_tile(bars + kBarrierBytes - 16),
          gather_rows(bars + kBarrierBytes) {}
    __device__ __forceinline__ u32 k_stage(int s) const { return k + s * kKVBytes; }
    __device__ __forceinline__ u32 v_stage(int s) const { return v + s * kKVBytes; }
    __device__ __forceinline__ u32 q_full() const { return bars; }
    __device__ __forceinline__ u32 q_empty() const { return bars + 8; }
    __device__ __forceinline__ u32 k_full(int s) const { return bars + 8 * (2 + s); }
    __device__ __forceinline__ u32 v_full(int s) const { return bars + 8 * (2 + kStages + s); }
    __device__ __forceinline__ u32 k_empty(int s) const { return bars + 8 * (2 + 2 * kStages + s); }
    __device__ __forceinline__ u32 v_empty(int s) const { return bars + 8 * (2 + 3 * kStages + s); }
    // Consumer warpgroup cw's mask buffer `buf` (0 or 1), between the tiles and the barriers.
    __device__ __forceinline__ u32 mask_stage(int cw, int buf) const {
        return bars - kMaskStageBytes + (2 * cw + buf) * kMaskBufBytes;
    }
};
extern "C" __device__ const int cf_fwd_sm90_smem_bytes = kTileBytes + kMaskStageBytes + kBarrierBytes + kGatherRowBytes
                                                         + 1024;
extern "C" __device__ const int cf_fwd_sm90_persistent = kPersistent;

// One work tile: its query rows [m_start, m_end) and the key tiles [n_lo, n_hi) they can see.
// With causal/window masking, when seqlen_q is not a multiple of the tile height, the short tile is the
// first one (rows [0, head), head = the remainder rounded up to whole warpgroups, so every TMA coordinate
// stays >= 0), where its rows see the fewest keys; its warpgroups past `head` are idle. At the end instead,
// one or two warpgroups would walk every key tile with no others to overlap (seqlen 1000, hd64: one
// warpgroup, 8 key tiles). The last tile may then run up to 63 rows past seqlen_q, clipped as usual.
struct WorkTile {
    BlockCoords bc;
    int m_start, m_end, n_lo, n_hi;
#if CF_VARLEN
    // This sequence's visibility (its own lengths) and first rows in the packed q / k.
    Visibility vis;
    int row_q, row_k;
    int split;  // split-KV: which run of the tile's key tiles (0 otherwise)
    __device__ __forceinline__ WorkTile(const AttentionParams& a, const Visibility&, int t)
        : bc(BlockCoords::grouped(a, CF_SPLIT_KV ? t / a.num_splits : t)),
          vis(0, 0, a.window_left, a.window_right), split(CF_SPLIT_KV ? t % a.num_splits : 0) {
        const SeqContext seq(a, bc.b);
        vis = Visibility(seq.seqlen_q, seq.seqlen_k, a.window_left, a.window_right);
        row_q = seq_first_row(a.cu_seqlens_q, a.total_q, bc.b);
        row_k = seq_first_row(a.cu_seqlens_k, a.total_k, bc.b);
        m_start = bc.m_block * kBM;
        m_end = min(m_start + kBM, seq.seqlen_q);
        vis.key_tiles(m_start, m_end - 1, kBN, &n_lo, &n_hi);
#if CF_SPLIT_KV
        const int per_split = (n_hi - n_lo + a.num_splits - 1) / a.num_splits;
        n_lo = min(n_hi, n_lo + split * per_split);
        n_hi = min(n_hi, n_lo + per_split);
#endif
    }
    // Past this sequence's rows: skipped by the producer and the consumers alike.
    __device__ __forceinline__ bool empty() const { return m_start >= m_end; }
#else
    __device__ __forceinline__ WorkTile(const AttentionParams& a, const Visibility& vis, int t)
        : bc(CF_BLOCK_SPARSE ? BlockCoords::listed(a, t) : BlockCoords::grouped(a, t)) {
        if (CF_IS_LOCAL) {
            const int head = (a.seqlen_q - (a.num_m_blocks - 1) * kBM + 63) & ~63;
            m_start = bc.m_block == 0 ? 0 : head + (bc.m_block - 1) * kBM;
            m_end = min(bc.m_block == 0 ? head : m_start + kBM, a.seqlen_q);
        } else {
            m_start = bc.m_block * kBM;
            m_end = min(m_start + kBM, a.seqlen_q);
        }
#if CF_BLOCK_SPARSE
        (void)vis;
        n_lo = 0;  // positions in the tile's list
        n_hi = block_count(a, block_row(a, bc.b, bc.h, bc.m_block));
#else
        vis.key_tiles(m_start, m_end - 1, kBN, &n_lo, &n_hi);
#endif
    }
#endif
    __device__ __forceinline__ int n_tiles() const { return n_hi - n_lo; }
    // The key tile at position pos of [n_lo, n_hi): itself, or with block sparsity the list's entry (its
    // partial-block mask in .y).
#if CF_BLOCK_SPARSE
    __device__ __forceinline__ int2 entry(const AttentionParams& a, int pos) const {
        return block_entry(a, block_row(a, bc.b, bc.h, bc.m_block), pos);
    }
    __device__ __forceinline__ int key_tile(const AttentionParams& a, int pos) const { return entry(a, pos).x; }
#else
    __device__ __forceinline__ int key_tile(const AttentionParams&, int pos) const { return pos; }
#endif
};

// TMA coordinates of a work tile's rows: dense, (row, head, batch) of the 4-D maps; variable-length, the
// packed maps' rows offset by the sequence's first row, batch 0.
#if CF_VARLEN
#define CF_TILE_VIS w.vis
#define CF_Q_ROW0(w) (w).row_q
#define CF_K_ROW0(w) (w).row_k
#define CF_TMA_BATCH(w) 0
#else
#define CF_TILE_VIS vis
#define CF_Q_ROW0(w) 0
#define CF_K_ROW0(w) 0
#define CF_TMA_BATCH(w) (w).bc.b
#endif

// Whether the CTAs take work tiles from the global counter the host passes (causal/window tiles of unequal
// cost). Then only the producer knows the next tile; it reaches the consumers through shared memory,
// published by the q_full arrival (release) that their wait (acquire) observes. Otherwise every warpgroup
// computes the static order itself, and a tile is set up before its Q has landed. Only the causal/window
// and variable-length variants carry the counter paths: compiled into the dense unmasked variants they
// measured 7% slower at head dim 128, 16k, where the counter is never used (bench/NOTES.md, h8).
__device__ __forceinline__ bool dynamic_tiles(const AttentionParams& a) {
    return (CF_VARLEN || CF_IS_LOCAL) && kPersistent && a.tile_counter != nullptr;
}

// The work tile of this CTA in round r of a static launch. Tiles come heaviest first (causal), so a plain
// stride would hand CTA 0 the heaviest tile of every round; alternating the direction each round
// (boustrophedon) pairs heavy with light and evens out the CTAs' totals. Past the last tile: >= num_tiles.
__device__ __forceinline__ int static_work_tile(int round) {
    return round * gridDim.x + ((round & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
}

// The producer's next work tile. An index >= num_tiles means no more work.
__device__ __forceinline__ int next_work_tile(const AttentionParams& a, int local) {
    return dynamic_tiles(a) ? atomicAdd(a.tile_counter, 1) : static_work_tile(local);
}

// Key tiles are counted across all of a CTA's work tiles (`kv`), so the K/V ring runs on without a drain
// between tiles: key tile number kv sits in stage kv % kStages, on that stage's (kv / kStages)-th use.
__device__ __forceinline__ int stage_of(int kv) { return kv % kStages; }
__device__ __forceinline__ u32 parity_of(int kv) { return (kv / kStages) & 1; }

#if CF_PAGED
// Key rows [row0, row0 + kBN) of a sequence in pages (CF_PAGED): one TMA box per page-sized run of rows,
// each at its page's physical rows of the (cache rows, heads_k, d) maps, whose boxes are paged_box_rows(a)
// rows high (the host encodes the same: dispatch.sm90_page_box_rows, at least 32 rows, so a tile has at most
// kBN / 32 runs). A run's rows land where one kBN-row box would have put them: a run starts at a multiple
// of 8 rows (1024 bytes), the 128-byte swizzle's period, so the consumers read the stage as usual. Runs past
// the sequence load page 0 (their keys are masked and the V rows zeroed, as for any tail); a page index
// outside [0, num_pages) is clamped.
// One thread reads the table. A tile's page indices are consecutive entries of the sequence's table row, at
// most kBN / 32 = 4 of them (16 bytes, within one 128-byte line): prefetch_page_runs() brings that line
// into L1 before the producer waits for the stage to free up, and load_page_runs() reads the entries from
// L1 after it. (Holding the entries in registers across the wait, even one with the row's pointer, made
// ptxas spill the 32-register producer.)
__device__ __forceinline__ int paged_box_rows(const AttentionParams& a) { return min(a.page_size, kBN); }

__device__ __forceinline__ const int* page_row(const AttentionParams& a, const BlockCoords& bc) {
    return a.block_table + (i64)bc.b * a.block_table_batch_stride;
}

__device__ __forceinline__ void prefetch_page_runs(const AttentionParams& a, const BlockCoords& bc, int row0,
                                                   int seqlen_k) {
    if (row0 < seqlen_k) prefetch_global_l1(page_row(a, bc) + (row0 >> a.page_shift));
}

__device__ __forceinline__ void load_page_runs(const AttentionParams& a, const TmaMap* map, u32 stage_base, u32 full,
                                               const BlockCoords& bc, int row0, int seqlen_k) {
    const int box = paged_box_rows(a);
    const int* pages = page_row(a, bc);
    for (int r = 0; r < kBN; r += box) {  // (unrolled, the loop made ptxas spill the producer)
        const int row = row0 + r;
        int phys = 0;
        if (row < seqlen_k) {
            const int page = min(max(pages[row >> a.page_shift], 0), a.num_pages - 1);
            phys = (page << a.page_shift) + (row & (a.page_size - 1));
        }
        for (int c = 0; c < kCol64; ++c)
            tma_load_4d(stage_base + c * kKVBlock + r * 128, map, full, c * 64, phys, bc.hk, 0);
    }
}

#if CF_PAGE_GATHER
// Pages of any size (CF_PAGE_GATHER): the producer warpgroup gathers key rows [row0, row0 + kBN) with
// cp.async, 16 bytes a thread, into the layout TMA's 128-byte swizzle gives a stage (chunk c of row r at
// chunk c ^ (r % 8) of the row's 128 bytes in each 64-column block), so the consumers read it as usual.
// Thread i copies chunk i % 8 of rows i / 8 + 16j; rows past the sequence and columns past head_dim are
// zero-filled without a read. Each thread then arrives on `full` when its copies have landed
// (kKVFullArrivals), and the consumers fence the generic-proxy writes before wgmma reads them
// (gathered_stage_ready). Small pages as TMA boxes cost a box per page: 16-row boxes read 0.60x the
// contiguous rate (bench/NOTES.md).
__device__ __forceinline__ void gather_paged_kv(const AttentionParams& a, const void* base, i64 head_stride,
                                                i64 row_stride, u32 stage_base, u32 full, const BlockCoords& bc,
                                                int row0, int seqlen_k, int thread, u32 rows, bool same_rows) {
    constexpr int kRowStep = kGatherRowStep;
    static_assert(kBN % kRowStep == 0, "every gathering thread copies as many rows");
    const u16* src_head = (const u16*)base + (i64)bc.hk * head_stride + (thread & 7) * 8;
    const int* pages = page_row(a, bc);
    const int chunk = thread & 7;
    // All of the thread's table reads go out before its copies (one after another, each behind its own
    // load: 2.1 TB/s at page 16; together: 2.9), and a V tile takes the rows its K tile left in `rows`
    // (each thread its own: no barrier; 3.2 TB/s against 3.7 contiguous, b=8 x 32k, hd128). Rows past the
    // sequence read its last row's entry and copy nothing.
    constexpr int kRows = kBN / kRowStep;
    int cache_row[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
        const u32 slot = rows + 4 * (i * kGatherThreads + thread);
        if (same_rows) {
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(cache_row[i]) : "r"(slot));
        } else {
            const int row = min(row0 + (thread >> 3) + i * kRowStep, seqlen_k - 1);
            const int index = a.page_shift >= 0 ? row >> a.page_shift : row / a.page_size;
            cache_row[i] = min(max(pages[index], 0), a.num_pages - 1) * a.page_size + row - index * a.page_size;
            asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(slot), "r"(cache_row[i]) : "memory");
        }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
        const int r = (thread >> 3) + i * kRowStep;
        const bool row_ok = row0 + r < seqlen_k;
        const u16* src = src_head + (i64)cache_row[i] * row_stride;
        const u32 dst = stage_base + r * 128 + ((chunk ^ (r & 7)) << 4);
        for (int c = 0; c < kCol64; ++c) {
            const bool valid = row_ok && c * 64 + chunk * 8 < a.head_dim;
            cp_async_16(dst + c * kKVBlock, valid ? src + c * 64 : src_head, valid);
        }
    }
    cp_async_mbar_arrive_noinc(full);
}
#endif
#endif

// The producer: one thread, or with row gathers (CF_PAGE_GATHER) the warpgroup, whose thread 0 (the leader)
// alone takes work tiles, arms barriers and issues TMA, while every thread gathers K and V rows.
__device__ __forceinline__ void produce(const ForwardSm90Params& p, const SmemLayout& sm, int num_tiles) {
    const int thread = threadIdx.x;  // (the producer warpgroup is the first)
    const bool leader = !CF_PAGE_GATHER || thread == 0;
    const Visibility vis(p.a.seqlen_q, p.a.seqlen_k, p.a.window_left, p.a.window_right);
    if (leader) {
        tma_prefetch_map(&p.q);
        tma_prefetch_map(&p.k);
        tma_prefetch_map(&p.v);
    }
    int kv = 0;
    // With dynamic tiles a final index >= num_tiles, published without a Q, ends the consumers.
    const bool dynamic = dynamic_tiles(p.a);
#if CF_VARLEN
    int uses = 0;  // the Q buffer's use count: work tiles past their sequence's rows do not use it
#endif
    for (int local = 0;; ++local) {  // local: this CTA's work tiles so far (dense: the Q buffer's use count)
#if CF_PAGE_GATHER
        // The leader's index reaches the warpgroup through slot local % 2; the leader rewrites a slot only
        // after the next barrier, which every thread reaches once done reading it.
        const u32 slot = sm.gather_tile + 4 * (local & 1);
        if (leader)
            asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(slot), "r"(next_work_tile(p.a, local)) : "memory");
        named_barrier_sync(kGatherBarrier, kGatherThreads);
        int t;
        asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(t) : "r"(slot) : "memory");
#else
        const int t = next_work_tile(p.a, local);
#endif
        if (t >= num_tiles) {
            // (the Q barrier is the leader's alone: a thread that polled a parity late could miss a phase)
            if (dynamic && leader) {
                // Every CTA's leader takes tiles until its first index past the end, so the counter is
                // incremented num_tiles + (CTAs) times and the last of those increments returns the largest
                // index: its CTA puts the counter back to zero for the next launch on the stream, which is
                // how the host can keep one counter per stream instead of zeroing a new one per call.
                if (t == num_tiles + (int)(gridDim.x * gridDim.y) - 1) *p.a.tile_counter = 0;
#if CF_VARLEN
                mbar_wait(sm.q_empty(), (uses & 1) ^ 1);
#else
                mbar_wait(sm.q_empty(), (local & 1) ^ 1);
#endif
                asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(sm.tile), "r"(t) : "memory");
                mbar_arrive(sm.q_full());
            }
            gather_drain();
            return;
        }
        const WorkTile w(p.a, vis, t);
#if CF_VARLEN
        if (w.empty()) continue;
        const int use = uses++;
#else
        const int use = local;
#endif
        const int n = w.n_tiles();
        auto load = [&](const TmaMap* map, u32 stage_base, u32 full, u32 empty, int j) {
#if CF_PAGE_GATHER
            const bool is_k = map == &p.k;
            mbar_wait(empty, parity_of(kv + j) ^ 1);
            gather_paged_kv(p.a, is_k ? p.a.k : p.a.v, is_k ? p.a.k_head_stride : p.a.v_head_stride,
                            is_k ? p.a.k_row_stride : p.a.v_row_stride, stage_base, full, w.bc,
                            (w.n_hi - 1 - j) * kBN, w.vis.seqlen_k, thread,
                            sm.gather_rows + stage_of(kv + j) * kGatherStageRowBytes, !is_k);
#else
#if CF_PAGED
            prefetch_page_runs(p.a, w.bc, (w.n_hi - 1 - j) * kBN, w.vis.seqlen_k);
#endif
            mbar_wait(empty, parity_of(kv + j) ^ 1);
            mbar_arrive_expect_tx(full, kKVBytes);
#if CF_PAGED
            load_page_runs(p.a, map, stage_base, full, w.bc, (w.n_hi - 1 - j) * kBN, w.vis.seqlen_k);
#else
            for (int c = 0; c < kCol64; ++c)
                tma_load_4d(stage_base + c * kKVBlock, map, full, c * 64,
                            CF_K_ROW0(w) + w.key_tile(p.a, w.n_hi - 1 - j) * kBN,
                            w.bc.hk, CF_TMA_BATCH(w));
#endif
#endif
        };
        auto load_k = [&](int j) {
            const int s = stage_of(kv + j);
            load(&p.k, sm.k_stage(s), sm.k_full(s), sm.k_empty(s), j);
        };
        auto load_v = [&](int j) {
            const int s = stage_of(kv + j);
            load(&p.v, sm.v_stage(s), sm.v_full(s), sm.v_empty(s), j);
        };
        // The tile's first K goes out before the wait for the Q buffer, which the consumers free only once
        // the previous tile's last product that reads it has retired (or its O has left, at head dim 256).
        if (n > 0) load_k(0);
        if (leader) {
            mbar_wait(sm.q_empty(), (use & 1) ^ 1);
            if (dynamic) asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(sm.tile), "r"(t) : "memory");
            mbar_arrive_expect_tx(sm.q_full(), kQBytes);
            for (int c = 0; c < kCol64; ++c)
                tma_load_4d(sm.q + c * kQBlock, &p.q, sm.q_full(), c * 64, CF_Q_ROW0(w) + w.m_start, w.bc.h,
                            CF_TMA_BATCH(w));
        }
        // Issue order follows the consumers' use: K_j, then V_{j-1} (they multiply P_{j-1}.V_{j-1} after
        // S_j = Q.K_j^T is issued), so a stage's K is never queued behind a V still being read.
        for (int j = 1; j < n; ++j) {
            load_k(j);
            load_v(j - 1);
        }
        if (n > 0) load_v(n - 1);
        kv += n;
        if (!kPersistent) {
            gather_drain();
            return;
        }
    }
}

__device__ __forceinline__ void consume(const ForwardSm90Params& p, const SmemLayout& sm, int num_tiles, int cw,
                                        int lane, int warp_in_wg) {
    const Visibility vis(p.a.seqlen_q, p.a.seqlen_k, p.a.window_left, p.a.window_right);
    // Descriptor bases; the k16 step moves along a row (Q, K: +32 bytes, next column block every 4
    // steps) or down the keys (V: 16 rows = 2048 bytes), see wgmma.cuh.
    const u32 q_rows = sm.q + cw * 64 * 128;
    const u32 o_rows = sm.o + cw * 64 * 128;
    const bool elected = lane == 0 && warp_in_wg == 0;
    int kv = 0;
    const bool dynamic = dynamic_tiles(p.a);
    // Ping-pong: the first turn of all is opened here; from then on exactly one hand-over to the first
    // warpgroup is pending at every work tile's start (a tile without key tiles takes none and leaves it).
    if (CF_PINGPONG && cw == kConsumers - 1) named_barrier_arrive(kTurnBarrier0, 256);
#if CF_VARLEN
    int uses = 0;  // as in produce
#endif
    for (int local = 0;; ++local) {
        int t = static_work_tile(local);
        if (dynamic) {
            mbar_wait(sm.q_full(), local & 1);
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(t) : "r"(sm.tile) : "memory");
        }
        if (t >= num_tiles) break;
        const WorkTile w(p.a, vis, t);
#if CF_VARLEN
        if (w.empty()) continue;
        const int use = uses++;
#else
        const int use = local;
#endif
        const int wg_row0 = w.m_start + cw * 64;
        const int wg_row_last = min(wg_row0 + 64, w.m_end) - 1;
        // This warpgroup walks the work tile's key tiles from the highest its own rows can see, wg_hi - 1,
        // down to n_lo: with causal masking the lower warpgroups of a tile see fewer keys, and warpgroups
        // whose rows all lie past the tile's own (m_end) see none (causal, seqlen 1k, 192-row tiles: 33%
        // more key tiles than the rows can see). Tiles left of a window's edge for this warpgroup but not
        // for the whole tile are still computed (masked): skipping those too would keep one more value
        // live through the loop, which the 160- and 168-register budgets do not have. The stages of
        // skipped key tiles are released at once, after their loads land (see pass_key_tile).
        int wg_lo, wg_hi;
#if CF_BLOCK_SPARSE
        wg_hi = wg_row0 >= w.m_end ? w.n_lo : w.n_hi;  // the tile's list (the lists are per query tile)
#else
        CF_TILE_VIS.key_tiles(wg_row0, wg_row_last, kBN, &wg_lo, &wg_hi);
        if (wg_row0 >= w.m_end || wg_lo >= wg_hi) wg_hi = w.n_lo;
#endif
#if CF_SPLIT_KV
        wg_hi = max(w.n_lo, min(wg_hi, w.n_hi));  // this split's run only
#endif
        const int n_tiles = wg_hi - w.n_lo;
        const int skip_front = w.n_hi - wg_hi;
        const int kv0 = kv + skip_front;  // ring position of this warpgroup's first key tile
        const int warp_row0 = wg_row0 + warp_in_wg * 16;
        const float slope = CF_ALIBI ? p.a.alibi[(i64)w.bc.b * p.a.alibi_batch_stride + w.bc.h] : 0.f;

        float acc_o[1][kDT8][4];
        zero_fill(acc_o);
        OnlineSoftmax<1, kNT8> softmax;

        auto issue_qk = [&](float (&sc)[1][kNT8][4], int s) {
            const u64 q_desc = wgmma::desc_sw128(q_rows, 16, 1024);
            const u64 k_desc = wgmma::desc_sw128(sm.k_stage(s), 16, 1024);
            kmajor_score_product<kBN, kD>(reinterpret_cast<float(&)[kBN / 2]>(sc), q_desc, kQBlock, k_desc, kKVBlock);
            wgmma::commit();
        };
        auto issue_pv = [&](const u32 (&pa)[kBN / 16][4], int s) {
            const u64 v_desc = wgmma::desc_sw128(sm.v_stage(s), kKVBlock, 1024);
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk)
                WgmmaShape<kD>::rs_tb(reinterpret_cast<float(&)[kD / 2]>(acc_o), pa[kk],
                                      wgmma::desc_advance(v_desc, kk * 16 * 128), 1);
            wgmma::commit();
        };
        // Staged masks: this warpgroup's rows of its it-th key tile's mask (position wg_hi - 1 - it) into buffer
        // it % 2 (attn_mask.cuh: stage_mask_tile); with block sparsity only a partial block's, from the store.
        auto stage_mask = [&](int it) {
#if CF_MASK_STAGE && CF_BLOCK_SPARSE
            const int2 e = w.entry(p.a, wg_hi - 1 - it);
            if (e.y >= 0)
                stage_mask_tile<64, kMaskChunks, 0, 128>(sm.mask_stage(cw, it & 1),
                                                         partial_mask_head(p.a, e.y, wg_row0, e.x * kBN), p.a,
                                                         wg_row0, e.x * kBN, warp_in_wg * 32 + lane);
#elif CF_MASK_STAGE
            stage_mask_tile<64, kMaskChunks, 0, 128>(sm.mask_stage(cw, it & 1), attn_mask_head(p.a, w.bc.b, w.bc.h),
                                                     p.a, wg_row0, (wg_hi - 1 - it) * kBN, warp_in_wg * 32 + lane);
#else
            (void)it;
#endif
        };
        // Raw products -> unnormalised probabilities; alpha rescales O to the new row maxima. pos: the key
        // tile's position in [n_lo, wg_hi).
        auto softmax_tile = [&](float (&sc)[1][kNT8][4], int pos, float (&alpha)[1][2]) {
#if CF_BLOCK_SPARSE
            const int2 entry = w.entry(p.a, pos);
            const int n_block = entry.x;
            const bool partial = entry.y >= 0;  // full blocks take no element mask
#else
            const int n_block = pos;
            constexpr bool partial = true;
#endif
            const TileCoords<1, kNT8> tc(warp_row0, n_block * kBN, lane);
            apply_score_mods<1, kNT8, CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(sc, tc, p.a.softmax_scale, p.a.softcap,
                                                                             slope, CF_TILE_VIS.off);
            mask_tile<CF_IS_LOCAL>(sc, tc, CF_TILE_VIS, wg_row0, wg_row_last, n_block * kBN, kBN);
#if CF_MASK_STAGE
            {
                // Every thread's copies of this tile have landed and every thread is done reading the other
                // buffer (the previous tile): the next tile's copies may go there.
                const int it = wg_hi - 1 - pos;
                cp_async_wait<0>();
                named_barrier_sync(1 + cw, 128);
                if (it + 1 < n_tiles) stage_mask(it + 1);
                const u32 buf = sm.mask_stage(cw, it & 1);
                if (partial) {  // (a full block: nothing staged)
                    const int tq = lane & 3;
                    const u32 sel = (2 * tq) | ((2 * tq + 1) << 4);  // bytes 2t, 2t+1 of a (lo, hi) word pair
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int r = warp_in_wg * 16 + (lane >> 2) + 8 * hh;
#pragma unroll
                        for (int kk = 0; kk < kMaskChunks; ++kk) {
                            const uint4 x = ld_shared_v4(buf + staged_mask_offset<kMaskChunks, 0>(r, kk));
                            const u32 lo = __byte_perm(x.x, x.y, sel), hi = __byte_perm(x.z, x.w, sel);  // n8 groups 2kk, 2kk+1
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                if (((lo >> (8 * e)) & 0xffu) == 0) sc[0][2 * kk][2 * hh + e] = -CF_INF;
                                if (((hi >> (8 * e)) & 0xffu) == 0) sc[0][2 * kk + 1][2 * hh + e] = -CF_INF;
                            }
                        }
                    }
                }
            }
#elif CF_ATTN_MASK && CF_BLOCK_SPARSE
            if (partial)
                apply_attn_mask(sc, tc, p.a, partial_mask_head(p.a, entry.y, warp_row0, n_block * kBN), p.a.seqlen_q,
                                p.a.seqlen_k);
#elif CF_ATTN_MASK
            apply_attn_mask(sc, tc, p.a, attn_mask_head(p.a, w.bc.b, w.bc.h), p.a.seqlen_q, p.a.seqlen_k);
#endif
            softmax.exponentiate(sc, alpha, p.a.scale_log2);
#if CF_DROPOUT
            // The row sums took every probability (the LSE is the softmax's); the dropped ones leave P.V and
            // the kept ones' 1 / (1 - p) is applied to O at the end (the accumulator layout is mma.sync's, so
            // philox.cuh's fragment helper applies as in fwd_sm80.cu).
            with_dropout_call(p.a.dropout_rng, p.a.dropout_seed, p.a.dropout_offset, [&](const DropoutCall& drop) {
                dropout_fragments(sc, drop.key, drop.offset, (u32)(w.bc.b * p.a.heads_q + w.bc.h), warp_row0,
                                  n_block * kBN, lane, (u32)p.a.dropout_threshold);
            });
#endif
        };
        // The accumulator layout of two neighbouring n8 column groups is the A-fragment layout of one k16
        // step (as with mma.sync), so P goes to the second product straight from registers.
        auto pack_p = [&](u32 (&pa)[kBN / 16][4], const float (&sc)[1][kNT8][4]) {
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk) {
                pa[kk][0] = pack2(sc[0][2 * kk][0], sc[0][2 * kk][1]);
                pa[kk][1] = pack2(sc[0][2 * kk][2], sc[0][2 * kk][3]);
                pa[kk][2] = pack2(sc[0][2 * kk + 1][0], sc[0][2 * kk + 1][1]);
                pa[kk][3] = pack2(sc[0][2 * kk + 1][2], sc[0][2 * kk + 1][3]);
            }
        };
        // With a separate O buffer, Q is free as soon as this warpgroup's last S = Q.K^T has retired.
        auto release_q_after_last_qk = [&]() {
            if (kPersistent) mbar_arrive(sm.q_empty());
        };

        // Ping-pong (CF_PINGPONG, FA3): the consumer warpgroups take turns, round robin, to issue their
        // products, so that one warpgroup's softmax runs while another's products own the tensor cores.
        // Each warpgroup has w.n_tiles() + 1 issue points per work tile; a warpgroup that skips key tiles
        // above its rows (causal diagonal, or no rows at all) still takes one turn for each, issuing
        // nothing, so all of them count the same turns. The turn runs on across work tiles: the last
        // warpgroup's final hand-over opens the next tile for the first, which can then issue its first
        // product while the others are still in their epilogues (see the pending turn below the loop).
        auto take_turn = [&]() {
            if (CF_PINGPONG) named_barrier_sync(kTurnBarrier0 + cw, 256);
        };
        auto pass_turn = [&]() {
            if (CF_PINGPONG) named_barrier_arrive(kTurnBarrier0 + (cw + 1) % kConsumers, 256);
        };

        // A key tile this warpgroup's rows cannot see: its stage is released once its loads have landed
        // (waiting for full first keeps the arrival in the stage's current phase, not the previous one).
        auto pass_key_tile = [&](int ring) {
            const int s = stage_of(ring);
            mbar_wait(sm.k_full(s), parity_of(ring));
            mbar_arrive(sm.k_empty(s));
            mbar_wait(sm.v_full(s), parity_of(ring));
            mbar_arrive(sm.v_empty(s));
        };

        // Variable-length: V rows past the sequence's keys in key tile n_block's stage s are zeroed before
        // P.V reads them (P is 0 there, but the rows may hold another sequence's data or NaN). Every
        // consumer warpgroup zeroes the rows itself (the same zeros) before its own product, so no warpgroup
        // waits for another; the stage is rewritten by TMA only after all of them have released it.
        auto zero_v_tail = [&](int s, int n_block) {
#if CF_VARLEN && !CF_PAGE_GATHER  // (row gathers zero-fill the rows past the sequence themselves)
            const int valid = w.vis.seqlen_k - n_block * kBN;
            if (valid >= kBN) return;
            const int tid = warp_in_wg * 32 + lane;
            for (int c = tid; c < (kBN - valid) * kCol64 * 8; c += 128) {
                const int chunk = c % 8, rc = c / 8;  // 16-byte chunk of a 128-byte row: swizzle-agnostic
                const u32 addr = sm.v_stage(s) + (rc % kCol64) * kKVBlock + (valid + rc / kCol64) * 128 + chunk * 16;
                asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" :: "r"(addr), "r"(0u) : "memory");
            }
            fence_proxy_async_smem();
            named_barrier_sync(1 + cw, 128);
#else
            (void)s;
            (void)n_block;
#endif
        };

        // Software pipeline across key tiles (FA3's intra-warpgroup overlap): while the tensor cores run
        // S_j = Q.K_j^T and O += P_{j-1}.V_{j-1}, nothing waits; the softmax of S_j then runs while
        // P_{j-1}.V_{j-1} is still in flight, and O is rescaled only after that product retires.
        u32 pa[kBN / 16][4];
        float alpha[1][2];
        if (!dynamic) mbar_wait(sm.q_full(), use & 1);
        if (n_tiles == 0) release_q_after_last_qk();
        for (int j = 0; j < skip_front; ++j) {
            take_turn();
            pass_turn();
            pass_key_tile(kv + j);
        }
        if (CF_PINGPONG && n_tiles == 0 && w.n_tiles() > 0) {
            take_turn();
            pass_turn();
        }
        if (n_tiles > 0) {
            const int s = stage_of(kv0);
            float sc[1][kNT8][4];
            stage_mask(0);
            mbar_wait(sm.k_full(s), parity_of(kv0));
            gathered_stage_ready();
            take_turn();
            wgmma::fence();
            issue_qk(sc, s);
            pass_turn();
            wgmma::wait<0>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kBN / 2]>(sc));
            mbar_arrive(sm.k_empty(s));
            if (n_tiles == 1) release_q_after_last_qk();
            softmax_tile(sc, wg_hi - 1, alpha);  // O is still zero: no rescale
            pack_p(pa, sc);
        }
        for (int it = 1; it < n_tiles; ++it) {
            const int s = stage_of(kv0 + it), prev = stage_of(kv0 + it - 1);
            float sc[1][kNT8][4];
            mbar_wait(sm.k_full(s), parity_of(kv0 + it));
            mbar_wait(sm.v_full(prev), parity_of(kv0 + it - 1));
            gathered_stage_ready();
            zero_v_tail(prev, wg_hi - it);
            take_turn();
            wgmma::fence();
            issue_qk(sc, s);
            issue_pv(pa, prev);
            pass_turn();
            wgmma::wait<1>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kBN / 2]>(sc));
            mbar_arrive(sm.k_empty(s));
            if (it == n_tiles - 1) release_q_after_last_qk();
            softmax_tile(sc, wg_hi - 1 - it, alpha);
            wgmma::wait<0>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_o));
            mbar_arrive(sm.v_empty(prev));
            softmax.rescale(acc_o, alpha);
            pack_p(pa, sc);
        }
        if (n_tiles > 0) {
            const int s = stage_of(kv0 + n_tiles - 1);
            mbar_wait(sm.v_full(s), parity_of(kv0 + n_tiles - 1));
            gathered_stage_ready();
            zero_v_tail(s, wg_hi - n_tiles);
            take_turn();
            wgmma::fence();
            issue_pv(pa, s);
            pass_turn();
            wgmma::wait<0>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_o));
            mbar_arrive(sm.v_empty(s));
        }
        kv = kv0 + n_tiles;

        float row_lse[1][2];
        softmax.finalize(acc_o, row_lse, p.a.scale_log2, natural_score_scale<CF_SOFTCAP, CF_ALIBI, CF_ATTN_MASK == 2>(p.a.softmax_scale));
#if CF_DROPOUT
#pragma unroll
        for (int e = 0; e < kD / 2; ++e) reinterpret_cast<float(&)[kD / 2]>(acc_o)[e] *= p.a.dropout_scale;
#endif

#if CF_SPLIT_KV
        {
            // fp32 partial output straight from the accumulators (two adjacent columns per store), query m
            // of sequence b at row b * seqlen_q + m (seqlen_q: the max_seqlen_q bound), as fwd_sm80.cu.
            const int g = lane >> 2, tq = lane & 3;
            float* oa = p.a.o_accum + w.split * p.a.o_accum_split_stride;
            float* la = p.a.lse_accum + w.split * p.a.lse_accum_split_stride +
                        (i64)w.bc.h * p.a.batch * p.a.seqlen_q + (i64)w.bc.b * p.a.seqlen_q;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int m = wg_row0 + warp_in_wg * 16 + g + 8 * hh;
                if (m >= w.m_end) continue;
                float* dst = oa + (((i64)w.bc.b * p.a.seqlen_q + m) * p.a.heads_q + w.bc.h) * kD + tq * 2;
#pragma unroll
                for (int d = 0; d < kDT8; ++d)
                    *(float2*)(dst + d * 8) = make_float2(acc_o[0][d][2 * hh], acc_o[0][d][2 * hh + 1]);
                if (tq == 0) la[m] = row_lse[0][hh];
            }
            continue;  // (persistent: the static_assert above)
        }
#endif

        // The O rows may be overwritten once the previous tile's store has read them (separate buffer), or
        // once every warp of this warpgroup has retired its last product reading these Q rows.
        if (elected) tma_store_wait_read();
        named_barrier_sync(1 + cw, 128);
        const int g = lane >> 2, tq = lane & 3;
#if CF_VARLEN
        float* lse = p.a.lse + (i64)w.bc.h * p.a.varlen_lse_head_stride + w.row_q;
#else
        float* lse = lse_ptr(p.a, w.bc);
#endif
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = warp_in_wg * 16 + g + 8 * hh;  // row within this warpgroup's 64
#pragma unroll
            for (int d = 0; d < kDT8; ++d) {
                const u32 addr = o_rows + (d / 8) * kQBlock + r * 128 + (((d % 8) ^ (r & 7)) << 4) + tq * 4;
                asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(addr), "r"(pack2(acc_o[0][d][2 * hh], acc_o[0][d][2 * hh + 1])));
            }
            if (tq == 0 && wg_row0 + r < w.m_end) lse[wg_row0 + r] = row_lse[0][hh];
        }
#if CF_VARLEN
        // The sequence's last rows: ordinary 16-byte stores clipped at its length (see the top). Whole
        // 64-row blocks inside the sequence take the TMA store below, as dense tiles do: all-ordinary stores
        // made the epilogue 3x the dense one's stall samples (hd128, 32 x 512 causal: the kernel 14% slower).
        if (wg_row0 + 64 > w.m_end) {
            named_barrier_sync(1 + cw, 128);
            u16* o = (u16*)p.a.o + (i64)w.bc.h * p.a.o_head_stride + (i64)w.row_q * p.a.o_row_stride;
            const int tid = warp_in_wg * 32 + lane;
            for (int c = tid; c < 64 * kDT8; c += 128) {
                const int r = c / kDT8, d = c % kDT8;  // row within this warpgroup's 64, 8-column group
                if (wg_row0 + r < w.m_end && d * 8 < p.a.head_dim)
                    st_global_v4(o + (i64)(wg_row0 + r) * p.a.o_row_stride + d * 8,
                                 ld_shared_v4(o_rows + (d / 8) * kQBlock + r * 128 + (((d % 8) ^ (r & 7)) << 4)));
            }
        } else
#endif
        {
            fence_proxy_async_smem();
            named_barrier_sync(1 + cw, 128);
            if (elected && wg_row0 < w.m_end) {  // an idle warpgroup of a short first tile holds the next tile's rows
                for (int c = 0; c < kCol64; ++c)
                    tma_store_4d(&p.o, o_rows + c * kQBlock, c * 64, CF_Q_ROW0(w) + wg_row0, w.bc.h, CF_TMA_BATCH(w));
                tma_store_commit();
            }
        }
        if (!kPersistent) break;
    }
    // The last hand-over has no next tile to open: the first warpgroup takes it, so that no arrival is
    // left on the barrier (each barrier then sees as many arrivals as waits).
    if (CF_PINGPONG && cw == 0) named_barrier_sync(kTurnBarrier0, 256);
    if (elected) tma_store_wait_read();  // shared memory must outlive the last store's reads
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
attention_fwd_sm90(const __grid_constant__ ForwardSm90Params p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The dynamic window is not guaranteed 1024-aligned; the host adds 1024 bytes of slack for this.
    const SmemLayout sm((smem_u32(smem_raw) + 1023) & ~1023u);
    const int tid = threadIdx.x, warp = tid >> 5;
    const int num_tiles = p.a.num_m_blocks * p.a.batch * p.a.heads_q * (CF_SPLIT_KV ? p.a.num_splits : 1);

    if (tid == 0) {
        mbar_init(sm.q_full(), 1);
        mbar_init(sm.q_empty(), kConsumers * 128);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(sm.k_full(s), kKVFullArrivals);
            mbar_init(sm.v_full(s), kKVFullArrivals);
            mbar_init(sm.k_empty(s), kConsumers * 128);
            mbar_init(sm.v_empty(s), kConsumers * 128);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (warp < 4) {
        setmaxnreg_dec<kProducerRegs>();
        if (CF_PAGE_GATHER || tid == 0) produce(p, sm, num_tiles);
        return;
    }
    setmaxnreg_inc<kConsumerRegs>();
    consume(p, sm, num_tiles, warpgroup_index() - 1, tid & 31, warp & 3);
}
