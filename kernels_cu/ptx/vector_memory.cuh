// 16-byte shared-memory loads and global stores. Written as PTX because a plain `*(uint4*)p = x` to a
// pointer formed from 16-bit elements and run-time strides compiled to four 4-byte STG on sm_90a: the
// variable-length forward's epilogue spent 3x the dense one's stall samples there (bench/NOTES.md).
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ uint4 ld_shared_v4(u32 addr) {
    uint4 x;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w) : "r"(addr));
    return x;
}

// `dst` must be 16-byte aligned (the callers' rows are: the host checks the views' 16-byte alignment).
__device__ __forceinline__ void st_global_v4(void* dst, uint4 x) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" :: "l"(dst), "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w)
                 : "memory");
}
