"""Launch plans: everything a forward or backward call launches that depends only on the problem, decided
once and cached; ops.py executes a plan by binding pointers and the stream.

A problem is what the kernels see apart from addresses: the device and its compute capability, dtype,
shapes, strides, whether each view starts on a 16-byte boundary (TMA needs it), the flags (causal,
window, scale, softcap, ALiBi, deterministic) and the environment variables that steer dispatch. For it a plan holds each kernel launch (the loaded function,
grid, block, shared memory), the parameter block packed once with its pointer fields left zero, which
tensor maps the launch takes, and the workspaces to allocate. Per call only the pointers, the maps and the
workspaces are new.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from . import dispatch, dropout, jit, params_layout, tma
from .arrays import DeviceArray

_LOG2E = 1.4426950408889634
_CACHE_LIMIT = 1024
_plans: dict = {}


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch of a plan."""

    fn: object       # the loaded function (jit.get_function)
    grid: int
    threads: int
    smem: int
    block: bytes     # the packed AttentionParams, pointer fields zero
    maps: tuple = ()  # tensor maps before the block: (view name, box rows) or ("dq_accum", (box rows, box cols))
    splits: int = 1  # gridDim.y: the split-KV forward's splits of the key tiles


@dataclass(frozen=True)
class ForwardPlan:
    launch: KernelLaunch
    tile_counter: bool  # persistent Hopper launch: an int32 counter, zero on the stream, per call
    # split-KV: the fp32 partial outputs' and LSEs' shapes, (splits, batch * max_seqlen_q, heads_q, padded
    # head dim) and (splits, heads_q, batch * max_seqlen_q); None otherwise
    accum_shapes: tuple | None = None
    # block sparsity: (tile_m, tile_n, window_left, window_right), what block_mask.py's kernel tables need
    block_tables: tuple | None = None


@dataclass(frozen=True)
class BackwardPlan:
    launches: tuple      # preprocess, main, then postprocess or the deterministic dQ kernel
    delta_in_dq: bool    # delta borrows dq's first bytes (else a float32 (batch, heads_q, seqlen_q) workspace)
    dq_accum_shape: tuple | None  # the fp32 dQ accumulator's shape; None with the sm80 deterministic dQ kernel
    dq_semaphore_shape: tuple | None  # int32 turn counters of the deterministic Hopper kernel, else None
    block_tables: tuple | None = None  # as ForwardPlan's


class _Block:
    """The parameter block being planned, by field name (params_layout), packed once."""

    __slots__ = ("values",)

    def __init__(self):
        self.values = [0] * len(params_layout.NAMES)
        for name in params_layout.FLOAT_FIELDS:
            self.values[params_layout.INDEX[name]] = 0.0

    def __setitem__(self, name, value):
        self.values[params_layout.INDEX[name]] = value

    def __getitem__(self, name):
        return self.values[params_layout.INDEX[name]]

    def set_strides(self, name: str, a: DeviceArray) -> None:
        # (batch, seqlen, heads, head_dim) views: row = sequence position.
        i = params_layout.INDEX[f"{name}_batch_stride"]
        self.values[i:i + 3] = a.strides[:3]

    def pack(self) -> bytes:
        return params_layout.STRUCT.pack(*self.values)


def is_local(causal: bool, window_size) -> bool:
    return causal or window_size[0] >= 0 or window_size[1] >= 0


