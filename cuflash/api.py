"""The public functional API: argument checks, defaults, and the contract (see the docstrings).

Every check here runs before any kernel is launched, and names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from . import arrays, executor, reference

_GPU_DTYPES = ("float16", "bfloat16")
_CPU_DTYPES = ("float16", "float32", "float64")
_MAX_SEQLEN = 1 << 30  # keeps every index the kernels form from seqlen_q + seqlen_k inside int32
_MAX_HEAD_DIM = 256
# The attention kernels read rows in 16-byte chunks: 8 elements of 16 bits.
_ROW_CHUNK = 8

_DROPOUT_NOT_IMPLEMENTED = ("dropout_p={}: attention dropout is not implemented for {} yet; pass dropout_p=0.0 "
                            "(or apply dropout outside attention)")


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


def _check_probability(dropout_p):
    p = _check_real("dropout_p", dropout_p, nonneg=True)
    if p >= 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def check_dropout(dropout_p, where):
    """The ``dropout_p`` of an entry point without dropout yet (``where`` names it): a probability in
    [0, 1); anything above 0 raises NotImplementedError."""
    p = _check_probability(dropout_p)
    if p > 0:
        raise NotImplementedError(_DROPOUT_NOT_IMPLEMENTED.format(p, where))
    return p


class _Dropout(NamedTuple):
    """A checked dropout request: p, the (seed, offset) ints, and ``state``, the caller's device array of
    (seed, offset) that the kernels read when they run (GPU arrays; then seed = offset = 0), or None, with
    ``state_view`` its DeviceArray view (the address ops.py writes)."""
    p: float
    seed: int
    offset: int
    state: object = None
    state_view: object = None


def _check_seed_array(what, dtype, shape, dropout_offset):
    """The rules of a (seed, offset) array given as ``dropout_seed`` (``what``: "an array", "a tensor"): int64
    or uint64 (TypeError), shape (2,) (ValueError), and dropout_offset left at 0 (ValueError)."""
    if dtype not in ("int64", "uint64"):
        raise TypeError(f"dropout_seed as {what} must hold (seed, offset) as int64 or uint64, got {dtype}")
    if tuple(shape) != (2,):
        raise ValueError(f"dropout_seed as {what} must hold (seed, offset): shape (2,), got {tuple(shape)}")
    if isinstance(dropout_offset, bool) or not isinstance(dropout_offset, numbers.Integral) or dropout_offset != 0:
        raise ValueError(f"dropout_offset must be 0 (the default) when dropout_seed is {what} of (seed, offset), "
                         f"got {dropout_offset!r}")


def _check_dropout_args(call, dropout_p, dropout_seed, dropout_offset):
    """A :class:`_Dropout` for a call with dropout, None without; p > 0 needs a seed (the CPU path and the GPU
    kernels' dropout builds draw the same mask from it): an int, or an array of two 64-bit integers (seed,
    offset) on the inputs' device (read on the host for the CPU path; by the kernels, as they run, for GPU
    arrays), which takes no dropout_offset."""
    p = _check_probability(dropout_p)
    if p == 0:
        return None
    from .dropout import check_seed
    if dropout_seed is None:
        raise TypeError(f"dropout_p={p} needs dropout_seed (an int in [0, 2**64), or an array of (seed, offset)); "
                        f"the forward and the backward given the same seed and offset draw the same mask (the "
                        f"cuflash.torch functions draw one from torch's generator when none is given)")
    is_array = hasattr(dropout_seed, "shape") and hasattr(dropout_seed, "dtype")
    if isinstance(dropout_seed, numbers.Integral) or not is_array:  # (NumPy integer scalars are ints here)
        return _Dropout(p, check_seed("dropout_seed", dropout_seed), check_seed("dropout_offset", dropout_offset))
    fw = arrays.framework_of(dropout_seed)
    if fw != call.fw and not (fw == "numpy" and not call.on_gpu):
        raise TypeError(f"dropout_seed is a {fw} array but {call.names[0]} is a {call.fw} array")
    _check_seed_array("an array", arrays.dtype_name(dropout_seed, fw), dropout_seed.shape, dropout_offset)
    dev = arrays.device_of(dropout_seed, fw)
    if dev != call.device:
        raise ValueError(f"dropout_seed is on device {dev} but {call.names[0]} is on {call.device}")
    if not call.on_gpu:
        seed, offset = (int(x) % (1 << 64) for x in np.asarray(_to_numpy(dropout_seed, fw)).tolist())
        return _Dropout(p, seed, offset)
    view = arrays.device_view(dropout_seed, fw, arrays.current_stream(fw, dev))
    if view.strides != (1,) or view.ptr % 8:
        raise ValueError(f"dropout_seed as an array must be contiguous and 8-byte aligned (the kernels read its two "
                         f"words), got strides {view.strides} (elements) at address {view.ptr:#x}")
    return _Dropout(p, 0, 0, dropout_seed, view)


def _check_window(window_size):
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int \
            and type(window_size[1]) is int and window_size[0] == window_size[1] == -1:
        return window_size  # the default, without the checks below (exact types: (-1.0, -1.0) is no pair of ints)
    if not isinstance(window_size, (tuple, list)):
        raise TypeError(f"window_size must be a pair (left, right) of ints (-1: unbounded), got {window_size!r}")
    if len(window_size) != 2:
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
        # Sizes as the arrays give them: ints, or torch SymInts while torch.compile traces the op's fake
        # implementation, where int() would specialize the graph on this call's sizes (a recompile per
        # seqlen); the comparisons below only add range guards there.
        b, sq, hq, d = q.shape
        bk, sk, hk, dk = k.shape
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"{names[2]} must have the shape of {names[1]} {tuple(k.shape)}, got {tuple(v.shape)}")
        if bk != b:
            raise ValueError(f"{names[1]} has batch {bk} but {names[0]} has batch {b}")
        if dk != d:
            raise ValueError(f"{names[1]} has head_dim {dk} but {names[0]} has head_dim {d}")
        # Empty batches and sequences are legal (empty outputs; seqlen_k == 0: every row sees no key).
        for name, n in (("batch", b), ("seqlen_q", sq), ("seqlen_k", sk)):
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        for name, n in (("heads_q", hq), ("heads_k", hk)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if sq >= _MAX_SEQLEN or sk >= _MAX_SEQLEN:
            raise ValueError(f"seqlen_q and seqlen_k must be < 2**30, got {sq} and {sk}")
        if not 1 <= d <= _MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
        if hq % hk != 0:
            raise ValueError(f"heads_q ({hq}) must be a multiple of heads_k ({hk}) (GQA/MQA)")
        self.batch, self.seqlen_q, self.heads_q, self.head_dim = b, sq, hq, d
        self.seqlen_k, self.heads_k = sk, hk
        # Row width the GPU kernels see: head dims off a multiple of 8 run on zero-padded copies.
        self.width = -(-d // _ROW_CHUNK) * _ROW_CHUNK
        self.names = names

    @property
    def empty(self) -> bool:
        """No query or no key: nothing to launch; outputs are filled instead (zeros, LSE +inf)."""
        return self.batch == 0 or self.seqlen_q == 0 or self.seqlen_k == 0

    def check_alibi(self, alibi_slopes):
        return check_alibi(alibi_slopes, fw=self.fw, device=self.device, batch=self.batch, heads_q=self.heads_q,
                           q_name=self.names[0])


def check_alibi(alibi_slopes, *, fw, device, batch, heads_q, q_name="q"):
    """``alibi_slopes`` as the kernels take them: None, or float32 (heads_q,) / (batch, heads_q) of q's array
    type (a NumPy array also goes with CPU arrays) on q's device. Raises TypeError / ValueError naming it."""
    if alibi_slopes is None:
        return None
    afw = arrays.framework_of(alibi_slopes)
    if afw != fw and not (afw == "numpy" and not isinstance(device, int)):
        raise TypeError(f"alibi_slopes is a {afw} array but {q_name} is a {fw} array")
    if arrays.dtype_name(alibi_slopes, afw) != "float32":
        raise TypeError(f"alibi_slopes must be float32, got {arrays.dtype_name(alibi_slopes, afw)}")
    shape = tuple(alibi_slopes.shape)
    if shape not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}), got {shape}")
    if arrays.device_of(alibi_slopes, afw) != device:
        raise ValueError(f"alibi_slopes is on device {arrays.device_of(alibi_slopes, afw)} but {q_name} is on {device}")
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


