// The two warp-level matrix products of attention, on XOR-swizzled shared-memory tiles (smem_tile.cuh):
//
//   gemm_rows_rows:  acc[MS slabs][N/8] += A · Bᵀ   A = the warp's query rows (Q or dO, head dim along k),
//                                                    B = key rows (K or V, head dim along k)       -> S, dP
//   gemm_accum_rows: acc[MS slabs][D/8] += P · B     P = fp32 accumulators of a previous product (the mma
//                                                    C layout of two n8 tiles is the A layout of one k16 step,
//                                                    so P never leaves registers), B = key rows read
//                                                    transposed with ldmatrix.trans                 -> O, dQ
//
// Addresses come from SmemTile::LaneAddr (four per-lane bases, everything else immediates), built once per
// operand with the *_operand helpers below; `extra` adds a runtime byte offset (a second buffer).
#pragma once
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "attention/smem_tile.cuh"
#include "attention/fragments.cuh"

// ldmatrix lanes for an A operand: rows row0 + lane % 16 of the warp's first slab, 8-column half lane / 16.
template <class Tile>
__device__ __forceinline__ typename Tile::LaneAddr a_operand(u32 smem, int row0, int lane) {
    return typename Tile::LaneAddr(smem, row0 + (lane & 15), lane >> 4);
}

// ldmatrix lanes for a B operand stored as rows of n (keys) x k (head dim): two n8 tiles per x4 load.
template <class Tile>
__device__ __forceinline__ typename Tile::LaneAddr b_operand(u32 smem, int lane) {
    return typename Tile::LaneAddr(smem, (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
}

// ldmatrix.trans lanes for a B operand stored as rows of k (keys) x n (head dim): two n8 tiles per x4 load.
template <class Tile>
__device__ __forceinline__ typename Tile::LaneAddr bt_operand(u32 smem, int lane) {
    return typename Tile::LaneAddr(smem, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
}

template <int MS, int N, int D, class ATile, class BTile>
__device__ __forceinline__ void gemm_rows_rows(float (&acc)[MS][N / 8][4], const typename ATile::LaneAddr& a_addr,
                                               const typename BTile::LaneAddr& b_addr, u32 b_extra = 0) {
    // One 64-wide column block per trip: the k-steps inside are unrolled (compile-time swizzle phases), the
    // trips are not, so ptxas cannot hoist the fragments of the whole head dim into registers.
#pragma unroll 1
    for (int blk = 0; blk < D / 64; ++blk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 a[MS][4];
#pragma unroll
            for (int s = 0; s < MS; ++s) ldmatrix_x4(a[s], a_addr.at(j, s * 16) + blk * ATile::kBlockBytes);
#pragma unroll
            for (int nn = 0; nn < N / 16; ++nn) {
                u32 b[4];
                ldmatrix_x4(b, b_addr.at(j, nn * 16) + blk * BTile::kBlockBytes + b_extra);
#pragma unroll
                for (int s = 0; s < MS; ++s) {
                    mma_16816(acc[s][2 * nn], a[s], b[0], b[1]);
                    mma_16816(acc[s][2 * nn + 1], a[s], b[2], b[3]);
                }
            }
        }
    }
}

template <int MS, int N, int D, class BTile>
__device__ __forceinline__ void gemm_accum_rows(float (&acc)[MS][D / 8][4], const float (&p)[MS][N / 8][4],
                                                const typename BTile::LaneAddr& b_addr, u32 b_extra = 0) {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        u32 a[MS][4];
#pragma unroll
        for (int s = 0; s < MS; ++s) {
            a[s][0] = pack2(p[s][2 * kk][0], p[s][2 * kk][1]);
            a[s][1] = pack2(p[s][2 * kk][2], p[s][2 * kk][3]);
            a[s][2] = pack2(p[s][2 * kk + 1][0], p[s][2 * kk + 1][1]);
            a[s][3] = pack2(p[s][2 * kk + 1][2], p[s][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
            u32 b[4];
            ldmatrix_x4_trans(b, b_addr.at(dd, kk * 16) + b_extra);
#pragma unroll
            for (int s = 0; s < MS; ++s) {
                mma_16816(acc[s][2 * dd], a[s], b[0], b[1]);
                mma_16816(acc[s][2 * dd + 1], a[s], b[2], b[3]);
            }
        }
    }
}
