// Merges partial attention states over disjoint key sets into the state over their union (the split-KV
// combine of FlashAttention and FlashInfer's state merge; cuflash.merge_attention_states):
//     lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i,
// in fp32 whatever the element types. A state whose LSE is +inf saw no key (cuflash's convention): it has
// weight 0 and its out row is never read (0 x NaN would be NaN); a row that no state saw stays 0, LSE +inf.
//
// One CTA a (batch, row, head): warp 0 reduces the states' LSEs to their weights, then the CTA's threads
// take the row's (state, column) elements, kChunk columns at a time, all of a thread's loads issued before
// any is used, and sum each column's weighted elements through shared memory. (One warp a row, each lane
// looping over the states, issued the loads of a column one state after another: merging 16 split-KV
// states of 32 rows of 128 columns took 10-16 us on the H200 for 256 KB read, 0.4-0.6 us a state.)
// Strides are in elements, per state, so any views merge without copies. Up to kMaxStates states a launch,
// their pointers in the parameter block; the host merges more in rounds through fp32 states.
//
// Defines: CF_WARPS (warps per CTA), CF_MERGE_IN and CF_MERGE_OUT (element types of the states' and the
// merged out: 0 fp16, 1 bf16, 2 fp32). grid: any 1-D size (a grid-stride loop over rows, one at a time).
#include "ptx/types.cuh"
#include "ptx/math.cuh"

namespace {
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
// 16 states: 16 x 72 bytes of parameters (of the 4 KB a launch may pass), and split-KV and context
// parallelism rarely merge more in one step.
constexpr int kMaxStates = 16;
// Columns merged per pass: a head dim of 128 in one, the (state, column) partial sums 8 KB of shared memory.
constexpr int kChunk = 128;
constexpr int kItemsPerThread = kMaxStates * kChunk / kThreads;
static_assert(kMaxStates * kChunk % kThreads == 0, "the items of a pass must split evenly over the threads");
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
    __shared__ MergeState state[kMaxStates];
    __shared__ float weight[kMaxStates];
    __shared__ float partial[kMaxStates][kChunk];
    __shared__ float row_lse;
    const int tid = threadIdx.x, lane = tid & 31;
    // The states' descriptors to shared memory, where a thread may index them at run time (a runtime index
    // into the parameter block would copy it to local memory): each copied with a compile-time index.
#pragma unroll
    for (int i = 0; i < kMaxStates; ++i)
        if (tid == i && i < p.n) state[i] = p.state[i];
    __syncthreads();
    const i64 rows = (i64)p.batch * p.seqlen * p.heads;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const int h = (int)(r % p.heads);
        const i64 bs = r / p.heads;
        const int s = (int)(bs % p.seqlen);
        const int b = (int)(bs / p.seqlen);
        if (tid < 32) {
            // Lane i holds state i's LSE in log2 units, -inf for a state that saw no key.
            float l2 = -CF_INF;
            if (lane < p.n) {
                const MergeState& st = state[lane];
                const float x = st.lse[b * st.lse_stride[0] + h * st.lse_stride[1] + s * st.lse_stride[2]];
                l2 = x == CF_INF ? -CF_INF : x * kLog2e;
            }
            const float m = warp_max(l2);
            const bool empty = m == -CF_INF;
            const float w = empty ? 0.f : exp2_approx(l2 - m);  // ex2(-inf) = 0: states without keys
            const float total = warp_sum(w);
            if (lane < kMaxStates) weight[lane] = empty ? 0.f : w / total;
            if (lane == 0) row_lse = empty ? CF_INF : (m + log2_approx(total)) * kLn2;
        }
        __syncthreads();
        for (int c0 = 0; c0 < p.cols; c0 += kChunk) {
            // Item tid + k * kThreads is column item % kChunk (of this pass) of state item / kChunk.
            float x[kItemsPerThread];
#pragma unroll
            for (int k = 0; k < kItemsPerThread; ++k) {
                const int item = tid + k * kThreads, i = item / kChunk, c = c0 + item % kChunk;
                x[k] = 0.f;
                if (i < p.n && c < p.cols && weight[i] > 0.f) {
                    const MergeState& st = state[i];
                    x[k] = load_element<CF_MERGE_IN>(st.out, b * st.out_stride[0] + s * st.out_stride[1] +
                                                                 h * st.out_stride[2] + c * st.out_stride[3]);
                }
            }
#pragma unroll
            for (int k = 0; k < kItemsPerThread; ++k) {
                const int item = tid + k * kThreads, i = item / kChunk;
                if (i < p.n) partial[i][item % kChunk] = weight[i] * x[k];  // 0 for a weight-0 state
            }
            __syncthreads();
            for (int c = tid; c < kChunk && c0 + c < p.cols; c += kThreads) {
                float acc = 0.f;
                for (int i = 0; i < p.n; ++i) acc += partial[i][c];
                store_element<CF_MERGE_OUT>(p.out, b * p.out_stride[0] + s * p.out_stride[1] + h * p.out_stride[2] +
                                                       (i64)(c0 + c) * p.out_stride[3], acc);
            }
            __syncthreads();
        }
        if (tid == 0) p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + s * p.lse_stride[2]] = row_lse;
    }
}
