"""PyTorch adapter: differentiable attention as a torch custom op, and FlashAttention-2's function names.

The only module of cuflash that imports torch. The ops ``torch.ops.cuflash.fwd`` / ``bwd`` are defined with
``torch.library`` (define + impl + fake, cheaper per call than ``torch.library.custom_op``) and differentiated
by an outer ``torch.autograd.Function``, so ``torch.compile(fullgraph=True)`` traces through them and a
captured CUDA graph replays them. Outputs and workspaces are allocated by torch on its current stream.

    >>> from cuflash.torch import flash_attn_func      # instead of: from flash_attn import flash_attn_func
    >>> out = flash_attn_func(q, k, v, causal=True)
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from . import api, executor, kvcache, varlen

_lib = torch.library.Library("cuflash", "DEF")
_lib.define(
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, bool causal, float softmax_scale, "
    "int window_left, int window_right, float softcap, bool deterministic, float dropout_p, "
    "Tensor? dropout_state, Tensor? attn_mask) -> (Tensor, Tensor)")
_lib.define(
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? alibi_slopes, bool causal, "
    "float softmax_scale, int window_left, int window_right, float softcap, bool deterministic, float dropout_p, "
    "Tensor? dropout_state, Tensor? attn_mask) -> (Tensor, Tensor, Tensor)")


# Dropout's (seed, offset) reach the ops as `dropout_state`, an int64 tensor of 2 (None without dropout): a
# tensor, not two ints, so that torch.compile(fullgraph=True) traces a seed drawn from torch's generator
# (torch.randint in the graph) where an int would need the value at trace time (a graph break). On the CPU
# the ops read it on the host; a CUDA state (drawn for CUDA inputs) goes to the kernels as a device array
# they read when they run, so a CUDA graph's replays draw new masks as torch's own dropout does. Seeds and
# offsets are 64-bit unsigned (cuflash/dropout.py), stored as the int64 of the same bits.
def _to_i64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _to_u64(x: int) -> int:
    return x + (1 << 64) if x < 0 else x


def _state_ints(dropout_state):
    """(seed, offset) as cuflash.attention takes them: unsigned ints of a CPU `dropout_state`, (the tensor
    itself, 0) for a CUDA one (the kernels read it), (None, 0) without one."""
    if dropout_state is None:
        return None, 0
    if dropout_state.dtype != torch.int64 or tuple(dropout_state.shape) != (2,):
        raise TypeError(f"dropout_state must be an int64 tensor of shape (2,) (seed, offset), got "
                        f"{dropout_state.dtype} {tuple(dropout_state.shape)} on {dropout_state.device}")
    if dropout_state.is_cuda:
        return dropout_state, 0
    seed, offset = dropout_state.tolist()
    return _to_u64(seed), _to_u64(offset)


def _options(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap):
    call = api._Call(q, k, v)
    opts = api._check_options(call, causal, softmax_scale, (window_left, window_right), softcap, alibi_slopes)
    return call, opts


def _first_order(backward):
    """A Function's backward that takes part in first-order gradients only. once_differentiable alone raises
    only when the incoming gradient requires grad; for torch.autograd.grad(..., create_graph=True) of a loss
    whose gradient does not ((out).sum()), it would hand back gradients without a graph, and a term built on
    them (a gradient penalty) would silently contribute nothing. Grad mode is on inside a backward exactly
    when the caller asked create_graph=True, so that raises here (torch.compile's tracing excepted)."""
    inner = torch.autograd.function.once_differentiable(backward)

    def run(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)  # (what once_differentiable does with grad mode off)
        if not torch.compiler.is_compiling():
            raise RuntimeError("cuflash's attention backward is not differentiable: second-order gradients "
                               "(create_graph=True) are not supported")
        return inner(ctx, *grads)
    run.__name__, run.__doc__ = backward.__name__, backward.__doc__
    return run


def _fwd(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, deterministic, dropout_p,
         dropout_state, attn_mask):
    return _fwd_bound(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, dropout_p,
                      dropout_state, attn_mask)[:2]


def _fwd_bound(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, dropout_p,
               dropout_state, attn_mask):
    """The forward's (out, lse, bound): ``bound`` the executor.BoundForward of the call's signature (a plain
    CUDA call, after its first), with which the backward finds its own bound call; else None."""
    key = None
    if alibi_slopes is None and attn_mask is None and dropout_p == 0 and q.is_cuda:
        # A call with the signature of an earlier plain one runs its bound launch (executor.py).
        key = executor.key("torch", (q, k, v), causal, softmax_scale, (window_left, window_right), softcap, True)
        bound = executor.lookup_forward(key)
        if bound is not None:
            res = bound.run(q, k, v)
            if res is not None:
                return (*res, bound)
    call, (causal, scale, window, softcap, alibi) = _options(q, k, v, alibi_slopes, causal, softmax_scale,
                                                             window_left, window_right, softcap)
    dropout = api._check_dropout_args(call, dropout_p, *_state_ints(dropout_state))
    attn_mask = api._check_attn_mask(call, attn_mask)
    api._check_gpu_mask_options(call, "attn_mask", attn_mask, (("alibi_slopes", alibi), ("dropout", dropout)))
    out, lse = api._forward(call, q, k, v, alibi, causal, scale, window, softcap, True, dropout, attn_mask,
                            bind_key=key)
    return out, lse, None if key is None else executor.lookup_forward(key)


def _bwd(dout, q, k, v, out, lse, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap,
         deterministic, dropout_p, dropout_state, attn_mask):
    seed, offset = _state_ints(dropout_state)
    return api.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                                  window_size=(window_left, window_right), softcap=softcap,
                                  alibi_slopes=alibi_slopes, deterministic=deterministic, dropout_p=dropout_p,
                                  dropout_seed=seed, dropout_offset=offset, attn_mask=attn_mask)


