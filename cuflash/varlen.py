"""Variable-length (packed) attention: many sequences of different lengths in one call, FlashAttention-2's
``flash_attn_varlen_func`` layout (``cu_seqlens``), forward and backward.

Sequence ``i`` owns query rows ``cu_seqlens_q[i] : cu_seqlens_q[i + 1]`` and key rows ``cu_seqlens_k[i] :
cu_seqlens_k[i + 1]`` of the packed arrays and attends only to its own keys; causal masks and windows are
bottom-right aligned per sequence. ``seqused_q`` / ``seqused_k`` (FlashAttention-3) shorten each sequence
to its first rows, so that a caller can keep fixed buffer shapes (CUDA graphs) while the real lengths vary.

The NumPy path (CPU arrays) runs the tiled CPU attention per sequence (O(N) extra memory). On the GPU the
kernels the dense call would run are built with a per-sequence context (kernels_cu/attention/seq_context.cuh,
seq_rows.cuh): on Hopper the wgmma forward and backward (tensor maps over the packed arrays, offset to each
sequence's rows), elsewhere and for views TMA cannot address the sm80 ones; dQ is accumulated with atomics,
or with ``deterministic=True`` by the sm80 query-parallel dQ kernel.

Which checks run where: types, dtypes, shapes and devices are checked on every path before anything runs.
Checks of the values of ``cu_seqlens`` / ``seqused`` / ``max_seqlen`` need those values on the host; the
CPU path makes them, the GPU path does not (reading device memory would synchronize the caller's stream).
There the kernel clamps every sequence to the packed arrays, so any values stay in bounds, and rows no
sequence covers come out as zeros with LSE +inf; a sequence longer than ``max_seqlen_q`` has only its first
``max_seqlen_q`` rows computed (the rest stay zero), as in FlashAttention-2.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import api, arrays, executor, recording, reference


class _VarlenCall:
    """The validated shape of one variable-length call."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k):
        self.fw = arrays.framework_of(q)
        self.names = ("q", "k", "v")
        for name, x in (("k", k), ("v", v)):
            fw = arrays.framework_of(x)
            if fw != self.fw:
                raise TypeError(f"{name} is a {fw} array but q is a {self.fw} array; pass one array type")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if len(x.shape) != 3:
                raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
        self.device = arrays.device_of(q, self.fw)
        for name, x in (("k", k), ("v", v)):
            if arrays.device_of(x, self.fw) != self.device:
                raise ValueError(f"{name} is on device {arrays.device_of(x, self.fw)} but q is on device {self.device}")
        self.on_gpu = isinstance(self.device, int)
        self.dtype = arrays.dtype_name(q, self.fw)
        allowed = api._GPU_DTYPES if self.on_gpu else api._CPU_DTYPES
        if self.dtype not in allowed:
            raise TypeError(f"q has dtype {self.dtype}; expected one of {', '.join(allowed)}")
        for name, x in (("k", k), ("v", v)):
            if arrays.dtype_name(x, self.fw) != self.dtype:
                raise TypeError(f"{name} has dtype {arrays.dtype_name(x, self.fw)} but q has dtype {self.dtype}")
        self.total_q, self.heads_q, self.head_dim = q.shape
        self.total_k, self.heads_k, dk = k.shape
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if dk != self.head_dim:
            raise ValueError(f"k has head_dim {dk} but q has head_dim {self.head_dim}")
        if not 1 <= self.head_dim <= api._MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [1, {api._MAX_HEAD_DIM}], got {self.head_dim}")
        for name, n in (("heads_q", self.heads_q), ("heads_k", self.heads_k)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if self.heads_q % self.heads_k:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_k ({self.heads_k}) (GQA/MQA)")
        self.cu_q = self._index_array("cu_seqlens_q", cu_seqlens_q, None)
        self.batch = self.cu_q.shape[0] - 1
        self.cu_k = self._index_array("cu_seqlens_k", cu_seqlens_k, self.batch + 1)
        self.max_seqlen_q = _check_count("max_seqlen_q", max_seqlen_q)
        self.max_seqlen_k = _check_count("max_seqlen_k", max_seqlen_k)
        self.used_q = None if seqused_q is None else self._index_array("seqused_q", seqused_q, self.batch)
        self.used_k = None if seqused_k is None else self._index_array("seqused_k", seqused_k, self.batch)

    def _index_array(self, name, x, length):
        fw = arrays.framework_of(x)
        if fw != self.fw and not (fw == "numpy" and not self.on_gpu):
            raise TypeError(f"{name} is a {fw} array but q is a {self.fw} array")
        if len(x.shape) != 1 or (length is not None and x.shape[0] != length) or x.shape[0] < 1:
            want = f"({length},)" if length is not None else "(batch + 1,) with batch >= 0"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        if arrays.dtype_name(x, fw) != "int32":
            raise TypeError(f"{name} must be int32, got {arrays.dtype_name(x, fw)}")
        if arrays.device_of(x, fw) != self.device:
            raise ValueError(f"{name} is on device {arrays.device_of(x, fw)} but q is on device {self.device}")
        return x

    def sequences(self):
        """Per sequence (q rows, k rows) as slices, after the value checks (CPU path: values on the host)."""
        cu_q, cu_k = (np.asarray(api._to_numpy(c, arrays.framework_of(c))).astype(np.int64)
                      for c in (self.cu_q, self.cu_k))
        for name, cu, total in (("cu_seqlens_q", cu_q, self.total_q), ("cu_seqlens_k", cu_k, self.total_k)):
            if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] > total:
                raise ValueError(f"{name} must start at 0, never decrease and end at most at the total token count "
                                 f"({total}); got {cu.tolist()}")
        len_q, len_k = np.diff(cu_q), np.diff(cu_k)
        for name, used, lens in (("seqused_q", self.used_q, len_q), ("seqused_k", self.used_k, len_k)):
            if used is not None:
                u = np.asarray(api._to_numpy(used, arrays.framework_of(used))).astype(np.int64)
                if np.any(u < 0) or np.any(u > lens):
                    raise ValueError(f"{name} must lie in [0, that sequence's length]; got {u.tolist()} for "
                                     f"lengths {lens.tolist()}")
                lens[:] = u
        for name, lens, bound in (("max_seqlen_q", len_q, self.max_seqlen_q), ("max_seqlen_k", len_k,
                                                                             self.max_seqlen_k)):
            if len(lens) and lens.max() > bound:
                raise ValueError(f"{name}={bound} is below the longest sequence ({int(lens.max())})")
        return [(slice(cu_q[i], cu_q[i] + len_q[i]), slice(cu_k[i], cu_k[i] + len_k[i])) for i in range(self.batch)]

    def check_alibi(self, alibi_slopes):
        return api.check_alibi(alibi_slopes, fw=self.fw, device=self.device, batch=self.batch, heads_q=self.heads_q)


