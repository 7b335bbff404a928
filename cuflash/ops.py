"""Kernel launches on framework-neutral device views: fill the parameter block, pick the variant, launch.

Everything here runs on the caller's stream and never synchronizes the host. Arguments arrive validated
(api.py); this layer only translates them into what the kernels expect.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading

from . import arrays, dispatch, jit, params_layout, tma
from .arrays import DeviceArray

_LOG2E = 1.4426950408889634

# The parameter block's fields, packing and offsets: one description (params_layout.py) that params.cuh is
# generated from.
_INDEX = params_layout.INDEX
_STRUCT = params_layout.STRUCT
PARAMS_DTYPE = params_layout.DTYPE


class Params:
    """The launch parameter block, filled by field name and packed once per launch."""

    __slots__ = ("values",)

    def __init__(self):
        self.values = [0] * len(_INDEX)
        for name in params_layout.FLOAT_FIELDS:
            self.values[_INDEX[name]] = 0.0

    def __setitem__(self, name, value):
        self.values[_INDEX[name]] = value

    def __getitem__(self, name):
        return self.values[_INDEX[name]]


def _set_strides(p: Params, name: str, a: DeviceArray) -> None:
    # (batch, seqlen, heads, head_dim) views: row = sequence position.
    i = _INDEX[f"{name}_batch_stride"]
    p.values[i:i + 3] = a.strides[:3]


_tls = threading.local()

# The Hopper kernels take their tensor maps first, then the block above: `struct ForwardSm90Params { TmaMap
# q, k, v, o; AttentionParams a; }` and `struct BackwardSm90Params { TmaMap q, k, v, dout, dq_accum;
# AttentionParams a; }`: 64-byte-aligned 128-byte maps, and sizeof rounds up to that alignment.
def sm90_params_bytes(n_maps: int) -> int:
    return -(-(n_maps * tma.MAP_BYTES + _STRUCT.size) // 64) * 64


SM90_PARAMS_BYTES = sm90_params_bytes(4)


def _launch(fn, grid: int, threads: int, smem: int, stream: int, params: Params, maps: tuple = ()) -> None:
    from cupy.cuda import driver
    # One by-value struct argument: kernelParams is an array holding one pointer to the struct's bytes,
    # which the driver copies during the launch call (and into a graph node at capture), so the buffer
    # can be reused by the next launch of this thread. Tensor maps, when the kernel takes them, come first.
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    size = sm90_params_bytes(len(maps)) if maps else _STRUCT.size
    hit = bufs.get(size)
    if hit is None:
        buf = ctypes.create_string_buffer(size)
        hit = bufs[size] = (buf, (ctypes.c_void_p * 1)(ctypes.addressof(buf)))
    buf, argv = hit
    offset = 0
    for m in maps:
        ctypes.memmove(ctypes.addressof(buf) + offset, m, tma.MAP_BYTES)
        offset += tma.MAP_BYTES
    _STRUCT.pack_into(buf, offset, *params.values)
    driver.launchKernel(fn.ptr, grid, 1, 1, threads, 1, 1, smem, stream, ctypes.addressof(argv), 0)


def _launch_args(fn, grid: int, threads: int, stream: int, args: tuple) -> None:
    """Launches a kernel whose parameters are plain scalars and pointers, passed as ctypes values in the
    kernel signature's order (the driver copies them during the call)."""
    from cupy.cuda import driver
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


_memset_d32 = None
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4}


def fill_float32(a: DeviceArray, value: float, *, stream: int) -> None:
    """Fills a contiguous float32 array with ``value`` on ``stream`` (cuMemsetD32Async: no kernel)."""
    global _memset_d32
    count = math.prod(a.shape)
    if count == 0:
        return
    if _memset_d32 is None:
        fn = ctypes.CDLL("libcuda.so.1").cuMemsetD32Async
        fn.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _memset_d32 = fn
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    err = _memset_d32(a.ptr, bits, count, stream)
    if err:
        raise RuntimeError(f"cuMemsetD32Async failed (CUresult {err})")


def fill_zero(a: DeviceArray, *, stream: int) -> None:
    """Zeroes a contiguous array on ``stream``."""
    from cupy.cuda import runtime
    nbytes = math.prod(a.shape) * _ITEMSIZE[a.dtype]
    if nbytes:
        runtime.memsetAsync(a.ptr, 0, nbytes, stream)