_lib.define(
    "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, Tensor? alibi_slopes, Tensor? seqused_q, Tensor? seqused_k, bool causal, float softmax_scale, "
    "int window_left, int window_right, float softcap, float dropout_p, Tensor? dropout_state) -> (Tensor, Tensor)")
_lib.define(
    "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, Tensor? seqused_q, "
    "Tensor? seqused_k, bool causal, float softmax_scale, int window_left, int window_right, float softcap, "
    "bool deterministic, float dropout_p, Tensor? dropout_state) -> (Tensor, Tensor, Tensor)")


def _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_q, seqused_k,
                causal, softmax_scale, window_left, window_right, softcap, dropout_p, dropout_state):
    if dropout_p:  # (the CPU path; GPU tensors raise NotImplementedError there)
        seed, offset = _state_ints(dropout_state)
        return varlen.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                       softmax_scale=softmax_scale, window_size=(window_left, window_right),
                                       softcap=softcap, alibi_slopes=alibi_slopes, seqused_q=seqused_q,
                                       seqused_k=seqused_k, return_lse=True, dropout_p=dropout_p, dropout_seed=seed,
                                       dropout_offset=offset)
    return varlen.forward_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                               causal, softmax_scale, (window_left, window_right), softcap, alibi_slopes, True)


def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                seqused_q, seqused_k, causal, softmax_scale, window_left, window_right, softcap, deterministic,
                dropout_p, dropout_state):
    seed, offset = _state_ints(dropout_state)
    return varlen.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                            window_size=(window_left, window_right), softcap=softcap,
                                            alibi_slopes=alibi_slopes, seqused_q=seqused_q, seqused_k=seqused_k,
                                            deterministic=deterministic, dropout_p=dropout_p, dropout_seed=seed,
                                            dropout_offset=offset)


_lib.define(
    "kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? rotary_cos, "
    "Tensor? rotary_sin, Tensor? cache_seqlens, int cache_seqlens_int, Tensor? cache_batch_idx, "
    "Tensor? cache_leftpad, Tensor? block_table, float softmax_scale, bool causal, int window_left, "
    "int window_right, float softcap, bool rotary_interleaved, Tensor? alibi_slopes, int num_splits) "
    "-> (Tensor, Tensor)")


def _kvcache_fwd(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int,
                 cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_left, window_right,
                 softcap, rotary_interleaved, alibi_slopes, num_splits):
    return kvcache.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens_int if cache_seqlens is None else cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, causal=causal,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
        softmax_scale=softmax_scale, num_splits=num_splits, return_lse=True)


for _device in ("CUDA", "CPU"):
    _lib.impl("fwd", _fwd, _device)
    _lib.impl("bwd", _bwd, _device)
    _lib.impl("varlen_fwd", _varlen_fwd, _device)
    _lib.impl("varlen_bwd", _varlen_bwd, _device)
    _lib.impl("kvcache_fwd", _kvcache_fwd, _device)


