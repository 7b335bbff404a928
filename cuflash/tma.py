"""Tensor maps (CUtensorMap) for the Hopper kernels' TMA loads and stores, encoded by the CUDA driver.

CuPy has no tensor-map API, so the driver's ``cuTensorMapEncodeTiled`` is called through ctypes; the
128 opaque bytes it fills travel inside the kernel's parameter block (see ops.py). A map encodes only an
address, a shape, strides and a box, so it is cached on exactly those: memory reused at the same address
with the same layout may reuse the map.
"""

from __future__ import annotations

import ctypes

from .arrays import DeviceArray

MAP_BYTES = 128
_DATA_TYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_FLOAT32 = 7                                # CU_TENSOR_MAP_DATA_TYPE_FLOAT32
_SWIZZLE_128B = 3       # CU_TENSOR_MAP_SWIZZLE_128B: matches the wgmma descriptors (kernels_cu/ptx/wgmma.cuh)
_L2_PROMOTION_256B = 3  # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
BOX_COLS = 64           # 128 bytes of 16-bit elements: the widest box the 128-byte swizzle allows

_encode = None
_cache: dict = {}
_CACHE_LIMIT = 512


def _encoder():
    global _encode
    if _encode is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _encode = fn
    return _encode


def _byte_strides(a: DeviceArray):
    """Byte strides of the (seqlen, heads, batch) dims as TMA takes them, or None if TMA cannot express the
    view: every stride of a dim longer than 1 must be a positive multiple of 16 bytes. A dim of length 1 is
    never stepped, so its stride is replaced by a legal one."""
    item = 2
    out = []
    for dim in (1, 2, 0):
        s = a.strides[dim] * item
        if a.shape[dim] == 1:
            s = s if (s > 0 and s % 16 == 0) else 16
        elif s <= 0 or s % 16 or s >= 1 << 40:
            return None
        out.append(s)
    return out


def supports(*arrays: DeviceArray) -> bool:
    """Whether every (batch, seqlen, heads, head_dim) view can be read or written by TMA."""
    return all(a.ptr % 16 == 0 and a.strides[3] == 1 and a.dtype in _DATA_TYPE and _byte_strides(a) is not None
               for a in arrays)


def tile_map(a: DeviceArray, box_rows: int) -> bytes:
    """The map of a (batch, seqlen, heads, head_dim) view as the 4-D tensor (head_dim, seqlen, heads, batch),
    box = 64 columns x ``box_rows`` sequence positions of one head, 128-byte swizzle, zero fill."""
    key = (a.ptr, a.dtype, a.shape, a.strides, box_rows)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    strides = _byte_strides(a)
    if strides is None or a.ptr % 16:
        raise ValueError(f"TMA cannot address an array with shape {a.shape} and strides {a.strides}")
    batch, seqlen, heads, head_dim = a.shape
    return _encode_4d(key, _DATA_TYPE[a.dtype], a.ptr, (head_dim, seqlen, heads, batch), strides,
                      (BOX_COLS, box_rows), _SWIZZLE_128B)


def accumulator_map(ptr: int, shape: tuple, box_rows: int, box_cols: int) -> bytes:
    """The map of a contiguous fp32 (batch, seqlen, heads, width) buffer (the backward's dq_accum) as the 4-D
    tensor (width, seqlen, heads, batch), box = ``box_cols`` x ``box_rows`` with the 128-byte swizzle (so
    ``box_cols`` <= 32): the Hopper backward adds whole boxes into it with TMA reductions, rows past seqlen
    clipped."""
    if box_cols * 4 > 128:
        raise ValueError(f"box_cols={box_cols}: the 128-byte swizzle allows at most 32 fp32 columns")
    batch, seqlen, heads, width = shape
    key = (ptr, "float32", shape, box_rows, box_cols)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    strides = (heads * width * 4, width * 4, seqlen * heads * width * 4)
    return _encode_4d(key, _FLOAT32, ptr, (width, seqlen, heads, batch), strides, (box_cols, box_rows),
                      _SWIZZLE_128B)


def _encode_4d(key, data_type: int, ptr: int, dims: tuple, strides: tuple, box: tuple, swizzle: int) -> bytes:
    out = ctypes.create_string_buffer(MAP_BYTES + 64)
    at = (ctypes.addressof(out) + 63) & ~63  # the driver wants the map 64-byte aligned
    c_dims = (ctypes.c_uint64 * 4)(*dims)
    byte_strides = (ctypes.c_uint64 * 3)(*strides)
    c_box = (ctypes.c_uint32 * 4)(box[0], box[1], 1, 1)
    unit = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    err = _encoder()(at, data_type, 4, ptr, c_dims, byte_strides, c_box, unit, 0, swizzle, _L2_PROMOTION_256B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for dims {dims}, "
                           f"byte strides {strides}, box {box[0]}x{box[1]}")
    raw = ctypes.string_at(at, MAP_BYTES)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = raw
    return raw
