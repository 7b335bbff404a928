// FlashAttention forward for Hopper (sm_90a): TMA loads through an mbarrier pipeline, wgmma for both
// products, a producer warpgroup and two consumer warpgroups with setmaxnreg.
//
// CTA = 3 warpgroups. Warpgroup 0 is the producer: one thread issues every TMA load (Q once, then K and V
// of each visible key tile into a ring of CF_STAGES stages) and the rest of it idles at 24 registers.
// Warpgroups 1..CF_CONSUMERS each own 64 of the CTA's 64 x CF_CONSUMERS query rows and run, per key tile,
//     S = Q.K^T (wgmma, both operands in shared memory) -> score mods, mask, online softmax in registers
//     -> O += P.V (wgmma, P from registers, V read transposed from shared memory),
// releasing each stage to the producer as soon as their products that read it have retired. Key tiles
// are walked last to first (as in the sm80 kernel): the first tile holds the seqlen_k tail and the
// causal/window diagonals, so interior tiles skip the mask.
// The epilogue stages O through the warpgroup's own rows of the Q buffer and writes it with TMA stores,
// which clip rows past seqlen_q and columns past head_dim.
//
// Compile-time configuration (cuflash/dispatch.py): CF_DTYPE, CF_HEAD_DIM (64, 128, 192 or 256; a smaller
// real head_dim is zero-filled by TMA), CF_BLOCK_N, CF_STAGES, CF_CONSUMERS (2 or 3), CF_PINGPONG, CF_IS_LOCAL,
// CF_SOFTCAP, CF_ALIBI.
#include "ptx/cp_async.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/warpgroup.cuh"
#include "ptx/wgmma.cuh"
#include "attention/params.cuh"
#include "attention/block_coords.cuh"
#include "attention/score_mods.cuh"
#include "attention/online_softmax.cuh"
#include "attention/fragments.cuh"

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
// Register split of the 64K-register file: 128 x 24 + 256 x 240 = 64512 with two consumer warpgroups,
// 128 x 32 + 384 x 160 = 65536 with three (then S, P and O must fit 160: head dim 64 only).
constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32;
constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
static_assert(kConsumers == 2 || (kConsumers == 3 && kD == 64), "three consumer warpgroups only at head dim 64");
// Named barriers: 1..kConsumers for each warpgroup's epilogue, then one "your turn" barrier per consumer.
constexpr int kTurnBarrier0 = 1 + kConsumers;
}  // namespace

// Offsets in the dynamic shared memory (1024-byte aligned base): Q, K stages, V stages, then barriers.
struct SmemLayout {
    u32 q, k, v, bars;
    __device__ __forceinline__ explicit SmemLayout(u32 base)
        : q(base), k(base + kQBytes), v(base + kQBytes + kStages * kKVBytes),
          bars(base + kQBytes + 2 * kStages * kKVBytes) {}
    __device__ __forceinline__ u32 k_stage(int s) const { return k + s * kKVBytes; }
    __device__ __forceinline__ u32 v_stage(int s) const { return v + s * kKVBytes; }
    __device__ __forceinline__ u32 q_full() const { return bars; }
    __device__ __forceinline__ u32 k_full(int s) const { return bars + 8 * (1 + s); }
    __device__ __forceinline__ u32 v_full(int s) const { return bars + 8 * (1 + kStages + s); }
    __device__ __forceinline__ u32 k_empty(int s) const { return bars + 8 * (1 + 2 * kStages + s); }
    __device__ __forceinline__ u32 v_empty(int s) const { return bars + 8 * (1 + 3 * kStages + s); }
};
extern "C" __device__ const int cf_fwd_sm90_smem_bytes = kQBytes + 2 * kStages * kKVBytes + 8 * (1 + 4 * kStages) + 1024;

