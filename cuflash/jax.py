"""JAX adapter: cuflash attention (dense, :func:`attention`, with masks on CPU JAX, and packed sequences,
:func:`attention_varlen`) inside ``jax.jit``, differentiable through ``jax.custom_vjp`` (our backward) and batchable under ``jax.vmap``.

The only module of cuflash besides the transformers integration that imports JAX. Arguments are checked at
trace time, from shapes and dtypes, with the same rules and messages as :func:`cuflash.attention` (the GPU
rules on a GPU backend). The computation is an XLA custom call (``jax.experimental.buffer_callback``,
_jax_callback.py; no compiled extension): on a GPU backend it launches the kernels on XLA's stream into
XLA's buffers; on CPU JAX it runs the NumPy path (float16/32/64).

    >>> import cuflash.jax as cfj
    >>> out = jax.jit(lambda q, k, v: cfj.attention(q, k, v, causal=True))(q, k, v)
"""

from __future__ import annotations

import numbers

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _jax_callback, api, reference, varlen


def _shape_only(x):
    """A NumPy view with ``x``'s shape and dtype and no memory (stride 0): what api's checks read."""
    dtype = np.dtype(x.dtype)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(x.shape), (0,) * len(x.shape))


class _DeviceShape:
    """A stand-in for an array on GPU 0 with ``x``'s shape and dtype: api's checks then apply the GPU rules
    (float16 / bfloat16) at trace time, without touching a device."""

    def __init__(self, x):
        self.shape, self.dtype = tuple(x.shape), str(jnp.dtype(x.dtype))

    def __dlpack__(self, **_):
        raise TypeError("a shape-only stand-in")

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _jax_operands(**named):
    """A TypeError naming the first argument that is not a JAX array (or a value JAX takes as one)."""
    for name, x in named.items():
        if x is not None and not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{name} must be a JAX array (or a NumPy array), got {type(x).__name__}")


def _as_jax(*xs):
    """The operands as JAX arrays, so that the checks see the dtypes JAX computes in: a float64 NumPy array
    is float32 while 64-bit mode is off (jax_enable_x64), as jax.nn.dot_product_attention takes it."""
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


def _static(**named):
    """The static options as Python values: a concrete 0-d JAX array (``1 / jnp.sqrt(d)`` outside jit) becomes
    its Python scalar; a traced value or a larger array is a TypeError naming the option, since the options
    select and configure the kernels at trace time."""
    out = []
    for name, x in named.items():
        if isinstance(x, (tuple, list)):
            out.append(type(x)(_static(**{f"{name}[{i}]": e for i, e in enumerate(x)}).values()))
            continue
        if isinstance(x, jax.Array):  # traced values are jax.Array instances too
            if x.ndim:
                raise TypeError(f"{name} must be a Python value (static under jax.jit), got a JAX array of shape "
                                f"{tuple(x.shape)}")
            if not (jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)):
                raise TypeError(f"{name} must be a Python value, got a JAX array of dtype {x.dtype}")  # (PRNG keys)
            try:
                x = x.item()
            except jax.errors.ConcretizationTypeError:
                raise TypeError(f"{name} must be a Python value: it is static under jax.jit (it selects and "
                                f"configures the kernels), got a traced value; pass it as a Python constant or "
                                f"mark it static") from None
        out.append(x)
    return dict(zip(named, out))


def _check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout, attn_mask=None):
    """api's checks on shape-only stand-ins (GPU or CPU rules, by JAX's default backend); returns the
    resolved static options (the operands are JAX arrays: attention checked them), the last one whether an
    attn_mask operand goes with the call."""
    stand_in = _DeviceShape if _on_gpu() else _shape_only
    call = api._Call(*(stand_in(x) for x in (q, k, v)))
    alibi = None if alibi_slopes is None else stand_in(alibi_slopes)
    causal, scale, window, softcap, _ = api._check_options(call, causal, softmax_scale, window_size, softcap, alibi)
    p, seed, offset = dropout
    if hasattr(seed, "shape") and not isinstance(seed, numbers.Integral):  # ((seed, offset) arrays: array API only)
        raise TypeError(f"dropout_seed must be an int (static under jax.jit), got {type(seed).__name__}")
    drop = api._check_dropout_args(call, p, seed, offset)
    if attn_mask is not None:
        if _on_gpu():
            raise NotImplementedError("cuflash.jax: attn_mask and block_mask on the GPU are not implemented yet; "
                                      "they run on CPU JAX (and cuflash.attention takes attn_mask on GPU arrays)")
        api._check_attn_mask(call, _shape_only(attn_mask))
    return call, (causal, scale, window, softcap, drop, attn_mask is not None)


