// Warpgroup-level control on sm_90a: register reallocation between warpgroups, named barriers among a
// subset of the CTA, and the proxy fence between ordinary shared-memory stores and async-proxy readers.
#pragma once

// setmaxnreg moves registers between warpgroups at run time: every warp of a warpgroup must execute the
// same value (a multiple of 8 in [24, 256]), and the CTA's total must stay within the register file that
// __launch_bounds__(threads, 1) reserved at launch.
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(R)); }

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Arrives at barrier `id` without waiting: the signalling half of a producer/consumer pair of barriers
// (`threads` counts both the arriving and the syncing threads).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy (TMA, wgmma) reads.
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Orders global memory between the generic proxy (loads, atomics) and the async proxy (TMA): the writes of
// completed bulk copies before a following release, an acquire before following bulk copies.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// This thread's warpgroup (threadIdx.x / 128), read through a shuffle so that the compiler knows it is
// warp-uniform: addresses and wgmma descriptors derived from it then stay in uniform registers. Derived
// from threadIdx directly, a kernel's descriptors were built in vector registers and moved over one by
// one before every wgmma (the Hopper forward ran 10-14% slower at head dim 128, bench/NOTES.md h10).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }
