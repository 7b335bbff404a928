"""attn_mask on GPU arrays (api -> launch_plan -> the kernels' element-mask builds, attn_mask.cuh: on Hopper the
wgmma forward and backward (head dims 64 / 128; the sm80 backward above), and the sm80 kernels everywhere,
which Hopper runs too under CUFLASH_FWD_KERNEL / CUFLASH_BWD_KERNEL=sm80): boolean (True = attend) and additive
(q's dtype, added to the scaled scores) masks, broadcast over batch, heads and rows through stride-0 views,
with causal masks, windows, softcap and GQA, fp16 / bf16, head dims 64 to 256 and odd ones, follow
FlashAttention's rule against the float64 reference (2x the same-dtype naive error forward, 3x for the
gradients; the naive attention takes the same mask); rows the mask leaves without keys give zeros and LSE
+inf, and zero gradients; an additive mask of bfloat16's lowest value on a whole row leaves the uniform
average; deterministic dQ is bitwise repeatable; the torch SDPA stand-in with a CUDA mask matches SDPA's
math backend."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import (flash_rule, inputs, kernel_requests, naive_backward_same_dtype, naive_same_dtype, np_dtype,
                         randn_like, require_torch_cuda, same_bits, to_device, to_host)

pytestmark = pytest.mark.gpu


# name: (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, mask shape, kind, options)
CASES = {
    "full_bool_gqa": (2, 130, 197, 4, 2, 64, "bhqk", "bool", dict()),
    "rows_additive_causal": (1, 257, 257, 4, 4, 128, "qk", "additive", dict(causal=True)),
    "keys_bool_window_hd96": (2, 100, 300, 2, 1, 96, "b11k", "bool", dict(window_size=(40, 5))),
    "heads_additive_softcap_hd256": (1, 64, 512, 8, 2, 256, "1hqk", "additive", dict(softcap=20.0)),
    "batch_bool_hd192": (3, 33, 77, 2, 2, 192, "b1qk", "bool", dict()),
    # Rows of 16-byte multiples: the Hopper forward stages these in shared memory (CF_MASK_STAGE).
    "staged_bool_causal_gqa": (2, 200, 256, 4, 2, 128, "bhqk", "bool", dict(causal=True)),
    "staged_bool_window_hd64": (1, 300, 320, 2, 2, 64, "qk", "bool", dict(window_size=(100, 20))),
    "staged_bool_softcap_hd256": (1, 130, 192, 2, 1, 256, "1hqk", "bool", dict(softcap=15.0)),
    "staged_bool_keys_broadcast_rows": (2, 100, 320, 2, 1, 128, "b11k", "bool", dict()),
}
_SHAPES = {"bhqk": lambda b, h, q, k: (b, h, q, k), "qk": lambda b, h, q, k: (q, k),
           "b11k": lambda b, h, q, k: (b, 1, 1, k), "1hqk": lambda b, h, q, k: (1, h, q, k),
           "b1qk": lambda b, h, q, k: (b, 1, q, k)}


def _mask(case, dtype, seed):
    """(host mask, device mask): random with about 30% of the pairs hidden, and where the mask has a query-row
    dimension, rows 3 and 5 hidden whole (every key masked)."""
    b, sq, sk, hq, _, _, layout, kind, _ = CASES[case]
    shape = _SHAPES[layout](b, hq, sq, sk)
    rng = np.random.default_rng(seed)
    hide = rng.random(shape) < 0.3
    if layout not in ("b11k",):
        hide[..., [3, 5], :] = True
    if kind == "bool":
        host = ~hide
        return host, to_device(host)
    host = (rng.standard_normal(shape) * 2).astype(np_dtype(dtype))
    host[hide] = -np.inf
    return host.astype(np.float64), to_device(host)


@pytest.fixture(params=["default", "sm80"])
def family(request, monkeypatch):
    """The kernels a dense masked call runs: the GPU's own (the wgmma ones on Hopper), or the sm80 ones."""
    if request.param == "sm80":
        monkeypatch.setenv("CUFLASH_FWD_KERNEL", "sm80")
        monkeypatch.setenv("CUFLASH_BWD_KERNEL", "sm80")
    return request.param