_MASK_DTYPES_CPU = ("bool", "float16", "float32", "float64")


def _check_attn_mask(call, attn_mask):
    """``attn_mask``: None, or a bool / float array of q's type (a NumPy array goes with CPU arrays) on q's
    device, broadcastable to (batch, heads_q, seqlen_q, seqlen_k); on GPU arrays bool or q's dtype."""
    if attn_mask is None:
        return None
    if not (hasattr(attn_mask, "shape") and hasattr(attn_mask, "dtype")):
        raise TypeError(f"attn_mask must be an array (bool or float, broadcastable to (batch, heads_q, seqlen_q, "
                        f"seqlen_k)), got {type(attn_mask).__name__}")
    mfw = arrays.framework_of(attn_mask)
    if mfw != call.fw and not (mfw == "numpy" and not call.on_gpu):
        raise TypeError(f"attn_mask is a {mfw} array but {call.names[0]} is a {call.fw} array")
    dt = arrays.dtype_name(attn_mask, mfw)
    if dt not in _MASK_DTYPES_CPU + ("bfloat16",):
        raise TypeError(f"attn_mask must be bool (True = attend) or a float dtype (added to the scores), got {dt}")
    full = (call.batch, call.heads_q, call.seqlen_q, call.seqlen_k)
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, n) for m, n in zip(shape[::-1], full[::-1])):
        raise ValueError(f"attn_mask must broadcast to (batch, heads_q, seqlen_q, seqlen_k) = {full}, got shape "
                         f"{shape}")
    dev = arrays.device_of(attn_mask, mfw)
    if dev != call.device:
        raise ValueError(f"attn_mask is on device {dev} but {call.names[0]} is on {call.device}")
    if call.on_gpu:
        if dt not in ("bool", call.dtype):
            raise TypeError(f"attn_mask on GPU arrays must be bool or {call.dtype} (q's dtype), got {dt}")
        return attn_mask
    if dt == "bfloat16":
        raise TypeError("attn_mask is bfloat16; the CPU path takes bool or float16/32/64 masks")
    return attn_mask


