// Launch parameters of the attention kernels, passed by value as one struct. cuflash/ops.py mirrors this
// layout field for field with a NumPy structured dtype (8-byte fields first, so there is no padding to
// disagree on); change both together.
#pragma once
#include "ptx/types.cuh"

struct AttentionParams {
    // Pointers: q, k, v, o (forward output) and do_ (backward input) are 16-bit; lse, delta, dq_accum fp32.
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;             // (batch, heads_q, seqlen_q), contiguous
    const float* alibi;     // slopes, row `b` at alibi + b * alibi_batch_stride; null without ALiBi
    const void* dout;
    float* delta;           // backward: rowsum(dO * O), laid out like lse
    float* dq_accum;        // backward: fp32 (batch, seqlen_q, heads_q, head_dim_padded), contiguous
    void* dq;
    void* dk;
    void* dv;
    int* tile_counter;      // Hopper forward, persistent launch: next work tile, zero at launch
    // Strides in elements, 64-bit so that tensors past 2^31 elements index correctly.
    i64 q_batch_stride, q_row_stride, q_head_stride;
    i64 k_batch_stride, k_row_stride, k_head_stride;
    i64 v_batch_stride, v_row_stride, v_head_stride;
    i64 o_batch_stride, o_row_stride, o_head_stride;
    i64 do_batch_stride, do_row_stride, do_head_stride;
    i64 dq_batch_stride, dq_row_stride, dq_head_stride;
    i64 dk_batch_stride, dk_row_stride, dk_head_stride;
    i64 dv_batch_stride, dv_row_stride, dv_head_stride;
    i64 alibi_batch_stride;
    int batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim;
    // Visible keys of query i: [i + off - window_left, i + off + window_right] with off = seqlen_k - seqlen_q;
    // "unbounded" arrives as seqlen_q + seqlen_k, which keeps every comparison in int range.
    int window_left, window_right;
    float softmax_scale;
    float scale_log2;       // multiplier of the raw scores inside exp2 (see online_softmax.cuh)
    float softcap;
    int num_m_blocks;
    int num_n_blocks;
    int bh_group;           // Hopper forward: (batch, head) pairs per launch-order group (block_coords.cuh)
};

// Exported so that a GPU test can check the host's mirror of this struct byte for byte in size.
extern "C" __device__ const int cf_params_bytes = sizeof(AttentionParams);
