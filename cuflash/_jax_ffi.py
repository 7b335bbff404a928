"""cuflash's XLA FFI handler, for cuflash.jax: the attention forward and backward as XLA custom calls on CPU
and CUDA, with no compiled extension. The handler is a ctypes callback that speaks XLA's FFI C ABI
(``xla/ffi/api/c_api.h``, API 0.x: every struct begins with its size, so older and newer XLA versions read
the fields they know), wrapped with ``jax.ffi.pycapsule`` and registered with ``jax.ffi.register_ffi_target``.

At execution XLA calls it with the argument and result buffers. On CUDA it takes XLA's stream through the
FFI API and launches the kernels there (ops.forward / ops.backward, workspaces from CuPy's pool on that
stream); on the CPU it runs the NumPy path into XLA's result buffers. The call's static options do not
travel as attributes: each traced call registers its options tuple here and passes its index as the one
attribute ``opts_id``. Errors come back to XLA as FFI errors, which JAX raises.

Only cuflash.jax imports this module (it imports JAX).
"""

from __future__ import annotations

import ctypes
import math
import threading

import numpy as np

TARGET = "cuflash_attention"

_EXECUTE = 3                    # XLA_FFI_ExecutionStage_EXECUTE
_EXTENSION_METADATA = 1         # XLA_FFI_Extension_Metadata
_ERROR_INVALID_ARGUMENT = 3     # XLA_FFI_Error_Code
_ERROR_INTERNAL = 13
_API_VERSION = (0, 1)           # the FFI API this handler is written against (its structs and fields)
# XLA_FFI_DataType codes of the buffers cuflash takes.
_DTYPES = {10: np.dtype("float16"), 11: np.dtype("float32"), 12: np.dtype("float64"), 16: "bfloat16",
           4: np.dtype("int32")}
_DTYPE_NAMES = {10: "float16", 11: "float32", 12: "float64", 16: "bfloat16", 4: "int32"}


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("items", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _List),
                ("rets", _List), ("attrs", _Attrs)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


class _StreamGetArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("ctx", ctypes.c_void_p),
                ("stream", ctypes.c_void_p)]


class _DeviceOrdinalGetArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("ctx", ctypes.c_void_p),
                ("device_ordinal", ctypes.c_int32)]


_API_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


