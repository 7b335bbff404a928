// Attention dropout's draws on the device: Philox4x32-10 (Salmon et al., SC 2011) keyed exactly as
// cuflash/dropout.py keys it, so that a kernel, any tiling of it and the NumPy path keep the same elements.
// Element (b, h, i, j) of a call with `heads` query heads reads
//     counter = (j / 8, i, b * heads + h, offset mod 2^32),  key = (seed mod 2^32, (seed >> 32) ^ (offset >> 32))
// and takes the 16-bit half (j % 8) % 2 (low first) of output word (j % 8) / 2: one call serves eight
// neighbouring keys of a row. Kept iff that value < round((1 - p) * 65536) (the host passes the threshold).
#pragma once
#include "ptx/types.cuh"

struct PhiloxKey {
    u32 k0, k1;
};

// The four output words of Philox4x32-10 for counter (c0, c1, c2, c3) under `key`.
__device__ __forceinline__ void philox4x32_10(u32 c[4], PhiloxKey key) {
    constexpr u32 kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
    constexpr u32 kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule increments
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u32 hi0 = __umulhi(kM0, c[0]), lo0 = kM0 * c[0];
        const u32 hi1 = __umulhi(kM1, c[2]), lo1 = kM1 * c[2];
        const u32 n0 = hi1 ^ c[1] ^ key.k0, n2 = hi0 ^ c[3] ^ key.k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
        key.k0 += kW0;
        key.k1 += kW1;
    }
}

// The key of a call's (seed, offset), both 64-bit.
__device__ __forceinline__ PhiloxKey dropout_key(u64 seed, u64 offset) {
    return PhiloxKey{(u32)seed, (u32)(seed >> 32) ^ (u32)(offset >> 32)};
}

// A call's key and offset: the parameter block's (seed, offset), or, where the caller passed them as a
// device array (`rng` non-null: AttentionParams::dropout_rng), the array's two words as the kernel runs, so
// that a captured CUDA graph draws the masks of whatever the array holds at each replay.
struct DropoutCall {
    PhiloxKey key;
    u64 offset;
};
__device__ __forceinline__ DropoutCall dropout_call(const u64* rng, u64 seed, u64 offset) {
    if (rng != nullptr) {
        asm volatile("ld.global.nc.u64 %0, [%1];\n" : "=l"(seed) : "l"(rng));
        asm volatile("ld.global.nc.u64 %0, [%1];\n" : "=l"(offset) : "l"(rng + 1));
    }
    return DropoutCall{dropout_key(seed, offset), offset};
}

// f(dropout_call(...)) in two inlined copies, one per source: on the parameter block's path the seed and
// offset stay constant-bank operands instead of registers merged with the loaded ones, which the register-
// bound forwards cannot spare (a merged value spilled 4-52 bytes in the Hopper forward at head dim 128).
template <class F>
__device__ __forceinline__ void with_dropout_call(const u64* rng, u64 seed, u64 offset, F&& f) {
    if (rng == nullptr)
        f(dropout_call(nullptr, seed, offset));
    else
        f(dropout_call(rng, 0, 0));
}

// Keep bits of keys 8 g .. 8 g + 7 of query row `row` of (batch * heads + head) `bh`: bit t set iff key
// 8 g + t is kept.
__device__ __forceinline__ u32 dropout_keep8(PhiloxKey key, u64 offset, u32 bh, u32 row, u32 group, u32 threshold) {
    u32 c[4] = {group, row, bh, (u32)offset};
    philox4x32_10(c, key);
    u32 bits = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        bits |= (u32)((c[w] & 0xFFFFu) < threshold) << (2 * w);
        bits |= (u32)((c[w] >> 16) < threshold) << (2 * w + 1);
    }
    return bits;
}

