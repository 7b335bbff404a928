"""BlockMask.kernel_tables (cuflash/block_mask.py): the block-sparse tables the GPU kernels walk, checked on the
CPU against a brute-force reconstruction. For random masks of every constructor (dense, mask function,
broadcast lists with a head-dependent callable, FlexAttention-style lists of head 0, no element mask), odd
and even sequence lengths, two block shapes, three tile shapes, four visibility windows and both directions:
every visible attended element lies in a listed tile; on listed tiles the element mask rebuilt from the store
(or all True for pidx -1) equals the dense mask with visibility (folded into the tables); lists are ordered and
packed as the kernels read them; the store is zero past the sequence; bad arguments raise.
"""

import numpy as np
import pytest

from cuflash import BlockMask
from cuflash.block_mask import KernelTables

BATCH, HEADS_Q = 2, 4
BLOCKS = [(128, 128), (256, 128)]
TILES = [(128, 128), (128, 64), (64, 128)]


def _windows(sq, sk):
    """(window_left, window_right): unbounded, causal, a sliding window, and the band |i + off - j| <= 1 (off =
    seqlen_k - seqlen_q), three keys wide, whose edges cross every tile boundary near the diagonal, so that a
    filter off by one loses attended elements."""
    return [(sq + sk, sq + sk), (sq + sk, 0), (150, 40), (1, 1)]


