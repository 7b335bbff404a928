// The KV-cache step before attention (cuflash.attention_with_kvcache on the GPU): appends the new keys and
// values of each sequence into its cache rows in place, and writes the variable-length indices with which
// the variable-length forward then attends over the caches (no host synchronization: cache_seqlens and
// cache_leftpad stay on the device).
//
//   k_cache[b, cache_seqlens[b] + t] = k_new[b, t]   (and v), for t < seqlen_new, rows past the cache dropped
//   cu_q[i] = i * seqlen_q,  cu_k[i] = i * seqlen_cache + leftpad[i],  cu_k[batch] = batch * seqlen_cache
//   seqused_k[b] = min(cache_seqlens[b] + seqlen_new, seqlen_cache) - leftpad[b]   (clamped to >= 0)
//   seqused_q[b] = seqused_q_value   (when seqused_q is not null: decoding's packed query heads, api.py's
//                                      decode_groups rows of each sequence; one launch fewer than a fill)
//
// so that sequence b's keys are rows [leftpad[b], cache_seqlens[b] + seqlen_new) of its cache row and its
// queries bottom-right aligned to them; cu_k[b + 1] - cu_k[b] >= seqused_k[b] for any leftpad in [0, cache
// length], so the forward's clamps never cut a sequence short.
//
// Paged caches (block_table not null): position pos of sequence b is row pos % page_size of page
// block_table[b * bt_stride + pos / page_size] (clamped to [0, num_pages)), pages back to back at kc_row /
// vc_row strides; seqlen_cache is a sequence's capacity (block-table row length x page_size), no leftpad.
//
// Defines: CF_WARPS (warps per CTA). grid: any 1-D size (grid-stride loops); one warp a (b, t, head) row.
#include "ptx/types.cuh"

namespace {
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
kvcache_append(u16* __restrict__ k_cache, u16* __restrict__ v_cache, const u16* __restrict__ k_new,
               const u16* __restrict__ v_new, const int* __restrict__ cache_seqlens, int cache_seqlens_value,
               const int* __restrict__ leftpad, int* __restrict__ cu_q, int* __restrict__ cu_k,
               int* __restrict__ seqused_k, int* __restrict__ seqused_q, int seqused_q_value, int batch,
               int seqlen_q, int seqlen_new, int seqlen_cache, int heads,
               int head_dim, i64 kc_batch, i64 kc_row, i64 kc_head, i64 vc_batch, i64 vc_row, i64 vc_head,
               i64 kn_batch, i64 kn_row, i64 kn_head, i64 vn_batch, i64 vn_row, i64 vn_head,
               const int* __restrict__ block_table, i64 bt_stride, int page_size, int num_pages) {
    const i64 thread = (i64)blockIdx.x * kThreads + threadIdx.x, threads = (i64)gridDim.x * kThreads;
    for (i64 i = thread; i <= batch; i += threads) {
        const int b = (int)i;
        const int pad = b < batch && leftpad != nullptr ? max(leftpad[b], 0) : 0;
        cu_q[b] = b * seqlen_q;
        cu_k[b] = b * seqlen_cache + min(pad, seqlen_cache);
        if (b < batch) {
            const int cached = cache_seqlens != nullptr ? cache_seqlens[b] : cache_seqlens_value;
            seqused_k[b] = max(min(cached + seqlen_new, seqlen_cache) - pad, 0);
            if (seqused_q != nullptr) seqused_q[b] = seqused_q_value;
        }
    }
    const i64 rows = (i64)batch * seqlen_new * heads;
    const int lane = threadIdx.x & 31;
    for (i64 r = thread >> 5; r < rows; r += threads >> 5) {
        const int h = (int)(r % heads);
        const i64 bt = r / heads;
        const int t = (int)(bt % seqlen_new);
        const int b = (int)(bt / seqlen_new);
        const int pos = (cache_seqlens != nullptr ? cache_seqlens[b] : cache_seqlens_value) + t;
        if (pos < 0 || pos >= seqlen_cache) continue;  // past the cache: dropped (values are not checked here)
        i64 k_at = b * kc_batch + pos * kc_row, v_at = b * vc_batch + pos * vc_row;
        if (block_table != nullptr) {
            const i64 row = (i64)min(max(block_table[b * bt_stride + pos / page_size], 0), num_pages - 1) * page_size
                            + pos % page_size;
            k_at = row * kc_row;
            v_at = row * vc_row;
        }
        u16* kd = k_cache + k_at + h * kc_head;
        u16* vd = v_cache + v_at + h * vc_head;
        const u16* ks = k_new + b * kn_batch + t * kn_row + h * kn_head;
        const u16* vs = v_new + b * vn_batch + t * vn_row + h * vn_head;
        for (int c = lane; c < head_dim; c += 32) {
            kd[c] = ks[c];
            vd[c] = vs[c];
        }
    }
}