@torch.library.register_fake("cuflash::fwd")
def _fwd_fake(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, deterministic,
              dropout_p, dropout_state, attn_mask):
    # Validation runs here too, so that a traced (torch.compile) call rejects bad input at trace time.
    call, _ = _options(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap)
    api._check_attn_mask(call, attn_mask)
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float64 if q.dtype == torch.float64
                                                    else torch.float32)


@torch.library.register_fake("cuflash::varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_q,
                     seqused_k, causal, softmax_scale, window_left, window_right, softcap, dropout_p, dropout_state):
    # Shapes only: the checks that read cu_seqlens' values run in the implementation, before any work.
    total_q, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((hq, total_q), dtype=torch.float64 if q.dtype == torch.float64
                                             else torch.float32)


@torch.library.register_fake("cuflash::varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                     seqused_q, seqused_k, causal, softmax_scale, window_left, window_right, softcap, deterministic,
                     dropout_p, dropout_state):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("cuflash::kvcache_fwd")
def _kvcache_fwd_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int,
                      cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_left, window_right,
                      softcap, rotary_interleaved, alibi_slopes, num_splits):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=torch.float64 if q.dtype == torch.float64
                                             else torch.float32)


@torch.library.register_fake("cuflash::bwd")
def _bwd_fake(dout, q, k, v, out, lse, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap,
              deterministic, dropout_p, dropout_state, attn_mask):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _distinct(*xs):
    """``xs`` with every repeat of a tensor already in the list replaced by a view of it: torch.compile
    (fullgraph) rejects an autograd.Function applied to one tensor twice ("duplicate tensor input"), which
    self-attention calls do (``cu_seqlens`` as both boundaries, ``k is v``); gradients still reach the tensor
    through the view."""
    q, k, v = xs[:3]
    if q is not k and q is not v and k is not v and all(x is None for x in xs[3:]):
        return xs  # the common call (distinct q, k, v, nothing else), without the loop below
    out = []
    for x in xs:
        # `is`, not id(): under torch.compile an id() becomes a guard on the object, recompiling per call.
        if x is not None and isinstance(x, torch.Tensor) and any(x is y for y in out):
            x = x.view_as(x)
        out.append(x)
    return out


def _default_scale(q, softmax_scale):
    """``head_dim ** -0.5`` unless given (the op schemas take a float); head_dim 0 is left to the op's
    validation, which names it."""
    if softmax_scale is not None:
        return softmax_scale
    return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0


def _op(op, impl):
    """Inside the autograd Functions: the op while torch.compile traces (the graph needs the op), else its
    implementation called directly. Through the dispatcher an op whose inputs require grad passes torch's
    autograd fallback first: 95 against 39 us for the forward of flash_attn_func under autograd against
    the same call without grad (H200, .devrun/autograd_timeline.py, bench/NOTES.md "Host cost")."""
    return op if torch.compiler.is_compiling() else impl


class _Attention(torch.autograd.Function):
    """Autograd around the two ops, which themselves have no autograd kernel: a call without grad then
    dispatches straight to the implementation (flash_attn_func forward 78 against 86 us a call with
    ``torch.library.register_autograd`` on the op, H200, bench/bench_host_cost.py; forward + backward the
    same within noise, 630-675 against 642-821 us), and torch.compile traces the Function whole."""

    # The scalar options travel as one tuple: Function.apply handles each argument (functorch's checks, the
    # C++ input scan). With _distinct's fast path, flash_attn_func fwd + grad with the ops stubbed went from
    # ~50 to ~30 us over a do-nothing Function's (this 2-core VM, CPU tensors).
    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, attn_mask, dropout_state, options):
        causal, scale, left, right, softcap, deterministic, dropout_p = options
        if torch.compiler.is_compiling():
            out, lse = torch.ops.cuflash.fwd(q, k, v, alibi_slopes, *options, dropout_state, attn_mask)
            ctx.bound = None
        else:
            out, lse, ctx.bound = _fwd_bound(q, k, v, alibi_slopes, causal, scale, left, right, softcap, dropout_p,
                                             dropout_state, attn_mask)
        # dropout: the same seed and offset replay the forward's mask
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, attn_mask, dropout_state)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        # The LSE gets no gradient: without this the engine would allocate and zero one for every backward
        # (a fill kernel on the engine's thread; 6 of the 47 us of a stubbed step on this 2-core VM).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @_first_order
    def backward(ctx, dout, dlse):
        # Gradients flow through `out` only; like FlashAttention, the LSE output is treated as a constant.
        if dout is None:
            return None, None, None, None, None, None, None
        q, k, v, out, lse, alibi_slopes, attn_mask, dropout_state = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.bound is not None:
            # The backward of a bound forward: its own bound call is filed with it, so only dout, out and lse
            # are checked here (bench/NOTES.md, "Host cost: the autograd step").
            res = executor.run_backward_of_forward(ctx.bound, ctx.options[5], dout, q, k, v, out, lse)
            if res is not None:
                return (*res, None, None, None, None)
        dq, dk, dv = _op(torch.ops.cuflash.bwd, _bwd)(dout, q, k, v, out, lse, alibi_slopes, *ctx.options,
                                                      dropout_state, attn_mask)
        if ctx.bound is not None:
            causal, scale, left, right, softcap, deterministic, dropout_p = ctx.options
            executor.bind_backward_of_forward(
                ctx.bound, deterministic, api._bound_key((dout, q, k, v, out, lse), causal, scale, (left, right),
                                                         softcap, deterministic, dropout_p))
        return dq, dk, dv, None, None, None, None


