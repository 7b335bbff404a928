// Small helpers shared by the backward kernels (bwd_sm80.cu, bwd_dq_sm80.cu, bwd_sm90.cu).
#pragma once
#include "ptx/cp_async.cuh"
#include "ptx/math.cuh"
#include "attention/params.cuh"
#include "attention/score_mods.cuh"
#include "attention/build_flags.cuh"

#ifndef CF_DETERMINISTIC
#define CF_DETERMINISTIC 0
#endif

constexpr float kLog2e = 1.4426950408889634f;

// Deterministic Hopper backward (bwd_sm90.cu): one turn counter per kDqTurnRows query rows of each (batch,
// query head), which the CTAs adding into those dQ rows advance one after another. The preprocess
// (bwd_prepost.cu) zeroes them, one per 64-row CTA; the host sizes the array (ceil(seqlen_q / this) per
// head) from cf_dq_turn_rows.
constexpr int kDqTurnRows = 64;
__device__ __forceinline__ int* dq_turn_counter(const AttentionParams& p, int b, int h, int row0) {
    return p.dq_semaphore + ((i64)b * p.heads_q + h) * ((p.seqlen_q + kDqTurnRows - 1) / kDqTurnRows) + row0 / kDqTurnRows;
}

// Which (key block, batch, kv head) a CTA of a KV-parallel kernel owns.
struct BwdCoords {
    int n_block, b, hk;
    // Key-block-major (bwd_sm80.cu): key block 0 first, since with causal masking it sees the most query
    // tiles.
    __device__ __forceinline__ explicit BwdCoords(const AttentionParams& p) {
        const int bh_count = p.batch * p.heads_k;
        n_block = (int)(blockIdx.x / bh_count);
        set_head(p, (int)(blockIdx.x % bh_count));
    }
    // Head-major (bwd_sm90.cu): the key blocks of one (batch, kv head) run on consecutive CTAs, so the CTAs
    // in flight walk the same few heads' Q, dO and dq_accum rows and share them in L2. Key-block-major, each
    // CTA in flight streams a different head from DRAM: at seqlen 2k (128 heads) that measured 0.57x the
    // 16k rate on an H100.
    // descending: the key blocks of a head in reverse launch order (the deterministic causal turns, bwd_sm90.cu).
    __device__ __forceinline__ static BwdCoords head_major(const AttentionParams& p, bool descending = false) {
        const int n = (int)(blockIdx.x % p.num_n_blocks);
        return BwdCoords(p, descending ? p.num_n_blocks - 1 - n : n, (int)(blockIdx.x / p.num_n_blocks));
    }

    // Block-sparse launches (block_sparse.cuh): CTAs in the host's order, longest query-tile lists first
    // (a key block that every query sees, global tokens, would otherwise start last and run alone).
    __device__ __forceinline__ static BwdCoords listed(const AttentionParams& p) {
        const int cell = p.block_order[blockIdx.x];
        return BwdCoords(p, cell % p.num_n_blocks, cell / p.num_n_blocks);
    }

private:
    __device__ __forceinline__ BwdCoords(const AttentionParams& p, int n, int bh) : n_block(n) { set_head(p, bh); }
    __device__ __forceinline__ void set_head(const AttentionParams& p, int bh) {
        b = bh / p.heads_k;
        hk = bh % p.heads_k;
    }
};

// Per-lane ldmatrix addresses into a SmemTile (smem_tile.cuh) for the k16 column steps k0 + kk of a warp:
// SmemTile::LaneAddr with a runtime first step k0 (a warp's column offset, not always a multiple of 4).
// Step k0 + kk, kk = 4q + r, lies in column block (k0 + r) / 4 + q at swizzle phase (k0 + r) % 4, so the
// four bases (one per r) carry all the runtime terms and, with kk and the row offset (a multiple of 8)
// known at compile time, every load address is a base register plus an immediate. The swizzled address
// math otherwise costs more instructions than the mma's it feeds.
template <class Tile>
struct WarpLaneAddr {
    u32 base[4];
    __device__ __forceinline__ WarpLaneAddr(u32 smem, int row, int c, int k0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int k = k0 + r;
            base[r] = smem + (u32)((k >> 2) * Tile::kBlockBytes) + (u32)((row * 64 + (((2 * (k & 3)) ^ c ^ (row & 7)) << 3)) * 2);
        }
    }
    __device__ __forceinline__ u32 at(int kk, int row_offset) const {
        return base[kk & 3] + (u32)((kk >> 2) * Tile::kBlockBytes + row_offset * 128);
    }
};

