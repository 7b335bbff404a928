"""NumPy implementations of exact attention: naive float64 references and a
tiled CPU FlashAttention (forward and backward).

Layout follows the FlashAttention-2 contract: ``q`` is
``(batch, seqlen_q, heads_q, head_dim)``, ``k`` and ``v`` are
``(batch, seqlen_k, heads_k, head_dim)`` with ``heads_q % heads_k == 0``;
query head ``h`` reads kv head ``h // (heads_q // heads_k)``.

Masks are aligned to the bottom-right corner of the score matrix: with
``off = seqlen_k - seqlen_q``, query ``i`` sees key ``j`` iff
``j <= i + off + right`` (when ``right >= 0``) and ``j >= i + off - left``
(when ``left >= 0``). ``causal=True`` means ``right = 0``.

A query row that sees no key gets an output of exactly 0 and ``lse = +inf``,
so that a backward recompute ``exp(s - lse)`` yields 0 rather than NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "visible_mask",
    "attention_reference",
    "attention_backward_reference",
    "attention_numpy",
    "attention_backward_numpy",
]


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

def _window(causal, window_size):
    """Fold ``causal`` into a ``(left, right)`` window; negative = unbounded."""
    left, right = (int(w) for w in window_size)
    left = -1 if left < 0 else left
    right = -1 if right < 0 else right
    if causal:
        right = 0
    return left, right


def visible_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1),
                 q_start=0, q_stop=None, k_start=0, k_stop=None):
    """Block of the boolean visibility matrix.

    Parameters
    ----------
    seqlen_q, seqlen_k : int
        Full sequence lengths; they fix the bottom-right alignment offset
        ``seqlen_k - seqlen_q`` even when only a block is requested.
    causal : bool
        Same as ``window_size[1] == 0``.
    window_size : (int, int)
        ``(left, right)``; ``-1`` means unbounded on that side.
    q_start, q_stop, k_start, k_stop : int
        Row / column range of the block (stops default to the full length).

    Returns
    -------
    np.ndarray of bool, shape ``(q_stop - q_start, k_stop - k_start)``
        ``True`` where query ``i`` may attend to key ``j``.
    """
    q_stop = seqlen_q if q_stop is None else q_stop
    k_stop = seqlen_k if k_stop is None else k_stop
    left, right = _window(causal, window_size)
    off = seqlen_k - seqlen_q
    i = np.arange(q_start, q_stop)[:, None]
    j = np.arange(k_start, k_stop)[None, :]
    mask = (j >= 0) & (j < seqlen_k) & (i >= 0) & (i < seqlen_q)
    if right >= 0:
        mask &= j <= i + off + right
    if left >= 0:
        mask &= j >= i + off - left
    return mask


def _key_range(seqlen_q, seqlen_k, left, right, q0, q1):
    """Half-open range of keys that some query in ``[q0, q1)`` can see."""
    off = seqlen_k - seqlen_q
    lo = 0 if left < 0 else max(0, q0 + off - left)
    hi = seqlen_k if right < 0 else min(seqlen_k, q1 - 1 + off + right + 1)
    return lo, max(lo, hi)


def _query_range(seqlen_q, seqlen_k, left, right, k0, k1):
    """Half-open range of queries that can see some key in ``[k0, k1)``."""
    off = seqlen_k - seqlen_q
    # j <= i + off + right  <=>  i >= j - off - right
    lo = 0 if right < 0 else max(0, k0 - off - right)
    # j >= i + off - left   <=>  i <= j - off + left
    hi = seqlen_q if left < 0 else min(seqlen_q, k1 - 1 - off + left + 1)
    return lo, max(lo, hi)


def _scale(softmax_scale, head_dim):
    return head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)


def _slopes(alibi_slopes, batch, heads_q, dtype):
    """ALiBi slopes as a ``(batch, heads_q)`` array, or None."""
    if alibi_slopes is None:
        return None
    s = np.asarray(alibi_slopes, dtype=dtype)
    return np.broadcast_to(s, (batch, heads_q)) if s.ndim == 1 else s


def _acc_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _alibi_dist(seqlen_q, seqlen_k, q0, q1, k0, k1, dtype):
    """``|i + off - j|`` for a block, the distance ALiBi penalises."""
    off = seqlen_k - seqlen_q
    # Built in ``dtype`` directly (integers are exact in float32 up to 2**24):
    # int64 intermediates would be 4x a float32 tile of the CPU path.
    i = np.arange(q0 + off, q1 + off, dtype=dtype)[:, None]
    j = np.arange(k0, k1, dtype=dtype)[None, :]
    dist = i - j
    return np.abs(dist, out=dist)


# ---------------------------------------------------------------------------
# Naive float64 references
# ---------------------------------------------------------------------------

def _reference_scores(q, k, causal, softmax_scale, window_size, softcap,
                      alibi_slopes, attn_mask=None, block_mask=None):
    """Float64 scores ``(b, hq, sq, sk)`` plus what the backward needs."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = _scale(softmax_scale, d)
    k = np.repeat(k, hq // hk, axis=2)
    s_pre = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
    tanh = None
    s = s_pre
    if softcap > 0:
        tanh = np.tanh(s_pre / softcap)
        s = softcap * tanh
    slopes = _slopes(alibi_slopes, b, hq, np.float64)
    if slopes is not None:
        dist = _alibi_dist(sq, sk, 0, sq, 0, sk, np.float64)
        s = s - slopes[:, :, None, None] * dist
    mask = visible_mask(sq, sk, causal, window_size)
    s, mask = _apply_attn_mask(s, mask, _full_mask(attn_mask, s.shape))
    if block_mask is not None:
        mask = mask & block_mask.to_dense(s.shape[0], s.shape[1])
    return s, mask, tanh, scale


def _reference_probs(s, mask):
    """Row softmax over visible keys; empty rows give P = 0, lse = +inf."""
    s = np.where(mask, s, -np.inf)
    # initial=-inf: with seqlen_k == 0 every row is empty, not an error.
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, np.inf, m + np.log(l))
    p = np.where(empty, 0.0, p / np.where(empty, 1.0, l))
    return p, lse[..., 0]


