"""The attention kernels' launch parameter block, ``struct AttentionParams``: the one description of it.

``kernels_cu/attention/params.cuh`` is generated from :data:`FIELDS` (``python -m cuflash.params_layout``
rewrites it; tests/test_params_layout.py fails when the checked-in header is stale and compares every
field's offset in the compiled struct with :data:`OFFSETS`), and ``ops.py`` packs the block with
:data:`STRUCT`. The 8-byte fields come first and each group is homogeneous, except the variable-length
fields appended at the end (which start on an 8-byte boundary), so the C layout has no padding and a packed
little-endian struct reproduces it byte for byte.
"""

from __future__ import annotations

import struct
import sys
import textwrap
from pathlib import Path

import numpy as np

# (C type, struct code, NumPy dtype) of each field kind.
_KINDS = {
    "ptr": (None, "Q", np.uint64),
    "i64": ("i64", "q", np.int64),
    "u64": ("u64", "Q", np.uint64),
    "i32": ("int", "i", np.int32),
    "f32": ("float", "f", np.float32),
}

_STRIDED = ["q", "k", "v", "o", "do", "dq", "dk", "dv"]

# (name, kind, C pointer type for pointers, comment). Order is layout order.
FIELDS = [
    ("q", "ptr", "const void*", "16-bit (batch, seqlen_q, heads_q, head_dim) view, strides below"),
    ("k", "ptr", "const void*", ""),
    ("v", "ptr", "const void*", ""),
    ("o", "ptr", "void*", "forward output, 16-bit"),
    ("lse", "ptr", "float*", "(batch, heads_q, seqlen_q), contiguous"),
    ("alibi", "ptr", "const float*", "slopes, row `b` at alibi + b * alibi_batch_stride; null without ALiBi"),
    ("dout", "ptr", "const void*", "backward input, 16-bit"),
    ("delta", "ptr", "float*", "backward: rowsum(dO * O), laid out like lse"),
    ("dq_accum", "ptr", "float*", "backward: fp32 (batch, seqlen_q, heads_q, head_dim_padded), contiguous"),
    ("dq", "ptr", "void*", ""),
    ("dk", "ptr", "void*", ""),
    ("dv", "ptr", "void*", ""),
    ("tile_counter", "ptr", "int*", "Hopper forward, persistent launch: next work tile, zero at launch"),
    *((f"{t}_{w}_stride", "i64", None, "strides in elements, 64-bit: tensors past 2^31 elements index correctly"
       if (t, w) == ("q", "batch") else "") for t in _STRIDED for w in ("batch", "row", "head")),
    ("alibi_batch_stride", "i64", None, ""),
    ("batch", "i32", None, ""),
    ("heads_q", "i32", None, ""),
    ("heads_k", "i32", None, ""),
    ("seqlen_q", "i32", None, "dense: every sequence's length; variable-length: the max_seqlen bounds"),
    ("seqlen_k", "i32", None, ""),
    ("head_dim", "i32", None, ""),
    ("window_left", "i32", None, "visible keys of query i: [i + off - window_left, i + off + window_right], "
                                 "off = seqlen_k - seqlen_q; \"unbounded\" arrives as seqlen_q + seqlen_k"),
    ("window_right", "i32", None, ""),
    ("softmax_scale", "f32", None, ""),
    ("scale_log2", "f32", None, "multiplier of the raw scores inside exp2 (see online_softmax.cuh)"),
    ("softcap", "f32", None, ""),
    ("num_m_blocks", "i32", None, ""),
    ("num_n_blocks", "i32", None, ""),
    ("bh_group", "i32", None, "Hopper forward: (batch, head) pairs per launch-order group (block_coords.cuh)"),
    # Variable-length batches (seq_context.cuh), appended so that every field above keeps its offset and
    # the dense kernels compile to the code they had without them (the 8-byte fields start 8-aligned).
    ("total_q", "i32", None, "rows of the packed q / k views"),
    ("total_k", "i32", None, ""),
    ("cu_seqlens_q", "ptr", "const int*", "(batch + 1,) first rows of the sequences; null when dense"),
    ("cu_seqlens_k", "ptr", "const int*", ""),
    ("seqused_q", "ptr", "const int*", "(batch,) rows of each sequence that take part; null: all"),
    ("seqused_k", "ptr", "const int*", ""),
    ("varlen_lse_head_stride", "i64", None, "the (heads_q, total_q) LSE: head h at lse + h * this"),
    ("dq_semaphore", "ptr", "int*", "deterministic Hopper backward: (batch, heads_q, ceil(seqlen_q / 64)) turn "
                                    "counters, zeroed by the preprocess"),
    # Split-KV forward (fwd_sm80.cu, CF_SPLIT_KV; gridDim.y splits): each split's normalized partial output
    # and LSE, merged after by merge_states.cu.
    ("o_accum", "ptr", "float*", "split-KV: fp32 (splits, batch * seqlen_q, heads_q, head_dim_padded) partial "
                                 "outputs, query i of sequence b at row b * seqlen_q + i"),
    ("lse_accum", "ptr", "float*", "split-KV: (splits, heads_q, batch * seqlen_q) partial LSEs"),
    ("o_accum_split_stride", "i64", None, "elements from one split's partial outputs to the next's"),
    ("lse_accum_split_stride", "i64", None, ""),
    # Paged K/V (fwd_sm80.cu, CF_PAGED): key row r of sequence b is row r % page_size of page
    # block_table[b * block_table_batch_stride + r / page_size] of the k / v views' rows (pages back to back).
    ("block_table", "ptr", "const int*", "(batch, max_pages) page indices; null when not paged"),
    ("block_table_batch_stride", "i64", None, ""),
    ("page_size", "i32", None, "rows of a page, any size >= 1"),
    ("num_pages", "i32", None, "pages in the caches: page indices are clamped to [0, num_pages)"),
    # Split-KV in the Hopper forward (fwd_sm90.cu, CF_SPLIT_KV): its persistent CTAs take (query tile,
    # split) work tiles, so the count comes as a field (fwd_sm80.cu's split build reads gridDim.y).
    ("num_splits", "i32", None, "split-KV: work tiles sharing one query tile's key tiles"),
    ("page_shift", "i32", None, "paged: log2(page_size) for a power-of-two page size (a shift and a mask per "
                                "row instead of a division), else -1"),
    # Attention dropout (CF_DROPOUT; philox.cuh draws what cuflash/dropout.py draws): the generator's key
    # and counter offset, given per call; the keep threshold and the kept values' scale, per plan.
    ("dropout_seed", "u64", None, "Philox key (seed mod 2^32, (seed >> 32) ^ (offset >> 32))"),
    ("dropout_offset", "u64", None, "Philox counter word 3 (offset mod 2^32)"),
    ("dropout_threshold", "i32", None, "a 16-bit draw below this keeps its element: round((1 - p) * 65536)"),
    ("dropout_scale", "f32", None, "1 / (1 - p), applied to the kept probabilities"),
    # An element mask (CF_ATTN_MASK, attn_mask.cuh): element (b, h, i, j) at attn_mask + b * mask_batch_stride
    # + h * mask_head_stride + i * mask_row_stride + j * mask_col_stride (elements; 0 where broadcast).
    ("attn_mask", "ptr", "const void*", "bool bytes or q's 16-bit dtype; null without a mask"),
    ("mask_batch_stride", "i64", None, ""),
    ("mask_head_stride", "i64", None, ""),
    ("mask_row_stride", "i64", None, ""),
    ("mask_col_stride", "i64", None, ""),
    # Block sparsity (CF_BLOCK_SPARSE, block_mask.py's kernel tables): per (batch, head, tile) a list of the
    # tiles to visit with the index of each one's partial-block mask (-1: a full block, no element mask), the
    # masks bool (P, block_q, mask_row_stride) at attn_mask. Lists, strides and lengths are a mask's own:
    # ops.py writes them per call (8-byte fields, as pointers are).
    ("block_lists", "ptr", "const int2*", "row r at block_lists + r * block_list_len; r = b * block_batch_stride "
                                          "+ h * block_head_stride + tile"),
    ("block_counts", "ptr", "const int*", "entries of each row"),
    ("block_batch_stride", "i64", None, "rows; 0 where the lists broadcast"),
    ("block_head_stride", "i64", None, ""),
    ("block_list_len", "i64", None, "entries a row holds"),
    ("block_q", "i64", None, "query rows of a partial-block mask (the plan's; the fields above are the call's)"),
    ("block_order", "ptr", "const int*", "launch order, heaviest lists first: work tile / CTA i takes grid cell "
                                         "block_order[i] = (b * heads + h) * tiles + tile"),
    # Dropout's (seed, offset) as a device array that the kernels read when they run (philox.cuh,
    # dropout_seed), so that a captured CUDA graph draws new masks as the array changes between replays.
    ("dropout_rng", "ptr", "const u64*", "(seed, offset) in place of dropout_seed / dropout_offset; null: those"),
]