def _width(head_dim):
    """The kernels' row width: head_dim rounded up to a multiple of 8 (16-byte rows)."""
    return -(-head_dim // api._ROW_CHUNK) * api._ROW_CHUNK


def _as_batch_one(x3):
    """A (1, total, heads, d) view of a (total, heads, d) device view."""
    return arrays.DeviceArray(x3.ptr, (1, *x3.shape), (0, *x3.strides), x3.dtype, x3.device, x3.owner)


def _device_packed(x3, head_dim, fw, stream, cc):
    """A (1, total, heads, width) view of a packed (total, heads, head_dim) device view that the kernels read in
    place, or a contiguous zero-padded copy from ``fw``'s allocator (as api._device_input does for dense
    arrays)."""
    from . import ops
    view = _as_batch_one(x3)
    width = _width(head_dim)
    if width == head_dim and api._readable_in_place(view):
        return view
    _, buf = arrays.empty(fw, (1, *x3.shape[:2], width), x3.dtype, x3.device, stream)
    ops.strided_copy(view, buf, stream=stream, cc=cc)
    return buf


def _index_view(x, fw, device, stream):
    """A unit-stride device view of an int32 index array (cu_seqlens, seqused), or None."""
    if x is None:
        return None
    view = arrays.device_view(x, fw, stream)
    return view if view.strides == (1,) else arrays.contiguous_copy(x, fw, device, stream)


def forward_device(q3, k3, v3, out3, lse, alibi, index, *, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                   window_size, softcap, fw, stream, cc, fill=True, num_splits=1, block_table=None, page_size=0):
    """The GPU forward on device views, inside the device's scope (ops.forward_varlen). ``q3, k3, v3``: packed
    (total, heads, head_dim) views, any strides; ``out3``: a contiguous (total_q, heads_q, head_dim) output and
    ``lse`` a (heads_q, total_q) float32 one, both written in full; ``index``: the int32 views of cu_seqlens_q,
    cu_seqlens_k, seqused_q, seqused_k (the last two may be None). Work buffers (head dims off multiples of 8)
    come from ``fw``'s allocator on ``stream``. ``fill=False``: the caller has zeroed ``out3``'s memory and set
    ``lse`` to +inf itself (ops.forward_varlen). ``num_splits`` > 1: split-KV, returning the partial states
    (ops.forward_varlen; head dims that are multiples of 8). ``block_table``, ``page_size``: paged caches
    (ops.forward_varlen; k3 / v3 their rows, pages back to back). The array functions and cuflash.jax's custom
    call share it."""
    from . import ops
    head_dim, width = q3.shape[2], _width(q3.shape[2])
    out = _as_batch_one(out3)
    work = out
    if width != head_dim:
        _, work = arrays.empty(fw, (1, *out3.shape[:2], width), out3.dtype, out3.device, stream)
    views = [_device_packed(x, head_dim, fw, stream, cc) for x in (q3, k3, v3)]
    partials = ops.forward_varlen(*views, work, lse, alibi, *index, max_seqlen_q=max_seqlen_q,
                                  max_seqlen_k=max_seqlen_k, causal=causal, window_size=window_size,
                                  softmax_scale=softmax_scale, softcap=softcap, stream=stream, cc=cc, framework=fw,
                                  fill=fill, num_splits=num_splits, block_table=block_table, page_size=page_size)
    if work is not out:
        assert partials is None, "split-KV takes head dims that are multiples of 8"
        ops.strided_copy(work, out, stream=stream, cc=cc)
    return partials


def backward_device(dout3, q3, k3, v3, out3, lse, alibi, index, grads3, *, max_seqlen_q, max_seqlen_k, causal,
                    softmax_scale, window_size, softcap, deterministic, fw, stream, cc):
    """The GPU backward on device views, inside the device's scope (ops.backward_varlen): ``grads3`` are the
    contiguous (total, heads, head_dim) dq, dk, dv outputs, written in full; ``lse`` a unit-stride
    (heads_q, total_q) float32 view; the rest as :func:`forward_device`. At head dims off multiples of 8 the
    kernels write zero-padded work buffers, cropped into ``grads3`` after."""
    from . import ops
    head_dim, width = q3.shape[2], _width(q3.shape[2])
    views = [_device_packed(x, head_dim, fw, stream, cc) for x in (dout3, q3, k3, v3, out3)]
    work = []
    for g3 in grads3:
        g = _as_batch_one(g3)
        if width != head_dim:
            _, g = arrays.empty(fw, (1, *g3.shape[:2], width), g3.dtype, g3.device, stream)
        work.append(g)
    ops.backward_varlen(*views, lse, alibi, *work, *index, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                        causal=causal, window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
                        deterministic=deterministic, stream=stream, cc=cc, framework=fw)
    for g3, g in zip(grads3, work):
        if g.ptr != g3.ptr:
            ops.strided_copy(g, _as_batch_one(g3), stream=stream, cc=cc)


def _indices(call, stream):
    return [_index_view(x, arrays.framework_of(x) if x is not None else call.fw, call.device, stream)
            for x in (call.cu_q, call.cu_k, call.used_q, call.used_k)]


def _forward_gpu(call, q, k, v, alibi, causal, scale, window, softcap):
    """The GPU forward: outputs allocated by the caller's framework on its stream."""
    device, fw = call.device, call.fw
    stream = arrays.current_stream(fw, device)
    cc = api._cc(device)
    with arrays.device_scope(fw, device):
        out_native, out3 = arrays.empty(fw, (call.total_q, call.heads_q, call.head_dim), call.dtype, device, stream)
        lse_native, lse = arrays.empty(fw, (call.heads_q, call.total_q), "float32", device, stream)
        forward_device(*(arrays.device_view(x, fw, stream) for x in (q, k, v)), out3, lse,
                       api._device_alibi(alibi, fw, stream), _indices(call, stream), max_seqlen_q=call.max_seqlen_q,
                       max_seqlen_k=call.max_seqlen_k, causal=causal, softmax_scale=scale, window_size=window,
                       softcap=softcap, fw=fw, stream=stream, cc=cc)
        return arrays.to_caller(out_native, out3, fw, stream), arrays.to_caller(lse_native, lse, fw, stream)


def _backward_gpu(call, dout, q, k, v, out, lse, alibi, *, causal, softmax_scale, window_size, softcap,
                  deterministic):
    """The GPU backward: gradients allocated by the caller's framework on its stream."""
    device, fw = call.device, call.fw
    stream = arrays.current_stream(fw, device)
    cc = api._cc(device)
    with arrays.device_scope(fw, device):
        lse_view = arrays.device_view(lse, fw, stream)
        if lse_view.strides != (call.total_q, 1):
            lse_view = arrays.contiguous_copy(lse, fw, device, stream)
        natives, grads3 = [], []
        for total, heads in ((call.total_q, call.heads_q), (call.total_k, call.heads_k), (call.total_k, call.heads_k)):
            native, g3 = arrays.empty(fw, (total, heads, call.head_dim), call.dtype, device, stream)
            natives.append(native)
            grads3.append(g3)
        backward_device(*(arrays.device_view(x, fw, stream) for x in (dout, q, k, v, out)), lse_view,
                        api._device_alibi(alibi, fw, stream), _indices(call, stream), grads3,
                        max_seqlen_q=call.max_seqlen_q, max_seqlen_k=call.max_seqlen_k, causal=causal,
                        softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                        deterministic=deterministic, fw=fw, stream=stream, cc=cc)
        return tuple(arrays.to_caller(native, g3, fw, stream) for native, g3 in zip(natives, grads3))


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _options(call, causal, softmax_scale, window_size, softcap, alibi_slopes):
    """The dense call's option checks (api._check_options), with the slopes as a NumPy array for the CPU path."""
    causal, scale, window, softcap, alibi = api._check_options(call, causal, softmax_scale, window_size, softcap,
                                                               alibi_slopes)
    slopes = None if alibi is None else np.asarray(api._to_numpy(alibi, arrays.framework_of(alibi)))
    return dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap), slopes


