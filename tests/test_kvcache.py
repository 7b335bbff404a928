"""KV-cache attention and state merging (cuflash/kvcache.py) on the CPU path: the in-place append lands
byte for byte where FlashAttention-2 puts it (contiguous and paged caches, any page size, cache_batch_idx,
cache_leftpad), the attention equals the float64 reference over each sequence's valid keys (rotary in both
layouts, GQA, causal, windows, softcap, ALiBi, ragged lengths including 0 and a full cache), NaN in unused
slots never reaches an output, and merged partial states equal attention over all keys."""

import numpy as np
import pytest

import cuflash
from cuflash import reference


def _rope(x, cos, sin, pos, interleaved):
    """Rotary embedding written independently of the module: complex multiplication per pair."""
    half = cos.shape[1]
    theta = cos[pos] + 1j * sin[pos]  # (seqlen, half)
    y = x.astype(np.float64).copy()
    if interleaved:
        z = (y[..., 0:2 * half:2] + 1j * y[..., 1:2 * half:2]) * theta[:, None, :]
        y[..., 0:2 * half:2], y[..., 1:2 * half:2] = z.real, z.imag
    else:
        z = (y[..., :half] + 1j * y[..., half:2 * half]) * theta[:, None, :]
        y[..., :half], y[..., half:2 * half] = z.real, z.imag
    return y


def _setup(batch=3, cap=40, hq=4, hk=2, d=16, sq=4, snew=4, seed=0):
    rng = np.random.default_rng(seed)
    kc = rng.standard_normal((batch, cap, hk, d))
    vc = rng.standard_normal((batch, cap, hk, d))
    q = rng.standard_normal((batch, sq, hq, d))
    k = rng.standard_normal((batch, snew, hk, d)) if snew else None
    v = rng.standard_normal((batch, snew, hk, d)) if snew else None
    return rng, kc, vc, q, k, v


def _expected(q, kc, vc, k, v, seqlens, leftpad=None, rows=None, rotary=None, **opts):
    """Append (rotary on k) into copies, then the float64 reference per sequence."""
    kc, vc = kc.copy(), vc.copy()
    batch, sq = q.shape[:2]
    snew = 0 if k is None else k.shape[1]
    leftpad = np.zeros(batch, int) if leftpad is None else leftpad
    rows = np.arange(batch) if rows is None else rows
    outs, lses = [], []
    for b in range(batch):
        r, start = rows[b], seqlens[b] - leftpad[b]
        qb = q[b]
        if snew:
            kb = k[b] if rotary is None else _rope(k[b], *rotary[:2], start + np.arange(snew), rotary[2])
            kc[r, seqlens[b]:seqlens[b] + snew], vc[r, seqlens[b]:seqlens[b] + snew] = kb, v[b]
        if rotary is not None:
            local = opts.get("causal") or opts.get("window_size", (-1, -1)) != (-1, -1)
            qb = _rope(qb, *rotary[:2], start + np.arange(sq) if local else np.full(sq, start), rotary[2])
        keys = slice(leftpad[b], seqlens[b] + snew)
        o, l_ = reference.attention_reference(qb[None], kc[r, keys][None], vc[r, keys][None], **opts)
        outs.append(o[0])
        lses.append(l_[0])
    return np.stack(outs), np.stack(lses), kc, vc


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(5, 1), softcap=2.0),
                                  dict(causal=True, alibi=True)])
