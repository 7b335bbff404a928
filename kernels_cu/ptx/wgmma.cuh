// wgmma (sm_90a): warpgroup-wide asynchronous matrix products, operands described by 64-bit shared-memory
// descriptors. Shapes are in wgmma_shapes.cuh; this header holds the rules that make them correct.
//
// Shared-memory layout (what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B, tma.cuh): a tile of 16-bit
// elements is stored as column blocks of 64 elements (128 bytes per row); inside a block, row r's 16-byte
// chunk c sits at chunk c ^ (r % 8). The XOR is applied by the hardware on address bits [4,7) ^ [7,10),
// so every block must start 1024-byte aligned (then the descriptor's base-offset field stays 0).
//
// Descriptor fields (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits [0,14),
// leading-dimension byte offset (LBO) >> 4 in [16,30), stride-dimension byte offset (SBO) >> 4 in
// [32,46), layout type in [62,64) with 1 = 128-byte swizzle.
//  - K-major operand (the reduction dim is contiguous: Q and K for S = Q.K^T): 8-row groups are
//    SBO = 1024 bytes apart; LBO is unused because one k16 step (32 bytes) never leaves a 128-byte row.
//    Step k16 number kk of a block by adding 32 * kk bytes to the start address: the swizzle is a
//    function of the address, so the hardware finds the right chunks.
//  - MN-major operand (V in O += P.V, where head-dim columns are contiguous and keys are rows): with the
//    transpose bit set, SBO = 1024 is the stride between groups of 8 keys, and LBO is the stride between
//    64-column blocks (the block size in bytes), so one instruction can span N = head dim > 64.
//
// Register discipline: accumulators written by ordinary code (zeroing, the softmax rescale of O) need
// fence() before the first wgmma that reads them; registers must not be touched between an mma and the
// wait_group that retires it; fence_operand() after the wait keeps the compiler from hoisting reads of
// the results above it (inline asm "+f" outputs look ready as soon as the mma asm is issued).
#pragma once
#include "ptx/types.cuh"

#if CF_DTYPE == CF_BF16
#define CF_WGMMA_AB ".bf16.bf16"
#else
#define CF_WGMMA_AB ".f16.f16"
#endif

#include "ptx/wgmma_shapes.cuh"

namespace wgmma {

__device__ __forceinline__ u64 desc_sw128(u32 smem_addr, u32 lbo_bytes, u32 sbo_bytes) {
    return (u64)((smem_addr & 0x3FFFF) >> 4) | ((u64)(lbo_bytes >> 4) << 16) | ((u64)(sbo_bytes >> 4) << 32)
           | (1ull << 62);
}

// The descriptor of the same operand `bytes` further on (a k16 step, a column block): only the start
// address field moves, and it cannot carry into LBO, since shared addresses stay below 2^18 (228 KB per
// CTA) and so (addr >> 4) below 2^14 before and after. Adding to the low word alone is one uniform
// instruction per wgmma, where rebuilding the descriptor from the address took five.
__device__ __forceinline__ u64 desc_advance(u64 desc, u32 bytes) {
    const u32 lo = (u32)desc + (bytes >> 4), hi = (u32)(desc >> 32);
    return ((u64)hi << 32) | lo;
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N committed groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

template <int R>
__device__ __forceinline__ void fence_operand(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

// Ends the life of an accumulator's old values before a product that overwrites it (scale-d 0 on its first
// k step): the mma asm takes the accumulator as a read-write operand, so without this the compiler keeps the
// old values live up to the product. No instruction.
template <int R>
__device__ __forceinline__ void discard_operand(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "=f"(d[i]));
}

}  // namespace wgmma