def _full_mask(attn_mask, shape):
    """``attn_mask`` broadcast to ``(b, hq, sq, sk)`` (a read-only view), or None."""
    if attn_mask is None:
        return None
    return np.broadcast_to(np.asarray(attn_mask), shape)


def _apply_attn_mask(s, vis, attn_mask):
    """Scores and visibility with ``attn_mask`` (bool: True = attend; float: added to the scores, -inf
    masks) folded in; ``s`` and ``vis`` broadcast against ``attn_mask``."""
    if attn_mask is None:
        return s, vis
    if attn_mask.dtype == np.bool_:
        return s, vis & attn_mask
    return s + attn_mask.astype(s.dtype), vis


def _dropout_keep(shape, dropout_p, dropout_seed, dropout_offset):
    """``(keep, 1 / (1 - p))`` for a (b, hq, sq, sk) score matrix, or None without dropout."""
    if not dropout_p:
        return None
    from . import dropout
    b, hq, sq, sk = shape
    keep = dropout.dropout_mask(b, hq, sq, sk, dropout_p=dropout_p, dropout_seed=dropout_seed,
                                dropout_offset=dropout_offset)
    return keep, 1.0 / (1.0 - dropout_p)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                        attn_mask=None, block_mask=None):
    """Naive attention in float64, materialising the full score matrix.

    Parameters
    ----------
    q : array, ``(batch, seqlen_q, heads_q, head_dim)``
    k, v : array, ``(batch, seqlen_k, heads_k, head_dim)``
    causal, window_size, softcap, alibi_slopes, softmax_scale
        See the module docstring; ``softmax_scale`` defaults to
        ``head_dim ** -0.5``; ``alibi_slopes`` is ``(heads_q,)`` or
        ``(batch, heads_q)``.
    dropout_p, dropout_seed, dropout_offset
        Attention dropout (cuflash/dropout.py: the mask and the ``1 / (1 - p)`` scaling); the LSE is
        the softmax's, before dropout.
    attn_mask : array or None
        Broadcastable to ``(batch, heads_q, seqlen_q, seqlen_k)``: bool (True = attend, combined with
        causal / window) or float (added to the final scores; ``-inf`` masks).

    Returns
    -------
    out : float64, ``(batch, seqlen_q, heads_q, head_dim)``
    lse : float64, ``(batch, heads_q, seqlen_q)``; ``+inf`` for empty rows.
    """
    s, mask, _, _ = _reference_scores(q, k, causal, softmax_scale,
                                      window_size, softcap, alibi_slopes,
                                      attn_mask, block_mask)
    hq = s.shape[1]
    v = np.asarray(v, dtype=np.float64)
    v = np.repeat(v, hq // v.shape[2], axis=2)
    p, lse = _reference_probs(s, mask)
    drop = _dropout_keep(s.shape, dropout_p, dropout_seed, dropout_offset)
    if drop is not None:
        p = np.where(drop[0], p * drop[1], 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def attention_probs(q, k, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, attn_mask=None):
    """The float64 attention probabilities ``(batch, heads_q, seqlen_q, seqlen_k)`` (before dropout; rows
    that see no key are 0), as :func:`attention_reference` computes them."""
    s, mask, _, _ = _reference_scores(q, k, causal, softmax_scale, window_size, softcap, alibi_slopes,
                                      attn_mask)
    return _reference_probs(s, mask)[0]


def attention_backward_reference(dout, q, k, v, *, causal=False,
                                 softmax_scale=None, window_size=(-1, -1),
                                 softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                                 dropout_seed=None, dropout_offset=0,
                                 attn_mask=None, block_mask=None):
    """Naive float64 gradients of ``attention_reference``'s output.

    The softmax is recomputed from scratch in float64, so the result does not
    depend on any stored ``out`` / ``lse``.

    Parameters
    ----------
    dout : array, ``(batch, seqlen_q, heads_q, head_dim)``
        Gradient of the loss with respect to ``out``.
    q, k, v, and keyword arguments
        As for :func:`attention_reference`.

    Returns
    -------
    dq, dk, dv : float64 arrays with the shapes of ``q``, ``k``, ``v``.
        For GQA / MQA, ``dk`` / ``dv`` of a kv head sum over the query heads
        that share it.
    """
    s, mask, tanh, scale = _reference_scores(q, k, causal, softmax_scale,
                                             window_size, softcap,
                                             alibi_slopes, attn_mask,
                                             block_mask)
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    do = np.asarray(dout, dtype=np.float64)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    ke = np.repeat(k, g, axis=2)
    ve = np.repeat(v, g, axis=2)
    p, _ = _reference_probs(s, mask)
    # With dropout, out = (P o Z / (1 - p)) V: dV takes the dropped P, dP the mask, and
    # rowsum(dP o P) = rowsum(dout o out) still (FlashAttention-2's Algorithm 4).
    drop = _dropout_keep(s.shape, dropout_p, dropout_seed, dropout_offset)
    pd = p if drop is None else np.where(drop[0], p * drop[1], 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", pd, ve)
    dv = np.einsum("bhqk,bqhd->bkhd", pd, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, ve)
    if drop is not None:
        dp = np.where(drop[0], dp * drop[1], 0.0)
    delta = np.einsum("bqhd,bqhd->bhq", do, out)
    ds = p * (dp - delta[..., None])
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, ke)
    dk = scale * np.einsum("bhqk,bqhd->bkhd", ds, q)
    # Query heads h = kv * g + r share kv head ``kv``: fold the r axis.
    dk = dk.reshape(b, sk, hk, g, d).sum(axis=3)
    dv = dv.reshape(b, sk, hk, g, d).sum(axis=3)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Tiled CPU FlashAttention
# ---------------------------------------------------------------------------

# Tile shape. A score tile covers a chunk of ``heads`` (b * heads_k) matrices
# of ``block_q * g`` rows by ``block_k`` keys: the elementwise passes (max,
# exp, ...) run once per tile, BLAS once per matrix. BLAS is ~75% of the time
# (one core, 8 x 128 x 1024 tile, hd64: 2.4 + 1.6 ns per score for q @ k.T
# and p @ v against 1.2 for max, subtract, exp and sum), and one 1024-row
# matrix runs the two products in 20% less time than eight 128-row ones (3.3
# against 4.0 ns per score), so matrices are made tall: up to _ROWS rows by
# _BLOCK_K keys, 2M scores (8 MB in float32) per tile. Fewer, larger products
# also matter when the machine is busy: each multithreaded OpenBLAS call then
# waits for its second thread (~25 ms per call with 5 runnable processes on 2
# cores), so at (1, 2048, 8, 64) 1M-score tiles (64 calls) took 1.5 s and
# 2M-score ones (32 calls) 0.75 s.
# Causal / window blocks take 512 rows: the masked diagonal strip wastes
# about block_q / seqlen of the work, but each block is a BLAS call. One BLAS
# thread (CPU time, causal hd64): 256 / 512 / 1024 rows took 41 / 47 / 68 ms
# forward at 1k, 128 / 138 / 189 ms at 2k; busy machine, default threads (wall
# time): 971 / 470 / 362 ms at 1k, 1428 / 695 / 812 ms at 2k.
_TILE_ELEMS = 1 << 21
_BLOCK_K = 2048
_ROWS = 1024
_ROWS_MASKED = 512


def _rows(x, heads_k, acc, width=None, scale=None):
    """``(b, s, h, d)`` -> contiguous ``(b * heads_k, s * g, width)`` in ``acc``.

    Row ``t * g + r`` of matrix ``bi * heads_k + kv`` is position ``t`` of
    query head ``kv * g + r``: the ``g`` query heads sharing a kv head form one
    matrix, so one BLAS product serves a whole GQA group and k / v are never
    repeated in memory. The copy gathers any input strides (transposed views,
    a non-unit last stride) and casts to ``acc``, multiplied by ``scale`` if
    given. Columns ``d:width`` are left for the caller to fill.
    """
    x = np.asarray(x)
    b, s, h, d = x.shape
    g = h // heads_k
    width = d if width is None else width
    out = np.empty((b, heads_k, s, g, width), dtype=acc)
    src = x.reshape(b, s, heads_k, g, d).transpose(0, 2, 1, 3, 4)
    if scale is None:
        out[..., :d] = src
    else:
        np.multiply(src, acc(scale), out=out[..., :d], dtype=acc)
    return out.reshape(b * heads_k, s * g, width)


def _unrows(x, b, heads_k, seqlen, dtype):
    """Inverse of :func:`_rows`: ``(b * heads_k, s * g, d)`` -> ``(b, s, h, d)``."""
    n, sg, d = x.shape
    g = sg // seqlen if seqlen else 0
    x = x.reshape(b, heads_k, seqlen, g, d).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x, dtype=dtype).reshape(b, seqlen,
                                                        heads_k * g, d)


def _tile_sizes(heads, g, sq, sk, masked, block_q, block_k):
    """``(block_q, block_k, head_chunk)`` for a call.

    Explicit ``block_q`` / ``block_k`` are kept (tests use tiny ones to reach
    every branch of the online softmax); the head chunk then fills the budget.
    """
    bk = max(1, min(sk, block_k or _BLOCK_K))
    if block_q:
        bq = min(sq, block_q)
    else:
        rows = _ROWS_MASKED if masked else _ROWS
        bq = min(sq, max(1, rows // g), max(1, _TILE_ELEMS // (g * bk)))
    hc = max(1, min(heads, _TILE_ELEMS // (g * bq * bk)))
    return max(1, bq), bk, hc


def _key_chunks(sq, sk, left, right, q0, q1, bk):
    """Key blocks ``(k0, k1, masked)`` that queries ``[q0, q1)`` can see.

    Keys every query of the block sees form an interior that needs no mask;
    only the strips at the causal / window edges (at most ``q1 - q0`` keys
    wide) are masked. A strip is merged into its neighbour when the two fit
    in one ``bk`` block, so a causal row block costs one product, not two.
    """
    lo, hi = _key_range(sq, sk, left, right, q0, q1)
    if lo >= hi:
        return []
    off = sk - sq
    flo = lo if left < 0 else max(lo, q1 - 1 + off - left)
    fhi = hi if right < 0 else min(hi, q0 + off + right + 1)
    if flo >= fhi:
        pieces = [(lo, hi, True)]
    else:
        pieces = [(lo, flo, True), (flo, fhi, False), (fhi, hi, True)]
    chunks = []
    for a, z, masked in pieces:
        for k0 in range(a, z, bk):
            k1 = min(k0 + bk, z)
            if chunks and k1 - chunks[-1][0] <= bk:
                p0, _, pm = chunks.pop()
                chunks.append((p0, k1, pm or masked))
            else:
                chunks.append((k0, k1, masked))
    return chunks


class _Tiles:
    """Per-call constants of the tiled forward / backward."""

    def __init__(self, q, k, causal, softmax_scale, window_size, softcap,
                 alibi_slopes, block_q, block_k, dropout=None, attn_mask=None,
                 block_mask=None):
        self.dropout = dropout  # None or (p, seed, offset, batch index of the first example)
        self.block_mask = block_mask
        if block_mask is not None:
            # Tiles of the mask's blocks (where those are not tiny), so that a tile lies in one block and the
            # blocks the mask skips are skipped whole; _attended answers "any block here?" without the
            # element mask (at 4k, 9% visible: 3.7 s with 1k x 2k tiles that mostly held a visible block).
            self._attended = block_mask._full | block_mask._partial
            if not block_q and not block_k and min(block_mask.block_size) >= 32:
                block_q, block_k = block_mask.block_size
        self.attn_mask = None
        if attn_mask is not None:
            b, sq, hq = q.shape[:3]
            m = np.broadcast_to(np.asarray(attn_mask), (b, hq, sq, k.shape[1]))
            # (b, hq, sq, sk) -> (b * heads_k, g, sq, sk): query head kv * g + r is group row r.
            self.attn_mask = m.reshape(b * k.shape[2], hq // k.shape[2], sq, k.shape[1])
        self.dtype = q.dtype
        self.acc = acc = _acc_dtype(q.dtype)
        self.b, self.sq, self.hq, self.d = b, sq, hq, d = q.shape
        self.sk, self.hk = k.shape[1], k.shape[2]
        self.g = hq // self.hk if self.hk else 0
        self.heads = b * self.hk
        self.scale = _scale(softmax_scale, d)
        self.softcap = float(softcap)
        # q is pre-multiplied so that one product gives the tanh argument.
        self.q_scale = (self.scale / self.softcap if self.softcap > 0
                        else self.scale)
        self.causal, self.window_size = causal, window_size
        self.left, self.right = _window(causal, window_size)
        self.slopes = None
        if alibi_slopes is not None:
            s = np.asarray(_slopes(alibi_slopes, b, hq, acc), dtype=acc)
            self.slopes = s.reshape(self.heads, 1, self.g, 1)
        self.bq, self.bk, self.hc = _tile_sizes(
            self.heads, max(self.g, 1), max(sq, 1), max(self.sk, 1),
            self.left >= 0 or self.right >= 0, block_q, block_k)

    @property
    def empty(self):
        return self.b * self.hq * self.sq == 0 or self.sk == 0

    def blocks(self):
        """``(h0, h1, q0, q1, key_chunks)`` over head chunks and query blocks."""
        for h0 in range(0, self.heads, self.hc):
            h1 = min(h0 + self.hc, self.heads)
            for q0 in range(0, self.sq, self.bq):
                q1 = min(q0 + self.bq, self.sq)
                yield h0, h1, q0, q1, _key_chunks(self.sq, self.sk, self.left,
                                                  self.right, q0, q1, self.bk)

    def buffer(self):
        """Flat scratch space for the largest tile (reused: no page faults)."""
        return np.empty(self.hc * self.bq * self.g * self.bk, dtype=self.acc)

    def block_visible(self, h0, h1, q0, q1, k0, k1):
        """The block mask's element mask of a tile in the tile's row layout (as :meth:`keep`), or None."""
        if self.block_mask is None:
            return None
        bq, bk = self.block_mask.block_size
        if not self._attended[:, :, q0 // bq:(q1 - 1) // bq + 1, k0 // bk:(k1 - 1) // bk + 1].any():
            return np.zeros((1, 1, 1), bool)  # (no block here: the caller skips the tile)
        hh = np.arange(h0, h1)
        heads = (hh % self.hk)[:, None] * self.g + np.arange(self.g)   # (n, g) query heads
        z = self.block_mask.dense_tile((hh // self.hk)[:, None] + 0 * heads, heads, (q0, q1), (k0, k1))
        return z.transpose(0, 2, 1, 3).reshape(h1 - h0, (q1 - q0) * self.g, k1 - k0)

    def keep(self, h0, h1, q0, q1, k0, k1):
        """The dropout keep mask of a tile as the tile's rows lay it out: bool ``(h1 - h0, (q1 - q0) * g,
        k1 - k0)``, row ``t * g + r`` of matrix ``bi * heads_k + kv`` being query head ``kv * g + r``."""
        from . import dropout
        p, seed, offset, batch0 = self.dropout
        hh = np.arange(h0, h1)
        bh = ((hh // self.hk + batch0) * self.hq + (hh % self.hk) * self.g)[:, None] + np.arange(self.g)
        z = dropout.keep_tile(seed, offset, p, bh, (q0, q1), (k0, k1))  # (n, g, rows, keys)
        return z.transpose(0, 2, 1, 3).reshape(h1 - h0, (q1 - q0) * self.g, k1 - k0)


def _tile_scores(t, qt, kt, s, tanh, h0, h1, q0, q1, k0, k1, masked, visible=None):
    """Scores of one tile, written into ``s`` ``(heads, (q1 - q0) * g, k1 - k0)``.

    ``qt`` is pre-scaled (see ``_Tiles.q_scale``); the product may carry extra
    columns (the backward folds ``- lse`` into it). With softcap, ``tanh`` (a
    buffer like ``s`` or None) receives ``tanh(qt @ kt.T)`` for the backward.
    Masked entries become ``-inf``.
    """
    np.matmul(qt, kt.swapaxes(-1, -2), out=s)
    if t.softcap > 0:
        if tanh is None:
            np.tanh(s, out=s)
            s *= t.acc(t.softcap)
        else:
            np.tanh(s, out=tanh)
            np.multiply(tanh, t.acc(t.softcap), out=s)
    n, bq, kb = h1 - h0, q1 - q0, k1 - k0
    s4 = s.reshape(n, bq, t.g, kb)
    if t.slopes is not None:
        dist = _alibi_dist(t.sq, t.sk, q0, q1, k0, k1, t.acc)[:, None, :]
        s4 -= t.slopes[h0:h1] * dist
    if masked:
        vis = visible_mask(t.sq, t.sk, t.causal, t.window_size, q0, q1, k0, k1)
        np.copyto(s4, t.acc(-np.inf), where=~vis[:, None, :])
    if t.attn_mask is not None:
        m = t.attn_mask[h0:h1, :, q0:q1, k0:k1].transpose(0, 2, 1, 3)  # (heads, rows, g, keys), as s4
        if m.dtype == np.bool_:
            np.copyto(s4, t.acc(-np.inf), where=~m)
        else:
            s4 += m
    if visible is not None:  # the block mask's elements (t.block_visible)
        np.copyto(s, t.acc(-np.inf), where=~visible)


def _dropout_args(dropout_p, dropout_seed, dropout_offset, dropout_batch=0):
    return (dropout_p, dropout_seed, dropout_offset, dropout_batch) if dropout_p else None


def attention_numpy(q, k, v, *, causal=False, softmax_scale=None,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    block_q=None, block_k=None, dropout_p=0.0, dropout_seed=None,
                    dropout_offset=0, attn_mask=None, block_mask=None, dropout_batch=0):
    """Tiled FlashAttention forward on the CPU.

    Iterates over head chunks and query blocks and, inside, over the key
    blocks they can see, keeping a running row max ``m``, running sum ``l`` and a rescaled output
    accumulator. Only ``(block_q, block_k)`` score tiles, for a chunk of
    heads, are ever materialised; key blocks that are entirely masked (causal /
    window) are skipped and only the key strips at a mask edge are masked.

    Parameters
    ----------
    q : array, ``(batch, seqlen_q, heads_q, head_dim)``
    k, v : array, ``(batch, seqlen_k, heads_k, head_dim)``
        Any strides and any ``head_dim >= 1``.
    block_q, block_k : int or None
        Tile sizes (need not divide the sequence lengths); None picks them.
    other keyword arguments
        As for :func:`attention_reference` (dropout: each tile's probabilities are masked before the
        ``P V`` product, never in the row sums).
    dropout_batch : int
        The batch index that example 0 takes in the dropout mask's key (cuflash/dropout.py): a packed
        sequence's index, so that sequence ``i`` of a variable-length call draws the mask of batch ``i``.

    Returns
    -------
    out : ``q.dtype``, ``(batch, seqlen_q, heads_q, head_dim)``, C-contiguous
    lse : float32 (float64 for float64 inputs), ``(batch, heads_q, seqlen_q)``;
        ``+inf`` for rows that see no key (their ``out`` is exactly 0), which
        is every row when ``seqlen_k == 0``.

    Accumulation is float32 for float16 / float32 inputs, float64 for float64.
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    t = _Tiles(q, k, causal, softmax_scale, window_size, softcap,
               alibi_slopes, block_q, block_k,
               _dropout_args(dropout_p, dropout_seed, dropout_offset, dropout_batch), attn_mask,
               block_mask)
    acc, d, g = t.acc, t.d, t.g
    if t.empty:
        return (np.zeros(q.shape, dtype=t.dtype),
                np.full((t.b, t.hq, t.sq), np.inf, dtype=acc))
    Q = _rows(q, t.hk, acc, scale=t.q_scale)        # (heads, sq * g, d)
    K = _rows(k, t.hk, acc)                         # (heads, sk, d)
    V = _rows(v, t.hk, acc)
    O = np.empty((t.heads, t.sq * g, d), dtype=acc)
    L = np.empty((t.heads, t.sq * g), dtype=acc)
    buf = t.buffer()

    for h0, h1, q0, q1, chunks in t.blocks():
        r0, r1 = q0 * g, q1 * g
        qt = Q[h0:h1, r0:r1]
        m = o = l = None
        for k0, k1, masked in chunks:
            visible = t.block_visible(h0, h1, q0, q1, k0, k1)
            if visible is not None and not visible.any():
                continue                    # a tile the block mask skips
            s = buf[:(h1 - h0) * (r1 - r0) * (k1 - k0)].reshape(
                h1 - h0, r1 - r0, k1 - k0)
            _tile_scores(t, qt, K[h0:h1, k0:k1], s, None, h0, h1, q0, q1,
                         k0, k1, masked, visible)
            m_new = s.max(axis=-1)
            if m is not None:
                np.maximum(m, m_new, out=m_new)
            # A row with nothing visible yet keeps m = -inf; shift by 0
            # instead so exp() sees -inf - 0 rather than -inf - (-inf).
            shift = np.where(np.isneginf(m_new), acc(0), m_new)
            s -= shift[..., None]
            np.exp(s, out=s)
            # Row sums by NumPy's pairwise sum, not by a ones column in the
            # p @ v product: BLAS adds the ~2k terms of a row one by one, and
            # that l made the output 30% and the backward's dq 50% less
            # accurate (1024 x 1324 keys, float32: out 1.9e-6 vs 1.5e-6, dq
            # 2.2e-6 vs 1.5e-6 relative to the float64 reference).
            ls = s.sum(axis=-1)
            if t.dropout is not None:
                s *= t.keep(h0, h1, q0, q1, k0, k1)
            pv = np.matmul(s, V[h0:h1, k0:k1])
            if o is None:
                o, l = pv, ls
            else:
                alpha = np.exp(m - shift)
                o *= alpha[..., None]
                o += pv
                l *= alpha
                l += ls
            m = m_new
        if o is None:                       # no key visible to the block
            O[h0:h1, r0:r1] = 0
            L[h0:h1, r0:r1] = np.inf
            continue
        empty = l == 0
        l_safe = np.where(empty, acc(1), l)
        if t.dropout is not None:  # 1 / (1 - p) rides in the normalizer, not in the LSE
            np.divide(o, (l_safe * acc(1.0 - t.dropout[0]))[..., None], out=O[h0:h1, r0:r1])
        else:
            np.divide(o, l_safe[..., None], out=O[h0:h1, r0:r1])
        lse = m + np.log(l_safe)
        lse[empty] = np.inf
        L[h0:h1, r0:r1] = lse

    out = _unrows(O, t.b, t.hk, t.sq, t.dtype)
    lse = L.reshape(t.b, t.hk, t.sq, g).transpose(0, 1, 3, 2)
    return out, np.ascontiguousarray(lse).reshape(t.b, t.hq, t.sq)


def attention_backward_numpy(dout, q, k, v, out, lse, *, causal=False,
                             softmax_scale=None, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, block_q=None,
                             block_k=None, dropout_p=0.0, dropout_seed=None,
                             dropout_offset=0, attn_mask=None, block_mask=None, dropout_batch=0):
    """Tiled FlashAttention backward on the CPU.

    Computes ``D = rowsum(dout * out)``, then, per head chunk and query block,
    walks the key blocks the block can see, recomputing ``P = exp(s - lse)``
    per tile, accumulating dQ for the block and adding into dK / dV. Without
    softcap ``- lse`` rides in the score product (``[q, -lse] . [k, 1]``) and
    ``- D`` in the ``dP`` product (``[dout, -D] . [v, 1]``), so a tile costs
    two elementwise passes (exp, ``P * (dP - D)``) besides the products.

    Parameters
    ----------
    dout, out : array, ``(batch, seqlen_q, heads_q, head_dim)``
    q, k, v : as for :func:`attention_numpy`.
    lse : array, ``(batch, heads_q, seqlen_q)``, from :func:`attention_numpy`
        (``+inf`` on empty rows, which makes their P and gradients 0).
    other keyword arguments
        As for :func:`attention_numpy`. With dropout each tile replays the forward's mask: dV takes
        ``P o Z / (1 - p)``, and ``dS = P o (dP~ o Z / (1 - p) - D)`` with ``dP~ = dout V^T`` and
        ``D = rowsum(dout o out)`` (FlashAttention-2's Algorithm 4), so ``- D`` cannot ride in the product.

    Returns
    -------
    dq, dk, dv : in the input dtype, C-contiguous, with the shapes of ``q``,
    ``k``, ``v`` (zeros where no key / query is visible, e.g. ``seqlen_k == 0``).
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    t = _Tiles(q, k, causal, softmax_scale, window_size, softcap,
               alibi_slopes, block_q, block_k,
               _dropout_args(dropout_p, dropout_seed, dropout_offset, dropout_batch), attn_mask,
               block_mask)
    acc, d, g = t.acc, t.d, t.g
    if t.empty:
        return tuple(np.zeros(x.shape, dtype=t.dtype) for x in (q, k, v))
    capped = t.softcap > 0
    extra = 0 if capped else 1
    lse_rows = np.asarray(lse, dtype=acc).reshape(t.b, t.hk, g, t.sq)
    lse_rows = np.ascontiguousarray(lse_rows.transpose(0, 1, 3, 2)).reshape(
        t.heads, t.sq * g)
    Q = _rows(q, t.hk, acc, width=d + extra, scale=t.q_scale)
    K = _rows(k, t.hk, acc, width=d + extra)
    if not capped:
        # +inf (rows that see no key) becomes a huge finite value: BLAS then
        # never sees an inf, and exp() of the score still gives exactly 0.
        Q[:, :, d] = -np.minimum(lse_rows, np.finfo(acc).max / 4)
        K[:, :, d] = 1
    V = _rows(v, t.hk, acc, width=d + 1)
    V[:, :, d] = 1
    dO = _rows(dout, t.hk, acc, width=d + 1)
    O = _rows(out, t.hk, acc)
    dO[:, :, d] = -np.einsum("nrd,nrd->nr", dO[:, :, :d], O)
    del O
    dQ = np.zeros((t.heads, t.sq * g, d), dtype=acc)
    dK = np.zeros((t.heads, t.sk, d), dtype=acc)
    dV = np.zeros_like(dK)
    pbuf, dpbuf = t.buffer(), t.buffer()
    tbuf = t.buffer() if capped else None

    for h0, h1, q0, q1, chunks in t.blocks():
        r0, r1 = q0 * g, q1 * g
        qt, dot = Q[h0:h1, r0:r1], dO[h0:h1, r0:r1]
        dq = None
        for k0, k1, masked in chunks:
            visible = t.block_visible(h0, h1, q0, q1, k0, k1)
            if visible is not None and not visible.any():
                continue
            shape = (h1 - h0, r1 - r0, k1 - k0)
            size = shape[0] * shape[1] * shape[2]
            p = pbuf[:size].reshape(shape)
            tanh = None if tbuf is None else tbuf[:size].reshape(shape)
            kt = K[h0:h1, k0:k1]
            _tile_scores(t, qt, kt, p, tanh, h0, h1, q0, q1, k0, k1, masked, visible)
            if capped:
                p -= lse_rows[h0:h1, r0:r1, None]
            # Masked entries are -inf and empty rows have lse = +inf (or the
            # huge stand-in), so exp() gives exact zeros there.
            np.exp(p, out=p)
            ds = dpbuf[:size].reshape(shape)
            if t.dropout is None:
                dV[h0:h1, k0:k1] += np.matmul(p.swapaxes(-1, -2), dot[..., :d])
                np.matmul(dot, V[h0:h1, k0:k1].swapaxes(-1, -2), out=ds)
            else:
                zs = t.keep(h0, h1, q0, q1, k0, k1) * acc(1.0 / (1.0 - t.dropout[0]))
                dV[h0:h1, k0:k1] += np.matmul((p * zs).swapaxes(-1, -2), dot[..., :d])
                np.matmul(dot[..., :d], V[h0:h1, k0:k1, :d].swapaxes(-1, -2), out=ds)
                ds *= zs
                ds += dot[..., d:]                    # - D
            ds *= p                                   # P * (dP - D)
            if capped:
                np.multiply(tanh, tanh, out=tanh)
                np.subtract(acc(1), tanh, out=tanh)
                ds *= tanh
            part = np.matmul(ds, kt[..., :d])
            if dq is None:
                dq = part
            else:
                dq += part
            dK[h0:h1, k0:k1] += np.matmul(ds.swapaxes(-1, -2), qt[..., :d])
        if dq is not None:
            dQ[h0:h1, r0:r1] = dq

    # d/dq of (q_scale q) . k is q_scale k, and the chain rule through
    # softcap * tanh(. / softcap) contributes softcap / softcap = 1, so dq is
    # scale * dS @ k; dK was taken against the pre-scaled q (q_scale q), so it
    # needs scale / q_scale (= softcap with softcap, 1 without).
    dQ *= acc(t.scale)
    if capped:
        dK *= acc(t.softcap)
    return (_unrows(dQ, t.b, t.hk, t.sq, t.dtype),
            _unrows(dK, t.b, t.hk, t.sk, t.dtype),
            _unrows(dV, t.b, t.hk, t.sk, t.dtype))