def _expect_families(family, head_dim, requested):
    """The kernel variants asked for (gpu_helpers.kernel_requests) are the mask builds of the families the
    calls should have run."""
    import cupy
    hopper = int(cupy.cuda.Device().compute_capability) == 90 and family == "default"
    masked = {name.split("_bf16")[0].split("_fp16")[0] for name in requested if "_mask" in name}
    assert ("fwd_sm90" if hopper else "fwd_sm80") in masked, requested
    assert ("bwd_sm90" if hopper and head_dim <= 128 else "bwd_sm80") in masked, requested
    return hopper


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_follow_flash_rule(case, dtype, family, monkeypatch):
    requested = kernel_requests(monkeypatch)
    b, sq, sk, hq, hk, d, layout, kind, opts = CASES[case]
    q, k, v = inputs(b, sq, sk, hq, hk, d, dtype, seed=len(case))
    host_mask, mask = _mask(case, dtype, seed=7)
    out, lse = cuflash.attention(q, k, v, attn_mask=mask, return_lse=True, **opts)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    ref, ref_lse = reference.attention_reference(q64, k64, v64, attn_mask=host_mask, **opts)
    base = naive_same_dtype(q, k, v, attn_mask=host_mask, **opts)
    flash_rule(to_host(out).astype(np.float64), ref, base)
    got_lse = to_host(lse)
    np.testing.assert_array_equal(np.isinf(got_lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(got_lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)
    if layout != "b11k":  # rows 3 and 5 see no key: zeros, LSE +inf
        assert not np.any(to_host(out).astype(np.float32)[:, [3, 5]])
        assert np.all(np.isinf(got_lse[:, :, [3, 5]]))

    dout = randn_like(out, seed=3)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, attn_mask=mask, **opts)
    refs = reference.attention_backward_reference(to_host(dout).astype(np.float64), q64, k64, v64,
                                                  attn_mask=host_mask, **opts)
    bases = naive_backward_same_dtype(dout, q, k, v, attn_mask=host_mask, **opts)
    for g, r, bse in zip(grads, refs, bases):
        flash_rule(to_host(g).astype(np.float64), r, bse, factor=3.0)
    if layout != "b11k":
        assert not np.any(to_host(grads[0]).astype(np.float32)[:, [3, 5]])
    if _expect_families(family, d, requested) and case.startswith("staged"):
        assert any(n.startswith("fwd_sm90") and "_staged" in n for n in requested), requested
        if d == 128:  # (the Hopper backward stages at its 64-query tiles, head dim 128)
            assert any(n.startswith("bwd_sm90") and "_staged" in n for n in requested), requested


def test_staged_mask_rows_longer_than_seqlen_k():
    """A boolean mask sliced from wider rows (row stride 336 bytes, seqlen_k 330): the Hopper kernels stage it
    (the rows are 16-byte aligned) and the last 16-byte copy of each row takes 10 bytes, zero-filling the rest;
    forward and backward follow the rule, and the 6 bytes past each row (set True here) never count."""
    q, k, v = inputs(2, 100, 330, 2, 2, 128, "bfloat16", seed=11)
    rng = np.random.default_rng(12)
    wide = rng.random((100, 336)) < 0.7
    wide[:, 330:] = True
    host = wide[:, :330]
    import cupy
    mask = cupy.asarray(wide)[:, :330]
    out = cuflash.attention(q, k, v, attn_mask=mask)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    ref, _ = reference.attention_reference(q64, k64, v64, attn_mask=host)
    flash_rule(to_host(out).astype(np.float64), ref, naive_same_dtype(q, k, v, attn_mask=host))
    out, lse = cuflash.attention(q, k, v, attn_mask=mask, return_lse=True)
    dout = randn_like(out, seed=13)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, attn_mask=mask)
    refs = reference.attention_backward_reference(to_host(dout).astype(np.float64), q64, k64, v64, attn_mask=host)
    for g, r, bse in zip(grads, refs, naive_backward_same_dtype(dout, q, k, v, attn_mask=host)):
        flash_rule(to_host(g).astype(np.float64), r, bse, factor=3.0)


def test_deterministic_backward_is_bitwise_repeatable(family):
    """deterministic=True with a mask (Hopper's turn-ordered dQ, or the sm80 Q-parallel dQ kernel's mask
    build): two runs give the same bits and follow the rule as the atomic dQ does."""
    case = "full_bool_gqa"
    b, sq, sk, hq, hk, d, _, _, opts = CASES[case]
    q, k, v = inputs(b, sq, sk, hq, hk, d, "bfloat16", seed=5)
    host_mask, mask = _mask(case, "bfloat16", seed=8)
    out, lse = cuflash.attention(q, k, v, attn_mask=mask, return_lse=True)
    dout = randn_like(out, seed=4)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, attn_mask=mask, deterministic=True)
    second = cuflash.attention_backward(dout, q, k, v, out, lse, attn_mask=mask, deterministic=True)
    for a, c in zip(first, second):
        same_bits(a, c)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    refs = reference.attention_backward_reference(to_host(dout).astype(np.float64), q64, k64, v64,
                                                  attn_mask=host_mask)
    bases = naive_backward_same_dtype(dout, q, k, v, attn_mask=host_mask)
    for g, r, bse in zip(first, refs, bases):
        flash_rule(to_host(g).astype(np.float64), r, bse, factor=3.0)


