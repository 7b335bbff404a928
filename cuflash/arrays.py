"""Array interop: any DLPack array in, the caller's own array type out, on the caller's stream.

The kernels need only a pointer, a shape and element strides, so inputs become a :class:`DeviceArray`
without a copy and without a CuPy array being built (PyTorch tensors are read directly, which also keeps
the host cost of a call low). Outputs are allocated by the caller's framework (PyTorch's caching
allocator, so a call can be captured in a CUDA graph), or by CuPy and handed over through DLPack (JAX).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import numpy as np

from . import dlpack, recording


@dataclass
class DeviceArray:
    """A framework-neutral view of GPU memory: what ops.py needs to launch a kernel."""

    ptr: int
    shape: tuple
    strides: tuple  # in elements
    dtype: str      # "float16", "bfloat16", "float32", ...
    device: int
    owner: object = None  # keeps the memory alive (the framework array or an imported DLPack tensor)


_FRAMEWORK_BY_TYPE: dict = {}


def framework_of(x) -> str:
    """``numpy``, ``cupy``, ``torch``, ``jax`` or ``dlpack`` (any other ``__dlpack__`` producer)."""
    fw = _FRAMEWORK_BY_TYPE.get(type(x))
    if fw is None:
        fw = _framework_of_type(x)
        if fw != "dlpack":
            _FRAMEWORK_BY_TYPE[type(x)] = fw
    return fw


def _framework_of_type(x) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "cupy":
        return "cupy"
    torch = sys.modules.get("torch")
    if mod == "torch" or (torch is not None and isinstance(x, torch.Tensor)):  # subclasses defined elsewhere too
        return "torch"
    if mod in ("jax", "jaxlib"):
        if any(c.__name__ == "Tracer" for c in type(x).__mro__):
            raise TypeError("got a traced JAX value (inside jax.jit, grad or vmap), which has no memory to read: "
                            "use cuflash.jax.attention / cuflash.jax.attention_varlen there")
        return "jax"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    raise TypeError(f"expected an array (NumPy, CuPy, PyTorch, JAX or any DLPack producer), got {type(x).__name__}")


_TORCH: dict = {}  # dtype objects <-> names and device objects, filled at the first torch call


def _torch_tables():
    if not _TORCH:
        import torch
        names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                 torch.float64: "float64", torch.int32: "int32", torch.bool: "bool"}
        _TORCH["names"] = names
        _TORCH["dtypes"] = {v: k for k, v in names.items()}
        _TORCH["devices"] = {}
        _TORCH["torch"] = torch
    return _TORCH


def dtype_name(x, fw: str) -> str:
    if fw == "torch":
        dt = x.dtype
        return _torch_tables()["names"].get(dt) or str(dt).replace("torch.", "")
    if fw in ("numpy", "cupy"):
        return str(x.dtype)
    return str(getattr(x, "dtype", "unknown"))


def device_of(x, fw: str):
    """CUDA device ordinal, or ``"cpu"`` for host arrays."""
    if fw == "numpy":
        return "cpu"
    if fw == "cupy":
        return x.device.id
    if fw == "torch":
        if x.is_cuda:
            return x.get_device()
        return x.device.type
    dev_type, dev_id = x.__dlpack_device__()
    return dev_id if dev_type == dlpack.KDL_CUDA else ("cpu" if dev_type == dlpack.KDL_CPU else f"dlpack device {dev_type}")


def current_stream(fw: str, device: int) -> int:
    """The stream the caller's framework would run its next kernel on (a raw cudaStream_t)."""
    if fw == "torch":
        raw = _torch_tables().get("raw_stream")
        if raw is None:
            torch = _TORCH["torch"]
            # The raw cudaStream_t without building a torch.cuda.Stream object (what inductor calls).
            raw = _TORCH["raw_stream"] = getattr(torch._C, "_cuda_getCurrentRawStream",
                                                 lambda d: torch.cuda.current_stream(d).cuda_stream)
        return raw(device)
    import cupy
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


