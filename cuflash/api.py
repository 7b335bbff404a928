"""The public functional API: argument checks, defaults, and the contract (see the docstrings).

Every check here runs before any kernel is launched, and names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import arrays, reference

_GPU_DTYPES = ("float16", "bfloat16")
_CPU_DTYPES = ("float16", "float32", "float64")
_MAX_SEQLEN = 1 << 30  # keeps every index the kernels form from seqlen_q + seqlen_k inside int32


def _check_flag(name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_real(name, value, *, allow_none=False, positive=False, nonneg=False):
    if value is None and allow_none:
        return None
    if type(value) is float and value == value and abs(value) != math.inf and (
            (value > 0) if positive else (value >= 0) if nonneg else True):
        return value  # the common case, without the slower abstract-class checks below
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0 (0 disables it), got {value}")
    return value


def _check_window(window_size):
    if window_size == (-1, -1) and type(window_size) is tuple:
        return window_size
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded), got {w}")
        out.append(int(w))
    return tuple(out)


class _Call:
    """The validated shape of one attention call."""

    def __init__(self, q, k, v, *, names=("q", "k", "v")):
        self.fw = arrays.framework_of(q)
        for name, x in zip(names[1:], (k, v)):
            fw = arrays.framework_of(x)
            if fw != self.fw:
                raise TypeError(f"{name} is a {fw} array but {names[0]} is a {self.fw} array; pass one array type")
        for name, x in zip(names, (q, k, v)):
            if len(x.shape) != 4:
                raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
        self.device = arrays.device_of(q, self.fw)
        for name, x in zip(names[1:], (k, v)):
            dev = arrays.device_of(x, self.fw)
            if dev != self.device:
                raise ValueError(f"{name} is on device {dev} but {names[0]} is on device {self.device}")
        self.on_gpu = isinstance(self.device, int)
        if not self.on_gpu and self.device != "cpu":
            raise ValueError(f"{names[0]} is on an unsupported device ({self.device}); expected a CUDA GPU or the CPU")
        self.dtype = arrays.dtype_name(q, self.fw)
        allowed = _GPU_DTYPES if self.on_gpu else _CPU_DTYPES
        if self.dtype not in allowed:
            where = "on the GPU" if self.on_gpu else "on the CPU path"
            raise TypeError(f"{names[0]} has dtype {self.dtype}; expected one of {', '.join(allowed)} {where}")
        for name, x in zip(names[1:], (k, v)):
            dt = arrays.dtype_name(x, self.fw)
            if dt != self.dtype:
                raise TypeError(f"{name} has dtype {dt} but {names[0]} has dtype {self.dtype}; they must match")
        b, sq, hq, d = (int(s) for s in q.shape)
        bk, sk, hk, dk = (int(s) for s in k.shape)
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"{names[2]} must have the shape of {names[1]} {tuple(k.shape)}, got {tuple(v.shape)}")
        if bk != b:
            raise ValueError(f"{names[1]} has batch {bk} but {names[0]} has batch {b}")
        if dk != d:
            raise ValueError(f"{names[1]} has head_dim {dk} but {names[0]} has head_dim {d}")
        for name, n in (("batch", b), ("seqlen_q", sq), ("seqlen_k", sk), ("heads_q", hq), ("heads_k", hk)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if sq >= _MAX_SEQLEN or sk >= _MAX_SEQLEN:
            raise ValueError(f"seqlen_q and seqlen_k must be < 2**30, got {sq} and {sk}")
        if d % 8 != 0 or d > 256:
            raise ValueError(f"head_dim must be a multiple of 8 in [8, 256], got {d}")
        if hq % hk != 0:
            raise ValueError(f"heads_q ({hq}) must be a multiple of heads_k ({hk}) (GQA/MQA)")
        self.batch, self.seqlen_q, self.heads_q, self.head_dim = b, sq, hq, d
        self.seqlen_k, self.heads_k = sk, hk
        self.names = names

    def check_alibi(self, alibi_slopes):
        if alibi_slopes is None:
            return None
        fw = arrays.framework_of(alibi_slopes)
        if fw != self.fw and not (fw == "numpy" and not self.on_gpu):
            raise TypeError(f"alibi_slopes is a {fw} array but {self.names[0]} is a {self.fw} array")
        if arrays.dtype_name(alibi_slopes, fw) != "float32":
            raise TypeError(f"alibi_slopes must be float32, got {arrays.dtype_name(alibi_slopes, fw)}")
        shape = tuple(alibi_slopes.shape)
        if shape not in ((self.heads_q,), (self.batch, self.heads_q)):
            raise ValueError(f"alibi_slopes must have shape ({self.heads_q},) or ({self.batch}, {self.heads_q}), got {shape}")
        if arrays.device_of(alibi_slopes, fw) != self.device:
            raise ValueError(f"alibi_slopes is on device {arrays.device_of(alibi_slopes, fw)} but {self.names[0]} is on {self.device}")
        return alibi_slopes


def _check_options(call, causal, softmax_scale, window_size, softcap, alibi_slopes):
    causal = _check_flag("causal", causal)
    scale = _check_real("softmax_scale", softmax_scale, allow_none=True, positive=True)
    if scale is None:
        scale = call.head_dim ** -0.5
    window = _check_window(window_size)
    softcap = _check_real("softcap", softcap, nonneg=True)
    alibi = call.check_alibi(alibi_slopes)
    return causal, scale, window, softcap, alibi


def _to_numpy(x, fw):
    if fw == "numpy":
        return x
    if fw == "torch":
        return x.detach().numpy()
    return np.from_dlpack(x)


def _from_numpy(x, fw):
    if fw == "numpy":
        return x
    if fw == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(x))
    if fw == "jax":
        import jax.numpy as jnp
        return jnp.asarray(x)
    return x


def _gpu_ready(x, fw, name, stream):
    """A device view the kernels can read: unit last stride (else an error), 16-byte aligned rows."""
    view = arrays.device_view(x, fw, stream)
    if view.strides[-1] != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {view.strides}")
    aligned = view.ptr % 16 == 0 and all(s % 8 == 0 and s >= 0 for s in view.strides[:-1])
    if aligned:
        return view
    # cp.async moves 16-byte chunks: a view whose rows start off 16-byte boundaries gets one aligned copy.
    if fw == "torch":
        import torch
        return arrays.device_view(x.detach().clone(memory_format=torch.contiguous_format), fw, stream)
    import cupy
    with cupy.cuda.Device(view.device), arrays.cupy_stream(stream, view.device):
        src = x if fw == "cupy" else cupy.from_dlpack(x)
        return arrays.device_view(cupy.ascontiguousarray(src), "cupy", stream)


_CC: dict = {}


def _cc(device: int) -> tuple:
    """Compute capability (major, minor) of a device, queried (and checked supported) once per process."""
    cc = _CC.get(device)
    if cc is None:
        import cupy
        from .dispatch import compile_arch
        cc = divmod(int(cupy.cuda.Device(device).compute_capability), 10)
        compile_arch(*cc)  # raises for GPUs older than sm_80, before anything is allocated or launched
        _CC[device] = cc
    return cc


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False):
    """Exact scaled dot-product attention, computed by FlashAttention kernels.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads_q, head_dim)
        Queries. CuPy, PyTorch (CUDA), JAX or any DLPack array on a GPU of compute capability >= 8.0, in
        float16 or bfloat16; or a NumPy array (float16/32/64), computed on the CPU. Any strides with a
        unit last stride (a transposed ``(batch, heads, seqlen, head_dim)`` view works without a copy).
    k, v : array, shape (batch, seqlen_k, heads_k, head_dim)
        Keys and values, same type, dtype and device as ``q``. ``heads_q % heads_k == 0`` (GQA/MQA:
        query head ``h`` uses key/value head ``h // (heads_q // heads_k)``). ``head_dim`` is a multiple
        of 8 up to 256.
    causal : bool
        Query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (bottom-right aligned, FlashAttention >= 2.1).
    softmax_scale : float, optional
        Scale of ``q @ k.T``; default ``head_dim ** -0.5``. Must be > 0.
    window_size : (int, int)
        Local attention: query ``i`` sees keys in ``[i + off - left, i + off + right]``,
        ``off = seqlen_k - seqlen_q``; ``-1`` leaves a side unbounded. Combined with ``causal``, right is 0.
    softcap : float
        If > 0, scores become ``softcap * tanh(score / softcap)`` (after scaling).
    alibi_slopes : float32 array, shape (heads_q,) or (batch, heads_q), optional
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores. Same array type and device as ``q``.
    return_lse : bool
        Also return the log-sum-exp of each score row.

    Returns
    -------
    out : array, shape (batch, seqlen_q, heads_q, head_dim)
        Same array type, dtype and device as ``q``, produced on the caller's current stream (PyTorch's
        current stream for tensors, CuPy's for everything else). A query row that sees no key is 0.
    lse : array, shape (batch, heads_q, seqlen_q), float32 (float64 for float64 NumPy inputs)
        Only with ``return_lse=True``. Natural log. ``+inf`` for a row that sees no key (FlashAttention's
        convention: ``exp(score - lse)`` is then 0 in a backward pass).

    Examples
    --------
    >>> import cupy as cp, cuflash
    >>> q = cp.random.randn(2, 1024, 16, 128).astype(cp.float16)
    >>> out = cuflash.attention(q, q, q, causal=True)
    """
    call = _Call(q, k, v)
    causal, scale, window, softcap, alibi = _check_options(call, causal, softmax_scale, window_size, softcap,
                                                           alibi_slopes)
    return_lse = _check_flag("return_lse", return_lse)
    if call.fw == "torch" and _needs_autograd(q, k, v):
        from . import torch as torch_adapter
        return torch_adapter.attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window,
                                       softcap=softcap, alibi_slopes=alibi, return_lse=return_lse)
    return _forward(call, q, k, v, alibi, causal, scale, window, softcap, return_lse)


def _needs_autograd(*tensors) -> bool:
    import torch
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _forward(call, q, k, v, alibi, causal, scale, window, softcap, return_lse):
    """The forward on validated arguments (the PyTorch custom op enters here)."""
    kwargs = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap)

    if not call.on_gpu:
        if call.fw == "torch" and call.dtype == "bfloat16":
            raise TypeError("q is a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
        slopes = None if alibi is None else np.asarray(_to_numpy(alibi, arrays.framework_of(alibi)))
        out, lse = reference.attention_numpy(_to_numpy(q, call.fw), _to_numpy(k, call.fw), _to_numpy(v, call.fw),
                                             alibi_slopes=slopes, **kwargs)
        out, lse = _from_numpy(out, call.fw), _from_numpy(lse, call.fw)
        return (out, lse) if return_lse else out

    from . import ops
    device = call.device
    stream = arrays.current_stream(call.fw, device)
    cc = _cc(device)
    qv, kv, vv = (_gpu_ready(x, call.fw, n, stream) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    av = None
    if alibi is not None:
        av = arrays.device_view(alibi, call.fw, stream)
        if av.strides[-1] != 1:
            raise ValueError(f"alibi_slopes must have a contiguous last dimension, got strides {av.strides}")
    out_native, out_view = arrays.empty(call.fw, (call.batch, call.seqlen_q, call.heads_q, call.head_dim),
                                        call.dtype, device, stream)
    lse_native, lse_view = arrays.empty(call.fw, (call.batch, call.heads_q, call.seqlen_q), "float32", device, stream)
    ops.forward(qv, kv, vv, out_view, lse_view, av, stream=stream, cc=cc, framework=call.fw, **kwargs)
    out = arrays.to_caller(out_native, out_view, call.fw, stream)
    if not return_lse:
        return out
    return out, arrays.to_caller(lse_native, lse_view, call.fw, stream)


def _check_like(call, name, x, shape, dtypes):
    fw = arrays.framework_of(x)
    if fw != call.fw:
        raise TypeError(f"{name} is a {fw} array but q is a {call.fw} array; pass one array type")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    dt = arrays.dtype_name(x, fw)
    if dt not in dtypes:
        raise TypeError(f"{name} has dtype {dt}; expected {' or '.join(dtypes)}")
    dev = arrays.device_of(x, fw)
    if dev != call.device:
        raise ValueError(f"{name} is on device {dev} but q is on device {call.device}")


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                       softcap=0.0, alibi_slopes=None, deterministic=False):
    """Gradients of :func:`attention` with respect to q, k and v.

    The softmax is recomputed block by block from the saved ``lse`` (nothing quadratic is stored).

    Parameters
    ----------
    dout : array, shape (batch, seqlen_q, heads_q, head_dim)
        Gradient of the loss with respect to ``out``; same type, dtype and device as ``q``.
    q, k, v : arrays
        The forward inputs (shapes and rules as in :func:`attention`).
    out, lse : arrays
        The forward's output and its ``return_lse=True`` log-sum-exp, float32 (batch, heads_q, seqlen_q).
    causal, softmax_scale, window_size, softcap, alibi_slopes
        Exactly as passed to the forward.
    deterministic : bool
        Bitwise-reproducible gradients (a separate pass computes dq instead of atomic accumulation;
        slower). The forward is always deterministic.

    Returns
    -------
    dq, dk, dv : arrays with the shapes and dtype of q, k, v (GQA: dk/dv summed over the query heads that
    share a key/value head), in the caller's array type, on the caller's current stream.

    Examples
    --------
    >>> out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    """
    call = _Call(q, k, v)
    causal, scale, window, softcap, alibi = _check_options(call, causal, softmax_scale, window_size, softcap,
                                                           alibi_slopes)
    deterministic = _check_flag("deterministic", deterministic)
    qshape = (call.batch, call.seqlen_q, call.heads_q, call.head_dim)
    _check_like(call, "dout", dout, qshape, (call.dtype,))
    _check_like(call, "out", out, qshape, (call.dtype,))
    _check_like(call, "lse", lse, (call.batch, call.heads_q, call.seqlen_q),
                ("float32", "float64") if call.dtype == "float64" else ("float32",))
    kwargs = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap)

    if not call.on_gpu:
        if call.fw == "torch" and call.dtype == "bfloat16":
            raise TypeError("q is a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
        slopes = None if alibi is None else np.asarray(_to_numpy(alibi, arrays.framework_of(alibi)))
        grads = reference.attention_backward_numpy(
            *(_to_numpy(x, call.fw) for x in (dout, q, k, v, out, lse)), alibi_slopes=slopes, **kwargs)
        return tuple(_from_numpy(g, call.fw) for g in grads)

    from . import ops
    device = call.device
    stream = arrays.current_stream(call.fw, device)
    cc = _cc(device)
    views = {n: _gpu_ready(x, call.fw, n, stream) for n, x in
             (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out))}
    lse_view = arrays.device_view(lse, call.fw, stream)
    if lse_view.strides != (call.heads_q * call.seqlen_q, call.seqlen_q, 1):
        raise ValueError(f"lse must be contiguous (batch, heads_q, seqlen_q), got strides {lse_view.strides}")
    av = None if alibi is None else arrays.device_view(alibi, call.fw, stream)
    natives, grad_views = [], []
    for x in (q, k, v):
        native, view = arrays.empty(call.fw, x.shape, call.dtype, device, stream)
        natives.append(native)
        grad_views.append(view)
    ops.backward(views["dout"], views["q"], views["k"], views["v"], views["out"], lse_view, av, *grad_views,
                 deterministic=deterministic, stream=stream, cc=cc, framework=call.fw, **kwargs)
    return tuple(arrays.to_caller(n, gv, call.fw, stream) for n, gv in zip(natives, grad_views))