class _Api(ctypes.Structure):
    """The head of XLA_FFI_Api: the function pointers this handler calls, in the header's order."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", ctypes.c_void_p), ("Error_Create", _API_FN), ("Error_GetMessage", ctypes.c_void_p),
                ("Error_Destroy", ctypes.c_void_p), ("Handler_Register", ctypes.c_void_p), ("Stream_Get", _API_FN),
                ("Type_Register", ctypes.c_void_p), ("ExecutionContext_Get", ctypes.c_void_p),
                ("State_Set", ctypes.c_void_p), ("State_Get", ctypes.c_void_p),
                ("DeviceMemory_Allocate", ctypes.c_void_p), ("DeviceMemory_Free", ctypes.c_void_p),
                ("ThreadPool_Schedule", ctypes.c_void_p), ("ThreadPool_NumThreads", ctypes.c_void_p),
                ("Future_Create", ctypes.c_void_p), ("Future_SetAvailable", ctypes.c_void_p),
                ("Future_SetError", ctypes.c_void_p), ("RunId_Get", ctypes.c_void_p),
                ("DeviceOrdinal_Get", _API_FN)]


class FfiError(Exception):
    """An error the handler reports to XLA with an FFI error code."""

    def __init__(self, message, code=_ERROR_INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


# Options of traced calls, by the index passed as the ``opts_id`` attribute: (kind, platform, options).
_calls: list = []
_calls_lock = threading.Lock()


def register_call(kind: str, options: tuple) -> int:
    """Index of a call's (kind, options) for its ``opts_id`` attribute; equal calls share one index, so that
    retracing the same function does not grow the table."""
    entry = (kind, options)
    with _calls_lock:
        try:
            return _calls.index(entry)
        except ValueError:
            _calls.append(entry)
            return len(_calls) - 1


class _View:
    """One argument or result buffer: address, dtype name and shape."""

    __slots__ = ("ptr", "dtype", "shape")

    def __init__(self, buf: _Buffer):
        if buf.dtype not in _DTYPE_NAMES:
            raise FfiError(f"cuflash: unsupported buffer dtype code {buf.dtype}")
        self.ptr = buf.data or 0
        self.dtype = _DTYPE_NAMES[buf.dtype]
        self.shape = tuple(buf.dims[:buf.rank])  # one slice of the ctypes array: a call per buffer, not per dim

    def numpy(self):
        """A NumPy array over host memory (CPU platform)."""
        dtype = _DTYPES[_dtype_code(self.dtype)]
        if isinstance(dtype, str):
            raise FfiError("cuflash: bfloat16 on the CPU path is not supported (NumPy has no bfloat16)")
        count = int(np.prod(self.shape)) if self.shape else 1
        if count == 0:
            return np.empty(self.shape, dtype)
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype).reshape(self.shape)


def _dtype_code(name: str) -> int:
    return {v: k for k, v in _DTYPE_NAMES.items()}[name]


def _buffers(lst: _List) -> list:
    return [_View(ctypes.cast(lst.items[i], ctypes.POINTER(_Buffer)).contents) for i in range(lst.size)]


def _opts_id(attrs: _Attrs) -> int:
    for i in range(attrs.size):
        span = attrs.names[i].contents
        if ctypes.string_at(span.ptr, span.len) == b"opts_id":
            scalar = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_Scalar)).contents
            return ctypes.cast(scalar.value, ctypes.POINTER(ctypes.c_int64)).contents.value
    raise FfiError("cuflash: the custom call has no opts_id attribute", _ERROR_INTERNAL)


def _merge_leading(shape: tuple, keep: int) -> tuple:
    """Leading dims that vmap added folded into the batch dim (buffers are dense row-major)."""
    lead = shape[:len(shape) - keep + 1]
    return (math.prod(lead), *shape[len(shape) - keep + 1:])


_geometry_cache: dict = {}


def _dense_geometry(shape: tuple, keep: int) -> tuple:
    """(shape with vmap's leading dims merged, its row-major element strides), cached: a jitted model
    calls the handler with the same few shapes every step, and building these tuples per buffer was a
    fifth of the handler's time (bench/NOTES.md, "JAX under jit")."""
    hit = _geometry_cache.get((shape, keep))
    if hit is None:
        merged = _merge_leading(shape, keep)
        strides, acc = [], 1
        for n in reversed(merged):
            strides.append(acc)
            acc *= n
        if len(_geometry_cache) >= 4096:
            _geometry_cache.clear()
        hit = _geometry_cache[(shape, keep)] = (merged, tuple(reversed(strides)))
    return hit


def _run(frame: _CallFrame, platform: str) -> None:
    kind, options = _calls[_opts_id(frame.attrs)]
    args, rets = _buffers(frame.args), _buffers(frame.rets)
    if platform == "cpu":
        _run_cpu(kind, options, args, rets)
    else:
        api = ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents
        _run_cuda(kind, options, args, rets, _stream(api, frame.ctx), _device(api, frame.ctx))


def _stream(api: _Api, ctx) -> int:
    get = _StreamGetArgs(ctypes.sizeof(_StreamGetArgs), None, ctx, None)
    if api.Stream_Get(ctypes.addressof(get)):
        raise FfiError("cuflash: XLA_FFI_Stream_Get failed", _ERROR_INTERNAL)
    return get.stream or 0


def _device(api: _Api, ctx) -> int:
    if api.struct_size < _Api.DeviceOrdinal_Get.offset + ctypes.sizeof(ctypes.c_void_p):
        import cupy
        return cupy.cuda.runtime.getDevice()
    get = _DeviceOrdinalGetArgs(ctypes.sizeof(_DeviceOrdinalGetArgs), None, ctx, 0)
    if api.DeviceOrdinal_Get(ctypes.addressof(get)):
        raise FfiError("cuflash: XLA_FFI_DeviceOrdinal_Get failed", _ERROR_INTERNAL)
    return get.device_ordinal


def _run_cpu(kind, options, args, rets):
    from . import api, varlen
    arrays = [a.numpy() for a in args]
    alibi = arrays.pop() if options[-1] else None
    if not options[-1]:
        arrays.pop()
    if kind.startswith("varlen"):
        causal, scale, window, softcap, max_q, max_k, _ = options
        kw = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap, alibi_slopes=alibi)
        if kind == "varlen_fwd":
            q, k, v, cu_q, cu_k = arrays
            results = varlen.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)
        else:
            dout, q, k, v, out, lse, cu_q, cu_k = arrays
            results = varlen.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, **kw)
        for ret, x in zip(rets, results):
            ret.numpy()[...] = x
        return
    causal, scale, window, softcap, drop, _ = options
    if kind == "fwd":
        q, k, v = (x.reshape(_merge_leading(x.shape, 4)) for x in arrays)
        call = api._Call(q, k, v)
        out, lse = api._forward(call, q, k, v, alibi, causal, scale, window, softcap, True, drop)
        rets[0].numpy()[...] = out.reshape(rets[0].shape)
        rets[1].numpy()[...] = lse.reshape(rets[1].shape)
    else:
        dout, q, k, v, out = (x.reshape(_merge_leading(x.shape, 4)) for x in arrays[:5])
        lse = arrays[5].reshape(_merge_leading(arrays[5].shape, 3))
        call = api._Call(q, k, v)
        grads = api._backward(call, dout, q, k, v, out, lse, alibi, causal, scale, window, softcap, False, drop)
        for ret, g in zip(rets, grads):
            ret.numpy()[...] = g.reshape(ret.shape)


