// The dropout keep mask of a call as bytes (1 = kept), (batch, heads, seqlen_q, seqlen_k) contiguous:
// cuflash.dropout_mask for GPU arrays (tests, FlashAttention-2's S_dmask), and the check that the device
// generator (philox.cuh) draws what cuflash/dropout.py draws.
//
// Defines: CF_WARPS (warps per CTA). grid: any 1-D size; each thread writes the 8 keys of one Philox call
// at a time (a grid-stride loop over (batch * heads, row, key group)).
#include "ptx/types.cuh"
#include "attention/philox.cuh"

namespace {
constexpr int kThreads = CF_WARPS * 32;
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
dropout_keep_mask(unsigned char* __restrict__ mask, int bh_count, int seqlen_q, int seqlen_k, u64 seed, u64 offset,
                  u32 threshold) {
    const int groups = (seqlen_k + 7) / 8;
    const i64 items = (i64)bh_count * seqlen_q * groups;
    const PhiloxKey key = dropout_key(seed, offset);
    for (i64 t = (i64)blockIdx.x * kThreads + threadIdx.x; t < items; t += (i64)gridDim.x * kThreads) {
        const int g = (int)(t % groups);
        const i64 r = t / groups;
        const int row = (int)(r % seqlen_q);
        const int bh = (int)(r / seqlen_q);
        const u32 bits = dropout_keep8(key, offset, (u32)bh, (u32)row, (u32)g, threshold);
        unsigned char* out = mask + r * seqlen_k + 8 * g;
        const int n = min(8, seqlen_k - 8 * g);
        for (int c = 0; c < n; ++c) out[c] = (bits >> c) & 1u;
    }
}