def _check_gpu_mask_options(call, name, mask, options) -> None:
    """A mask (``name``: attn_mask, block_mask) on GPU arrays with one of ``options`` ((feature, value or None)
    pairs) that its kernel builds lack: NotImplementedError before anything is allocated."""
    if mask is None or not call.on_gpu:
        return
    for feature, value in options:
        if value is not None:
            raise NotImplementedError(f"{name} together with {feature} is not implemented for GPU arrays yet "
                                      f"(the CPU path has it)")


def _device_mask(call, attn_mask, stream):
    """The attn_mask as a (batch, heads_q, seqlen_q, seqlen_k) device view: its own strides, 0 on the
    dimensions it broadcasts (leading ones it lacks, and size-1 ones); the dtype named as checked."""
    if attn_mask is None:
        return None
    view = arrays.device_view(attn_mask, call.fw, stream)
    full = (call.batch, call.heads_q, call.seqlen_q, call.seqlen_k)
    pad = 4 - len(view.shape)
    shape, strides = (1,) * pad + tuple(view.shape), (0,) * pad + tuple(view.strides)
    strides = tuple(0 if m == 1 else st for m, st in zip(shape, strides))
    return arrays.DeviceArray(view.ptr, full, strides, arrays.dtype_name(attn_mask, call.fw), view.device, view.owner)


def _check_block_mask(call, block_mask, attn_mask, alibi, dropout, deterministic=False, backward=False):
    """``block_mask``: None, or a :class:`cuflash.BlockMask` / torch FlexAttention ``BlockMask`` for this
    problem (block_mask.checked). On GPU arrays NotImplementedError, before anything is allocated, for what the
    block-sparse kernels lack: another attn_mask, ALiBi, dropout, deterministic mode, a GPU other than Hopper,
    a head dim without the backward's build (``backward``), blocks their tiles do not divide (launch_plan
    checks the views TMA must address)."""
    if block_mask is None:
        return None
    from .block_mask import checked
    block_mask = checked(block_mask, call.batch, call.heads_q, call.seqlen_q, call.seqlen_k)
    _check_gpu_mask_options(call, "block_mask", block_mask, (("attn_mask", attn_mask), ("alibi_slopes", alibi),
                                                             ("dropout", dropout),
                                                             ("deterministic=True", deterministic or None)))
    if call.on_gpu:
        from . import dispatch
        cc = _cc(call.device)
        if dispatch.forward_family(cc) != "fwd_sm90":
            raise NotImplementedError("block_mask on GPU arrays runs on the Hopper kernels (compute capability 9.0); "
                                      "this GPU has none (the CPU path has it)")
        for back in (False, True) if backward else (False,):
            tiles = dispatch.block_sparse_tiles(call.head_dim, back)
            if tiles is None or (back and dispatch.backward_family(cc, call.head_dim, False, attn_mask=True)
                                 != "bwd_sm90"):
                raise NotImplementedError("block_mask on GPU arrays runs on the Hopper kernels (the backward at "
                                          f"head dims up to 128); head dim {call.head_dim} has none")
            dispatch.check_block_sparse_tiles(block_mask.block_size, tiles)
    return block_mask


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


