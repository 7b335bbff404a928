"""The Hopper forward kernel (fwd_sm90.cu) on a compute-capability-9.0 GPU: it is the kernel that runs,
it agrees with the sm80 kernel selected in the same process, views TMA cannot address fall back to the
sm80 kernel, the three-warpgroup head-dim-64 tiles are exact at every tail, and the host mirrors of its
parameter block and shared memory match the kernel. (test_forward.py runs its whole grid through this
kernel on Hopper as well.)"""

import numpy as np
import pytest

import cuflash
from cuflash import dispatch, jit, ops, reference

from gpu_helpers import (flash_rule, host_randn, loaded_families, naive_same_dtype, poison_cupy_pool, raw_words,
                         require_torch_cuda, run_sanitizer, skip_unless_hopper, synchronize, to_device, to_host,
                         to_np64)

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="the GPU kernel tests need CuPy (the cuda12 or cuda13 extra)")


@pytest.fixture(autouse=True)
def _hopper_only():
    skip_unless_hopper()


def _rand(*shape, dtype="bfloat16", seed=0):
    return to_device(host_randn(shape, dtype, np.random.default_rng(seed)))


def _ref_check(q, k, v, out, **kw):
    assert isinstance(out, cp.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    ref, _ = reference.attention_reference(to_np64(q), to_np64(k), to_np64(v), **kw)
    return flash_rule(to_np64(out), ref, naive_same_dtype(q, k, v, **kw))


def test_sm90_runs_and_matches_sm80_in_one_process(monkeypatch):
    """Both kernels are selectable in one run (CUFLASH_FWD_KERNEL), both pass the error rule, and their
    outputs agree to within bf16 rounding of each other."""
    q, k, v = _rand(2, 1000, 4, 128, seed=1), _rand(2, 777, 4, 128, seed=2), _rand(2, 777, 4, 128, seed=3)
    jit._loaded.clear()
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm90")
    o90, l90 = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert "fwd_sm90" in loaded_families()
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm80")
    o80, l80 = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert "fwd_sm80" in loaded_families()
    _ref_check(q, k, v, o90, causal=True)
    _ref_check(q, k, v, o80, causal=True)
    assert np.max(np.abs(to_np64(o90) - to_np64(o80))) < 2e-2
    assert np.allclose(to_host(l90), to_host(l80), atol=1e-3)


def test_broadcast_heads_fall_back_to_sm80():
    """K/V heads broadcast with stride 0 cannot be described to TMA: the call runs the sm80 kernel and is
    exact."""
    q = _rand(2, 300, 4, 64, seed=4)
    k = cp.broadcast_to(_rand(2, 300, 1, 64, seed=5), (2, 300, 4, 64))
    v = cp.broadcast_to(_rand(2, 300, 1, 64, seed=6), (2, 300, 4, 64))
    jit._loaded.clear()
    out = cuflash.attention(q, k, v)
    assert loaded_families() == {"fwd_sm80"}
    _ref_check(q, k, v, out)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (191, 191), (193, 385), (385, 193), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_three_warpgroup_tiles_at_tails(sq, sk, causal):
    """Head dim 64 runs 192-row tiles over three consumer warpgroups taking ping-pong turns: rows on both
    sides of every warpgroup and tile boundary are exact, sq != sk both ways, and with causal masking the
    lower warpgroups, which skip the key tiles above their rows, keep their turns in step; there the short
    tile comes first (seqlen 1000: rows [0, 64), two idle warpgroups that must not store)."""
    q, k, v = _rand(3, sq, 2, 64, seed=sq), _rand(3, sk, 2, 64, seed=sk + 1), _rand(3, sk, 2, 64, seed=sk + 2)
    out = cuflash.attention(q, k, v, causal=causal)
    _ref_check(q, k, v, out, causal=causal)


def test_many_launch_groups():
    """Short sequences over many heads split the grid into several L2 launch groups, the last one partial;
    every (batch, head, query block) is computed once."""
    q, k, v = (_rand(5, 1200, 7, 128, seed=s) for s in (7, 8, 9))
    assert 35 % dispatch.launch_group(35, 1200, 128) != 0
    out = cuflash.attention(q, k, v, causal=True)
    _ref_check(q, k, v, out, causal=True)


@pytest.mark.parametrize("d", [64, 128, 192])
def test_persistent_ctas_cover_every_tile(d):
    """Without masking, one CTA per SM loops over several work tiles each (more tiles than SMs, odd
    seqlens): every tile is computed once and exactly, across K/V ring stages that run on between tiles.
    seqlen_q 1050 leaves the last query tile's upper warpgroups without rows (at head dim 64 under
    ping-pong): they pass the key tiles' stages on without computing, and the ring stays in step."""
    from cuflash import ops
    q, k, v = _rand(3, 1050, 8, d, seed=d), _rand(3, 1300, 8, d, seed=d + 1), _rand(3, 1300, 8, d, seed=d + 2)
    key = dispatch.forward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False)
    assert 1050 % key.block_m <= key.block_m - 64  # some warpgroup of the last tile is idle
    tiles = -(-1050 // key.block_m) * 3 * 8
    assert dispatch.forward_sm90_schedule(key, tiles, 1300, ops._sm_count(0)) == (ops._sm_count(0), False)
    out = cuflash.attention(q, k, v)
    _ref_check(q, k, v, out)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [(-1, 0), (100, 0), (200, 50)])
