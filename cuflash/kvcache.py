"""Inference with a KV cache (FlashAttention-2's ``flash_attn_with_kvcache``) and merging of partial
attention states.

:func:`attention_with_kvcache` appends the new keys and values (rotary embedding applied to them and to the
queries first) into the cache **in place** at each sequence's ``cache_seqlens``, then attends over the valid
part of the cache. The cache is contiguous ``(batch_cache, seqlen_cache, heads_k, head_dim)`` or paged
``(num_pages, page_size, heads_k, head_dim)`` with a ``block_table``, for any page size. :func:`merge_attention_states`
combines attention computed over disjoint key sets (split-KV, cascades, context parallelism) from their
outputs and natural-log LSEs.

The NumPy path (CPU arrays and CPU torch tensors) is complete. On GPU arrays the append and the merge are
kernels, and the attention runs the variable-length forward over the caches read in place (paged ones
through the block table, as cache_batch_idx's rows are; rotary embedding by a kernel first); leftpad with
paging or cache_batch_idx is CPU-path only so far.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import api, arrays, dispatch, executor, recording, reference

_GPU_NOT_IMPLEMENTED = ("{}: runs on the CPU (NumPy path) only so far; the GPU kernels are not implemented yet. "
                        "Pass CPU arrays")


def _np(x, name):
    """A NumPy view of a CPU array (NumPy or a CPU torch tensor), sharing its memory; GPU arrays raise."""
    fw = arrays.framework_of(x)
    if fw not in ("numpy", "torch") or arrays.device_of(x, fw) != "cpu":
        raise NotImplementedError(_GPU_NOT_IMPLEMENTED.format(name))
    if arrays.dtype_name(x, fw) == "bfloat16":
        raise TypeError(f"{name}: a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
    return np.asarray(api._to_numpy(x, fw)), fw


def _index_vector(name, x, batch, fw):
    if x is None:
        return None
    xn, xfw = _np(x, "cuflash.attention_with_kvcache")
    if xfw != fw and xfw != "numpy":
        raise TypeError(f"{name} is a {xfw} array but q is a {fw} array")
    if xn.dtype != np.int32:
        raise TypeError(f"{name} must be int32, got {xn.dtype}")
    if xn.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {xn.shape}")
    return xn.astype(np.int64)


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of the first 2 * cos.shape[1] columns of x (seqlen, heads, d) at ``positions``
    (seqlen,): pairs (2i, 2i + 1) when interleaved (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX)."""
    half = cos.shape[1]
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    out = x.astype(np.float64)
    if interleaved:
        a, b = out[..., 0:2 * half:2].copy(), out[..., 1:2 * half:2].copy()
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = out[..., :half].copy(), out[..., half:2 * half].copy()
        out[..., :half], out[..., half:2 * half] = a * c - b * s, a * s + b * c
    return out.astype(x.dtype)