def _readable_in_place(view) -> bool:
    """Whether the attention kernels can read a view as it is: unit last stride, rows on 16-byte boundaries
    (a zero stride, such as a broadcast head, is fine)."""
    return (view.strides[-1] == 1 and view.ptr % 16 == 0
            and all(s % _ROW_CHUNK == 0 and s >= 0 for s in view.strides[:-1]))


def _device_input(call, x, stream, cc):
    """A device view of ``x`` the kernels can read: the caller's memory when it can be read in place, else
    one contiguous copy of width ``call.width`` (zero columns past head_dim), allocated by the caller's
    framework on its stream. Copies happen for a non-unit last stride, rows off 16-byte boundaries and
    head dims that are not multiples of 8; never otherwise."""
    from . import ops
    view = arrays.device_view(x, call.fw, stream)
    if _in_place(call, view):
        return view
    _, buf = arrays.empty(call.fw, (*view.shape[:3], call.width), view.dtype, view.device, stream)
    ops.strided_copy(view, buf, stream=stream, cc=cc)
    return buf


def decode_groups(seqlen_q: int, heads_q: int, heads_k: int, alibi, window) -> int:
    """How many query heads share a key/value head (heads_q // heads_k) when a call can run them as the rows
    of one tile, else 1: one query per sequence (decoding), GQA, no ALiBi (its slopes are per query head) and
    no left window. Each key/value head's keys are then read once for its whole group instead of once per
    query head (FlashAttention-2 does the same for seqlen_q == 1). A single query aligned to the last key
    (FlashAttention's bottom-right convention) sees every key, so causal and a right window change nothing
    for it, and the packed call runs without them (its rows would otherwise be masked as different
    positions)."""
    if seqlen_q != 1 or heads_q == heads_k or alibi is not None or window[0] >= 0:
        return 1
    return heads_q // heads_k