// WarpLaneAddr in one register, for steps k0 + kk where k0 is a multiple of a power of two N <= 4 and
// kk < N: the swizzle phase of step k0 + kk is then (k0 % 4) | kk, so its address is the step-0 address
// with bits 5-6 XORed by kk (tiles and rows are 128-byte aligned). One LOP3 per use instead of three
// more live registers, for the phases that run at the register limit.
template <class Tile>
struct WarpLaneAddrXor {
    u32 base;
    __device__ __forceinline__ WarpLaneAddrXor(u32 smem, int row, int c, int k0)
        : base(smem + (u32)((k0 >> 2) * Tile::kBlockBytes) + (u32)((row * 64 + (((2 * (k0 & 3)) ^ c ^ (row & 7)) << 3)) * 2)) {}
    __device__ __forceinline__ u32 at(int kk, int row_offset) const {
        return (base ^ (u32)(kk << 5)) + (u32)(row_offset * 128);
    }
};

// Returns x through an opaque move, so that values derived from it inside a loop count as loop-variant:
// the compiler then recomputes them (a few integer ops per use) instead of pinning them in registers
// across the whole loop, where the dK/dV accumulators leave none to spare.
__device__ __forceinline__ u32 loop_variant(u32 x) {
    u32 y;
    asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// 4-byte cp.async (the .cg form only takes 16 bytes); src size 0 writes a zero. LSE and delta rows are
// fp32 and start at arbitrary seqlen_q offsets, so 16-byte chunks would be misaligned.
__device__ __forceinline__ void cp_async_4(u32 smem_addr, const void* gmem, bool valid) {
    int src_bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(smem_addr), "l"(gmem), "r"(src_bytes));
}

// Fire-and-forget fp32 atomic add of four consecutive floats (addr 16-byte aligned). sm_90's vector form
// (PTX 8.1) is one instruction and one 16-byte L2 reduction instead of four scalar ones.
__device__ __forceinline__ void red_add_f32x4(float* addr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" :: "l"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n" :: "l"(addr), "f"(a) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" :: "l"(addr + 1), "f"(b) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" :: "l"(addr + 2), "f"(c) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" :: "l"(addr + 3), "f"(d) : "memory");
#endif
}

// The exponent of P, in one of two forms: bwd_sm90.cu picks one per query tile (kChooseExponent), the
// sm80-family kernels run the exact one on every tile:
//   fast:  P = 2^(s c2 - lse2)                 c2 = score_scale * log2 e, lse2 = lse * log2 e (one FMA)
//   exact: P = 2^((s score_scale - lse) log2 e)                                  (one FMA + one FMUL)
// The fast form rounds c2 and lse2 to fp32 (2^-24 relative each), which moves the exponent by about
// (|lse| + |s score_scale|) 2^-24 for the elements that matter (s score_scale >= lse - 100): within
// 2^-15 of P while |lse| < kFastLseLimit, and P = inf / NaN once |lse| nears 1e9 (a constant bf16 input
// of 133120 at head dim 64 has LSE 1.4e11). The exact form is exact wherever the fp32 LSE holds the true
// value (one key: P = 1 exactly). Per element it costs one FMUL more: 1.5-4% of the Hopper backward at
// head dims 64-128 (bench/NOTES.md), which ordinary tiles there do not pay.
constexpr float kFastLseLimit = 256.f;

