"""Bound calls (cuflash/executor.py), the per-call fast path of the dense GPU forward and backward: a call with
the signature of an earlier plain call runs that call's bound launches instead of validating and planning.

What is proved, each against the general path run on the same arrays (executor lookups switched off):
the bound forward and backward give the same bits (torch and CuPy, fp16 and bf16, causal / window /
softcap, the Hopper and the sm80 forward); they really run (a spy counts them); their tensor maps follow new
addresses (more arrays than a slot remembers); a call whose signature differs from the bound one in
strides, alignment, dtype or an option's type goes the general path and gets its checks (errors included);
plan.run takes the bound path; a bound call captured in a CUDA graph replays with new inputs; an autograd
step's backward finds its bound call through its forward's. Without a GPU: launches that share a parameter
block write it once and each kernel reads it at its own start; the dispatch environment in a signature
follows os.environ.
"""

import contextlib

import numpy as np
import pytest

import cuflash
from cuflash import executor

from gpu_helpers import inputs, randn_like, require_torch_cuda, same_bits, to_host



@contextlib.contextmanager
def general_path(monkeypatch):
    """Every call inside takes the general path (and may bind, which is harmless)."""
    with monkeypatch.context() as m:
        m.setattr(executor, "lookup_forward", lambda key: None)
        m.setattr(executor, "lookup_backward", lambda key: None)
        yield


@pytest.fixture
def bound_runs(monkeypatch):
    """Counts the bound forward and backward runs that launched."""
    counts = {"fwd": 0, "bwd": 0}
    for cls, name in ((executor.BoundForward, "fwd"), (executor.BoundBackward, "bwd")):
        original = cls.run

        def spy(self, *xs, original=original, name=name):
            res = original(self, *xs)
            counts[name] += res is not None
            return res
        monkeypatch.setattr(cls, "run", spy)
    executor._forward.clear()
    executor._backward.clear()
    return counts


def _arrays(fw, b, s, hq, hk, d, dtype, seed):
    q, k, v = inputs(b, s, s, hq, hk, d, dtype, seed=seed)
    dout = randn_like(q, seed + 100)
    if fw == "torch":
        torch = require_torch_cuda()
        q, k, v, dout = (torch.from_dlpack(x) for x in (q, k, v, dout))
    return q, k, v, dout


