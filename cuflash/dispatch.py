"""Which kernel variant runs a call: the specialization key and the tile configuration.

A :class:`KernelKey` names one compiled variant, e.g. ``fwd_sm80_bf16_d128_local_br128_bc64_w4``. The same
string names the disk-cache entry, the compile log line and error messages. Nothing here touches a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

# Head dims compiled natively; any other multiple of 8 up to 256 runs on the next one up with the extra
# columns zero-filled inside the kernel (no copy of the inputs).
PADDED_HEAD_DIMS = (64, 128, 192, 256)
DTYPES = ("fp16", "bf16")

# Forward tiles for the sm80 kernel: head dim -> (block_m, block_n, warps, min CTAs per SM, ptxas -O level).
# 128 query rows per CTA in 4 warps (two m16 slabs a warp) let each K/V fragment feed two MMAs, which the
# H100's shared-memory bandwidth needs; that puts S and O at the 255-register limit at head dims 64 and
# 128. There ptxas -O3 schedules loads so early that it spills a few bytes; the key tile and -O level
# below are the fastest measured choice with no spill (H100, bf16: bench/NOTES.md). 192 and 256 use 8
# warps of one slab each (O alone is 128 registers a thread at 256).
FWD_SM80_TILES = {
    64: (128, 96, 4, 1, 3),
    128: (128, 64, 4, 1, 1),
    192: (128, 64, 8, 1, 3),
    256: (128, 64, 8, 1, 3),
}
# ALiBi's per-element bias adds live registers: at head dim 64 the -O3 schedule spills there. So does
# softcap with masking at head dim 64 for sm_90a once the softmax carries its exact-offset path (8 bytes).
FWD_SM80_ALIBI_PTXAS_OPT = {64: 1}
FWD_SM80_LOCAL_SOFTCAP_PTXAS_OPT = {64: 1}
# The variable-length build's sequence lookups too (8 bytes in the softcap and the local variants at -O3).
FWD_SM80_VARLEN_PTXAS_OPT = {64: 1}
# ... and at head dim 128 they push the 128-row tile past 255 registers with softcap and a mask (12 bytes
# at -O1, 36-160 at -O2/-O3): the variable-length build takes 64-row tiles there.
FWD_SM80_VARLEN_TILES = {128: (64, 64, 4, 1, 1)}
# Dropout's draws (philox.cuh) do the same with a causal or window mask at head dim 128 (20-44 bytes for
# sm_90a at -O1 and -O3): the dropout build takes 64-row tiles there too.
FWD_SM80_DROPOUT_TILES = {128: (64, 64, 4, 1, 1)}
# An element mask (CF_ATTN_MASK, attn_mask.cuh) reads a mask element per score, whose addresses need
# registers the 128-row tiles of head dims 64 and 128 do not have (16-84 bytes of spills for sm_90a): 64-row
# tiles there; at 256, 32-key tiles (the 64-key ones spilled 4-20 bytes on sm_80, sm_86 and sm_90a, at -O1
# too, and with 64 rows).
FWD_SM80_MASK_TILES = {64: (64, 64, 4, 1, 3), 128: (64, 64, 4, 1, 3), 256: (128, 32, 8, 1, 3)}
# The split-KV build (decoding: a query block is a key/value head's group of query heads, 4-16 rows): the
# smallest query block the warp layout allows (16 rows a warp, 4 warps), so few rows go to waste, and 128-key
# tiles to keep many loads in flight per CTA. (block_m, block_n, warps, min blocks, ptxas -O).
FWD_SM80_SPLIT_KV_TILES = {64: (64, 128, 4, 2, 3), 128: (64, 128, 4, 1, 3), 192: (64, 64, 4, 1, 3),
                           256: (64, 64, 4, 1, 3)}

def padded_head_dim(head_dim: int) -> int:
    """The compiled head dim that serves ``head_dim`` (a multiple of 8 in [8, 256])."""
    for d in PADDED_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim={head_dim} exceeds the largest supported head dim 256")


# The element-mask builds (CF_ATTN_MASK) by the mask's kind: the kernels read one byte per element of a
# boolean mask (True = attend), one 16-bit value of q's dtype of an additive one.
ATTN_MASK_KINDS = {"bool": 1, "additive": 2}

# How extra defines appear in variant names: a prefix followed by the value, or (flag name,) shown when set.
_EXTRA_LABELS = {"CF_DETERMINISTIC": ("det",), "CF_BWD_A_REGS": ("preg",), "CF_Q_STAGES": "st", "CF_STAGES": "st",
                 "CF_CONSUMERS": "cw", "CF_PINGPONG": ("pp",), "CF_VARLEN": ("varlen",),
                 "CF_SPLIT_KV": ("splitkv",), "CF_PAGED": ("paged",), "CF_PAGE_GATHER": ("gather",),
                 "CF_DROPOUT": ("dropout",), "CF_ATTN_MASK": "mask", "CF_MASK_STAGE": ("staged",),
                 "CF_BLOCK_SPARSE": ("sparse",)}


@dataclass(frozen=True)
class KernelKey:
    """One compiled kernel variant.

    ``family`` is the source file stem (``fwd_sm80``), ``entry`` the ``extern "C"`` function in it.
    """

    family: str
    entry: str
    dtype: str
    head_dim: int
    is_local: bool = False
    softcap: bool = False
    alibi: bool = False
    block_m: int = 0
    block_n: int = 0
    warps: int = 4
    min_blocks: int = 1
    extra: tuple = ()  # further (define, value) pairs for families that need them
    ptxas_opt: int = 3  # ptxas -O level (see FWD_SM80_TILES for why some variants use 1)

    @functools.cached_property
    def name(self) -> str:
        if self.family in (STRIDED_COPY_FAMILY, DROPOUT_MASK_FAMILY, KVCACHE_APPEND_FAMILY):  # one variant each
            return self.family
        if self.family == ROTARY_FAMILY:  # one per element type
            return f"{self.family}_{self.dtype}"
        if self.family == MERGE_STATES_FAMILY:  # element types in and out, nothing else
            d = dict(self.extra)
            return f"{self.family}_{MERGE_TYPES[d['CF_MERGE_IN']]}_to_{MERGE_TYPES[d['CF_MERGE_OUT']]}"
        parts = [self.family, self.dtype, f"d{self.head_dim}"]
        if self.is_local:
            parts.append("local")
        if self.softcap:
            parts.append("softcap")
        if self.alibi:
            parts.append("alibi")
        for define, value in self.extra:
            label = _EXTRA_LABELS[define]
            if isinstance(label, str):
                parts.append(f"{label}{value}")
            elif value:
                parts.append(label[0])
        parts += [f"br{self.block_m}", f"bc{self.block_n}", f"w{self.warps}"]
        if self.min_blocks > 1:
            parts.append(f"mb{self.min_blocks}")
        if self.ptxas_opt != 3:
            parts.append(f"o{self.ptxas_opt}")
        return "_".join(parts)

    @property
    def source(self) -> str:
        return f"attention/{self.family}.cu"

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def archs(self) -> tuple:
        """NVRTC targets the variant builds for: wgmma/TMA kernels exist only for sm_90a."""
        return ("sm_90a",) if self.family.endswith("_sm90") else ("sm_80", "sm_90a")

    def defines(self) -> dict:
        d = {
            "CF_DTYPE": 1 if self.dtype == "bf16" else 0,
            "CF_HEAD_DIM": self.head_dim,
            "CF_BLOCK_M": self.block_m,
            "CF_BLOCK_N": self.block_n,
            "CF_WARPS": self.warps,
            "CF_MIN_BLOCKS": self.min_blocks,
            "CF_IS_LOCAL": int(self.is_local),
            "CF_SOFTCAP": int(self.softcap),
            "CF_ALIBI": int(self.alibi),
        }
        d.update(dict(self.extra))
        return d

    def __str__(self) -> str:
        return self.name


_OVERRIDES: dict = {}


def _tile_overrides() -> dict:
    spec = os.environ.get("CUFLASH_FWD_TILES", "")
    hit = _OVERRIDES.get(spec)
    if hit is None:
        hit = _OVERRIDES[spec] = _parse_tile_overrides(spec)
    return hit


def _parse_tile_overrides(spec: str) -> dict:
    """``CUFLASH_FWD_TILES="128=64x64x4,256=128x64x8x1o1"``: per padded head dim, block_m x block_n x warps
    (x minimum resident CTAs per SM, a register-allocation hint; default 1) (o ptxas -O level; default 3).

    A tuning knob for benchmarking other tile shapes without editing the package.
    """
    out = {}
    for item in filter(None, spec.split(",")):
        try:
            d, tiles = item.split("=")
            tiles, _, opt = tiles.partition("o")
            nums = [int(x) for x in tiles.split("x")]
            if len(nums) == 3:
                nums.append(1)
            out[int(d)] = tuple(nums) + (int(opt or 3),)
        except ValueError:
            raise ValueError(f"CUFLASH_FWD_TILES entry {item!r} is not HEADDIM=BMxBNxWARPS") from None
    return out


# GPUs with less shared memory per block than the first choice needs (sm_86/sm_89: 99 KB) fall back to this.
FWD_SM80_SMALL_SMEM_TILES = {192: (64, 64, 4, 1, 3), 256: (64, 64, 4, 1, 3)}

# Largest dynamic shared memory per block, by compute capability (opt-in limit).
MAX_SMEM = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448}
MAX_SMEM_DEFAULT = 101376  # sm_86, sm_89, sm_12x


def max_smem(major: int, minor: int) -> int:
    return MAX_SMEM.get((major, minor), MAX_SMEM_DEFAULT)


def _with_tiles(key: KernelKey, tiles) -> KernelKey:
    """``key`` with the forward tiles ``tiles`` = (block_m, block_n, warps, min blocks, ptxas -O), or as it is
    for None. The builds' own tables hold tiles smaller than every dense one: within every shared-memory
    limit."""
    if not tiles:
        return key
    bm, bn, warps, min_blocks, opt = tiles
    return dataclasses.replace(key, block_m=bm, block_n=bn, warps=warps, min_blocks=min_blocks, ptxas_opt=opt)


def forward_key(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool,
                smem_limit: int = MAX_SMEM[(9, 0)], varlen: bool = False, split_kv: bool = False,
                paged: bool = False, dropout: bool = False, attn_mask: int = 0) -> KernelKey:
    """The sm80 forward's variant. ``varlen``: the variable-length build (CF_VARLEN, seq_context.cuh reads
    each sequence's rows from cu_seqlens / seqused), a separate variant so that the dense one compiles to the
    same code as without it (its 252-254 registers at head dim 64 leave no room for the lookups).
    ``split_kv`` (with ``varlen``): the split-KV build for decoding (CF_SPLIT_KV, fp32 partial outputs).
    ``paged`` (with ``varlen``): keys and values read through a block table (CF_PAGED, KV caches in pages).
    ``dropout`` (dense): attention dropout (CF_DROPOUT, philox.cuh). ``attn_mask`` (dense, no ALiBi or
    dropout): an element mask, 1 boolean or 2 additive (CF_ATTN_MASK, attn_mask.cuh)."""
    key = _forward_key(dtype, padded_head_dim(head_dim), is_local, softcap, alibi, smem_limit,
                       os.environ.get("CUFLASH_FWD_TILES", ""))
    if attn_mask:
        assert not (varlen or split_kv or paged or dropout or alibi), "attn_mask: the dense build, no ALiBi"
        key = dataclasses.replace(key, extra=key.extra + (("CF_ATTN_MASK", attn_mask),))
        return _with_tiles(key, FWD_SM80_MASK_TILES.get(key.head_dim))
    if dropout:
        assert not (varlen or split_kv or paged), "dropout: the dense build"
        key = dataclasses.replace(key, extra=key.extra + (("CF_DROPOUT", 1),))
        return _with_tiles(key, FWD_SM80_DROPOUT_TILES.get(key.head_dim))
    if not varlen:
        return key
    key = dataclasses.replace(key, extra=key.extra + (("CF_VARLEN", 1),),
                              ptxas_opt=FWD_SM80_VARLEN_PTXAS_OPT.get(key.head_dim, key.ptxas_opt))
    key = _with_tiles(key, FWD_SM80_VARLEN_TILES.get(key.head_dim))
    if split_kv:
        bm, bn, warps, min_blocks, opt = FWD_SM80_SPLIT_KV_TILES[key.head_dim]
        key = dataclasses.replace(key, extra=key.extra + (("CF_SPLIT_KV", 1),), block_m=bm, block_n=bn, warps=warps,
                                  min_blocks=min_blocks, ptxas_opt=opt)
    if paged:
        key = dataclasses.replace(key, extra=key.extra + (("CF_PAGED", 1),))
    return key


@functools.lru_cache(maxsize=None)
def _forward_key(dtype, d, is_local, softcap, alibi, smem_limit, _tiles_env) -> KernelKey:
    bm, bn, warps, min_blocks, opt = _tile_overrides().get(d) or FWD_SM80_TILES[d]
    if alibi:
        opt = FWD_SM80_ALIBI_PTXAS_OPT.get(d, opt)
    elif softcap and is_local:
        opt = FWD_SM80_LOCAL_SOFTCAP_PTXAS_OPT.get(d, opt)
    key = KernelKey("fwd_sm80", "attention_fwd_sm80", dtype, d, is_local, softcap, alibi, bm, bn, warps, min_blocks,
                    ptxas_opt=opt)
    if forward_smem_bytes(key) > smem_limit:
        bm, bn, warps, min_blocks, opt = FWD_SM80_SMALL_SMEM_TILES[d]
        key = KernelKey("fwd_sm80", "attention_fwd_sm80", dtype, d, is_local, softcap, alibi, bm, bn, warps,
                        min_blocks, ptxas_opt=opt)
    return key


# Hopper forward (fwd_sm90.cu): head dim -> (consumer warpgroups, block_n, stages, ping-pong). Each consumer
# warpgroup owns 64 query rows; one producer warpgroup loads. Shared memory: Q + stages x (K + V) tiles.
# At head dim 64 the softmax costs as much as the two products, so a third consumer warpgroup keeps the
# tensor cores busy while the others exponentiate (bench/NOTES.md).
# Ping-pong (consumer warpgroups take turns issuing their products) is used at head dim 64 only: +8% there
# at 16k, +9-16% for causal 4k-16k once each warpgroup walked only its own key tiles (h10); it cost
# 2-14% at head dims 128/256 (bench/NOTES.md, h5 and h10).
FWD_SM90_TILES = {64: (3, 128, 4, 1), 128: (2, 128, 2, 0), 192: (2, 64, 2, 0), 256: (2, 64, 2, 0)}
# Two consumer warpgroups where three (160 registers each) lack registers: softcap's tanh, dropout's draws
# (128-184 bytes of spills with three), and row gathers (their 64-register producer would leave 138).
FWD_SM90_TWO_CONSUMER_TILES = {64: (2, 128, 4, 0)}

# Which forward kernel runs on compute capability 9.0: "sm90" (default) or "sm80" (the mma.sync kernel,
# kept selectable for comparison and as a fallback). Other GPUs always run sm80.
FWD_KERNEL_ENV = "CUFLASH_FWD_KERNEL"


def forward_family(cc: tuple) -> str:
    choice = os.environ.get(FWD_KERNEL_ENV, "") or "sm90"
    if choice not in ("sm80", "sm90"):
        raise ValueError(f"{FWD_KERNEL_ENV}={choice!r}; expected 'sm80' or 'sm90'")
    return "fwd_sm90" if (choice == "sm90" and tuple(cc) == (9, 0)) else "fwd_sm80"


# ptxas levels of the Hopper forward's element-mask builds that spill at -O3: (head dim, causal/window
# without softcap, mask kind) -> level. The boolean causal/window build at head dim 128 spilled 4 bytes at
# -O3 and -O2, none at -O1.
FWD_SM90_MASK_PTXAS_OPT = {(128, True, 1): 1}
# (head dim, causal/window, softcap) of the Hopper forward whose staged boolean mask build (CF_MASK_STAGE)
# spills at every ptxas level (8-12 bytes): those read the mask from global memory instead. The same without
# softcap is spill-free at -O1 (above).
FWD_SM90_UNSTAGED = {(128, True, True)}


def forward_key_sm90(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool,
                     varlen: bool = False, split_kv: bool = False, paged: bool = False,
                     page_gather: bool = False, dropout: bool = False, attn_mask: int = 0,
                     mask_stage: bool = False, block_sparse: bool = False) -> KernelKey:
    """The Hopper forward's variant. ``varlen``: its variable-length build (CF_VARLEN: packed tensor maps,
    rows from cu_seqlens / seqused, clipped ordinary O stores), a separate variant so that the dense one
    compiles to the code it had without it. ``split_kv`` (with ``varlen``; head dims in
    :data:`FWD_SM90_SPLIT_KV_HEAD_DIMS`): the split-KV build (CF_SPLIT_KV, fp32 partial states).
    ``paged`` (with ``varlen``): keys and values through a block table, a TMA box per page
    (CF_PAGED; page sizes that :func:`sm90_page_box_rows` accepts), or with ``page_gather`` rows gathered
    by the producer warpgroup's cp.async (CF_PAGE_GATHER; any page size). ``dropout`` (dense): attention
    dropout (CF_DROPOUT, philox.cuh). ``attn_mask`` (dense, no ALiBi or dropout): an element mask, 1 boolean
    or 2 additive (CF_ATTN_MASK, attn_mask.cuh), on two consumer warpgroups (the mask's addressing does not fit
    three's 160 registers at head dim 64). ``mask_stage`` (a boolean mask whose rows are 16-byte aligned runs of
    bytes, :func:`mask_stageable`): the mask staged in shared memory by 16-byte copies (CF_MASK_STAGE).
    ``block_sparse`` (with a boolean ``attn_mask``): key tiles from block_mask.py's lists, partial blocks' masks
    from its store (CF_BLOCK_SPARSE, block_sparse.cuh)."""
    assert not block_sparse or (attn_mask == ATTN_MASK_KINDS["bool"] and not is_local), "block sparsity: boolean"
    if attn_mask:
        assert not (varlen or split_kv or paged or dropout or alibi), "attn_mask: the dense build, no ALiBi"
        assert not mask_stage or attn_mask == ATTN_MASK_KINDS["bool"], "staged masks: boolean ones"
        key = _forward_key_sm90(dtype, padded_head_dim(head_dim), is_local, softcap, alibi, True)
        opt = FWD_SM90_MASK_PTXAS_OPT.get((key.head_dim, is_local and not softcap, attn_mask), key.ptxas_opt)
        stage = (("CF_MASK_STAGE", 1),) if mask_stage and (key.head_dim, is_local, softcap) not in FWD_SM90_UNSTAGED else ()
        sparse = (("CF_BLOCK_SPARSE", 1),) if block_sparse else ()
        return dataclasses.replace(key, extra=key.extra + (("CF_ATTN_MASK", attn_mask),) + stage + sparse,
                                   ptxas_opt=opt)
    if dropout:
        assert not (varlen or split_kv or paged), "dropout: the dense build"
        key = _forward_key_sm90(dtype, padded_head_dim(head_dim), is_local, softcap, alibi, True)
        return dataclasses.replace(key, extra=key.extra + (("CF_DROPOUT", 1),))
    key = _forward_key_sm90(dtype, padded_head_dim(head_dim), is_local, softcap, alibi, page_gather)
    if varlen:
        key = dataclasses.replace(key, extra=key.extra + (("CF_VARLEN", 1),))
    if split_kv:
        assert varlen and key.head_dim in FWD_SM90_SPLIT_KV_HEAD_DIMS, "split-KV: varlen, a separate O buffer"
        key = dataclasses.replace(key, extra=key.extra + (("CF_SPLIT_KV", 1),))
    if paged:
        assert varlen, "paged K / V: the variable-length build"
        key = dataclasses.replace(key, extra=key.extra + (("CF_PAGED", 1),))
    if page_gather:
        assert paged, "row gathers: the paged build"
        key = dataclasses.replace(key, extra=key.extra + (("CF_PAGE_GATHER", 1),))
    return key


def block_sparse_tiles(head_dim: int, backward: bool):
    """(tile_m, tile_n) of the Hopper kernels' block-sparse build at this head dim, forward or backward (the
    tiles a block mask's blocks must be multiples of); None where there is no such build."""
    d = padded_head_dim(head_dim)
    if backward:
        return BWD_SM90_TILES[d][:2] if d in BWD_SM90_TILES and d not in BWD_SM90_WIDE else None
    key = forward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False,
                           attn_mask=ATTN_MASK_KINDS["bool"], mask_stage=True, block_sparse=True)
    return key.block_m, key.block_n