def _run_cuda(kind, options, args, rets, stream: int, device: int):
    from . import api, arrays, ops, varlen

    def view(a: _View, keep: int):
        shape, strides = _dense_geometry(a.shape, keep)
        return arrays.DeviceArray(a.ptr, shape, strides, a.dtype, device)

    cc = api._cc(device)
    if kind.startswith("varlen"):
        causal, scale, window, softcap, max_q, max_k, has_alibi = options
        alibi = view(args[-1], len(args[-1].shape)) if has_alibi else None
        kw = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, causal=causal, softmax_scale=scale, window_size=window,
                  softcap=softcap, fw="cupy", stream=stream, cc=cc)
        with arrays.device_scope("cupy", device):
            if kind == "varlen_fwd":
                q, k, v = (view(a, 3) for a in args[:3])
                index = [view(a, 1) for a in args[3:5]] + [None, None]
                varlen.forward_device(q, k, v, view(rets[0], 3), view(rets[1], 2), alibi, index, **kw)
            else:
                dout, q, k, v, out = (view(a, 3) for a in args[:5])
                index = [view(a, 1) for a in args[6:8]] + [None, None]
                varlen.backward_device(dout, q, k, v, out, view(args[5], 2), alibi, index,
                                       [view(r, 3) for r in rets], deterministic=False, **kw)
        return
    causal, scale, window, softcap, drop, has_alibi = options
    if drop is not None:
        raise FfiError("cuflash.jax: dropout on the GPU is not implemented yet (the kernels have no dropout)")
    alibi = view(args[-1], 1) if has_alibi else None
    with arrays.device_scope("cupy", device):
        if kind == "fwd":
            q, k, v = (view(a, 4) for a in args[:3])
            out, lse = view(rets[0], 4), view(rets[1], 3)
            ops.forward(q, k, v, out, lse, alibi, causal=causal, window_size=window, softmax_scale=scale,
                        softcap=softcap, stream=stream, cc=cc, framework="cupy")
        else:
            dout, q, k, v, out = (view(a, 4) for a in args[:5])
            lse = view(args[5], 3)
            dq, dk, dv = (view(r, 4) for r in rets)
            ops.backward(dout, q, k, v, out, lse, alibi, dq, dk, dv, causal=causal, window_size=window,
                         softmax_scale=scale, softcap=softcap, deterministic=False, stream=stream, cc=cc,
                         framework="cupy")


def _error(frame: _CallFrame, message: str, code: int):
    """An XLA_FFI_Error for XLA to raise (the handler's return value)."""
    api = ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), code)
    return api.Error_Create(ctypes.addressof(args))


def _make_handler(platform: str):
    def handler(frame_ptr):
        frame = frame_ptr.contents
        ext = frame.extension_start
        if ext and ext.contents.type == _EXTENSION_METADATA:  # XLA asks which FFI API this handler speaks
            meta = ctypes.cast(ext, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
            meta.api_version.major_version, meta.api_version.minor_version = _API_VERSION
            meta.traits = 0  # not command-buffer compatible: the launches depend on more than the attributes
            return None
        if frame.stage != _EXECUTE:
            return None
        try:
            _run(frame, platform)
        except FfiError as e:
            return _error(frame, str(e), e.code)
        except (TypeError, ValueError) as e:  # the caller's values (cu_seqlens, max_seqlen) checked at run time
            return _error(frame, f"cuflash: {type(e).__name__}: {e}", _ERROR_INVALID_ARGUMENT)
        except Exception as e:  # noqa: BLE001 - anything else still reaches the caller as an error, not a crash
            return _error(frame, f"cuflash: {type(e).__name__}: {e}", _ERROR_INTERNAL)
        return None
    return _HANDLER_TYPE(handler)


_HANDLER_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))
_handlers: dict = {}


def register(platform: str) -> None:
    """Registers the handler for ``platform`` ("cpu" or "CUDA") once per process."""
    if platform in _handlers:
        return
    import jax
    handler = _make_handler("cpu" if platform == "cpu" else "cuda")
    _handlers[platform] = handler  # the callback must outlive every executable that calls it
    capsule = jax.ffi.pycapsule(ctypes.cast(handler, ctypes.c_void_p).value)
    jax.ffi.register_ffi_target(TARGET, capsule, platform=platform)