OPTIONS = [dict(), dict(causal=True), dict(window_size=(40, 7), softcap=8.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=["full", "causal", "window_softcap"])
@pytest.mark.parametrize("family", ["", "sm80"])
def test_bound_calls_equal_the_general_path(fw, dtype, opts, family, bound_runs, monkeypatch):
    """Second and later calls of a signature run bound (forward, and the deterministic backward bit for bit;
    the atomic backward's dK/dV bit for bit too), with new data each time."""
    import cupy
    monkeypatch.setenv("CUFLASH_FWD_KERNEL", family) if family else monkeypatch.delenv("CUFLASH_FWD_KERNEL", False)
    for seed in range(3):
        q, k, v, dout = _arrays(fw, 2, 333, 4, 2, 64, dtype, seed)
        out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
        grads_atomic = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
        with general_path(monkeypatch):
            want_out, want_lse = cuflash.attention(q, k, v, return_lse=True, **opts)
            want = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
            want_atomic = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
        cupy.cuda.runtime.deviceSynchronize()
        same_bits(out, want_out)
        same_bits(lse, want_lse)
        for g, w in zip(grads, want):
            same_bits(g, w)
        for g, w in zip(grads_atomic[1:], want_atomic[1:]):
            same_bits(g, w)
        np.testing.assert_allclose(to_host(grads_atomic[0]).astype(np.float32),
                                   to_host(want_atomic[0]).astype(np.float32), rtol=2e-2, atol=2e-3)
    # The first seed's calls bound the signatures; the next two ran bound.
    assert bound_runs == {"fwd": 2, "bwd": 4}


@pytest.mark.gpu
def test_tensor_maps_follow_new_addresses(bound_runs, monkeypatch):
    """More live input arrays than a map slot remembers (executor._MAPS_PER_SLOT): each bound call reads its
    own arrays."""
    import cupy
    kept = []
    for seed in range(executor._MAPS_PER_SLOT + 4):
        q, k, v, _ = _arrays("cupy", 1, 200, 2, 2, 64, "bfloat16", seed)
        kept.append((q, k, v))
        got = cuflash.attention(q, k, v, causal=True)
        with general_path(monkeypatch):
            want = cuflash.attention(q, k, v, causal=True)
        cupy.cuda.runtime.deviceSynchronize()
        same_bits(got, want)
    assert bound_runs["fwd"] == executor._MAPS_PER_SLOT + 3


@pytest.mark.gpu
def test_other_signatures_take_the_general_path(bound_runs):
    """After a contiguous, aligned fp16 call is bound: a strided view, a view off a 16-byte boundary, another
    dtype and an option of another type each go the general path (the bound call never runs for them), with
    its results and its errors."""
    import cupy
    q, k, v, dout = _arrays("cupy", 1, 128, 4, 4, 64, "float16", 0)
    base = cuflash.attention(q, k, v, causal=True)
    assert bound_runs["fwd"] == 0
    wide = cupy.zeros((1, 128, 8, 64), cupy.float16)
    wide[:, :, ::2] = q
    strided = cuflash.attention(wide[:, :, ::2], k, v, causal=True)
    flat = cupy.zeros(q.size + 1, cupy.float16)
    off = flat[1:].reshape(q.shape)
    off[...] = q
    misaligned = cuflash.attention(off, k, v, causal=True)
    cupy.cuda.runtime.deviceSynchronize()
    same_bits(strided, base)
    same_bits(misaligned, base)
    with pytest.raises(TypeError, match="causal"):
        cuflash.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="dtype"):
        cuflash.attention(q, k.astype(cupy.float32), v, causal=True)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    with pytest.raises(ValueError, match="lse"):
        cuflash.attention_backward(dout, q, k, v, out, lse[:, :2], causal=True)
    assert bound_runs["fwd"] == 0 and bound_runs["bwd"] == 0
    cuflash.attention(q, k, v, causal=True)
    assert bound_runs["fwd"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_plan_run_takes_the_bound_path(fw, bound_runs, monkeypatch):
    """cuflash.plan's run and run_backward run bound after their first call, and still reject arrays of
    another shape."""
    import cupy
    q, k, v, dout = _arrays(fw, 2, 256, 4, 4, 128, "bfloat16", 1)
    p = cuflash.plan(q, k, v, causal=True, return_lse=True)
    for _ in range(3):
        out, lse = p.run(q, k, v)
        grads = p.run_backward(dout, q, k, v, out, lse)
    with general_path(monkeypatch):
        want_out, _ = cuflash.attention(q, k, v, causal=True, return_lse=True)
        want = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    cupy.cuda.runtime.deviceSynchronize()
    same_bits(out, want_out)
    for g, w in zip(grads[1:], want[1:]):
        same_bits(g, w)
    assert bound_runs == {"fwd": 2, "bwd": 2}
    with pytest.raises(ValueError, match="shape"):
        p.run(q[:, :100], k, v)


@pytest.mark.gpu
def test_autograd_backward_found_through_its_forward(bound_runs, monkeypatch):
    """flash_attn_func's backward, from the second step on, runs the bound backward filed with its bound
    forward (executor.run_backward_of_forward, counted), with the general path's bits (deterministic); a
    dout at another 16-byte alignment is not that call's and goes the general path, with the same bits."""
    torch = require_torch_cuda()
    from cuflash.torch import flash_attn_func
    hits = {"n": 0}
    original = executor.run_backward_of_forward

    def spy(*args):
        res = original(*args)
        hits["n"] += res is not None
        return res
    monkeypatch.setattr(executor, "run_backward_of_forward", spy)

    def step(q, k, v, dout):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        return torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
    for seed in range(3):
        q, k, v, dout = _arrays("torch", 2, 333, 4, 2, 64, "bfloat16", seed)
        got = step(q, k, v, dout)
        with monkeypatch.context() as m:  # (the forward bound: its bits are the general path's, proved above)
            m.setattr(executor, "lookup_backward", lambda key: None)
            m.setattr(executor, "run_backward_of_forward", lambda *args: None)
            want = step(q, k, v, dout)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert hits["n"] == 2
    odd = torch.empty(dout.numel() + 1, dtype=dout.dtype, device=dout.device)[1:].view(dout.shape)
    odd.copy_(dout)
    assert all(torch.equal(a, b) for a, b in zip(step(q, k, v, odd), want)) and hits["n"] == 2


@pytest.mark.gpu
def test_torch_bound_call_in_a_cuda_graph(bound_runs):
    """flash_attn_func forward and backward, bound by eager calls, captured in a CUDA graph: replays with new
    inputs copied in equal eager calls on those inputs."""
    torch = require_torch_cuda()
    from cuflash.torch import flash_attn_func
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), go)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    assert bound_runs["fwd"] >= 1 and bound_runs["bwd"] >= 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for x in (q, k, v, go):
            x.copy_(torch.randn_like(x))
    graph.replay()
    want = step()
    torch.cuda.synchronize()
    for a, b in zip(captured[1:], want[1:]):
        assert torch.equal(a, b)
    torch.testing.assert_close(captured[0], want[0], rtol=2e-2, atol=2e-3)