class _RawStream:
    """A raw cudaStream_t speaking the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_CUPY_STREAMS: dict = {}


def cupy_stream(stream: int, device: int):
    """The CuPy stream object for a raw stream of a device (built once; CuPy's pool and events use it)."""
    hit = _CUPY_STREAMS.get((stream, device))
    if hit is None:
        import cupy
        with cupy.cuda.Device(device):
            from_external = getattr(cupy.cuda.Stream, "from_external", None)
            if from_external is not None:
                hit = from_external(_RawStream(stream))
            else:  # CuPy < 14
                hit = cupy.cuda.ExternalStream(stream, device)
        _CUPY_STREAMS[(stream, device)] = hit
    return hit


def device_view(x, fw: str, stream: int) -> DeviceArray:
    """Zero-copy view of a GPU array. ``stream`` is where it will be read (DLPack producers sync to it)."""
    if fw == "torch":
        if x.requires_grad:
            x = x.detach()
        return DeviceArray(x.data_ptr(), x.shape, x.stride(), dtype_name(x, fw), x.get_device(), x)
    if fw == "cupy":
        item = x.dtype.itemsize
        return DeviceArray(x.data.ptr, x.shape, tuple(s // item for s in x.strides), str(x.dtype), x.device.id, x)
    # DLPack stream convention: 1 names the legacy default stream, which a raw 0 would mean "unspecified".
    t = dlpack.ImportedTensor(x.__dlpack__(stream=stream or 1))
    return DeviceArray(t.ptr, t.shape, t.strides, t.dtype, t.device_id, t)


_NO_SWITCH = contextlib.nullcontext()


_cu_ctx_get_current = None


def _context_is_current() -> bool:
    """Whether this thread has a current CUDA context (cuCtxGetCurrent, a thread-local read)."""
    global _cu_ctx_get_current
    if _cu_ctx_get_current is None:
        import ctypes
        fn = ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = ctypes.c_int
        _cu_ctx_get_current = (fn, ctypes.c_void_p)
    fn, ctx_type = _cu_ctx_get_current
    ctx = ctx_type()  # one per call: threads may ask at once
    return fn(ctx) == 0 and bool(ctx.value)


def device_scope(fw: str, device: int):
    """A context in which ``device`` is the current CUDA device: every allocation, memset, launch and module
    load of a call on another GPU than the current one must happen there. Restores the caller's device on
    exit; costs one query when the device is already current (torch's own for tensors, which makes no CUDA
    call: nothing may touch the runtime from a torch call being captured into a CUDA graph).

    A thread that has made no CUDA runtime call yet has no current context, and the driver calls cuflash
    launches with (cuLaunchKernel, cuModuleLoadData) then fail with CUDA_ERROR_INVALID_CONTEXT: the thread
    torch's autograd engine runs a CUDA backward on is such a thread when cuflash's backward is the first
    node it runs. Such a thread first gets its framework's current device bound (cudaSetDevice makes that
    device's primary context current)."""
    import cupy
    if not _context_is_current():
        current = _torch_tables()["torch"].cuda.current_device() if fw == "torch" else cupy.cuda.runtime.getDevice()
        cupy.cuda.runtime.setDevice(current)
    if fw == "torch":
        torch = _torch_tables()["torch"]
        if torch.cuda.current_device() == device:
            return _NO_SWITCH
        return torch.cuda.device(device)
    if cupy.cuda.runtime.getDevice() == device:
        return _NO_SWITCH
    return cupy.cuda.Device(device)


_CUPY_BF16: list = []


def cupy_bfloat16():
    """CuPy's bfloat16 dtype (``ml_dtypes.bfloat16``, CuPy >= 14), or None for a CuPy without one."""
    if not _CUPY_BF16:
        dt = None
        try:
            import cupy
            import ml_dtypes
            if int(cupy.__version__.split(".")[0]) >= 14:
                dt = np.dtype(ml_dtypes.bfloat16)
        except (ImportError, ValueError):
            pass
        _CUPY_BF16.append(dt)
    return _CUPY_BF16[0]


def contiguous_copy(x, fw: str, device: int, stream: int) -> DeviceArray:
    """A C-contiguous copy of a small array (ALiBi slopes, an LSE view), made by the caller's framework
    (CuPy for any other) on ``stream``."""
    rec = recording.current()
    if rec is not None:
        rec.fail("a copy made by the framework")
    if fw == "torch":
        return device_view(x.contiguous(), fw, stream)
    import cupy
    with cupy.cuda.Device(device), cupy_stream(stream, device):
        src = x if fw == "cupy" else cupy.from_dlpack(x)
        return device_view(cupy.ascontiguousarray(src), "cupy", stream)


def empty(fw: str, shape, dtype: str, device: int, stream: int):
    """Allocate a contiguous output through the caller's framework: (native array, DeviceArray view)."""
    shape = tuple(int(s) for s in shape)
    if fw == "torch":
        tables = _torch_tables()
        dev = tables["devices"].get(device)
        if dev is None:
            dev = tables["devices"][device] = tables["torch"].device("cuda", device)
        t = tables["torch"].empty(shape, dtype=tables["dtypes"][dtype], device=dev)
        view = DeviceArray(t.data_ptr(), shape, t.stride(), dtype, device, t)
        _recorded(view, t)
        return t, view
    import cupy
    with cupy.cuda.Device(device), cupy_stream(stream, device):
        # A CuPy without bfloat16 holds bf16 outputs as raw 16-bit words (retyped when exported to JAX).
        c = cupy.empty(shape, dtype=(cupy_bfloat16() or np.uint16) if dtype == "bfloat16" else dtype)
    view = DeviceArray(c.data.ptr, shape, tuple(s // c.dtype.itemsize for s in c.strides), dtype, device, c)
    _recorded(view, c)
    return (c if fw == "cupy" else None), view


def _recorded(view: DeviceArray, owner) -> None:
    """Tells an active launch recording (recording.py) about an allocation."""
    rec = recording.current()
    if rec is not None:
        item = 2 if view.dtype == "bfloat16" else np.dtype(view.dtype).itemsize
        rec.allocated(view, owner, math.prod(view.shape) * item)


def to_caller(native, view: DeviceArray, fw: str, stream: int):
    """The output in the caller's array type (``native`` is what :func:`empty` returned)."""
    if fw in ("torch", "cupy"):
        return native
    if fw == "jax" and 0 in view.shape:
        # An empty array has no memory to hand over (DLPack consumers may reject its null pointer).
        import jax
        import jax.numpy as jnp
        gpu = next(d for d in jax.devices() if d.platform == "gpu" and d.id == view.device)
        return jax.device_put(jnp.empty(view.shape, dtype=view.dtype), gpu)
    import cupy
    with cupy.cuda.Device(view.device):
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(cupy_stream(stream, view.device))
    exp = dlpack.Exported(view.ptr, view.shape, view.strides, view.dtype, view.device, view.owner, ev)
    if fw == "jax":
        import jax.dlpack
        return jax.dlpack.from_dlpack(exp)
    return exp