def refuse_gpu_dropout(on_gpu: bool, dropout_p) -> None:
    """GPU arrays have no dropout build of the variable-length kernels yet: NotImplementedError for
    ``dropout_p > 0`` there, before anything runs (cuflash.torch calls it before drawing a seed)."""
    if on_gpu and api._check_probability(dropout_p) > 0:
        raise NotImplementedError("dropout_p > 0 in the variable-length functions on GPU arrays is not implemented "
                                  "yet (the CPU path has it; cuflash.attention has it on GPU arrays)")


def _dropout(call, dropout_p, dropout_seed, dropout_offset):
    """api._check_dropout_args for a variable-length call: None without dropout (refuse_gpu_dropout first)."""
    refuse_gpu_dropout(call.on_gpu, dropout_p)
    return api._check_dropout_args(call, dropout_p, dropout_seed, dropout_offset)


def _dropout_kwargs(drop, i):
    """The CPU path's dropout arguments for sequence i: the dense call's mask of batch index i."""
    if drop is None:
        return {}
    return dict(dropout_p=drop.p, dropout_seed=drop.seed, dropout_offset=drop.offset, dropout_batch=i)


def _row_slopes(slopes, i):
    """Sequence i's ALiBi slopes: (heads,) slopes are shared, (batch, heads) ones are per sequence."""
    return slopes if slopes is None or slopes.ndim == 1 else slopes[i]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, seqused_q=None,
                     seqused_k=None, return_lse=False, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """Attention over packed sequences of different lengths (FlashAttention-2's varlen layout).

    Parameters
    ----------
    q : array, shape (total_q, heads_q, head_dim)
        The queries of every sequence, one after another: GPU arrays (float16 / bfloat16), NumPy
        (float16/32/64) or CPU torch tensors.
    k, v : array, shape (total_k, heads_k, head_dim)
        Keys and values, packed the same way; ``heads_q`` a multiple of ``heads_k`` (GQA).
    cu_seqlens_q, cu_seqlens_k : int32 array, shape (batch + 1,)
        Sequence ``i`` is query rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` and key rows
        ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]``; both start at 0 and never decrease. Rows past the last
        sequence are left out (zero output, LSE ``+inf``).
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the sequence lengths (the longest one suffices).
    causal, softmax_scale, window_size, softcap
        As for :func:`cuflash.attention`, per sequence: causal and windows are bottom-right aligned to each
        sequence's own lengths.
    alibi_slopes : float32 array, shape (heads_q,) or (batch, heads_q), optional
    seqused_q, seqused_k : int32 array, shape (batch,), optional
        Only the first ``seqused[i]`` rows of sequence ``i`` take part (FlashAttention-3); its other query
        rows get zero output and LSE ``+inf``. The masks align to the used lengths.
    return_lse : bool
        Also return the log-sum-exp, float32 (float64 for float64 inputs), shape (heads_q, total_q)
        (FlashAttention-2's varlen layout), natural log, ``+inf`` for rows that see no key.
    dropout_p, dropout_seed, dropout_offset
        Attention dropout as for :func:`cuflash.attention` (the keep rule, the ``1 / (1 - p)`` scaling, the LSE
        before dropout). Sequence ``i`` draws the mask that a dense call with the same seed and offset draws
        for batch index ``i`` (rows and keys counted from the sequence's start): a packed batch of sequences of
        one length equals that dense batch. CPU path only for now (with torch autograd too, through
        :func:`cuflash.torch.attention_varlen`, which draws a seed from torch's generator when none is given).

    Returns
    -------
    out : array, shape (total_q, heads_q, head_dim), the caller's array type and dtype; ``(out, lse)`` with
    ``return_lse=True``.

    torch tensors that require grad give a differentiable output (:func:`cuflash.torch.attention_varlen`).

    Raises
    ------
    TypeError, ValueError
        Arguments of the wrong type, dtype, shape or device, ``cu_seqlens`` that do not start at 0, decrease
        or run past the packed arrays, ``seqused`` outside [0, length], ``max_seqlen`` below the longest
        sequence (value checks: CPU path only, see the module docstring), ``dropout_p > 0`` without a seed.
        Each names the argument.
    NotImplementedError
        ``dropout_p > 0`` on GPU arrays.
    """
    if arrays.framework_of(q) == "torch" and api._needs_autograd(q, k, v):
        call = _VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
        _dropout(call, dropout_p, dropout_seed, dropout_offset)  # (checks)
        return_lse = api._check_flag("return_lse", return_lse)
        from . import torch as torch_adapter
        return torch_adapter.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                              softcap=softcap, alibi_slopes=alibi_slopes, seqused_q=seqused_q,
                                              seqused_k=seqused_k, return_lse=return_lse, dropout_p=dropout_p,
                                              dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    if not (type(dropout_p) is float and dropout_p == 0.0) and api._check_probability(dropout_p) > 0:
        call = _VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
        drop = _dropout(call, dropout_p, dropout_seed, dropout_offset)
        return _attention_varlen(call, q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes,
                                 api._check_flag("return_lse", return_lse), drop)
    return forward_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                        causal, softmax_scale, window_size, softcap, alibi_slopes, return_lse)