def _fake_launch(grid, maps, block, name):
    import types

    from cuflash.launch_plan import KernelLaunch
    return KernelLaunch(types.SimpleNamespace(ptr=name), grid, 128, 0, block, maps)


def test_launches_sharing_a_block_write_it_once():
    """The backward's preprocess, main kernel (tensor maps first) and postprocess share one parameter block:
    bound, they are one buffer whose pointer fields are written once per call, the main kernel reading it
    from its start and the other two after the maps; a launch with another block (the deterministic dQ
    kernel's) gets its own buffer. Every kernel's argument is the block with this call's pointers."""
    import ctypes

    from cuflash import params_layout, tma
    block = bytes(range(256)) * (params_layout.STRUCT.size // 256) + bytes(params_layout.STRUCT.size % 256)
    other = bytes(len(block))
    maps = (("q", 64), ("k", 128))
    launches = [_fake_launch(3, (), block, 1), _fake_launch(5, maps, block, 2), _fake_launch(3, (), block, 3),
                _fake_launch(7, (), other, 4)]
    from cuflash.arrays import DeviceArray
    views = {n: DeviceArray(0, (1, 256, 2, 64), (32768, 128, 64, 1), "bfloat16", 0, None) for n in ("q", "k")}
    names = ("q", "k", "dq")
    bound = executor._bindings(launches, names, views, None)
    assert [[k[0] for k in b.kernels] for b in bound] == [[1, 2, 3], [4]]
    assert [k[5] for k in bound[0].kernels] == [(2 * tma.MAP_BYTES,), (0,), (2 * tma.MAP_BYTES,)]
    for b in bound:  # (no real tensor maps on the CPU)
        b.map_slots = tuple((off, i, add, lambda p: bytes(tma.MAP_BYTES), cache) for off, i, add, _, cache in b.map_slots)
    seen = []

    def launch_kernel(fn, gx, gy, gz, bx, by, bz, smem, stream, argv, extra):
        start = ctypes.cast(argv, ctypes.POINTER(ctypes.c_void_p))[0]
        start += 2 * tma.MAP_BYTES if fn == 2 else 0  # (the main kernel's maps come first)
        seen.append((fn, gx, ctypes.string_at(start, len(block))))
    values = [0x7000_0000_1000, 0x7000_0000_2000, 0x7000_0000_3000]
    for b in bound:
        b(values, 0, launch_kernel)
    assert [(fn, gx) for fn, gx, _ in seen] == [(1, 3), (2, 5), (3, 3), (4, 7)]
    for fn, _, got in seen:
        want = bytearray(block if fn != 4 else other)
        for name, value in zip(names, values):
            off = params_layout.OFFSETS[name]
            want[off:off + 8] = value.to_bytes(8, "little")
        assert got == bytes(want)


def test_signature_environment_follows_os_environ(monkeypatch):
    """The dispatch environment in every bound-call and plan key (read from os.environ's own table) changes
    when a steering variable is set or removed between calls."""
    from cuflash import dispatch, launch_plan
    monkeypatch.delenv(dispatch.FWD_KERNEL_ENV, raising=False)
    before = launch_plan.env()
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm80")
    during = launch_plan.env()
    monkeypatch.delenv(dispatch.FWD_KERNEL_ENV)
    assert before != during and launch_plan.env() == before
    assert len({before, during}) == 2