def _common(q: DeviceArray, k: DeviceArray, v: DeviceArray, alibi, causal: bool, window_size, softmax_scale: float,
            softcap: float, dropout_p: float = 0.0, mask=None) -> _Block:
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    p = _Block()
    p.set_strides("q", q)
    p.set_strides("k", k)
    p.set_strides("v", v)
    if alibi is not None:
        p["alibi_batch_stride"] = alibi.strides[0] if len(alibi.shape) == 2 else 0
    p["batch"], p["heads_q"], p["heads_k"] = batch, heads_q, heads_k
    p["seqlen_q"], p["seqlen_k"], p["head_dim"] = seqlen_q, seqlen_k, head_dim
    p["total_q"], p["total_k"] = seqlen_q, seqlen_k
    unbounded = seqlen_q + seqlen_k
    left, right = window_size
    if causal:
        right = 0
    p["window_left"] = unbounded if left < 0 else min(left, unbounded)
    p["window_right"] = unbounded if right < 0 else min(right, unbounded)
    p["softmax_scale"] = softmax_scale
    p["softcap"] = softcap
    # With softcap, ALiBi or an additive mask the kernel turns raw products into final scores before the
    # softmax (score_mods.cuh), so the exponent multiplier is log2(e) alone; otherwise the scale folds into it.
    scaled = softcap > 0 or alibi is not None or mask_kind(mask) == dispatch.ATTN_MASK_KINDS["additive"]
    p["scale_log2"] = _LOG2E if scaled else softmax_scale * _LOG2E
    if mask is not None:  # (its address is a call's: ops.py writes it per launch)
        for name, stride in zip(("batch", "head", "row", "col"), mask.strides):
            p[f"mask_{name}_stride"] = stride
    if dropout_p > 0:  # (the seed and offset are a call's: ops.py writes them per launch)
        p["dropout_threshold"] = dropout.keep_threshold(dropout_p)
        p["dropout_scale"] = 1.0 / (1.0 - dropout_p)
    return p


def _layout(*views) -> tuple:
    """What a plan depends on in the views: shapes, strides, dtypes and 16-byte alignment, not addresses."""
    return tuple((a.shape, a.strides, a.dtype, a.ptr % 16 == 0) for a in views)


def _alibi_layout(alibi) -> tuple | None:
    return None if alibi is None else (alibi.shape, alibi.strides)


def mask_kind(mask) -> int:
    """The kernels' CF_ATTN_MASK for an attn_mask view: 0 without one, else dispatch.ATTN_MASK_KINDS'."""
    if mask is None:
        return 0
    return dispatch.ATTN_MASK_KINDS["bool" if mask.dtype == "bool" else "additive"]


def _mask_layout(mask) -> tuple | None:
    return None if mask is None else (mask.dtype, mask.strides, mask.ptr % 16 == 0)


_ENV_NAMES = (dispatch.FWD_KERNEL_ENV, dispatch.BWD_KERNEL_ENV, "CUFLASH_FWD_TILES")
# os.environ keeps its entries in a plain dict under encoded keys (CPython's and PyPy's os._Environ, which
# every os.environ write goes through): reading that dict costs 0.1 against 2.2 us for the three
# os.environ.get calls (this VM), which a bound call pays on every call. Anything else takes the public way.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = None
if isinstance(_ENV_DATA, dict) and callable(getattr(os.environ, "encodekey", None)):
    _ENV_KEYS = tuple(os.environ.encodekey(name) for name in _ENV_NAMES)


def env() -> tuple:
    """The environment variables that steer dispatch (kernel family, forward tiles), as their raw values
    (None where unset): part of every plan's key, so that changing one between calls takes effect."""
    if _ENV_KEYS is not None and os.environ._data is _ENV_DATA:
        get = _ENV_DATA.get
        return get(_ENV_KEYS[0]), get(_ENV_KEYS[1]), get(_ENV_KEYS[2])
    get = os.environ.get
    return tuple(get(name) for name in _ENV_NAMES)


def _remember(key, plan):
    if len(_plans) >= _CACHE_LIMIT:
        _plans.clear()
    _plans[key] = plan
    return plan


def _block_sparse_fields(p: _Block, block_size: tuple, kkey) -> tuple:
    """A block-sparse plan's fields: the partial-block masks' geometry (block_sparse.cuh), and the plan's
    block_tables. NotImplementedError unless the kernel's tiles nest inside the mask's blocks."""
    bq, bk = block_size
    dispatch.check_block_sparse_tiles(block_size, (kkey.block_m, kkey.block_n))
    p["mask_row_stride"], p["mask_col_stride"], p["block_q"] = bk, 1, bq
    return kkey.block_m, kkey.block_n, p["window_left"], p["window_right"]