def _random_dense(rng, shape):
    """A bool mask with empty, full and mixed 128 x 128 cells, the mixed ones made of empty, full and random
    64 x 64 sub-cells: block masks then hold full, partial and empty blocks, and partial blocks hold tiles
    that are all False or all True."""
    b, h, sq, sk = shape

    def cells(size, p):
        kinds = rng.choice(3, size=(b, h, -(-sq // size), -(-sk // size)), p=p)
        return kinds.repeat(size, 2).repeat(size, 3)[:, :, :sq, :sk]

    big, small = cells(128, [0.3, 0.2, 0.5]), cells(64, [0.4, 0.3, 0.3])
    kind = np.where(big == 2, small, big)
    return (kind == 1) | ((kind == 2) & (rng.random(shape) < 0.3))


def _window_doc_fn(sq, sk):
    """A sliding window around the aligned diagonal with a per-batch document mask (documents of varying
    length), the kind of mask a FlexAttention user builds."""
    rng = np.random.default_rng([sq, sk])
    off = sk - sq
    # Queries and keys on one timeline (query i at key position i + off), cut into documents.
    docs = np.cumsum(rng.random((BATCH, max(sq, sk) + abs(off))) < 0.01, axis=1)
    shift_q, shift_k = max(off, 0), max(-off, 0)

    def fn(b, h, q, kv):
        return (np.abs(q + off - kv) <= 90) & (docs[b, q + shift_q] == docs[b, kv + shift_k])
    return fn


def _head_fn(b, h, q, kv):
    """Depends on the head and the batch: each head its own stripe pattern, batch 1 a band of global keys;
    head 3 attends nothing in its first 40 rows."""
    return ((((q // 7) + (kv // 11) + h) % 3 == 0) | ((b == 1) & (kv < 20))) & ~((h == 3) & (q < 40))


def _make(kind, sq, sk, block):
    """A BlockMask of the given kind for a (BATCH, HEADS_Q, sq, sk) problem."""
    rng = np.random.default_rng([KINDS.index(kind), sq, sk, *block])
    if kind == "dense":
        return BlockMask.from_dense(_random_dense(rng, (BATCH, HEADS_Q, sq, sk)), block)
    if kind == "dense_b1":  # lists and mask broadcast over the batch
        return BlockMask.from_dense(_random_dense(rng, (1, HEADS_Q, sq, sk)), block)
    if kind == "dense_h1":  # ... over the heads (the backward's tables then serve every head of a group)
        return BlockMask.from_dense(_random_dense(rng, (BATCH, 1, sq, sk)), block)
    if kind == "window_doc":
        return BlockMask.from_mask_fn(_window_doc_fn(sq, sk), BATCH, HEADS_Q, sq, sk, block)
    if kind == "bcast_callable":
        # Lists with B = H = 1 holding every block any (b, h) attends (none full), the element mask depending
        # on (b, h): evaluated at the real indices.
        idx = np.ix_(np.arange(BATCH), np.arange(HEADS_Q), np.arange(sq), np.arange(sk))
        dense = np.broadcast_to(_head_fn(*idx), (BATCH, HEADS_Q, sq, sk))
        blocks = BlockMask.from_dense(dense.any((0, 1), keepdims=True), block)
        union = blocks._full | blocks._partial
        num, ind = union.sum(-1), np.argsort(~union, axis=-1, kind="stable")
        return BlockMask(num, ind, block_size=block, seq_lengths=(sq, sk), mask=_head_fn)
    if kind == "flex_head0":  # FlexAttention's create_block_mask(B=None, H=None): the lists of (0, 0)
        return BlockMask.from_mask_fn(_head_fn, None, None, sq, sk, block)
    if kind == "no_mask":  # lists alone: every listed block attended whole
        dense = _random_dense(rng, (1, 1, sq, sk))
        blocks = BlockMask.from_dense(dense, block)
        return BlockMask(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                         blocks.full_kv_indices, block_size=block, seq_lengths=(sq, sk))
    raise AssertionError(kind)


def _expected_grid(bm, batch, heads_q):
    """(Bg, Hg) by the documented rule: 1 where the lists broadcast and the element mask cannot vary."""
    mask_dims = (1, 1) if bm.mask is None else (None, None) if callable(bm.mask) else \
        ((1, 1, 1, 1) + np.shape(bm.mask))[-4:-2]
    return tuple(1 if n == 1 and m == 1 else want for n, m, want in zip(bm.shape[:2], mask_dims, (batch, heads_q)))


def _visible(sq, sk, wl, wr):
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    off = sk - sq
    return (j >= i + off - wl) & (j <= i + off + wr)


def _check(bm, t, dense, *, direction, heads_k, tile_m, tile_n, wl, wr, batch=BATCH, heads_q=HEADS_Q):
    """Every property of ``t`` against the brute-force ``dense`` (batch, heads_q, sq, sk) mask."""
    sq, sk = bm.seq_lengths
    bq, bk = bm.block_size
    n_mt, n_nt = -(-sq // tile_m), -(-sk // tile_n)
    group = heads_q // heads_k
    off = sk - sq

    # Layout and dtypes.
    assert isinstance(t, KernelTables) and (t.block_q, t.block_k) == (bq, bk)
    assert t.store.dtype == np.uint8 and t.store.flags.c_contiguous and t.store.ndim == 3
    assert t.store.shape[0] >= 1 and t.store.shape[1:] == (bq, bk) and t.store.max(initial=0) <= 1
    assert t.lists.dtype == np.int32 and t.counts.dtype == np.int32 and t.lists.ndim == 3
    assert t.lists.shape == (len(t.counts), t.list_len, 2) and t.list_len == max(1, int(t.counts.max(initial=0)))
    valid = np.arange(t.list_len)[None, :] < t.counts[:, None]
    assert not t.lists[~valid].any(), "entries past counts[r] must be zeros"
    bg, hg = _expected_grid(bm, batch, heads_q)
    per_head = n_mt if direction == "fwd" else n_nt
    heads_rows = 1 if hg == 1 else (heads_q if direction == "fwd" else heads_k)
    assert t.head_stride == (0 if hg == 1 else per_head)
    assert t.batch_stride == (0 if bg == 1 else heads_rows * per_head)
    assert len(t.counts) == bg * heads_rows * per_head
    # Identical partial masks share one entry.
    assert len({blk.tobytes() for blk in t.store}) == len(t.store) or len(t.store) == 1

    # Read the lists as the kernels do: row r = b * batch_stride + h * head_stride + tile.
    n_h = heads_q if direction == "fwd" else heads_k
    rows = (np.arange(batch)[:, None, None] * t.batch_stride + np.arange(n_h)[None, :, None] * t.head_stride
            + np.arange(per_head)[None, None, :])
    assert set(np.unique(rows)) == set(range(len(t.counts))), "every row is some (b, h, tile)'s"
    entries, ok = t.lists[rows], valid[rows]  # (batch, n_h, per_head, L, 2), (batch, n_h, per_head, L)
    # Ascending within a row (g major, mt minor in the backward), which also rules out a tile listed twice.
    steps = np.diff(entries[..., 0], axis=-1)
    assert (steps[ok[..., 1:]] > 0).all(), "entries must ascend"
    b_i, h_i, tile_i, _ = np.nonzero(ok)
    first, pidx = entries[..., 0][ok], entries[..., 1][ok]
    if direction == "fwd":
        h, mt, nt = h_i, tile_i, first
    else:
        g, mt, nt = first >> 16, first & 0xFFFF, tile_i
        assert (g < group).all()
        h = h_i * group + g
    assert ((nt >= 0) & (nt < n_nt) & (mt >= 0) & (mt < n_mt)).all() and ((pidx >= -1) & (pidx < len(t.store))).all()
    tiles = np.full((batch, heads_q, n_mt, n_nt), -2, np.int32)  # -2: not listed
    tiles[b_i, h, mt, nt] = pidx
    assert (tiles != -2).sum() == len(pidx), "a tile listed twice"

    # Listed only where the block is attended and the tile's rows may see its keys.
    m0, n0 = np.arange(n_mt) * tile_m, np.arange(n_nt) * tile_n
    m1, n1 = np.minimum(m0 + tile_m, sq) - 1, np.minimum(n0 + tile_n, sk) - 1
    attended = np.broadcast_to(bm._full | bm._partial, (batch, heads_q) + bm._full.shape[2:])
    attended = attended[:, :, (m0 // bq)[:, None], (n0 // bk)[None, :]]
    tile_vis = (n0[None, :] <= m1[:, None] + off + wr) & (n1[None, :] >= m0[:, None] + off - wl)
    assert not ((tiles != -2) & ~(attended & tile_vis)).any()

    # The store: zero past the sequence; within a listed tile of a partial block, not all False, and not all
    # True where the tile lies inside the sequence (those read no mask).
    used = tiles >= 0
    bt, ht, mtt, ntt = np.nonzero(used)
    p = tiles[used]
    qb, kb = mtt * tile_m // bq, ntt * tile_n // bk
    for i in np.unique(p[qb == (sq - 1) // bq]):
        assert not t.store[i, (sq - 1) % bq + 1:].any()
    for i in np.unique(p[kb == (sk - 1) // bk]):
        assert not t.store[i, :, (sk - 1) % bk + 1:].any()
    sub = t.store.reshape(len(t.store), bq // tile_m, tile_m, bk // tile_n, tile_n)
    where = (p, (mtt * tile_m % bq) // tile_m, (ntt * tile_n % bk) // tile_n)
    assert sub.any(axis=(2, 4))[where].all()
    inside = (m1[mtt] - m0[mtt] + 1 == tile_m) & (n1[ntt] - n0[ntt] + 1 == tile_n)
    assert not (sub.all(axis=(2, 4))[where] & inside).any()

    # Rebuild the element mask of listed tiles and compare with the brute force, element by element.
    i, j = np.arange(sq), np.arange(sk)
    code = tiles[:, :, (i // tile_m)[:, None], (j // tile_n)[None, :]]  # (batch, heads_q, sq, sk)
    stored = t.store[np.maximum(code, 0), (i % bq)[:, None], (j % bk)[None, :]].astype(bool)
    covered = code != -2
    vis = _visible(sq, sk, wl, wr)
    # (visibility is folded into the tables: the kernels apply no window of their own)
    recon = covered & ((code == -1) | stored)
    target = dense & vis
    assert not (target & ~covered).any(), "a visible attended element outside every listed tile"
    assert (recon == target).all(), f"{(recon != target).sum()} elements differ from the brute force"

    # The launch order: a permutation of the grid cells, lists over twice the mean length first (longest
    # first), then the rest in cell order.
    heads = heads_k if direction == "bwd" else heads_q
    per = t.order.size // (batch * heads)
    cell = np.arange(t.order.size)
    row = cell // (heads * per) * t.batch_stride + cell // per % heads * t.head_stride + cell % per
    lengths = t.counts[row]
    n_long = int((lengths > 2 * lengths.mean()).sum())
    assert np.array_equal(np.sort(t.order), cell)
    assert (np.diff(lengths[t.order[:n_long]]) <= 0).all() and (lengths[t.order[:n_long]] > 2 * lengths.mean()).all()
    assert (np.diff(t.order[n_long:]) > 0).all()

    if direction == "bwd" and hg == 1:  # one table serves the group: each g lists the same query tiles
        for r in range(len(t.counts)):
            e = t.lists[r, :t.counts[r]]
            assert len(e) % group == 0
            per_g = e.reshape(group, -1, 2)
            assert ((per_g[..., 0] >> 16) == np.arange(group)[:, None]).all()
            assert (per_g[..., 0] & 0xFFFF == per_g[:1, :, 0] & 0xFFFF).all()
            assert (per_g[..., 1] == per_g[:1, :, 1]).all()


KINDS = ["dense", "dense_b1", "dense_h1", "window_doc", "bcast_callable", "flex_head0", "no_mask"]
CASES = [pytest.param(kind, seqlens, id=f"{kind}-{seqlens[0]}x{seqlens[1]}")
         for kind in KINDS for seqlens in [(300, 517), (517, 300)]]
CASES += [pytest.param(kind, (256, 384), id=f"{kind}-256x384") for kind in ("dense", "window_doc")]


@pytest.mark.parametrize("kind, seqlens", CASES)
def test_tables_match_brute_force(kind, seqlens):
    sq, sk = seqlens
    for block in BLOCKS:
        bm = _make(kind, sq, sk, block)
        dense = bm.to_dense(BATCH, HEADS_Q)
        for tile_m, tile_n in TILES:
            # Each window in the forward, and in the backward with 1, 2 and 4 KV heads in turn (groups of 4,
            # 2, 1 query heads).
            for n, (wl, wr) in enumerate(_windows(sq, sk)):
                for direction, heads_k in [("fwd", 2), ("bwd", (1, 2, 4)[n % 3])]:
                    t = bm.kernel_tables(batch=BATCH, heads_q=HEADS_Q, heads_k=heads_k, direction=direction,
                                         tile_m=tile_m, tile_n=tile_n, window_left=wl, window_right=wr)
                    _check(bm, t, dense, direction=direction, heads_k=heads_k, tile_m=tile_m, tile_n=tile_n,
                           wl=wl, wr=wr)


def test_partial_blocks_all_true_become_full_all_false_dropped():
    # Every block listed partial. The element mask makes block (0, 0) all False, block (0, 1) all True over
    # its real elements (keys 128..199: the sequence cuts the block), blocks (1, 0) and (1, 1) mixed.
    sq, sk = 256, 200

    def fn(b, h, q, kv):
        return (q < 128) & (kv >= 128) | (q >= 128) & ((q + kv) % 2 == 0)
    bm = BlockMask(np.full((1, 1, 2), 2), np.array([[[[0, 1], [0, 1]]]]), block_size=128, seq_lengths=(sq, sk),
                   mask=fn)
    t = bm.kernel_tables(batch=1, heads_q=1, heads_k=1, direction="fwd", tile_m=128, tile_n=128,
                         window_left=sq + sk, window_right=sq + sk)
    assert t.counts.tolist() == [1, 2]
    assert t.lists[0, 0].tolist() == [1, -1]  # (0, 0) dropped, (0, 1) full
    assert t.lists[1, :, 0].tolist() == [0, 1] and (t.lists[1, :, 1] >= 0).all()
    assert t.store.shape == (2, 128, 128)  # the cut block differs from the other by its zero columns
    _check(bm, t, bm.to_dense(1, 1), direction="fwd", heads_k=1, tile_m=128, tile_n=128, wl=sq + sk, wr=sq + sk,
           batch=1, heads_q=1)


def test_no_partial_blocks_still_one_store_block():
    bm = BlockMask.from_dense(np.ones((300, 300), bool), 128)
    t = bm.kernel_tables(batch=3, heads_q=2, heads_k=1, direction="fwd", tile_m=128, tile_n=128,
                         window_left=600, window_right=600)
    assert t.store.shape == (1, 128, 128) and not t.store.any()
    assert (t.lists[:, :, 1][np.arange(t.list_len) < t.counts[:, None]] == -1).all()
    assert t.batch_stride == 0 and t.head_stride == 0 and t.counts.tolist() == [3, 3, 3]


def test_element_mask_evaluated_in_chunks_at_clipped_indices():
    sq, sk, block = 300, 517, (128, 128)
    calls = []

    def fn(b, h, q, kv):
        calls.append((b.shape, h.shape, q.shape, kv.shape, b.dtype, q.dtype, kv.dtype, q.max(), kv.max()))
        return _head_fn(b, h, q, kv)
    bm = _make("bcast_callable", sq, sk, block)
    bm = BlockMask(bm.kv_num_blocks, bm.kv_indices, block_size=block, seq_lengths=(sq, sk), mask=fn)
    n_partial = int(bm._partial.sum()) * BATCH * HEADS_Q  # lists broadcast, a callable: every real (b, h)
    t = bm.kernel_tables(batch=BATCH, heads_q=HEADS_Q, heads_k=2, direction="fwd", tile_m=128, tile_n=128,
                         window_left=sq + sk, window_right=sq + sk)
    assert len(calls) < n_partial / 4  # blocks go to the mask function together, not one by one
    assert sum(c[0][0] for c in calls) == n_partial
    for bs, hs, qs, ks, bt, qt, kt, qmax, kmax in calls:
        n = bs[0]
        assert 1 <= n <= 256 and bs == hs == (n, 1, 1) and qs == (n, 128, 1) and ks == (n, 1, 128)
        assert bt == qt == kt == np.int64 and qmax < sq and kmax < sk
    # The tables and the store are cached: no more calls, the same objects.
    before = len(calls)
    again = bm.kernel_tables(batch=BATCH, heads_q=HEADS_Q, heads_k=2, direction="fwd", tile_m=128, tile_n=128,
                             window_left=sq + sk, window_right=sq + sk)
    other = bm.kernel_tables(batch=BATCH, heads_q=HEADS_Q, heads_k=2, direction="bwd", tile_m=64, tile_n=128,
                             window_left=sq + sk, window_right=0)
    assert again is t and len(calls) == before
    # A causal window cuts blocks: their entries (mask AND visibility) follow the shared partial store's.
    assert np.array_equal(other.store[:len(t.store)], t.store)
    assert not t.store.flags.writeable and not t.lists.flags.writeable and not t.counts.flags.writeable
    _check(bm, other, bm.to_dense(BATCH, HEADS_Q), direction="bwd", heads_k=2, tile_m=64, tile_n=128,
           wl=sq + sk, wr=0)


def _tables(bm, **kw):
    args = dict(batch=BATCH, heads_q=HEADS_Q, heads_k=2, direction="fwd", tile_m=128, tile_n=128,
                window_left=1000, window_right=1000)
    args.update(kw)
    return bm.kernel_tables(**args)


@pytest.mark.parametrize("block, tile", [((128, 128), (96, 128)), ((128, 128), (128, 256)), ((256, 128), (128, 48)),
                                         ((128, 64), (256, 64))])
def test_tiles_must_divide_blocks(block, tile):
    bm = _make("dense", 300, 517, block)
    with pytest.raises(ValueError, match=r"block_size.*\(%d, %d\)" % block) as err:
        _tables(bm, tile_m=tile[0], tile_n=tile[1])
    assert "(%d, %d)" % tile in str(err.value)


def test_bad_arguments_raise():
    bm = _make("dense", 300, 517, (128, 128))
    with pytest.raises(ValueError, match="multiple of heads_k"):
        _tables(bm, heads_k=3)
    with pytest.raises(ValueError, match="block_mask is for shape"):
        _tables(bm, batch=3)
    with pytest.raises(ValueError, match="block_mask is for shape"):
        _tables(bm, heads_q=2, heads_k=2)
    with pytest.raises(ValueError, match="direction"):
        _tables(bm, direction="both")
    with pytest.raises(TypeError, match="tile_m"):
        _tables(bm, tile_m=128.0)
    with pytest.raises(ValueError, match="element mask"):  # a dense element mask for another batch size
        BlockMask(np.zeros((1, 1, 3), int), np.zeros((1, 1, 3, 5), int), seq_lengths=(300, 517),
                  mask=np.ones((2, 1, 300, 517), bool)).kernel_tables(
            batch=3, heads_q=1, heads_k=1, direction="fwd", tile_m=128, tile_n=128, window_left=0, window_right=0)


def test_backward_packing_limits():
    # 65537 query tiles of one row do not fit the backward's 16 bits; the forward has no such limit.
    sq = (1 << 16) + 1
    bm = BlockMask(np.ones((1, 1, sq), int), np.zeros((1, 1, sq, 1), int), block_size=(1, 128), seq_lengths=(sq, 128))
    kw = dict(batch=1, heads_q=1, heads_k=1, tile_m=1, tile_n=128, window_left=2 * sq, window_right=2 * sq)
    assert bm.kernel_tables(direction="fwd", **kw).counts.sum() == sq
    with pytest.raises(ValueError, match="16"):
        bm.kernel_tables(direction="bwd", **kw)
    # A group over 2**14 query heads per KV head does not fit either.
    bm = BlockMask(np.ones((1, 1, 1), int), np.zeros((1, 1, 1, 1), int), seq_lengths=(100, 100))
    with pytest.raises(ValueError, match="group"):
        bm.kernel_tables(batch=1, heads_q=1 << 15, heads_k=1, direction="bwd", tile_m=128, tile_n=128,
                         window_left=200, window_right=200)
