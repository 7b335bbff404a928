// Row addressing that a kernel writes once for its dense and its variable-length build (CF_VARLEN).
// The including kernel defines CF_SEQ_BATCH, an expression of the parameter block `p` giving its batch
// index (rebuilt where it is used, like BlockCoords), and in its variable-length build declares
// `const SeqContext seq(p, b)` before using the lengths.
//   CF_SEQLEN_Q / CF_SEQLEN_K        this sequence's rows that take part (dense: p.seqlen_q / p.seqlen_k);
//   ptr CF_FIRST_ROW(cu, total, s)   appended to a base pointer: its sequence's first row times stride p.s
//                                    (dense: nothing; batch strides place the sequence);
//   CF_ROW_STATS(base, b, h)         LSE-shaped fp32 rows (lse, delta) of (b, h): (batch, heads_q, seqlen_q)
//                                    dense, (heads_q, total_q) variable-length (FlashAttention-2's layouts);
//   CF_ACCUM_ROW(b, i)               row of query i of sequence b in the fp32 dQ accumulator (dense:
//                                    (batch, seqlen_q, ...), variable-length: (total_q, ...)).
// Preprocessor-conditional so that the dense build is the code it was without variable-length support:
// as constant-false C++ branches ptxas scheduled the dense sm80 forward differently and one head-dim-64
// variant spilled 4 bytes.
#pragma once
#include "attention/params.cuh"

#include "attention/build_flags.cuh"
#if CF_VARLEN
#include "attention/seq_context.cuh"
#define CF_SEQLEN_Q seq.seqlen_q
#define CF_SEQLEN_K seq.seqlen_k
#define CF_FIRST_ROW(cu, total, stride) + (i64)seq_first_row(p.cu, p.total, CF_SEQ_BATCH) * p.stride
#define CF_ROW_STATS(base, b, h) ((base) + (i64)(h) * p.varlen_lse_head_stride + seq_first_row(p.cu_seqlens_q, p.total_q, b))
#define CF_ACCUM_ROW(b, i) ((i64)seq_first_row(p.cu_seqlens_q, p.total_q, b) + (i))
#else
#define CF_SEQLEN_Q p.seqlen_q
#define CF_SEQLEN_K p.seqlen_k
#define CF_FIRST_ROW(cu, total, stride)
#define CF_ROW_STATS(base, b, h) ((base) + ((i64)(b) * p.heads_q + (h)) * p.seqlen_q)
#define CF_ACCUM_ROW(b, i) ((i64)(b) * p.seqlen_q + (i))
#endif