def _no_block_sparse_kernel(what: str):
    return NotImplementedError(f"block_mask on GPU arrays runs on the Hopper kernels (compute capability 9.0, views "
                               f"TMA can address{what}); this call has none")


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, alibi, *, causal: bool, window_size,
            softmax_scale: float, softcap: float, cc: tuple, sm_count: int, dropout_p: float = 0.0,
            mask=None, block_size=None) -> ForwardPlan:
    """The forward's plan for these views (cached on their layout and the flags). ``dropout_p`` > 0: the
    kernel's dropout build with p's keep threshold and scale in the block; each call writes its seed and
    offset (ops.forward). ``mask``: an attn_mask view (batch, heads_q, seqlen_q, seqlen_k), strides 0 where
    broadcast: the kernels' element-mask builds (attn_mask.cuh); each call writes its address. ``block_size``:
    a block mask's (query, key) block size: the Hopper kernel's block-sparse build (causal / window folded
    into the mask's tables, so its non-local build); each call writes the tables' addresses and strides."""
    key = ("fwd", q.device, cc, _layout(q, k, v, out), _alibi_layout(alibi), causal, window_size, softmax_scale,
           softcap, dropout_p, _mask_layout(mask), block_size, env())
    hit = _plans.get(key)
    if hit is not None:
        return hit
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    local = is_local(causal, window_size)
    # The Hopper kernel reads and writes through TMA; a view TMA cannot describe (a broadcast head, say)
    # runs on the sm80 kernel instead, which handles any 16-byte-aligned layout.
    hopper = dispatch.forward_family(cc) == "fwd_sm90" and tma.supports(q, k, v, out)
    if block_size is not None:
        if not hopper:
            raise _no_block_sparse_kernel("")
        kkey = dispatch.forward_key_sm90(dtype, q.shape[3], is_local=False, softcap=softcap > 0, alibi=False,
                                         attn_mask=dispatch.ATTN_MASK_KINDS["bool"], mask_stage=True,
                                         block_sparse=True)
        smem = dispatch.forward_sm90_smem_bytes(kkey)
    elif hopper:
        kkey = dispatch.forward_key_sm90(dtype, q.shape[3], is_local=local, softcap=softcap > 0,
                                         alibi=alibi is not None, dropout=dropout_p > 0, attn_mask=mask_kind(mask),
                                         mask_stage=mask is not None and dispatch.mask_stageable(mask))
        smem = dispatch.forward_sm90_smem_bytes(kkey)
    else:
        kkey = dispatch.forward_key(dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None,
                                    smem_limit=dispatch.max_smem(*cc), dropout=dropout_p > 0,
                                    attn_mask=mask_kind(mask))
        smem = dispatch.forward_smem_bytes(kkey)
    fn = jit.get_function(kkey, dispatch.compile_arch(*cc), q.device, smem)
    p = _common(q, k, v, alibi, causal, window_size, softmax_scale, softcap, dropout_p, mask)
    tables = None if block_size is None else _block_sparse_fields(p, block_size, kkey)
    p.set_strides("o", out)
    batch, seqlen_q, heads_q = q.shape[:3]
    p["num_m_blocks"] = m_blocks = -(-seqlen_q // kkey.block_m)
    maps = ()
    if hopper:
        p["bh_group"] = dispatch.launch_group(batch * heads_q, k.shape[1], kkey.head_dim)
        maps = (("q", kkey.block_m), ("k", kkey.block_n), ("v", kkey.block_n),
                ("o", 64))  # each consumer warpgroup stores its own 64 rows
    tiles = m_blocks * batch * heads_q
    grid, use_counter = (dispatch.forward_sm90_schedule(kkey, tiles, k.shape[1], sm_count) if hopper
                         else (tiles, False))
    return _remember(key, ForwardPlan(KernelLaunch(fn, grid, kkey.threads, smem, p.pack(), maps), use_counter,
                                      block_tables=tables))


def forward_varlen(q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, alibi, *, batch: int,
                   max_seqlen_q: int, max_seqlen_k: int, causal: bool, window_size, softmax_scale: float,
                   softcap: float, cc: tuple, sm_count: int, num_splits: int = 1, paged=None) -> ForwardPlan:
    """The variable-length forward's plan: q / out (1, total_q, heads_q, d) and k / v (1, total_k, heads_k, d)
    views of the packed arrays, ``batch`` sequences whose rows the kernel reads from cu_seqlens (bound per
    call). The Hopper kernel's variable-length build where the dense forward would run it (tensor maps over
    the packed arrays, fwd_sm90.cu), else the sm80 kernel's (seq_rows.cuh); either clips each tile at its
    sequence's end. Work tiles cover max_seqlen_q rows of every sequence; persistent Hopper CTAs take them from
    the tile counter (dispatch.forward_sm90_varlen_schedule). The LSE is (heads_q, total_q).

    ``num_splits`` > 1: a split-KV build (decoding), ``num_splits`` work tiles per query block writing fp32
    partial states of the shapes ``accum_shapes`` for merge_states.cu to combine: the Hopper kernel's where
    it would run unsplit and has the build (dispatch.FWD_SM90_SPLIT_KV_HEAD_DIMS, no mask or ALiBi; the
    splits are work tiles of its persistent CTAs), else the sm80 kernel's (the splits on gridDim.y).

    ``paged`` = (page_size, num_pages, block_table batch stride): a paged build (on Hopper the Hopper
    kernel's: a TMA box per page for power-of-two pages of 32 rows or more, row gathers otherwise; elsewhere
    the sm80 kernel's); k and v are then views of the caches' rows, pages back to back (num_pages *
    page_size rows), and ``max_seqlen_k`` bounds a sequence's keys (its block-table row's capacity)."""
    key = ("fwd_varlen", q.device, cc, _layout(q, k, v, out), _alibi_layout(alibi), batch, max_seqlen_q,
           max_seqlen_k, causal, window_size, softmax_scale, softcap, num_splits, paged, env())
    hit = _plans.get(key)
    if hit is not None:
        return hit
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    local = is_local(causal, window_size)
    split = num_splits > 1
    # The Hopper kernel reads pages by TMA boxes of whole pages (dispatch.sm90_page_box_rows: power-of-two
    # sizes from 32 rows), other sizes by row gathers; its split-KV build covers the head dims where O has
    # its own buffer, without masks or ALiBi (decoding's calls).
    gather = paged is not None and dispatch.sm90_page_box_rows(paged[0]) is None
    hopper = (dispatch.forward_family(cc) == "fwd_sm90" and tma.supports(q, k, v, out)
              and (not split or (dispatch.padded_head_dim(q.shape[3]) in dispatch.FWD_SM90_SPLIT_KV_HEAD_DIMS
                                 and not local and alibi is None)))
    if hopper:
        kkey = dispatch.forward_key_sm90(dtype, q.shape[3], is_local=local, softcap=softcap > 0,
                                         alibi=alibi is not None, varlen=True, split_kv=split,
                                         paged=paged is not None, page_gather=gather)
        smem = dispatch.forward_sm90_smem_bytes(kkey)
    else:
        kkey = dispatch.forward_key(dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None,
                                    smem_limit=dispatch.max_smem(*cc), varlen=True, split_kv=split,
                                    paged=paged is not None)
        smem = dispatch.forward_smem_bytes(kkey)
    fn = jit.get_function(kkey, dispatch.compile_arch(*cc), q.device, smem)
    p = _common(q, k, v, alibi, causal, window_size, softmax_scale, softcap)
    p.set_strides("o", out)
    total_q, heads_q = q.shape[1], q.shape[2]
    p["batch"], p["seqlen_q"], p["seqlen_k"] = batch, max_seqlen_q, max_seqlen_k
    p["total_q"], p["total_k"] = total_q, k.shape[1]
    for name in ("q", "k", "v", "o"):
        p[f"{name}_batch_stride"] = 0  # a sequence's rows come from cu_seqlens, not from a batch stride
    p["page_shift"] = -1
    if paged is not None:
        p["page_size"], p["num_pages"], p["block_table_batch_stride"] = paged
        p["page_shift"] = dispatch.page_shift(paged[0])
        # cu_seqlens_k places sequence b's keys at b * max_seqlen_k of a virtual packing (its length bound),
        # which may exceed the caches' rows (a table may list a page twice): "unbounded" windows must cover it.
        p["total_k"] = batch * max_seqlen_k
        unbounded = total_q + batch * max_seqlen_k
        left, right = window_size
        if causal:
            right = 0
        p["window_left"] = unbounded if left < 0 else min(left, unbounded)
        p["window_right"] = unbounded if right < 0 else min(right, unbounded)
    p["varlen_lse_head_stride"] = total_q
    p["num_m_blocks"] = m_blocks = -(-max_seqlen_q // kkey.block_m)
    tiles = m_blocks * batch * heads_q * (num_splits if hopper else 1)  # Hopper: (query tile, split) work tiles
    if tiles >= 1 << 31:  # the kernels count work tiles in 32-bit ints
        raise ValueError(f"{tiles} work tiles (query blocks x batch x heads x splits) exceed 2**31 - 1")
    maps, grid, use_counter = (), tiles, False
    p["num_splits"] = num_splits
    if hopper:
        p["bh_group"] = dispatch.launch_group(batch * heads_q, max_seqlen_k, kkey.head_dim)
        kv_box = kkey.block_n  # (row gathers load K / V without the maps)
        if paged is not None and not gather:
            kv_box = min(dispatch.sm90_page_box_rows(paged[0]), kkey.block_n)
        maps = (("q", kkey.block_m), ("k", kv_box), ("v", kv_box), ("o", 64))
        grid, use_counter = dispatch.forward_sm90_varlen_schedule(kkey, tiles, sm_count)
    accum_shapes = None
    if split:
        rows = batch * max_seqlen_q  # query i of sequence b at row b * max_seqlen_q + i (fwd_sm80.cu)
        accum_shapes = ((num_splits, rows, heads_q, kkey.head_dim), (num_splits, heads_q, rows))
        p["o_accum_split_stride"] = rows * heads_q * kkey.head_dim
        p["lse_accum_split_stride"] = heads_q * rows
    launch = KernelLaunch(fn, grid, kkey.threads, smem, p.pack(), maps, num_splits if split and not hopper else 1)
    return _remember(key, ForwardPlan(launch, use_counter, accum_shapes))


def backward_varlen(dout: DeviceArray, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, alibi,
                    dq: DeviceArray, dk: DeviceArray, dv: DeviceArray, *, batch: int, max_seqlen_q: int,
                    max_seqlen_k: int, causal: bool, window_size, softmax_scale: float, softcap: float,
                    deterministic: bool, cc: tuple) -> BackwardPlan:
    """The variable-length backward's plan on (1, total, heads, d) views, ``batch`` sequences whose rows the
    kernels read from cu_seqlens (bound per call): preprocess -> KV-parallel main kernel -> postprocess, dQ
    accumulated in a (1, total_q, heads_q, padded head dim) fp32 buffer. The main kernel is the Hopper one's
    variable-length build where the dense backward would run the Hopper kernel (tensor maps over the packed
    arrays, TMA reductions of dQ), else the sm80 one's (atomic dQ). Deterministic: the sm80 main kernel and
    the Q-parallel dQ kernel instead of the accumulation and the postprocess. Grids cover max_seqlen rows of
    every sequence. delta gets a (heads_q, total_q) workspace like the LSE (it cannot borrow dq, whose
    uncovered rows must stay zero)."""
    key = ("bwd_varlen", q.device, cc, _layout(dout, q, k, v, out, dq, dk, dv), _alibi_layout(alibi), batch,
           max_seqlen_q, max_seqlen_k, causal, window_size, softmax_scale, softcap, deterministic, env())
    hit = _plans.get(key)
    if hit is not None:
        return hit
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    arch = dispatch.compile_arch(*cc)
    local = is_local(causal, window_size)
    pre, post, main, dq_key = dispatch.backward_varlen_keys(
        dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None,
        deterministic=deterministic, smem_limit=dispatch.max_smem(*cc))
    hopper = (not deterministic and dispatch.backward_family(cc, q.shape[3], False) == "bwd_sm90"
              and tma.supports(q, k, v, dout))
    main, smem, maps = _backward_main(main, hopper, dtype, q.shape[3], is_local=local, softcap=softcap > 0,
                                      alibi=alibi is not None, varlen=True)
    total_q, heads_q, heads_k = q.shape[1], q.shape[2], k.shape[2]
    p = _common(q, k, v, alibi, causal, window_size, softmax_scale, softcap)
    for name, a in (("o", out), ("do", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        p.set_strides(name, a)
    p["batch"], p["seqlen_q"], p["seqlen_k"] = batch, max_seqlen_q, max_seqlen_k
    p["total_q"], p["total_k"] = total_q, k.shape[1]
    for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        p[f"{name}_batch_stride"] = 0  # a sequence's rows come from cu_seqlens, not from a batch stride
    p["varlen_lse_head_stride"] = total_q
    launches = _backward_launches(p, arch, q.device, pre, post, main, smem, maps,
                                  dq_key if deterministic else None, batch=batch, seqlen_q=max_seqlen_q,
                                  seqlen_k=max_seqlen_k, heads_q=heads_q, heads_k=heads_k)
    acc_shape = None if deterministic else (1, total_q, heads_q, main.head_dim)
    return _remember(key, BackwardPlan(launches, False, acc_shape, None))


def backward(dout: DeviceArray, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, alibi,
             dq: DeviceArray, dk: DeviceArray, dv: DeviceArray, *, causal: bool, window_size, softmax_scale: float,
             softcap: float, deterministic: bool, cc: tuple, dropout_p: float = 0.0, mask=None,
             block_size=None) -> BackwardPlan:
    """The backward's plan: preprocess (delta, zero dQ accumulator) -> KV-parallel main kernel (dK, dV, dQ
    summed into the fp32 accumulator: atomics on sm80, TMA reductions on the Hopper kernel) -> postprocess
    (dQ). Deterministic mode: the Hopper kernel adds in a fixed order (turn counters the preprocess zeroes);
    on sm80 a Q-parallel dQ kernel replaces the accumulation and the postprocess. ``dropout_p`` > 0: the
    kernels' dropout builds (the Hopper kernel's where it runs), p's threshold and scale in the block (seed and
    offset per call);
    ``mask`` (as :func:`forward`): the kernels' element-mask builds; ``block_size`` (as :func:`forward`): the
    Hopper kernel's block-sparse build, head dims 64 and 128, not deterministic."""
    key = ("bwd", q.device, cc, _layout(dout, q, k, v, out, dq, dk, dv), _alibi_layout(alibi), causal, window_size,
           softmax_scale, softcap, deterministic, dropout_p, _mask_layout(mask), block_size, env())
    hit = _plans.get(key)
    if hit is not None:
        return hit
    dtype = "bf16" if q.dtype == "bfloat16" else "fp16"
    arch = dispatch.compile_arch(*cc)
    local = is_local(causal, window_size) and block_size is None
    pre, post, main, dq_key = dispatch.backward_keys(
        dtype, q.shape[3], is_local=local, softcap=softcap > 0, alibi=alibi is not None,
        deterministic=deterministic, smem_limit=dispatch.max_smem(*cc), dropout=dropout_p > 0,
        attn_mask=mask_kind(mask))
    batch, seqlen_q, heads_q = q.shape[:3]
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    dev = q.device
    # The Hopper main kernel reads Q, K, V and dO through TMA; views TMA cannot describe run on sm80.
    hopper = (dispatch.backward_family(cc, q.shape[3], deterministic,
                                       attn_mask=mask is not None or block_size is not None) == "bwd_sm90"
              and tma.supports(q, k, v, dout))
    if block_size is not None and (not hopper or deterministic):
        raise (NotImplementedError("block_mask with deterministic=True on GPU arrays (the deterministic kernels "
                                   "add dQ in turns over every key tile)") if deterministic
               else _no_block_sparse_kernel(", head dims up to 128 in the backward"))
    dq_kernel = deterministic and not hopper
    # delta (fp32, batch x heads x seqlen_q) is read only up to the main kernel, and with accumulated dQ the
    # only writer of dq is the postprocess, after it: so delta borrows dq's first bytes (dq holds head_dim / 2
    # >= 4 times as many), which keeps the peak memory of the backward at FlashAttention-2's.
    delta_in_dq = not dq_kernel and dq.strides == (seqlen_q * heads_q * q.shape[3], heads_q * q.shape[3],
                                                   q.shape[3], 1)
    semaphore_shape = None
    if hopper and deterministic:
        semaphore_shape = (batch, heads_q, math.ceil(seqlen_q / dispatch.BWD_SM90_DQ_TURN_ROWS))
    p = _common(q, k, v, alibi, causal, window_size, softmax_scale, softcap, dropout_p, mask)
    for name, a in (("o", out), ("do", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        p.set_strides(name, a)
    sparse = block_size is not None
    main, smem, maps = _backward_main(main, hopper, dtype, q.shape[3], is_local=local, softcap=softcap > 0,
                                      alibi=alibi is not None, deterministic=deterministic,
                                      attn_mask=dispatch.ATTN_MASK_KINDS["bool"] if sparse else mask_kind(mask),
                                      mask_stage=sparse or (mask is not None and dispatch.mask_stageable(mask)),
                                      block_sparse=sparse, dropout=dropout_p > 0)
    tables = _block_sparse_fields(p, block_size, main) if sparse else None
    launches = _backward_launches(p, arch, dev, pre, post, main, smem, maps, dq_key if dq_kernel else None,
                                  batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k)
    acc_shape = None if dq_kernel else (batch, seqlen_q, heads_q, main.head_dim)
    return _remember(key, BackwardPlan(launches, delta_in_dq, acc_shape, semaphore_shape, tables))


def _backward_main(sm80_main, hopper: bool, dtype: str, head_dim: int, **variant) -> tuple:
    """(main kernel, its shared memory, its tensor maps) of a backward plan: the Hopper kernel's variant
    (``variant``: dispatch.backward_key_sm90's flags), which reads Q, K, V and dO through TMA and adds dQ
    into dq_accum as boxes of BWD_SM90_DQ_BOX (one per consumer warpgroup's 64 rows), or the sm80 one."""
    if not hopper:
        return sm80_main, dispatch.backward_smem_bytes(sm80_main), ()
    main = dispatch.backward_key_sm90(dtype, head_dim, **variant)
    maps = (("q", main.block_m), ("k", main.block_n), ("v", main.block_n), ("dout", main.block_m),
            ("dq_accum", dispatch.BWD_SM90_DQ_BOX))
    return main, dispatch.backward_sm90_smem_bytes(main), maps


def _backward_launches(p: _Block, arch: str, dev: int, pre, post, main, main_smem: int, maps: tuple, dq_key, *,
                       batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, heads_k: int) -> tuple:
    """The backward's launches in one parameter block: preprocess over 64-row blocks, the KV-parallel main
    kernel over key blocks, then the postprocess, or, given ``dq_key``, the Q-parallel dQ kernel (its own
    block counts). ``batch`` sequences of (at most) seqlen_q queries and seqlen_k keys."""
    p["num_n_blocks"] = -(-seqlen_k // main.block_n)
    block = p.pack()
    rows_grid = -(-seqlen_q // dispatch.BWD_PREPOST_ROWS) * batch * heads_q
    launches = [KernelLaunch(jit.get_function(pre, arch, dev, 0), rows_grid, pre.threads, 0, block),
                KernelLaunch(jit.get_function(main, arch, dev, main_smem), p["num_n_blocks"] * batch * heads_k,
                             main.threads, main_smem, block, maps)]
    if dq_key is None:
        launches.append(KernelLaunch(jit.get_function(post, arch, dev, 0), rows_grid, post.threads, 0, block))
    else:
        smem = dispatch.dq_smem_bytes(dq_key)
        p["num_m_blocks"] = m_blocks = -(-seqlen_q // dq_key.block_m)
        p["num_n_blocks"] = -(-seqlen_k // dq_key.block_n)
        launches.append(KernelLaunch(jit.get_function(dq_key, arch, dev, smem), m_blocks * batch * heads_q,
                                     dq_key.threads, smem, p.pack()))
    return tuple(launches)
