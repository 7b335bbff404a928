"""cuflash.BlockMask (cuflash/block_mask.py) and block_mask= on the CPU path: FlexAttention's int32 layout
(partial and full key-block lists per query block, the query-side lists built from them), the three
constructors agree with the dense mask they describe, attention with a block mask equals the float64
reference with that dense mask (forward and backward, composed with causal, softcap, ALiBi, GQA), skipped
blocks are never computed, and malformed masks raise naming what is wrong.
"""

import numpy as np
import pytest

import cuflash
from cuflash import BlockMask, reference

B, SQ, SK, HQ, HK, D = 2, 70, 95, 4, 2, 16


def _fn(b, h, q, kv):
    """A sliding window, a few global keys, a per-(batch, head) extra block, a head with empty rows."""
    return ((np.abs(q + 25 - kv) < 9) | (kv < 3) | ((h == 1) & (b == 1) & (kv > 80))) & ~((h == 3) & (q < 5))


def _dense(batch=B, heads=HQ):
    idx = np.ix_(np.arange(batch), np.arange(heads), np.arange(SQ), np.arange(SK))
    return np.broadcast_to(_fn(*idx), (batch, heads, SQ, SK))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s) for s in ((B, SQ, HQ, D), (B, SK, HK, D), (B, SK, HK, D), (B, SQ, HQ, D)))


@pytest.mark.parametrize("block_size", [16, (16, 32), 128])
def test_constructors_describe_the_dense_mask(block_size):
    dense = _dense()
    for bm in (BlockMask.from_dense(dense, block_size), BlockMask.from_mask_fn(_fn, B, HQ, SQ, SK, block_size)):
        np.testing.assert_array_equal(bm.to_dense(), dense)
        bq, bk = (block_size, block_size) if np.isscalar(block_size) else block_size
        nq, nk = -(-SQ // bq), -(-SK // bk)
        assert bm.kv_num_blocks.shape == (B, HQ, nq) and bm.kv_indices.shape == (B, HQ, nq, nk)
        assert bm.kv_num_blocks.dtype == np.int32 and bm.full_kv_indices.dtype == np.int32
        # Full blocks are all True in the dense mask, partial ones mixed, the rest all False.
        for b, h, i in [(0, 0, 0), (1, 1, nq - 1), (1, 3, 0)]:
            rows = dense[b, h, i * bq:(i + 1) * bq]
            for j in range(nk):
                blk = rows[:, j * bk:(j + 1) * bk]
                full = j in bm.full_kv_indices[b, h, i, :bm.full_kv_num_blocks[b, h, i]]
                part = j in bm.kv_indices[b, h, i, :bm.kv_num_blocks[b, h, i]]
                assert (full, part) == (bool(blk.all()), bool(blk.any() and not blk.all()))
        # The query-side lists are the transposed tables.
        for j in range(nk):
            qs = set(bm.q_indices[1, 1, j, :bm.q_num_blocks[1, 1, j]])
            assert qs == {i for i in range(nq) if j in bm.kv_indices[1, 1, i, :bm.kv_num_blocks[1, 1, i]]}


def test_lists_round_trip_and_broadcast():
    bm = BlockMask.from_mask_fn(lambda b, h, q, kv: kv <= q, 1, 1, SQ, SK, block_size=16)
    again = BlockMask(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                      block_size=16, seq_lengths=(SQ, SK), mask=lambda b, h, q, kv: kv <= q)
    np.testing.assert_array_equal(again.to_dense(), bm.to_dense())
    assert bm.shape == (1, 1, SQ, SK)
    q, k, v, _ = _inputs()
    out = cuflash.attention(q, k, v, block_mask=bm)
    ref, _ = reference.attention_reference(q, k, v, attn_mask=np.arange(SK)[None] <= np.arange(SQ)[:, None])
    np.testing.assert_allclose(out, ref, atol=1e-12)


OPTIONS = [dict(), dict(causal=True, softcap=2.0),
           dict(window_size=(20, 3), alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32))]


