// Scores as one wgmma SS product: A.B^T over a head dim of K columns, both operands K-major in 128-byte
// swizzled column blocks of 64 elements (ptx/wgmma.cuh): k16 step kk reads 32 bytes (kk % 4) into column
// block kk / 4 of each operand, whose blocks lie a_block / b_block bytes apart. The forward's S = Q.K^T and
// the backward's S^T = K.Q^T and dP^T = V.dO^T; the caller fences and commits around it.
#pragma once
#include "ptx/types.cuh"
#include "ptx/wgmma.cuh"
#include "ptx/wgmma_shapes.cuh"

template <int N, int K>
__device__ __forceinline__ void kmajor_score_product(float (&acc)[N / 2], u64 a_desc, u32 a_block, u64 b_desc,
                                                     u32 b_block) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        const u32 off = (kk % 4) * 32;
        WgmmaShape<N>::ss(acc, wgmma::desc_advance(a_desc, (kk / 4) * a_block + off),
                          wgmma::desc_advance(b_desc, (kk / 4) * b_block + off), kk > 0);
    }
}
