"""Kernel launches on framework-neutral device views: take the problem's launch plan (launch_plan.py), bind
the pointers, workspaces and tensor maps, launch on the caller's stream.

Everything here runs on the caller's stream and never synchronizes the host. Arguments arrive validated
(api.py); this layer only translates them into what the kernels expect.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading

from . import arrays, dispatch, jit, launch_plan, params_layout, recording, tma
from .arrays import DeviceArray

_LOG2E = 1.4426950408889634

# Pointer fields of the parameter block, by byte offset (params_layout.py describes the block), and every
# 8-byte field a call writes into a plan's block: the pointers, the dropout generator's seed and offset, and
# a block mask's table geometry (block_*: its own, not the plan's).
_PTR_OFFSET = {name: params_layout.OFFSETS[name] for name, kind, _, _ in params_layout.FIELDS if kind == "ptr"}
_WORD_OFFSET = {name: params_layout.OFFSETS[name] for name, kind, _, _ in params_layout.FIELDS
                if kind in ("ptr", "u64") or name.startswith("block_")}
_BLOCK_BYTES = params_layout.STRUCT.size
_U64 = struct.Struct("<Q")


_tls = threading.local()

# The Hopper kernels take their tensor maps first, then the block above: `struct ForwardSm90Params { TmaMap
# q, k, v, o; AttentionParams a; }` and `struct BackwardSm90Params { TmaMap q, k, v, dout, dq_accum;
# AttentionParams a; }`: 64-byte-aligned 128-byte maps, and sizeof rounds up to that alignment.
def sm90_params_bytes(n_maps: int) -> int:
    return -(-(n_maps * tma.MAP_BYTES + _BLOCK_BYTES) // 64) * 64


SM90_PARAMS_BYTES = sm90_params_bytes(4)


_PTR_OFFSETS = tuple(_PTR_OFFSET.values())


def _launch(launch, stream: int, pointers: dict, views=None, accumulator=None) -> None:
    """Launches a plan's kernel (launch_plan.KernelLaunch): its parameter block with ``pointers`` (field name ->
    address, or the value of a 64-bit per-call field: dropout_seed, dropout_offset) written in, after the
    tensor maps the kernel takes first, encoded for ``views`` (name -> the DeviceArray a map tiles) and
    ``accumulator`` ((address, shape) of the fp32 dq accumulator)."""
    from cupy.cuda import driver
    maps = tuple(tma.accumulator_map(accumulator[0], accumulator[1], *box) if n == "dq_accum"
                 else tma.tile_map(views[n], box) for n, box in launch.maps)
    # One by-value struct argument: kernelParams is an array holding one pointer to the struct's bytes,
    # which the driver copies during the launch call (and into a graph node at capture), so the buffer
    # can be reused by the next launch of this thread.
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    size = sm90_params_bytes(len(maps)) if maps else _BLOCK_BYTES
    hit = bufs.get(size)
    if hit is None:
        buf = ctypes.create_string_buffer(size)
        hit = bufs[size] = (buf, (ctypes.c_void_p * 1)(ctypes.addressof(buf)))
    buf, argv = hit
    offset = 0
    for m in maps:
        ctypes.memmove(ctypes.addressof(buf) + offset, m, tma.MAP_BYTES)
        offset += tma.MAP_BYTES
    ctypes.memmove(ctypes.addressof(buf) + offset, launch.block, _BLOCK_BYTES)
    for name, ptr in pointers.items():
        _U64.pack_into(buf, offset + _WORD_OFFSET[name], ptr)
    rec = recording.current()
    if rec is not None:
        specs = tuple((j * tma.MAP_BYTES, None, (accumulator[0], accumulator[1], box)) if n == "dq_accum"
                      else (j * tma.MAP_BYTES, views[n], box) for j, (n, box) in enumerate(launch.maps))
        rec.launch(launch.fn, launch.grid, launch.splits, launch.threads, launch.smem, buf.raw[:size], (0,),
                   tuple(offset + o for o in _PTR_OFFSETS), specs)
    driver.launchKernel(launch.fn.ptr, launch.grid, launch.splits, 1, launch.threads, 1, 1, launch.smem, stream,
                        ctypes.addressof(argv), 0)


def _launch_args(fn, grid: int, threads: int, stream: int, args: tuple) -> None:
    """Launches a kernel whose parameters are plain scalars and pointers, passed as ctypes values in the
    kernel signature's order (the driver copies them during the call)."""
    from cupy.cuda import driver
    rec = recording.current()
    if rec is not None:  # the parameters laid out back to back, each at its own alignment
        template, offsets, pointer_offsets, scalar_offsets = b"", [], [], []
        for a in args:
            size = ctypes.sizeof(a)
            template += bytes(-len(template) % size)
            offsets.append(len(template))
            if isinstance(a, ctypes.c_void_p):
                pointer_offsets.append(len(template))
            elif isinstance(a, recording.CallScalar):
                scalar_offsets.append(len(template))
            template += bytes(a)
        rec.launch(fn, grid, 1, threads, 0, template, offsets, pointer_offsets, scalar_offsets=scalar_offsets)
    argv = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
    driver.launchKernel(fn.ptr, grid, 1, 1, threads, 1, 1, 0, stream, ctypes.addressof(argv), 0)


