// ldmatrix: a warp loads four 8x8 16-bit matrices from shared memory into mma fragments.
// Lanes 8i..8i+7 give the row addresses of matrix i (each row 16 contiguous bytes); every lane receives
// row lane/4, elements 2*(lane%4)..+1 of each matrix. With .trans it receives the transposed pair
// (rows 2*(lane%4)..+1 of column lane/4), which turns a row-major V tile into B fragments.
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr));
}