def check_block_sparse_tiles(block_size: tuple, tiles: tuple) -> None:
    """NotImplementedError unless a block mask's (query, key) block size is a multiple of a block-sparse
    kernel's tiles (block_sparse.cuh: a tile reads its element mask from one block)."""
    if block_size[0] % tiles[0] or block_size[1] % tiles[1]:
        raise NotImplementedError(f"block_mask with block_size {tuple(block_size)} on GPU arrays: the kernel's tiles "
                                  f"are {tiles[0]} x {tiles[1]}, so the block size must be a multiple of them (the "
                                  f"default, 128, is)")


def page_shift(page_size: int) -> int:
    """log2(page_size) for a power-of-two page size (the kernels split rows into pages by a shift and a
    mask), else -1 (a division)."""
    return page_size.bit_length() - 1 if page_size > 0 and page_size & (page_size - 1) == 0 else -1


def sm90_page_box_rows(page_size: int):
    """Rows of the Hopper forward's TMA box for pages of ``page_size`` rows, or None where it reads them by
    row gathers instead (the CF_PAGE_GATHER build): a power of two of at least 32 rows, so that
    a page's rows start on the 128-byte swizzle's 8-row period in shared memory, every key tile (a power of
    two rows) holds whole pages or lies inside one, and a tile's page indices share one 128-byte line of the
    table (fwd_sm90.cu prefetch_page_runs). 16-row boxes (vLLM's default page) took 1.66x (batch 8 x 32k)
    and 1.40x (1 x 128k) the contiguous time on the H200, where the sm80 paged build took 1.48x and 1.35x
    (bf16, hd128; 64-row boxes: 1.06x and 1.03x). The kernel's box is min(page_size, block_n) (fwd_sm90.cu
    paged_box_rows)."""
    if page_size >= 32 and page_shift(page_size) >= 0:
        return page_size
    return None


