"""Bound attention_with_kvcache calls on the GPU (executor.BoundSequence, recording.py): the second call of a
signature replays the first one's launches with its pointers moved to the new arrays. Proved bit for bit
against the general path on the same inputs (outputs, LSE, and the caches after the in-place append), for
the shapes a decode loop meets: GQA-packed split-KV and unsplit, unpacked (MQA off), paged caches of page
size 16, cache_batch_idx, rotary, int and per-sequence cache_seqlens, CuPy and torch; a call that cannot be
replayed (a copy the framework makes) is never bound; an int cache_seqlens is given per call."""

import numpy as np
import pytest

import cuflash
from cuflash import executor

from gpu_helpers import require_torch_cuda, same_bits, to_host

pytestmark = pytest.mark.gpu


def _bound_matches_general(run, sequence_runs, first, second):
    """run(first) records and binds; run(second), bound, must equal the general path's run(second) bit for bit
    (outputs, then the caches after the append). ``run`` returns (outputs, caches)."""
    run(first)
    got, got_caches = run(second)
    assert sequence_runs == [True]
    executor.clear()
    want, want_caches = run(second)
    same_bits(got, want)
    for a, b in zip(got_caches, want_caches):
        same_bits(a, b)


CASES = {
    # batch, cache rows, heads q/k, head dim, new tokens, kwargs
    "packed_split": (1, 3000, 32, 8, 128, 1, dict(num_splits=0)),
    "packed_unsplit": (4, 777, 16, 4, 64, 1, dict(num_splits=1)),
    "unpacked_window": (3, 500, 8, 8, 128, 1, dict(window_size=(64, 0), causal=True)),
    "prefill": (2, 900, 8, 2, 128, 33, dict(causal=True)),
    "paged16": (3, 640, 16, 4, 128, 1, dict(page_size=16)),
    "paged16_split": (1, 4096, 32, 8, 128, 1, dict(page_size=16, num_splits=0)),
    "cache_batch_idx": (2, 300, 8, 2, 64, 1, dict(cache_batch_idx=True)),
    "rotary": (2, 400, 8, 2, 128, 1, dict(rotary=True, causal=True)),
    "no_new_keys": (2, 1000, 16, 2, 128, 0, dict()),
}