def _with_block_mask(q, k, attn_mask, block_mask):
    """``attn_mask`` with a block mask's dense element mask folded in (a trace-time constant: the custom call
    takes arrays, not the object); the block mask is checked for this problem first."""
    from .block_mask import checked
    b, sq, hq = q.shape[:3]
    block_mask = checked(block_mask, b, hq, sq, k.shape[1])
    if _on_gpu():
        raise NotImplementedError("cuflash.jax: block_mask on the GPU is not implemented yet; it runs on CPU JAX "
                                  "(and cuflash.attention takes it on GPU arrays)")
    dense = jnp.asarray(block_mask.to_dense(*block_mask._table_grid(b, hq)))  # (1 where it broadcasts)
    if attn_mask is None:
        return dense
    if attn_mask.dtype == jnp.bool_:
        return attn_mask & dense
    return jnp.where(dense, attn_mask, jnp.asarray(-jnp.inf, attn_mask.dtype))


def _mask_4d(attn_mask):
    """The mask with leading size-1 dimensions up to (batch, heads_q, seqlen_q, seqlen_k) (a reshape, no copy)."""
    return attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))


def _lse_dtype(q):
    return jnp.float64 if q.dtype == jnp.float64 else jnp.float32


def _custom_call(kind, opts, shapes, operands, alibi, sequential=False):
    """One XLA custom call of cuflash (_jax_callback.py, through ``jax.experimental.buffer_callback``) with its
    static options. vmap folds the mapped axis into the batch (all operands broadcast to it), except with
    ALiBi slopes, whose (batch, heads) form would then be ambiguous, and for ``sequential`` calls: packed
    sequences (no batch axis) and dropout (the mask is keyed by the batch index, so folding would give each
    mapped example another example's mask): those calls run one by one."""
    from jax.experimental.buffer_callback import buffer_callback
    options = (*opts, alibi is not None)
    body = _jax_callback.callback(kind, options, "gpu" if _on_gpu() else "cpu")
    call = buffer_callback(body, shapes, vmap_method="sequential" if alibi is not None or sequential
                           else "broadcast_all")
    extra = jnp.zeros((0,), jnp.float32) if alibi is None else alibi
    return call(*operands, extra)


def _sequential(opts) -> bool:
    """Dropout (keyed by the batch index) and attn_mask (whose broadcast batch would not fold with vmap's axis)
    calls run one mapped call at a time."""
    return opts[4] is not None or opts[5]


def _call_forward(opts, q, k, v, alibi, mask):
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), _lse_dtype(q)))
    operands = (q, k, v) if mask is None else (q, k, v, mask)
    return _custom_call("fwd", opts, shapes, operands, alibi, sequential=_sequential(opts))


def _call_backward(opts, dout, q, k, v, out, lse, alibi, mask):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    operands = (dout, q, k, v, out, lse) if mask is None else (dout, q, k, v, out, lse, mask)
    return _custom_call("bwd", opts, shapes, operands, alibi, sequential=_sequential(opts))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(opts, q, k, v, alibi, mask):
    return _call_forward(opts, q, k, v, alibi, mask)


def _attention_fwd(opts, q, k, v, alibi, mask):
    out, lse = _call_forward(opts, q, k, v, alibi, mask)
    return (out, lse), (q, k, v, alibi, mask, out, lse)


