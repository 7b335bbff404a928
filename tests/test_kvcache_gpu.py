"""cuflash.attention_with_kvcache on the GPU (cuflash/kvcache.py -> kvcache_append.cu, then the variable-length
forward over the caches): the in-place append is byte-exact and touches nothing else; each sequence's output
follows FlashAttention's rule against the float64 attention over its valid cache rows (cache_seqlens as an
int and per sequence, cache_leftpad, GQA, causal / window / softcap / ALiBi, seqlen_q 1, 4 and 33, with and
without new keys), NaN in the unused cache slots never reaching an output; the LSE comes back as (batch,
heads_q, seqlen_q); flash_attn_with_kvcache mutates torch caches in place and a decode step replays in a CUDA
graph; rotary embedding equals the CPU path's; leftpad with paging or cache_batch_idx raises
NotImplementedError on GPU arrays."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import flash_rule, naive_same_dtype, np_dtype, to_host

pytestmark = pytest.mark.gpu


def _case(dtype, batch=3, seqlen_cache=300, hq=8, hk=2, d=64, seqlen_q=1, seqlen_new=1, seed=0):
    rng = np.random.default_rng(seed)
    cache = [rng.standard_normal((batch, seqlen_cache, hk, d)).astype(np.float32) for _ in range(2)]
    lens = np.array([0, 170, seqlen_cache - seqlen_new][:batch], np.int32)
    for c in cache:  # unused slots (past each sequence's end after the append): NaN, never to be read
        for b, n in enumerate(lens):
            c[b, n + seqlen_new:] = np.nan
    q = rng.standard_normal((batch, seqlen_q, hq, d)).astype(np.float32)
    new = [rng.standard_normal((batch, seqlen_new, hk, d)).astype(np.float32) for _ in range(2)]
    cast = lambda x: x.astype(np_dtype(dtype))  # noqa: E731
    return cast(q), [cast(c) for c in cache], [cast(x) for x in new], lens


def _expected_cache(cache, new, lens):
    out = cache.copy()
    for b, n in enumerate(lens):
        out[b, n:n + new.shape[1]] = new[b]
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("seqlen_q,seqlen_new", [(1, 1), (4, 4), (33, 33), (1, 0)])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(40, 0), softcap=5.0),
                                  dict(causal=True, alibi="per_sequence"), dict(leftpad=True, causal=True)])
def test_each_sequence_follows_flash_rule(dtype, seqlen_q, seqlen_new, opts):
    import cupy
    opts = dict(opts)
    alibi, use_leftpad = opts.pop("alibi", None), opts.pop("leftpad", False)
    q, (kc, vc), (kn, vn), lens = _case(dtype, seqlen_q=seqlen_q, seqlen_new=seqlen_new)
    batch, hq = q.shape[0], q.shape[2]
    leftpad = np.minimum(np.array([0, 37, 5], np.int32), lens) if use_leftpad else np.zeros(3, np.int32)
    slopes = np.random.default_rng(2).random((batch, hq)).astype(np.float32) * 0.2 if alibi else None
    dq, dkc, dvc = (cupy.asarray(x) for x in (q, kc, vc))
    kw = dict(cache_seqlens=cupy.asarray(lens), return_lse=True,
              cache_leftpad=cupy.asarray(leftpad) if use_leftpad else None,
              alibi_slopes=None if slopes is None else cupy.asarray(slopes), **opts)
    new = (cupy.asarray(kn), cupy.asarray(vn)) if seqlen_new else (None, None)
    out, lse = cuflash.attention_with_kvcache(dq, dkc, dvc, *new, **kw)
    assert out.shape == q.shape and lse.shape == (batch, hq, seqlen_q) and lse.dtype == np.float32
    want_k, want_v = (_expected_cache(c, n, lens) for c, n in ((kc, kn), (vc, vn)))
    np.testing.assert_array_equal(cupy.asnumpy(dkc).view(np.uint16), want_k.view(np.uint16))  # NaN bits too
    np.testing.assert_array_equal(cupy.asnumpy(dvc).view(np.uint16), want_v.view(np.uint16))
    out = to_host(out).astype(np.float64)
    for b in range(batch):
        keys = slice(leftpad[b], lens[b] + seqlen_new)
        kb, vb = want_k[b:b + 1, keys], want_v[b:b + 1, keys]
        row = None if slopes is None else slopes[b]
        ref, ref_lse = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                                     vb.astype(np.float64), alibi_slopes=row, **opts)
        if kb.shape[1] == 0:
            assert np.all(out[b] == 0) and np.all(np.isinf(cupy.asnumpy(lse)[b]))
            continue
        base = naive_same_dtype(q[b:b + 1], kb, vb, alibi_slopes=row, **opts)
        flash_rule(out[b:b + 1], ref, base)
        fin = np.isfinite(ref_lse[0])
        np.testing.assert_allclose(cupy.asnumpy(lse)[b][fin], ref_lse[0][fin], rtol=1e-4, atol=1e-4)


def test_int_cache_seqlens_equals_the_per_sequence_array():
    import cupy
    q, (kc, vc), (kn, vn), _ = _case("float16", seqlen_q=4, seqlen_new=4)
    kc, vc = (np.nan_to_num(c.astype(np.float32)).astype(np.float16) for c in (kc, vc))  # 120 rows all valid
    runs = []
    for lens in (120, cupy.full(3, 120, cupy.int32)):
        caches = [cupy.asarray(kc), cupy.asarray(vc)]
        out = cuflash.attention_with_kvcache(cupy.asarray(q), *caches, cupy.asarray(kn), cupy.asarray(vn),
                                             cache_seqlens=lens, causal=True)
        runs.append((out, caches))
    assert bool(cupy.array_equal(runs[0][0], runs[1][0]))
    for a, b in zip(runs[0][1], runs[1][1]):
        assert bool(cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)))


def test_torch_flash_attn_with_kvcache_in_place_and_cuda_graph():
    """flash_attn_with_kvcache on CUDA tensors appends into the caller's caches in place; a decode step
    (append one token, attend) captured in a CUDA graph replays with cache_seqlens advanced on the device and
    new values copied in, equal to the eager step."""
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_with_kvcache
    q, (kc, vc), (kn, vn), lens = _case("bfloat16", seqlen_q=1, seqlen_new=1)
    t = lambda x: torch.from_numpy(x.astype(np.float32)).to("cuda", torch.bfloat16)  # noqa: E731
    k_cache, v_cache = (t(np.nan_to_num(c.astype(np.float32))) for c in (kc, vc))  # lens below differ from _case's
    lens = np.array([3, 10, 200], np.int32)
    seqlens = torch.from_numpy(lens).cuda()
    tq, tk, tv = t(q), t(kn), t(vn)
    ptr = k_cache.data_ptr()
    out = flash_attn_with_kvcache(tq, k_cache, v_cache, tk, tv, cache_seqlens=seqlens, causal=True)
    assert k_cache.data_ptr() == ptr and torch.equal(k_cache[1, 10], tk[1, 0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_attn_with_kvcache(tq, k_cache, v_cache, tk, tv, cache_seqlens=seqlens, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step = flash_attn_with_kvcache(tq, k_cache, v_cache, tk, tv, cache_seqlens=seqlens, causal=True)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    seqlens += 1
    q2, k2, v2 = (torch.randn_like(x) for x in (tq, tk, tv))
    tq.copy_(q2), tk.copy_(k2), tv.copy_(v2)
    graph.replay()
    want = flash_attn_with_kvcache(q2, eager_k, eager_v, k2, v2, cache_seqlens=seqlens, causal=True)
    torch.cuda.synchronize()
    assert torch.equal(step, want) and torch.equal(k_cache, eager_k) and out.shape == tq.shape


@pytest.mark.parametrize("what", ["leftpad_paged", "leftpad_batch_idx", "both_tables", "rotary_dtype"])
def test_unwritten_gpu_features_raise(what):
    """Leftpad with paging or cache_batch_idx raises NotImplementedError on GPU arrays; block_table with
    cache_batch_idx is a ValueError (as on the CPU path); rotary tables of another dtype than q a TypeError."""
    import cupy
    q, (kc, vc), _, lens = _case("float16")
    table, rows, pad = cupy.zeros((3, 2), cupy.int32), cupy.arange(3, dtype=cupy.int32), cupy.zeros(3, cupy.int32)
    kw, exc, match = {
        "rotary_dtype": (dict(rotary_cos=cupy.ones((400, 16), cupy.float32),
                              rotary_sin=cupy.zeros((400, 16), cupy.float32)), TypeError, "rotary_cos"),
        "leftpad_paged": (dict(block_table=table, cache_leftpad=pad), NotImplementedError, "cache_leftpad"),
        "leftpad_batch_idx": (dict(cache_batch_idx=rows, cache_leftpad=pad), NotImplementedError, "cache_leftpad"),
        "both_tables": (dict(block_table=table, cache_batch_idx=rows), ValueError, "cache_batch_idx"),
    }[what]
    with pytest.raises(exc, match=match):
        cuflash.attention_with_kvcache(cupy.asarray(q), cupy.asarray(kc), cupy.asarray(vc), cache_seqlens=5, **kw)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_rotary_equals_the_cpu_path(interleaved, causal, seqlen_q):
    """rotary_cos / rotary_sin (rotary.cu, fp32 arithmetic on fp16 values) on the GPU against the CPU path on
    the same inputs: float64 for the reference, float16 for the yardstick (FlashAttention's rule), the rotated
    new keys in the caches within one fp16 rounding of the float64 rotation; rotary_dim 48 of 64 (the rest
    copied), leftpad shifting the positions."""
    import cupy
    q, (kc, vc), (kn, vn), lens = _case("float16", seqlen_q=seqlen_q, seqlen_new=seqlen_q)
    rng = np.random.default_rng(5)
    angles = np.arange(400)[:, None] * rng.random(24)[None, :]
    cos, sin = np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)
    leftpad = np.array([0, 11, 3], np.int32)
    kw = dict(causal=causal, rotary_interleaved=interleaved, return_lse=True)

    def call(xp, dtype):
        arrays = [xp.asarray(x.astype(dtype)) for x in (q, kc, vc, kn, vn, cos, sin)]
        caches = arrays[1:3]
        out, lse = cuflash.attention_with_kvcache(*arrays[:5], cache_seqlens=xp.asarray(lens),
                                                  cache_leftpad=xp.asarray(leftpad), rotary_cos=arrays[5],
                                                  rotary_sin=arrays[6], **kw)
        return out, lse, caches
    out, lse, caches = call(cupy, np.float16)
    ref, ref_lse, ref_caches = call(np, np.float64)
    base, _, _ = call(np, np.float16)
    for b in range(q.shape[0]):
        flash_rule(to_host(out).astype(np.float64)[b], ref[b], base[b].astype(np.float64))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(cupy.asnumpy(lse)[fin], ref_lse[fin], rtol=1e-3, atol=1e-3)
    for got, want in zip(caches, ref_caches):
        got, want = cupy.asnumpy(got).astype(np.float64), want
        valid = np.isfinite(want)
        assert np.array_equal(np.isnan(got), ~valid)
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the KV-cache
    kernels: append, rotary, the paged and split-KV forward builds, the merge (sanitize_kvcache.py)."""
    from gpu_helpers import run_sanitizer
    run_sanitizer("sanitize_kvcache.py", tool)