def strided_copy(src: DeviceArray, dst: DeviceArray, *, stream: int, cc: tuple) -> None:
    """``dst[..., c] = src[..., c]`` for ``c < src.shape[3]`` and 0 beyond, for 4-D (batch, seqlen, heads,
    cols) views of 16-bit elements with any strides (kernels_cu/attention/strided_copy.cu). ``dst`` may be
    narrower than ``src`` (a crop) or wider (zero padding)."""
    batch, seqlen, heads, cols = dst.shape
    rows = batch * seqlen * heads
    if rows == 0 or cols == 0:
        return
    key = dispatch.STRIDED_COPY_KEY
    fn = jit.get_function(key, dispatch.compile_arch(*cc), dst.device, 0)
    # One warp a row; past 32 CTAs an SM the grid-stride loop takes the rest.
    grid = min(-(-rows // key.warps), 32 * _sm_count(dst.device))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    _launch_args(fn, grid, key.threads, stream, (
        ptr(src.ptr), ptr(dst.ptr), i32(batch), i32(seqlen), i32(heads), i32(cols), i32(min(src.shape[3], cols)),
        *(i64(x) for x in src.strides), *(i64(x) for x in dst.strides[:3])))


# merge_states.cu's MergeParams: per state (out, lse, out strides b/s/h/col, lse strides b/h/s), then the
# merged out's, then n, batch, seqlen, heads, cols (tests/test_kvcache_gpu.py reads cf_merge_params_bytes).
_MERGE_STATE = "QQ4q3q"
MERGE_PARAMS = struct.Struct("<" + _MERGE_STATE * dispatch.MERGE_MAX_STATES + _MERGE_STATE + "5i4x")
_MERGE_POINTER_OFFSETS = tuple(i * struct.calcsize("<" + _MERGE_STATE) + j
                               for i in range(dispatch.MERGE_MAX_STATES + 1) for j in (0, 8))


def merge_states(outs: list, lses: list, out: DeviceArray, lse: DeviceArray, *, stream: int, cc: tuple) -> None:
    """out, lse = the merge of up to dispatch.MERGE_MAX_STATES states (merge_states.cu): ``outs`` (batch,
    seqlen, heads, head_dim) views of one element type, ``lses`` float32 (batch, heads, seqlen) views, any
    strides; ``out`` of the same shape (its own element type), ``lse`` float32."""
    n = len(outs)
    assert 1 <= n <= dispatch.MERGE_MAX_STATES and len(lses) == n
    batch, seqlen, heads, cols = out.shape
    rows = batch * seqlen * heads
    if rows == 0:
        return
    key = dispatch.merge_states_key(outs[0].dtype, out.dtype)
    fn = jit.get_function(key, dispatch.compile_arch(*cc), out.device, 0)
    fields = []
    for o, x in zip(outs, lses):
        fields += [o.ptr, x.ptr, *o.strides, *x.strides]
    fields += [0, 0, 0, 0, 0, 0, 0, 0, 0] * (dispatch.MERGE_MAX_STATES - n)
    fields += [out.ptr, lse.ptr, *out.strides, *lse.strides, n, batch, seqlen, heads, cols]
    buf = ctypes.create_string_buffer(MERGE_PARAMS.pack(*fields), MERGE_PARAMS.size)
    argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
    from cupy.cuda import driver
    # One CTA a row; past 8 CTAs an SM (of 256 threads: a full SM) the grid-stride loop takes the rest.
    grid = min(rows, 8 * _sm_count(out.device))
    rec = recording.current()
    if rec is not None:
        rec.launch(fn, grid, 1, key.threads, 0, buf.raw, (0,), _MERGE_POINTER_OFFSETS)
    driver.launchKernel(fn.ptr, grid, 1, 1, key.threads, 1, 1, 0, stream, ctypes.addressof(argv), 0)