def pack_query_heads(view, groups: int):
    """A (batch, 1, heads_q, d) view as (batch, groups, heads_k, d): the ``groups`` query heads of each
    key/value head become its rows (strides only: row i of head h is query head h * groups + i). The LSE's
    (batch, heads_q, 1) layout is (batch, heads_k, groups) already."""
    b, _, hq, d = view.shape
    sb, _, sh, sd = view.strides
    return arrays.DeviceArray(view.ptr, (b, groups, hq // groups, d), (sb, sh, groups * sh, sd), view.dtype,
                              view.device, view.owner)


def _in_place(call, *views) -> bool:
    """Whether _device_input read every one of ``views`` in place (no padded copy)."""
    return call.width == call.head_dim and all(_readable_in_place(x) for x in views)


def _device_output(call, shape, stream):
    """(native result, its view, view the kernels write): the result itself when head_dim is a multiple of
    8 (or nothing is launched), else a padded work buffer whose first head_dim columns
    :func:`_finish_output` copies into the result."""
    native, view = arrays.empty(call.fw, shape, call.dtype, call.device, stream)
    if call.width == call.head_dim or call.empty:
        return native, view, view
    _, work = arrays.empty(call.fw, (*shape[:3], call.width), call.dtype, call.device, stream)
    return native, view, work


def _finish_output(view, work, stream, cc):
    if work is not view:
        from . import ops
        ops.strided_copy(work, view, stream=stream, cc=cc)


def _device_alibi(alibi, fw, stream):
    """ALiBi slopes as the kernels read them: a unit stride along heads (strided slopes get one small copy)."""
    if alibi is None:
        return None
    view = arrays.device_view(alibi, fw, stream)
    if view.strides[-1] == 1 and view.ptr % 4 == 0:
        return view
    return arrays.contiguous_copy(alibi, fw, view.device, stream)


_CC: dict = {}


def _cc(device: int) -> tuple:
    """Compute capability (major, minor) of a device, queried (and checked supported) once per process."""
    cc = _CC.get(device)
    if cc is None:
        try:
            import cupy
        except ImportError as e:
            from .jit import INSTALL_HINT
            raise ModuleNotFoundError(f"the arrays are on a CUDA GPU, and cuflash's GPU path needs CuPy, which "
                                      f"failed to import ({e}); install the GPU extra: {INSTALL_HINT}",
                                      name="cupy") from e
        from .dispatch import compile_arch
        cc = divmod(int(cupy.cuda.Device(device).compute_capability), 10)
        compile_arch(*cc)  # raises for GPUs older than sm_80, before anything is allocated or launched
        _CC[device] = cc
    return cc


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False, dropout_p=0.0, dropout_seed=None, dropout_offset=0,
              attn_mask=None, block_mask=None):
    """Exact scaled dot-product attention, computed by FlashAttention kernels.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads_q, head_dim)
        Queries. CuPy, PyTorch (CUDA), JAX or any DLPack array on a GPU of compute capability >= 8.0, in
        float16 or bfloat16; or a NumPy array (float16/32/64), computed on the CPU. Any strides: a view
        with a unit last stride and 16-byte aligned rows (a transposed ``(batch, heads, seqlen, head_dim)``
        view, say) is read in place; any other view is copied once into a contiguous buffer first. The
        arrays may live on any GPU (not only the current one); the work runs there.
        ``batch`` and ``seqlen_q`` may be 0 (empty outputs, nothing launched).
    k, v : array, shape (batch, seqlen_k, heads_k, head_dim)
        Keys and values, same type, dtype and device as ``q``. ``heads_q % heads_k == 0`` (GQA/MQA:
        query head ``h`` uses key/value head ``h // (heads_q // heads_k)``). ``head_dim`` is any value in
        [1, 256]: multiples of 8 are read in place, other head dims through zero-padded copies (to the next
        multiple of 8) with the output cropped back. ``seqlen_k`` may be 0: every row then sees no key.
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
    dropout_p : float in [0, 1)
        Attention dropout: each probability is kept with probability ``1 - p`` (to within 2**-17) and
        scaled by ``1 / (1 - p)``; the LSE is the softmax's, before dropout. The mask is a pure function of
        ``dropout_seed``, ``dropout_offset`` and (batch, head, query, key) (:func:`cuflash.dropout_mask`
        returns it; cuflash/dropout.py gives the Philox4x32-10 counter layout). GPU arrays: the forward
        and backward kernels' dropout builds (Hopper's wgmma kernels on compute capability 9.0, head dims up
        to 128 in the backward; the sm80 kernels elsewhere).
    dropout_seed, dropout_offset : int in [0, 2**64)
        The generator's key and counter offset; ``dropout_seed`` is required when ``dropout_p > 0``. Pass
        the same values to :func:`attention_backward`. ``dropout_seed`` may instead be an array of two
        int64 or uint64 (seed, offset) (bits as uint64) on the inputs' device, with ``dropout_offset`` 0: GPU
        kernels read it when they run, so a CUDA graph that refills it before each replay draws new masks
        (how ``cuflash.torch`` draws from torch's generator); the CPU path reads it on the host.
    attn_mask : array, optional
        Broadcastable to (batch, heads_q, seqlen_q, seqlen_k), as SDPA's: bool (True = attend; combined with
        ``causal`` / ``window_size``) or float (added to the scores after scaling, softcap and ALiBi;
        ``-inf`` masks). Rows that see no key give zeros and LSE +inf. Not differentiated. On GPU arrays:
        bool or q's dtype, read in place through its strides (stride 0 where it broadcasts); not with
        ``alibi_slopes`` or dropout there.
    block_mask : cuflash.BlockMask or torch FlexAttention BlockMask, optional
        Block sparsity: key blocks the mask skips are never computed; partial blocks take its element
        mask. Combines with every option above on the CPU path; on GPU arrays the Hopper kernels'
        block-sparse builds run it (causal / window folded into the mask's tables; not with attn_mask,
        ALiBi or dropout), their tables built on the host and uploaded once per mask, device and tiling.

    Returns
    -------
    out : array, shape (batch, seqlen_q, heads_q, head_dim)
        Same array type, dtype and device as ``q``, produced on the caller's current stream (PyTorch's
        current stream for tensors, CuPy's for everything else). A query row that sees no key is 0.
    lse : array, shape (batch, heads_q, seqlen_q), float32 (float64 for float64 NumPy inputs)
        Only with ``return_lse=True``. Natural log. ``+inf`` for a row that sees no key (FlashAttention's
        convention: ``exp(score - lse)`` is then 0 in a backward pass).

    Raises
    ------
    TypeError
        An argument of the wrong type or dtype, or arrays of different types.
    ValueError
        Shapes, devices or values out of range (the message names the argument).
    NotImplementedError
        ``block_mask`` on GPU arrays other than the Hopper kernels' (another GPU, views TMA cannot address, block
        sizes the tiles do not divide; the backward at head dims over 128) or with attn_mask, ALiBi, dropout or
        deterministic mode; ``attn_mask`` with ``alibi_slopes`` or dropout on GPU arrays.

    Notes
    -----
    On CuPy, bfloat16 arrays are ``ml_dtypes.bfloat16`` arrays (CuPy >= 14); a CuPy without bfloat16 gets
    the raw 16-bit words as uint16 arrays instead.

    Examples
    --------
    >>> import cupy as cp, cuflash
    >>> q = cp.random.randn(2, 1024, 16, 128).astype(cp.float16)
    >>> out = cuflash.attention(q, q, q, causal=True)
    """
    key = None
    if alibi_slopes is None and attn_mask is None and block_mask is None:
        key = _bound_key((q, k, v), causal, softmax_scale, window_size, softcap, return_lse,
                         dropout_p)
        bound = executor.lookup_forward(key) if key is not None else None
        if bound is not None:
            res = bound.run(q, k, v)
            if res is not None:
                return res if return_lse else res[0]
    call = _Call(q, k, v)
    causal, scale, window, softcap, alibi = _check_options(call, causal, softmax_scale, window_size, softcap,
                                                           alibi_slopes)
    return_lse = _check_flag("return_lse", return_lse)
    dropout = _check_dropout_args(call, dropout_p, dropout_seed, dropout_offset)
    attn_mask = _check_attn_mask(call, attn_mask)
    _check_gpu_mask_options(call, "attn_mask", attn_mask, (("alibi_slopes", alibi), ("dropout", dropout)))
    block_mask = _check_block_mask(call, block_mask, attn_mask, alibi, dropout)
    if call.fw == "torch" and _needs_autograd(q, k, v, attn_mask):  # (a mask that needs grad: refused there)
        from . import torch as torch_adapter
        return torch_adapter.attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window,
                                       softcap=softcap, alibi_slopes=alibi, return_lse=return_lse,
                                       attn_mask=attn_mask, block_mask=block_mask, **_dropout_kwargs(dropout))
    return _forward(call, q, k, v, alibi, causal, scale, window, softcap, return_lse, dropout, attn_mask,
                    block_mask, bind_key=key)