def _make(case, fw, seed):
    """Host inputs of a case and a function that runs it on fresh device copies: (outputs, caches)."""
    import cupy
    batch, rows, hq, hk, d, new, kw = CASES[case]
    kw = dict(kw)
    rng = np.random.default_rng(seed)
    page = kw.pop("page_size", None)
    lens = rng.integers(0, rows - new, batch).astype(np.int32)
    lens[0] = rows - new  # one full cache
    host = {"q": rng.standard_normal((batch, new or 1, hq, d)).astype(np.float16)}
    if page:
        pages = batch * (rows // page) + 3
        host["k_cache"], host["v_cache"] = (rng.standard_normal((pages, page, hk, d)).astype(np.float16)
                                            for _ in range(2))
        host["block_table"] = rng.permutation(pages)[:batch * (rows // page)].reshape(batch, -1).astype(np.int32)
    else:
        cache_rows = batch + 2 if kw.get("cache_batch_idx") else batch
        host["k_cache"], host["v_cache"] = (rng.standard_normal((cache_rows, rows, hk, d)).astype(np.float16)
                                            for _ in range(2))
    if kw.pop("cache_batch_idx", False):
        host["cache_batch_idx"] = rng.permutation(batch + 2)[:batch].astype(np.int32)
    if kw.pop("rotary", False):
        angles = rng.uniform(0, 6.3, (rows, d // 4))  # rotary_dim d / 2
        host["rotary_cos"], host["rotary_sin"] = np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)
    if new:
        host["k"], host["v"] = (rng.standard_normal((batch, new, hk, d)).astype(np.float16) for _ in range(2))
    host["cache_seqlens"] = lens

    def run():
        dev = {n: cupy.asarray(x) for n, x in host.items()}
        if fw == "torch":
            torch = require_torch_cuda()
            dev = {n: torch.from_dlpack(x) for n, x in dev.items()}
        args = {n: x for n, x in dev.items() if n not in ("q", "k_cache", "v_cache", "k", "v")}
        out = cuflash.attention_with_kvcache(dev["q"], dev["k_cache"], dev["v_cache"], dev.get("k"), dev.get("v"),
                                             return_lse=True, **args, **kw)
        return out, (dev["k_cache"], dev["v_cache"])
    return run


@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bound_call_matches_general_path(case, fw, sequence_runs):
    import cupy
    _make(case, fw, seed=1)()  # the general path, recorded and bound
    run = _make(case, fw, seed=2)
    got, got_caches = run()  # other values, other arrays: bound
    assert sequence_runs == [True]
    executor.clear()
    want, want_caches = run()  # the general path on the same inputs
    cupy.cuda.runtime.deviceSynchronize()
    assert sequence_runs == [True]
    for a, b in zip(got, want):
        same_bits(a, b)
    for a, b in zip(got_caches, want_caches):
        same_bits(a, b)
    assert np.isfinite(to_host(got[0]).astype(np.float32)).all()


@pytest.mark.parametrize("rotary", [False, True])
def test_int_cache_seqlens_is_given_per_call(sequence_runs, rotary):
    """An int cache_seqlens is not part of the signature: a bound call writes it into the append (and rotary)
    launches each call. Bit for bit against the general path at another value; a value the general path
    rejects (past the cache, or past the rotary tables' positions) still raises, bound or not."""
    import cupy
    rng = np.random.default_rng(3)
    q = cupy.asarray(rng.standard_normal((2, 1, 8, 64)).astype(np.float16))
    # distinct new keys and values: one array passed as both starts two regions, which no replay can tell apart
    new_k, new_v = (cupy.asarray(rng.standard_normal((2, 1, 2, 64)).astype(np.float16)) for _ in range(2))
    host = [rng.standard_normal((2, 256, 2, 64)).astype(np.float16) for _ in range(2)]
    kw = {}
    if rotary:
        angles = rng.uniform(0, 6.3, (240, 16))
        kw = dict(rotary_cos=cupy.asarray(np.cos(angles).astype(np.float16)),
                  rotary_sin=cupy.asarray(np.sin(angles).astype(np.float16)), causal=True)

    def run(lens):
        kc, vc = (cupy.asarray(x) for x in host)
        return cuflash.attention_with_kvcache(q, kc, vc, new_k, new_v, cache_seqlens=lens, **kw), (kc, vc)
    _bound_matches_general(run, sequence_runs, 100, 200)
    run(100)  # bound again
    limit = 239 if rotary else 256  # the last value the general path accepts (rotary: one new key's position)
    run(limit)
    assert sequence_runs == [True, True, True]
    with pytest.raises(ValueError):
        run(limit + 1)


def test_new_keys_with_a_strided_head_dim_are_bound(sequence_runs):
    """New keys and values with a non-unit head_dim stride are copied by strided_copy.cu, which a replay
    repeats: the call binds and matches the general path bit for bit."""
    import cupy
    rng = np.random.default_rng(4)
    q = cupy.asarray(rng.standard_normal((2, 1, 8, 64)).astype(np.float16))
    host = [rng.standard_normal((2, 256, 2, 64)).astype(np.float16) for _ in range(2)]

    def run(seed):
        new_k, new_v = (cupy.asarray(np.random.default_rng(seed + i).standard_normal((2, 1, 2, 128))
                                     .astype(np.float16))[..., ::2] for i in range(2))
        kc, vc = (cupy.asarray(x) for x in host)
        return cuflash.attention_with_kvcache(q, kc, vc, new_k, new_v, cache_seqlens=100), (kc, vc)
    _bound_matches_general(run, sequence_runs, 1, 7)


def test_one_array_as_new_keys_and_values_is_not_bound(sequence_runs):
    """k and v given as one array start two regions at one address: a replay could not tell which a recorded
    pointer meant, so the call stays on the general path (right answer, nothing bound)."""
    import cupy
    rng = np.random.default_rng(6)
    q = cupy.asarray(rng.standard_normal((2, 1, 8, 64)).astype(np.float16))
    host = [rng.standard_normal((2, 256, 2, 64)).astype(np.float16) for _ in range(2)]
    new = cupy.asarray(rng.standard_normal((2, 1, 2, 64)).astype(np.float16))
    outs = []
    for _ in range(2):
        kc, vc = (cupy.asarray(x) for x in host)
        outs.append(cuflash.attention_with_kvcache(q, kc, vc, new, new, cache_seqlens=100))
    assert sequence_runs == []
    assert not executor._sequences
    same_bits(outs[0], outs[1])
    kc, vc = (cupy.asarray(x) for x in host)
    want = cuflash.attention_with_kvcache(q, kc, vc, new, new.copy(), cache_seqlens=100)  # distinct arrays
    same_bits(outs[0], want)


def test_q_sliced_from_a_fused_projection_is_bound(sequence_runs):
    """q as a view into a fused QKV projection (strided heads): the packed path copies it with
    strided_copy.cu, which a replay repeats, so the call binds; bit for bit against the general path."""
    import cupy
    rng = np.random.default_rng(5)
    batch, hq, hk, d = 2, 8, 2, 128
    caches = [rng.standard_normal((batch, 512, hk, d)).astype(np.float16) for _ in range(2)]

    def run(seed):
        qkv = cupy.asarray(np.random.default_rng(seed).standard_normal((batch, 1, hq + 2 * hk, d)).astype(np.float16))
        return cuflash.attention_with_kvcache(qkv[:, :, :hq], *(cupy.asarray(c) for c in caches), cache_seqlens=300)
    run(1)
    got = run(2)
    assert sequence_runs == [True]
    executor.clear()
    same_bits(got, run(2))


def test_a_bound_call_keeps_no_array_of_the_call_it_recorded_alive(sequence_runs):
    """The caches, q and output of the recorded call are freed once the caller drops them (a server frees
    a request's caches; a bound call must not pin them)."""
    import gc
    import weakref
    torch = require_torch_cuda()
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.float16)
    kc, vc = (torch.randn(2, 512, 2, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    out = cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=300)
    refs = [weakref.ref(x) for x in (q, kc, vc, out)]
    del q, kc, vc, out
    gc.collect()
    assert executor._sequences and all(r() is None for r in refs)
