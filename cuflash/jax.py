"""JAX adapter: cuflash attention inside ``jax.jit``, differentiable through ``jax.custom_vjp`` (our backward)
and batchable under ``jax.vmap``.

The only module of cuflash besides the transformers integration that imports JAX. Arguments are checked at
trace time, from shapes and dtypes, with the same rules and messages as :func:`cuflash.attention`; the
computation runs at execution time through ``jax.pure_callback``.

Backends: CPU JAX (the NumPy path: float16/32/64). Under ``jit`` on a GPU backend this raises
NotImplementedError: the XLA-stream launch of the kernels (``buffer_callback`` / ``jax.ffi``) is not written
yet; eager GPU arrays work through :func:`cuflash.attention` directly.

    >>> import cuflash.jax as cfj
    >>> out = jax.jit(lambda q, k, v: cfj.attention(q, k, v, causal=True))(q, k, v)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import api


def _shape_only(x):
    """A NumPy view with ``x``'s shape and dtype and no memory (stride 0): what api's checks read."""
    dtype = np.dtype(x.dtype)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(x.shape), (0,) * len(x.shape))


def _check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout):
    """api's checks on shape-only stand-ins; returns the resolved static options."""
    if jax.default_backend() != "cpu":
        raise NotImplementedError("cuflash.jax under jit runs on CPU JAX so far: the launch of the kernels on XLA's "
                                  "stream is not written yet (eager GPU arrays work through cuflash.attention)")
    call = api._Call(*(_shape_only(x) for x in (q, k, v)))
    alibi = None if alibi_slopes is None else _shape_only(alibi_slopes)
    causal, scale, window, softcap, _ = api._check_options(call, causal, softmax_scale, window_size, softcap, alibi)
    p, seed, offset = dropout
    drop = api._check_dropout_args(call, p, seed, offset)
    return call, (causal, scale, window, softcap, drop)


def _lse_dtype(q):
    return jnp.float64 if q.dtype == jnp.float64 else jnp.float32


def _forward_host(opts, q, k, v, alibi):
    causal, scale, window, softcap, drop = opts
    q, k, v = (np.asarray(x) for x in (q, k, v))
    call = api._Call(q, k, v)
    alibi = None if alibi is None else np.asarray(alibi)
    out, lse = api._forward(call, q, k, v, alibi, causal, scale, window, softcap, True, drop)
    return out, lse.astype(np.float64 if q.dtype == np.float64 else np.float32)


def _backward_host(opts, dout, q, k, v, out, lse, alibi):
    causal, scale, window, softcap, drop = opts
    arrays = [np.asarray(x) for x in (dout, q, k, v, out, lse)]
    call = api._Call(*arrays[1:4])
    alibi = None if alibi is None else np.asarray(alibi)
    return api._backward(call, *arrays, alibi, causal, scale, window, softcap, False, drop)


def _call_forward(opts, q, k, v, alibi):
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), _lse_dtype(q)))
    return jax.pure_callback(partial(_forward_host, opts), shapes, q, k, v, alibi, vmap_method="sequential")


def _call_backward(opts, dout, q, k, v, out, lse, alibi):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    return jax.pure_callback(partial(_backward_host, opts), shapes, dout, q, k, v, out, lse, alibi,
                             vmap_method="sequential")


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(opts, q, k, v, alibi):
    return _call_forward(opts, q, k, v, alibi)


def _attention_fwd(opts, q, k, v, alibi):
    out, lse = _call_forward(opts, q, k, v, alibi)
    return (out, lse), (q, k, v, alibi, out, lse)


def _attention_bwd(opts, residuals, cotangents):
    q, k, v, alibi, out, lse = residuals
    dout, _ = cotangents  # the LSE output is not differentiated through (as in FlashAttention)
    dq, dk, dv = _call_backward(opts, dout, q, k, v, out, lse, alibi)
    return dq, dk, dv, None if alibi is None else jnp.zeros_like(alibi)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """:func:`cuflash.attention` for JAX arrays, usable inside ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    q, k, v : jax arrays, (batch, seqlen_q, heads_q, head_dim) and (batch, seqlen_k, heads_k, head_dim)
        float16, float32 or float64 on CPU JAX.
    causal, softmax_scale, window_size, softcap, alibi_slopes, return_lse, dropout_p, dropout_seed,
    dropout_offset
        As :func:`cuflash.attention`; all but ``alibi_slopes`` are static (Python values at trace time).

    Returns
    -------
    out, or (out, lse) with ``return_lse=True`` (lse (batch, heads_q, seqlen_q), float32; float64 for
    float64 inputs; not differentiated through).

    Raises
    ------
    TypeError, ValueError
        As :func:`cuflash.attention`, at trace time.
    NotImplementedError
        A GPU backend (the XLA-stream launch is not written yet).

    Notes
    -----
    Gradients come from cuflash's backward (``jax.custom_vjp``); ``alibi_slopes`` gets a zero cotangent.
    ``jax.vmap`` runs the mapped calls one after another.
    """
    call, opts = _check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes,
                        (dropout_p, dropout_seed, dropout_offset))
    del call
    out, lse = _attention(opts, q, k, v, alibi_slopes)
    return (out, lse) if return_lse else out


__all__ = ["attention"]