def _bound_key(xs, causal, softmax_scale, window_size, softcap, flag, dropout_p):
    """The bound-call signature (executor.py) of a call without ALiBi, mask or dropout on torch or CuPy
    arrays, or None: a torch call that autograd must see (the adapter takes it) or one being traced by
    torch.compile (no addresses there) never takes the fast path."""
    if dropout_p.__class__ not in (float, int) or dropout_p != 0:
        return None
    fw = arrays.framework_of(xs[0])
    if fw not in ("torch", "cupy"):
        return None
    try:
        if fw == "torch":
            torch = arrays._torch_tables()["torch"]
            if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(x.requires_grad for x in xs)):
                return None
        return executor.key(fw, xs, causal, softmax_scale, window_size, softcap, flag)
    except (AttributeError, TypeError, RuntimeError, ImportError):
        # Not arrays of one kind, an unhashable option, a tensor without storage, a stand-in for a tensor
        # without torch: the general path says which.
        return None


def _needs_autograd(*tensors) -> bool:
    """Whether a torch call must go through autograd; arrays of another kind among them (which the checks
    refuse) do not count."""
    import torch
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def _dropout_kwargs(dropout):
    if dropout is None:
        return {}
    if dropout.state is not None:
        return dict(dropout_p=dropout.p, dropout_seed=dropout.state)
    return dict(dropout_p=dropout.p, dropout_seed=dropout.seed, dropout_offset=dropout.offset)



def _cpu_extras(dropout, attn_mask, block_mask):
    """The CPU path's keyword arguments for dropout, attn_mask and block_mask (checked before)."""
    extra = _dropout_kwargs(dropout)
    if attn_mask is not None:
        extra["attn_mask"] = np.asarray(_to_numpy(attn_mask, arrays.framework_of(attn_mask)))
    if block_mask is not None:
        extra["block_mask"] = block_mask
    return extra