class _BlockSparseAttention(torch.autograd.Function):
    """Autograd around the core API's block-sparse path (CUDA tensors with a block mask): the BlockMask object
    rides on the Function, which no op schema takes, so torch.compile runs this part eagerly (a graph break)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, options):
        causal, scale, window, softcap, deterministic = options
        out, lse = api.attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
                                 return_lse=True, block_mask=block_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.options = block_mask, options
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # (as _Attention)
        return out, lse

    @staticmethod
    @_first_order
    def backward(ctx, dout, dlse):
        if dout is None:
            return None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, window, softcap, deterministic = ctx.options
        dq, dk, dv = api.attention_backward(dout.contiguous(), q, k, v, out, lse, causal=causal, softmax_scale=scale,
                                            window_size=window, softcap=softcap, deterministic=deterministic,
                                            block_mask=ctx.block_mask)
        return dq, dk, dv, None, None


@torch.compiler.disable
def _block_sparse(q, k, v, block_mask, options):
    return _BlockSparseAttention.apply(q, k, v, block_mask, options)


class _VarlenAttention(torch.autograd.Function):
    """Autograd around the variable-length ops (as _Attention for the dense ones)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_q,
                seqused_k, causal, softmax_scale, window_left, window_right, softcap, dropout_p, dropout_state,
                deterministic):
        args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_q, seqused_k, causal,
                softmax_scale, window_left, window_right, softcap)
        out, lse = torch.ops.cuflash.varlen_fwd(q, k, v, *args, dropout_p, dropout_state)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seqused_q, seqused_k,
                              dropout_state)
        ctx.options = (max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left, window_right, softcap,
                       deterministic, dropout_p)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # (as _Attention)
        return out, lse

    @staticmethod
    @_first_order
    def backward(ctx, dout, dlse):
        if dout is None:
            return (None,) * 18
        q, k, v, out, lse, cu_q, cu_k, alibi_slopes, seqused_q, seqused_k, dropout_state = ctx.saved_tensors
        max_q, max_k, causal, scale, left, right, softcap, deterministic, dropout_p = ctx.options
        dq, dk, dv = torch.ops.cuflash.varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                                  alibi_slopes, seqused_q, seqused_k, causal, scale, left, right,
                                                  softcap, deterministic, dropout_p, dropout_state)
        return (dq, dk, dv) + (None,) * 15


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, seqused_q=None,
                     seqused_k=None, return_lse=False, deterministic=False, dropout_p=0.0, dropout_seed=None,
                     dropout_offset=0):
    """Differentiable :func:`cuflash.attention_varlen` for torch tensors (same arguments and semantics;
    ``deterministic=True`` makes the backward bitwise reproducible; the LSE is not differentiated through).
    :func:`cuflash.attention_varlen` itself comes here for tensors that require grad. ``dropout_p > 0``
    without a seed draws one from torch's default generator, as :func:`attention` does (CPU tensors for now:
    CUDA tensors raise NotImplementedError)."""
    dropout_p = api._check_probability(dropout_p)
    varlen.refuse_gpu_dropout(isinstance(q, torch.Tensor) and q.is_cuda, dropout_p)  # (before a seed is drawn)
    state = _dropout_state(dropout_p, dropout_seed, dropout_offset, _device(q))
    softmax_scale = _default_scale(q, softmax_scale)
    left, right = api._check_window(window_size)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_q, seqused_k,
            causal, softmax_scale, left, right, softcap)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _VarlenAttention.apply(*_distinct(*args), dropout_p, state, deterministic)
    else:
        out, lse = torch.ops.cuflash.varlen_fwd(*args, dropout_p, state)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """FlashAttention-2's ``flash_attn_varlen_func`` with its argument order, defaults and return values:
    :func:`cuflash.attention_varlen` on torch tensors, differentiable.

    q (total_q, heads, head_dim), k/v (total_k, heads_k, head_dim), ``cu_seqlens`` int32 (batch + 1,).
    Returns ``out``, or ``(out, softmax_lse (heads, total_q), None)`` with ``return_attn_probs=True``. CPU and
    CUDA tensors, forward and backward (``deterministic=True``: a bitwise-repeatable backward); ``block_table``
    (paged KV) raises NotImplementedError; ``dropout_p > 0`` (seed and offset from torch's default generator, as
    :func:`flash_attn_func`) on CPU tensors, NotImplementedError on CUDA ones for now.
    """
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not implemented in cuflash yet")
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, return_lse=True, deterministic=deterministic,
                                dropout_p=dropout_p)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, heads, head_dim), read in place (no copy); the
    sequences' queries and keys share ``cu_seqlens`` and ``max_seqlen``."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, heads, head_dim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_kvpacked_func``: kv (total_k, 2, heads_k, head_dim), read in place (no copy)."""
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_k, 2, heads_k, head_dim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """FlashAttention-2's ``flash_attn_with_kvcache`` with its argument order, defaults and returns:
    :func:`cuflash.attention_with_kvcache` as a torch op that declares ``k_cache`` and ``v_cache`` mutated
    (the in-place append), so torch.compile keeps the write. Inference only (no autograd). CUDA tensors
    without rotary tables or leftpad with paging / ``cache_batch_idx`` (those raise NotImplementedError
    there), CPU tensors with all of it. Returns ``out`` or ``(out, softmax_lse)``.
    """
    softmax_scale = _default_scale(q, softmax_scale)
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required (an int or an int32 tensor of shape (batch,))")
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an int32 tensor of shape (batch,), got bool")
    as_int = isinstance(cache_seqlens, numbers.Integral)
    left, right = api._check_window(window_size)
    out, lse = torch.ops.cuflash.kvcache_fwd(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, None if as_int else cache_seqlens,
        int(cache_seqlens) if as_int else 0, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
        left, right, softcap, rotary_interleaved, alibi_slopes, num_splits)
    if not torch.compiler.is_compiling():
        # The caches were written in place: autograd must see it (a saved cache would be stale), as for
        # kc[:, 0] = x. Under torch.compile the op's declared mutation does this.
        for cache in (k_cache, v_cache):
            torch.autograd.graph.increment_version(cache)
    return (out, lse) if return_softmax_lse else out


