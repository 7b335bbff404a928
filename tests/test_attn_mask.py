"""attn_mask on cuflash.attention / attention_backward (api.py, the CPU path in reference.py): bool (True =
attend) and additive float masks, broadcast over batch and heads like SDPA's, composed with causal, window,
softcap, ALiBi and GQA, equal the float64 reference; rows the mask empties give zeros and LSE +inf, never
NaN; bad masks raise naming attn_mask before any compute.
"""

import numpy as np
import pytest

import cuflash
from cuflash import reference

B, SQ, SK, HQ, HK, D = 2, 23, 31, 4, 2, 16


def _inputs(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((B, SQ, HQ, D), (B, SK, HK, D), (B, SK, HK, D),
                                                                 (B, SQ, HQ, D)))


def _masks():
    rng = np.random.default_rng(1)
    return {
        "bool full": rng.random((B, HQ, SQ, SK)) > 0.3,
        "bool (sq, sk)": rng.random((SQ, SK)) > 0.5,
        "bool per batch, empty rows": np.where(np.arange(SQ)[:, None] < 4, False, rng.random((B, 1, SQ, SK)) > 0.2),
        "float per head": rng.standard_normal((HQ, 1, SK)),
        "float with -inf": np.where(rng.random((B, HQ, SQ, SK)) > 0.5, -np.inf, rng.standard_normal((B, HQ, SQ, SK))),
    }


OPTIONS = [dict(), dict(causal=True, softcap=2.0),
           dict(window_size=(5, 3), alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32))]


@pytest.mark.parametrize("name", list(_masks()))
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 3e-5)])
def test_masked_attention_equals_reference(name, opts, dtype, tol):
    mask = _masks()[name]
    if dtype == np.float32 and mask.dtype != np.bool_:
        mask = mask.astype(np.float32)
    q, k, v, do = _inputs(dtype)
    out, lse = cuflash.attention(q, k, v, attn_mask=mask, return_lse=True, **opts)
    ref_out, ref_lse = reference.attention_reference(q, k, v, attn_mask=mask, **opts)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=tol, rtol=tol)
    grads = cuflash.attention_backward(do, q, k, v, out, lse, attn_mask=mask, **opts)
    for g, r in zip(grads, reference.attention_backward_reference(do, q, k, v, attn_mask=mask, **opts)):
        assert not np.isnan(g).any()
        np.testing.assert_allclose(g, r, atol=10 * tol, rtol=10 * tol)


def test_empty_rows_are_zero_with_infinite_lse():
    q, k, v, _ = _inputs()
    mask = np.ones((SQ, SK), bool)
    mask[3] = False
    out, lse = cuflash.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert (out[:, 3] == 0).all() and np.isinf(lse[:, :, 3]).all() and np.isfinite(lse[:, :, 4]).all()


def test_all_true_and_zero_masks_change_nothing():
    q, k, v, _ = _inputs(np.float32)
    plain = cuflash.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, causal=True, attn_mask=np.ones((SQ, SK), bool)), plain)
    np.testing.assert_allclose(cuflash.attention(q, k, v, causal=True, attn_mask=np.zeros((1, SK), np.float32)),
                               plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask,exc,match", [
    (np.ones((SQ, SK + 1), bool), ValueError, r"attn_mask must broadcast to \(batch, heads_q, seqlen_q, seqlen_k\)"),
    (np.ones((3, HQ, SQ, SK), bool), ValueError, "attn_mask must broadcast"),
    (np.ones((1, 1, 1, SQ, SK), bool), ValueError, "attn_mask must broadcast"),
    (np.ones((SQ, SK), np.int32), TypeError, "attn_mask must be bool"),
    ([[True]], TypeError, "attn_mask must be an array"),
    (True, TypeError, "attn_mask must be an array"),
])
def test_bad_masks_raise_naming_attn_mask(mask, exc, match):
    q, k, v, _ = _inputs()
    with pytest.raises(exc, match=match):
        cuflash.attention(q, k, v, attn_mask=mask)


def test_torch_cpu_mask_differentiates_q_k_v_only():
    torch = pytest.importorskip("torch")
    q, k, v, do = (torch.from_numpy(x) for x in _inputs())
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = torch.from_numpy(_masks()["bool full"])
    out = cuflash.attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = reference.attention_backward_reference(do.numpy(), *(x.detach().numpy() for x in (q, k, v)),
                                                 attn_mask=mask.numpy())
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-10)
    with pytest.raises(NotImplementedError, match="attn_mask requires grad"):
        cuflash.attention(q, k, v, attn_mask=torch.zeros(SQ, SK, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("shape,want", [
    ((5, 7), (0, 0, 7, 1)),            # (seqlen_q, seqlen_k): shared by every batch and head
    ((2, 1, 1, 7), (7, 0, 0, 1)),      # per batch, one row of keys
    ((1, 3, 5, 7), (0, 35, 7, 1)),     # per head
    ((7,), (0, 0, 0, 1)),              # one row of keys for everything
])
def test_device_mask_view_broadcasts_with_zero_strides(shape, want):
    """api._device_mask (what the GPU kernels get): the mask as a (batch, heads_q, seqlen_q, seqlen_k) view
    with its own strides and 0 on every dimension it broadcasts (missing leading ones and size-1 ones); the
    dtype named as checked; the same address (no copy)."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from cuflash import api
    mask = torch.zeros(shape, dtype=torch.bool)
    call = SimpleNamespace(fw="torch", batch=2, heads_q=3, seqlen_q=5, seqlen_k=7)
    view = api._device_mask(call, mask, stream=0)
    assert view.shape == (2, 3, 5, 7) and view.strides == want
    assert view.dtype == "bool" and view.ptr == mask.data_ptr()
    assert api._device_mask(call, None, stream=0) is None
