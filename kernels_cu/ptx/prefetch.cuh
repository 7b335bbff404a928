// Cache prefetches of global memory: the line holding an address is brought into a cache level without a
// destination register, so a thread short of registers can start a load's latency early and read the
// value later with an ordinary load.
#pragma once

__device__ __forceinline__ void prefetch_global_l1(const void* ptr) {
    asm volatile("prefetch.global.L1 [%0];\n" :: "l"(ptr));
}