def forward_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, causal,
                 softmax_scale, window_size, softcap, alibi_slopes, return_lse):
    """attention_varlen without autograd (the torch op runs this too): for torch and CuPy arrays on a GPU the
    bound call (executor.BoundSequence) when an earlier call had this signature, else the general path,
    recorded and bound. The general path's checks and planning cost 180-290 us a call on the H200's host,
    more than the kernels take at 16k tokens (bench/NOTES.md, "Variable-length batches"); a bound call
    allocates the outputs and enqueues the recorded fills and launch."""
    key, xs = _sequence_key("varlen_forward", (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                                               alibi_slopes), window_size,
                            (max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, return_lse))
    if key is not None:
        bound = executor.lookup_sequence(key)
        if bound is not None:
            outs = bound.run(xs)
            if outs is not None:
                return tuple(outs) if return_lse else outs[0]
            key = None  # bound in another context: the general path, not recorded again
    call = _VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
    return_lse = api._check_flag("return_lse", return_lse)
    general = lambda: _attention_varlen(call, q, k, v, causal, softmax_scale, window_size, softcap,  # noqa: E731
                                        alibi_slopes, return_lse)
    if not _second_sighting(key) or not call.on_gpu:
        return general()
    return _record(key, call, xs, general, lambda result: result if return_lse else (result,))