def _dropout_state(dropout_p, dropout_seed, dropout_offset, device=None):
    """The ops' `dropout_state`: None without dropout (and no seed); the caller's (seed, offset); or, without a
    seed and with dropout_p > 0, one drawn from torch's default generator of the inputs' ``device``; a tensor
    ``dropout_seed`` of (seed, offset) as it is
    (torch.manual_seed reproduces a run; under torch.compile the draw is part of the graph). On a CUDA device
    the draw stays there (one torch.randint kernel, which a CUDA graph replays with fresh numbers): seed and
    offset both drawn, or the caller's dropout_offset written in when it is not 0; on the CPU, a seed and the
    caller's offset."""
    from .dropout import check_seed
    if isinstance(dropout_seed, np.ndarray):  # a NumPy (seed, offset): copied into a CPU tensor, since autograd
        dropout_seed = torch.tensor(dropout_seed)  # cannot see the caller advancing the array before the backward
    if isinstance(dropout_seed, torch.Tensor):  # the caller's (seed, offset), read where it lives
        api._check_seed_array("a tensor", str(dropout_seed.dtype).removeprefix("torch."), dropout_seed.shape,
                              dropout_offset)
        if device is not None and dropout_seed.device != device:
            raise ValueError(f"dropout_seed is on {dropout_seed.device} but q is on {device}")
        return dropout_seed.view(torch.int64)
    if dropout_seed is None and not dropout_p and dropout_offset.__class__ is int and dropout_offset == 0:
        return None  # (the common call, without the checks below: 2.3 us of a 47 us step on this VM)
    offset = _to_i64(check_seed("dropout_offset", dropout_offset))
    if dropout_seed is None:
        if not dropout_p:
            return None
        if device is not None and device.type == "cuda":
            state = torch.randint(0, (1 << 63) - 1, (2,), dtype=torch.int64, device=device)
            if offset:
                state[1] = offset
            return state
        # (on the CPU whatever torch.set_default_device says: the ops read the state on the host)
        drawn = torch.randint(0, (1 << 63) - 1, (1,), dtype=torch.int64, device="cpu")
        return torch.cat([drawn, torch.tensor([offset], dtype=torch.int64, device="cpu")])
    return torch.tensor([_to_i64(check_seed("dropout_seed", dropout_seed)), offset], dtype=torch.int64,
                        device="cpu")