def test_lowest_bf16_additive_mask_gives_the_uniform_average():
    """An additive bfloat16 mask of bfloat16's lowest finite value (-3.39e38, Hugging Face's padding masks)
    on every key of a row swamps that row's scores, in float32 as in the float64 reference: the row's softmax
    is uniform, its output the mean of V. The kernels add the mask in the scaled form, where the value stays
    finite; divided by the scale (the raw form) it would overflow to -inf and leave the row empty (zeros)."""
    q, k, v = inputs(1, 64, 96, 2, 2, 64, "bfloat16", seed=9)
    host = np.zeros((64, 96), np.float32)
    host[10] = -3.3895313892515355e38  # bfloat16's lowest finite value
    host[20, ::2] = -3.3895313892515355e38  # half of a row: those keys drop out
    mask = to_device(host.astype(np_dtype("bfloat16")))
    out = cuflash.attention(q, k, v, attn_mask=mask)
    q64, k64, v64 = (to_host(x).astype(np.float64) for x in (q, k, v))
    ref, _ = reference.attention_reference(q64, k64, v64, attn_mask=host.astype(np.float64))
    np.testing.assert_allclose(ref[:, 10], v64.mean(axis=1), atol=1e-12)  # the math: the uniform average
    flash_rule(to_host(out).astype(np.float64), ref, naive_same_dtype(q, k, v, attn_mask=host))


def test_mask_with_alibi_or_dropout_raises_before_launch():
    q, k, v = inputs(1, 16, 16, 2, 2, 64, "float16", seed=1)
    mask = to_device(np.ones((16, 16), bool))
    import cupy
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        cuflash.attention(q, k, v, attn_mask=mask, alibi_slopes=cupy.ones(2, cupy.float32))
    with pytest.raises(NotImplementedError, match="dropout"):
        cuflash.attention(q, k, v, attn_mask=mask, dropout_p=0.1, dropout_seed=1)
    with pytest.raises(TypeError, match="bool or float16"):
        cuflash.attention(q, k, v, attn_mask=to_device(np.ones((16, 16), np.float32)))


def test_torch_sdpa_stand_in_with_a_cuda_mask_matches_sdpa_math():
    """cuflash.torch.scaled_dot_product_attention with a CUDA boolean mask, forward and backward, against
    SDPA's math backend in float64 (FlashAttention's rule with SDPA's own bf16 math as the yardstick)."""
    require_torch_cuda()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash.torch as ct
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 150, 150, device="cuda", generator=gen) > 0.3  # (no row left empty: SDPA gives NaN)
    assert mask.any(dim=-1).all()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ct.scaled_dot_product_attention(*leaves, attn_mask=mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    with sdpa_kernel(SDPBackend.MATH):
        ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=mask)
        ref.backward(dout.double())
        base_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        base = F.scaled_dot_product_attention(*base_leaves, attn_mask=mask)
        base.backward(dout)
    host = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    flash_rule(host(out), host(ref), host(base))
    for ours, r, bse in zip(leaves, ref_leaves, base_leaves):
        flash_rule(host(ours.grad), host(r.grad), host(bse.grad), factor=3.0)


def test_strided_masks_and_plans_per_layout():
    """Masks that are not contiguous views (a transposed (seqlen_k, seqlen_q) array's .T, every other column of
    a wider one, a torch expand) give what their contiguous copies give, forward and backward (deterministic,
    additive): each layout gets its own plan (strides in the plan's key), so a contiguous mask's plan is
    never reused for a strided one."""
    import cupy
    q, k, v = inputs(2, 70, 90, 4, 2, 64, "float16", seed=12)
    rng = np.random.default_rng(13)
    base = (rng.standard_normal((90, 70)) * 2).astype(np.float16)
    base[rng.random((90, 70)) < 0.3] = -np.inf
    wide = cupy.asarray(np.repeat(base.T, 2, axis=1))  # (70, 180): the mask is every other column
    views = [cupy.asarray(base).T, wide[:, ::2]]
    dense = cupy.ascontiguousarray(views[0])
    want, want_lse = cuflash.attention(q, k, v, attn_mask=dense, return_lse=True)
    dout = randn_like(want, seed=14)
    want_grads = cuflash.attention_backward(dout, q, k, v, want, want_lse, attn_mask=dense, deterministic=True)
    for view in views:
        assert not view.flags.c_contiguous
        out, lse = cuflash.attention(q, k, v, attn_mask=view, return_lse=True)
        same_bits(out, want)
        same_bits(lse, want_lse)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, attn_mask=view, deterministic=True)
        for g, w in zip(grads, want_grads):
            same_bits(g, w)


def test_torch_expanded_bool_mask():
    """A torch bool mask expanded over batch and heads (stride-0 dimensions from torch itself) through
    cuflash.attention on CUDA tensors equals the same mask materialized."""
    require_torch_cuda()
    import torch
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
    m = torch.rand(64, 64, device="cuda", generator=gen) > 0.4
    expanded = m.expand(2, 4, 64, 64)
    same_bits(cuflash.attention(q, k, v, attn_mask=expanded),
              cuflash.attention(q, k, v, attn_mask=expanded.contiguous()))
