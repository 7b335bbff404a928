// Copies a strided 4-D view of 16-bit elements into another, zero-filling the columns the source lacks.
//
// The attention kernels move rows in 16-byte chunks (cp.async, TMA), so they need a unit last stride,
// 16-byte aligned rows and a head dim that is a multiple of 8. An input that has none of these (a view with
// a non-unit last stride, rows off 16-byte boundaries, head dim 59) is copied once into a contiguous
// (batch, seqlen, heads, width) buffer with width = head dim rounded up to 8 and the extra columns zero,
// which leaves q.k and P.V unchanged; the output is copied back, cropped to the caller's head dim. Element
// by element, because such sources have no alignment to vectorise on: this is a copy of O(seqlen * head_dim)
// bytes next to an O(seqlen^2 * head_dim) kernel.
//
// Defines: CF_WARPS (warps per CTA). grid: any 1-D size (a grid-stride loop over rows); block: CF_WARPS
// warps, each copying one row at a time.
// rows = shape[0] * shape[1] * shape[2]; dst[b, s, h, c] = c < src_cols ? src[b, s, h, c] : 0 for
// c < shape[3]. Strides are in elements and may be zero or negative (the caller's view, unchanged).
#include "ptx/types.cuh"

namespace {
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
}  // namespace

// One row: dst[c] = c < src_cols ? src[c * src_col_stride] : 0 for c < cols, a warp's lanes striding c.
__device__ __forceinline__ void copy_row(const u16* in, u16* out, int cols, int src_cols, i64 src_col_stride,
                                         int lane) {
    for (int c = lane; c < cols; c += 32) out[c] = c < src_cols ? in[c * src_col_stride] : (u16)0;
}

extern "C" __global__ void __launch_bounds__(kThreads)
strided_copy_16bit(const u16* __restrict__ src, u16* __restrict__ dst, int batch, int seqlen, int heads, int cols,
                   int src_cols, i64 src_batch_stride, i64 src_row_stride, i64 src_head_stride, i64 src_col_stride,
                   i64 dst_batch_stride, i64 dst_row_stride, i64 dst_head_stride) {
    const i64 rows = (i64)batch * seqlen * heads;
    const int lane = threadIdx.x & 31;
    const i64 first = (i64)blockIdx.x * kWarps + (threadIdx.x >> 5), step = (i64)gridDim.x * kWarps;
    // Splitting a row index into (b, s, h) is two divisions per row, about as many instructions as copying
    // a 64-element row; 64-bit ones are ~5x dearer than 32-bit ones (the copy ran at 0.5 TB/s with them on
    // an H200), so below 2^31 rows the split is 32-bit.
    if (rows + step <= 0x7fffffff) {
        for (int r = (int)first; r < (int)rows; r += (int)step) {
            const int h = r % heads, bs = r / heads, s = bs % seqlen, b = bs / seqlen;
            copy_row(src + b * src_batch_stride + s * src_row_stride + h * src_head_stride,
                     dst + b * dst_batch_stride + s * dst_row_stride + h * dst_head_stride, cols, src_cols,
                     src_col_stride, lane);
        }
        return;
    }
    for (i64 r = first; r < rows; r += step) {
        const int h = (int)(r % heads);
        const i64 bs = r / heads;
        const int s = (int)(bs % seqlen);
        const int b = (int)(bs / seqlen);
        copy_row(src + b * src_batch_stride + s * src_row_stride + h * src_head_stride,
                 dst + b * dst_batch_stride + s * dst_row_stride + h * dst_head_stride, cols, src_cols,
                 src_col_stride, lane);
    }
}