def _forward(call, q, k, v, alibi, causal, scale, window, softcap, return_lse, dropout=None, attn_mask=None,
             block_mask=None, bind_key=None):
    """The forward on validated arguments (the PyTorch custom op enters here); ``dropout`` is None or a
    :class:`_Dropout`, ``attn_mask`` None or a checked mask (both CPU path only: checked before). A plain
    GPU call (every input read in place, no ALiBi) leaves its plan bound under ``bind_key`` (executor.py)."""
    kwargs = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap)

    if not call.on_gpu:
        if call.fw == "torch" and call.dtype == "bfloat16":
            raise TypeError("q is a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
        slopes = None if alibi is None else np.asarray(_to_numpy(alibi, arrays.framework_of(alibi)))
        out, lse = reference.attention_numpy(_to_numpy(q, call.fw), _to_numpy(k, call.fw), _to_numpy(v, call.fw),
                                             alibi_slopes=slopes, **kwargs,
                                             **_cpu_extras(dropout, attn_mask, block_mask))
        out, lse = _from_numpy(out, call.fw), _from_numpy(lse, call.fw)
        return (out, lse) if return_lse else out

    from . import ops
    device = call.device
    stream = arrays.current_stream(call.fw, device)
    cc = _cc(device)
    b, sq, hq = call.batch, call.seqlen_q, call.heads_q
    with arrays.device_scope(call.fw, device):
        out_native, out_view, out_work = _device_output(call, (b, sq, hq, call.head_dim), stream)
        lse_native, lse_view = arrays.empty(call.fw, (b, hq, sq), "float32", device, stream)
        if call.empty:
            # No key: every row is 0 with LSE +inf; no query: nothing at all. No kernel either way.
            ops.fill_zero(out_view, stream=stream)
            ops.fill_float32(lse_view, math.inf, stream=stream)
        else:
            qv, kv, vv = (_device_input(call, x, stream, cc) for x in (q, k, v))
            work = out_work
            # (packed heads would change the rows dropout's draws and a mask's rows are keyed by)
            groups = (1 if dropout or attn_mask is not None or block_mask is not None
                      else decode_groups(call.seqlen_q, call.heads_q, call.heads_k, alibi, window))
            if groups > 1:
                qv, work = (pack_query_heads(x, groups) for x in (qv, out_work))
                kwargs.update(causal=False, window_size=(-1, -1))
            fp = ops.forward(qv, kv, vv, work, lse_view, _device_alibi(alibi, call.fw, stream), stream=stream,
                             cc=cc, framework=call.fw, dropout=dropout,
                             mask=_device_mask(call, attn_mask, stream),
                             block_mask=block_mask, **kwargs)
            _finish_output(out_view, out_work, stream, cc)
            if bind_key is not None and alibi is None and _in_place(call, qv, kv, vv):
                executor.bind_forward(bind_key, fp, call.fw, {"q": qv, "k": kv, "v": vv, "o": work},
                                      out_view.shape)
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
                       softcap=0.0, alibi_slopes=None, deterministic=False, dropout_p=0.0, dropout_seed=None,
                       dropout_offset=0, attn_mask=None, block_mask=None):
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
        Bitwise-reproducible gradients. On the Hopper backward the CTAs add into dq in a fixed order
        (0.85-0.99x the default speed on an H200, bench/NOTES.md); on the sm80 kernels a separate pass
        computes dq instead of atomic accumulation. The forward is always deterministic.
    dropout_p, dropout_seed, dropout_offset
        As passed to the forward: the backward replays the forward's mask from them.
    attn_mask, block_mask : optional
        As passed to the forward (no gradient is computed for a mask). P is recomputed from the float32 LSE
        (Notes), so a row whose every visible key carries a huge additive term (bfloat16's lowest value on
        a whole row: its LSE is that value, which float32 holds to about 1e31) gets P = 1 per key instead
        of the uniform 1 / seqlen_k on the GPU; its gradients are right only where that row's ``dout`` is zero (masked padding rows, whose loss is masked).

    Returns
    -------
    dq, dk, dv : arrays with the shapes and dtype of q, k, v (GQA: dk/dv summed over the query heads that
    share a key/value head), in the caller's array type, on the caller's current stream. Empty inputs
    give empty or zero gradients without a launch.

    Raises
    ------
    TypeError, ValueError
        As :func:`attention`, and for ``dout``/``out``/``lse`` whose shape, dtype or device do not match.
    NotImplementedError
        ``block_mask`` on GPU arrays other than the Hopper kernels' (another GPU, views TMA cannot address, block
        sizes the tiles do not divide; the backward at head dims over 128) or with attn_mask, ALiBi, dropout or
        deterministic mode; ``attn_mask`` with ``alibi_slopes`` or dropout on GPU arrays.

    Notes
    -----
    P is recomputed as ``exp(score * scale - lse)`` from the float32 ``lse``. Its accuracy is the LSE's:
    exact while |lse| is small enough for float32 to hold it to well below 1e-3 (|lse| < ~1e4), degrading
    in proportion to ``ulp(lse)`` beyond that (scores of 1e9 and more), as in FlashAttention-2, which saves
    the same float32 LSE.

    Examples
    --------
    >>> out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    """
    key = None
    if alibi_slopes is None and attn_mask is None and block_mask is None:
        key = _bound_key((dout, q, k, v, out, lse), causal, softmax_scale, window_size,
                         softcap, deterministic, dropout_p)
        bound = executor.lookup_backward(key) if key is not None else None
        if bound is not None:
            res = bound.run(dout, q, k, v, out, lse)
            if res is not None:
                return res
    call = _Call(q, k, v)
    causal, scale, window, softcap, alibi = _check_options(call, causal, softmax_scale, window_size, softcap,
                                                           alibi_slopes)
    deterministic = _check_flag("deterministic", deterministic)
    dropout = _check_dropout_args(call, dropout_p, dropout_seed, dropout_offset)
    attn_mask = _check_attn_mask(call, attn_mask)
    _check_gpu_mask_options(call, "attn_mask", attn_mask, (("alibi_slopes", alibi), ("dropout", dropout)))
    block_mask = _check_block_mask(call, block_mask, attn_mask, alibi, dropout, deterministic, backward=True)
    _check_backward_arrays(call, dout, out, lse)
    return _backward(call, dout, q, k, v, out, lse, alibi, causal, scale, window, softcap, deterministic, dropout,
                     attn_mask, block_mask, bind_key=key)


def _check_backward_arrays(call, dout, out, lse):
    qshape = (call.batch, call.seqlen_q, call.heads_q, call.head_dim)
    _check_like(call, "dout", dout, qshape, (call.dtype,))
    _check_like(call, "out", out, qshape, (call.dtype,))
    _check_like(call, "lse", lse, (call.batch, call.heads_q, call.seqlen_q),
                ("float32", "float64") if call.dtype == "float64" else ("float32",))


def _backward(call, dout, q, k, v, out, lse, alibi, causal, scale, window, softcap, deterministic, dropout=None,
              attn_mask=None, block_mask=None, bind_key=None):
    """The backward on validated arguments (``dropout``, ``attn_mask`` and ``bind_key`` as for
    :func:`_forward`)."""
    kwargs = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap)

    if not call.on_gpu:
        if call.fw == "torch" and call.dtype == "bfloat16":
            raise TypeError("q is a bfloat16 CPU tensor; the CPU path computes float16/32/64 (NumPy has no bfloat16)")
        slopes = None if alibi is None else np.asarray(_to_numpy(alibi, arrays.framework_of(alibi)))
        grads = reference.attention_backward_numpy(
            *(_to_numpy(x, call.fw) for x in (dout, q, k, v, out, lse)), alibi_slopes=slopes, **kwargs,
            **_cpu_extras(dropout, attn_mask, block_mask))
        return tuple(_from_numpy(g, call.fw) for g in grads)

    from . import ops
    device = call.device
    stream = arrays.current_stream(call.fw, device)
    cc = _cc(device)
    with arrays.device_scope(call.fw, device):
        grads = [_device_output(call, (*x.shape[:3], call.head_dim), stream) for x in (q, k, v)]
        if call.empty:
            for _, view, _ in grads:  # no query or no key: nothing flows, every gradient is 0
                ops.fill_zero(view, stream=stream)
        else:
            views = {n: _device_input(call, x, stream, cc) for n, x in
                     (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out))}
            lse_view = arrays.device_view(lse, call.fw, stream)
            lse_in_place = lse_view.strides == (call.heads_q * call.seqlen_q, call.seqlen_q, 1)
            if not lse_in_place:
                lse_view = arrays.contiguous_copy(lse, call.fw, device, stream)
            bp = ops.backward(views["dout"], views["q"], views["k"], views["v"], views["out"], lse_view,
                              _device_alibi(alibi, call.fw, stream), *(work for _, _, work in grads),
                              deterministic=deterministic, stream=stream, cc=cc, framework=call.fw,
                              dropout=dropout, mask=_device_mask(call, attn_mask, stream),
                              block_mask=block_mask, **kwargs)
            for _, view, work in grads:
                _finish_output(view, work, stream, cc)
            if bind_key is not None and alibi is None and lse_in_place and _in_place(call, *views.values()):
                executor.bind_backward(bind_key, bp, call.fw, {**views, "o": views["out"]},
                                       tuple(view for _, view, _ in grads))
        return tuple(arrays.to_caller(native, view, call.fw, stream) for native, view, _ in grads)