def _sequence_key(kind, xs, window_size, options):
    """(executor.sequence_key of a call on ``xs`` (q first), the arrays the recording and the bound call
    take), or (None, xs) for a window that is not a tuple (the general path checks and normalizes it).

    An array passed twice (self-attention's one cu_seqlens for q and k; the torch adapter's autograd
    Functions pass a repeat as a fresh view of the same memory) would make the recording's pointers ambiguous
    (recording.py: a pointer must match one array); its repeats become None in the arrays taken, and which
    argument repeats which is part of the key. Every argument here is only read, so views that coincide may
    share one region."""
    if window_size.__class__ is not tuple:
        return None, xs
    fw = arrays.framework_of(xs[0])
    first, taken, repeats = {}, [], []
    for i, x in enumerate(xs):
        j = None
        if x is not None:
            try:
                j = first.setdefault(executor.view_identity(x, fw), i)
            except (AttributeError, TypeError, RuntimeError):  # not a torch / CuPy array: the checks say which
                return None, xs
        taken.append(x if j is None or j == i else None)
        if j is not None and j != i:
            repeats.append((i, j))
    taken = tuple(taken)
    return executor.sequence_key(kind, fw, taken, (*options, tuple(window_size), tuple(repeats))), taken


# Signatures seen once: a call is recorded and bound the second time its signature comes, so that calls
# whose shapes change every time (packed training batches: new total lengths and max_seqlen each step) do
# not pay for a recording each, nor evict the bound calls that repeat (executor keeps 256).
_seen: set = set()


