// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers and L1 (.cg), so a tile load
// overlaps the math on the previous tile. A source size of 0 writes 16 zero bytes without reading
// global memory: that is how tails past seqlen or head_dim become zeros instead of out-of-bounds reads.
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// The first `src_bytes` (0 to 16) bytes from global memory, the rest of the 16 zero-filled.
__device__ __forceinline__ void cp_async_16_bytes(u32 smem_addr, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_16(u32 smem_addr, const void* gmem, bool valid) {
    cp_async_16_bytes(smem_addr, gmem, valid ? 16 : 0);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight (for this thread only: a __syncthreads
// must follow before other threads' copies may be read).
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// Makes the mbarrier at `bar` receive one arrival once every cp.async this thread has issued so far has
// landed (.noinc: the arrival counts toward the barrier's expected count, set at its init).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