@functools.lru_cache(maxsize=None)
def _forward_key_sm90(dtype, d, is_local, softcap, alibi, two_consumers=False) -> KernelKey:
    tiles = FWD_SM90_TWO_CONSUMER_TILES.get(d) if softcap or two_consumers else None
    consumers, bn, stages, pingpong = tiles or FWD_SM90_TILES[d]
    return KernelKey("fwd_sm90", "attention_fwd_sm90", dtype, d, is_local, softcap, alibi, 64 * consumers, bn,
                     4 * (1 + consumers), extra=(("CF_STAGES", stages), ("CF_CONSUMERS", consumers),
                                                 ("CF_PINGPONG", pingpong)))


def _forward_sm90_fixed_bytes(key: KernelKey) -> int:
    """Shared memory of attention_fwd_sm90 besides its tiles: a staged mask's two buffers per consumer
    warpgroup (kMaskStageBytes: 64 rows x block_n bytes each), the mbarriers and work-tile slots (with row
    gathers the producer's two), the row gathers' cache rows per stage (kGatherRowBytes), and 1024 bytes of
    slack to align the swizzled tiles."""
    extra = dict(key.extra)
    stages, gather = extra["CF_STAGES"], extra.get("CF_PAGE_GATHER", 0)
    mask_stage = extra.get("CF_MASK_STAGE", 0) * extra["CF_CONSUMERS"] * 2 * 64 * key.block_n
    return mask_stage + 8 * (3 + 4 * stages + gather) + gather * stages * key.block_n * 8 * 4 + 1024


