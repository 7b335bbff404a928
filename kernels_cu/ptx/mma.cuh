// mma.sync m16n8k16 with fp32 accumulation (sm_80+).
//
// Fragment layout, with g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A (16x16, row-major): a[0] = (row g,   cols 2t..2t+1), a[1] = (row g+8, cols 2t..2t+1),
//                         a[2] = (row g,   cols 2t+8..),   a[3] = (row g+8, cols 2t+8..)
//   B (16x8, "col"):      b[0] = (k 2t..2t+1, col g),      b[1] = (k 2t+8..2t+9, col g)
//   C (16x8, fp32):       c[0..1] = (row g, cols 2t..2t+1), c[2..3] = (row g+8, cols 2t..2t+1)
// The C layout of two neighbouring n8 tiles is exactly the A layout of one k16 step, which is what lets
// attention feed P = softmax(S) into the second product without going through shared memory.
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if CF_DTYPE == CF_BF16
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
