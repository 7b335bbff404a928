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

:meth:`BlockMask.kernel_tables` turns the block lists into what the GPU kernels walk (:class:`KernelTables`):
per (batch, head, tile) of a kernel's grid the tiles of the other side to visit, at the kernel's own tile
granularity, with causal / window visibility folded in, and a store of the element masks of partial blocks.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np

DEFAULT_BLOCK_SIZE = 128  # the kernels' key-tile width on sm80 and sm90

# Element masks are evaluated this many elements at a time (at most _STORE_CHUNK_BLOCKS blocks): the mask
# function's int64 temporaries (1 MiB) stay in cache and NumPy's per-call cost is still spread over 8 blocks of
# 128 x 128. Measured on a 16k x 16k mask: 4M-element chunks 1.8x slower; 256k-element ones (2 MiB temporaries)
# up to 3x slower, apparently fresh pages on every allocation.
_STORE_CHUNK_ELEMENTS = 1 << 17
_STORE_CHUNK_BLOCKS = 256
_RETIRED: list = []  # device caches of dropped masks, freed at the next upload (BlockMask.device_tables)
_FLEX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # FlexAttention BlockMask -> its conversion
_EMPTY, _FULL = -2, -1  # codes of a block / tile in the (.., n_rows, n_cols) code tables; >= 0: store index
_TILE_BITS = 16  # the backward packs (g << 16) | mt into one int32
_MAX_GROUP = 1 << 14