def test_persistent_masked_tiles(d, window):
    """Causal/window calls run persistent CTAs over tiles of unequal length, some seeing no key at all
    (sq > sk), taken from the tile counter: every tile is computed once and exactly, and every empty row is
    zero."""
    q, k, v = _rand(3, 2000, 8, d, seed=11), _rand(3, 1500, 8, d, seed=12), _rand(3, 1500, 8, d, seed=13)
    key = dispatch.forward_key_sm90("bf16", d, is_local=True, softcap=False, alibi=False)
    assert dispatch.forward_sm90_schedule(key, -(-2000 // key.block_m) * 3 * 8, 1500, 132) == (132, True)
    out = cuflash.attention(q, k, v, window_size=window)
    _ref_check(q, k, v, out, window_size=window)


def test_tile_counter_reset_between_back_to_back_calls():
    """Causal calls on the counter schedule share their stream's tile counter, which each launch's last CTA
    to take a tile puts back to zero (ops.stream_tile_counter): 50 calls of alternating sizes (different
    tile counts) queued without a synchronisation in between all give the output of a lone synchronised
    call, bit for bit, on two streams at once, and the counters read zero afterwards. A counter left at
    the previous call's final value would skip every tile and leave the NaN-poisoned outputs in place."""
    shapes = ((4, 1000, 16), (3, 2000, 8))
    inputs = [[_rand(b, s, h, 128, seed=21 + 3 * i + j) for j in range(3)] for i, (b, s, h) in enumerate(shapes)]
    key = dispatch.forward_key_sm90("bf16", 128, is_local=True, softcap=False, alibi=False)
    for b, s, h in shapes:
        assert dispatch.forward_sm90_schedule(key, -(-s // key.block_m) * b * h, s, ops._sm_count(0))[1]
    refs = []
    for q, k, v in inputs:
        refs.append(cuflash.attention(q, k, v, causal=True))
        synchronize()
        _ref_check(q, k, v, refs[-1], causal=True)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    poison_cupy_pool([inputs[0][0].nbytes] * 50 + [4 * 16 * 1000 * 4] * 50)
    outs = []
    for i in range(50):
        with streams[i % 2]:
            outs.append((i // 2 % 2, cuflash.attention(*inputs[i // 2 % 2], causal=True)))
    synchronize()
    for s in streams:
        s.synchronize()
    assert all(o.dtype == refs[j].dtype and bool(cp.array_equal(raw_words(o), raw_words(refs[j]))) for j, o in outs)
    counters = [ops._stream_counters[(0, s.ptr, 0)] for s in streams]
    assert [int(owner[0]) for owner, _ in counters] == [0, 0]


def test_tile_counter_in_a_cuda_graph():
    """A causal forward captured into a CUDA graph gets its own counter and memset node from the graph's
    pool, not the stream's: replays interleaved with eager calls on the current stream, without a
    synchronisation in between, all give the eager result bit for bit."""
    torch = require_torch_cuda()
    q, k, v = (torch.randn(4, 1000, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = cuflash.attention(q, k, v, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuflash.attention(q, k, v, causal=True)  # (the stream's counter made before the capture)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuflash.attention(q, k, v, causal=True)
    replays, eager = [], []
    for _ in range(5):
        captured.view(torch.int16).fill_(-1)  # NaN
        graph.replay()
        replays.append(captured.clone())
        eager.append(cuflash.attention(q, k, v, causal=True))
    torch.cuda.synchronize()
    assert all(torch.equal(o, ref) for o in replays + eager)


def test_params_and_smem_formulas_match_sm90_kernel():
    """ops.py packs exactly sizeof(ForwardSm90Params); dispatch's shared-memory formula and its choice of a
    persistent grid agree with the kernel for every tile configuration."""
    from gpu_helpers import device_int
    seen = set()
    for key in dispatch.all_forward_sm90_keys():
        cfg = (key.head_dim, key.block_m, key.block_n, key.extra)
        if key.dtype != "bf16" or cfg in seen:
            continue
        seen.add(cfg)
        assert device_int(key, "cf_fwd_sm90_params_bytes") == ops.SM90_PARAMS_BYTES
        assert device_int(key, "cf_fwd_sm90_smem_bytes") == dispatch.forward_sm90_smem_bytes(key)
        # A variant built for one tile per CTA must never get a persistent (smaller) grid.
        persistent = dispatch.forward_sm90_schedule(key, 10**6, 1000, 132)[0] < 10**6
        assert device_int(key, "cf_fwd_sm90_persistent") == int(persistent)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the
    Hopper kernel at seqlens 1, 17 and 1000 over every tile configuration."""
    run_sanitizer("sanitize_forward_sm90.py", tool)