def _mask_cotangent(opts, q, k, v, alibi, mask, out, lse, dout):
    """The gradient of an additive mask: dS = P (dP - D), the gradient of the scores it is added to, summed over
    the dimensions the mask broadcasts (dP = dO.V^T with the dropout keep mask and 1 / (1 - p), D = rowsum(dO O),
    P recomputed from the LSE; FlashAttention-2's backward, Algorithm 4 of the paper), in jnp on the whole
    (batch, heads, seqlen_q, seqlen_k) score matrix: the CPU path's. Under jit, unused (no gradient asked of
    the mask), XLA drops it."""
    causal, scale, window, softcap, drop, _ = opts
    b, sq, hq, _ = q.shape
    sk, group = k.shape[1], q.shape[2] // k.shape[2]
    f = _lse_dtype(q)
    keys, values = (jnp.repeat(x.astype(f), group, axis=2) for x in (k, v))
    s = scale * jnp.einsum("bqhd,bkhd->bhqk", q.astype(f), keys)
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    if alibi is not None:
        slopes = jnp.broadcast_to(alibi.astype(f), (b, hq)) if alibi.ndim == 1 else alibi.astype(f)
        dist = np.abs(np.arange(sq)[:, None] + (sk - sq) - np.arange(sk)[None, :])
        s = s - slopes[:, :, None, None] * dist.astype(np.dtype(f))
    s = s + mask.astype(f)
    visible = reference.visible_mask(sq, sk, causal, window)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0)  # (rows with LSE +inf: 0)
    dp = jnp.einsum("bqhd,bkhd->bhqk", dout.astype(f), values)
    if drop is not None:
        keep, inv = reference._dropout_keep((b, hq, sq, sk), drop.p, drop.seed, drop.offset)
        dp = dp * (keep * inv)
    ds = p * (dp - jnp.einsum("bqhd,bqhd->bhq", dout.astype(f), out.astype(f))[..., None])
    axes = tuple(i for i, n in enumerate(mask.shape) if n == 1 and ds.shape[i] != 1)
    return ds.sum(axis=axes, keepdims=True).astype(mask.dtype)


def _attention_bwd(opts, residuals, cotangents):
    q, k, v, alibi, mask, out, lse = residuals
    dout, _ = cotangents  # the LSE output is not differentiated through (as in FlashAttention)
    dq, dk, dv = _call_backward(opts, dout, q, k, v, out, lse, alibi, mask)
    mask_ct = None
    if mask is not None and mask.dtype != jnp.bool_:
        mask_ct = _mask_cotangent(opts, q, k, v, alibi, mask, out, lse, dout)
    return dq, dk, dv, None if alibi is None else jnp.zeros_like(alibi), mask_ct


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False, dropout_p=0.0, dropout_seed=None, dropout_offset=0,
              attn_mask=None, block_mask=None):
    """:func:`cuflash.attention` for JAX arrays, usable inside ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    q, k, v : jax arrays, (batch, seqlen_q, heads_q, head_dim) and (batch, seqlen_k, heads_k, head_dim)
        float16 or bfloat16 on a GPU backend; float16, float32 or float64 on CPU JAX.
    causal, softmax_scale, window_size, softcap, alibi_slopes, return_lse, dropout_p, dropout_seed,
    dropout_offset
        As :func:`cuflash.attention`; all but ``alibi_slopes`` are static (Python values at trace time).
    attn_mask : jax array, optional
        As :func:`cuflash.attention`: bool (True = attend) or float (added to the scores), broadcastable to
        (batch, heads_q, seqlen_q, seqlen_k); traced. A float mask is differentiable (a learned bias): its
        gradient is that of the scores it is added to, summed over the dimensions it broadcasts, computed on
        the whole score matrix (O(seqlen_q x seqlen_k) memory, only where asked for under jit). CPU JAX only so
        far. Outside jit the gradient of the other arguments computes it too (XLA drops it only under jit).
    block_mask : cuflash.BlockMask or torch FlexAttention BlockMask, optional
        Static (a trace-time object); its dense element mask is folded into ``attn_mask`` as a constant of
        the traced computation (no block skipping on this path). CPU JAX only so far.

    Returns
    -------
    out, or (out, lse) with ``return_lse=True`` (lse (batch, heads_q, seqlen_q), float32; float64 for
    float64 inputs; not differentiated through).

    Raises
    ------
    TypeError, ValueError
        As :func:`cuflash.attention`, at trace time.
    NotImplementedError
        ``attn_mask`` or ``block_mask`` on a GPU backend.

    Notes
    -----
    Gradients come from cuflash's backward (``jax.custom_vjp``); ``alibi_slopes`` gets a zero cotangent.
    ``jax.vmap`` folds the mapped axis into the batch (one launch); with ``alibi_slopes``, dropout or a mask
    the mapped calls run one after another (each example keeps the mask it gets alone: with dropout, one
    static seed gives every mapped example the same mask). The options are static: Python values at trace
    time (a concrete 0-d JAX array is taken as its value); ``dropout_seed`` too, so a jitted step draws the
    same mask every step unless its seed is a static argument.
    """
    _jax_operands(q=q, k=k, v=v, alibi_slopes=alibi_slopes, attn_mask=attn_mask)
    q, k, v, alibi_slopes, attn_mask = _as_jax(q, k, v, alibi_slopes, attn_mask)
    o = _static(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                return_lse=return_lse, dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    call, opts = _check(q, k, v, o["causal"], o["softmax_scale"], o["window_size"], o["softcap"], alibi_slopes,
                        (o["dropout_p"], o["dropout_seed"], o["dropout_offset"]), attn_mask)
    del call
    if block_mask is not None:  # (after the checks: q, k and attn_mask are valid for folding)
        attn_mask = _with_block_mask(q, k, attn_mask, block_mask)
        opts = (*opts[:5], True)
    return_lse = api._check_flag("return_lse", o["return_lse"])
    out, lse = _attention(opts, q, k, v, alibi_slopes, None if attn_mask is None else _mask_4d(attn_mask))
    return (out, lse) if return_lse else out


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                  window_size, softcap, alibi_slopes):
    """varlen's checks on shape-only stand-ins (as _check); returns the resolved static options."""
    stand_in = _DeviceShape if _on_gpu() else _shape_only
    call = varlen._VarlenCall(*(stand_in(x) for x in (q, k, v, cu_seqlens_q, cu_seqlens_k)), max_seqlen_q,
                              max_seqlen_k, None, None)
    alibi = None if alibi_slopes is None else stand_in(alibi_slopes)
    causal, scale, window, softcap, _ = api._check_options(call, causal, softmax_scale, window_size, softcap, alibi)
    return causal, scale, window, softcap, call.max_seqlen_q, call.max_seqlen_k