// Drops elements of a thread's mma.sync m16n8 accumulator fragments (score tile rows row0 + 16 s + g (+8),
// keys col0 + 8 n + 2 (lane % 4) (+1); col0 a multiple of 8, so key group col0 / 8 + n is one Philox call
// per row): dropped elements become 0, kept ones are multiplied by `kept_scale` (the forward passes 1 and
// scales O once at the end; the dQ kernel's dP takes 1 / (1 - p) here). The four
// lanes of a quad hold the same two rows of an n8 tile, so they share draws: for each pair of n8 tiles lane
// t of the quad draws (row half t % 2, tile t / 2), and the quad trades the four results by shuffles, one
// Philox call per lane per pair instead of four (a call is ~70 instructions, against 16 mma per m16 x n8
// block of the forward at head dim 128).
template <int MS, int NT8>
__device__ __forceinline__ void dropout_fragments(float (&sc)[MS][NT8][4], PhiloxKey key, u64 offset, u32 bh,
                                                  int row0, int col0, int lane, u32 threshold,
                                                  float kept_scale = 1.f) {
    static_assert(NT8 % 2 == 0, "n8 tiles go in pairs");
    const int g = lane >> 2, t = lane & 3, quad = lane & ~3;
#pragma unroll
    for (int s = 0; s < MS; ++s) {
#pragma unroll
        for (int np = 0; np < NT8; np += 2) {
            const u32 row = (u32)(row0 + s * 16 + g + (t & 1) * 8);
            const u32 group = (u32)(col0 >> 3) + (u32)(np + (t >> 1));
            const u32 bits = dropout_keep8(key, offset, bh, row, group, threshold);
#pragma unroll
            for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 mine = __shfl_sync(0xffffffffu, bits, quad | h | (nn << 1)) >> (2 * t);
                    sc[s][np + nn][2 * h] = (mine & 1u) ? sc[s][np + nn][2 * h] * kept_scale : 0.f;
                    sc[s][np + nn][2 * h + 1] = (mine & 2u) ? sc[s][np + nn][2 * h + 1] * kept_scale : 0.f;
                }
        }
    }
}

// The draws of a transposed score fragment pair (the KV-parallel backward's S^T: rows keys key0 + g (+8),
// columns queries q0 + 8 n + 2 (lane % 4) (+1), key0 a multiple of 8), for n8 tiles n0 and n0 + 1: the 8
// lanes of one lane % 4 hold the same two queries and two key groups, so each lane draws one of the 16
// (query, group) pairs of its lane % 4 (tile n0 + g / 4, query + g % 2, group + (g / 2) % 2) and
// transposed_keep() fetches the one an element needs.
__device__ __forceinline__ u32 dropout_draw_transposed(PhiloxKey key, u64 offset, u32 bh, int q0, int key0, int n0,
                                                       int lane, u32 threshold) {
    const int g = lane >> 2, t2 = (lane & 3) * 2;
    const u32 query = (u32)(q0 + (n0 + (g >> 2)) * 8 + t2 + (g & 1));
    const u32 group = (u32)(key0 >> 3) + (u32)((g >> 1) & 1);
    return dropout_keep8(key, offset, bh, query, group, threshold);
}

// Whether element e of n8 tile n0 + nn (nn = 0 or 1) of the transposed fragment above is kept: the draw of
// lane ((4 nn + 2 (e / 2) + e % 2) * 4 + lane % 4), bit g (key key0 + g + 8 (e / 2) within its group).
__device__ __forceinline__ bool transposed_keep(u32 draw, int nn, int e, int lane) {
    const int src = ((nn * 4 + (e >> 1) * 2 + (e & 1)) << 2) | (lane & 3);
    return (__shfl_sync(0xffffffffu, draw, src) >> (lane >> 2)) & 1u;
}

// All of a lane's keep bits of the n8 tile pair above at once, for kernels where per-element shuffles cost
// registers (bwd_sm90.cu: 64 shuffles a tile spilled 20-170 bytes): bit 4 k of the result, k = 4 nn + 2 (e / 2)
// + e % 2, is transposed_keep(draw, nn, e, lane); the other bits are 0. Eight ballots gather bit b of every
// lane's draw (lane L = 4 k + t at bit L), a lane keeps the ballot of its own key row g = lane / 4 (a tree
// of selects on g's bits) and shifts its column t = lane % 4 down to bit 0.
__device__ __forceinline__ u32 transposed_keep_bits(u32 draw, int lane) {
    u32 ballot[8];
#pragma unroll
    for (int b = 0; b < 8; ++b) ballot[b] = __ballot_sync(0xffffffffu, (draw >> b) & 1u);
    const int g = lane >> 2;
#pragma unroll
    for (int level = 1; level < 8; level *= 2)
#pragma unroll
        for (int b = 0; b < 8; b += 2 * level) ballot[b] = (g & level) ? ballot[b + level] : ballot[b];
    return (ballot[0] >> (lane & 3)) & 0x11111111u;
}

