"""block_mask on GPU arrays (api -> launch_plan -> the Hopper kernels' block-sparse builds, block_sparse.cuh, with
block_mask.py's kernel tables): the forward and backward skip the blocks a cuflash.BlockMask leaves out, read
the element mask of partial blocks only, and follow FlashAttention's rule against the float64 reference of the
same dense mask (2x the same-dtype naive error forward, 3x for the gradients), for masks from dense arrays and
from functions (sliding window plus documents), lists broadcast over batch and heads with an element mask that
depends on the head, causal masks and windows folded into the tables, softcap and GQA, odd lengths, fp16 and
bf16; query rows whose blocks are all skipped give zeros and LSE +inf; what the kernels lack raises
NotImplementedError before a launch; a torch FlexAttention BlockMask round-trips."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import (flash_rule, inputs, kernel_requests, naive_backward_same_dtype, naive_same_dtype, randn_like,
                         require_torch_cuda, skip_unless_hopper, to_device, to_host)

pytestmark = pytest.mark.gpu


def _random_blocks(b, h, sq, sk, seed, keep=0.4, partial=0.5):
    """A dense bool mask whose 128 x 128 blocks are skipped (60%), full, or random inside (about half of the kept
    ones), so that the lists have all three kinds."""
    rng = np.random.default_rng(seed)
    nq, nk = -(-sq // 128), -(-sk // 128)
    kind = rng.random((b, h, nq, nk))
    dense = np.zeros((b, h, nq * 128, nk * 128), bool)
    elem = rng.random(dense.shape) < 0.7
    for bi, hi, i, j in zip(*np.nonzero(kind < keep)):
        tile = np.s_[bi, hi, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
        dense[tile] = elem[tile] if kind[bi, hi, i, j] < keep * partial else True
    dense[:, :, 100:228] = False  # query rows 100..227 see no key at all
    return dense[:, :, :sq, :sk]


def _window_and_documents(b, h, sq, sk):
    """fn(b, h, q, kv): a sliding window of 300 keys whose width grows with the head, plus keys 0..3 (global
    tokens), within documents of 400 tokens (FlexAttention's mask_mod form)."""
    def fn(bb, hh, qi, kv):
        return ((np.abs(qi - kv) <= 300 + 40 * hh) | (kv < 4)) & (qi // 400 == kv // 400)
    return fn


# name: (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, mask, options)
CASES = {
    "dense_gqa_hd128": (2, 700, 700, 4, 2, 128, "dense", dict()),
    "dense_hd64_softcap": (1, 513, 900, 2, 2, 64, "dense", dict(softcap=20.0)),
    "fn_heads_broadcast_causal_hd128": (2, 1000, 1000, 4, 4, 128, "fn", dict(causal=True)),
    "fn_window_hd64_gqa": (1, 900, 900, 4, 1, 64, "fn", dict(window_size=(256, 16))),
    "dense_rect_causal_hd128": (1, 384, 640, 2, 2, 128, "dense", dict(causal=True)),
}


def _block_mask(case):
    b, sq, sk, hq, _, _, kind, _ = CASES[case]
    if kind == "dense":
        return cuflash.BlockMask.from_dense(_random_blocks(b, hq, sq, sk, seed=len(case)))
    return cuflash.BlockMask.from_mask_fn(_window_and_documents(b, hq, sq, sk), None, None, sq, sk)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_follow_flash_rule(case, dtype, monkeypatch):
    skip_unless_hopper()
    requested = kernel_requests(monkeypatch)
    b, sq, sk, hq, hk, d, _, opts = CASES[case]
    bm = _block_mask(case)
    host_mask = bm.to_dense(b, hq)
    q, k, v = inputs(b, sq, sk, hq, hk, d, dtype, seed=len(case))
    out, lse = cuflash.attention(q, k, v, block_mask=bm, return_lse=True, **opts)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    ref, ref_lse = reference.attention_reference(q64, k64, v64, attn_mask=host_mask, **opts)
    flash_rule(to_host(out).astype(np.float64), ref, naive_same_dtype(q, k, v, attn_mask=host_mask, **opts))
    got_lse = to_host(lse)
    np.testing.assert_array_equal(np.isinf(got_lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(got_lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)
    empty = ~host_mask.any(-1)  # (b, h, sq) rows that see no key
    assert np.all(to_host(out).astype(np.float32).transpose(0, 2, 1, 3)[empty] == 0)

    dout = randn_like(out, seed=3)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=bm, **opts)
    refs = reference.attention_backward_reference(to_host(dout).astype(np.float64), q64, k64, v64,
                                                  attn_mask=host_mask, **opts)
    bases = naive_backward_same_dtype(dout, q, k, v, attn_mask=host_mask, **opts)
    for g, r, bse in zip(grads, refs, bases):
        flash_rule(to_host(g).astype(np.float64), r, bse, factor=3.0)
    assert any(n.startswith("fwd_sm90") and "_sparse" in n for n in requested), requested
    assert any(n.startswith("bwd_sm90") and "_sparse" in n for n in requested), requested


def test_a_second_call_reuses_the_uploaded_tables():
    """The tables go to the device once per mask, device and tiling: a repeated call gives the same bits."""
    skip_unless_hopper()
    case = "dense_gqa_hd128"
    b, sq, sk, hq, hk, d, _, opts = CASES[case]
    bm = _block_mask(case)
    q, k, v = inputs(b, sq, sk, hq, hk, d, "bfloat16", seed=1)
    first = to_host(cuflash.attention(q, k, v, block_mask=bm))
    second = to_host(cuflash.attention(q, k, v, block_mask=bm))
    np.testing.assert_array_equal(first.view(np.uint16), second.view(np.uint16))


def test_head_dim_256_forward_and_unsupported_combinations_raise():
    """Head dim 256: the forward's sparse build (64-key tiles inside 128-key blocks) follows the rule, the
    backward (Hopper's covers head dims up to 128) raises NotImplementedError, as do masks with attn_mask,
    ALiBi, dropout or deterministic=True, and block sizes the tiles do not divide."""
    skip_unless_hopper()
    b, sq, sk, hq, hk, d = 1, 300, 333, 2, 1, 256
    bm = cuflash.BlockMask.from_dense(_random_blocks(b, hq, sq, sk, seed=4))
    host_mask = bm.to_dense(b, hq)
    q, k, v = inputs(b, sq, sk, hq, hk, d, "bfloat16", seed=2)
    out, lse = cuflash.attention(q, k, v, block_mask=bm, return_lse=True)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    ref, _ = reference.attention_reference(q64, k64, v64, attn_mask=host_mask)
    flash_rule(to_host(out).astype(np.float64), ref, naive_same_dtype(q, k, v, attn_mask=host_mask))
    with pytest.raises(NotImplementedError, match="head dims up to 128"):
        cuflash.attention_backward(randn_like(out, seed=1), q, k, v, out, lse, block_mask=bm)
    import cupy
    q, k, v = inputs(1, 256, 256, 2, 2, 64, "float16", seed=3)
    bm = cuflash.BlockMask.from_dense(np.tril(np.ones((256, 256), bool)))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        cuflash.attention(q, k, v, block_mask=bm, attn_mask=to_device(np.ones((256, 256), bool)))
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        cuflash.attention(q, k, v, block_mask=bm, alibi_slopes=cupy.ones(2, cupy.float32))
    with pytest.raises(NotImplementedError, match="dropout"):
        cuflash.attention(q, k, v, block_mask=bm, dropout_p=0.1, dropout_seed=1)
    out, lse = cuflash.attention(q, k, v, block_mask=bm, return_lse=True)
    with pytest.raises(NotImplementedError, match="deterministic"):
        cuflash.attention_backward(out, q, k, v, out, lse, block_mask=bm, deterministic=True)
    small = cuflash.BlockMask.from_dense(np.tril(np.ones((256, 256), bool)), block_size=64)
    with pytest.raises(NotImplementedError, match="block_size"):
        cuflash.attention(q, k, v, block_mask=small)


def test_flex_attention_block_mask_round_trip():
    """A torch FlexAttention BlockMask (create_block_mask of a causal document mask_mod) on CUDA tensors: its
    lists and mask_mod reach the kernels; the output and gradients match FlexAttention's within the rule's
    yardstick, the float64 reference of the same dense mask."""
    skip_unless_hopper()
    require_torch_cuda()
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx // 300 == kv_idx // 300)

    flex = create_block_mask(mask_mod, None, None, 640, 640, device="cuda")
    bm = cuflash.BlockMask.from_flex(flex)
    host_mask = bm.to_dense(1, 2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 640, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out, lse = cuflash.attention(q, k, v, block_mask=flex, return_lse=True)
    q64, k64, v64 = (x.double().cpu().numpy() for x in (q, k, v))
    ref, _ = reference.attention_reference(q64, k64, v64, attn_mask=host_mask)
    flash_rule(out.double().cpu().numpy(), ref, naive_same_dtype(q, k, v, attn_mask=host_mask))
    dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=gen)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=flex)
    refs = reference.attention_backward_reference(dout.double().cpu().numpy(), q64, k64, v64, attn_mask=host_mask)
    for g, r, bse in zip(grads, refs, naive_backward_same_dtype(dout, q, k, v, attn_mask=host_mask)):
        flash_rule(g.double().cpu().numpy(), r, bse, factor=3.0)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the
    block-sparse kernels: tiles past the sequence, partial blocks staged from the store, empty rows
    (sanitize_block_mask.py)."""
    skip_unless_hopper()
    from gpu_helpers import run_sanitizer
    run_sanitizer("sanitize_block_mask.py", tool)