def _call_varlen_forward(opts, q, k, v, cu_q, cu_k, alibi):
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((q.shape[1], q.shape[0]), _lse_dtype(q)))
    return _custom_call("varlen_fwd", opts, shapes, (q, k, v, cu_q, cu_k), alibi, sequential=True)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_varlen(opts, q, k, v, cu_q, cu_k, alibi):
    return _call_varlen_forward(opts, q, k, v, cu_q, cu_k, alibi)


def _attention_varlen_fwd(opts, q, k, v, cu_q, cu_k, alibi):
    out, lse = _call_varlen_forward(opts, q, k, v, cu_q, cu_k, alibi)
    return (out, lse), (q, k, v, cu_q, cu_k, alibi, out, lse)


def _attention_varlen_bwd(opts, residuals, cotangents):
    q, k, v, cu_q, cu_k, alibi, out, lse = residuals
    dout, _ = cotangents
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    dq, dk, dv = _custom_call("varlen_bwd", opts, shapes, (dout, q, k, v, out, lse, cu_q, cu_k), alibi, sequential=True)
    return dq, dk, dv, None, None, None if alibi is None else jnp.zeros_like(alibi)


_attention_varlen.defvjp(_attention_varlen_fwd, _attention_varlen_bwd)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_lse=False):
    """:func:`cuflash.attention_varlen` (packed sequences, FlashAttention-2's ``cu_seqlens`` layout) for JAX
    arrays, usable inside ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    q : jax array, (total_q, heads_q, head_dim)
    k, v : jax arrays, (total_k, heads_k, head_dim)
        float16 or bfloat16 on a GPU backend; float16, float32 or float64 on CPU JAX.
    cu_seqlens_q, cu_seqlens_k : int32 jax arrays, (batch + 1,)
        Sequence boundaries; traced values (new lengths need no retrace).
    max_seqlen_q, max_seqlen_k : int
        Static upper bounds of the sequence lengths.
    causal, softmax_scale, window_size, softcap, alibi_slopes, return_lse
        As :func:`cuflash.attention_varlen` (``alibi_slopes`` (heads_q,) or (batch, heads_q), traced).

    Returns
    -------
    out (total_q, heads_q, head_dim), or (out, lse) with lse (heads_q, total_q), float32 (float64 for
    float64 inputs), not differentiated through.

    Raises
    ------
    TypeError, ValueError
        As :func:`cuflash.attention_varlen`'s shape, dtype and type checks, at trace time. The checks of
        cu_seqlens' values run on CPU JAX (an error from the call); on the GPU the kernels clamp every
        sequence to the packed arrays, as the array function does.

    Notes
    -----
    Gradients come from cuflash's variable-length backward (``jax.custom_vjp``), dQ by atomic additions on
    the GPU. ``jax.vmap`` runs the mapped calls one after another.
    """
    _jax_operands(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes = _as_jax(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    o = _static(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                window_size=window_size, softcap=softcap, return_lse=return_lse)
    opts = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, o["max_seqlen_q"], o["max_seqlen_k"], o["causal"],
                         o["softmax_scale"], o["window_size"], o["softcap"], alibi_slopes)
    return_lse = api._check_flag("return_lse", o["return_lse"])
    out, lse = _attention_varlen(opts, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_varlen"]
