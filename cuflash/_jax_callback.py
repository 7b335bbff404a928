"""cuflash's computations as XLA custom calls for cuflash.jax, through ``jax.experimental.buffer_callback``:
the attention forward and backward (dense and packed) on CPU and CUDA, with no compiled extension.

At execution XLA calls the callback with its argument and result buffers. On CUDA the kernels launch on
XLA's stream (``ctx.stream``) and write into XLA's result buffers; a call with the signature of an earlier
plain one runs that call's bound launch plan (executor.py), workspaces from CuPy's pool on that stream. On
the CPU the NumPy path writes into the result buffers. An exception in the callback reaches JAX as an
error naming it.

buffer_callback rather than an XLA FFI handler written with ctypes (which parses XLA's call frame in
Python): an empty callback costs 6.6 against 19.5 us a call on the H200 and 25-27 against 28-31 us on CPU
JAX (bench/NOTES.md, "Bound calls"); jaxlib parses the buffers in C++.

Only cuflash.jax imports this module (it imports JAX).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import executor


def _merge_leading(shape: tuple, keep: int) -> tuple:
    """Leading dims that vmap added folded into the batch dim (buffers are dense row-major)."""
    lead = shape[:len(shape) - keep + 1]
    return (math.prod(lead), *shape[len(shape) - keep + 1:])


_geometry_cache: dict = {}


def _dense_geometry(shape: tuple, keep: int) -> tuple:
    """(shape with vmap's leading dims merged, its row-major element strides), cached: a jitted model calls
    with the same few shapes every step."""
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


@functools.lru_cache(maxsize=1024)
def callback(kind: str, options: tuple, platform: str):
    """The buffer_callback body for one traced call: ``kind`` (fwd, bwd, varlen_fwd, varlen_bwd) with its
    static ``options`` (the last one: whether an ALiBi operand is present, else a placeholder is; for the
    dense kinds the one before it whether an attn_mask operand follows the arrays). One body
    per (kind, options, platform): JAX caches a compiled call by its body among the primitive's parameters,
    so a new body per call would compile (and keep) a new executable for every call made outside jit."""
    if platform == "cpu":
        def run(ctx, outs, *args):
            _run_cpu(kind, options, [np.asarray(a) for a in args], [np.asarray(o) for o in outs])
    else:
        bound_key = (kind, options)

        def run(ctx, outs, *args):
            _run_cuda(kind, options, args, outs, ctx.stream, bound_key)
    return run


def _run_cpu(kind, options, arrays, rets):
    from . import api, varlen
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
            ret[...] = x
        return
    causal, scale, window, softcap, drop, has_mask, _ = options
    # (a mask comes 4-D, after the arrays; its calls run unbatched, so vmap adds no leading axis to fold)
    mask = arrays.pop() if has_mask else None
    if kind == "fwd":
        q, k, v = (x.reshape(_merge_leading(x.shape, 4)) for x in arrays)
        call = api._Call(q, k, v)
        out, lse = api._forward(call, q, k, v, alibi, causal, scale, window, softcap, True, drop, mask)
        rets[0][...] = out.reshape(rets[0].shape)
        rets[1][...] = lse.reshape(rets[1].shape)
    else:
        dout, q, k, v, out = (x.reshape(_merge_leading(x.shape, 4)) for x in arrays[:5])
        lse = arrays[5].reshape(_merge_leading(arrays[5].shape, 3))
        call = api._Call(q, k, v)
        grads = api._backward(call, dout, q, k, v, out, lse, alibi, causal, scale, window, softcap, False, drop,
                              mask)
        for ret, g in zip(rets, grads):
            ret[...] = g.reshape(ret.shape)


_DEVICES: dict = {}


def _device_of_stream(stream: int) -> int:
    """The device ordinal of XLA's stream (its context's device), asked once per stream."""
    device = _DEVICES.get(stream)
    if device is None:
        from cupy.cuda import driver
        ctx = driver.streamGetCtx(stream)
        previous = driver.ctxGetCurrent()
        driver.ctxSetCurrent(ctx)
        try:
            device = _DEVICES[stream] = driver.ctxGetDevice()
        finally:
            driver.ctxSetCurrent(previous)
    return device


def _run_cuda(kind, options, args, rets, stream: int, bound_key):
    from . import api, arrays, ops, varlen
    key = None
    if kind in ("fwd", "bwd") and not options[-1] and not options[-2] and options[4] is None:
        # (no ALiBi, mask or dropout: may run bound)
        # The buffers a launch binds (the ALiBi placeholder is not one): q, k, v, out, lse for the forward;
        # dout, q, k, v, out, lse, dq, dk, dv for the backward.
        used = (*args[:3], *rets) if kind == "fwd" else (*args[:6], *rets)
        ptrs = [b.__cuda_array_interface__["data"][0] or 0 for b in used]
        any_bits = 0
        for p in ptrs:
            any_bits |= p
        # The traced call fixes every buffer's shape from q's and k's (v, dout, out and the gradients match
        # them, the LSE follows q) and every dtype but the inputs' (fp16 or bf16 calls may share options).
        q, k = (args[0], args[1]) if kind == "fwd" else (args[1], args[2])
        key = (bound_key, tuple(q.shape), tuple(k.shape), q.dtype, any_bits & 15 == 0, stream)
        table = executor.lookup_forward if kind == "fwd" else executor.lookup_backward
        bound = table(key)
        if bound is not None and bound.run_into(ptrs, stream):
            return
    buffers = (*args, *rets)
    ptrs = [b.__cuda_array_interface__["data"][0] or 0 for b in buffers]
    shapes = tuple(tuple(b.shape) for b in buffers)
    device = _device_of_stream(stream)
    n_args = len(args)
    dtypes = [str(b.dtype) for b in buffers]

    def view(i: int, keep: int):
        shape, strides = _dense_geometry(shapes[i], keep)
        return arrays.DeviceArray(ptrs[i], shape, strides, dtypes[i], device)

    cc = api._cc(device)
    if kind.startswith("varlen"):
        causal, scale, window, softcap, max_q, max_k, has_alibi = options
        alibi = view(n_args - 1, len(shapes[n_args - 1])) if has_alibi else None
        kw = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, causal=causal, softmax_scale=scale, window_size=window,
                  softcap=softcap, fw="cupy", stream=stream, cc=cc)
        with arrays.device_scope("cupy", device):
            if kind == "varlen_fwd":
                q, k, v = (view(i, 3) for i in range(3))
                index = [view(3, 1), view(4, 1), None, None]
                varlen.forward_device(q, k, v, view(n_args, 3), view(n_args + 1, 2), alibi, index, **kw)
            else:
                dout, q, k, v, out = (view(i, 3) for i in range(5))
                index = [view(6, 1), view(7, 1), None, None]
                varlen.backward_device(dout, q, k, v, out, view(5, 2), alibi, index,
                                       [view(n_args + i, 3) for i in range(3)], deterministic=False, **kw)
        return
    causal, scale, window, softcap, drop, has_mask, has_alibi = options
    if has_mask:  # (cuflash.jax refuses them at trace time on a GPU backend)
        raise NotImplementedError("cuflash.jax: attn_mask on the GPU is not implemented yet")
    alibi = view(n_args - 1, 1) if has_alibi else None
    in_place = all(p % 16 == 0 for p in ptrs) and shapes[0][-1] % 8 == 0 and alibi is None
    with arrays.device_scope("cupy", device):
        if kind == "fwd":
            q, k, v = (view(i, 4) for i in range(3))
            out, lse = view(n_args, 4), view(n_args + 1, 3)
            fp = ops.forward(q, k, v, out, lse, alibi, causal=causal, window_size=window, softmax_scale=scale,
                             softcap=softcap, stream=stream, cc=cc, framework="cupy", dropout=drop)
            # (bound when there is a query and a key at least)
            if key is not None and in_place and 0 not in shapes[0] and shapes[1][-3]:
                executor.bind_forward(key, fp, "jax", {"q": q, "k": k, "v": v, "o": out}, out.shape)
        else:
            dout, q, k, v, out = (view(i, 4) for i in range(5))
            lse = view(5, 3)
            dq, dk, dv = (view(n_args + i, 4) for i in range(3))
            bp = ops.backward(dout, q, k, v, out, lse, alibi, dq, dk, dv, causal=causal, window_size=window,
                              softmax_scale=scale, softcap=softcap, deterministic=False, stream=stream, cc=cc,
                              framework="cupy", dropout=drop)
            if key is not None and in_place and 0 not in shapes[1] and shapes[2][-3]:
                executor.bind_backward(key, bp, "jax", {"dout": dout, "q": q, "k": k, "v": v, "o": out, "lse": lse},
                                       (dq, dk, dv))
