// Rotary position embedding (RoPE) of a (batch, seqlen, heads, head_dim) 16-bit array into a contiguous copy,
// for cuflash.attention_with_kvcache on the GPU (its rotary_cos / rotary_sin): the first 2 * half columns
// rotate by the angle of their row's position, the rest are copied.
//
//   position of row i of sequence b: base[b] + (per_row ? i : 0),  base[b] = cache_seqlens[b] - leftpad[b]
//   interleaved (GPT-J): pairs (2j, 2j + 1);  not (GPT-NeoX): pairs (j, j + half);  j < half
//   (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) with cos / sin = tables[position, j]
//
// computed in fp32 from the 16-bit inputs and tables, rounded once. Positions are clamped to the tables'
// rows, so no value of cache_seqlens reads outside them (the host cannot check device values).
//
// Defines: CF_DTYPE (fp16 / bf16 of x, the tables and the output), CF_WARPS. grid: any 1-D size.
#include "ptx/types.cuh"

namespace {
constexpr int kThreads = CF_WARPS * 32;
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
rotary_embedding(u16* __restrict__ out, const u16* __restrict__ x, const u16* __restrict__ cos_table,
                 const u16* __restrict__ sin_table, const int* __restrict__ cache_seqlens, int cache_seqlens_value,
                 const int* __restrict__ leftpad, int per_row, int interleaved, int batch, int seqlen, int heads,
                 int head_dim, int half, int table_rows, i64 table_row_stride, i64 x_batch, i64 x_row, i64 x_head) {
    const i64 total = (i64)batch * seqlen * heads * head_dim;
    for (i64 e = (i64)blockIdx.x * kThreads + threadIdx.x; e < total; e += (i64)gridDim.x * kThreads) {
        const int c = (int)(e % head_dim);
        const i64 row = e / head_dim;  // (b, i, h) in row-major order: out is contiguous
        const int h = (int)(row % heads);
        const int i = (int)(row / heads % seqlen);
        const int b = (int)(row / ((i64)heads * seqlen));
        const u16* src = x + b * x_batch + i * x_row + h * x_head;
        if (c >= 2 * half) {
            out[e] = src[c];
            continue;
        }
        const int j = interleaved ? c >> 1 : (c < half ? c : c - half);
        const bool first = interleaved ? (c & 1) == 0 : c < half;
        const int partner = interleaved ? c ^ 1 : (first ? c + half : c - half);
        const int base = (cache_seqlens != nullptr ? cache_seqlens[b] : cache_seqlens_value)
                         - (leftpad != nullptr ? leftpad[b] : 0);
        const int pos = min(max(base + (per_row ? i : 0), 0), table_rows - 1);
        const float cs = to_float(cos_table[(i64)pos * table_row_stride + j]);
        const float sn = to_float(sin_table[(i64)pos * table_row_stride + j]);
        const float a = to_float(src[first ? c : partner]), b2 = to_float(src[first ? partner : c]);
        out[e] = from_float(first ? a * cs - b2 * sn : a * sn + b2 * cs);
    }
}
