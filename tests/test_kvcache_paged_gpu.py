"""attention_with_kvcache over paged caches on the GPU (block_table: the forward kernels' CF_PAGED builds
reading keys and values through the table, kvcache_append.cu writing the new ones through it): for page sizes 1, 3,
16, 64 and 256, pages handed out in a shuffled order with spare pages in between, the appended rows land
in their pages byte for byte (nothing else touched, NaN in unused slots included) and each sequence
follows FlashAttention's rule against float64 attention over its valid rows: decoding (packed query heads,
with and without split-KV) and a 4-query chunk with causal / window / softcap / ALiBi; block-table entries
outside the caches are clamped (no fault); leftpad with paging raises NotImplementedError; cache_batch_idx
(one page per sequence, a whole cache row) reads and writes the rows it names."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import flash_rule, kernel_requests, naive_same_dtype, to_host
from test_kvcache_gpu import _case, _expected_cache

pytestmark = pytest.mark.gpu


def _paged(caches, page_size, rng):
    """(pages of each cache (num_pages, page_size, heads, d), block_table (batch, max_pages)): the (batch, seqlen,
    heads, d) ``caches`` cut into pages placed at shuffled page indices among as many spare pages (NaN)."""
    batch, seqlen = caches[0].shape[:2]
    max_pages = -(-seqlen // page_size)
    num_pages = 2 * batch * max_pages
    table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages).astype(np.int32)
    out = []
    for cache in caches:
        pages = np.full((num_pages, page_size, *cache.shape[2:]), np.nan, np.float32).astype(cache.dtype)
        padded = np.full((batch, max_pages * page_size, *cache.shape[2:]), np.nan, np.float32).astype(cache.dtype)
        padded[:, :seqlen] = cache
        for b in range(batch):
            for j in range(max_pages):
                pages[table[b, j]] = padded[b, j * page_size:(j + 1) * page_size]
        out.append(pages)
    return out, table


def _unpaged(pages, table, seqlen):
    rows = np.concatenate([pages[table[b]].reshape(-1, *pages.shape[2:])[None] for b in range(table.shape[0])])
    return rows[:, :seqlen]


@pytest.mark.parametrize("page_size,kernel", [(1, ""), (3, ""), (16, ""), (32, ""), (64, ""), (256, ""),
                                              (3, "sm80"), (64, "sm80")])
@pytest.mark.parametrize("case", ["decode", "decode_split3", "chunk_causal", "chunk_window_softcap_alibi"])
def test_paged_cache_follows_flash_rule(page_size, kernel, case, monkeypatch):
    """On Hopper, power-of-two pages of 32 rows or more run the Hopper kernel's paged build (a TMA box per
    page), other sizes its row-gather build; CUFLASH_FWD_KERNEL=sm80 (and other GPUs) the sm80 kernel's."""
    import cupy
    from cuflash import dispatch
    monkeypatch.setenv("CUFLASH_FWD_KERNEL", kernel)
    requested = kernel_requests(monkeypatch)
    seqlen_q = 1 if case.startswith("decode") else 4
    q, (kc, vc), (kn, vn), lens = _case("bfloat16", seqlen_q=seqlen_q, seqlen_new=seqlen_q)
    (kp, vp), table = _paged((kc, vc), page_size, np.random.default_rng(page_size))
    batch, hq = q.shape[0], q.shape[2]
    opts = dict(causal=True)
    slopes = None
    if case == "chunk_window_softcap_alibi":
        opts = dict(window_size=(40, 0), softcap=5.0)
        slopes = np.random.default_rng(3).random((batch, hq)).astype(np.float32) * 0.2
    dkp, dvp = cupy.asarray(kp), cupy.asarray(vp)
    out, lse = cuflash.attention_with_kvcache(
        cupy.asarray(q), dkp, dvp, cupy.asarray(kn), cupy.asarray(vn), cache_seqlens=cupy.asarray(lens),
        block_table=cupy.asarray(table), num_splits=3 if case == "decode_split3" else 0, return_lse=True,
        alibi_slopes=None if slopes is None else cupy.asarray(slopes), **opts)
    cc = divmod(int(cupy.cuda.Device().compute_capability), 10)
    hopper = not kernel and dispatch.forward_family(cc) == "fwd_sm90"
    gather = hopper and page_size not in (32, 64, 256)
    family = "fwd_sm90" if hopper else "fwd_sm80"
    assert any(n.startswith(family) and "paged" in n and ("gather" in n) == gather for n in requested), requested
    want_k, want_v = (_expected_cache(c, n, lens) for c, n in ((kc, kn), (vc, vn)))
    # Pages not in the table stay as they were; the table's pages hold the appended caches.
    got_kp, got_vp = cupy.asnumpy(dkp), cupy.asnumpy(dvp)
    spare = np.setdiff1d(np.arange(kp.shape[0]), table.ravel())
    np.testing.assert_array_equal(got_kp[spare].view(np.uint16), kp[spare].view(np.uint16))
    for got, want in ((got_kp, want_k), (got_vp, want_v)):
        np.testing.assert_array_equal(_unpaged(got, table, kc.shape[1]).view(np.uint16), want.view(np.uint16))
    out, lse = to_host(out).astype(np.float64), cupy.asnumpy(lse)
    for b in range(batch):
        kb, vb = want_k[b:b + 1, :lens[b] + seqlen_q], want_v[b:b + 1, :lens[b] + seqlen_q]
        row = None if slopes is None else slopes[b]
        ref, ref_lse = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                                     vb.astype(np.float64), alibi_slopes=row, **opts)
        flash_rule(out[b:b + 1], ref, naive_same_dtype(q[b:b + 1], kb, vb, alibi_slopes=row, **opts))
        fin = np.isfinite(ref_lse[0])
        np.testing.assert_allclose(lse[b][fin], ref_lse[0][fin], rtol=1e-4, atol=1e-4)