extern "C" __global__ void __launch_bounds__(kThreads, 1)
attention_fwd_sm90(const __grid_constant__ ForwardSm90Params p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The dynamic window is not guaranteed 1024-aligned; the host adds 1024 bytes of slack for this.
    const SmemLayout sm((smem_u32(smem_raw) + 1023) & ~1023u);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warpgroup = warp >> 2;
    const BlockCoords bc = BlockCoords::grouped(p.a);
    const int m_start = bc.m_block * kBM;
    const Visibility vis(p.a.seqlen_q, p.a.seqlen_k, p.a.window_left, p.a.window_right);
    int n_lo, n_hi;
    vis.key_tiles(m_start, min(m_start + kBM, p.a.seqlen_q) - 1, kBN, &n_lo, &n_hi);

    if (tid == 0) {
        mbar_init(sm.q_full(), 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(sm.k_full(s), 1);
            mbar_init(sm.v_full(s), 1);
            mbar_init(sm.k_empty(s), kConsumers * 128);
            mbar_init(sm.v_empty(s), kConsumers * 128);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (warpgroup == 0) {
        setmaxnreg_dec<kProducerRegs>();
        if (tid != 0) return;
        tma_prefetch_map(&p.q);
        tma_prefetch_map(&p.k);
        tma_prefetch_map(&p.v);
        mbar_arrive_expect_tx(sm.q_full(), kQBytes);
        for (int c = 0; c < kCol64; ++c)
            tma_load_4d(sm.q + c * kQBlock, &p.q, sm.q_full(), c * 64, m_start, bc.h, bc.b);
        // Issue order follows the consumers' use: K_j, then V_{j-1} (they multiply P_{j-1}.V_{j-1} after
        // S_j = Q.K_j^T is issued), so a stage's K is never queued behind a V still being read.
        auto load_k = [&](int it) {
            const int s = it % kStages;
            mbar_wait(sm.k_empty(s), ((it / kStages) & 1) ^ 1);
            mbar_arrive_expect_tx(sm.k_full(s), kKVBytes);
            for (int c = 0; c < kCol64; ++c)
                tma_load_4d(sm.k_stage(s) + c * kKVBlock, &p.k, sm.k_full(s), c * 64, (n_hi - 1 - it) * kBN, bc.hk, bc.b);
        };
        auto load_v = [&](int it) {
            const int s = it % kStages;
            mbar_wait(sm.v_empty(s), ((it / kStages) & 1) ^ 1);
            mbar_arrive_expect_tx(sm.v_full(s), kKVBytes);
            for (int c = 0; c < kCol64; ++c)
                tma_load_4d(sm.v_stage(s) + c * kKVBlock, &p.v, sm.v_full(s), c * 64, (n_hi - 1 - it) * kBN, bc.hk, bc.b);
        };
        const int n_tiles = n_hi - n_lo;
        for (int it = 0; it < n_tiles; ++it) {
            load_k(it);
            if (it > 0) load_v(it - 1);
        }
        if (n_tiles > 0) load_v(n_tiles - 1);
        return;
    }

    setmaxnreg_inc<kConsumerRegs>();
    const int cw = warpgroup - 1;                  // consumer index: rows [64 cw, 64 cw + 64) of the tile
    const int wg_row0 = m_start + cw * 64;
    const int wg_row_last = min(wg_row0 + 64, p.a.seqlen_q) - 1;
    const int warp_row0 = wg_row0 + (warp & 3) * 16;
    const float slope = CF_ALIBI ? p.a.alibi[(i64)bc.b * p.a.alibi_batch_stride + bc.h] : 0.f;

    // Descriptor bases; the k16 step moves along a row (Q, K: +32 bytes, next column block every 4
    // steps) or down the keys (V: 16 rows = 2048 bytes), see wgmma.cuh.
    const u32 q_rows = sm.q + cw * 64 * 128;

    float acc_o[1][kDT8][4];
    zero_fill(acc_o);
    OnlineSoftmax<1, kNT8> softmax;

    auto issue_qk = [&](float (&sc)[1][kNT8][4], int s) {
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
            const u32 off = (kk % 4) * 32;
            WgmmaShape<kBN>::ss(reinterpret_cast<float(&)[kBN / 2]>(sc),
                                wgmma::desc_sw128(q_rows + (kk / 4) * kQBlock + off, 16, 1024),
                                wgmma::desc_sw128(sm.k_stage(s) + (kk / 4) * kKVBlock + off, 16, 1024), kk > 0);
        }
        wgmma::commit();
    };
    auto issue_pv = [&](const u32 (&pa)[kBN / 16][4], int s) {
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
            WgmmaShape<kD>::rs_tb(reinterpret_cast<float(&)[kD / 2]>(acc_o), pa[kk],
                                  wgmma::desc_sw128(sm.v_stage(s) + kk * 16 * 128, kKVBlock, 1024), 1);
        wgmma::commit();
    };
    // Raw products -> unnormalised probabilities; alpha rescales O to the new row maxima.
    auto softmax_tile = [&](float (&sc)[1][kNT8][4], int n_block, float (&alpha)[1][2]) {
        const TileCoords<1, kNT8> tc(warp_row0, n_block * kBN, lane);
        apply_score_mods<1, kNT8, CF_SOFTCAP, CF_ALIBI>(sc, tc, p.a.softmax_scale, p.a.softcap, slope, vis.off);
        if (vis.tile_needs_mask<CF_IS_LOCAL>(wg_row0, wg_row_last, n_block * kBN, kBN)) apply_mask(sc, tc, vis);
        softmax.exponentiate(sc, alpha, p.a.scale_log2);
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

    // Software pipeline across key tiles (FA3's intra-warpgroup overlap): while the tensor cores run
    // S_j = Q.K_j^T and O += P_{j-1}.V_{j-1}, nothing waits; the softmax of S_j then runs while
    // P_{j-1}.V_{j-1} is still in flight, and O is rescaled only after that product retires.
    const int n_tiles = n_hi - n_lo;

    // Ping-pong (CF_PINGPONG, FA3): the consumer warpgroups take turns, round robin, to issue their
    // products, so that one warpgroup's softmax runs while another's products own the tensor cores.
    // Each warpgroup has n_tiles + 1 issue points; the last warpgroup opens the first turn and skips its
    // final hand-over, so every barrier ends with as many arrivals as waits.
    int turns_left = n_tiles > 0 ? n_tiles + 1 : 0;
    auto take_turn = [&]() {
        if (CF_PINGPONG) named_barrier_sync(kTurnBarrier0 + cw, 256);
    };
    auto pass_turn = [&]() {
        if (CF_PINGPONG && (--turns_left > 0 || cw != kConsumers - 1))
            named_barrier_arrive(kTurnBarrier0 + (cw + 1) % kConsumers, 256);
    };
    if (CF_PINGPONG && cw == kConsumers - 1 && n_tiles > 0) named_barrier_arrive(kTurnBarrier0, 256);

    u32 pa[kBN / 16][4];
    float alpha[1][2];
    mbar_wait(sm.q_full(), 0);
    if (n_tiles > 0) {
        float sc[1][kNT8][4];
        mbar_wait(sm.k_full(0), 0);
        take_turn();
        wgmma::fence();
        issue_qk(sc, 0);
        pass_turn();
        wgmma::wait<0>();
        wgmma::fence_operand(reinterpret_cast<float(&)[kBN / 2]>(sc));
        mbar_arrive(sm.k_empty(0));
        softmax_tile(sc, n_hi - 1, alpha);  // O is still zero: no rescale
        pack_p(pa, sc);
    }
    for (int it = 1; it < n_tiles; ++it) {
        const int s = it % kStages, prev = (it - 1) % kStages;
        float sc[1][kNT8][4];
        mbar_wait(sm.k_full(s), (it / kStages) & 1);
        mbar_wait(sm.v_full(prev), ((it - 1) / kStages) & 1);
        take_turn();
        wgmma::fence();
        issue_qk(sc, s);
        issue_pv(pa, prev);
        pass_turn();
        wgmma::wait<1>();
        wgmma::fence_operand(reinterpret_cast<float(&)[kBN / 2]>(sc));
        mbar_arrive(sm.k_empty(s));
        softmax_tile(sc, n_hi - 1 - it, alpha);
        wgmma::wait<0>();
        wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_o));
        mbar_arrive(sm.v_empty(prev));
        softmax.rescale(acc_o, alpha);
        pack_p(pa, sc);
    }
    if (n_tiles > 0) {
        const int last = n_tiles - 1, s = last % kStages;
        mbar_wait(sm.v_full(s), (last / kStages) & 1);
        take_turn();
        wgmma::fence();
        issue_pv(pa, s);
        pass_turn();
        wgmma::wait<0>();
        wgmma::fence_operand(reinterpret_cast<float(&)[kD / 2]>(acc_o));
        mbar_arrive(sm.v_empty(s));
    }

    float row_lse[1][2];
    softmax.finalize(acc_o, row_lse, p.a.scale_log2);

    // Every warp of this warpgroup has retired its last product that read these Q rows before any warp
    // overwrites them with O.
    named_barrier_sync(1 + cw, 128);
    const int g = lane >> 2, t = lane & 3;
    float* lse = lse_ptr(p.a, bc);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = (warp & 3) * 16 + g + 8 * hh;  // row within this warpgroup's 64
#pragma unroll
        for (int d = 0; d < kDT8; ++d) {
            const u32 addr = q_rows + (d / 8) * kQBlock + r * 128 + (((d % 8) ^ (r & 7)) << 4) + t * 4;
            asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(addr), "r"(pack2(acc_o[0][d][2 * hh], acc_o[0][d][2 * hh + 1])));
        }
        if (t == 0 && wg_row0 + r < p.a.seqlen_q) lse[wg_row0 + r] = row_lse[0][hh];
    }
    fence_proxy_async_smem();
    named_barrier_sync(1 + cw, 128);
    if ((tid & 127) == 0) {
        for (int c = 0; c < kCol64; ++c) tma_store_4d(&p.o, q_rows + c * kQBlock, c * 64, wg_row0, bc.h, bc.b);
        tma_store_commit();
        tma_store_wait_read();
    }
}
