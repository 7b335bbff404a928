// Accumulator fragments shared by the mma.sync and wgmma kernels: both lay fp32 results out as
// [m16 slabs][n8 column groups][4] per thread (see ptx/mma.cuh for the element positions).
#pragma once

// Clears an accumulator tile (slabs x n8 tiles x the four fp32 values of an mma C fragment).
template <int A, int B>
__device__ __forceinline__ void zero_fill(float (&acc)[A][B][4]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}
