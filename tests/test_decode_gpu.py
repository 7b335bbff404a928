"""One query per sequence with GQA (decoding) on the GPU: the query heads that share a key/value head run as
the rows of one tile (api.decode_groups, api.pack_query_heads, kvcache._decode_packed), so keys and values
are read once per key/value head. Proved against the same calls with packing switched off, bit for bit
(each row's arithmetic is the same; only which rows share a tile changes), and against the float64
reference under FlashAttention's rule: dense cuflash.attention (CuPy and torch, causal / right window /
softcap, the bound call included) and attention_with_kvcache (int and per-sequence cache_seqlens, leftpad,
empty caches); a left window or ALiBi keeps the unpacked path."""

import numpy as np
import pytest

import cuflash
from cuflash import api, executor, reference

from gpu_helpers import (flash_rule, inputs, kernel_requests, naive_same_dtype, require_torch_cuda, same_bits,
                         to_host, to_np64)
from test_kvcache_gpu import _case

pytestmark = pytest.mark.gpu


@pytest.fixture
def packing(monkeypatch):
    """Records decode_groups' answers; ``packing.off()`` makes every call unpacked."""
    seen = []
    original = api.decode_groups

    class Switch:
        groups = seen

        @staticmethod
        def off():
            monkeypatch.setattr(api, "decode_groups", lambda *a: 1)
            executor.clear()  # bound calls keep the plan they were bound with

        @staticmethod
        def on():
            monkeypatch.setattr(api, "decode_groups", spy)
            executor.clear()

    def spy(*a):
        g = original(*a)
        seen.append(g)
        return g
    Switch.on()
    return Switch


OPTS = [dict(), dict(causal=True), dict(window_size=(-1, 0), softcap=6.0), dict(window_size=(50, 0))]


@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("opts", OPTS, ids=["full", "causal", "right_window_softcap", "left_window"])
def test_dense_decode(fw, dtype, opts, packing):
    import cupy
    q, k, v = inputs(3, 1, 517, 16, 4, 128, dtype, seed=5)
    ref, _ = reference.attention_reference(*(to_np64(x) for x in (q, k, v)), **opts)
    base = naive_same_dtype(q, k, v, **opts)
    if fw == "torch":
        torch = require_torch_cuda()
        q, k, v = (torch.from_dlpack(x) for x in (q, k, v))
    got = [cuflash.attention(q, k, v, return_lse=True, **opts) for _ in range(2)]  # the second one bound
    packing.off()
    want = cuflash.attention(q, k, v, return_lse=True, **opts)
    cupy.cuda.runtime.deviceSynchronize()
    assert packing.groups[0] == (1 if opts.get("window_size", (-1,))[0] >= 0 else 4)
    for out, lse in got:
        same_bits(out, want[0])
        same_bits(lse, want[1])
    flash_rule(to_np64(got[0][0]), ref, base)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("lens", ["int", "per_sequence", "leftpad"])
def test_kvcache_decode(dtype, lens, packing):
    import cupy
    q, (kc, vc), (kn, vn), seqlens = _case(dtype, seqlen_q=1, seqlen_new=1)
    kw = dict(causal=True, return_lse=True, num_splits=1)  # unsplit: bit for bit against the unpacked call
    if lens == "int":
        kw["cache_seqlens"] = 120
        kc, vc = (np.nan_to_num(c.astype(np.float32)).astype(c.dtype) for c in (kc, vc))  # 121 rows all valid
    else:
        kw["cache_seqlens"] = cupy.asarray(seqlens)
    if lens == "leftpad":
        kw["cache_leftpad"] = cupy.asarray(np.array([0, 30, 7], np.int32))

    def run():
        caches = [cupy.asarray(kc), cupy.asarray(vc)]
        out = cuflash.attention_with_kvcache(cupy.asarray(q), *caches, cupy.asarray(kn), cupy.asarray(vn), **kw)
        return out, caches
    (out, lse), caches = run()
    packing.off()
    (want_out, want_lse), want_caches = run()
    cupy.cuda.runtime.deviceSynchronize()
    assert packing.groups == [4]
    same_bits(out, want_out)
    same_bits(lse, want_lse)
    for a, b in zip(caches, want_caches):
        assert bool(cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)))
    assert np.isfinite(to_host(out).astype(np.float32)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 0])