NAMES = [f[0] for f in FIELDS]
INDEX = {name: i for i, name in enumerate(NAMES)}
STRUCT = struct.Struct("<" + "".join(_KINDS[kind][1] for _, kind, _, _ in FIELDS))
DTYPE = np.dtype([(name, _KINDS[kind][2]) for name, kind, _, _ in FIELDS], align=True)
OFFSETS = {name: DTYPE.fields[name][1] for name in NAMES}
FLOAT_FIELDS = [name for name, kind, _, _ in FIELDS if kind == "f32"]
assert DTYPE.itemsize == STRUCT.size, "the field groups must leave no padding"



def header_path() -> Path:
    from .jit import kernel_root
    return kernel_root() / "attention" / "params.cuh"


def render_header() -> str:
    """The text of params.cuh."""
    lines = [
        "// GENERATED by cuflash/params_layout.py (python -m cuflash.params_layout): do not edit.",
        "// Launch parameters of the attention kernels, passed by value as one struct; ops.py packs the same",
        "// fields with params_layout.STRUCT, and tests/test_params_layout.py checks every offset.",
        "#pragma once",
        '#include "ptx/types.cuh"',
        "",
        "struct AttentionParams {",
    ]
    for name, kind, ptr_type, comment in FIELDS:
        ctype = ptr_type if kind == "ptr" else _KINDS[kind][0]
        decl = f"    {ctype} {name};"
        if comment and len(decl) + len(comment) > 100:  # a long comment goes above its field, wrapped
            lines += [f"    // {line}" for line in textwrap.wrap(comment, 100)]
            lines.append(decl)
        else:
            lines.append(f"{decl:<32}// {comment}" if comment else decl)
    lines += [
        "};",
        "",
        "// Exported so that a GPU test can check the host's mirror of this struct byte for byte in size.",
        'extern "C" __device__ const int cf_params_bytes = sizeof(AttentionParams);',
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    path = header_path()
    path.write_text(render_header())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