_SM_COUNT: dict = {}


def _sm_count(device: int) -> int:
    n = _SM_COUNT.get(device)
    if n is None:
        import cupy
        n = _SM_COUNT[device] = int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
    return n


def common_params(q: DeviceArray, k: DeviceArray, v: DeviceArray, alibi, *, causal: bool, window_size,
                  softmax_scale: float, softcap: float) -> Params:
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    p = Params()
    p["q"], p["k"], p["v"] = q.ptr, k.ptr, v.ptr
    _set_strides(p, "q", q)
    _set_strides(p, "k", k)
    _set_strides(p, "v", v)
    if alibi is not None:
        p["alibi"] = alibi.ptr
        p["alibi_batch_stride"] = alibi.strides[0] if len(alibi.shape) == 2 else 0
    p["batch"], p["heads_q"], p["heads_k"] = batch, heads_q, heads_k
    p["seqlen_q"], p["seqlen_k"], p["head_dim"] = seqlen_q, seqlen_k, head_dim
    unbounded = seqlen_q + seqlen_k
    left, right = window_size
    if causal:
        right = 0
    p["window_left"] = unbounded if left < 0 else min(left, unbounded)
    p["window_right"] = unbounded if right < 0 else min(right, unbounded)
    p["softmax_scale"] = softmax_scale
    p["softcap"] = softcap
    # With softcap or ALiBi the kernel turns raw products into final scores before the softmax, so the
    # exponent multiplier is log2(e) alone; otherwise the scale folds into it.
    p["scale_log2"] = _LOG2E if (softcap > 0 or alibi is not None) else softmax_scale * _LOG2E
    return p


