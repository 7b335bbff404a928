// Defaults of the optional build flags that several attention kernels share; cuflash/dispatch.py defines
// the ones a variant sets (KernelKey.extra).
//   CF_VARLEN    variable-length batches: rows from cu_seqlens / seqused (seq_context.cuh)
//   CF_SPLIT_KV  split-KV decoding: fp32 partial states for merge_states.cu
//   CF_PAGED     keys and values read through a block table (KV caches in pages)
//   CF_DROPOUT   attention dropout (philox.cuh's draws)
//   CF_ATTN_MASK an element mask (attn_mask.cuh): 1 boolean (True = attend), 2 additive in q's dtype
//   CF_MASK_STAGE a boolean mask staged in shared memory by 16-byte copies (its rows 16-byte aligned)
//   CF_BLOCK_SPARSE block sparsity: tiles from per-tile lists, partial blocks' masks (block_sparse.cuh)
#pragma once

#ifndef CF_VARLEN
#define CF_VARLEN 0
#endif
#ifndef CF_SPLIT_KV
#define CF_SPLIT_KV 0
#endif
#ifndef CF_PAGED
#define CF_PAGED 0
#endif
#ifndef CF_DROPOUT
#define CF_DROPOUT 0
#endif
#ifndef CF_ATTN_MASK
#define CF_ATTN_MASK 0
#endif
#ifndef CF_MASK_STAGE
#define CF_MASK_STAGE 0
#endif
#ifndef CF_BLOCK_SPARSE
#define CF_BLOCK_SPARSE 0
#endif
