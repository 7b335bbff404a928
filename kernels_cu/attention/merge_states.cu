// Merges partial attention states over disjoint key sets into the state over their union (the split-KV
// combine of FlashAttention and FlashInfer's state merge; cuflash.merge_attention_states):
//     lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i,
// in fp32 whatever the element types. A state whose LSE is +inf saw no key (cuflash's convention): it has
// weight 0 and its out row is never used (0 x NaN would be NaN); a row that no state saw stays 0, LSE +inf.
//
// One warp a (batch, row, head): lane i < n reads state i's LSE, the warp reduces the max and the sum of
// exp(lse_i - max), then its lanes stride over the head dim, each column a weighted sum over the states.
// Strides are in elements, per state, so any views merge without copies. Up to kMaxStates states a launch,
// their pointers in the parameter block; the host merges more in rounds through fp32 states.
//
// Defines: CF_WARPS (warps per CTA), CF_MERGE_IN and CF_MERGE_OUT (element types of the states' and the
// merged out: 0 fp16, 1 bf16, 2 fp32). grid: any 1-D size (a grid-stride loop over rows).
#include "ptx/types.cuh"
#include "ptx/math.cuh"

namespace {
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
// 16 states: 16 x 72 bytes of parameters (of the 4 KB a launch may pass), and split-KV and context
// parallelism rarely merge more in one step.
constexpr int kMaxStates = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
}  // namespace

// The parameter block; cuflash/ops.py (merge_states) packs the same bytes.
struct MergeState {
    const void* out;
    const float* lse;
    i64 out_stride[4];  // batch, row, head, column
    i64 lse_stride[3];  // batch, head, row
};
struct MergeParams {
    MergeState state[kMaxStates];
    void* out;
    float* lse;
    i64 out_stride[4];
    i64 lse_stride[3];
    int n, batch, seqlen, heads, cols;
};
extern "C" __device__ const int cf_merge_params_bytes = sizeof(MergeParams);
extern "C" __device__ const int cf_merge_max_states = kMaxStates;

template <int kType>
__device__ __forceinline__ float load_element(const void* base, i64 offset) {
    if (kType == 2) return ((const float*)base)[offset];
    const u16 x = ((const u16*)base)[offset];
    return kType == CF_BF16 ? bf16_to_float(x) : fp16_to_float(x);
}

template <int kType>
__device__ __forceinline__ void store_element(void* base, i64 offset, float v) {
    if (kType == 2) {
        ((float*)base)[offset] = v;
        return;
    }
    ((u16*)base)[offset] = kType == CF_BF16 ? float_to_bf16(v) : float_to_fp16(v);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

extern "C" __global__ void __launch_bounds__(kThreads) merge_attention_states(const MergeParams p) {
    const int lane = threadIdx.x & 31;
    const i64 rows = (i64)p.batch * p.seqlen * p.heads;
    const i64 step = (i64)gridDim.x * kWarps;
    for (i64 r = (i64)blockIdx.x * kWarps + (threadIdx.x >> 5); r < rows; r += step) {
        const int h = (int)(r % p.heads);
        const i64 bs = r / p.heads;
        const int s = (int)(bs % p.seqlen);
        const int b = (int)(bs / p.seqlen);
        // Lane i holds state i's LSE in log2 units, -inf for a state that saw no key. The states are
        // indexed with compile-time constants only: a runtime index into the parameter block would copy it
        // to local memory.
        float l2 = -CF_INF;
#pragma unroll
        for (int i = 0; i < kMaxStates; ++i) {
            if (i < p.n && lane == i) {
                const MergeState& st = p.state[i];
                const float x = st.lse[b * st.lse_stride[0] + h * st.lse_stride[1] + s * st.lse_stride[2]];
                l2 = x == CF_INF ? -CF_INF : x * kLog2e;
            }
        }
        const float m = warp_max(l2);
        const bool empty = m == -CF_INF;
        const float w = empty ? 0.f : exp2_approx(l2 - m);  // ex2(-inf) = 0: states without keys
        const float total = warp_sum(w);
        const float scale = empty ? 0.f : 1.f / total;
        // Every lane takes every weight before the column loop, whose trip count differs between lanes.
        float weight[kMaxStates];
#pragma unroll
        for (int i = 0; i < kMaxStates; ++i) weight[i] = __shfl_sync(0xffffffffu, w, i) * scale;
        for (int c = lane; c < p.cols; c += 32) {
            // Every state's element is loaded before any is used, so the loads are in flight together: loaded
            // under `wi > 0` they issued one after another, a memory latency each (16 x 4 of them took the
            // 16 us that merging 16 split-KV states of 32 rows took on the H200, for 256 KB read).
            float x[kMaxStates];
#pragma unroll
            for (int i = 0; i < kMaxStates; ++i) {
                if (i < p.n) {
                    const MergeState& st = p.state[i];
                    x[i] = load_element<CF_MERGE_IN>(st.out, b * st.out_stride[0] + s * st.out_stride[1] +
                                                                 h * st.out_stride[2] + c * st.out_stride[3]);
                }
            }
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < kMaxStates; ++i)
                if (i < p.n && weight[i] > 0.f) acc += weight[i] * x[i];  // (a weight-0 row may hold NaN)
            store_element<CF_MERGE_OUT>(p.out, b * p.out_stride[0] + s * p.out_stride[1] + h * p.out_stride[2] +
                                                   c * p.out_stride[3], acc);
        }
        if (lane == 0)
            p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + s * p.lse_stride[2]] =
                empty ? CF_INF : (m + log2_approx(total)) * kLn2;
    }
}
