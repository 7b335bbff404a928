// TMA (sm_90): bulk tensor copies between global and shared memory described by a CUtensorMap that the
// host encodes (cuflash/tma.py) and passes by value inside the __grid_constant__ kernel parameters, so
// the copy engine can read it from parameter space through its generic address.
//
// Loads complete on an mbarrier (mbarrier.cuh) as a transaction count: the barrier's expect_tx must be
// the full box size in bytes, out-of-bounds parts included, because TMA writes zeros there and counts
// them. Out of bounds means past the tensor map's own dimensions: sequence is a dimension of its own
// (head_dim, seqlen, heads, batch), so a tile hanging over the end of one sequence reads zeros instead of
// the next sequence, and a store there is clipped.
#pragma once
#include "ptx/types.cuh"

struct alignas(64) TmaMap {
    u64 opaque[16];
};

__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(map) : "memory");
}

// Box at coordinates (c0 innermost .. c3) into shared memory at `dst`; completes on mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaMap* map, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
        :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}

// Shared memory at `src` to the box at (c0 .. c3); the source must have been written before a
// fence.proxy.async (warpgroup.cuh) by every writing thread, since TMA reads through the async proxy.
__device__ __forceinline__ void tma_store_4d(const TmaMap* map, u32 src, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
        :: "l"(map), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}

__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Blocks until the committed stores have finished reading shared memory (the CTA may then exit or reuse it).
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }

// Adds the fp32 box in shared memory at `src` into global memory at (c0 .. c3): the copy engine performs
// the reduction in L2, a box at a time, instead of the SMs issuing one atomic per 16 bytes. Out-of-bounds
// rows are dropped. Same ordering rules as tma_store_4d (fence.proxy.async before, a bulk group after).
__device__ __forceinline__ void tma_reduce_add_4d(const TmaMap* map, u32 src, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
        :: "l"(map), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}

// Blocks until the committed bulk groups have finished entirely (their global writes done, not only their
// shared-memory reads).
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