def _check_options(num_splits, causal, window_size, softcap, softmax_scale, return_lse, head_dim):
    """The scalar options of attention_with_kvcache, checked (both paths): (causal, window, softcap, scale,
    return_lse), the scale defaulting to head_dim ** -0.5."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    causal = api._check_flag("causal", causal)
    window = api._check_window(window_size)
    softcap = api._check_real("softcap", softcap, nonneg=True)
    scale = api._check_real("softmax_scale", softmax_scale, allow_none=True, positive=True)
    scale = head_dim ** -0.5 if scale is None else scale
    return causal, window, softcap, scale, api._check_flag("return_lse", return_lse)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, cache_batch_idx=None,
                           cache_leftpad=None, block_table=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=True, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           softmax_scale=None, num_splits=0, return_lse=False):
    """Attention against a KV cache, appending new keys and values into it in place first.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads_q, head_dim)
        The new queries (``seqlen_q >= 1``: one token when decoding, more for a prefill into the cache).
    k_cache, v_cache : array, shape (batch_cache, seqlen_cache, heads_k, head_dim), or paged
        (num_pages, page_size, heads_k, head_dim) with ``block_table``; any page size >= 1. Written in place
        when ``k``/``v`` are given.
    k, v : array, shape (batch, seqlen_new, heads_k, head_dim), optional
        New keys and values, stored at positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` of
        sequence ``b`` before the attention (both or neither).
    cache_seqlens : int or int32 array, shape (batch,)
        Keys already in each sequence's cache (before the append).
    cache_batch_idx : int32 array, shape (batch,), optional
        Cache row of each batch element (contiguous caches only), distinct rows (checked on the CPU path; GPU
        arrays are not read on the host); default ``b``.
    cache_leftpad : int32 array, shape (batch,), optional
        Each sequence's cache starts at this position; the slots before it are padding and never attended.
    block_table : int32 array, shape (batch, max_pages), optional
        Paged cache: position ``p`` of sequence ``b`` is slot ``p % page_size`` of page
        ``block_table[b, p // page_size]``.
    rotary_cos, rotary_sin : array, shape (seqlen_ro, rotary_dim / 2), optional
        Rotary embedding of the first ``rotary_dim`` columns of the new keys (at their cache positions) and of
        q: at positions ``cache_seqlens + i`` when causal or windowed, else all at ``cache_seqlens`` (as
        FlashAttention-2). ``rotary_interleaved``: pairs (2i, 2i+1) (GPT-J) or (i, i + rotary_dim/2) (GPT-NeoX).
    causal, window_size, softcap, alibi_slopes, softmax_scale
        As for :func:`cuflash.attention`, bottom-right aligned: query ``i`` sits at key position
        ``seqlen_k - seqlen_q + i`` of its sequence's ``seqlen_k = cache_seqlens + seqlen_new - leftpad`` keys.
    num_splits : int
        How many key splits a GPU decode may use (0 = choose); the result does not depend on it. Taken by
        decoding calls that pack their query heads (one query, GQA, no ALiBi or left window, head_dim a
        multiple of 8); other GPU calls run unsplit.
    return_lse : bool
        Also return the natural-log LSE, float32, shape (batch, heads_q, seqlen_q).

    Returns
    -------
    out : array, shape (batch, seqlen_q, heads_q, head_dim), q's type and dtype; ``(out, lse)`` with
    ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        Named arguments of the wrong type, dtype or shape; ``cache_seqlens`` + new tokens past the cache (or
        past the pages the block table lists); page indices out of range.
    NotImplementedError
        GPU arrays with ``cache_leftpad`` together with ``block_table`` or ``cache_batch_idx`` (the CPU path
        has them).

    Notes
    -----
    GPU arrays: the new keys and values are appended by one kernel (kvcache_append.cu, through the block
    table for paged caches), which also writes variable-length indices over the caches, then the
    variable-length forward attends over each sequence's cache rows: no host synchronization, so the values
    of ``cache_seqlens`` / ``cache_leftpad`` / ``block_table`` are not checked there (new rows past the cache
    are dropped; key ranges are clamped to the cache; page indices to the pages). Paged caches take any page
    size: on Hopper, power-of-two pages of 32 rows or more are read by TMA a page at a time, other sizes by
    the producer warp's row gathers (the Hopper kernel's paged builds); other GPUs run the sm80 kernel's
    paged build (keys read row by row through the table). Decoding (one query, GQA, no ALiBi or left window)
    runs a key/value head's query heads as the rows of one tile, its keys split over ``num_splits`` CTAs (0:
    chosen to fill the GPU) whose fp32 partial states merge_states.cu combines.
    """
    name = "cuflash.attention_with_kvcache"
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (or neither)")
    rotary_interleaved = api._check_flag("rotary_interleaved", rotary_interleaved)
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an int32 array of shape (batch,), got bool")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0, got {type(num_splits).__name__}")
    q_fw = arrays.framework_of(q)
    if isinstance(arrays.device_of(q, q_fw), int):
        return _with_kvcache_gpu(q, k_cache, v_cache, k, v, q_fw, cache_seqlens=cache_seqlens,
                                 cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
                                 rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                                 causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                 softmax_scale=softmax_scale, num_splits=num_splits, return_lse=return_lse)
    qn, fw = _np(q, name)
    kc, _ = _np(k_cache, name)
    vc, _ = _np(v_cache, name)
    if qn.ndim != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen_q, heads_q, head_dim), got shape {qn.shape}")
    batch, seqlen_q, heads_q, d = qn.shape
    if seqlen_q < 1:
        raise ValueError(f"q must hold at least one token per sequence, got seqlen_q {seqlen_q}")
    if qn.dtype.name not in api._CPU_DTYPES:
        raise TypeError(f"q has dtype {qn.dtype}; expected one of {', '.join(api._CPU_DTYPES)} on the CPU path")
    for nm, x in (("k_cache", kc), ("v_cache", vc)):
        if x.ndim != 4 or x.shape[3] != d or x.dtype != qn.dtype:
            raise ValueError(f"{nm} must be 4-D (.., .., heads_k, {d}) of dtype {qn.dtype}, got {x.shape} {x.dtype}")
    if vc.shape != kc.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {kc.shape}, got {vc.shape}")
    heads_k = kc.shape[2]
    if heads_q % heads_k:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_k ({heads_k}) (GQA/MQA)")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    kn = vn = None
    seqlen_new = 0
    if k is not None:
        kn, _ = _np(k, name)
        vn, _ = _np(v, name)
        if kn.shape != vn.shape or kn.ndim != 4 or kn.shape[0] != batch or kn.shape[2:] != (heads_k, d):
            raise ValueError(f"k and v must have shape ({batch}, seqlen_new, {heads_k}, {d}), got {kn.shape} and "
                             f"{vn.shape}")
        if kn.dtype != qn.dtype or vn.dtype != qn.dtype:
            raise TypeError(f"k and v must have q's dtype {qn.dtype}")
        seqlen_new = kn.shape[1]
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        seqlens = np.full(batch, int(cache_seqlens), np.int64)
    else:
        seqlens = _index_vector("cache_seqlens", cache_seqlens, batch, fw)
    leftpad = _index_vector("cache_leftpad", cache_leftpad, batch, fw)
    leftpad = np.zeros(batch, np.int64) if leftpad is None else leftpad
    rows = _index_vector("cache_batch_idx", cache_batch_idx, batch, fw)
    causal, window, softcap, scale, return_lse = _check_options(num_splits, causal, window_size, softcap,
                                                                softmax_scale, return_lse, d)
    slopes = None
    if alibi_slopes is not None:
        slopes, _ = _np(alibi_slopes, name)
        if slopes.dtype != np.float32 or slopes.shape not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must be float32 of shape ({heads_q},) or ({batch}, {heads_q})")

    # Where each sequence's positions live: a position -> (cache row or page, slot) map.
    if block_table is not None:
        if rows is not None:
            raise ValueError("cache_batch_idx applies to contiguous caches; a paged cache uses block_table")
        table, _ = _np(block_table, name)
        if table.dtype != np.int32 or table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"block_table must be int32 of shape ({batch}, max_pages), got {table.dtype} "
                             f"{table.shape}")
        page = kc.shape[1]
        capacity = table.shape[1] * page
        if table.size and (table.min() < 0 or table.max() >= kc.shape[0]):
            raise ValueError(f"block_table holds page indices outside [0, {kc.shape[0]})")

        def where(b, pos):
            return table[b, pos // page].astype(np.int64), pos % page
    else:
        capacity = kc.shape[1]
        rows = np.arange(batch) if rows is None else rows
        if rows.size and (rows.min() < 0 or rows.max() >= kc.shape[0]):
            raise ValueError(f"cache_batch_idx must index the cache's {kc.shape[0]} rows")
        if np.unique(rows).size != rows.size:  # two sequences appending into one cache row
            raise ValueError(f"cache_batch_idx must name distinct cache rows, got {rows.tolist()}")

        def where(b, pos):
            return np.full(pos.shape, rows[b]), pos
    ends = seqlens + seqlen_new
    if np.any(seqlens < 0) or np.any(ends > capacity) or np.any(leftpad < 0) or np.any(leftpad > seqlens):
        raise ValueError(f"cache_seqlens {seqlens.tolist()} plus {seqlen_new} new tokens must fit the cache's "
                         f"{capacity} positions, and cache_leftpad {leftpad.tolist()} must lie in [0, cache_seqlens]")
    rotary = rotary_cos is not None
    if rotary:
        cos, _ = _np(rotary_cos, name)
        sin, _ = _np(rotary_sin, name)
        if cos.shape != sin.shape or cos.ndim != 2 or 2 * cos.shape[1] > d:
            raise ValueError(f"rotary_cos and rotary_sin must share a shape (seqlen_ro, rotary_dim / 2 <= {d // 2})")
        ro_last = int(max((ends - leftpad).max(), (seqlens + seqlen_q - leftpad).max())) if batch else 0
        if cos.shape[0] < ro_last:
            raise ValueError(f"rotary_cos has {cos.shape[0]} positions; this call needs {ro_last}")

    out = np.zeros(qn.shape, qn.dtype)
    lse = np.full((batch, heads_q, seqlen_q), np.inf, np.float64 if qn.dtype == np.float64 else np.float32)
    for b in range(batch):
        pos_new = np.arange(seqlens[b], ends[b])
        if kn is not None:  # the in-place append (rotary on the new keys first, at their own positions)
            kb = _rotate(kn[b], cos, sin, pos_new - leftpad[b], rotary_interleaved) if rotary else kn[b]
            page_or_row, slot = where(b, pos_new)
            kc[page_or_row, slot], vc[page_or_row, slot] = kb, vn[b]
        qb = qn[b]
        if rotary:
            start = seqlens[b] - leftpad[b]
            q_pos = start + np.arange(seqlen_q) if (causal or window != (-1, -1)) else np.full(seqlen_q, start)
            qb = _rotate(qb, cos, sin, q_pos, rotary_interleaved)
        keys = np.arange(leftpad[b], ends[b])
        page_or_row, slot = where(b, keys)
        row_slopes = slopes if slopes is None or slopes.ndim == 1 else slopes[b]
        o, l_ = reference.attention_numpy(qb[None], kc[page_or_row, slot][None], vc[page_or_row, slot][None],
                                          causal=causal, window_size=window, softcap=softcap, softmax_scale=scale,
                                          alibi_slopes=row_slopes)
        out[b], lse[b] = o[0], l_[0]
    out = api._from_numpy(out, fw)
    return (out, api._from_numpy(lse, fw)) if return_lse else out


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the attention over each.

    ``out = w_a out_a + w_b out_b`` with ``w = exp(lse_x - lse)`` and ``lse = log(exp(lse_a) + exp(lse_b))``
    (the split-KV combine of FlashAttention-2 and FlashInfer's state merge). A row with LSE ``+inf`` (it saw no
    key in that part: cuflash's convention) contributes nothing; a row that saw no key in either stays 0 with
    LSE ``+inf``.

    Parameters
    ----------
    out_a, out_b : array, shape (batch, seqlen_q, heads, head_dim)
    lse_a, lse_b : array, shape (batch, heads, seqlen_q), natural log (cuflash's ``return_lse`` layout)

    Returns
    -------
    (out, lse) : out in out_a's dtype, lse float32 (float64 for float64 outputs).

    Raises
    ------
    ValueError
        Shapes that do not match.

    Notes
    -----
    GPU arrays (float16, bfloat16 or float32 outs, float32 LSE, any strides) merge in one kernel
    (kernels_cu/attention/merge_states.cu) in fp32; the CPU path in float64.
    """
    return merge_attention_states_list([out_a, out_b], [lse_a, lse_b])


def merge_attention_states_list(outs, lses):
    """:func:`merge_attention_states` for any number (>= 1) of states over disjoint key sets."""
    name = "cuflash.merge_attention_states"
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs and lses must be equally long and non-empty, got {len(outs)} and {len(lses)}")
    fw = arrays.framework_of(outs[0])
    if isinstance(arrays.device_of(outs[0], fw), int):
        return _merge_gpu(outs, lses, fw)
    pairs = [(_np(o, name), _np(x, name)[0]) for o, x in zip(outs, lses)]
    (o0, fw), _ = pairs[0]
    if o0.ndim != 4:
        raise ValueError(f"each out must be (batch, seqlen_q, heads, head_dim), got {o0.shape}")
    b, s, h, _ = o0.shape
    for i, ((o, _), x) in enumerate(pairs):
        if o.shape != o0.shape or o.dtype != o0.dtype:
            raise ValueError(f"outs[{i}] has shape {o.shape} / dtype {o.dtype}; expected {o0.shape} / {o0.dtype}")
        if x.shape != (b, h, s):
            raise ValueError(f"lses[{i}] must have shape {(b, h, s)}, got {x.shape}")
    lse = np.stack([np.where(np.isposinf(x), -np.inf, x.astype(np.float64)) for _, x in pairs])  # +inf: no key
    m = lse.max(axis=0)
    empty = np.isneginf(m)
    w = np.exp(lse - np.where(empty, 0.0, m))  # (n, b, h, s), 0 where a part saw no key
    total = w.sum(axis=0)
    out = np.zeros(o0.shape, np.float64)
    for ((o, _), _), wi in zip(pairs, w):
        wi = (wi / np.where(empty, 1.0, total)).transpose(0, 2, 1)[..., None]  # (b, s, h, 1)
        out += np.where(wi > 0, o.astype(np.float64) * wi, 0.0)  # a part that saw no key adds nothing
    merged_lse = np.where(empty, np.inf, m + np.log(np.where(empty, 1.0, total)))
    out_dtype = o0.dtype
    lse_dtype = np.float64 if out_dtype == np.float64 else np.float32
    return api._from_numpy(out.astype(out_dtype), fw), api._from_numpy(merged_lse.astype(lse_dtype), fw)


def _merge_gpu(outs, lses, fw):
    """The GPU merge (ops.merge_states, merge_states.cu): outputs allocated by the caller's framework on its
    stream; more states than one launch takes merge in rounds through float32 states."""
    from . import ops
    device = arrays.device_of(outs[0], fw)
    shape = tuple(outs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"each out must be (batch, seqlen_q, heads, head_dim), got {shape}")
    b, s, h, d = shape
    dtype = arrays.dtype_name(outs[0], fw)
    if dtype not in ("float16", "bfloat16", "float32"):
        raise TypeError(f"outs[0] has dtype {dtype}; GPU states are float16, bfloat16 or float32")
    for kind, xs, want_shape in (("outs", outs, shape), ("lses", lses, (b, h, s))):
        for i, x in enumerate(xs):
            xfw = arrays.framework_of(x)
            if xfw != fw:
                raise TypeError(f"{kind}[{i}] is a {xfw} array but outs[0] is a {fw} array")
            if arrays.device_of(x, xfw) != device:
                raise ValueError(f"{kind}[{i}] is on device {arrays.device_of(x, xfw)}; outs[0] is on device {device}")
            want_dtype = dtype if kind == "outs" else "float32"
            if tuple(x.shape) != want_shape or arrays.dtype_name(x, xfw) != want_dtype:
                raise ValueError(f"{kind}[{i}] has shape {tuple(x.shape)} / dtype {arrays.dtype_name(x, xfw)}; "
                                 f"expected {want_shape} / {want_dtype}")
    stream = arrays.current_stream(fw, device)
    cc = api._cc(device)
    with arrays.device_scope(fw, device):
        states = [(arrays.device_view(o, fw, stream), arrays.device_view(x, fw, stream)) for o, x in zip(outs, lses)]
        keep = []  # the framework arrays behind the float32 round states, alive until the last launch
        while len(states) > dispatch.MERGE_MAX_STATES:
            merged = []
            for i in range(0, len(states), dispatch.MERGE_MAX_STATES):
                group = states[i:i + dispatch.MERGE_MAX_STATES]
                o_native, o = arrays.empty(fw, shape, "float32", device, stream)
                l_native, lv = arrays.empty(fw, (b, h, s), "float32", device, stream)
                keep += [o_native, l_native]
                ops.merge_states([g[0] for g in group], [g[1] for g in group], o, lv, stream=stream, cc=cc)
                merged.append((o, lv))
            states = merged
        out_native, out = arrays.empty(fw, shape, dtype, device, stream)
        lse_native, lse = arrays.empty(fw, (b, h, s), "float32", device, stream)
        ops.merge_states([g[0] for g in states], [g[1] for g in states], out, lse, stream=stream, cc=cc)
        del keep
        return arrays.to_caller(out_native, out, fw, stream), arrays.to_caller(lse_native, lse, fw, stream)


def _device_index(name, x, batch, fw, device, stream):
    """A unit-stride int32 (batch,) device view of ``x`` (or None), checked for type, shape and device."""
    if x is None:
        return None
    xfw = arrays.framework_of(x)
    if xfw != fw or arrays.device_of(x, xfw) != device:
        raise TypeError(f"{name} must be a {fw} array on device {device}, like q")
    if arrays.dtype_name(x, xfw) != "int32" or tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must be int32 of shape ({batch},), got {arrays.dtype_name(x, xfw)} {tuple(x.shape)}")
    view = arrays.device_view(x, fw, stream)
    return view if view.strides == (1,) else arrays.contiguous_copy(x, fw, device, stream)


def _copy_rows(view, fw, stream, cc):
    """A contiguous copy of a 4-D view of 16-bit elements (q, new keys), made by strided_copy.cu into an
    allocation of ``fw``'s: launches a bound call can replay (recording.py), where a copy made by the
    framework would keep the call from being bound."""
    from . import ops
    _, dst = arrays.empty(fw, view.shape, view.dtype, view.device, stream)
    ops.strided_copy(view, dst, stream=stream, cc=cc)
    return dst


def _decode_packed(qv, out, groups, batch, heads_q, heads_k, d, fw, stream, cc):
    """One query per sequence with GQA (decoding): the query heads that share a key/value head become the rows
    of that head's tile, so each cache row is read once per key/value head, not once per query head
    (api.decode_groups says when, and why causal and a right window may go). Sequence b's rows are
    b * heads_q + i, i < groups, of (total, heads_k, d) views of q and out with row stride d and head stride
    groups * d (memory order (b, heads_q, d)); ``total`` stops at the last sequence's last used row, so that
    no row of any head lies past the arrays' memory (TMA may load whole tiles up to it). Returns (q3, out3,
    total, seqused_q), seqused_q for the caller to fill with ``groups`` (kvcache_append.cu does)."""
    if qv.strides[0] != heads_q * qv.strides[2] or qv.strides[2] != d or qv.strides[3] != 1:
        qv = _copy_rows(qv, fw, stream, cc)
    total = (batch - 1) * heads_q + groups
    views = [arrays.DeviceArray(x.ptr, (total, heads_k, d), (d, groups * d, 1), x.dtype, out.device, x.owner)
             for x in (qv, out)]
    _, used_q = arrays.empty(fw, (batch,), "int32", out.device, stream)
    return views[0], views[1], total, used_q


def _decode_splits(num_splits: int, tiles: int, seqlen_cache: int, head_dim: int, device: int,
                   unsplit_hopper: bool) -> int:
    """Split-KV factor of a packed decoding call of ``tiles`` CTAs (one per sequence and key/value head):
    ``num_splits`` when given (FlashAttention-2's argument: 1 = no split), capped at one key tile a split
    and at what one merge launch takes; 0 = ours: enough splits for two work tiles per SM when the call
    leaves SMs idle, each split at least two key tiles long (one CTA streams a cache at ~58 GB/s through
    the Hopper kernel's TMA pipeline on the H200: 8 CTAs read 0.47 TB/s, 64 read 3.7).
    ``unsplit_hopper``: unsplit, the call would run the Hopper kernel, but split it would run the Ampere one
    (a head dim without the Hopper split build): then it splits only below a third of the SMs (unsplit Hopper
    read 3.7 TB/s with 64 CTAs where the split Ampere kernel read 3.1-3.3, head dim 128)."""
    from . import dispatch, ops
    block_n = dispatch.FWD_SM80_SPLIT_KV_TILES[dispatch.padded_head_dim(head_dim)][1]
    key_tiles = max(1, -(-seqlen_cache // block_n))
    if num_splits == 0:
        sms = ops._sm_count(device)
        enough = 3 * tiles >= sms if unsplit_hopper else tiles >= sms
        num_splits = 1 if enough else -(-2 * sms // tiles)
        key_tiles = max(1, key_tiles // 2)
    return max(1, min(num_splits, key_tiles, dispatch.MERGE_MAX_STATES))


def _merge_decode_splits(partials, out, lse, batch, groups, heads_k, stream, cc) -> None:
    """merge_states.cu over a packed decoding call's split states into ``out`` (batch, 1, heads_q, d) and
    ``lse`` (batch, heads_q, 1), all viewed (batch, groups, heads_k, ...): query head h * groups + i of
    sequence b is row b * groups + i of head h in the partial states (ops.forward_varlen) and query head
    h * groups + i of the outputs."""
    from . import ops
    _, o_acc, l_acc = partials
    splits, rows, _, width = o_acc.shape
    heads_q, d = groups * heads_k, out.shape[3]
    o_split, l_split = rows * heads_k * width, heads_k * rows
    outs = [arrays.DeviceArray(o_acc.ptr + 4 * s * o_split, (batch, groups, heads_k, d),
                               (groups * heads_k * width, heads_k * width, width, 1), "float32", out.device)
            for s in range(splits)]
    lses = [arrays.DeviceArray(l_acc.ptr + 4 * s * l_split, (batch, heads_k, groups), (groups, rows, 1),
                               "float32", out.device) for s in range(splits)]
    merged = arrays.DeviceArray(out.ptr, (batch, groups, heads_k, d), (heads_q * d, d, groups * d, 1), out.dtype,
                                out.device)
    merged_lse = arrays.DeviceArray(lse.ptr, (batch, heads_k, groups), (heads_q, groups, 1), "float32", out.device)
    ops.merge_states(outs, lses, merged, merged_lse, stream=stream, cc=cc)


def _device_table(block_table, fw, device, stream):
    """The block table as an int32 device view with a unit stride along pages (a contiguous copy otherwise)."""
    view = arrays.device_view(block_table, fw, stream)
    return view if view.strides[1] == 1 else arrays.contiguous_copy(block_table, fw, device, stream)


def _device_rotary_tables(cos, sin, head_dim, dtype, fw, device, stream):
    """rotary_cos / rotary_sin as device views for rotary.cu: q's array type, device and dtype, one shape
    (seqlen_ro, rotary_dim / 2) with 2 * (rotary_dim / 2) <= head_dim, a unit column stride (a copy otherwise)."""
    views = []
    for nm, x in (("rotary_cos", cos), ("rotary_sin", sin)):
        if x is None:
            raise ValueError("rotary_cos and rotary_sin must be given together")
        xfw = arrays.framework_of(x)
        if xfw != fw or arrays.device_of(x, xfw) != device:
            raise TypeError(f"{nm} must be a {fw} array on device {device}, like q")
        if arrays.dtype_name(x, xfw) != dtype:
            raise TypeError(f"{nm} must have q's dtype {dtype}, got {arrays.dtype_name(x, xfw)}")
        view = arrays.device_view(x, fw, stream)
        views.append(view if view.strides[-1] == 1 else arrays.contiguous_copy(x, fw, device, stream))
    if (views[0].shape != views[1].shape or len(views[0].shape) != 2 or not 1 <= views[0].shape[0]
            or 2 * views[0].shape[1] > head_dim):
        raise ValueError(f"rotary_cos and rotary_sin must share a shape (seqlen_ro >= 1, rotary_dim / 2 <= "
                         f"{head_dim // 2}), got {tuple(views[0].shape)} and {tuple(views[1].shape)}")
    return views


def _with_kvcache_gpu(q, k_cache, v_cache, k, v, fw, *, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                      rotary_cos, rotary_sin, rotary_interleaved, causal, window_size, softcap, alibi_slopes,
                      softmax_scale, num_splits, return_lse):
    """attention_with_kvcache for GPU arrays: a bound call (executor.BoundSequence) when an earlier call had
    this signature, else the general path, recorded and bound when the arrays are torch's or CuPy's.

    A decode step is a handful of small kernels (append, forward, merge): the general path's validation and
    planning in Python took 180-190 us a call on the H200 (bf16, batch 1, 1024 keys), where the kernels take
    10-60; a bound call writes pointers into the recorded launches and enqueues them."""
    xs = (q, k_cache, v_cache, k, v, None if isinstance(cache_seqlens, numbers.Integral) else cache_seqlens,
          cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin, alibi_slopes)
    options = dict(cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                   block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                   rotary_interleaved=rotary_interleaved, causal=causal, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, softmax_scale=softmax_scale, num_splits=num_splits,
                   return_lse=return_lse)
    key = _bound_key(fw, xs, cache_seqlens, rotary_interleaved, causal, window_size, softcap, softmax_scale,
                     num_splits, return_lse)
    if key is None:
        return _with_kvcache_general(q, k_cache, v_cache, k, v, fw, **options)
    bound = executor.lookup_sequence(key)
    if bound is not None:
        outs = bound.run(xs, int(cache_seqlens) if xs[5] is None else 0)
        if outs is not None:
            return tuple(outs) if return_lse else outs[0]
        # Bound in another context (the arrays' device is not this thread's current one), or an int
        # cache_seqlens the general path rejects: the general path, without recording the call again.
        return _with_kvcache_general(q, k_cache, v_cache, k, v, fw, **options)
    regions = [None if x is None else recording.array_region(x, fw) for x in xs]
    with recording.Recording(regions) as rec:
        result = _with_kvcache_general(q, k_cache, v_cache, k, v, fw, **options)
        # The outputs are allocations of the call, found by identity (zero-size ones share an address).
        outputs = tuple(rec.allocation_of(x) for x in (result if return_lse else (result,)))
    if None not in outputs and all(rec.regions[o][1] > 0 for o in outputs):  # (bind_sequence skips a failed one)
        device = arrays.device_of(q, fw)
        with arrays.device_scope(fw, device):  # bound to the context the recorded launches ran in
            executor.bind_sequence(key, rec, fw, device, arrays.dtype_name(q, fw), outputs)
    return result


def _bound_key(fw, xs, cache_seqlens, rotary_interleaved, causal, window_size, softcap, softmax_scale, num_splits,
               return_lse):
    """The signature of a call for executor's bound sequences (executor.sequence_key), or None where a call is
    not bound (there, and for a window that is not a tuple)."""
    if window_size.__class__ is not tuple:
        return None
    # An int cache_seqlens is not part of it: its value reaches the kernels as one int32 argument of the append
    # and rotary launches (recording.CallScalar), given per call; its type is (numpy's ints pass as ints).
    seqlens = int if isinstance(cache_seqlens, numbers.Integral) else None
    return executor.sequence_key("kvcache", fw, xs, (seqlens, rotary_interleaved, causal, softcap, softmax_scale,
                                                     num_splits, return_lse, *window_size))


def _with_kvcache_general(q, k_cache, v_cache, k, v, fw, *, cache_seqlens, cache_batch_idx, cache_leftpad,
                          block_table, rotary_cos, rotary_sin, rotary_interleaved, causal, window_size, softcap,
                          alibi_slopes, softmax_scale, num_splits, return_lse):
    """attention_with_kvcache for GPU arrays (see its Notes): kvcache_append.cu, then varlen.forward_device
    over the caches as packed (batch_cache * seqlen_cache, heads_k, d) views."""
    from . import ops, varlen
    name = "cuflash.attention_with_kvcache"
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx applies to contiguous caches; a paged cache uses block_table")
    for feature, value in (("a paged cache (block_table)", block_table), ("cache_batch_idx", cache_batch_idx)):
        if value is not None and cache_leftpad is not None:
            raise NotImplementedError(f"{name}: cache_leftpad with {feature} on GPU arrays is not implemented yet "
                                      f"(the CPU path has it)")
    device = arrays.device_of(q, fw)
    dtype = arrays.dtype_name(q, fw)
    if dtype not in api._GPU_DTYPES:
        raise TypeError(f"q has dtype {dtype}; expected one of {', '.join(api._GPU_DTYPES)} for GPU arrays")
    if len(q.shape) != 4 or q.shape[1] < 1:
        raise ValueError(f"q must be 4-D (batch, seqlen_q >= 1, heads_q, head_dim), got shape {tuple(q.shape)}")
    batch, seqlen_q, heads_q, d = (int(n) for n in q.shape)
    arrays_in = [("k_cache", k_cache), ("v_cache", v_cache)] + ([("k", k), ("v", v)] if k is not None else [])
    for nm, x in arrays_in:
        xfw = arrays.framework_of(x)
        if xfw != fw or arrays.device_of(x, xfw) != device:
            raise TypeError(f"{nm} must be a {fw} array on device {device}, like q")
        if len(x.shape) != 4 or x.shape[3] != d or arrays.dtype_name(x, xfw) != dtype:
            raise ValueError(f"{nm} must be 4-D (.., .., heads_k, {d}) of dtype {dtype}, got {tuple(x.shape)} "
                             f"{arrays.dtype_name(x, xfw)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    batch_cache, seqlen_cache, heads_k = (int(n) for n in k_cache.shape[:3])
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    page_size = 0
    if block_table is not None:
        # Paged: k_cache is (num_pages, page_size, heads_k, d); a sequence holds up to max_pages pages.
        bfw = arrays.framework_of(block_table)
        if bfw != fw or arrays.device_of(block_table, bfw) != device:
            raise TypeError(f"block_table must be a {fw} array on device {device}, like q")
        table_dtype = arrays.dtype_name(block_table, bfw)
        if table_dtype != "int32" or len(block_table.shape) != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be int32 of shape ({batch}, max_pages), got {table_dtype} "
                             f"{tuple(block_table.shape)}")
        if batch_cache * seqlen_cache >= 1 << 31:
            raise ValueError("the paged caches' num_pages * page_size rows must stay below 2**31")
        if batch_cache == 0 or seqlen_cache == 0:
            raise ValueError(f"a paged k_cache needs at least one page of at least one row, got shape "
                             f"{tuple(k_cache.shape)}")
        # Past here: a sequence's capacity, and the batch's rows of the kernels' virtual packing.
        page_size, seqlen_cache = seqlen_cache, int(block_table.shape[1]) * seqlen_cache
        batch_cache = batch
    elif cache_batch_idx is not None and batch_cache == 0 and batch > 0:
        raise ValueError("cache_batch_idx must index the cache's rows, and k_cache has none")
    elif batch_cache < batch and cache_batch_idx is None:
        raise ValueError(f"k_cache has {batch_cache} rows for a batch of {batch}")
    if heads_q % heads_k:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_k ({heads_k}) (GQA/MQA)")
    if k is not None and (tuple(k.shape) != tuple(v.shape) or k.shape[0] != batch
                          or tuple(k.shape[2:]) != (heads_k, d)):
        raise ValueError(f"k and v must have shape ({batch}, seqlen_new, {heads_k}, {d}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    # The kernels index cache rows (and the virtual packing b * seqlen_cache of cache_batch_idx and paging)
    # with 32-bit ints.
    if max(batch, batch_cache) * seqlen_cache >= 1 << 31 or batch * seqlen_q >= 1 << 31:
        raise ValueError("the caches' rows (batch_cache or batch, times seqlen_cache or a sequence's pages) and "
                         "batch * seqlen_q must stay below 2**31")
    causal, window, softcap, scale, return_lse = _check_options(num_splits, causal, window_size, softcap,
                                                                softmax_scale, return_lse, d)
    if alibi_slopes is not None:
        afw = arrays.framework_of(alibi_slopes)
        if (afw != fw or arrays.device_of(alibi_slopes, afw) != device
                or arrays.dtype_name(alibi_slopes, afw) != "float32"
                or tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q))):
            raise ValueError(f"alibi_slopes must be a float32 {fw} array on device {device} of shape ({heads_q},) or "
                             f"({batch}, {heads_q})")
    seqlens_value = 0
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        seqlens_value, cache_seqlens = int(cache_seqlens), None
        if not 0 <= seqlens_value <= seqlen_cache:
            raise ValueError(f"cache_seqlens={seqlens_value} must lie in [0, {seqlen_cache}]")
    rec = recording.current()  # a bound call takes an int cache_seqlens per call, up to what passes here
    if rec is not None:
        rec.scalar_max = seqlen_cache
    stream = arrays.current_stream(fw, device)
    cc = api._cc(device)
    with arrays.device_scope(fw, device):
        tables = None
        if rotary_cos is not None or rotary_sin is not None:
            tables = _device_rotary_tables(rotary_cos, rotary_sin, d, dtype, fw, device, stream)
            needed = seqlens_value + max(seqlen_q, 0 if k is None else int(k.shape[1]))
            if cache_seqlens is None and cache_leftpad is None and batch:
                if tables[0].shape[0] < needed:
                    # (with device cache_seqlens / leftpad the kernel clamps the positions instead)
                    raise ValueError(f"rotary_cos has {tables[0].shape[0]} positions; this call needs {needed}")
                if rec is not None:
                    rec.scalar_max = min(rec.scalar_max, tables[0].shape[0] - (needed - seqlens_value))
        seqlens = _device_index("cache_seqlens", cache_seqlens, batch, fw, device, stream)
        leftpad = _device_index("cache_leftpad", cache_leftpad, batch, fw, device, stream)
        kc, vc = (arrays.device_view(x, fw, stream) for x in (k_cache, v_cache))
        rows_per = page_size or seqlen_cache  # rows of one cache row (contiguous sequence) or of one page
        for nm, view in (("k_cache", kc), ("v_cache", vc)):
            if view.strides[3] != 1 or view.strides[0] != rows_per * view.strides[1]:
                raise NotImplementedError(f"{name}: {nm} must be contiguous along its first two dims with unit "
                                          f"head_dim stride on the GPU (read in place as rows), got strides "
                                          f"{view.strides}")
        table = None
        if block_table is not None:
            table = _device_table(block_table, fw, device, stream)
        elif cache_batch_idx is not None and seqlen_cache > 0:  # (an empty cache: no row to read or write)
            # Sequence b's cache row is cache_batch_idx[b]: a block table of one page per sequence, the page a
            # whole cache row.
            rows_view = _device_index("cache_batch_idx", cache_batch_idx, batch, fw, device, stream)
            table = arrays.DeviceArray(rows_view.ptr, (batch, 1), (1, 1), "int32", device, rows_view.owner)
            page_size = seqlen_cache
        news = [None, None]
        if k is not None:
            news = [arrays.device_view(x, fw, stream) for x in (k, v)]
            news = [n if n.strides[3] == 1 else _copy_rows(n, fw, stream, cc) for n in news]
        qv = arrays.device_view(q, fw, stream)
        if tables is not None:
            if qv.strides[3] != 1:  # rotary.cu reads rows with a unit column stride
                qv = _copy_rows(qv, fw, stream, cc)
            # q and the new keys rotated into copies first, at the positions the cache held before the append
            # (as on the CPU path): the new keys at their own, the queries at theirs when causal or windowed.
            per_row = causal or window != (-1, -1)
            rotated = []
            for x, row_positions in ((qv, per_row), (news[0], True)):
                if x is None:
                    rotated.append(None)
                    continue
                _, r = arrays.empty(fw, x.shape, dtype, device, stream)
                ops.rotary(x, r, *tables, seqlens, seqlens_value, leftpad, per_row=row_positions,
                           interleaved=rotary_interleaved, stream=stream, cc=cc)
                rotated.append(r)
            qv, news[0] = rotated[0], rotated[1]
        _, cu_q = arrays.empty(fw, (batch + 1,), "int32", device, stream)
        _, cu_k = arrays.empty(fw, (batch + 1,), "int32", device, stream)
        _, used_k = arrays.empty(fw, (max(batch, 1),), "int32", device, stream)
        cache_rows = kc.shape[0] * kc.shape[1]  # pages x page_size, or batch_cache x seqlen_cache
        k3, v3 = (arrays.DeviceArray(x.ptr, (cache_rows, heads_k, d), x.strides[1:], dtype, device, x.owner)
                  for x in (kc, vc))
        paging = dict(block_table=table, page_size=page_size)
        out_native, out = arrays.empty(fw, (batch, seqlen_q, heads_q, d), dtype, device, stream)
        groups = api.decode_groups(seqlen_q, heads_q, heads_k, alibi_slopes, window)
        if groups > 1 and d % 8 == 0 and 0 < batch * heads_q < 1 << 31:
            packed = _decode_packed(qv, out, groups, batch, heads_q, heads_k, d, fw, stream, cc)
            q3, out3, total_q, used_q = packed
            ops.kvcache_append(kc, vc, *news, seqlens, seqlens_value, leftpad, cu_q, cu_k, used_k,
                               seqlen_q=heads_q, stream=stream, cc=cc, seqused_q=used_q, seqused_q_value=groups,
                               **paging)
            unsplit_hopper = (dispatch.forward_family(cc) == "fwd_sm90"
                              and dispatch.padded_head_dim(d) not in dispatch.FWD_SM90_SPLIT_KV_HEAD_DIMS)
            splits = _decode_splits(num_splits, batch * heads_k, seqlen_cache, d, device, unsplit_hopper)
            lse_packed = None  # split-KV merges straight into the LSE's own layout
            if splits == 1:
                _, lse_packed = arrays.empty(fw, (heads_k, total_q), "float32", device, stream)
                ops.fill_zero(out, stream=stream)
                ops.fill_float32(lse_packed, math.inf, stream=stream)
            partials = varlen.forward_device(
                q3, k3, v3, out3, lse_packed, None, [cu_q, cu_k, used_q, used_k], max_seqlen_q=groups,
                max_seqlen_k=seqlen_cache, causal=False, softmax_scale=scale, window_size=(-1, -1), softcap=softcap,
                fw=fw, stream=stream, cc=cc, fill=False, num_splits=splits, **paging)
            if partials is not None:
                lse_native, lse = arrays.empty(fw, (batch, heads_q, seqlen_q), "float32", device, stream)
                _merge_decode_splits(partials, out, lse, batch, groups, heads_k, stream, cc)
                out = arrays.to_caller(out_native, out, fw, stream)
                return (out, arrays.to_caller(lse_native, lse, fw, stream)) if return_lse else out
            # LSE of query head h * groups + i of sequence b at (h, b * heads_q + i), viewed (b, i, h, word).
            lse_geometry = ((batch, groups, heads_k, 2), (2 * heads_q, 2, 2 * total_q, 1),
                            (2 * heads_q, 2, 2 * groups, 1))
        else:
            ops.kvcache_append(kc, vc, *news, seqlens, seqlens_value, leftpad, cu_q, cu_k, used_k,
                               seqlen_q=seqlen_q, stream=stream, cc=cc, **paging)
            if qv.strides[0] != seqlen_q * qv.strides[1]:
                qv = _copy_rows(qv, fw, stream, cc)
            q3 = arrays.DeviceArray(qv.ptr, (batch * seqlen_q, heads_q, d), qv.strides[1:], dtype, device, qv.owner)
            out3 = arrays.DeviceArray(out.ptr, (batch * seqlen_q, heads_q, d), out.strides[1:], dtype, device,
                                      out.owner)
            _, lse_packed = arrays.empty(fw, (heads_q, batch * seqlen_q), "float32", device, stream)
            varlen.forward_device(q3, k3, v3, out3, lse_packed, api._device_alibi(alibi_slopes, fw, stream),
                                  [cu_q, cu_k, None, used_k], max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_cache,
                                  causal=causal, softmax_scale=scale, window_size=window, softcap=softcap, fw=fw,
                                  stream=stream, cc=cc, **paging)
            lse_geometry = ((batch, seqlen_q, heads_q, 2), (2 * seqlen_q, 2, 2 * batch * seqlen_q, 1),
                            (2 * heads_q * seqlen_q, 2, 2 * seqlen_q, 1))
        out = arrays.to_caller(out_native, out, fw, stream)
        if not return_lse:
            return out
        # The kernels' LSE layout -> (batch, heads_q, seqlen_q): each float32 as two 16-bit words, moved by the
        # layout copy (strided_copy.cu) viewing both as 4-D arrays of 2-word columns.
        lse_native, lse = arrays.empty(fw, (batch, heads_q, seqlen_q), "float32", device, stream)
        shape, src_strides, dst_strides = lse_geometry
        src = arrays.DeviceArray(lse_packed.ptr, shape, src_strides, "float16", device)
        dst = arrays.DeviceArray(lse.ptr, shape, dst_strides, "float16", device)
        ops.strided_copy(src, dst, stream=stream, cc=cc)
        return out, arrays.to_caller(lse_native, lse, fw, stream)


__all__ = ["attention_with_kvcache", "merge_attention_states", "merge_attention_states_list"]