def dropout_mask(mask: DeviceArray, *, seed: int, offset: int, threshold: int, stream: int, cc: tuple) -> None:
    """Writes the dropout keep mask of a call (dropout_mask.cu) into ``mask``, a contiguous one-byte
    (batch, heads, seqlen_q, seqlen_k) array: 1 where the element is kept (cuflash/dropout.py's rule)."""
    batch, heads, seqlen_q, seqlen_k = mask.shape
    items = batch * heads * seqlen_q * (-(-seqlen_k // 8))
    if items == 0:
        return
    key = dispatch.DROPOUT_MASK_KEY
    fn = jit.get_function(key, dispatch.compile_arch(*cc), mask.device, 0)
    grid = min(-(-items // key.threads), 32 * _sm_count(mask.device))
    i32, u64 = ctypes.c_int32, ctypes.c_uint64
    _launch_args(fn, grid, key.threads, stream, (ctypes.c_void_p(mask.ptr), i32(batch * heads), i32(seqlen_q),
                                                 i32(seqlen_k), u64(seed), u64(offset), ctypes.c_uint32(threshold)))


def kvcache_append(k_cache: DeviceArray, v_cache: DeviceArray, k_new, v_new, cache_seqlens, cache_seqlens_value: int,
                   leftpad, cu_q: DeviceArray, cu_k: DeviceArray, seqused_k: DeviceArray, *, seqlen_q: int,
                   stream: int, cc: tuple, block_table=None, page_size: int = 0, seqused_q=None,
                   seqused_q_value: int = 0) -> None:
    """The KV-cache append and the variable-length indices (kvcache_append.cu): ``k_new``/``v_new`` (batch,
    seqlen_new, heads_k, d) views (or None) into the (batch, seqlen_cache, heads_k, d) caches at
    ``cache_seqlens`` (an int32 view, or None for ``cache_seqlens_value``); writes cu_q, cu_k (batch + 1,)
    and seqused_k (batch,) for the variable-length forward, and ``seqused_q`` (an int32 (batch,) view, or
    None) set to ``seqused_q_value``. Unit column strides. Paged (``block_table`` an
    int32 (batch, max_pages) view): the caches are (num_pages, page_size, heads, d) views, a sequence's
    capacity max_pages * page_size."""
    batch, seqlen_cache, heads, d = k_cache.shape
    num_pages = 0
    if block_table is not None:
        num_pages, seqlen_cache = k_cache.shape[0], block_table.shape[1] * page_size
    batch = cu_q.shape[0] - 1
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    key = dispatch.KVCACHE_APPEND_KEY
    fn = jit.get_function(key, dispatch.compile_arch(*cc), k_cache.device, 0)
    rows = batch * seqlen_new * heads
    grid = max(1, min(-(-max(rows, 1) // key.warps), 32 * _sm_count(k_cache.device)))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    news = [(0, (0, 0, 0)) if x is None else (x.ptr, x.strides[:3]) for x in (k_new, v_new)]
    _launch_args(fn, grid, key.threads, stream, (
        ptr(k_cache.ptr), ptr(v_cache.ptr), ptr(news[0][0]), ptr(news[1][0]),
        ptr(0 if cache_seqlens is None else cache_seqlens.ptr), recording.CallScalar(cache_seqlens_value),
        ptr(0 if leftpad is None else leftpad.ptr), ptr(cu_q.ptr), ptr(cu_k.ptr), ptr(seqused_k.ptr),
        ptr(0 if seqused_q is None else seqused_q.ptr), i32(seqused_q_value),
        i32(batch), i32(seqlen_q), i32(seqlen_new), i32(seqlen_cache), i32(heads), i32(d),
        *(i64(x) for x in k_cache.strides[:3]), *(i64(x) for x in v_cache.strides[:3]),
        *(i64(x) for x in news[0][1]), *(i64(x) for x in news[1][1]),
        ptr(0 if block_table is None else block_table.ptr), i64(0 if block_table is None else block_table.strides[0]),
        i32(page_size), i32(num_pages)))


def rotary(x: DeviceArray, out: DeviceArray, cos: DeviceArray, sin: DeviceArray, cache_seqlens,
           cache_seqlens_value: int, leftpad, *, per_row: bool, interleaved: bool, stream: int, cc: tuple) -> None:
    """``out`` (contiguous, x's shape) = x (batch, seqlen, heads, d) with its first 2 * cos.shape[1] columns
    rotated (rotary.cu): row i of sequence b at position cache_seqlens[b] - leftpad[b] (+ i with
    ``per_row``); cos / sin (seqlen_ro, rotary_dim / 2) of x's dtype with a unit column stride."""
    batch, seqlen, heads, d = x.shape
    total = batch * seqlen * heads * d
    if total == 0:
        return
    key = dispatch.ROTARY_KEYS["bf16" if x.dtype == "bfloat16" else "fp16"]
    fn = jit.get_function(key, dispatch.compile_arch(*cc), x.device, 0)
    grid = min(-(-total // key.threads), 32 * _sm_count(x.device))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    _launch_args(fn, grid, key.threads, stream, (
        ptr(out.ptr), ptr(x.ptr), ptr(cos.ptr), ptr(sin.ptr), ptr(0 if cache_seqlens is None else cache_seqlens.ptr),
        recording.CallScalar(cache_seqlens_value), ptr(0 if leftpad is None else leftpad.ptr),
        i32(per_row), i32(interleaved), i32(batch), i32(seqlen), i32(heads), i32(d), i32(cos.shape[1]),
        i32(cos.shape[0]), i64(cos.strides[0]),
        *(i64(s_) for s_ in x.strides[:3])))


_memset_d32 = None
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4}


def fill_float32(a: DeviceArray, value: float, *, stream: int) -> None:
    """Fills a contiguous float32 array with ``value`` on ``stream`` (cuMemsetD32Async: no kernel)."""
    _fill_words(a, struct.unpack("<I", struct.pack("<f", value))[0], stream)


def fill_int32(a: DeviceArray, value: int, *, stream: int) -> None:
    """Fills a contiguous int32 array with ``value`` on ``stream``."""
    _fill_words(a, value & 0xFFFFFFFF, stream)


def _fill_words(a: DeviceArray, bits: int, stream: int) -> None:
    count = math.prod(a.shape)
    if count == 0:
        return
    rec = recording.current()
    if rec is not None:
        rec.memset("memset32", a.ptr, bits, count)
    memset_words(a.ptr, bits, count, stream)


def memset_words(ptr: int, bits: int, count: int, stream: int) -> None:
    """``count`` 32-bit words from ``ptr`` set to ``bits`` on ``stream`` (cuMemsetD32Async)."""
    global _memset_d32
    if _memset_d32 is None:
        fn = ctypes.CDLL("libcuda.so.1").cuMemsetD32Async
        fn.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _memset_d32 = fn
    err = _memset_d32(ptr, bits, count, stream)
    if err:
        raise RuntimeError(f"cuMemsetD32Async failed (CUresult {err})")


def fill_zero(a: DeviceArray, *, stream: int) -> None:
    """Zeroes a contiguous array on ``stream``."""
    nbytes = math.prod(a.shape) * _ITEMSIZE[a.dtype]
    if nbytes:
        _memset_bytes(a.ptr, nbytes, stream)


def _memset_bytes(ptr: int, nbytes: int, stream: int) -> None:
    from cupy.cuda import runtime
    rec = recording.current()
    if rec is not None:
        rec.memset("memset8", ptr, 0, nbytes)
    runtime.memsetAsync(ptr, 0, nbytes, stream)


_SM_COUNT: dict = {}


def _sm_count(device: int) -> int:
    n = _SM_COUNT.get(device)
    if n is None:
        import cupy
        n = _SM_COUNT[device] = int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
    return n


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, lse: DeviceArray, alibi, *,
            causal: bool, window_size, softmax_scale: float, softcap: float, stream: int, cc: tuple,
            framework: str, dropout=None, mask=None, block_mask=None) -> launch_plan.ForwardPlan:
    """The dense forward (launch_plan.forward) into ``out`` and ``lse``; ``dropout`` None or an
    api._Dropout (p, seed, offset, a device state and its view, or None): p picks the plan, the rest goes into this launch
    only; ``mask`` None or the attn_mask's
    (batch, heads_q, seqlen_q, seqlen_k) view (launch_plan.forward); ``block_mask`` None or a checked
    cuflash.BlockMask, whose tables (uploaded once per device and tiling) this launch reads."""
    fp = launch_plan.forward(q, k, v, out, alibi, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                             softcap=softcap, cc=cc, sm_count=_sm_count(q.device),
                             dropout_p=0.0 if dropout is None else dropout[0], mask=mask,
                             block_size=None if block_mask is None else block_mask.block_size)
    pointers = {"q": q.ptr, "k": k.ptr, "v": v.ptr, "o": out.ptr, "lse": lse.ptr,
                "alibi": 0 if alibi is None else alibi.ptr, "attn_mask": 0 if mask is None else mask.ptr}
    if fp.block_tables is not None:
        pointers.update(_block_pointers(block_mask, "fwd", q, k, fp.block_tables))
    if dropout is not None:
        pointers["dropout_seed"], pointers["dropout_offset"] = dropout.seed, dropout.offset
        if dropout.state_view is not None:
            pointers["dropout_rng"] = dropout.state_view.ptr
    counter_native = _tile_counter(fp, pointers, framework, q.device, stream)
    views = {"q": q, "k": k, "v": v, "o": out}
    _launch(fp.launch, stream, pointers, views)
    del counter_native  # freed after enqueueing: stream-ordered allocators reuse it safely
    return fp


def _block_pointers(block_mask, direction: str, q: DeviceArray, k: DeviceArray, tables: tuple) -> dict:
    """The parameter-block fields of a block mask's device tables for this kernel's tiling (plan.block_tables)."""
    t = block_mask.device_tables(q.device, direction=direction, batch=q.shape[0], heads_q=q.shape[2],
                                 heads_k=k.shape[2], tile_m=tables[0], tile_n=tables[1], window_left=tables[2],
                                 window_right=tables[3])
    return {"attn_mask": t.store, "block_lists": t.lists, "block_counts": t.counts, "block_order": t.order,
            "block_batch_stride": t.batch_stride, "block_head_stride": t.head_stride, "block_list_len": t.list_len}


def _tile_counter(fp, pointers: dict, framework: str, device: int, stream: int):
    """Persistent CTAs take tiles from an int32 counter that is zero when the launch starts: the stream's
    (:func:`stream_tile_counter`) or, where that is None, one allocated and zeroed here (its pointer goes
    into ``pointers``). Returns the framework array that owns a new counter (None otherwise), to be kept
    alive until the launch is enqueued."""
    if not fp.tile_counter:
        return None
    ptr = stream_tile_counter(framework, device, stream)
    if ptr is not None:
        pointers["tile_counter"] = ptr
        return None
    native, counter = arrays.empty(framework, (1,), "int32", device, stream)
    _memset_bytes(counter.ptr, 4, stream)
    pointers["tile_counter"] = counter.ptr
    return native


# Work-tile counters by (device, stream): see stream_tile_counter. 1024 streams at most (4 bytes each, in
# the framework's pool); a call on a stream past those allocates its own.
_stream_counters: dict = {}
_STREAM_COUNTERS_MAX = 1024
_PER_THREAD_STREAM = 2  # cudaStreamPerThread / CU_STREAM_PER_THREAD: one handle, a different stream per thread


def stream_tile_counter(framework: str, device: int, stream: int):
    """The address of ``stream``'s work-tile counter for persistent Hopper forwards, zero whenever a launch
    on the stream starts: the last CTA of each launch to take a tile puts it back to zero (fwd_sm90.cu,
    ``produce``), and launches on one stream run one after another, so one counter serves them all and a
    call needs neither an allocation nor a memset (issue 14). None where a call must have its own: while
    ``stream`` is being captured into a CUDA graph (a graph's replays may run beside eager launches on that
    stream; its own counter and memset node come from the graph's pool) or a launch recording is active (a
    replay must not reach memory of the recorded call), and past the table's limit."""
    from cupy.cuda import runtime
    if recording.current() is not None or runtime.streamIsCapturing(stream) != runtime.streamCaptureStatusNone:
        return None
    key = (device, stream, threading.get_ident() if stream == _PER_THREAD_STREAM else 0)
    hit = _stream_counters.get(key)
    if hit is None:
        if len(_stream_counters) >= _STREAM_COUNTERS_MAX:
            return None
        native, counter = arrays.empty(framework, (1,), "int32", device, stream)
        _memset_bytes(counter.ptr, 4, stream)
        hit = _stream_counters[key] = (counter.owner if native is None else native, counter.ptr)
    return hit[1]


def forward_varlen(q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, lse: DeviceArray, alibi,
                   cu_seqlens_q: DeviceArray, cu_seqlens_k: DeviceArray, seqused_q, seqused_k, *, max_seqlen_q: int,
                   max_seqlen_k: int, causal: bool, window_size, softmax_scale: float, softcap: float, stream: int,
                   cc: tuple, framework: str, fill: bool = True, num_splits: int = 1, block_table=None,
                   page_size: int = 0):
    """The variable-length forward (launch_plan.forward_varlen): ``out`` is zeroed and ``lse`` set to +inf
    first, so rows no sequence covers (past cu_seqlens_q[-1], past seqused_q) read as rows that see no key;
    ``fill=False`` leaves that to the caller (views whose extent is not their memory's, as packed heads).

    ``num_splits`` > 1 (split-KV decoding): ``out`` and ``lse`` (which may be None) are not written; returns
    the partial states (framework arrays to keep alive, o_accum (splits, batch * max_seqlen_q, heads_q,
    padded d) and lse_accum (splits, heads_q, batch * max_seqlen_q) fp32 views, query i of sequence b at
    row b * max_seqlen_q + i), every covered row of every split written, for merge_states.

    ``block_table`` (an int32 (batch, max_pages) view) with ``page_size``: k and v are paged caches' rows
    (launch_plan.forward_varlen's ``paged``)."""
    paged = None
    if block_table is not None:
        paged = (page_size, k.shape[1] // page_size, block_table.strides[0])
    fp = launch_plan.forward_varlen(q, k, v, out, alibi, batch=cu_seqlens_q.shape[0] - 1, max_seqlen_q=max_seqlen_q,
                                    max_seqlen_k=max_seqlen_k, causal=causal, window_size=window_size,
                                    softmax_scale=softmax_scale, softcap=softcap, cc=cc, sm_count=_sm_count(q.device),
                                    num_splits=num_splits, paged=paged)
    if fill and fp.accum_shapes is None:
        fill_zero(out, stream=stream)
        fill_float32(lse, math.inf, stream=stream)
    pointers = {"q": q.ptr, "k": k.ptr, "v": v.ptr, "o": out.ptr, "lse": 0 if lse is None else lse.ptr,
                "alibi": 0 if alibi is None else alibi.ptr, "cu_seqlens_q": cu_seqlens_q.ptr,
                "cu_seqlens_k": cu_seqlens_k.ptr, "seqused_q": 0 if seqused_q is None else seqused_q.ptr,
                "seqused_k": 0 if seqused_k is None else seqused_k.ptr,
                "block_table": 0 if block_table is None else block_table.ptr}
    partials = None
    if fp.accum_shapes is not None:
        o_native, o_acc = arrays.empty(framework, fp.accum_shapes[0], "float32", q.device, stream)
        l_native, l_acc = arrays.empty(framework, fp.accum_shapes[1], "float32", q.device, stream)
        pointers["o_accum"], pointers["lse_accum"] = o_acc.ptr, l_acc.ptr
        partials = ((o_native, l_native), o_acc, l_acc)
    if fp.launch.grid == 0:
        return partials
    counter_native = _tile_counter(fp, pointers, framework, q.device, stream)
    views = {"q": q, "k": k, "v": v, "o": out}
    _launch(fp.launch, stream, pointers, views)
    del counter_native
    return partials


def backward_varlen(dout: DeviceArray, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray,
                    lse: DeviceArray, alibi, dq: DeviceArray, dk: DeviceArray, dv: DeviceArray,
                    cu_seqlens_q: DeviceArray, cu_seqlens_k: DeviceArray, seqused_q, seqused_k, *, max_seqlen_q: int,
                    max_seqlen_k: int, causal: bool, window_size, softmax_scale: float, softcap: float,
                    deterministic: bool, stream: int, cc: tuple, framework: str) -> None:
    """The variable-length backward (launch_plan.backward_varlen): dq, dk, dv (contiguous) are zeroed first,
    so rows no sequence covers (past cu_seqlens[-1], past seqused) come out as zero gradients."""
    bp = launch_plan.backward_varlen(dout, q, k, v, out, alibi, dq, dk, dv, batch=cu_seqlens_q.shape[0] - 1,
                                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
                                     window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
                                     deterministic=deterministic, cc=cc)
    for g in (dq, dk, dv):
        fill_zero(g, stream=stream)
    heads_q, total_q = q.shape[2], q.shape[1]
    delta_native, delta = arrays.empty(framework, (heads_q, total_q), "float32", q.device, stream)
    acc_native = None
    if bp.dq_accum_shape is not None:
        acc_native, acc = arrays.empty(framework, bp.dq_accum_shape, "float32", q.device, stream)
    pointers = {"q": q.ptr, "k": k.ptr, "v": v.ptr, "alibi": 0 if alibi is None else alibi.ptr, "o": out.ptr,
                "lse": lse.ptr, "dout": dout.ptr, "delta": delta.ptr,
                "dq_accum": 0 if bp.dq_accum_shape is None else acc.ptr, "dq": dq.ptr,
                "dk": dk.ptr, "dv": dv.ptr, "cu_seqlens_q": cu_seqlens_q.ptr, "cu_seqlens_k": cu_seqlens_k.ptr,
                "seqused_q": 0 if seqused_q is None else seqused_q.ptr,
                "seqused_k": 0 if seqused_k is None else seqused_k.ptr}
    views = {"q": q, "k": k, "v": v, "dout": dout}
    for launch in bp.launches:
        if launch.grid:
            accumulator = None if bp.dq_accum_shape is None else (acc.ptr, bp.dq_accum_shape)
            _launch(launch, stream, pointers, views, accumulator)
    del acc_native, delta_native  # freed after enqueueing: stream-ordered allocators reuse them safely


def backward(dout: DeviceArray, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray,
             lse: DeviceArray, alibi, dq: DeviceArray, dk: DeviceArray, dv: DeviceArray, *, causal: bool, window_size,
             softmax_scale: float, softcap: float, deterministic: bool, stream: int, cc: tuple,
             framework: str, dropout=None, mask=None, block_mask=None) -> launch_plan.BackwardPlan:
    """The backward's kernels (launch_plan.backward says which), with workspaces from the caller's framework on its
    stream (CUDA-graph capture needs that); ``dropout`` None or the forward's api._Dropout; ``mask`` and
    ``block_mask`` as :func:`forward`'s."""
    bp = launch_plan.backward(dout, q, k, v, out, alibi, dq, dk, dv, causal=causal, window_size=window_size,
                              softmax_scale=softmax_scale, softcap=softcap, deterministic=deterministic, cc=cc,
                              dropout_p=0.0 if dropout is None else dropout[0], mask=mask,
                              block_size=None if block_mask is None else block_mask.block_size)
    batch, seqlen_q, heads_q = q.shape[:3]
    delta_native = acc_native = acc = None
    if bp.delta_in_dq:
        delta_ptr = dq.ptr
    else:
        delta_native, delta = arrays.empty(framework, (batch, heads_q, seqlen_q), "float32", q.device, stream)
        delta_ptr = delta.ptr
    pointers = {"q": q.ptr, "k": k.ptr, "v": v.ptr, "alibi": 0 if alibi is None else alibi.ptr, "o": out.ptr,
                "lse": lse.ptr, "dout": dout.ptr, "delta": delta_ptr, "dq": dq.ptr, "dk": dk.ptr, "dv": dv.ptr,
                "attn_mask": 0 if mask is None else mask.ptr}
    if bp.block_tables is not None:
        pointers.update(_block_pointers(block_mask, "bwd", q, k, bp.block_tables))
    if dropout is not None:
        pointers["dropout_seed"], pointers["dropout_offset"] = dropout.seed, dropout.offset
        if dropout.state_view is not None:
            pointers["dropout_rng"] = dropout.state_view.ptr
    if bp.dq_accum_shape is not None:
        acc_native, acc = arrays.empty(framework, bp.dq_accum_shape, "float32", q.device, stream)
        pointers["dq_accum"] = acc.ptr
    semaphore_native = None
    if bp.dq_semaphore_shape is not None:  # zeroed by the preprocess
        semaphore_native, semaphore = arrays.empty(framework, bp.dq_semaphore_shape, "int32", q.device, stream)
        pointers["dq_semaphore"] = semaphore.ptr
    views = {"q": q, "k": k, "v": v, "dout": dout}
    for launch in bp.launches:
        _launch(launch, stream, pointers, views, None if bp.dq_accum_shape is None else (acc.ptr, bp.dq_accum_shape))
    del acc_native, delta_native, semaphore_native  # freed after enqueueing: stream-ordered allocators reuse them
    return bp
