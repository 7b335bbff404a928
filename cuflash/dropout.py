"""Attention dropout's keep mask: one counter-based draw per score element, the same in every tiling.

FlashAttention drops attention probabilities inside the fused kernel and, instead of storing the mask,
replays it in the backward from the random generator's state (the paper's Algorithms 2 and 4). With a
counter-based generator the draw of element (b, h, i, j) is a pure function of the seed, the offset and
those four indices, so any tile order (forward or backward, NumPy or a GPU kernel) gets the same mask.

Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), the generator FlashAttention-2 and torch's CUDA dropout use. Element (b, h, i, j) of a call with
``heads`` query heads reads

    counter = (j // 8, i, b * heads + h, offset mod 2**32)
    key     = (seed mod 2**32, (seed >> 32) xor (offset >> 32))

and takes the 16-bit half ``(j % 8) % 2`` (low half first) of output word ``(j % 8) // 2``: one Philox call
serves eight neighbouring keys of a row. The element is kept iff that 16-bit value is below
``round((1 - p) * 65536)``, so the keep probability is ``1 - p`` to within 2**-17, and kept probabilities
are scaled by ``1 / (1 - p)``. The key takes the offset's high word xor the seed's, so (seed, offset) and
(seed ^ d << 32, offset ^ d << 32) draw the same mask: calls that must differ should differ in the seed's or
the offset's low word (a fresh random seed per call, as cuflash.torch draws, does).
"""

from __future__ import annotations

import numbers

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85                         # key schedule (Weyl) increments
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)
KEYS_PER_DRAW = 8  # 16-bit values of one Philox call: the keys j = 8c .. 8c + 7 of a row


def philox4x32_10(counter, key):
    """Philox4x32-10 of each counter.

    Parameters
    ----------
    counter : sequence of 4 integer arrays (broadcastable), the 32-bit counter words c0..c3
    key : pair of ints, the 32-bit key words k0, k1

    Returns
    -------
    Four uint32 arrays, the output words (Random123's known answers: counter 0, key 0 gives 0x6627e8d5,
    0xe169c58d, 0xbc57ac4c, 0x9b00dbd8).
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(_ROUNDS):
        p0, p1 = _M0 * c0, _M1 * c2          # 32 x 32 -> 64-bit products, exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        if r < _ROUNDS - 1:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def keep_threshold(dropout_p: float) -> int:
    """The 16-bit draws below this value keep their element: ``round((1 - p) * 65536)``."""
    return int(round((1.0 - float(dropout_p)) * 65536.0))


def check_seed(name: str, value) -> int:
    """A dropout seed or offset: an int in [0, 2**64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def keep_tile(seed: int, offset: int, dropout_p: float, bh, rows, cols) -> np.ndarray:
    """The keep mask of a tile: rows ``rows[0] .. rows[1] - 1`` and keys ``cols[0] .. cols[1] - 1`` of each
    ``b * heads + h`` in the integer array ``bh`` (any shape S). Returns bool, shape S + (n_rows, n_cols)."""
    bh = np.asarray(bh, dtype=np.uint64)
    i0, i1 = rows
    j0, j1 = cols
    if i1 <= i0 or j1 <= j0 or bh.size == 0:  # an empty tile (a sequence without queries or keys)
        return np.zeros(bh.shape + (max(i1 - i0, 0), max(j1 - j0, 0)), bool)
    g0, g1 = j0 // KEYS_PER_DRAW, -(-j1 // KEYS_PER_DRAW)
    lead = bh.shape
    c0 = np.arange(g0, g1, dtype=np.uint64)
    c1 = np.arange(i0, i1, dtype=np.uint64)[:, None]
    c2 = bh.reshape(lead + (1, 1))
    words = philox4x32_10((c0, c1, c2, np.uint64(offset & 0xFFFFFFFF)),
                          (seed & 0xFFFFFFFF, (seed >> 32) ^ (offset >> 32)))
    # (..., rows, groups, 4 words) -> (..., rows, groups, 8 halves): low half of word w is key 8c + 2w.
    w = np.stack(np.broadcast_arrays(*words), axis=-1)
    halves = np.stack((w & 0xFFFF, w >> 16), axis=-1).reshape(w.shape[:-1] + (KEYS_PER_DRAW,))
    draws = halves.reshape(halves.shape[:-2] + (-1,))[..., j0 - g0 * KEYS_PER_DRAW:j1 - g0 * KEYS_PER_DRAW]
    return draws < keep_threshold(dropout_p)


def dropout_mask(batch, heads, seqlen_q, seqlen_k, *, dropout_p, dropout_seed, dropout_offset=0, like=None):
    """The keep mask that :func:`cuflash.attention` applies for these arguments (True = kept).

    Parameters
    ----------
    batch, heads, seqlen_q, seqlen_k : int
        The problem's sizes (``heads`` = query heads).
    dropout_p : float in [0, 1)
        Drop probability.
    dropout_seed, dropout_offset : int in [0, 2**64)
        As passed to :func:`cuflash.attention`.
    like : array, optional
        A GPU array (CuPy, torch, JAX or any DLPack producer): the mask is drawn on its device, by the device
        generator the kernels use (kernels_cu/attention/philox.cuh), on the caller's current stream, and comes
        back as a bool array of its type (NumPy's ``like=`` convention). Without it, or for a CPU array, NumPy.

    Returns
    -------
    bool array, shape (batch, heads, seqlen_q, seqlen_k): NumPy, or ``like``'s type on its device.
    """
    from .api import _check_probability
    seed, offset = check_seed("dropout_seed", dropout_seed), check_seed("dropout_offset", dropout_offset)
    dropout_p = _check_probability(dropout_p)
    for name, n in zip(("batch", "heads", "seqlen_q", "seqlen_k"), (batch, heads, seqlen_q, seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    batch, heads, seqlen_q, seqlen_k = (int(n) for n in (batch, heads, seqlen_q, seqlen_k))
    if like is not None:
        from . import arrays
        fw = arrays.framework_of(like)
        device = arrays.device_of(like, fw)
        if isinstance(device, int):
            return _mask_on_device(fw, device, (batch, heads, seqlen_q, seqlen_k), dropout_p, seed, offset)
    bh = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads)
    return keep_tile(seed, offset, dropout_p, bh, (0, seqlen_q), (0, seqlen_k))


def _mask_on_device(fw, device, shape, dropout_p, seed, offset):
    """dropout_mask drawn by dropout_mask.cu into a bool array of framework ``fw`` on GPU ``device``."""
    from . import api, arrays, ops
    stream = arrays.current_stream(fw, device)
    with arrays.device_scope(fw, device):
        native, mask = arrays.empty(fw, shape, "bool", device, stream)
        ops.dropout_mask(mask, seed=seed, offset=offset, threshold=keep_threshold(dropout_p), stream=stream,
                         cc=api._cc(device))
        return arrays.to_caller(native, mask, fw, stream)