@pytest.mark.parametrize("d", [64, 128])
def test_kvcache_decode_split_kv(dtype, num_splits, d, packing):
    """Split-KV decoding (fwd_sm80.cu CF_SPLIT_KV, merged by merge_states.cu): each sequence follows
    FlashAttention's rule against float64 attention over its valid cache rows, for explicit split counts
    (more than some sequences have key tiles: empty splits), ours (0), and none (1); the LSE to 1e-4;
    ragged lengths down to a single key, NaN in the unused slots never reaching an output."""
    import cupy
    from test_kvcache_gpu import _expected_cache
    q, (kc, vc), (kn, vn), lens = _case(dtype, seqlen_cache=1500, d=d, seqlen_q=1, seqlen_new=1, seed=num_splits)
    caches = [cupy.asarray(kc), cupy.asarray(vc)]
    out, lse = cuflash.attention_with_kvcache(cupy.asarray(q), *caches, cupy.asarray(kn), cupy.asarray(vn),
                                              cache_seqlens=cupy.asarray(lens), num_splits=num_splits,
                                              return_lse=True)
    assert packing.groups == [4]
    want_k, want_v = _expected_cache(kc, kn, lens), _expected_cache(vc, vn, lens)
    out, lse = to_np64(out), to_host(lse)
    for b in range(q.shape[0]):
        kb, vb = want_k[b:b + 1, :lens[b] + 1], want_v[b:b + 1, :lens[b] + 1]
        ref, ref_lse = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                                     vb.astype(np.float64))
        flash_rule(out[b:b + 1], ref, naive_same_dtype(q[b:b + 1], kb, vb))
        np.testing.assert_allclose(lse[b], ref_lse[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,d", [((64, 1), 96), ((128, 1), 128), ((32, 8), 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_decode_many_query_heads(heads, d, num_splits, packing):
    """Packed decoding where a group fills more than one warp's rows (64 query heads on one key/value head,
    MQA) or more than one tile (128: two query blocks), at a head dim the kernels pad (96), split or not:
    each sequence against float64 under FlashAttention's rule."""
    import cupy
    hq, hk = heads
    rng = np.random.default_rng(hq + d + num_splits)
    batch, cap = 2, 700
    lens = np.array([5, 650], np.int32)
    q = rng.standard_normal((batch, 1, hq, d)).astype(np.float16)
    kc, vc = (rng.standard_normal((batch, cap, hk, d)).astype(np.float16) for _ in range(2))
    out, lse = cuflash.attention_with_kvcache(cupy.asarray(q), cupy.asarray(kc), cupy.asarray(vc),
                                              cache_seqlens=cupy.asarray(lens), num_splits=num_splits,
                                              return_lse=True)
    assert packing.groups == [hq // hk]
    out, lse = to_np64(out), to_host(lse)
    for b in range(batch):
        kb, vb = kc[b:b + 1, :lens[b]], vc[b:b + 1, :lens[b]]
        ref, ref_lse = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                                     vb.astype(np.float64))
        flash_rule(out[b:b + 1], ref, naive_same_dtype(q[b:b + 1], kb, vb))
        np.testing.assert_allclose(lse[b], ref_lse[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["d64", "d128", "d160_softcap", "d64_softcap", "few_sms", "batch8_8k"])
def test_kvcache_split_kv_hopper_and_ampere_builds(case, packing, monkeypatch):
    """Split-KV decoding on Hopper runs the Hopper kernel's split build (fwd_sm90.cu CF_SPLIT_KV: (query
    tile, split) work tiles of persistent CTAs); CUFLASH_FWD_KERNEL=sm80 runs the Ampere one's (splits on
    gridDim.y). Each follows FlashAttention's rule per sequence, with ragged lengths (one key, a full cache,
    NaN in the unused slots), and the two agree on the LSE to 1e-5. Cases: head dims 64 (three consumer
    warpgroups, ping-pong), 128, 160 (padded to 192), softcap's own tiles at 64; "few_sms" makes the plan
    believe the GPU has 8 SMs, so 8 persistent CTAs take ~5 work tiles each from the tile counter (the ring
    and barrier phases carried from split to split); "batch8_8k" is a decode step's size, splits of our
    choice over more work tiles than SMs."""
    import cupy
    from cuflash import launch_plan, ops
    from gpu_helpers import skip_unless_hopper
    skip_unless_hopper()
    d, softcap, num_splits, batch, cap, hq, hk = {
        "d64": (64, 0.0, 3, 3, 2000, 16, 4), "d128": (128, 0.0, 0, 3, 2000, 16, 4),
        "d160_softcap": (160, 8.0, 4, 3, 2000, 16, 4), "d64_softcap": (64, 8.0, 5, 3, 2000, 16, 4),
        "few_sms": (128, 0.0, 3, 3, 2000, 16, 4), "batch8_8k": (128, 0.0, 0, 8, 8192, 32, 8)}[case]
    if case == "few_sms":
        monkeypatch.setattr(ops, "_sm_count", lambda device: 8)
    requested = kernel_requests(monkeypatch)
    rng = np.random.default_rng(d + num_splits + batch)
    lens = rng.integers(1, cap, batch).astype(np.int32)
    lens[:2] = 1, cap
    q = rng.standard_normal((batch, 1, hq, d)).astype(np.float16)
    kc, vc = (rng.standard_normal((batch, cap, hk, d)).astype(np.float16) for _ in range(2))
    for c in (kc, vc):
        for b, n in enumerate(lens):
            c[b, n:] = np.nan
    results = {}
    for kernel in ("sm90", "sm80"):
        monkeypatch.setenv("CUFLASH_FWD_KERNEL", kernel)
        executor.clear()
        launch_plan._plans.clear()  # (a cached plan would not ask for its kernel again)
        requested.clear()
        out, lse = cuflash.attention_with_kvcache(cupy.asarray(q), cupy.asarray(kc), cupy.asarray(vc),
                                                  cache_seqlens=cupy.asarray(lens), num_splits=num_splits,
                                                  softcap=softcap, return_lse=True)
        assert any(n.startswith(f"fwd_{kernel}") and "splitkv" in n for n in requested), requested
        results[kernel] = (to_np64(out), to_host(lse))
        for b in range(batch):
            kb, vb = kc[b:b + 1, :lens[b]], vc[b:b + 1, :lens[b]]
            ref, ref_lse = reference.attention_reference(q[b:b + 1].astype(np.float64), kb.astype(np.float64),
                                                         vb.astype(np.float64), softcap=softcap)
            flash_rule(results[kernel][0][b:b + 1], ref, naive_same_dtype(q[b:b + 1], kb, vb, softcap=softcap))
            np.testing.assert_allclose(results[kernel][1][b], ref_lse[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results["sm90"][1], results["sm80"][1], rtol=1e-5, atol=1e-5)
