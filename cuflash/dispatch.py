"""Which kernel variant runs a call: the specialization key and the tile configuration.

A :class:`KernelKey` names one compiled variant, e.g. ``fwd_sm80_bf16_d128_local_br128_bc64_w4``. The same
string names the disk-cache entry, the compile log line and error messages. Nothing here touches a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Head dims compiled natively; any other multiple of 8 up to 256 runs on the next one up with the extra
# columns zero-filled inside the kernel (no copy of the inputs).
PADDED_HEAD_DIMS = (64, 128, 192, 256)
DTYPES = ("fp16", "bf16")

# Forward tiles for the sm80 kernel: head dim -> (block_m, block_n, warps, min CTAs per SM). 128 query rows per CTA keep
# the shared K/V tiles reused by 128 rows; the key tile shrinks as the head dim grows so that S (32 rows x
# block_n per warp at 4 warps) and O stay within 255 registers without spilling.
FWD_SM80_TILES = {
    64: (128, 128, 4, 1),
    128: (128, 64, 4, 1),
    192: (128, 64, 8, 1),
    256: (128, 64, 8, 1),
}


def padded_head_dim(head_dim: int) -> int:
    """The compiled head dim that serves ``head_dim`` (a multiple of 8 in [8, 256])."""
    for d in PADDED_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim={head_dim} exceeds the largest supported head dim 256")


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

    @property
    def name(self) -> str:
        parts = [self.family, self.dtype, f"d{self.head_dim}"]
        if self.is_local:
            parts.append("local")
        if self.softcap:
            parts.append("softcap")
        if self.alibi:
            parts.append("alibi")
        parts += [f"{k.lower()}{v}" for k, v in self.extra]
        parts += [f"br{self.block_m}", f"bc{self.block_n}", f"w{self.warps}"]
        if self.min_blocks > 1:
            parts.append(f"mb{self.min_blocks}")
        return "_".join(parts)

    @property
    def source(self) -> str:
        return f"attention/{self.family}.cu"

    @property
    def threads(self) -> int:
        return self.warps * 32

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


def _tile_overrides() -> dict:
    """``CUFLASH_FWD_TILES="128=64x64x4,256=128x64x8x1"``: per padded head dim, block_m x block_n x warps
    (x minimum resident CTAs per SM, a register-allocation hint; default 1).

    A tuning knob for benchmarking other tile shapes without editing the package.
    """
    spec = os.environ.get("CUFLASH_FWD_TILES", "")
    out = {}
    for item in filter(None, spec.split(",")):
        try:
            d, tiles = item.split("=")
            nums = [int(x) for x in tiles.split("x")]
            if len(nums) == 3:
                nums.append(1)
            bm, bn, w, mb = nums
            out[int(d)] = (bm, bn, w, mb)
        except ValueError:
            raise ValueError(f"CUFLASH_FWD_TILES entry {item!r} is not HEADDIM=BMxBNxWARPS") from None
    return out


def forward_key(dtype: str, head_dim: int, *, is_local: bool, softcap: bool, alibi: bool) -> KernelKey:
    d = padded_head_dim(head_dim)
    bm, bn, warps, min_blocks = _tile_overrides().get(d) or FWD_SM80_TILES[d]
    return KernelKey("fwd_sm80", "attention_fwd_sm80", dtype, d, is_local, softcap, alibi, bm, bn, warps, min_blocks)


def forward_smem_bytes(key: KernelKey) -> int:
    """Dynamic shared memory of the sm80 forward: the Q tile plus one K and one V tile, 16-bit."""
    return 2 * key.head_dim * (key.block_m + 2 * key.block_n)


def all_forward_keys() -> list[KernelKey]:
    """Every forward variant cuflash ships (what CI compiles for each architecture)."""
    return [
        forward_key(dt, d, is_local=loc, softcap=sc, alibi=al)
        for dt in DTYPES
        for d in PADDED_HEAD_DIMS
        for loc in (False, True)
        for sc in (False, True)
        for al in (False, True)
    ]


def compile_arch(major: int, minor: int) -> str:
    """NVRTC target for a GPU of compute capability major.minor.

    Hopper compiles for sm_90a so one cubin serves the sm80 kernels and, later, the wgmma ones.
    """
    if (major, minor) < (8, 0):
        raise RuntimeError(
            f"cuflash needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}")
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def all_keys() -> list[KernelKey]:
    """Every shipped variant, all kernel families."""
    return all_forward_keys()
