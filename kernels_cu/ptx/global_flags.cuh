// Flags in global memory that order work between CTAs (sm_70+ memory model): a release add publishes
// everything the thread did before it, an acquire load that reads the new value makes it visible.
// Used by the deterministic Hopper backward, whose CTAs take turns adding into the same dQ rows.
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ int ld_acquire_gpu(const int* flag) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
    return v;
}

__device__ __forceinline__ void red_release_gpu_add(int* flag, int value) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" :: "l"(flag), "r"(value) : "memory");
}

// Spins until *flag == value; an acquire, so what the CTA that set it published is visible afterwards.
__device__ __forceinline__ void wait_flag_equals(const int* flag, int value) {
    while (ld_acquire_gpu(flag) != value) {
    }
}