def is_local(causal: bool, window_size) -> bool:
    return causal or window_size[0] >= 0 or window_size[1] >= 0


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, lse: DeviceArray, alibi, *,
            causal: bool, window_size, softmax_scale: float, softcap: float, stream: int, cc: tuple,
            framework: str) -> None:
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    arch = dispatch.compile_arch(*cc)
    local = is_local(causal, window_size)
    # The Hopper kernel reads and writes through TMA; a view TMA cannot describe (a broadcast head, say)
    # runs on the sm80 kernel instead, which handles any 16-byte-aligned layout.
    hopper = dispatch.forward_family(cc) == "fwd_sm90" and tma.supports(q, k, v, out)
    if hopper:
        key = dispatch.forward_key_sm90(dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None)
        smem = dispatch.forward_sm90_smem_bytes(key)
    else:
        key = dispatch.forward_key(dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None,
                                   smem_limit=dispatch.max_smem(*cc))
        smem = dispatch.forward_smem_bytes(key)
    fn = jit.get_function(key, arch, q.device, smem)
    p = common_params(q, k, v, alibi, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                      softcap=softcap)
    p["o"], p["lse"] = out.ptr, lse.ptr
    _set_strides(p, "o", out)
    batch, seqlen_q, heads_q = q.shape[:3]
    p["num_m_blocks"] = m_blocks = -(-seqlen_q // key.block_m)
    maps = ()
    if hopper:
        p["bh_group"] = dispatch.launch_group(batch * heads_q, k.shape[1], key.head_dim)
        maps = (tma.tile_map(q, key.block_m), tma.tile_map(k, key.block_n), tma.tile_map(v, key.block_n),
                tma.tile_map(out, 64))  # each consumer warpgroup stores its own 64 rows
    tiles = m_blocks * batch * heads_q
    grid, use_counter = (dispatch.forward_sm90_schedule(key, tiles, k.shape[1], _sm_count(q.device)) if hopper
                         else (tiles, False))
    counter_native = None
    if use_counter:
        # Persistent CTAs take tiles from a counter that starts at zero on the caller's stream.
        from cupy.cuda import runtime
        counter_native, counter = arrays.empty(framework, (1,), "int32", q.device, stream)
        runtime.memsetAsync(counter.ptr, 0, 4, stream)
        p["tile_counter"] = counter.ptr
    _launch(fn, grid, key.threads, smem, stream, p, maps)
    del counter_native  # freed after enqueueing: stream-ordered allocators reuse it safely


def backward(dout: DeviceArray, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray,
             lse: DeviceArray, alibi, dq: DeviceArray, dk: DeviceArray, dv: DeviceArray, *, causal: bool, window_size,
             softmax_scale: float, softcap: float, deterministic: bool, stream: int, cc: tuple, framework: str) -> None:
    """preprocess (delta, zero dQ accumulator) -> KV-parallel main kernel (dK, dV, dQ summed into the fp32
    accumulator: atomics on sm80, TMA reductions on the Hopper kernel) -> postprocess (dQ).

    Deterministic mode replaces the accumulation and the postprocess by a Q-parallel dQ kernel (sm80).
    """
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    arch = dispatch.compile_arch(*cc)
    pre, post, main, dq_key = dispatch.backward_keys(
        dtype, q.shape[3], is_local=is_local(causal, window_size), softcap=softcap > 0, alibi=alibi is not None,
        deterministic=deterministic, smem_limit=dispatch.max_smem(*cc))
    batch, seqlen_q, heads_q = q.shape[:3]
    seqlen_k, heads_k = k.shape[1], k.shape[2]

    # Workspaces come from the caller's framework, on its stream (CUDA-graph capture needs that).
    # delta (fp32, batch x heads x seqlen_q) is read only up to the main kernel, and with atomic dQ the
    # only writer of dq is the postprocess, after it: so delta borrows dq's first bytes (dq holds head_dim / 2
    # >= 4 times as many), which keeps the peak memory of the backward at FlashAttention-2's.
    _delta_native = None
    if not deterministic and dq.strides == (seqlen_q * heads_q * q.shape[3], heads_q * q.shape[3], q.shape[3], 1):
        delta_ptr = dq.ptr
    else:
        _delta_native, delta = arrays.empty(framework, (batch, heads_q, seqlen_q), "float32", q.device, stream)
        delta_ptr = delta.ptr
    acc_native = None
    p = common_params(q, k, v, alibi, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                      softcap=softcap)
    p["o"], p["lse"], p["dout"], p["delta"] = out.ptr, lse.ptr, dout.ptr, delta_ptr
    p["dq"], p["dk"], p["dv"] = dq.ptr, dk.ptr, dv.ptr
    for name, a in (("o", out), ("do", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        _set_strides(p, name, a)
    if not deterministic:
        acc_native, acc = arrays.empty(framework, (batch, seqlen_q, heads_q, main.head_dim), "float32", q.device, stream)
        p["dq_accum"] = acc.ptr

    dev = q.device
    rows_grid = math.ceil(seqlen_q / dispatch.BWD_PREPOST_ROWS) * batch * heads_q
    _launch(jit.get_function(pre, arch, dev, 0), rows_grid, pre.threads, 0, stream, p)

    # The Hopper main kernel reads Q, K, V and dO through TMA; views TMA cannot describe run on sm80.
    maps = ()
    if dispatch.backward_family(cc, q.shape[3], deterministic) == "bwd_sm90" and tma.supports(q, k, v, dout):
        main = dispatch.backward_key_sm90(dtype, q.shape[3], is_local=is_local(causal, window_size),
                                          softcap=softcap > 0, alibi=alibi is not None)
        smem = dispatch.backward_sm90_smem_bytes(main)
        # Each consumer warpgroup adds a 64 x 64 block of dQ into dq_accum (query rows x head-dim columns).
        maps = (tma.tile_map(q, main.block_m), tma.tile_map(k, main.block_n), tma.tile_map(v, main.block_n),
                tma.tile_map(dout, main.block_m),
                tma.accumulator_map(acc.ptr, (batch, seqlen_q, heads_q, main.head_dim), 64, 64))
    else:
        smem = dispatch.backward_smem_bytes(main)
    p["num_n_blocks"] = math.ceil(seqlen_k / main.block_n)
    _launch(jit.get_function(main, arch, dev, smem), p["num_n_blocks"] * batch * heads_k, main.threads, smem,
            stream, p, maps)

    if deterministic:
        smem = dispatch.dq_smem_bytes(dq_key)
        p["num_m_blocks"] = math.ceil(seqlen_q / dq_key.block_m)
        p["num_n_blocks"] = math.ceil(seqlen_k / dq_key.block_n)
        _launch(jit.get_function(dq_key, arch, dev, smem), p["num_m_blocks"] * batch * heads_q, dq_key.threads,
                smem, stream, p)
    else:
        _launch(jit.get_function(post, arch, dev, 0), rows_grid, post.threads, 0, stream, p)
    del acc_native, _delta_native  # freed after enqueueing: stream-ordered allocators reuse them safely
