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
    i = np.arange(q0, q1)[:, None]
    j = np.arange(k0, k1)[None, :]
    return np.abs(i + off - j).astype(dtype)


# ---------------------------------------------------------------------------
# Naive float64 references
# ---------------------------------------------------------------------------

def _reference_scores(q, k, causal, softmax_scale, window_size, softcap,
                      alibi_slopes):
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
    return s, mask, tanh, scale


def _reference_probs(s, mask):
    """Row softmax over visible keys; empty rows give P = 0, lse = +inf."""
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, np.inf, m + np.log(l))
    p = np.where(empty, 0.0, p / np.where(empty, 1.0, l))
    return p, lse[..., 0]


def attention_reference(q, k, v, *, causal=False, softmax_scale=None,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Naive attention in float64, materialising the full score matrix.

    Parameters
    ----------
    q : array, ``(batch, seqlen_q, heads_q, head_dim)``
    k, v : array, ``(batch, seqlen_k, heads_k, head_dim)``
    causal, window_size, softcap, alibi_slopes, softmax_scale
        See the module docstring; ``softmax_scale`` defaults to
        ``head_dim ** -0.5``; ``alibi_slopes`` is ``(heads_q,)`` or
        ``(batch, heads_q)``.

    Returns
    -------
    out : float64, ``(batch, seqlen_q, heads_q, head_dim)``
    lse : float64, ``(batch, heads_q, seqlen_q)``; ``+inf`` for empty rows.
    """
    s, mask, _, _ = _reference_scores(q, k, causal, softmax_scale,
                                      window_size, softcap, alibi_slopes)
    hq = s.shape[1]
    v = np.asarray(v, dtype=np.float64)
    v = np.repeat(v, hq // v.shape[2], axis=2)
    p, lse = _reference_probs(s, mask)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def attention_backward_reference(dout, q, k, v, *, causal=False,
                                 softmax_scale=None, window_size=(-1, -1),
                                 softcap=0.0, alibi_slopes=None):
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
                                             alibi_slopes)
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
    out = np.einsum("bhqk,bkhd->bqhd", p, ve)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, ve)
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

def _grouped(x, heads_k, acc):
    """``(b, s, h, d)`` -> contiguous ``(b, heads_k, h // heads_k, s, d)``.

    Grouping the query heads under their kv head lets one batched matmul
    serve a whole GQA group without repeating k / v in memory.
    """
    b, s, h, d = x.shape
    x = np.ascontiguousarray(np.asarray(x).transpose(0, 2, 1, 3), dtype=acc)
    return x.reshape(b, heads_k, h // heads_k, s, d)


def _tile_scores(qt, kt, scale, softcap, slopes, sq, sk, q0, q1, k0, k1,
                 causal, window_size, acc):
    """Scores of one (query block, key block) pair.

    ``qt``: ``(b, hk, g, bq, d)``; ``kt``: ``(b, hk, bk, d)``.
    Returns ``s`` (masked with -inf), the visibility block, and
    ``tanh(s_pre / softcap)`` (or None) for the backward.
    """
    b, hk, g, bq, d = qt.shape
    s = qt.reshape(b, hk, g * bq, d) @ kt.swapaxes(-1, -2)
    s = s.reshape(b, hk, g, bq, -1)
    s *= acc(scale)
    tanh = None
    if softcap > 0:
        tanh = np.tanh(s / acc(softcap))
        s = acc(softcap) * tanh
    if slopes is not None:
        dist = _alibi_dist(sq, sk, q0, q1, k0, k1, acc)
        s = s - slopes * dist
    mask = visible_mask(sq, sk, causal, window_size, q0, q1, k0, k1)
    # Fully visible tiles (the common case) skip the masking pass.
    if not mask.all():
        s = np.where(mask, s, acc(-np.inf))
    return s, mask, tanh


def attention_numpy(q, k, v, *, causal=False, softmax_scale=None,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    block_q=128, block_k=128):
    """Tiled FlashAttention forward on the CPU.

    Iterates over query blocks and, inside, over the key blocks they can see,
    keeping a running row max ``m``, running sum ``l`` and a rescaled output
    accumulator, vectorised over batch and heads. Only
    ``(block_q, block_k)`` score tiles are ever materialised. Key blocks that
    are entirely masked (causal / window) are skipped.

    Parameters
    ----------
    q : array, ``(batch, seqlen_q, heads_q, head_dim)``
    k, v : array, ``(batch, seqlen_k, heads_k, head_dim)``
    block_q, block_k : int
        Tile sizes; need not divide the sequence lengths.
    other keyword arguments
        As for :func:`attention_reference`.

    Returns
    -------
    out : ``q.dtype``, ``(batch, seqlen_q, heads_q, head_dim)``
    lse : float32 (float64 for float64 inputs), ``(batch, heads_q, seqlen_q)``;
        ``+inf`` for rows that see no key (their ``out`` is exactly 0).

    Accumulation is float32 for float16 / float32 inputs, float64 for float64.
    """
    in_dtype = np.asarray(q).dtype
    acc = _acc_dtype(in_dtype)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    scale = _scale(softmax_scale, d)
    left, right = _window(causal, window_size)
    slopes = _slopes(alibi_slopes, b, hq, acc)
    if slopes is not None:
        slopes = np.asarray(slopes, dtype=acc).reshape(b, hk, g, 1, 1)

    Q = _grouped(q, hk, acc)                      # (b, hk, g, sq, d)
    K = _grouped(k, hk, acc)[:, :, 0]             # (b, hk, sk, d)
    V = _grouped(v, hk, acc)[:, :, 0]
    out = np.zeros((b, hk, g, sq, d), dtype=acc)
    lse = np.empty((b, hk, g, sq), dtype=acc)

    for q0 in range(0, sq, block_q):
        q1 = min(q0 + block_q, sq)
        qt = Q[:, :, :, q0:q1]
        m = np.full((b, hk, g, q1 - q0), -np.inf, dtype=acc)
        l = np.zeros_like(m)
        o = np.zeros((b, hk, g, q1 - q0, d), dtype=acc)
        lo, hi = _key_range(sq, sk, left, right, q0, q1)
        # Align to the block grid so tiles match a fixed block_k partition.
        for k0 in range((lo // block_k) * block_k, hi, block_k):
            k1 = min(k0 + block_k, sk)
            s, _, _ = _tile_scores(qt, K[:, :, k0:k1], scale, softcap,
                                   slopes, sq, sk, q0, q1, k0, k1, causal,
                                   window_size, acc)
            m_new = np.maximum(m, s.max(axis=-1))
            # A row with nothing visible yet keeps m = -inf; shift by 0
            # instead so exp() sees -inf - 0 rather than -inf - (-inf).
            m_safe = np.where(np.isneginf(m_new), acc(0), m_new)
            p = np.exp(s - m_safe[..., None])
            alpha = np.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            pv = p.reshape(b, hk, -1, k1 - k0) @ V[:, :, k0:k1]
            o = alpha[..., None] * o + pv.reshape(o.shape)
            m = m_new
        empty = l == 0
        l_safe = np.where(empty, acc(1), l)
        out[:, :, :, q0:q1] = np.where(empty[..., None], acc(0),
                                       o / l_safe[..., None])
        lse[:, :, :, q0:q1] = np.where(empty, acc(np.inf),
                                       m + np.log(l_safe))

    out = out.reshape(b, hq, sq, d).transpose(0, 2, 1, 3).astype(in_dtype)
    return out, lse.reshape(b, hq, sq)


def attention_backward_numpy(dout, q, k, v, out, lse, *, causal=False,
                             softmax_scale=None, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, block_q=128,
                             block_k=128):
    """Tiled FlashAttention backward on the CPU.

    Computes ``D = rowsum(dout * out)``, then loops over key blocks (outer,
    owning dK / dV tiles) and the query blocks that can see them (inner),
    recomputing ``P = exp(s - lse)`` per tile and accumulating dQ.

    Parameters
    ----------
    dout, out : array, ``(batch, seqlen_q, heads_q, head_dim)``
    q, k, v : as for :func:`attention_numpy`.
    lse : array, ``(batch, heads_q, seqlen_q)``, from :func:`attention_numpy`
        (``+inf`` on empty rows, which makes their P and gradients 0).
    other keyword arguments
        As for :func:`attention_numpy`.

    Returns
    -------
    dq, dk, dv : in the input dtype, with the shapes of ``q``, ``k``, ``v``.
    """
    in_dtype = np.asarray(q).dtype
    acc = _acc_dtype(in_dtype)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    scale = _scale(softmax_scale, d)
    left, right = _window(causal, window_size)
    slopes = _slopes(alibi_slopes, b, hq, acc)
    if slopes is not None:
        slopes = np.asarray(slopes, dtype=acc).reshape(b, hk, g, 1, 1)

    Q = _grouped(q, hk, acc)
    K = _grouped(k, hk, acc)[:, :, 0]
    V = _grouped(v, hk, acc)[:, :, 0]
    dO = _grouped(dout, hk, acc)
    O = _grouped(out, hk, acc)
    L = np.asarray(lse, dtype=acc).reshape(b, hk, g, sq)
    delta = np.einsum("bhgsd,bhgsd->bhgs", dO, O)
    del O
    dQ = np.zeros_like(Q)
    dK = np.empty_like(K)
    dV = np.empty_like(V)

    for k0 in range(0, sk, block_k):
        k1 = min(k0 + block_k, sk)
        bk = k1 - k0
        kt, vt = K[:, :, k0:k1], V[:, :, k0:k1]
        dk = np.zeros((b, hk, bk, d), dtype=acc)
        dv = np.zeros_like(dk)
        lo, hi = _query_range(sq, sk, left, right, k0, k1)
        for q0 in range((lo // block_q) * block_q, hi, block_q):
            q1 = min(q0 + block_q, sq)
            bq = q1 - q0
            qt = Q[:, :, :, q0:q1]
            s, _, tanh = _tile_scores(qt, kt, scale, softcap, slopes, sq, sk,
                                      q0, q1, k0, k1, causal, window_size,
                                      acc)
            # Masked entries are -inf and empty rows have lse = +inf, so
            # exp() gives exact zeros there without any inf - inf.
            p = np.exp(s - L[:, :, :, q0:q1, None])
            p2 = p.reshape(b, hk, g * bq, bk)
            dot = dO[:, :, :, q0:q1].reshape(b, hk, g * bq, d)
            # Summing over g*bq rows folds the GQA group into its kv head.
            dv += p2.swapaxes(-1, -2) @ dot
            dp = (dot @ vt.swapaxes(-1, -2)).reshape(p.shape)
            ds = p * (dp - delta[:, :, :, q0:q1, None])
            if tanh is not None:
                ds *= 1 - tanh * tanh
            ds2 = ds.reshape(b, hk, g * bq, bk) * acc(scale)
            dQ[:, :, :, q0:q1] += (ds2 @ kt).reshape(b, hk, g, bq, d)
            dk += ds2.swapaxes(-1, -2) @ qt.reshape(b, hk, g * bq, d)
        dK[:, :, k0:k1] = dk
        dV[:, :, k0:k1] = dv

    dq = dQ.reshape(b, hq, sq, d).transpose(0, 2, 1, 3).astype(in_dtype)
    dk = dK.transpose(0, 2, 1, 3).astype(in_dtype)
    dv = dV.transpose(0, 2, 1, 3).astype(in_dtype)
    return dq, dk, dv
