// mbarrier (sm_90 transaction counts): the handshake between the TMA producer and the consumers.
//
// A barrier completes a phase when its pending arrivals reach zero and, for TMA, its expected
// transaction bytes have all landed. Waiters name the parity of the phase they wait for: a full
// barrier's k-th use is waited with parity k & 1; an empty barrier is waited by the producer with the
// flipped parity, so its first wait on each fresh stage passes at once. Arrival counts must match the
// count given at init exactly, or the phase never completes (a hang, not an error).
#pragma once
#include "ptx/types.cuh"

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}

// Makes initialised barriers visible to the async proxy (TMA) before the CTA-wide barrier that follows.
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also announces `bytes` of TMA transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