def mask_stageable(mask) -> bool:
    """Whether the Hopper forward can stage an attn_mask view (batch, heads_q, seqlen_q, seqlen_k) in shared
    memory by 16-byte copies: boolean, keys contiguous, and every row's first byte 16-byte aligned (address
    and the batch, head and row strides multiples of 16; 0 where it broadcasts)."""
    return (mask.dtype == "bool" and mask.strides[3] == 1 and mask.ptr % 16 == 0
            and all(st % 16 == 0 for st in mask.strides[:3]))


def _forward_sm90_separate_o(key: KernelKey) -> bool:
    """Whether O gets its own shared-memory buffer (mirrors fwd_sm90.cu's kSeparateO)."""
    stages = dict(key.extra)["CF_STAGES"]
    q = 2 * key.head_dim * key.block_m
    kv = 2 * stages * 2 * key.head_dim * key.block_n
    return 2 * q + kv + _forward_sm90_fixed_bytes(key) <= MAX_SMEM[(9, 0)]


def forward_sm90_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of attention_fwd_sm90 (mirrors cf_fwd_sm90_smem_bytes): Q, the K/V stages,
    an O staging buffer when it fits (else O goes out through the Q buffer), and the rest
    (:func:`_forward_sm90_fixed_bytes`)."""
    stages = dict(key.extra)["CF_STAGES"]
    q = 2 * key.head_dim * key.block_m
    kv = 2 * stages * 2 * key.head_dim * key.block_n
    return (2 if _forward_sm90_separate_o(key) else 1) * q + kv + _forward_sm90_fixed_bytes(key)


# The Hopper kernel loops over work tiles, so its schedule is a launch-time choice (bench/NOTES.md, h6-h9):
#  - one CTA per SM in a static (boustrophedon) order for unmasked calls up to 8k keys: hides each tile's
#    prologue and epilogue under its neighbours' loads (+5-15% at <= 2k); past 8k it measured no gain;
#  - one CTA per SM taking tiles from a global counter for causal/window calls up to 2k keys (+2-16%
#    against that static order, h9; only the causal/window variants carry the counter code);
#    a static split there leaves SMs idle and lets CTAs drift apart (K/V fall out of L2), and past 2k
#    even the counter measured ~3% slower than the last option;
#  - one CTA per tile, which the hardware schedules as SMs free up (everything else, and head dim 256,
#    whose O shares the Q buffer so that its variants are built for one tile per CTA).
FWD_SM90_PERSISTENT_MAX_HEAD_DIM = 192
FWD_SM90_PERSISTENT_MAX_SEQLEN_K = 8192
FWD_SM90_COUNTER_MAX_SEQLEN_K = 2048


def forward_sm90_schedule(key: KernelKey, tiles: int, seqlen_k: int, sm_count: int) -> tuple:
    """(grid size, whether the CTAs take tiles from a global counter) of one Hopper forward launch. Block-sparse
    launches stay persistent at every length: their work tiles are short (a few key tiles each), so one
    tile's epilogue under the next one's loads is worth more than at dense lengths past
    FWD_SM90_PERSISTENT_MAX_SEQLEN_K; the host's order (longest lists first) balances the static schedule."""
    if key.head_dim <= FWD_SM90_PERSISTENT_MAX_HEAD_DIM and tiles > sm_count and ("CF_BLOCK_SPARSE", 1) in key.extra:
        return sm_count, False
    if key.head_dim <= FWD_SM90_PERSISTENT_MAX_HEAD_DIM and tiles > sm_count:
        if key.is_local and seqlen_k <= FWD_SM90_COUNTER_MAX_SEQLEN_K:
            return sm_count, True
        if not key.is_local and seqlen_k <= FWD_SM90_PERSISTENT_MAX_SEQLEN_K:
            return sm_count, False
    return tiles, False


def forward_sm90_varlen_schedule(key: KernelKey, tiles: int, sm_count: int) -> tuple:
    """(grid size, whether the CTAs take tiles from a global counter) of a variable-length Hopper forward.
    Persistent CTAs always take tiles from the counter: the grid covers max_seqlen_q rows of every sequence,
    so most slots of a static order are tiles past a short sequence's end, and the others cost in
    proportion to their sequence's length."""
    if key.head_dim <= FWD_SM90_PERSISTENT_MAX_HEAD_DIM and tiles > sm_count:
        return sm_count, True
    return tiles, False


# Head dims whose Hopper forward has the split-KV build: those where O has its own buffer (the build writes
# its partial states from registers and leaves the Q buffer's release to the main loop).
FWD_SM90_SPLIT_KV_HEAD_DIMS = tuple(d for d in FWD_SM90_TILES
                                    if _forward_sm90_separate_o(_forward_key_sm90("bf16", d, False, False, False)))


def all_forward_sm90_keys() -> list[KernelKey]:
    keys = [forward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=al, varlen=vl, dropout=dr)
            for dt in DTYPES for d in PADDED_HEAD_DIMS for loc in (False, True)
            for sc in (False, True) for al in (False, True)
            for vl, dr in ((False, False), (True, False), (False, True))]
    # Paged caches take every variable-length build; decoding's split-KV builds, paged or not: no mask, no
    # ALiBi (api.decode_groups), as the sm80 ones.
    keys += [forward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=al, varlen=True, paged=True, page_gather=g)
             for dt in DTYPES for d in PADDED_HEAD_DIMS for loc in (False, True) for sc in (False, True)
             for al in (False, True) for g in (False, True)]
    keys += [forward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=False, attn_mask=m, mask_stage=st)
             for dt in DTYPES for d in PADDED_HEAD_DIMS for loc in (False, True) for sc in (False, True)
             for m, st in ((1, False), (1, True), (2, False))]
    return keys + [forward_key_sm90(dt, d, is_local=False, softcap=sc, alibi=False, varlen=True, split_kv=True,
                                    paged=pg, page_gather=g)
                   for dt in DTYPES for d in FWD_SM90_SPLIT_KV_HEAD_DIMS for sc in (False, True)
                   for pg, g in ((False, False), (True, False), (True, True))]


# Bytes of K and V that one launch-order group of (batch, head) pairs may keep in L2 (H100: 50 MB, A100:
# 40 MB), leaving room for the streaming Q/O traffic. See BlockCoords::grouped in block_coords.cuh.
L2_GROUP_BYTES = 16 << 20