def _second_sighting(key) -> bool:
    if key is None:
        return False
    if key in _seen:
        return True
    if len(_seen) >= 4096:
        _seen.clear()
    _seen.add(key)
    return False


def _record(key, call, xs, general, outputs_of):
    """Runs ``general()`` under a launch recording and binds it under ``key`` when its outputs
    (``outputs_of(result)``) are allocations of the call; returns the result."""
    regions = [None if x is None else recording.array_region(x, call.fw) for x in xs]
    with recording.Recording(regions) as rec:
        result = general()
        outputs = tuple(rec.allocation_of(x) for x in outputs_of(result))
    if None not in outputs and all(rec.regions[o][1] > 0 for o in outputs):
        with arrays.device_scope(call.fw, call.device):  # bound to the context the recorded launches ran in
            executor.bind_sequence(key, rec, call.fw, call.device, call.dtype, outputs)
    return result


def _attention_varlen(call, q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, return_lse,
                      drop=None):
    """attention_varlen after its checks of the arrays (no autograd routing: the torch op runs this); ``drop``
    an api._Dropout (CPU path) or None."""
    if call.on_gpu:
        causal, scale, window, softcap, alibi = api._check_options(call, causal, softmax_scale, window_size, softcap,
                                                                   alibi_slopes)
        out, lse = _forward_gpu(call, q, k, v, alibi, causal, scale, window, softcap)
        return (out, lse) if return_lse else out
    kwargs, slopes = _options(call, causal, softmax_scale, window_size, softcap, alibi_slopes)
    if call.fw == "torch" and call.dtype == "bfloat16":
        raise TypeError("q is a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
    qn, kn, vn = (np.asarray(api._to_numpy(x, call.fw)) for x in (q, k, v))
    out = np.zeros(qn.shape, dtype=qn.dtype)
    lse = np.full((call.heads_q, call.total_q), np.inf, dtype=np.float64 if qn.dtype == np.float64 else np.float32)
    for i, (rq, rk) in enumerate(call.sequences()):
        o, l_ = reference.attention_numpy(qn[None, rq], kn[None, rk], vn[None, rk],
                                          alibi_slopes=_row_slopes(slopes, i), **kwargs, **_dropout_kwargs(drop, i))
        out[rq], lse[:, rq] = o[0], l_[0]
    out = api._from_numpy(out, call.fw)
    return (out, api._from_numpy(lse, call.fw)) if return_lse else out


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                              causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, seqused_q=None, seqused_k=None, deterministic=False, dropout_p=0.0,
                              dropout_seed=None, dropout_offset=0):
    """Gradients of :func:`attention_varlen` with respect to q, k and v.

    Parameters
    ----------
    dout, out : array, shape (total_q, heads_q, head_dim)
        The output's gradient and the forward's output.
    lse : array, shape (heads_q, total_q)
        The forward's ``return_lse=True`` log-sum-exp (float32 for GPU arrays).
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, and the keywords
        Exactly as passed to the forward (the dropout arguments too: the backward replays the forward's mask).
        ``deterministic``: on GPU arrays dQ is then computed by a query-parallel kernel instead of atomic
        additions, so repeats are bitwise identical (the CPU path always is).

    Returns
    -------
    dq, dk, dv : arrays with the shapes and dtype of q, k, v; rows outside every (used) sequence get 0.

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        As :func:`attention_varlen`, and for ``dout``/``out``/``lse`` of the wrong shape or dtype.
    """
    if not (type(dropout_p) is float and dropout_p == 0.0) and api._check_probability(dropout_p) > 0:
        call = _VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
        drop = _dropout(call, dropout_p, dropout_seed, dropout_offset)
        return _backward(call, dout, q, k, v, out, lse, causal, softmax_scale, window_size, softcap, alibi_slopes,
                         deterministic, drop)
    key, xs = _sequence_key("varlen_backward", (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                                                seqused_k, alibi_slopes), window_size,
                            (max_seqlen_q, max_seqlen_k, causal, softmax_scale, softcap, deterministic))
    if key is not None:  # a bound call, as in forward_call
        bound = executor.lookup_sequence(key)
        if bound is not None:
            grads = bound.run(xs)
            if grads is not None:
                return tuple(grads)
            key = None
    call = _VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
    if _second_sighting(key) and call.on_gpu:
        general = lambda: _backward(call, dout, q, k, v, out, lse, causal, softmax_scale, window_size,  # noqa: E731
                                    softcap, alibi_slopes, deterministic)
        return _record(key, call, xs, general, tuple)
    return _backward(call, dout, q, k, v, out, lse, causal, softmax_scale, window_size, softcap, alibi_slopes,
                     deterministic)