template <bool EXACT>
struct BwdExponent {
    float scale;  // multiplies the score: score_scale (exact) or score_scale * log2 e (fast)
    // scale_log2: the host's softmax_scale * log2 e (AttentionParams::scale_log2), the forward's own c.
    template <bool SOFTCAP, bool ALIBI, bool ADD = false>
    __device__ __forceinline__ static BwdExponent make(float softmax_scale, float scale_log2) {
        return BwdExponent{EXACT ? natural_score_scale<SOFTCAP, ALIBI, ADD>(softmax_scale)
                                 : ((SOFTCAP || ALIBI || ADD) ? kLog2e : scale_log2)};
    }
    // What an element subtracts for its row: lse (exact) or lse * log2 e (fast); +inf stays +inf (P = 0).
    __device__ __forceinline__ static float row_term(float lse) { return EXACT ? lse : lse * kLog2e; }
    __device__ __forceinline__ float operator()(float s, float row) const {
        return EXACT ? exp2_approx(fmaf(s, scale, -row) * kLog2e) : exp2_approx(fmaf(s, scale, -row));
    }
};

// Where a kernel chooses the form per tile (bwd_sm90.cu): not with softcap, ALiBi or an additive mask, which
// transform the score inside the element loop (no pre-pass can shift it) and whose elements already cost a
// tanh, a bias or a load. A boolean mask's term (0 or -inf) leaves either form exact.
constexpr bool kChooseExponent = !CF_SOFTCAP && !CF_ALIBI && CF_ATTN_MASK != 2;

// Whether LSE value `lse` of a real row needs the exact form (+inf marks a row that saw no key: P = 0 in
// either form; NaN takes the exact one).
__device__ __forceinline__ bool lse_needs_exact(float lse) {
    return !(fabsf(lse) < kFastLseLimit) && lse != CF_INF;
}

// The backward recomputation of one score element, shared by the KV-parallel and the Q-parallel kernels:
// from the raw q.k product `x`, query i and key j,
//   s  = x                                         (no softcap / ALiBi / additive mask; score_scale = softmax_scale)
//   s  = softcap * tanh(scale * x / softcap) - slope * |i + off - j| + add   (otherwise; score_scale = 1)
//   P  = 2^((s score_scale - lse) log2 e)      (0 where masked: s = -inf; 0 on rows with lse = +inf),
//        in the form `ex` picks (BwdExponent; `row` is ex.row_term(lse))
//   dS = P (dP - D) [* (1 - tanh^2)]  -- neither softmax_scale nor any 16-bit rounding is applied here.
// With an attn_mask (MASK; attn_mask.cuh) `add` is its term: 0 or -inf for a boolean mask, the mask's
// value for an additive one (ADD: the scaled form, as the forward's apply_score_mods).
// bwd_probability returns P and the softcap factor 1 - tanh^2 (1 without softcap); without softcap, a
// kernel can take P before dP is ready and finish dS = P (dP - D) later.
template <bool SOFTCAP, bool ALIBI, bool EXACT, bool ADD = false, bool MASK = false>
__device__ __forceinline__ float bwd_probability(float x, float row, bool visible, BwdExponent<EXACT> ex, float pre,
                                                 float softcap, float slope, int dist, float& dtanh,
                                                 float add = 0.f) {
    dtanh = 1.f;
    if (SOFTCAP) {
        const float t = tanh_accurate(x * pre);
        x = softcap * t;
        dtanh = fmaf(-t, t, 1.f);
    } else if (ALIBI || ADD) {
        x *= pre;
    }
    if (ALIBI) x -= slope * fabsf((float)dist);
    if (MASK) x += add;
    if (!visible) x = -CF_INF;
    return ex(x, row);
}

// P and, overwriting `dp` (dO.v on entry), dS in one step.
template <bool SOFTCAP, bool ALIBI, bool EXACT, bool ADD = false, bool MASK = false>
__device__ __forceinline__ float bwd_score_element(float x, float& dp, float row, float delta, bool visible,
                                                   BwdExponent<EXACT> ex, float pre, float softcap, float slope,
                                                   int dist, float add = 0.f) {
    float dtanh;
    const float pr = bwd_probability<SOFTCAP, ALIBI, EXACT, ADD, MASK>(x, row, visible, ex, pre, softcap, slope,
                                                                       dist, dtanh, add);
    float ds = pr * (dp - delta);
    if (SOFTCAP) ds *= dtanh;
    dp = ds;
    return pr;
}