def launch_group(bh_count: int, seqlen_k: int, head_dim: int) -> int:
    """(batch, head) pairs per launch-order group of the Hopper forward."""
    kv_bytes = 2 * 2 * seqlen_k * head_dim
    return max(1, min(bh_count, L2_GROUP_BYTES // max(kv_bytes, 1)))


def forward_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of the sm80 forward (mirrors cf_fwd_sm80_smem_bytes): the Q tile plus one K and
    one V tile, 16-bit; a paged build adds two stages of a key tile's physical rows (int32)."""
    paged = 2 * key.block_n * 4 if ("CF_PAGED", 1) in key.extra else 0
    return 2 * key.head_dim * (key.block_m + 2 * key.block_n) + paged


# Backward main kernel (KV-parallel, 8 warps): head dim -> (block_m, block_n, q_stages, a_regs, det) in order
# of preference; the first whose shared memory fits the GPU (and that serves deterministic mode, when asked:
# det) is used. a_regs keeps P^T in registers (hd64 only: it spills at larger head dims). Two Q/dO stages
# prefetch the next query tile under the current one. hd64's 128-query tile halves the Q/dO reads per mma
# of the score and dK/dV products (H100, bf16: +10-15% over 64 queries); its deterministic variant spills.
BWD_SM80_TILES = {
    64: [(128, 128, 2, 0, False), (64, 128, 2, 1, True), (64, 64, 1, 1, True)],
    128: [(64, 128, 2, 0, True), (64, 64, 1, 0, True)],
    192: [(64, 64, 2, 0, True), (64, 64, 1, 0, True)],
    256: [(64, 64, 2, 0, True), (64, 64, 1, 0, True)],
}
# softcap and ALiBi together at head dim 128: -O3 spills 4 bytes for sm_80 once P's exponent is formed in
# natural units (bwd_common.cuh); -O1 spills nothing.
BWD_SM80_SOFTCAP_ALIBI_PTXAS_OPT = {128: 1}
# Deterministic dQ kernel (Q-parallel, 4 warps): head dim -> (block_m, block_n).
BWD_DQ_SM80_TILES = {64: (64, 64), 128: (64, 64), 192: (64, 64), 256: (64, 32)}
# The dropout builds (CF_DROPOUT: a Philox draw per lane per pair of n8 tiles, philox.cuh) need registers the
# fastest tiles do not have: with the tiles above they spilled 4-84 bytes (hd64's 128-query tile, hd128
# and hd256 with masks or softcap, the dQ kernel at hd192 with softcap and ALiBi). These spill nothing:
BWD_SM80_DROPOUT_TILES = {
    64: [(64, 128, 2, 1, True), (64, 64, 1, 1, True)],
    128: [(64, 64, 2, 0, True), (64, 64, 1, 0, True)],
    192: BWD_SM80_TILES[192],
    256: BWD_SM80_TILES[256],
}
BWD_SM80_DROPOUT_PTXAS_OPT = {256: 1}
BWD_DQ_SM80_DROPOUT_TILES = {192: (64, 32)}
# The element-mask builds (CF_ATTN_MASK) where the tiles above spill with the mask's reads: hd128 with softcap
# (8-12 bytes for sm_80 with 128 keys), hd256 (4 bytes for sm_90a at -O3), the dQ kernel at hd192 with
# softcap (12-44 bytes).
BWD_SM80_MASK_TILES = {128: [(64, 64, 2, 0, True), (64, 64, 1, 0, True)]}
BWD_SM80_MASK_PTXAS_OPT = {256: 1}
BWD_DQ_SM80_MASK_TILES = {192: (64, 32)}
BWD_PREPOST_ROWS = 64  # query rows per CTA of the pre/post-processing kernels (kRows in bwd_prepost.cu)
# ptxas optimisation level of the variable-length sm80 backward by head dim, where -O3 spills.
BWD_SM80_VARLEN_PTXAS_OPT = {128: 1, 256: 1}


def backward_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of attention_bwd_sm80 (mirrors cf_bwd_smem_bytes in bwd_sm80.cu)."""
    ex = dict(key.extra)
    stages, a_regs, d = ex["CF_Q_STAGES"], ex["CF_BWD_A_REGS"], key.head_dim
    bm, bn = key.block_m, key.block_n
    return 2 * bn * d * 2 + 2 * stages * bm * d * 2 + (1 if a_regs else 2) * bn * bm * 2 + 2 * stages * bm * 4


def dq_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of attention_bwd_dq_sm80 (mirrors cf_bwd_dq_smem_bytes)."""
    return 2 * key.block_m * key.head_dim * 2 + 3 * key.block_n * key.head_dim * 2


def backward_keys(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool, deterministic: bool,
                  smem_limit: int = MAX_SMEM[(9, 0)], dropout: bool = False, attn_mask: int = 0):
    """(preprocess key, postprocess key, main key, deterministic dQ key or None) for one backward call;
    ``dropout``: the main and dQ kernels' dropout builds (CF_DROPOUT, philox.cuh); ``attn_mask`` (no ALiBi or
    dropout): their element-mask builds, 1 boolean or 2 additive (CF_ATTN_MASK, attn_mask.cuh)."""
    return _backward_keys(dtype, padded_head_dim(head_dim), is_local, softcap, alibi, deterministic, smem_limit,
                          dropout, attn_mask)


@functools.lru_cache(maxsize=None)
def _backward_keys(dtype, d, is_local, softcap, alibi, deterministic, smem_limit, dropout=False, attn_mask=0):
    assert not (attn_mask and (dropout or alibi)), "attn_mask: no ALiBi or dropout"
    pre = KernelKey("bwd_prepost", "attention_bwd_preprocess", dtype, d, block_m=BWD_PREPOST_ROWS, warps=8)
    post = KernelKey("bwd_prepost", "attention_bwd_postprocess", dtype, d, block_m=BWD_PREPOST_ROWS, warps=8)
    main = None
    drop = (("CF_DROPOUT", 1),) if dropout else (("CF_ATTN_MASK", attn_mask),) if attn_mask else ()
    tiles = BWD_SM80_DROPOUT_TILES if dropout else BWD_SM80_TILES
    if attn_mask:
        tiles = {**BWD_SM80_TILES, **BWD_SM80_MASK_TILES}
    for bm, bn, stages, a_regs, det in tiles[d]:
        if deterministic and not det:
            continue
        opt = BWD_SM80_SOFTCAP_ALIBI_PTXAS_OPT.get(d, 3) if softcap and alibi else 3
        main = KernelKey("bwd_sm80", "attention_bwd_sm80", dtype, d, is_local, softcap, alibi, bm, bn, 8,
                         extra=(("CF_DETERMINISTIC", int(deterministic)), ("CF_Q_STAGES", stages),
                                ("CF_BWD_A_REGS", a_regs)) + drop,
                         ptxas_opt=(BWD_SM80_DROPOUT_PTXAS_OPT.get(d, opt) if dropout
                                    else BWD_SM80_MASK_PTXAS_OPT.get(d, opt) if attn_mask else opt))
        if backward_smem_bytes(main) <= smem_limit:
            break
    else:
        raise NotImplementedError(
            f"backward for head_dim {d} needs {backward_smem_bytes(main)} bytes of shared memory per "
            f"block; this GPU allows {smem_limit}")
    dq = None
    if deterministic:
        bm, bn = ((dropout and BWD_DQ_SM80_DROPOUT_TILES.get(d)) or (attn_mask and BWD_DQ_SM80_MASK_TILES.get(d))
                  or BWD_DQ_SM80_TILES[d])
        dq = KernelKey("bwd_dq_sm80", "attention_bwd_dq_sm80", dtype, d, is_local, softcap, alibi, bm, bn, 4,
                       extra=drop)
    return pre, post, main, dq


def backward_varlen_keys(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool,
                         deterministic: bool = False, smem_limit: int = MAX_SMEM[(9, 0)]):
    """(preprocess, postprocess, main, deterministic dQ or None) keys of the variable-length backward: the sm80
    kernels' variable-length builds (CF_VARLEN, seq_rows.cuh) on every GPU, as backward_keys picks them.
    Separate variants, so that the dense ones compile to the code they had without it. The sequence lookups
    cost registers: the main kernel takes 64-row query tiles (hd64's 128-row one spills 60-84 bytes even at
    -O1) and -O1 where -O3 spills (BWD_SM80_VARLEN_PTXAS_OPT)."""
    d = padded_head_dim(head_dim)
    pre, post, _, dq = backward_keys(dtype, d, is_local=is_local, softcap=softcap, alibi=alibi,
                                     deterministic=deterministic, smem_limit=smem_limit)
    varlen = (("CF_VARLEN", 1),)
    main = None
    for bm, bn, stages, a_regs, det in BWD_SM80_TILES[d]:
        if bm > 64 or (deterministic and not det):
            continue
        main = KernelKey("bwd_sm80", "attention_bwd_sm80", dtype, d, is_local, softcap, alibi, bm, bn, 8,
                         extra=(("CF_DETERMINISTIC", int(deterministic)), ("CF_Q_STAGES", stages),
                                ("CF_BWD_A_REGS", a_regs)) + varlen,
                         ptxas_opt=BWD_SM80_VARLEN_PTXAS_OPT.get(d, 3))
        if backward_smem_bytes(main) <= smem_limit:
            break
    else:
        raise NotImplementedError(
            f"variable-length backward for head_dim {d} needs {backward_smem_bytes(main)} bytes of shared "
            f"memory per block; this GPU allows {smem_limit}")
    with_varlen = lambda k: None if k is None else dataclasses.replace(k, extra=k.extra + varlen)  # noqa: E731
    if dq is not None and softcap and alibi:  # -O3 spills 4 bytes at head dim 192 for sm_80
        dq = dataclasses.replace(dq, ptxas_opt=1)
    return with_varlen(pre), with_varlen(post), main, with_varlen(dq)


# Hopper backward main kernel (bwd_sm90.cu), used on compute capability 9.0, deterministic mode included (its
# CTAs then add into dQ in turns, bwd_sm90.cu): padded head dim -> (block_m, block_n, stages).
# Head dims 64 / 128: 128 keys a CTA in two consumer warpgroups; block_m queries per step keeps the dK, dV, S^T
# and dP^T accumulators within 240 registers (64 + 64 + 32 + 32 at hd128; 32 + 32 + 64 + 64 at hd64).
# Head dims 192 / 256 (BWD_SM90_WIDE, bwd_sm90_wide.cuh): 64 keys a CTA, one warpgroup computing dV^T and the
# other dK^T (128 accumulator registers at hd256); shared memory allows one Q / dO stage at hd256 (223,336 of
# the 232,448 bytes), two at hd192.
BWD_SM90_TILES = {64: (128, 128, 2), 128: (64, 128, 2), 192: (64, 64, 2), 256: (64, 64, 1)}
# The wide head dims have the dense and variable-length builds, no element-mask one (such calls run the sm80
# kernel there) and no block-sparse one (api refuses block_mask with a backward there).
BWD_SM90_WIDE = (192, 256)
# The dropout builds (CF_DROPOUT) take ptxas -O1 at head dim 64 and with ALiBi: at -O3 the draws spilled 4-28
# bytes there on sm_90a (hd64's 128-query tile holds S^T and dP^T in 128 registers), none at -O1.
# fp32 columns of the boxes in which the Hopper backward adds dQ into dq_accum (cf_bwd_sm90_dq_box_cols):
# 128 bytes, the widest box the 128-byte swizzle allows; 64 query rows a box.
BWD_SM90_DQ_BOX = (64, 32)
# Query rows per turn counter of the deterministic Hopper backward (cf_dq_turn_rows, bwd_common.cuh).
BWD_SM90_DQ_TURN_ROWS = 64
BWD_KERNEL_ENV = "CUFLASH_BWD_KERNEL"


def allowed_spill_bytes(key: KernelKey) -> int:
    """Local-memory spill bytes a variant may report (every other variant must report none). The Hopper
    backward's variable-length build at head dim 64 (BM 128, 240 registers), unmasked and causal without
    softcap or ALiBi, spills 4 bytes at -O3 and -O2 and none at -O1; at -O3 it measured 2.8% (full) and
    3.9% (causal) faster than the spill-free -O1 build (H200, bench/NOTES.md, "Hopper variable-length
    kernels"), so it ships at -O3 with the spill. With the element loop compiled with and without the mask
    test (kLeanElements in bwd_sm90.cu) that build spills 36 bytes and the dense builds without softcap,
    ALiBi or dropout 24: 4-26% faster than with the single loop (H200, bench/NOTES.md, "hb11")."""
    if key.family != "bwd_sm90" or key.head_dim != 64 or key.softcap or key.alibi or key.ptxas_opt != 3:
        return 0
    extra = dict(key.extra)
    if extra.get("CF_ATTN_MASK") or extra.get("CF_BLOCK_SPARSE") or extra.get("CF_DROPOUT"):
        return 0
    return 36 if extra.get("CF_VARLEN") else 24


def backward_family(cc: tuple, head_dim: int, deterministic: bool, *, attn_mask: bool = False) -> str:
    """"bwd_sm90" or "bwd_sm80" for the main backward kernel; CUFLASH_BWD_KERNEL=sm80 keeps the mma.sync
    kernel on Hopper (for comparison). ``attn_mask``: the call needs the element-mask build, which the Hopper
    kernel lacks at head dims 192 and 256 (BWD_SM90_WIDE)."""
    choice = os.environ.get(BWD_KERNEL_ENV, "") or "sm90"
    if choice not in ("sm80", "sm90"):
        raise ValueError(f"{BWD_KERNEL_ENV}={choice!r}; expected 'sm80' or 'sm90'")
    hopper = choice == "sm90" and tuple(cc) == (9, 0)
    d = padded_head_dim(head_dim)
    covered = d in BWD_SM90_TILES and not (d in BWD_SM90_WIDE and attn_mask)
    return "bwd_sm90" if hopper and covered else "bwd_sm80"


def backward_key_sm90(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool,
                      deterministic: bool = False, varlen: bool = False, attn_mask: int = 0,
                      mask_stage: bool = False, block_sparse: bool = False, dropout: bool = False) -> KernelKey:
    """The Hopper backward's variant; ``varlen``: its variable-length build (CF_VARLEN, not deterministic);
    ``attn_mask`` (dense, no ALiBi): an element mask, 1 boolean or 2 additive (CF_ATTN_MASK, attn_mask.cuh);
    ``mask_stage`` (a boolean mask :func:`mask_stageable` takes): staged in shared memory by 16-byte copies
    (CF_MASK_STAGE) where the query tile is 64 rows (head dim 128; at head dim 64 the 128-row tile's buffers do
    not fit beside the rest), else ignored. ``block_sparse`` (a boolean ``attn_mask``, not deterministic):
    query tiles from block_mask.py's lists (CF_BLOCK_SPARSE, block_sparse.cuh). ``dropout`` (dense, no
    ``attn_mask``): the forward's keep mask drawn again per tile (CF_DROPOUT, philox.cuh)."""
    if deterministic and varlen:
        raise ValueError("the Hopper backward has no deterministic variable-length build")
    assert not (attn_mask and (varlen or alibi or dropout)), "attn_mask: the dense build, no ALiBi or dropout"
    assert not (dropout and varlen), "dropout: the dense build"
    assert not mask_stage or attn_mask == ATTN_MASK_KINDS["bool"], "staged masks: boolean ones"
    assert not block_sparse or (attn_mask == ATTN_MASK_KINDS["bool"] and not deterministic and not is_local), \
        "block sparsity: a boolean mask, causal / window folded in, not deterministic"
    d = padded_head_dim(head_dim)
    assert not (d in BWD_SM90_WIDE and attn_mask), "head dims 192 / 256: no element-mask build"
    bm, bn, stages = BWD_SM90_TILES[d]
    stage = mask_stage and bm == 64
    extra = ((("CF_STAGES", stages),) + ((("CF_DETERMINISTIC", 1),) if deterministic else ())
             + ((("CF_VARLEN", 1),) if varlen else ()) + ((("CF_ATTN_MASK", attn_mask),) if attn_mask else ())
             + ((("CF_MASK_STAGE", 1),) if stage else ()) + ((("CF_BLOCK_SPARSE", 1),) if block_sparse else ())
             + ((("CF_DROPOUT", 1),) if dropout else ()))
    # -O1 where -O3 spilled on sm_90a: dropout at head dim 64 or with ALiBi (above), and the head-dim-256
    # variable-length build with softcap (8-12 bytes at -O3 and -O2, none at -O1: softcap's dS keeps S^T and
    # dP^T in fp32 through the element loop beside the 128 dK^T / dV^T registers and the sequence's rows).
    opt = 1 if (dropout and (d == 64 or alibi)) or (varlen and softcap and d == 256) else 3
    return KernelKey("bwd_sm90", "attention_bwd_sm90", dtype, d, is_local, softcap, alibi, bm, bn,
                     12, extra=extra, ptxas_opt=opt)


def backward_sm90_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of attention_bwd_sm90 (mirrors cf_bwd_sm90_smem_bytes): K and V, the Q and dO
    stages, two dS^T buffers (and at head dims 192 / 256 one P^T buffer), the LSE, delta and exact-form LSE
    stages with 128 bytes of per-stage exponent flags, the two warpgroups' fp32 dQ blocks from the next
    1024-byte boundary (128-byte swizzled boxes), the mbarriers (one more at 192 / 256), a staged mask's two
    buffers per consumer warpgroup (CF_MASK_STAGE: block_m x 64 bytes each, from the next 16-byte boundary),
    1024 bytes of alignment slack."""
    stages = dict(key.extra)["CF_STAGES"]
    d, bm, bn = key.head_dim, key.block_m, key.block_n
    wide = d in BWD_SM90_WIDE
    dq_cols = (128, d - 128) if wide else (d // 2,) * 2 if bm == 64 else (d, d)
    before_dq = (2 * bn * d * 2 + 2 * stages * bm * d * 2 + (3 if wide else 2) * bn * bm * 2
                 + 3 * stages * bm * 4 + 128)
    end = -(-before_dq // 1024) * 1024 + 64 * sum(dq_cols) * 4 + 8 * (9 + wide + 3 * stages)
    if dict(key.extra).get("CF_MASK_STAGE"):
        end = -(-end // 16) * 16 + 2 * 2 * bm * 64
    return end + 1024


def all_backward_sm90_keys() -> list[KernelKey]:
    return [backward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=al, deterministic=det, varlen=vl)
            for dt in DTYPES for d in BWD_SM90_TILES for loc in (False, True)
            for sc in (False, True) for al in (False, True) for det, vl in ((False, False), (True, False),
                                                                          (False, True))] + [
        backward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=al, deterministic=det, dropout=True)
        for dt in DTYPES for d in BWD_SM90_TILES for loc in (False, True) for sc in (False, True)
        for al in (False, True) for det in (False, True)]


def all_backward_sm90_mask_keys() -> list[KernelKey]:
    """The Hopper backward's element-mask builds (dense, no ALiBi)."""
    return [backward_key_sm90(dt, d, is_local=loc, softcap=sc, alibi=False, deterministic=det, attn_mask=m,
                              mask_stage=st)
            for dt in DTYPES for d in BWD_SM90_TILES if d not in BWD_SM90_WIDE for loc in (False, True)
            for sc in (False, True) for det in (False, True) for m, st in ((1, False), (1, True), (2, False))]


def all_forward_keys() -> list[KernelKey]:
    """Every forward variant cuflash ships on GPUs with Hopper/A100-sized shared memory."""
    return all_forward_keys_for(MAX_SMEM[(9, 0)])


def all_forward_keys_for(smem_limit: int) -> list[KernelKey]:
    keys = [
        forward_key(dt, d, is_local=loc, softcap=sc, alibi=al, smem_limit=smem_limit, varlen=vl, dropout=dr)
        for dt in DTYPES
        for d in PADDED_HEAD_DIMS
        for loc in (False, True)
        for sc in (False, True)
        for al in (False, True)
        for vl, dr in ((False, False), (True, False), (False, True))
    ]
    # Paged caches take every variable-length build; split-KV decoding packs a group's query heads as rows: no
    # ALiBi, no mask (api.decode_groups), paged or not.
    keys += [forward_key(dt, d, is_local=loc, softcap=sc, alibi=al, smem_limit=smem_limit, varlen=True, paged=True)
             for dt in DTYPES for d in PADDED_HEAD_DIMS for loc in (False, True) for sc in (False, True)
             for al in (False, True)]
    # Element masks: dense, no ALiBi (api refuses a mask with ALiBi or dropout on GPU arrays).
    keys += [forward_key(dt, d, is_local=loc, softcap=sc, alibi=False, smem_limit=smem_limit, attn_mask=m)
             for dt in DTYPES for d in PADDED_HEAD_DIMS for loc in (False, True) for sc in (False, True)
             for m in ATTN_MASK_KINDS.values()]
    return keys + [forward_key(dt, d, is_local=False, softcap=sc, alibi=False, smem_limit=smem_limit, varlen=True,
                               split_kv=True, paged=pg)
                   for dt in DTYPES for d in PADDED_HEAD_DIMS for sc in (False, True) for pg in (False, True)]


def compile_arch(major: int, minor: int) -> str:
    """NVRTC target for a GPU of compute capability major.minor.

    Hopper compiles for sm_90a so one cubin serves the sm80 kernels and, later, the wgmma ones.
    """
    if (major, minor) < (8, 0):
        raise RuntimeError(
            f"cuflash needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}")
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


# The layout copy (strided_copy.cu): inputs the attention kernels cannot read in place (non-unit last stride,
# rows off 16-byte boundaries, head dims that are not multiples of 8) and outputs cropped back to such head
# dims. It moves 16-bit words, so one variant serves fp16 and bf16.
STRIDED_COPY_FAMILY = "strided_copy"
STRIDED_COPY_KEY = KernelKey(STRIDED_COPY_FAMILY, "strided_copy_16bit", "fp16", 0, warps=8)

# The state merge (merge_states.cu; cuflash.merge_attention_states): element type codes of its CF_MERGE_IN /
# CF_MERGE_OUT defines. States of one type merge into that type; more states than one launch takes
# (cf_merge_max_states) merge in rounds through fp32 states, hence the to / from fp32 variants.
MERGE_STATES_FAMILY = "merge_states"
MERGE_TYPES = {0: "float16", 1: "bfloat16", 2: "float32"}
MERGE_MAX_STATES = 16


def merge_states_key(in_dtype: str, out_dtype: str) -> KernelKey:
    """The merge variant reading states of ``in_dtype`` and writing ``out_dtype`` (float16 / bfloat16 /
    float32 names)."""
    code = {name: c for c, name in MERGE_TYPES.items()}
    return KernelKey(MERGE_STATES_FAMILY, "merge_attention_states", "fp16", 0, warps=8,
                     extra=(("CF_MERGE_IN", code[in_dtype]), ("CF_MERGE_OUT", code[out_dtype])))


def all_merge_states_keys() -> list[KernelKey]:
    pairs = [(t, t) for t in MERGE_TYPES.values()]
    pairs += [(t, "float32") for t in ("float16", "bfloat16")] + [("float32", t) for t in ("float16", "bfloat16")]
    return [merge_states_key(a, b) for a, b in pairs]


# The dropout keep mask as bytes (dropout_mask.cu; cuflash.dropout_mask for GPU arrays): the device Philox
# (philox.cuh) that the attention kernels' dropout draws with, checked against cuflash/dropout.py.
DROPOUT_MASK_FAMILY = "dropout_mask"
DROPOUT_MASK_KEY = KernelKey(DROPOUT_MASK_FAMILY, "dropout_keep_mask", "fp16", 0, warps=8)

# The KV-cache append and the variable-length indices of cuflash.attention_with_kvcache on the GPU
# (kvcache_append.cu): 16-bit words, one variant.
KVCACHE_APPEND_FAMILY = "kvcache_append"
KVCACHE_APPEND_KEY = KernelKey(KVCACHE_APPEND_FAMILY, "kvcache_append", "fp16", 0, warps=8)

# Rotary embedding of q and the new keys (rotary.cu) for attention_with_kvcache on the GPU: fp32 arithmetic
# on 16-bit values, so one variant per element type.
ROTARY_FAMILY = "rotary"
ROTARY_KEYS = {dt: KernelKey(ROTARY_FAMILY, "rotary_embedding", dt, 0, warps=8) for dt in ("fp16", "bf16")}


def all_backward_keys() -> list[KernelKey]:
    """Every backward variant cuflash ships (first-choice and fallback tiles, both dQ modes, the
    variable-length builds)."""
    keys = {}
    for dt in DTYPES:
        for d in PADDED_HEAD_DIMS:
            for loc in (False, True):
                for sc in (False, True):
                    for al in (False, True):
                        for det in (False, True):
                            for limit in (MAX_SMEM[(9, 0)], MAX_SMEM[(8, 0)]):
                                builders = (backward_keys, backward_varlen_keys,
                                            functools.partial(backward_keys, dropout=True))
                                if not al:
                                    builders += tuple(functools.partial(backward_keys, attn_mask=m)
                                                      for m in ATTN_MASK_KINDS.values())
                                for builder in builders:
                                    try:
                                        ks = builder(dt, d, is_local=loc, softcap=sc, alibi=al, deterministic=det,
                                                     smem_limit=limit)
                                    except NotImplementedError:
                                        continue
                                    for k in ks:
                                        if k is not None:
                                            keys[k.name] = k
    return list(keys.values())


def all_keys() -> list[KernelKey]:
    """Every shipped variant, all kernel families."""
    keys = {k.name: k for k in all_forward_keys()}
    for limit in (MAX_SMEM[(9, 0)], MAX_SMEM_DEFAULT):
        for k in all_forward_keys_for(limit):
            keys[k.name] = k
    for k in all_forward_sm90_keys():
        keys[k.name] = k
    for k in all_backward_keys() + all_backward_sm90_keys() + all_backward_sm90_mask_keys():
        keys[k.name] = k
    keys[STRIDED_COPY_KEY.name] = STRIDED_COPY_KEY
    for k in all_merge_states_keys():
        keys[k.name] = k
    keys[DROPOUT_MASK_KEY.name] = DROPOUT_MASK_KEY
    keys[KVCACHE_APPEND_KEY.name] = KVCACHE_APPEND_KEY
    for k in ROTARY_KEYS.values():
        keys[k.name] = k
    return list(keys.values())


# ---------------------------------------------------------------------------
# Which variants a compile target runs (what cuflash.precompile builds)
# ---------------------------------------------------------------------------

def arch_compute_capability(arch: str) -> tuple:
    """(major, minor) of the GPUs whose kernels compile for NVRTC target ``arch``: the inverse of
    :func:`compile_arch`. ``"sm_90a"`` -> (9, 0), ``"sm_86"`` -> (8, 6), ``"sm_120"`` -> (12, 0).

    Only targets the runtime itself compiles for are accepted: a cubin cached for ``"sm_90"`` would never be
    looked up (Hopper runs ``"sm_90a"``), so precompiling it would silently waste the work.
    """
    expected = "expected an NVRTC target such as 'sm_80', 'sm_86', 'sm_89', 'sm_90a', 'sm_100' or 'sm_120'"
    if not isinstance(arch, str):
        raise ValueError(f"arch={arch!r}: {expected}")
    digits = arch[3:-1] if arch.endswith("a") else arch[3:]
    if not arch.startswith("sm_") or len(digits) < 2 or not digits.isdigit():
        raise ValueError(f"arch={arch!r}: {expected}")
    major, minor = int(digits[:-1]), int(digits[-1])
    if (major, minor) < (8, 0):
        raise ValueError(f"arch={arch!r}: cuflash needs a GPU of compute capability 8.0 or newer "
                         f"(sm_80 and up); {arch} is {major}.{minor}")
    runtime = compile_arch(major, minor)
    if runtime != arch:
        raise ValueError(f"arch={arch!r}: a GPU of compute capability {major}.{minor} runs cuflash kernels "
                         f"compiled for {runtime!r}; pass arch={runtime!r}")
    return major, minor


def keys_for_arch(arch: str) -> list[KernelKey]:
    """Every variant that a GPU whose compile target is ``arch`` can run, chosen the way ops.forward and
    ops.backward choose them (that GPU's shared-memory limit decides the tiles), so that a cache filled with
    these never misses at run time.

    Compute capability 9.0 (``sm_90a``) runs both the wgmma families and the sm80 ones: views TMA cannot
    address, the element-mask backward at head dims 192/256 and CUFLASH_FWD_KERNEL/CUFLASH_BWD_KERNEL all fall
    back to sm80. Every other GPU runs the sm80 families only. Kernels of any other family in
    :func:`all_keys` (helpers such as layout copies) have no tiles to choose and run on every target.
    """
    major, minor = arch_compute_capability(arch)
    hopper = (major, minor) == (9, 0)
    limit = max_smem(major, minor)
    keys: dict = {}
    for dt in DTYPES:
        for d in PADDED_HEAD_DIMS:
            for loc in (False, True):
                for sc in (False, True):
                    for al in (False, True):
                        mods = dict(is_local=loc, softcap=sc, alibi=al)
                        found = [forward_key(dt, d, smem_limit=limit, **mods),
                                 forward_key(dt, d, smem_limit=limit, varlen=True, **mods),
                                 forward_key(dt, d, smem_limit=limit, dropout=True, **mods)]
                        # (on Hopper the sm80 builds serve the element-mask backward at head dims 192/256 and
                        # views TMA cannot describe)
                        masks = () if al else tuple(ATTN_MASK_KINDS.values())
                        found += [forward_key(dt, d, smem_limit=limit, attn_mask=m, **mods) for m in masks]
                        found.append(forward_key(dt, d, smem_limit=limit, varlen=True, paged=True, **mods))
                        if not loc and not al:  # decoding's split-KV builds (api.decode_groups)
                            found += [forward_key(dt, d, smem_limit=limit, varlen=True, split_kv=True, paged=pg,
                                                  **mods) for pg in (False, True)]
                        if hopper:
                            layouts = ((False, False), (True, False), (True, True))  # (paged, page_gather)
                            found += [forward_key_sm90(dt, d, varlen=True, paged=pg, page_gather=g, **mods)
                                      for pg, g in layouts]
                            found += [forward_key_sm90(dt, d, dropout=dr, **mods) for dr in (False, True)]
                            found += [forward_key_sm90(dt, d, attn_mask=m, **mods) for m in masks]
                            if masks:
                                found += [forward_key_sm90(dt, d, attn_mask=ATTN_MASK_KINDS["bool"],
                                                           mask_stage=True, block_sparse=bs, **mods)
                                          for bs in ((False, True) if not loc else (False,))]
                            if not loc and not al and d in FWD_SM90_SPLIT_KV_HEAD_DIMS:
                                found += [forward_key_sm90(dt, d, varlen=True, split_kv=True, paged=pg, page_gather=g,
                                                           **mods) for pg, g in layouts]
                            if d in BWD_SM90_TILES:
                                found += [backward_key_sm90(dt, d, deterministic=det, varlen=vl, **mods)
                                          for det, vl in ((False, False), (True, False), (False, True))]
                                found += [backward_key_sm90(dt, d, deterministic=det, dropout=True, **mods)
                                          for det in (False, True)]
                            if d in BWD_SM90_TILES and d not in BWD_SM90_WIDE:
                                found += [backward_key_sm90(dt, d, deterministic=det, attn_mask=m, mask_stage=st,
                                                            **mods)
                                          for det in (False, True) for m in masks
                                          for st in ((False, True) if m == ATTN_MASK_KINDS["bool"] else (False,))]
                                if masks and not loc:
                                    found.append(backward_key_sm90(dt, d, attn_mask=ATTN_MASK_KINDS["bool"],
                                                                   mask_stage=True, block_sparse=True, **mods))
                        for det in (False, True):
                            for builder in (backward_keys, backward_varlen_keys,
                                            functools.partial(backward_keys, dropout=True),
                                            *(functools.partial(backward_keys, attn_mask=m) for m in masks)):
                                try:
                                    found += builder(dt, d, deterministic=det, smem_limit=limit, **mods)
                                except NotImplementedError:  # the runtime raises the same for such a call
                                    continue
                        for k in found:
                            if k is not None:
                                keys.setdefault(k.name, k)
    for k in all_keys():
        if k.family not in ATTENTION_FAMILIES:
            keys.setdefault(k.name, k)
    return list(keys.values())


# The tiled attention kernels, whose variants keys_for_arch picks per target; other families are helpers.
ATTENTION_FAMILIES = frozenset({"fwd_sm80", "fwd_sm90", "bwd_sm80", "bwd_sm90", "bwd_prepost", "bwd_dq_sm80"})