@pytest.mark.parametrize("sq, snew", [(1, 1), (4, 4), (4, 0)])
def test_contiguous_cache_matches_reference(opts, sq, snew):
    """Ragged cache lengths including 0 and one that ends exactly at the cache's end; GQA 4/2."""
    opts = dict(opts)
    _, kc, vc, q, k, v = _setup(sq=sq, snew=snew)
    seqlens = np.array([0, 17, 40 - snew], np.int32)
    slopes = np.linspace(0.2, 0.5, 4).astype(np.float32) if opts.pop("alibi", False) else None
    want_out, want_lse, want_kc, want_vc = _expected(q, kc, vc, k, v, seqlens, alibi_slopes=slopes, **opts)
    out, lse = cuflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, alibi_slopes=slopes,
                                              return_lse=True, **opts)
    assert np.array_equal(kc, want_kc) and np.array_equal(vc, want_vc)  # the append, byte for byte
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_allclose(lse[finite], want_lse[finite], atol=1e-12)
    assert np.all(lse[~finite] == np.inf) and np.all(out.transpose(0, 2, 1, 3)[~finite] == 0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_on_new_keys_and_queries(interleaved):
    """Rotary on the first 12 of 16 columns: new keys at their cache positions, queries at cache_seqlens + i
    (causal) or all at cache_seqlens (not causal), both layouts, with cache_leftpad shifting positions."""
    rng, kc, vc, q, k, v = _setup()
    seqlens, leftpad = np.array([3, 10, 20], np.int32), np.array([0, 4, 2], np.int32)
    angles = rng.random((64, 6)) * 3
    cos, sin = np.cos(angles), np.sin(angles)
    for causal in (True, False):
        kc1, vc1 = kc.copy(), vc.copy()
        want_out, _, want_kc, _ = _expected(q, kc, vc, k, v, seqlens, leftpad=leftpad,
                                            rotary=(cos, sin, interleaved), causal=causal)
        out = cuflash.attention_with_kvcache(q, kc1, vc1, k, v, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                             rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                                             causal=causal)
        np.testing.assert_allclose(kc1, want_kc, atol=1e-13)
        np.testing.assert_allclose(out, want_out, atol=1e-12)


def test_cache_batch_idx_and_unused_slots():
    """cache_batch_idx picks each sequence's cache row; NaN in every slot no sequence reads never reaches an
    output, and rows of the cache no sequence uses stay untouched."""
    _, kc, vc, q, k, v = _setup(batch=2)
    big_k = np.full((5, 40, 2, 16), np.nan)
    big_v = np.full((5, 40, 2, 16), np.nan)
    rows, seqlens = np.array([3, 1], np.int32), np.array([9, 25], np.int32)
    for b, r in enumerate(rows):
        big_k[r, :seqlens[b]], big_v[r, :seqlens[b]] = kc[b, :seqlens[b]], vc[b, :seqlens[b]]
    want_out, _, _, _ = _expected(q, kc, vc, k, v, seqlens, causal=True)
    out = cuflash.attention_with_kvcache(q, big_k, big_v, k, v, cache_seqlens=seqlens, cache_batch_idx=rows,
                                         causal=True)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    assert np.isnan(big_k[[0, 2, 4]]).all()
    np.testing.assert_array_equal(big_k[3, 9:13], k[0])


@pytest.mark.parametrize("page", [1, 3, 16])
def test_paged_cache_equals_contiguous(page):
    """A paged cache (pages shuffled, any page size) gives the contiguous cache's output bitwise, and its
    pages hold exactly the contiguous cache's rows after the append."""
    rng, kc, vc, q, k, v = _setup(cap=48)
    seqlens = np.array([0, 30, 44], np.int32)
    n_pages = 48 // page
    perm = rng.permutation(3 * n_pages).astype(np.int32)
    table = perm.reshape(3, n_pages)
    pk = np.full((3 * n_pages, page, 2, 16), np.nan)
    pv = np.full((3 * n_pages, page, 2, 16), np.nan)
    for b in range(3):
        for p in range(n_pages):
            pk[table[b, p]] = kc[b, p * page:(p + 1) * page]
            pv[table[b, p]] = vc[b, p * page:(p + 1) * page]
    kc1, vc1 = kc.copy(), vc.copy()
    want = cuflash.attention_with_kvcache(q, kc1, vc1, k, v, cache_seqlens=seqlens, causal=True)
    got = cuflash.attention_with_kvcache(q, pk, pv, k, v, cache_seqlens=seqlens, block_table=table, causal=True)
    assert np.array_equal(got, want)
    for b in range(3):
        assert np.array_equal(pk[table[b]].reshape(48, 2, 16), kc1[b])
        assert np.array_equal(pv[table[b]].reshape(48, 2, 16), vc1[b])


def test_torch_cpu_tensors_are_updated_in_place():
    torch = pytest.importorskip("torch")
    _, kc, vc, q, k, v = _setup(batch=1)
    tk, tv = torch.from_numpy(kc.copy()), torch.from_numpy(vc.copy())
    out = cuflash.attention_with_kvcache(torch.from_numpy(q), tk, tv, torch.from_numpy(k), torch.from_numpy(v),
                                         cache_seqlens=5)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(tk.numpy()[0, 5:9], k[0])


def test_bfloat16_cpu_tensors_raise_a_named_type_error():
    torch = pytest.importorskip("torch")
    _, kc, vc, q, _, _ = _setup(batch=1)
    bf = lambda x: torch.from_numpy(x).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 CPU tensor"):
        cuflash.attention_with_kvcache(bf(q), bf(kc), bf(vc), cache_seqlens=3)


@pytest.mark.parametrize("kw, exc, text", [
    (dict(cache_seqlens=np.array([38, 0, 0], np.int32)), ValueError, "must fit the cache"),
    (dict(cache_seqlens=np.array([1, 2, 3], np.int64)), TypeError, "cache_seqlens must be int32"),
    (dict(cache_seqlens=1, v=None), ValueError, "k and v must be given together"),
    (dict(cache_seqlens=1, cache_leftpad=np.array([2, 0, 0], np.int32)), ValueError, "cache_leftpad"),
    (dict(cache_seqlens=1, num_splits=-1), ValueError, "num_splits"),
])
def test_bad_arguments_raise_named_errors(kw, exc, text):
    _, kc, vc, q, k, v = _setup()
    args = dict(k=k, v=v)
    args.update(kw)
    with pytest.raises(exc, match=text):
        cuflash.attention_with_kvcache(q, kc, vc, **args)


def test_merged_states_equal_attention_over_all_keys():
    """Keys split in three disjoint parts (one of them empty, and one that a causal row cannot see): the
    merged output and LSE equal attention over every key; rows that see no key stay 0 / +inf."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 5, 4, 8))
    k, v = rng.standard_normal((2, 30, 2, 8)), rng.standard_normal((2, 30, 2, 8))
    full_out, full_lse = cuflash.attention(q, k, v, return_lse=True)
    parts = [slice(0, 11), slice(11, 11), slice(11, 30)]
    outs, lses = zip(*(cuflash.attention(q, k[:, p], v[:, p], return_lse=True) for p in parts))
    out, lse = cuflash.merge_attention_states_list(list(outs), list(lses))
    np.testing.assert_allclose(out, full_out, atol=1e-12)
    np.testing.assert_allclose(lse, full_lse, atol=1e-12)
    out2, lse2 = cuflash.merge_attention_states(outs[0], lses[0], outs[2], lses[2])
    np.testing.assert_allclose(out2, full_out, atol=1e-12)
    empty_out, empty_lse = cuflash.merge_attention_states(outs[1], lses[1], outs[1], lses[1])
    assert np.all(empty_out == 0) and np.all(empty_lse == np.inf)


def test_duplicate_cache_batch_idx_raises():
    """Two sequences naming one cache row would append into it both: a ValueError on the CPU path."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 2, 8))
    kc, vc = (rng.standard_normal((3, 6, 1, 8)) for _ in range(2))
    with pytest.raises(ValueError, match="distinct"):
        cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=2, cache_batch_idx=np.array([1, 1], np.int32))
