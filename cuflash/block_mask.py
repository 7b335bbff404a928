"""Block-sparse attention masks in FlexAttention's layout (``cuflash.BlockMask``).

A query block of ``block_size[0]`` rows sees, per (batch, head), two lists of key blocks of
``block_size[1]`` keys: *full* blocks, every element of which is attended, and *partial* blocks, whose
elements an element mask decides (a dense boolean array, or a function ``fn(b, h, q_idx, kv_idx)``); every
other block is skipped. The int32 arrays are FlexAttention's (torch.nn.attention.flex_attention.BlockMask):

    kv_num_blocks (B, H, nQ), kv_indices (B, H, nQ, nKV)                 partial key blocks per query block
    full_kv_num_blocks (B, H, nQ), full_kv_indices (B, H, nQ, nKV)       full key blocks (optional)
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices           the same lists per key block (the
                                                                         backward's walk), built here

B and H may be 1 (broadcast over batch / heads). Without full lists, the partial lists hold every block a
query block sees.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK_SIZE = 128  # the kernels' key-tile width on sm80 and sm90


def _block_sizes(block_size) -> tuple:
    """(query, key) block sizes from an int or a pair, both positive ints; ValueError naming block_size."""
    pair = (block_size, block_size) if np.isscalar(block_size) else tuple(block_size)
    if len(pair) != 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                                 for n in pair):
        raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def _lists(table: np.ndarray):
    """(num, indices) of the True columns of a (..., n_rows, n_cols) bool table, ascending, zero-padded."""
    num = table.sum(-1, dtype=np.int32)
    order = np.argsort(~table, axis=-1, kind="stable").astype(np.int32)  # True columns first, in order
    idx = np.where(np.arange(table.shape[-1]) < num[..., None], order, 0).astype(np.int32)
    return num, idx


def _table(num, idx, n_cols):
    """The bool (..., n_rows, n_cols) table of a (num, indices) pair of lists."""
    num, idx = np.asarray(num), np.asarray(idx)
    valid = np.arange(idx.shape[-1]) < num[..., None]
    table = np.zeros(idx.shape[:-1] + (n_cols + 1,), dtype=bool)  # column n_cols takes the unused slots
    np.put_along_axis(table, np.where(valid, idx, n_cols), True, axis=-1)
    return table[..., :n_cols]


class BlockMask:
    """Which key blocks each query block attends (full or through an element mask); see the module docstring.

    Parameters
    ----------
    kv_num_blocks, kv_indices : int arrays (B, H, nQ) and (B, H, nQ, nKV)
        Partial key blocks of each query block (with an element mask), or every visible block when the full
        lists are omitted.
    full_kv_num_blocks, full_kv_indices : int arrays, optional
        Key blocks every element of which is attended.
    block_size : int or (int, int)
        Query and key block sizes (default 128).
    seq_lengths : (int, int)
        ``(seqlen_q, seqlen_k)`` the mask was made for.
    mask : bool array broadcastable to (B, H, seqlen_q, seqlen_k), or callable, optional
        The element mask of partial blocks: a dense array, or ``fn(b, h, q_idx, kv_idx)`` taking broadcastable
        integer NumPy arrays (torch tensors for a FlexAttention ``mask_mod``) and returning bools. None:
        partial blocks are attended whole.

    Raises
    ------
    TypeError, ValueError
        Arrays of the wrong rank, sizes that do not match the block grid, indices out of range.
    """

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, *,
                 block_size=DEFAULT_BLOCK_SIZE, seq_lengths, mask=None):
        self.block_size = _block_sizes(block_size)
        self.seq_lengths = tuple(int(n) for n in seq_lengths)
        sq, sk = self.seq_lengths
        self.num_q_blocks, self.num_kv_blocks = -(-sq // self.block_size[0]), -(-sk // self.block_size[1])
        self.kv_num_blocks, self.kv_indices = self._check_lists("kv", kv_num_blocks, kv_indices)
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices go together (pass both or neither)")
        self.full_kv_num_blocks = self.full_kv_indices = None
        if full_kv_num_blocks is not None:
            self.full_kv_num_blocks, self.full_kv_indices = self._check_lists("full_kv", full_kv_num_blocks,
                                                                              full_kv_indices)
            if self.full_kv_num_blocks.shape[:2] != self.kv_num_blocks.shape[:2]:
                raise ValueError(f"full_kv_num_blocks has (B, H) = {self.full_kv_num_blocks.shape[:2]} but "
                                 f"kv_num_blocks {self.kv_num_blocks.shape[:2]}; they must be the same")
        if mask is not None and not callable(mask):
            m = np.asarray(mask)
            if m.dtype != np.bool_:
                raise TypeError(f"mask must be a bool array (True = attend) or a callable, got dtype {m.dtype}")
            if not 2 <= m.ndim <= 4 or any(n not in (1, want) for n, want in zip(m.shape[-2:], (sq, sk))):
                raise ValueError(f"mask must broadcast to (B, H, seqlen_q, seqlen_k) with (seqlen_q, seqlen_k) = "
                                 f"({sq}, {sk}), got shape {m.shape}")
        self.mask = mask
        self._partial = _table(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)
        self._full = (np.zeros_like(self._partial) if self.full_kv_num_blocks is None
                      else _table(self.full_kv_num_blocks, self.full_kv_indices, self.num_kv_blocks))
        if mask is None:  # partial blocks attended whole: they are full
            self._full, self._partial = self._full | self._partial, np.zeros_like(self._partial)
        self._partial &= ~self._full
        swap = lambda t: np.swapaxes(t, -1, -2)  # noqa: E731
        self.q_num_blocks, self.q_indices = _lists(swap(self._partial))
        self.full_q_num_blocks, self.full_q_indices = _lists(swap(self._full))

    def _check_lists(self, name, num, idx):
        num, idx = np.asarray(num), np.asarray(idx)
        if num.ndim != 3 or idx.ndim != 4 or idx.shape[:3] != num.shape:
            raise ValueError(f"{name}_num_blocks must be (B, H, nQ) and {name}_indices (B, H, nQ, nKV) with the same "
                             f"(B, H, nQ), got {num.shape} and {idx.shape}")
        if not (np.issubdtype(num.dtype, np.integer) and np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"{name}_num_blocks and {name}_indices must be integer arrays, got {num.dtype}, {idx.dtype}")
        if num.shape[2] != self.num_q_blocks:
            raise ValueError(f"{name}_num_blocks has {num.shape[2]} query blocks; seqlen_q {self.seq_lengths[0]} in "
                             f"blocks of {self.block_size[0]} makes {self.num_q_blocks}")
        if ((num < 0) | (num > idx.shape[3])).any():
            raise ValueError(f"{name}_num_blocks must be in [0, {idx.shape[3]}]")
        valid = np.arange(idx.shape[3]) < num[..., None]
        if (valid & ((idx < 0) | (idx >= self.num_kv_blocks))).any():
            raise ValueError(f"{name}_indices must be key-block indices in [0, {self.num_kv_blocks})")
        return num.astype(np.int32), idx.astype(np.int32)

    @property
    def shape(self) -> tuple:
        """(B, H, seqlen_q, seqlen_k), B and H possibly 1 (broadcast)."""
        return self.kv_num_blocks.shape[:2] + self.seq_lengths

    def __repr__(self) -> str:
        b, h = self.shape[:2]
        visible = (self._full | self._partial).mean() if self._full.size else 0.0
        return (f"BlockMask(shape=({b}, {h}, {self.seq_lengths[0]}, {self.seq_lengths[1]}), block_size="
                f"{self.block_size}, visible blocks {visible:.1%}, element mask={self.mask is not None})")

    def visible_fraction(self) -> float:
        """Fraction of (query block, key block) pairs attended at all."""
        return float((self._full | self._partial).mean()) if self._full.size else 0.0

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, mask, block_size=DEFAULT_BLOCK_SIZE) -> "BlockMask":
        """The block mask of a dense bool mask (True = attend), shape (B, H, seqlen_q, seqlen_k) with B and H
        possibly 1 (or (seqlen_q, seqlen_k)). Blocks all True become full, blocks partly True partial (the
        dense mask decides their elements), blocks all False are skipped."""
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise TypeError(f"mask must be bool (True = attend), got {m.dtype}")
        if m.ndim == 2:
            m = m[None, None]
        if m.ndim != 4:
            raise ValueError(f"mask must be (B, H, seqlen_q, seqlen_k) or (seqlen_q, seqlen_k), got shape {m.shape}")
        bq, bk = _block_sizes(block_size)
        anyb, allb = _block_reduce(m, bq, bk)
        return cls._from_tables(anyb & ~allb, allb, (bq, bk), m.shape[2:], m)

    @classmethod
    def from_mask_fn(cls, fn, batch, heads, seqlen_q, seqlen_k, block_size=DEFAULT_BLOCK_SIZE) -> "BlockMask":
        """The block mask of ``fn(b, h, q_idx, kv_idx)`` (evaluated on broadcastable int64 NumPy index arrays,
        one query block at a time; ``batch`` / ``heads`` may be 1 or None, as FlexAttention's
        ``create_block_mask`` takes them, when the block lists may broadcast: the lists are then those of
        batch / head 0, while partial blocks still evaluate ``fn`` at each real index). ``fn`` stays the element
        mask of partial blocks."""
        bq, bk = _block_sizes(block_size)
        batch, heads = (1 if n is None else n for n in (batch, heads))
        b = np.arange(batch)[:, None, None, None]
        h = np.arange(heads)[None, :, None, None]
        kv = np.arange(seqlen_k)[None, None, None, :]
        n_q, n_kv = -(-seqlen_q // bq), -(-seqlen_k // bk)
        anyb = np.zeros((batch, heads, n_q, n_kv), bool)
        allb = np.zeros_like(anyb)
        for i in range(n_q):
            q = np.arange(i * bq, min((i + 1) * bq, seqlen_q))[None, None, :, None]
            m = np.broadcast_to(np.asarray(fn(b, h, q, kv), dtype=bool), (batch, heads, q.shape[2], seqlen_k))
            a, z = _block_reduce(m, bq, bk)
            anyb[:, :, i], allb[:, :, i] = a[:, :, 0], z[:, :, 0]
        return cls._from_tables(anyb & ~allb, allb, (bq, bk), (seqlen_q, seqlen_k), fn)

    @classmethod
    def from_flex(cls, block_mask) -> "BlockMask":
        """A torch FlexAttention ``BlockMask`` (its int32 lists, block sizes, sequence lengths and
        ``mask_mod``), read without copying when its tensors are on the CPU."""
        def arr(t):
            return None if t is None else t.detach().cpu().numpy()
        return cls(arr(block_mask.kv_num_blocks), arr(block_mask.kv_indices), arr(block_mask.full_kv_num_blocks),
                   arr(block_mask.full_kv_indices), block_size=tuple(block_mask.BLOCK_SIZE),
                   seq_lengths=tuple(block_mask.seq_lengths), mask=_TorchMaskMod(block_mask.mask_mod))

    @classmethod
    def _from_tables(cls, partial, full, block_size, seq_lengths, mask):
        num, idx = _lists(partial)
        fnum, fidx = _lists(full)
        return cls(num, idx, fnum, fidx, block_size=block_size, seq_lengths=seq_lengths, mask=mask)

    # -- evaluation -----------------------------------------------------------------------------------------

    def check_for(self, batch, heads_q, seqlen_q, seqlen_k) -> None:
        """Raises ValueError unless this mask, its element mask included, applies to a (batch, heads_q,
        seqlen_q, seqlen_k) problem."""
        b, h = self.shape[:2]
        if (b not in (1, batch) or h not in (1, heads_q) or self.seq_lengths != (seqlen_q, seqlen_k)):
            raise ValueError(f"block_mask is for shape {self.shape} (B, H may be 1); the problem is "
                             f"({batch}, {heads_q}, {seqlen_q}, {seqlen_k})")
        if self.mask is not None and not callable(self.mask):
            mb, mh = self._mask_4d().shape[:2]
            if mb not in (1, batch) or mh not in (1, heads_q):
                raise ValueError(f"block_mask's element mask has (B, H) = ({mb}, {mh}); the problem's (batch, heads_q) "
                                 f"is ({batch}, {heads_q}) (each may be 1)")

    def dense_tile(self, b, h, rows, cols) -> np.ndarray:
        """The element mask of rows ``rows[0]:rows[1]``, keys ``cols[0]:cols[1]`` for the problem's (batch,
        head) index arrays ``b``, ``h`` (same shape S): bool S + (n_rows, n_cols). Lists with B or H of 1 apply
        to every batch or head; the element mask of partial blocks is taken at the real (b, h) (as
        FlexAttention calls ``mask_mod``), a dense one through its own broadcasting."""
        b, h = np.asarray(b), np.asarray(h)
        tb = b % self._full.shape[0] if self._full.shape[0] == 1 else b
        th = h % self._full.shape[1] if self._full.shape[1] == 1 else h
        i = np.arange(*rows)
        j = np.arange(*cols)
        qb, kb = i // self.block_size[0], j // self.block_size[1]
        sel = (tb[..., None, None], th[..., None, None], qb[:, None], kb[None, :])
        out = self._full[sel]
        partial = self._partial[sel]
        if partial.any():
            if callable(self.mask):
                elem = np.asarray(self.mask(b[..., None, None], h[..., None, None], i[:, None], j[None, :]), bool)
            else:
                m = self._mask_4d()
                bb = b % m.shape[0] if m.shape[0] == 1 else b
                hh = h % m.shape[1] if m.shape[1] == 1 else h
                elem = m[bb[..., None, None], hh[..., None, None], i[:, None], j[None, :]]
            out = out | (partial & np.broadcast_to(elem, partial.shape))
        return out

    def _mask_4d(self) -> np.ndarray:
        m = np.asarray(self.mask)
        return m.reshape((1,) * (4 - m.ndim) + m.shape)

    def to_dense(self, batch=None, heads=None) -> np.ndarray:
        """The full element mask, bool (batch, heads, seqlen_q, seqlen_k); ``batch`` / ``heads`` default to the
        lists' B / H (which may be 1), and must be given where the element mask depends on the batch or head
        index while the lists broadcast (for tests and small problems)."""
        b = self.shape[0] if batch is None else int(batch)
        h = self.shape[1] if heads is None else int(heads)
        return self.dense_tile(np.arange(b)[:, None] + np.zeros((1, h), int), np.zeros((b, 1), int) + np.arange(h),
                               (0, self.seq_lengths[0]), (0, self.seq_lengths[1]))


def checked(block_mask, batch, heads_q, seqlen_q, seqlen_k, on_gpu) -> BlockMask:
    """``block_mask`` as a :class:`BlockMask` (a torch FlexAttention one converted) made for a (batch, heads_q,
    seqlen_q, seqlen_k) problem. Raises TypeError / ValueError naming it, and NotImplementedError for GPU
    arrays (the kernels do not skip key blocks yet)."""
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "mask_mod"):
            block_mask = BlockMask.from_flex(block_mask)
        else:
            raise TypeError(f"block_mask must be a cuflash.BlockMask (or a torch FlexAttention BlockMask), got "
                            f"{type(block_mask).__name__}")
    block_mask.check_for(batch, heads_q, seqlen_q, seqlen_k)
    if on_gpu:
        raise NotImplementedError("block_mask is not implemented for GPU arrays yet (the kernels do not skip key "
                                  "blocks); the CPU path (NumPy arrays, torch CPU tensors) has it")
    return block_mask


class _TorchMaskMod:
    """A FlexAttention ``mask_mod`` called with NumPy index arrays: converted to torch tensors and back."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, b, h, q, kv):
        import torch
        out = self.fn(*(torch.from_numpy(np.ascontiguousarray(np.broadcast_to(x, np.broadcast_shapes(
            np.shape(b), np.shape(h), np.shape(q), np.shape(kv))))) for x in (b, h, q, kv)))
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def _block_reduce(m, bq, bk):
    """(any, all) of a bool (B, H, sq, sk) array over (bq, bk) blocks (edge blocks: their real elements)."""
    bsz, hsz, sq, sk = m.shape
    nq, nk = -(-sq // bq), -(-sk // bk)
    pad_any = np.zeros((bsz, hsz, nq * bq, nk * bk), bool)
    pad_all = np.ones_like(pad_any)
    pad_any[:, :, :sq, :sk] = m
    pad_all[:, :, :sq, :sk] = m
    shape = (bsz, hsz, nq, bq, nk, bk)
    return pad_any.reshape(shape).any(axis=(3, 5)), pad_all.reshape(shape).all(axis=(3, 5))
