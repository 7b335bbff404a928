"""Minimal DLPack consumer and producer over ctypes.

CuPy has no bfloat16 dtype, so importing a bf16 JAX array through ``cupy.from_dlpack`` is not possible;
this module reads and writes DLPack capsules directly, for any dtype, with no copy. Only the legacy
(unversioned) ``DLManagedTensor`` ABI is used: every producer that matters still accepts it.
"""

from __future__ import annotations

import ctypes

KDL_CPU = 1
KDL_CUDA = 2
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_BFLOAT, _KDL_BOOL = 0, 1, 2, 4, 6

_DTYPE_FROM_DL = {
    (_KDL_FLOAT, 16): "float16", (_KDL_FLOAT, 32): "float32", (_KDL_FLOAT, 64): "float64",
    (_KDL_BFLOAT, 16): "bfloat16", (_KDL_BOOL, 8): "bool",  # (bool: an attn_mask, one byte an element)
}
_DL_FROM_DTYPE = {v: k for k, v in _DTYPE_FROM_DL.items()}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

_api = ctypes.pythonapi
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_USED = b"used_dltensor"


class ImportedTensor:
    """A consumed DLPack tensor: pointer, shape, strides (elements), dtype name, device.

    Owns the producer's memory until it is garbage collected, then calls the producer's deleter.
    """

    def __init__(self, capsule):
        if not _api.PyCapsule_IsValid(capsule, b"dltensor"):
            raise TypeError("expected an unconsumed DLPack capsule named 'dltensor'")
        self._managed = ctypes.cast(_api.PyCapsule_GetPointer(capsule, b"dltensor"),
                                    ctypes.POINTER(_DLManagedTensor))
        _api.PyCapsule_SetName(capsule, _USED)  # we own it now: the capsule must not call the deleter
        t = self._managed.contents.dl_tensor
        key = (t.dtype.code, t.dtype.bits)
        self.dtype = _DTYPE_FROM_DL.get(key, f"dlpack(code={t.dtype.code}, bits={t.dtype.bits})")
        if t.dtype.lanes != 1:
            self.dtype = f"dlpack vector type with {t.dtype.lanes} lanes"
        self.shape = tuple(t.shape[i] for i in range(t.ndim))
        if t.strides:
            self.strides = tuple(t.strides[i] for i in range(t.ndim))
        else:  # NULL strides mean compact row-major
            st, acc = [], 1
            for n in reversed(self.shape):
                st.append(acc)
                acc *= n
            self.strides = tuple(reversed(st))
        self.ptr = (t.data or 0) + t.byte_offset
        self.device_type = t.device.device_type
        self.device_id = t.device.device_id

    def __del__(self):
        m = getattr(self, "_managed", None)
        if m and m.contents.deleter:
            m.contents.deleter(m)
            self._managed = None


class Exported:
    """Exposes device memory through ``__dlpack__`` so any DLPack consumer (JAX) adopts it with no copy.

    ``owner`` keeps the memory alive until the consumer releases the tensor. ``ready_event`` is a CuPy
    event recorded after the producing kernel; a consumer that names its stream is made to wait on it.
    """

    _alive: dict = {}  # id(managed) -> the objects the managed tensor points into

    def __init__(self, ptr: int, shape, strides, dtype: str, device_id: int, owner, ready_event=None):
        self._args = (ptr, tuple(shape), tuple(strides), dtype, device_id, owner)
        self._ready = ready_event

    def __dlpack_device__(self):
        return (KDL_CUDA, self._args[4])

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        ptr, shape, strides, dtype, device_id, owner = self._args
        if self._ready is not None:
            if stream is None:
                self._ready.synchronize()
            else:
                from .arrays import cupy_stream
                s = {1: 0, 2: 0}.get(stream, stream)  # 1 = legacy default stream, 2 = per-thread default
                cupy_stream(s, device_id).wait_event(self._ready)
        n = len(shape)
        shape_arr = (ctypes.c_int64 * n)(*shape)
        strides_arr = (ctypes.c_int64 * n)(*strides)
        code, bits = _DL_FROM_DTYPE[dtype]
        managed = _DLManagedTensor()
        managed.dl_tensor = _DLTensor(ptr, _DLDevice(KDL_CUDA, device_id), n, _DLDataType(code, bits, 1),
                                      shape_arr, strides_arr, 0)
        key = ctypes.addressof(managed)

        def release(_m, key=key):
            Exported._alive.pop(key, None)

        deleter = _Deleter(release)
        managed.deleter = deleter
        Exported._alive[key] = (managed, shape_arr, strides_arr, owner, deleter)
        # No capsule destructor: a producer whose capsule is never consumed leaks one small entry, which
        # beats a destructor written in Python running during interpreter shutdown.
        return _api.PyCapsule_New(key, b"dltensor", None)