def _backward(call, dout, q, k, v, out, lse, causal, softmax_scale, window_size, softcap, alibi_slopes,
              deterministic, drop=None):
    """attention_varlen_backward after the arrays' checks of _VarlenCall; ``drop`` as _attention_varlen's."""
    causal, scale, window, softcap, alibi = api._check_options(call, causal, softmax_scale, window_size, softcap,
                                                               alibi_slopes)
    deterministic = api._check_flag("deterministic", deterministic)
    for name, x, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (call.heads_q, call.total_q))):
        fw = arrays.framework_of(x)
        if fw != call.fw:
            raise TypeError(f"{name} is a {fw} array but q is a {call.fw} array; pass one array type")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        if arrays.device_of(x, fw) != call.device:
            raise ValueError(f"{name} is on device {arrays.device_of(x, fw)} but q is on device {call.device}")
        want = ("float32", "float64") if name == "lse" else (call.dtype,)
        if arrays.dtype_name(x, fw) not in want:
            raise TypeError(f"{name} has dtype {arrays.dtype_name(x, fw)}; expected {' or '.join(want)}")
    if call.on_gpu:
        if arrays.dtype_name(lse, call.fw) != "float32":
            raise TypeError("lse of GPU arrays must be float32 (what attention_varlen returns)")
        return _backward_gpu(call, dout, q, k, v, out, lse, alibi, causal=causal, softmax_scale=scale,
                             window_size=window, softcap=softcap, deterministic=deterministic)
    kwargs, slopes = _options(call, causal, softmax_scale, window_size, softcap, alibi_slopes)
    dn, qn, kn, vn, on, ln = (np.asarray(api._to_numpy(x, call.fw)) for x in (dout, q, k, v, out, lse))
    dq, dk, dv = (np.zeros(x.shape, dtype=x.dtype) for x in (qn, kn, vn))
    for i, (rq, rk) in enumerate(call.sequences()):
        g = reference.attention_backward_numpy(dn[None, rq], qn[None, rq], kn[None, rk], vn[None, rk], on[None, rq],
                                               ln[None, :, rq], alibi_slopes=_row_slopes(slopes, i), **kwargs,
                                               **_dropout_kwargs(drop, i))
        dq[rq], dk[rk], dv[rk] = g[0][0], g[1][0], g[2][0]
    return tuple(api._from_numpy(g, call.fw) for g in (dq, dk, dv))


__all__ = ["attention_varlen", "attention_varlen_backward"]