def _device(x):
    """A tensor's device (None for anything else: the checks judge it)."""
    return x.device if isinstance(x, torch.Tensor) else None


def _tensor(x):
    """A NumPy array (which cuflash.attention takes beside CPU tensors) as a CPU tensor sharing its memory, for
    the op schema and autograd's saved tensors; anything else as it is (the checks judge it)."""
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


@torch.compiler.assume_constant_result
def _dense_block_mask(block_mask, batch, heads, seqlen_q, seqlen_k):
    """A block mask's dense element mask (bool (batch, heads, seqlen_q, seqlen_k) CPU tensor), checked for the
    problem. torch.compile takes the result as a constant of the graph instead of tracing the NumPy work."""
    from .block_mask import checked
    block_mask = checked(block_mask, batch, heads, seqlen_q, seqlen_k)
    # (batch or heads of 1 where nothing depends on them: the mask then broadcasts instead of taking
    # batch * heads * seqlen_q * seqlen_k bytes, 1 GiB at 4 x 16 x 4k)
    return torch.from_numpy(block_mask.to_dense(*block_mask._table_grid(batch, heads)))


def _with_block_mask(q, k, attn_mask, block_mask):
    """``attn_mask`` with a block mask's dense element mask folded in (the ops take tensors, not the object),
    after the checks that folding needs (q and k 4-D, the mask bool or float and broadcastable), so that bad
    arguments are named as the op's checks would name them."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (batch, seqlen, heads, head_dim), got {q.dim()}-D and {k.dim()}-D")
    b, sq, hq = q.shape[:3]
    dense = _dense_block_mask(block_mask, int(b), int(hq), int(sq), int(k.shape[1]))
    if attn_mask is None:
        return dense
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or a float dtype (added to the scores), got "
                        f"{attn_mask.dtype}")
    if attn_mask.dim() > 4 or any(m not in (1, n) for m, n in zip(attn_mask.shape[::-1], dense.shape[::-1])):
        raise ValueError(f"attn_mask must broadcast to (batch, heads_q, seqlen_q, seqlen_k) = {tuple(dense.shape)}, "
                         f"got shape {tuple(attn_mask.shape)}")
    if attn_mask.dtype == torch.bool:
        return attn_mask & dense
    return attn_mask.masked_fill(~dense, float("-inf"))


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False, deterministic=False, dropout_p=0.0, dropout_seed=None,
              dropout_offset=0, attn_mask=None, block_mask=None):
    """Differentiable :func:`cuflash.attention` for torch tensors (same arguments and semantics).

    ``deterministic=True`` makes the backward bitwise reproducible. The returned LSE (``return_lse``) is
    not differentiated through. Dropout (``dropout_p > 0``): without ``dropout_seed`` a (seed, offset) is drawn
    from torch's default generator of the inputs' device (``torch.manual_seed`` reproduces the mask; under
    ``torch.compile`` the draw is part of the graph, so ``fullgraph=True`` holds), and the backward replays the
    forward's mask. CUDA tensors run the kernels' dropout builds, which read the drawn state on the device
    as they run: a captured CUDA graph draws a new mask at every replay, as torch's own dropout does.
    ``attn_mask`` as :func:`cuflash.attention` takes it (CPU or CUDA tensors); it is not differentiated, so
    a mask that requires grad raises NotImplementedError. ``block_mask`` (a :class:`cuflash.BlockMask` or a
    FlexAttention one): on CUDA tensors the block-sparse kernels (cuflash.attention's GPU path; under
    ``torch.compile`` that call runs eagerly, a graph break, so ``fullgraph=True`` refuses it); on CPU tensors
    it reaches the op as its dense element mask, combined with ``attn_mask``. Under ``torch.compile`` that
    dense mask is a constant of the graph, guarded by the BlockMask object: a new BlockMask compiles the
    function again (and ``fullgraph=True`` fails past torch's recompile limit, 8), and changing a BlockMask in
    place is not seen; a training loop that builds a mask per step should pass its dense mask as
    ``attn_mask``, an input of the graph. (torch 2.13 compiles that; torch 2.11's Dynamo refuses the BlockMask
    as an argument of a constant-result function, so there it fails to compile.)
    """
    attn_mask, alibi_slopes = _tensor(attn_mask), _tensor(alibi_slopes)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor (bool or float, broadcastable to (batch, heads_q, seqlen_q, "
                        f"seqlen_k)), got {type(attn_mask).__name__}")
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("attn_mask requires grad; cuflash does not differentiate the mask (detach it)")
    dropout_p = api._check_probability(dropout_p)
    if block_mask is not None and getattr(q, "is_cuda", False):
        options = (api._check_flag("causal", causal), _default_scale(q, softmax_scale), tuple(window_size),
                   softcap, api._check_flag("deterministic", deterministic))
        # What the backward lacks raises now, not at loss.backward(): deterministic mode, head dims over 128.
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        block_mask = api._check_block_mask(api._Call(q, k, v), block_mask, attn_mask, alibi_slopes,
                                           dropout_p or None, options[4], backward=needs_grad)
        out, lse = _block_sparse(q, k, v, block_mask, options)
        return (out, lse) if return_lse else out
    if block_mask is not None:  # (its dense mask needs no grad)
        attn_mask = _with_block_mask(q, k, attn_mask, block_mask)
    out, lse = _attention(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, deterministic,
                          dropout_p, _dropout_state(dropout_p, dropout_seed, dropout_offset, _device(q)), attn_mask)
    return (out, lse) if return_lse else out


def _attention(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, deterministic, dropout_p,
               dropout_state, attn_mask):
    """(out, lse), through autograd when q, k or v need grad (``dropout_p`` checked already)."""
    if (causal.__class__ is bool and deterministic.__class__ is bool and softmax_scale is None
            and softcap.__class__ is float and softcap == 0.0 and window_size.__class__ is tuple
            and window_size == (-1, -1) and window_size[0].__class__ is int and window_size[1].__class__ is int
            and q.__class__ is torch.Tensor and q.dim() == 4):
        # The options every check below passes unchanged (each default, a bool causal and deterministic), in
        # fewer steps: a small model's eager step pays this per attention.
        args = (causal, q.shape[3] ** -0.5 if q.shape[3] > 0 else 1.0, -1, -1, 0.0, deterministic, dropout_p)
    else:
        # The options checked as cuflash.attention checks them, before either path: the op schema would
        # convert causal=1 or a 0-d tensor that the autograd path, calling the implementation, rejects.
        causal, deterministic = api._check_flag("causal", causal), api._check_flag("deterministic", deterministic)
        softcap = api._check_real("softcap", softcap, nonneg=True)
        softmax_scale = api._check_real("softmax_scale", softmax_scale, allow_none=True, positive=True)
        softmax_scale = _default_scale(q, softmax_scale)
        left, right = api._check_window(window_size)
        args = (causal, softmax_scale, left, right, softcap, deterministic, dropout_p)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        q, k, v, alibi_slopes, attn_mask = _distinct(q, k, v, alibi_slopes, attn_mask)
        return _Attention.apply(q, k, v, alibi_slopes, attn_mask, dropout_state, args)
    return torch.ops.cuflash.fwd(q, k, v, alibi_slopes, *args, dropout_state, attn_mask)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention-2's ``flash_attn_func`` with its argument order, defaults and return values.

    q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, heads_k, head_dim). Returns ``out``, or
    ``(out, softmax_lse, S_dmask)`` with ``return_attn_probs=True``: as in FlashAttention-2, ``S_dmask`` is
    None without dropout and, with ``dropout_p > 0``, the attention probabilities (batch, heads, seqlen_q,
    seqlen_k) in q's dtype with the dropped entries negated (for tests: quadratic memory; FlashAttention-2
    pads the last two dims to multiples of 128, cuflash does not). ``dropout_p > 0``: the seed comes from
    torch's default generator (see :func:`attention`).
    """
    if dropout_p.__class__ is float and dropout_p == 0.0:  # (the checks below, done)
        state = None
    else:
        dropout_p = api._check_probability(dropout_p)
        state = _dropout_state(dropout_p, None, 0, _device(q))
    out, lse = _attention(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, deterministic,
                          dropout_p, state, None)
    if not return_attn_probs:
        return out
    if not dropout_p:
        return out, lse, None
    return out, lse, _s_dmask(q, k, state, dropout_p, causal, softmax_scale, window_size, softcap, alibi_slopes)


@torch.compiler.disable  # (NumPy on the host, and the state read back: a graph break under torch.compile)
def _s_dmask(q, k, state, dropout_p, causal, softmax_scale, window_size, softcap, alibi_slopes):
    """FlashAttention-2's S_dmask: the probabilities (batch, heads, seqlen_q, seqlen_k) in q's dtype, the
    dropped entries negated, from the NumPy path and the mask of ``state`` (a CUDA state is read back: a sync;
    S_dmask is for tests)."""
    from . import dropout, reference
    seed, offset = (_to_u64(x) for x in state.tolist())

    def host(x):  # (CUDA tensors as float32 copies: NumPy has no bfloat16)
        x = x.detach()
        return x.to("cpu", torch.float32).numpy() if x.is_cuda else x.numpy()
    slopes = None if alibi_slopes is None else host(alibi_slopes)
    probs = reference.attention_probs(host(q), host(k), causal=causal, softmax_scale=softmax_scale,
                                      window_size=window_size, softcap=softcap, alibi_slopes=slopes)
    keep = dropout.dropout_mask(*probs.shape, dropout_p=dropout_p, dropout_seed=seed, dropout_offset=offset)
    return torch.from_numpy(np.where(keep, probs, -probs)).to(q.device, q.dtype)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, heads, head_dim), read in place (no copy)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, heads, head_dim), got {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_kvpacked_func``: kv (batch, seqlen_k, 2, heads_k, head_dim), read in place (no copy)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, heads_k, head_dim), got {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention``'s signature, layout and semantics, computed by
    cuflash (differentiable; the (batch, heads, seqlen, head_dim) tensors are read in place as strided views).

    query (batch, heads_q, L, E) or (batch, L, E); key, value (batch, heads_k, S, E) or (batch, S, E).
    ``attn_mask`` bool (True = attend) or float (added), broadcastable to (batch, heads_q, L, S);
    ``is_causal`` is SDPA's top-left-aligned causal mask (query i sees keys j <= i), which differs from
    FlashAttention's bottom-right alignment when L != S; ``scale`` defaults to E ** -0.5; ``enable_gqa``
    must be True when heads_q != heads_k (as in SDPA). A query row whose mask admits no key returns zeros
    (SDPA's math path returns NaN there). Returns (batch, heads_q, L, E) (a transposed view).

    To send a model's SDPA calls here: ``torch.nn.functional.scaled_dot_product_attention =
    cuflash.torch.scaled_dot_product_attention``.

    Raises
    ------
    ValueError
        Ranks other than 3 / 4, ``attn_mask`` together with ``is_causal``, heads_q != heads_k without
        ``enable_gqa``, ``scale <= 0`` (which SDPA takes; cuflash's kernels need a positive scale); and
        whatever :func:`cuflash.attention` raises for its arguments.
    NotImplementedError
        A value head dim other than the query's; on CUDA tensors, ``attn_mask`` (or ``is_causal`` with L < S,
        which becomes a mask) together with ``dropout_p > 0``.
    """
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value must all be 4-D (batch, heads, seqlen, head_dim) or 3-D (batch, "
                         f"seqlen, head_dim), got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"value head dim {value.shape[-1]} differs from the query's {query.shape[-1]}; "
                                  f"cuflash needs them equal")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True were both given; SDPA takes one or the other")
    attn_mask = _tensor(attn_mask)
    three = query.dim() == 3
    if three:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads but key has {key.shape[1]}; pass enable_gqa=True for "
                         f"grouped-query attention (as SDPA requires)")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    causal, window = False, (-1, -1)
    if is_causal:
        if seqlen_q == seqlen_k:
            causal = True
        elif seqlen_q > seqlen_k:
            window = (-1, seqlen_q - seqlen_k)  # bottom-right alignment shifted to the top-left corner
        else:
            attn_mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and three and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)  # (batch, L, S) for 3-D inputs: one head
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    softmax_scale=scale, window_size=window, dropout_p=dropout_p, attn_mask=attn_mask)
    out = out.transpose(1, 2)
    return out.squeeze(1) if three else out


__all__ = ["attention", "attention_varlen", "scaled_dot_product_attention", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_with_kvcache"]