@pytest.mark.parametrize("opts", OPTIONS)
def test_attention_with_block_mask_equals_dense_reference(opts):
    q, k, v, do = _inputs()
    bm = BlockMask.from_mask_fn(_fn, B, HQ, SQ, SK, block_size=(16, 32))
    dense = _dense()
    out, lse = cuflash.attention(q, k, v, block_mask=bm, return_lse=True, **opts)
    ref, ref_lse = reference.attention_reference(q, k, v, attn_mask=dense, **opts)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    assert (out[:, :5, 3] == 0).all()                 # head 3's first rows see nothing
    grads = cuflash.attention_backward(do, q, k, v, out, lse, block_mask=bm, **opts)
    for g, r in zip(grads, reference.attention_backward_reference(do, q, k, v, attn_mask=dense, **opts)):
        np.testing.assert_allclose(g, r, atol=1e-11)


def test_skipped_blocks_are_not_computed(monkeypatch):
    """With a block-diagonal mask, the CPU path computes only the tiles the mask admits."""
    calls = []
    real = reference._tile_scores
    monkeypatch.setattr(reference, "_tile_scores", lambda *a, **kw: (calls.append(a[7:11]), real(*a, **kw))[1])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 256, 1, 16)) for _ in range(3))
    bm = BlockMask.from_mask_fn(lambda b, h, qi, kv: qi // 64 == kv // 64, 1, 1, 256, 256, block_size=64)
    reference.attention_numpy(q, k, v, block_mask=bm, block_q=64, block_k=64)
    assert sorted((q0, k0) for q0, _, k0, _ in calls) == [(0, 0), (64, 64), (128, 128), (192, 192)]


@pytest.mark.parametrize("make,exc,match", [
    (lambda: BlockMask(np.zeros((1, 1, 3), np.int32), np.zeros((1, 1, 2, 4), np.int32), seq_lengths=(100, 100),
                       block_size=32), ValueError, "same"),
    (lambda: BlockMask(np.zeros((1, 1, 3), np.int32), np.zeros((1, 1, 3, 4), np.int32), seq_lengths=(200, 100),
                       block_size=32), ValueError, "query blocks"),
    (lambda: BlockMask(np.full((1, 1, 4), 5, np.int32), np.zeros((1, 1, 4, 4), np.int32), seq_lengths=(100, 100),
                       block_size=32), ValueError, r"kv_num_blocks must be in \[0, 4\]"),
    (lambda: BlockMask(np.ones((1, 1, 4), np.int32), np.full((1, 1, 4, 4), 4, np.int32), seq_lengths=(100, 100),
                       block_size=32), ValueError, "kv_indices must be key-block indices"),
    (lambda: BlockMask(np.ones((1, 1, 4), np.int32), np.zeros((1, 1, 4, 4), np.int32), np.ones((1, 1, 4), np.int32),
                       seq_lengths=(100, 100), block_size=32), ValueError, "go together"),
    (lambda: BlockMask.from_dense(np.ones((4, 4), np.int8)), TypeError, "mask must be bool"),
    (lambda: BlockMask.from_dense(np.ones((4, 4), bool), block_size=0), ValueError, "block_size must be"),
    (lambda: BlockMask.from_dense(np.ones((4, 4), bool), block_size=(2,)), ValueError, "block_size must be"),
    (lambda: BlockMask.from_mask_fn(lambda b, h, q, kv: q >= kv, 1, 1, 8, 8, block_size=-1), ValueError,
     "block_size must be"),
    (lambda: BlockMask(np.ones((1, 1, 1), np.int32), np.zeros((1, 1, 1, 1), np.int32), block_size=8,
                       seq_lengths=(8, 8), mask=np.ones((3, 3), bool)), ValueError, "mask must broadcast"),
    (lambda: BlockMask(np.ones((1, 1, 1), np.int32), np.zeros((1, 1, 1, 1), np.int32), block_size=8,
                       seq_lengths=(8, 8), mask=np.ones((8, 8), np.float32)), TypeError, "mask must be a bool"),
    (lambda: BlockMask(np.ones((2, 1, 1), np.int32), np.zeros((2, 1, 1, 1), np.int32), np.zeros((1, 1, 1), np.int32),
                       np.zeros((1, 1, 1, 1), np.int32), block_size=8, seq_lengths=(8, 8)), ValueError,
     "must be the same"),
])
def test_malformed_block_masks_raise(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_broadcast_lists_take_the_element_mask_at_each_batch_and_head():
    """Lists with B = H = 1 whose blocks are all partial, over an element mask that depends on the batch and
    head: partial blocks evaluate the mask at the real (b, h), a dense (B, H, ...) mask and a function alike
    (as FlexAttention calls mask_mod); the result equals the reference with the full dense mask. And
    from_mask_fn takes batch / heads None (FlexAttention's broadcast) for a mask that ignores them."""
    q, k, v, do = _inputs()
    lens = np.array([SK, 40])

    def fn(b, h, q_idx, kv_idx):
        return (kv_idx < lens[b]) & ((h != 3) | (kv_idx <= q_idx + 25))

    idx = np.ix_(np.arange(B), np.arange(HQ), np.arange(SQ), np.arange(SK))
    dense = np.broadcast_to(fn(*idx), (B, HQ, SQ, SK))
    every = _lists_of(np.ones((1, 1, -(-SQ // 16), -(-SK // 16)), bool))
    for bm in (BlockMask(*every, block_size=16, seq_lengths=(SQ, SK), mask=fn),
               BlockMask(*every, block_size=16, seq_lengths=(SQ, SK), mask=dense)):
        assert bm.shape[:2] == (1, 1)
        np.testing.assert_array_equal(bm.to_dense(B, HQ), dense)
        out = cuflash.attention(q, k, v, block_mask=bm)
        ref, _ = reference.attention_reference(q, k, v, attn_mask=dense)
        np.testing.assert_allclose(out, ref, atol=1e-12)
        for g, r in zip(cuflash.attention_backward(do, q, k, v, out, cuflash.attention(q, k, v, block_mask=bm,
                                                                                         return_lse=True)[1],
                                                   block_mask=bm),
                        reference.attention_backward_reference(do, q, k, v, attn_mask=dense)):
            np.testing.assert_allclose(g, r, atol=1e-11)
    causal = BlockMask.from_mask_fn(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 25, None, None, SQ, SK, 16)
    np.testing.assert_array_equal(causal.to_dense()[0, 0], np.arange(SK)[None] <= np.arange(SQ)[:, None] + 25)


def _lists_of(table):
    """(num, indices) of a bool block table, as BlockMask takes them."""
    num = table.sum(-1).astype(np.int32)
    idx = np.argsort(~table, axis=-1, kind="stable").astype(np.int32)
    return num, idx


def test_block_mask_for_another_problem_raises():
    q, k, v, _ = _inputs()
    lists = (np.ones((1, 1, -(-SQ // 16)), np.int32), np.zeros((1, 1, -(-SQ // 16), 1), np.int32))
    with pytest.raises(ValueError, match="element mask has"):  # (B, H) of the element mask: before any work
        cuflash.attention(q, k, v, block_mask=BlockMask(*lists, block_size=16, seq_lengths=(SQ, SK),
                                                        mask=np.ones((3, 1, SQ, SK), bool)))
    with pytest.raises(ValueError, match="block_mask is for shape"):
        cuflash.attention(q, k, v, block_mask=BlockMask.from_dense(np.ones((SQ, SK + 1), bool)))
    with pytest.raises(TypeError, match="block_mask must be a cuflash.BlockMask"):
        cuflash.attention(q, k, v, block_mask=np.ones((SQ, SK), bool))


def test_torch_flex_block_mask_and_autograd():
    """A FlexAttention BlockMask (create_block_mask on the CPU) is taken as is: same dense mask, and torch
    autograd through cuflash.attention with it gives the reference gradients."""
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < 20

    fbm = flex.create_block_mask(mask_mod, 1, 1, SQ, SK, device="cpu", BLOCK_SIZE=32)
    bm = BlockMask.from_flex(fbm)
    want = np.abs(np.arange(SQ)[:, None] - np.arange(SK)[None]) < 20
    np.testing.assert_array_equal(bm.to_dense()[0, 0], want)
    q, k, v, do = (torch.from_numpy(x) for x in _inputs())
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = cuflash.attention(q, k, v, block_mask=fbm)
    grads = torch.autograd.grad(out, (q, k, v), do)
    arrays = [x.detach().numpy() for x in (q, k, v)]
    np.testing.assert_allclose(out.detach().numpy(), reference.attention_reference(*arrays, attn_mask=want)[0],
                               atol=1e-12)
    for g, r in zip(grads, reference.attention_backward_reference(do.numpy(), *arrays, attn_mask=want)):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-11)


def test_gpu_rules_raise_before_anything_is_allocated(monkeypatch):
    """api._check_block_mask's GPU rules, on a stand-in call (no GPU needed): a GPU other than Hopper, a head
    dim without the backward's build, blocks the kernels' tiles do not divide, and the options the block-sparse
    kernels lack raise NotImplementedError naming them; a 128-block mask at head dim 128 passes."""
    import types

    from cuflash import api
    bm = BlockMask.from_dense(np.tril(np.ones((256, 256), bool)))
    call = types.SimpleNamespace(batch=1, heads_q=2, seqlen_q=256, seqlen_k=256, head_dim=128, on_gpu=True, device=0)
    monkeypatch.setattr(api, "_cc", lambda device: (9, 0))
    assert api._check_block_mask(call, bm, None, None, None, backward=True) is bm
    with pytest.raises(NotImplementedError, match="block_size"):
        api._check_block_mask(call, BlockMask.from_dense(np.ones((256, 256), bool), block_size=64), None, None, None)
    with pytest.raises(NotImplementedError, match="head dims up to 128"):
        api._check_block_mask(types.SimpleNamespace(**{**vars(call), "head_dim": 256}), bm, None, None, None,
                              backward=True)
    api._check_block_mask(types.SimpleNamespace(**{**vars(call), "head_dim": 256}), bm, None, None, None)
    for kwargs, name in ((dict(attn_mask=object()), "attn_mask"), (dict(alibi=object()), "alibi_slopes"),
                         (dict(dropout=(0.1, 1, 0)), "dropout"), (dict(deterministic=True), "deterministic")):
        args = {"attn_mask": None, "alibi": None, "dropout": None, "deterministic": False, **kwargs}
        with pytest.raises(NotImplementedError, match=name):
            api._check_block_mask(call, bm, args["attn_mask"], args["alibi"], args["dropout"], args["deterministic"])
    monkeypatch.setattr(api, "_cc", lambda device: (8, 0))
    with pytest.raises(NotImplementedError, match="Hopper"):
        api._check_block_mask(call, bm, None, None, None)


def test_constructors_refuse_what_would_be_misread():
    """A mask function returning scores (0 / -inf) or ints would be read inverted or as truthy: TypeError; a
    result of the wrong shape names fn; negative or fractional lengths, and negative kernel windows (-1 is the
    API's "unbounded", not the tables'), are ValueErrors."""
    with pytest.raises(TypeError, match="fn must return bools"):
        BlockMask.from_mask_fn(lambda b, h, q, k: np.where(q >= k, 0.0, -np.inf), None, None, 70, 90, 16)
    with pytest.raises(ValueError, match="fn"):
        BlockMask.from_mask_fn(lambda b, h, q, k: np.ones((3, 5), bool), None, None, 70, 90, 16)
    for lengths in ((-5, 64), (256.9, 256), (64,)):
        with pytest.raises(ValueError, match="seq_lengths"):
            BlockMask(np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1, 1), np.int32), seq_lengths=lengths)
    bm = BlockMask.from_dense(np.tril(np.ones((64, 64), bool)), 32)
    with pytest.raises(ValueError, match="window_left"):
        bm.kernel_tables(batch=1, heads_q=1, heads_k=1, direction="fwd", tile_m=32, tile_n=32, window_left=-1,
                         window_right=0)