@dataclasses.dataclass(frozen=True, eq=False)
class KernelTables:
    """The block-sparse tables of one kernel launch (:meth:`BlockMask.kernel_tables`), host NumPy arrays,
    read-only (they are cached on the :class:`BlockMask`; copy before changing them).

    Attributes
    ----------
    store : uint8 ndarray (P, block_q, block_k), C-contiguous
        Element masks of partial blocks (1 = attend; rows / columns past the sequence 0). P >= 1: an
        all-zero block where no block needs one, so the device pointer is always valid.
    lists : int32 ndarray (R, list_len, 2)
        Row ``r = b * batch_stride + h * head_stride + tile``: the tiles to visit, ``counts[r]`` of them, then
        zeros. Forward: ``h`` the query head, ``tile`` the query tile ``mt``, entries ``(nt, pidx)`` with the key
        tile ``nt`` ascending. Backward: ``h`` the KV head, ``tile`` the key tile ``nt``, entries
        ``((g << 16) | mt, pidx)`` for the query heads ``h * group + g`` of the group, ``g`` then ``mt``
        ascending. ``pidx``: the index in ``store`` of the tile's block mask, -1 where the tile is attended
        whole.
    counts : int32 ndarray (R,)
        Entries of each row.
    order : int32 ndarray (batch * heads * tiles,)
        Launch order of the kernel's grid cells ``(b * heads + h) * tiles + tile`` (heads: query heads forward,
        KV heads backward; tiles: query tiles forward, key tiles backward): lists over twice the mean length
        first, longest first, then the others in cell order.
    batch_stride, head_stride : int
        Rows per batch / head index; 0 where the tables broadcast over it.
    list_len : int
        Entries per row, >= 1.
    block_q, block_k : int
        The mask's block sizes (the store's block shape).
    """

    store: np.ndarray
    lists: np.ndarray
    counts: np.ndarray
    batch_stride: int
    head_stride: int
    list_len: int
    block_q: int
    block_k: int
    order: np.ndarray


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
        lengths = tuple(seq_lengths)
        if len(lengths) != 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0
                                        for n in lengths):
            raise ValueError(f"seq_lengths must be (seqlen_q, seqlen_k), two ints >= 0, got {seq_lengths!r}")
        self.seq_lengths = tuple(int(n) for n in lengths)
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
        # kernel_tables' caches: evaluating the element mask is the expensive part and depends only on the
        # problem's (batch, heads_q); the tables depend on every argument.
        # (batch, heads_q) -> the partial store; (batch, heads_q, window_left, window_right) -> the folded one.
        self._store_cache = {}
        self._tables_cache = {}
        self._device_cache = {}  # (device, host array id) -> (host, device array)
        # A mask dropped while a kernel on another stream still reads its uploads must not hand their memory to
        # the next upload (CuPy's pool reuses it at once, on the null stream): it goes to _RETIRED instead,
        # which the next upload frees after synchronizing the device.
        weakref.finalize(self, _RETIRED.append, self._device_cache)

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
            r = np.asarray(fn(b, h, q, kv))
            if r.dtype != np.bool_:  # (a score-style 0 / -inf function would otherwise come out inverted)
                raise TypeError(f"fn must return bools (True = attend), got dtype {r.dtype}")
            try:
                m = np.broadcast_to(r, (batch, heads, q.shape[2], seqlen_k))
            except ValueError:
                raise ValueError(f"fn(b, h, q_idx, kv_idx) returned shape {r.shape}, which does not broadcast to "
                                 f"(batch, heads, query block, seqlen_k) = {(batch, heads, q.shape[2], seqlen_k)}"
                                 ) from None
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

    # -- kernel tables -----------------------------------------------------------------------------------------

    def kernel_tables(self, *, batch, heads_q, heads_k, direction, tile_m, tile_n, window_left,
                      window_right) -> KernelTables:
        """The tables a block-sparse kernel walks, at its tile granularity (host arrays; the caller uploads).

        A kernel tile ``(mt, nt)`` (query rows ``mt * tile_m`` on, keys ``nt * tile_n`` on) lies inside the block
        ``(mt * tile_m // block_q, nt * tile_n // block_k)`` and is listed only where that block is attended
        (full, or partial with an element mask not all False on the tile) and some query of the tile may see
        some key of it: with ``off = seqlen_k - seqlen_q``, query i sees key j iff ``i + off - window_left <= j
        <= i + off + window_right``. Visibility is folded into the element masks too (blocks the window cuts get
        a store entry of their mask AND visibility), so the kernels apply none of their own.

        Parameters
        ----------
        batch, heads_q, heads_k : int
            The problem's batch size and query / KV heads (``heads_q % heads_k == 0``); ``batch`` and
            ``heads_q`` must match the lists' B and H where those are not 1.
        direction : {"fwd", "bwd"}
            "fwd": one row per (batch, query head, query tile) listing key tiles; "bwd": one row per (batch,
            KV head, key tile) listing (query head of the group, query tile) pairs.
        tile_m, tile_n : int
            The kernel's query-tile rows and key-tile columns; they must divide ``block_size``.
        window_left, window_right : int
            The visibility window (causal: ``window_right = 0``; unbounded: ``seqlen_q + seqlen_k``).

        Returns
        -------
        KernelTables
            Cached on this mask per argument tuple (the partial-block store per (batch, heads_q)).

        Raises
        ------
        ValueError
            Tiles that do not divide the blocks, a problem the mask does not apply to, ``heads_q`` not a multiple
            of ``heads_k``, an unknown direction, or (backward) a query-tile index over 16 bits or a group
            over 2**14 heads.

        Notes
        -----
        The tables broadcast over the batch (``batch_stride`` 0) where the lists' B is 1 and the element mask
        does not depend on the batch (None, or a dense mask of batch dim 1); likewise over heads. A callable
        element mask may depend on (b, h), so it is evaluated at every real (b, h). A partial block whose element
        mask is all True over its real elements is treated as full, one all False as empty; identical partial
        masks share one store entry. At tile level, a tile of a partial block whose mask is all False there is
        dropped, and one whose mask is all True there (inside the sequence) gets pidx -1.
        """
        ints = dict(batch=batch, heads_q=heads_q, heads_k=heads_k, tile_m=tile_m, tile_n=tile_n,
                    window_left=window_left, window_right=window_right)
        for name, v in ints.items():
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if direction not in ("fwd", "bwd"):
            raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
        batch, heads_q, heads_k, tile_m, tile_n, window_left, window_right = (int(v) for v in ints.values())
        key = (batch, heads_q, heads_k, direction, tile_m, tile_n, window_left, window_right)
        hit = self._tables_cache.get(key)
        if hit is not None:
            return hit
        for name in ("batch", "heads_q", "heads_k", "tile_m", "tile_n"):
            if ints[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {ints[name]}")
        for name in ("window_left", "window_right"):
            if ints[name] < 0:
                raise ValueError(f"{name} must be >= 0 (unbounded: seqlen_q + seqlen_k), got {ints[name]}")
        bq, bk = self.block_size
        if bq % tile_m or bk % tile_n:
            raise ValueError(f"the kernel's tiles ({tile_m}, {tile_n}) must divide the mask's block_size ({bq}, {bk}) "
                             f"(block_size[0] % tile_m == 0 and block_size[1] % tile_n == 0)")
        if heads_q % heads_k:
            raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_k ({heads_k})")
        sq, sk = self.seq_lengths
        self.check_for(batch, heads_q, sq, sk)
        n_mt, n_nt = -(-sq // tile_m), -(-sk // tile_n)
        group = heads_q // heads_k
        if direction == "bwd" and (n_mt > 1 << _TILE_BITS or group > _MAX_GROUP):
            raise ValueError(f"the backward's tables pack (g << {_TILE_BITS}) | mt: {n_mt} query tiles (at most "
                             f"{1 << _TILE_BITS}) and a group of {group} query heads per KV head (at most "
                             f"{_MAX_GROUP})")

        key_fold = (batch, heads_q, window_left, window_right)  # (forward and backward share one folded store)
        folded = self._store_cache.get(key_fold)
        if folded is None:
            folded = self._store_cache[key_fold] = self._fold_visibility(*self._partial_store(batch, heads_q),
                                                                         window_left, window_right)
        store, code = folded
        tiles = self._tile_codes(store, code, tile_m, tile_n, window_left, window_right)
        bg, hg = code.shape[:2]
        if direction == "fwd":
            # Rows (bg, hg, mt), entries over nt: the code table's own layout.
            per_head = n_mt
            rows = tiles.reshape(bg * hg * n_mt, n_nt)
            first = np.broadcast_to(np.arange(n_nt, dtype=np.int32), rows.shape)
        else:
            # Rows (bg, hk, nt), entries over (g, mt), g major: the query heads h = hk * group + g of each KV
            # head side by side. Tables broadcast over heads (hg == 1) serve every g alike.
            per_head = n_nt
            t = np.swapaxes(tiles, 2, 3)  # (bg, hg, n_nt, n_mt)
            if hg == 1:
                t = np.broadcast_to(t[:, :, :, None, :], (bg, 1, n_nt, group, n_mt))
            else:
                t = t.reshape(bg, heads_k, group, n_nt, n_mt).transpose(0, 1, 3, 2, 4)
            rows = t.reshape(bg * t.shape[1] * n_nt, group * n_mt)
            col = np.arange(group * n_mt, dtype=np.int32)
            first = np.broadcast_to(((col // n_mt) << _TILE_BITS) | (col % n_mt), rows.shape)
        lists, counts = _pack_lists(rows != _EMPTY, first, rows)
        heads_rows = (1 if hg == 1 else heads_k if direction == "bwd" else heads_q) * per_head
        batch_stride, head_stride = 0 if bg == 1 else heads_rows, 0 if hg == 1 else per_head
        # Launch order of the grid cells (b * heads + h) * per_head + tile of every real (b, h): the long lists
        # (over twice the mean: global tokens' key tiles, say) first, longest first, then the rest in the head-
        # major order, whose neighbours share K / V (forward) or Q / dO (backward) in L2. Sorting every cell by
        # length mixed the heads and cost 17% in the backward of a document mask (H200, bench/NOTES.md).
        heads = heads_k if direction == "bwd" else heads_q
        cell = np.arange(batch * heads * per_head, dtype=np.int64)
        row = (cell // (heads * per_head) * batch_stride + cell // per_head % heads * head_stride + cell % per_head)
        length = counts[row].astype(np.int64)
        long = length > 2 * length.mean()
        order = np.argsort(-np.where(long, length, 0), kind="stable").astype(np.int32)
        out = KernelTables(store=store, lists=lists, counts=counts, batch_stride=batch_stride,
                           head_stride=head_stride, list_len=int(lists.shape[1]), block_q=bq, block_k=bk,
                           order=order)
        for a in (lists, counts, order):
            a.flags.writeable = False  # shared through the cache
        self._tables_cache[key] = out
        return out

    def device_tables(self, device: int, **kwargs) -> "DeviceTables":
        """:meth:`kernel_tables` (same keyword arguments) on CUDA device ``device``: their addresses and strides,
        for a kernel's parameter block. Uploaded once per device and host array (the store serves every
        tiling of a window) and kept with this mask; the copies finish before this returns, so a kernel on
        any stream may read them. The first call for a tiling must not be inside a CUDA-graph capture (warm
        up first, as with any allocation)."""
        import cupy
        t = self.kernel_tables(**kwargs)
        ptrs = []
        for host in (t.store, t.lists, t.counts, t.order):
            hit = self._device_cache.get((device, id(host)))
            if hit is None:
                with cupy.cuda.Device(device):
                    if _RETIRED:  # every kernel that may read a dropped mask's tables has finished
                        cupy.cuda.runtime.deviceSynchronize()
                        _RETIRED.clear()
                    dev = cupy.asarray(host)
                    cupy.cuda.get_current_stream().synchronize()
                hit = self._device_cache[(device, id(host))] = (host, dev)  # (host kept: its id stays its own)
            ptrs.append(hit[1].data.ptr)
        return DeviceTables(*ptrs, t.batch_stride, t.head_stride, t.list_len)  # (store, lists, counts, order, ..)

    def _table_grid(self, batch, heads_q) -> tuple:
        """(Bg, Hg): the (batch, head) extent on which this mask varies for a (batch, heads_q) problem, 1 where
        nothing depends on that index (the kernel tables' extent; the adapters' dense masks broadcast so)."""
        mask_dims = (1, 1) if self.mask is None else None if callable(self.mask) else self._mask_4d().shape[:2]
        lists_dims = self._full.shape[:2]
        return tuple(1 if n == 1 and mask_dims is not None and mask_dims[i] == 1 else want
                     for i, (n, want) in enumerate(zip(lists_dims, (batch, heads_q))))

    def _partial_store(self, batch, heads_q) -> tuple:
        """(store, code) for a (batch, heads_q) problem, cached: the uint8 (P, bq, bk) element masks of partial
        blocks (deduplicated; P >= 1) and the int32 (Bg, Hg, nQ, nKV) table of each block's code (_EMPTY,
        _FULL, or its store index)."""
        key = (batch, heads_q)
        hit = self._store_cache.get(key)
        if hit is not None:
            return hit
        bg, hg = self._table_grid(batch, heads_q)
        grid = (bg, hg) + self._full.shape[2:]
        code = np.where(np.broadcast_to(self._full, grid), _FULL, _EMPTY).astype(np.int32)
        bq, bk = self.block_size
        sq, sk = self.seq_lengths
        b, h, qb, kb = (x.astype(np.int64) for x in np.nonzero(np.broadcast_to(self._partial, grid)))
        # Real elements per block: edge blocks hold fewer, and "all True" means all True over those.
        real = np.minimum(bq, sq - qb * bq) * np.minimum(bk, sk - kb * bk)
        step = max(1, min(_STORE_CHUNK_BLOCKS, _STORE_CHUNK_ELEMENTS // (bq * bk)))
        entries, seen = [], {}
        for s in range(0, len(b), step):
            sl = slice(s, s + step)
            flat = self._element_blocks(b[sl], h[sl], qb[sl], kb[sl]).reshape(len(b[sl]), -1)
            n_true = np.count_nonzero(flat, axis=1)
            codes = np.where(n_true == 0, _EMPTY, _FULL)  # all False / all True over the real elements
            mixed = np.flatnonzero((n_true > 0) & (n_true < real[sl]))
            # Identical masks (a sliding window's diagonal blocks, heads a callable treats alike) share an
            # entry: keyed by their packed bits, exact, 1/8 of the bytes to hash.
            for i, bits in zip(mixed, np.packbits(flat[mixed], axis=1)):
                kbytes = bits.tobytes()
                p = seen.get(kbytes)
                if p is None:
                    p = seen[kbytes] = len(entries)
                    entries.append(flat[i].reshape(bq, bk).copy())  # a copy: the chunk is freed
                codes[i] = p
            code[b[sl], h[sl], qb[sl], kb[sl]] = codes
        store = (np.stack(entries) if entries else np.zeros((1, bq, bk), bool)).view(np.uint8)
        store = np.ascontiguousarray(store)
        for a in (store, code):
            a.flags.writeable = False
        self._store_cache[key] = (store, code)
        return store, code

    def _element_blocks(self, b, h, qb, kb) -> np.ndarray:
        """The element mask of blocks ``(qb, kb)`` at the real ``(b, h)`` (1-d int64 arrays of n), bool (n, bq,
        bk), False past the sequence, in one call of the mask function / one gather."""
        bq, bk = self.block_size
        sq, sk = self.seq_lengths
        q = qb[:, None, None] * bq + np.arange(bq)[None, :, None]
        kv = kb[:, None, None] * bk + np.arange(bk)[None, None, :]
        # Indices past the sequence are clipped to the last real one (the mask function or array may not
        # accept them) and their results zeroed below.
        qc, kc = np.minimum(q, sq - 1), np.minimum(kv, sk - 1)
        b3, h3 = b[:, None, None], h[:, None, None]
        shape = (len(b), bq, bk)
        if callable(self.mask):
            elem = np.broadcast_to(np.asarray(self.mask(b3, h3, qc, kc), dtype=bool), shape)
        else:
            m = self._mask_4d()
            idx = tuple(np.zeros_like(x) if n == 1 else x for n, x in zip(m.shape, (b3, h3, qc, kc)))
            elem = np.broadcast_to(m[idx], shape)
        if q[:, -1, 0].max() < sq and kv[:, 0, -1].max() < sk:
            return elem  # no block reaches past the sequence
        return elem & (q < sq) & (kv < sk)

    def _fold_visibility(self, store, code, window_left, window_right) -> tuple:
        """(store, code) with the causal / window visibility folded in, so that the kernels need no
        visibility mask of their own: blocks no query of which sees a key of it become _EMPTY, and attended
        blocks the window cuts take a store entry of their element mask (all True for a full block) AND
        visibility, appended to the store (shared by every (b, h) and every cut block with the same bits)."""
        bq, bk = self.block_size
        sq, sk = self.seq_lengths
        off = sk - sq
        m0 = np.arange(code.shape[2], dtype=np.int64)[:, None] * bq
        n0 = np.arange(code.shape[3], dtype=np.int64)[None, :] * bk
        m1, n1 = np.minimum(m0 + bq, sq) - 1, np.minimum(n0 + bk, sk) - 1
        seen = (n0 <= m1 + off + window_right) & (n1 >= m0 + off - window_left)
        whole = (n1 <= m0 + off + window_right) & (n0 >= m1 + off - window_left)
        code = np.where(seen, code, _EMPTY).astype(np.int32)
        cut = np.nonzero((code != _EMPTY) & ~whole)
        if not len(cut[0]):
            return store, code
        i = np.arange(bq, dtype=np.int64)[:, None]
        j = np.arange(bk, dtype=np.int64)[None, :]
        entries, by_block = [], {}
        by_bits = {blk.tobytes(): n for n, blk in enumerate(np.packbits(store.reshape(len(store), -1) != 0, axis=1))}
        for b, h, qb, kb in zip(*cut):
            p = int(code[b, h, qb, kb])
            idx = by_block.get((p, qb, kb))
            if idx is None:
                rows, cols = qb * bq + i, kb * bk + j
                inside = (rows < sq) & (cols < sk)
                visible = (cols <= rows + off + window_right) & (cols >= rows + off - window_left) & inside
                entry = visible & (store[p] != 0) if p >= 0 else visible
                n_true = np.count_nonzero(entry)
                if n_true == 0 or n_true == np.count_nonzero(inside):  # (as _partial_store classifies)
                    idx = _EMPTY if n_true == 0 else _FULL
                else:
                    bits = np.packbits(entry).tobytes()
                    idx = by_bits.get(bits)
                    if idx is None:
                        idx = by_bits[bits] = len(store) + len(entries)
                        entries.append(entry)
                by_block[(p, qb, kb)] = idx
            code[b, h, qb, kb] = idx
        if not entries:
            code.flags.writeable = False
            return store, code
        store = np.ascontiguousarray(np.concatenate([store, np.stack(entries).view(np.uint8)]))
        for a in (store, code):
            a.flags.writeable = False
        return store, code

    def _tile_codes(self, store, code, tile_m, tile_n, window_left, window_right) -> np.ndarray:
        """int32 (Bg, Hg, n_mt, n_nt): each kernel tile's code (_EMPTY: not visited, _FULL: no element mask, else
        its store index), its block's code refined by visibility and by the tile's part of the block mask."""
        bq, bk = self.block_size
        sq, sk = self.seq_lengths
        m0 = np.arange(0, sq, tile_m, dtype=np.int64)
        n0 = np.arange(0, sk, tile_n, dtype=np.int64)
        m1, n1 = np.minimum(m0 + tile_m, sq) - 1, np.minimum(n0 + tile_n, sk) - 1
        off = sk - sq
        visible = ((n0[None, :] <= m1[:, None] + off + window_right) &
                   (n1[None, :] >= m0[:, None] + off - window_left))
        tiles = code[:, :, (m0 // bq)[:, None], (n0 // bk)[None, :]]
        tiles = np.where(visible, tiles, _EMPTY).astype(np.int32)
        sel = np.nonzero(tiles >= 0)
        if len(sel[0]):
            # A block mask can be all False (or all True) on some of the tiles inside its block: those tiles are
            # dropped (or read no mask). A tile reaching past the sequence is never "all True" here, since the
            # store holds zeros there, so the test is on the store alone, whichever block an entry serves.
            rq, rk = bq // tile_m, bk // tile_n
            sub = store.reshape(len(store), rq, tile_m, rk, tile_n)
            sub_any, sub_all = sub.any(axis=(2, 4)), sub.all(axis=(2, 4))
            p = tiles[sel]
            pos = (p, (sel[2] * tile_m % bq) // tile_m, (sel[3] * tile_n % bk) // tile_n)
            tiles[sel] = np.where(~sub_any[pos], _EMPTY, np.where(sub_all[pos], _FULL, p))
        return tiles


@dataclasses.dataclass(frozen=True)
class DeviceTables:
    """A :class:`KernelTables` on one device (:meth:`BlockMask.device_tables`): addresses and strides."""

    store: int
    lists: int
    counts: int
    order: int
    batch_stride: int
    head_stride: int
    list_len: int


def checked(block_mask, batch, heads_q, seqlen_q, seqlen_k) -> BlockMask:
    """``block_mask`` as a :class:`BlockMask` (a torch FlexAttention one converted) made for a (batch, heads_q,
    seqlen_q, seqlen_k) problem. Raises TypeError / ValueError naming it."""
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "mask_mod"):
            # Converted once per FlexAttention mask, so that its tables and uploads are made once too.
            try:
                converted = _FLEX.get(block_mask)
            except TypeError:  # (not weak-referenceable)
                converted = None
            if converted is None:
                converted = BlockMask.from_flex(block_mask)
                try:
                    _FLEX[block_mask] = converted
                except TypeError:
                    pass
            block_mask = converted
        else:
            raise TypeError(f"block_mask must be a cuflash.BlockMask (or a torch FlexAttention BlockMask), got "
                            f"{type(block_mask).__name__}")
    block_mask.check_for(batch, heads_q, seqlen_q, seqlen_k)
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


def _pack_lists(keep, first, second) -> tuple:
    """(lists, counts) of a bool (R, C) table: per row the (first, second) pairs of its True columns in column
    order, int32 (R, L, 2) with L = max(1, most per row) and zeros past counts[r], and counts int32 (R,)."""
    counts = np.count_nonzero(keep, axis=1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    lists = np.zeros((keep.shape[0], width, 2), np.int32)
    r, c = np.nonzero(keep)  # row-major: columns ascending within each row
    pos = np.arange(len(r)) - (np.cumsum(counts, dtype=np.int64) - counts)[r]
    lists[r, pos, 0] = first[r, c]
    lists[r, pos, 1] = second[r, c]
    return lists, counts