def test_block_table_entries_outside_the_caches_are_clamped():
    """Page indices past the caches (or negative) read and write a clamped page instead of faulting; the
    call completes and its outputs are finite."""
    import cupy
    q, (kc, vc), (kn, vn), lens = _case("float16")
    pages, table = _paged((kc, vc), 16, np.random.default_rng(0))
    kp, vp = (np.nan_to_num(x.astype(np.float32)).astype(np.float16) for x in pages)
    table[0, 0], table[1, 2] = 1 << 30, -5
    out = cuflash.attention_with_kvcache(cupy.asarray(q), cupy.asarray(kp), cupy.asarray(vp), cupy.asarray(kn),
                                         cupy.asarray(vn), cache_seqlens=cupy.asarray(lens),
                                         block_table=cupy.asarray(table))
    cupy.cuda.runtime.deviceSynchronize()
    assert np.isfinite(to_host(out).astype(np.float32)).all()


def test_leftpad_with_paging_raises():
    import cupy
    q, (kc, vc), _, lens = _case("float16")
    (kp,), table = _paged((kc,), 16, np.random.default_rng(0))
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        cuflash.attention_with_kvcache(cupy.asarray(q), cupy.asarray(kp), cupy.asarray(kp), cache_seqlens=5,
                                       block_table=cupy.asarray(table), cache_leftpad=cupy.zeros(3, cupy.int32))


@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_cache_batch_idx_selects_cache_rows(seqlen_q):
    import cupy
    q, (kc, vc), (kn, vn), lens = _case("bfloat16", seqlen_q=seqlen_q, seqlen_new=seqlen_q)
    rows = np.array([4, 0, 2], np.int32)
    big_k, big_v = (np.full((5, *c.shape[1:]), np.nan, np.float32).astype(c.dtype) for c in (kc, vc))
    big_k[rows], big_v[rows] = kc, vc
    dk, dv = cupy.asarray(big_k), cupy.asarray(big_v)
    out = cuflash.attention_with_kvcache(cupy.asarray(q), dk, dv, cupy.asarray(kn), cupy.asarray(vn),
                                         cache_seqlens=cupy.asarray(lens), cache_batch_idx=cupy.asarray(rows),
                                         causal=True)
    want_k, want_v = (_expected_cache(c, n, lens) for c, n in ((kc, kn), (vc, vn)))
    np.testing.assert_array_equal(cupy.asnumpy(dk)[rows].view(np.uint16), want_k.view(np.uint16))
    np.testing.assert_array_equal(cupy.asnumpy(dk)[[1, 3]].view(np.uint16), big_k[[1, 3]].view(np.uint16))
    out = to_host(out).astype(np.float64)
    for b in range(3):
        kb, vb = want_k[b:b + 1, :lens[b] + seqlen_q], want_v[b:b + 1, :lens[b] + seqlen_q]
        ref, _ = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                               vb.astype(np.float64), causal=True)
        flash_rule(out[b:b + 1], ref, naive_same_dtype(q[b:b + 1], kb, vb, causal=True))


@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_paged_rotary_equals_the_cpu_path(seqlen_q):
    """Rotary tables with a paged cache (and split-KV when decoding) on the GPU against the CPU path over the
    same pages in float64 (FlashAttention's rule, the float16 CPU call as the yardstick); the pages hold the
    rotated new keys within one fp16 rounding."""
    import cupy
    q, (kc, vc), (kn, vn), lens = _case("float16", seqlen_q=seqlen_q, seqlen_new=seqlen_q)
    (kp, vp), table = _paged((kc, vc), 16, np.random.default_rng(9))
    angles = np.arange(400)[:, None] * np.random.default_rng(6).random(32)[None, :]
    cos, sin = np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)
    kw = dict(causal=True, rotary_interleaved=False, return_lse=True, num_splits=3)

    def call(xp, dtype):
        arrays = [xp.asarray(x.astype(dtype)) for x in (q, kp, vp, kn, vn, cos, sin)]
        out, lse = cuflash.attention_with_kvcache(*arrays[:5], cache_seqlens=xp.asarray(lens),
                                                  block_table=xp.asarray(table), rotary_cos=arrays[5],
                                                  rotary_sin=arrays[6], **kw)
        return out, lse, arrays[1:3]
    out, lse, pages = call(cupy, np.float16)
    ref, ref_lse, ref_pages = call(np, np.float64)
    base, _, _ = call(np, np.float16)
    for b in range(q.shape[0]):
        flash_rule(to_host(out).astype(np.float64)[b], ref[b], base[b].astype(np.float64))
    np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, rtol=1e-3, atol=1e-3)
    for got, want in zip(pages, ref_pages):
        got = cupy.asnumpy(got).astype(np.float64)
        valid = np.isfinite(want)
        assert np.array_equal(np.isnan(got), ~valid)
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-3, atol=1e-3)
