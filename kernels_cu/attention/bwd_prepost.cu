// Pre- and post-processing of the FlashAttention-2 backward. Defines: CF_DTYPE, CF_HEAD_DIM (padded head dim,
// a multiple of 64: the dq_accum row length), CF_VARLEN (optional: variable-length batches, rows addressed
// through seq_rows.cuh; the grid covers max_seqlen_q rows a sequence and CTAs past a sequence's end return).
// The real p.head_dim must be a multiple of 8 (16-byte rows).
//
// Both kernels: grid = ceil(seqlen_q / 64) * batch * heads_q CTAs (1-D),
//   blockIdx.x = m_block * (batch * heads_q) + b * heads_q + h;  block = 256 threads;  no shared memory.
//   Eight threads share a row (each takes 16-byte chunks c, c + 8, ... of it), 32 rows at a time.
//
// attention_bwd_preprocess
//   Reads : o, dout (o_*, do_* strides), head_dim, seqlen_q, batch, heads_q.
//   Writes: delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (fp32, laid out like lse) for i < seqlen_q;
//           when p.dq_accum != nullptr, zeroes dq_accum[b, i, h, 0 .. CF_HEAD_DIM) for the same rows
//           (so dq_accum needs no separate memset; pass nullptr in the sm80 deterministic mode); when
//           p.dq_semaphore != nullptr, zeroes the turn counter of this 64-row block (bwd_sm90.cu).
// attention_bwd_postprocess
//   Reads : dq_accum (unscaled fp32), softmax_scale.  Writes: dq (dq_* strides) = 16-bit(dq_accum * scale),
//           rows < seqlen_q, cols < head_dim.
//
// dq_accum column order: within each 16-column group of a row, column 8h + 2t + e (h, e in {0, 1}, t < 4)
// is stored at float 4t + 2h + e. That is the pair of columns one lane of an mma m16n8k16 accumulator holds
// in each of the group's two n8 tiles (C fragment: row g, cols 2t..2t+1), so the main kernel adds them with
// one 16-byte atomic (red.global.add.v4.f32 on sm_90) instead of two 8-byte ones.
#include "ptx/types.cuh"
#include "attention/params.cuh"
#include "attention/bwd_common.cuh"
#define CF_SEQ_BATCH RowCoords(p).b
#include "attention/seq_rows.cuh"

namespace {
constexpr int kD = CF_HEAD_DIM;
constexpr int kRows = 64;
constexpr int kThreads = 256;
static_assert(kD % 64 == 0, "CF_HEAD_DIM must be a multiple of 64");
static_assert(kRows == kDqTurnRows, "each CTA zeroes the one turn counter of its rows");
}  // namespace

struct RowCoords {
    int m_block, b, h;
    __device__ __forceinline__ explicit RowCoords(const AttentionParams& p) {
        const int bh_count = p.batch * p.heads_q;
        m_block = (int)(blockIdx.x / bh_count);
        const int bh = blockIdx.x % bh_count;
        b = bh / p.heads_q;
        h = bh % p.heads_q;
    }
};

__device__ __forceinline__ float dot2(u32 a, u32 b) {
    return to_float((u16)(a & 0xffffu)) * to_float((u16)(b & 0xffffu)) + to_float((u16)(a >> 16)) * to_float((u16)(b >> 16));
}

extern "C" __global__ void __launch_bounds__(kThreads)
attention_bwd_preprocess(const __grid_constant__ AttentionParams p) {
    const RowCoords rc(p);
    const int tid = threadIdx.x, sub = tid & 7;
#if CF_VARLEN
    const SeqContext seq(p, rc.b);
    if (rc.m_block * kRows >= seq.seqlen_q) return;  // past this sequence's rows
#endif
    const u16* o = (const u16*)p.o + (i64)rc.b * p.o_batch_stride + (i64)rc.h * p.o_head_stride
                   CF_FIRST_ROW(cu_seqlens_q, total_q, o_row_stride);
    const u16* dout = (const u16*)p.dout + (i64)rc.b * p.do_batch_stride + (i64)rc.h * p.do_head_stride
                      CF_FIRST_ROW(cu_seqlens_q, total_q, do_row_stride);
    if (p.dq_semaphore != nullptr && tid == 0) *dq_turn_counter(p, rc.b, rc.h, rc.m_block * kRows) = 0;
#pragma unroll
    for (int pass = 0; pass < kRows / (kThreads / 8); ++pass) {
        const int i = rc.m_block * kRows + pass * (kThreads / 8) + (tid >> 3);
        const bool valid = i < CF_SEQLEN_Q;
        float acc = 0.f;
#pragma unroll
        for (int c = sub; c < kD / 8; c += 8) {
            const int col = c * 8;
            if (valid && col < p.head_dim) {
                const uint4 a = *(const uint4*)(o + (i64)i * p.o_row_stride + col);
                const uint4 d = *(const uint4*)(dout + (i64)i * p.do_row_stride + col);
                acc += dot2(a.x, d.x) + dot2(a.y, d.y) + dot2(a.z, d.z) + dot2(a.w, d.w);
            }
        }
        // The 8 threads of a row are 8 consecutive lanes: reduce with xor-shuffles 1, 2, 4 (all lanes take part).
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        if (valid) {
            if (sub == 0) CF_ROW_STATS(p.delta, rc.b, rc.h)[i] = acc;
            if (p.dq_accum != nullptr) {
                float4* dst = (float4*)(p.dq_accum + (CF_ACCUM_ROW(rc.b, i) * p.heads_q + rc.h) * kD);
#pragma unroll
                for (int c = sub; c < kD / 4; c += 8) dst[c] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
attention_bwd_postprocess(const __grid_constant__ AttentionParams p) {
    const RowCoords rc(p);
    const int tid = threadIdx.x, sub = tid & 7;
#if CF_VARLEN
    const SeqContext seq(p, rc.b);
    if (rc.m_block * kRows >= seq.seqlen_q) return;
#endif
    const float scale = p.softmax_scale;
    u16* dq = (u16*)p.dq + (i64)rc.b * p.dq_batch_stride + (i64)rc.h * p.dq_head_stride
              CF_FIRST_ROW(cu_seqlens_q, total_q, dq_row_stride);
#pragma unroll
    for (int pass = 0; pass < kRows / (kThreads / 8); ++pass) {
        const int i = rc.m_block * kRows + pass * (kThreads / 8) + (tid >> 3);
        if (i >= CF_SEQLEN_Q) continue;
        const float* src = p.dq_accum + (CF_ACCUM_ROW(rc.b, i) * p.heads_q + rc.h) * kD;
        // Columns 8h..8h+7 of a 16-column group are the pairs at floats 2h, 4 + 2h, 8 + 2h, 12 + 2h of it.
#pragma unroll
        for (int c = sub; c < kD / 8; c += 8) {
            const int col = c * 8;
            if (col < p.head_dim) {
                const float* grp = src + (col & ~15) + (c & 1) * 2;
                u32 r[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 x = *(const float2*)(grp + 4 * j);
                    r[j] = pack2(x.x * scale, x.y * scale);
                }
                *(uint4*)(dq + (i64)i * p.dq_row_stride + col) = make_uint4(r[0], r[1], r[2], r[3]);
            }
        }
    }
}
