"""The variable-length forward on the GPU (cuflash/varlen.py -> ops.forward_varlen -> the Hopper or the sm80
forward built with CF_VARLEN, seq_context.cuh): every packed sequence equals the float64 reference of that sequence alone
under FlashAttention's rule (its same-dtype naive error x 2), with lengths 0, 1, 17, 1000, seqlen_q != seqlen_k,
causal, windows, softcap, ALiBi shared and per sequence, GQA, fp16 / bf16 and an odd head dim; NaN stored in
the rows no sequence covers never reaches an output, which are zeros with LSE +inf there; seqused shortens
sequences; the backward (the Hopper or sm80 backward kernels' variable-length builds) passes the gradient rule per
sequence under the same conditions, and torch autograd through flash_attn_varlen_func reaches it."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import flash_rule, naive_same_dtype, np_dtype, require_torch_cuda, same_bits, to_device, to_host

pytestmark = pytest.mark.gpu

LENS_Q = [17, 0, 1, 1000, 33, 128]
LENS_K = [20, 5, 0, 1000, 40, 300]


def _packed(dtype, hq=4, hk=2, d=64, seed=0, spare=5):
    rng = np.random.default_rng(seed)
    tq, tk = sum(LENS_Q) + spare, sum(LENS_K) + spare
    host = [rng.standard_normal(s).astype(np.float32) for s in ((tq, hq, d), (tk, hk, d), (tk, hk, d))]
    for x in host:
        x[-spare:] = np.nan  # rows past the last sequence: must never be read
    cu_q = np.concatenate([[0], np.cumsum(LENS_Q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(LENS_K)]).astype(np.int32)
    dev = [to_device(x.astype(np_dtype(dtype))) for x in host]
    return host, dev, cu_q, cu_k


@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 72, 256])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(50, 10), softcap=5.0),
                                  dict(alibi="shared"), dict(alibi="per_sequence", causal=True)])
def test_each_sequence_follows_flash_rule(family, dtype, d, opts, monkeypatch):
    """Both forward kernels' variable-length builds (CUFLASH_FWD_KERNEL; the Hopper one where the GPU has it)."""
    import cupy
    from cuflash import dispatch, jit
    from gpu_helpers import loaded_families
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, family)
    jit._loaded.clear()
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    host, (q, k, v), cu_q, cu_k = _packed(dtype, d=d)
    slopes = None
    if alibi == "shared":
        slopes = np.linspace(0.05, 0.3, 4).astype(np.float32)
    elif alibi == "per_sequence":
        slopes = np.random.default_rng(3).random((len(LENS_Q), 4)).astype(np.float32) * 0.3
    out, lse = cuflash.attention_varlen(q, k, v, cupy.asarray(cu_q), cupy.asarray(cu_k), max(LENS_Q), max(LENS_K),
                                        alibi_slopes=None if slopes is None else cupy.asarray(slopes),
                                        return_lse=True, **opts)
    out, lse = to_host(out).astype(np.float64), to_host(lse)
    qh, kh, vh = (to_host(x).astype(np.float64) for x in (q, k, v))
    assert out.shape == qh.shape and lse.shape == (4, qh.shape[0])
    for i in range(len(LENS_Q)):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        row = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i])
        ref_out, ref_lse = reference.attention_reference(qh[None, rq], kh[None, rk], vh[None, rk], alibi_slopes=row,
                                                         **opts)
        if LENS_Q[i] and LENS_K[i]:
            base = naive_same_dtype(q[int(cu_q[i]):int(cu_q[i + 1])][None], k[int(cu_k[i]):int(cu_k[i + 1])][None],
                                    v[int(cu_k[i]):int(cu_k[i + 1])][None], alibi_slopes=row, **opts)
            flash_rule(out[None, rq], ref_out, base)
        else:
            assert np.all(out[rq] == 0)
        fin = np.isfinite(ref_lse[0])
        np.testing.assert_array_equal(np.isinf(lse[:, rq]), ~fin)
        np.testing.assert_allclose(lse[:, rq][fin], ref_lse[0][fin], rtol=1e-4, atol=1e-4)
    assert np.all(out[cu_q[-1]:] == 0) and np.all(lse[:, cu_q[-1]:] == np.inf)
    hopper = cupy.cuda.Device().compute_capability == "90"
    assert f"fwd_{family if hopper else 'sm80'}" in loaded_families()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_many_sequences_on_the_tile_counter(d, causal):
    """Far more work tiles than SMs: the Hopper kernel's persistent CTAs take tiles from the counter, several
    each, skipping the tiles past short sequences' ends (lengths 0 to 700, 40 sequences, 8 query heads on
    2 KV heads); every sequence still follows FlashAttention's rule."""
    import cupy
    from cuflash import launch_plan
    rng = np.random.default_rng(11)
    lens = [int(x) for x in rng.integers(0, 701, 40)]
    lens[:3] = [0, 1, 700]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, hq, hk = int(cu[-1]), 8, 2
    q, k, v = (to_device(rng.standard_normal((total, h, d)).astype(np.float16)) for h in (hq, hk, hk))
    launch_plan._plans.clear()
    out = cuflash.attention_varlen(q, k, v, cupy.asarray(cu), cupy.asarray(cu), max(lens), max(lens),
                                   causal=causal)
    if cupy.cuda.Device().compute_capability == "90":
        plans = [p for key, p in launch_plan._plans.items() if key[0] == "fwd_varlen"]
        assert len(plans) == 1 and plans[0].tile_counter
        assert plans[0].launch.grid < max(lens) // 64 * len(lens) * hq
    out = to_host(out).astype(np.float64)
    qh, kh, vh = (to_host(x).astype(np.float64) for x in (q, k, v))
    for i, n in enumerate(lens):
        rows = slice(cu[i], cu[i + 1])
        if n == 0:
            continue
        ref, _ = reference.attention_reference(qh[None, rows], kh[None, rows], vh[None, rows], causal=causal)
        base = naive_same_dtype(q[int(cu[i]):int(cu[i + 1])][None], k[int(cu[i]):int(cu[i + 1])][None],
                                v[int(cu[i]):int(cu[i + 1])][None], causal=causal)
        flash_rule(out[None, rows], ref, base)


def test_seqused():
    """seqused shortens sequences (the masks align to the used lengths), forward and backward (both dQ
    modes), as on the CPU path."""
    import cupy
    host, (q, k, v), cu_q, cu_k = _packed("float16")
    used_q = np.array([10, 0, 1, 500, 33, 1], np.int32)
    used_k = np.array([20, 5, 0, 999, 1, 300], np.int32)
    args = (cupy.asarray(cu_q), cupy.asarray(cu_k), 1000, 1000)
    kw = dict(causal=True, seqused_q=cupy.asarray(used_q), seqused_k=cupy.asarray(used_k))
    out, lse = cuflash.attention_varlen(q, k, v, *args, return_lse=True, **kw)
    hq, hk, hv = (np.nan_to_num(to_host(x).astype(np.float32)) for x in (q, k, v))
    host_kw = dict(causal=True, seqused_q=used_q, seqused_k=used_k)
    want, want_lse = cuflash.attention_varlen(hq, hk, hv, cu_q, cu_k, 1000, 1000, return_lse=True, **host_kw)
    np.testing.assert_allclose(to_host(out).astype(np.float32), want, atol=2e-3)
    np.testing.assert_array_equal(np.isinf(to_host(lse)), np.isinf(want_lse))
    dout = to_device(np.random.default_rng(9).standard_normal(q.shape).astype(np.float16))
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, **kw)
    want_grads = cuflash.attention_varlen_backward(to_host(dout).astype(np.float32), hq, hk, hv,
                                                   to_host(out).astype(np.float32), to_host(lse), cu_q, cu_k, 1000,
                                                   1000, **host_kw)
    for ours, ref in zip(grads, want_grads):
        np.testing.assert_allclose(to_host(ours).astype(np.float32), ref, atol=5e-3)
    det = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, deterministic=True, **kw)
    for ours, ref in zip(det, want_grads):
        np.testing.assert_allclose(to_host(ours).astype(np.float32), ref, atol=5e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_exact_and_bitwise_repeatable(causal):
    """deterministic=True (the query-parallel dQ kernel's variable-length build) passes the gradient rule per
    sequence, and 10 repeats are bitwise identical."""
    import cupy
    from test_backward import _grad_rule
    from gpu_helpers import naive_backward_same_dtype, raw_words
    host, (q, k, v), cu_q, cu_k = _packed("bfloat16", d=128, seed=11)
    args = (cupy.asarray(cu_q), cupy.asarray(cu_k), max(LENS_Q), max(LENS_K))
    out, lse = cuflash.attention_varlen(q, k, v, *args, causal=causal, return_lse=True)
    dout = to_device(np.random.default_rng(12).standard_normal(q.shape).astype(np_dtype("bfloat16")))
    first = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, causal=causal, deterministic=True)
    for _ in range(10):
        again = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, causal=causal, deterministic=True)
        for a, b in zip(first, again):
            assert bool(cupy.array_equal(raw_words(a), raw_words(b)))
    dq, dk, dv = (to_host(g).astype(np.float64) for g in first)
    qh, kh, vh, doh = (to_host(x).astype(np.float64) for x in (q, k, v, dout))
    for i in (0, 3, 5):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        refs = reference.attention_backward_reference(doh[None, rq], qh[None, rq], kh[None, rk], vh[None, rk],
                                                      causal=causal)
        sl = lambda x, r: x[int(r.start):int(r.stop)][None]  # noqa: E731
        base = naive_backward_same_dtype(sl(dout, rq), sl(q, rq), sl(k, rk), sl(v, rk), causal=causal)
        for name, ours, ref, b in zip(("dq", "dk", "dv"), (dq[None, rq], dk[None, rk], dv[None, rk]), refs, base):
            _grad_rule(ours, ref, b, f"{name} of sequence {i}", float(np.abs(doh[rq]).max()))


@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 72, 160, 256])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(50, 10), softcap=5.0),
                                  dict(alibi="per_sequence", causal=True)])
def test_backward_each_sequence_follows_flash_rule(family, dtype, d, opts, monkeypatch):
    """dq, dk, dv of every packed sequence against the float64 gradients of that sequence alone, for both main
    kernels' variable-length builds (CUFLASH_BWD_KERNEL; the Hopper one where the GPU has it: at head dim 256
    bwd_sm90_wide.cuh's), under
    FlashAttention's rule for gradients (3x the same-dtype naive error); GQA (4 query heads, 2 key/value
    heads); zero-length sequences get zero gradients; NaN in the rows of q, k, v and dout past the last
    sequence never reaches a gradient, whose rows there are zero."""
    import cupy
    from cuflash import dispatch, jit
    from test_backward import _grad_rule
    from gpu_helpers import loaded_families, naive_backward_same_dtype
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, family)
    jit._loaded.clear()
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    host, (q, k, v), cu_q, cu_k = _packed(dtype, d=d, seed=d)
    slopes = None
    if alibi == "per_sequence":
        slopes = np.random.default_rng(3).random((len(LENS_Q), 4)).astype(np.float32) * 0.3
    dev_slopes = None if slopes is None else cupy.asarray(slopes)
    args = (cupy.asarray(cu_q), cupy.asarray(cu_k), max(LENS_Q), max(LENS_K))
    out, lse = cuflash.attention_varlen(q, k, v, *args, alibi_slopes=dev_slopes, return_lse=True, **opts)
    dout_host = np.random.default_rng(d + 1).standard_normal(q.shape).astype(np.float32)
    dout_host[cu_q[-1]:] = np.nan
    dout = to_device(dout_host.astype(np_dtype(dtype)))
    dq, dk, dv = (to_host(g).astype(np.float64) for g in cuflash.attention_varlen_backward(
        dout, q, k, v, out, lse, *args, alibi_slopes=dev_slopes, **opts))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    qh, kh, vh, doh = (to_host(x).astype(np.float64) for x in (q, k, v, dout))
    for i in range(len(LENS_Q)):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if not (LENS_Q[i] and LENS_K[i]):
            assert np.all(dq[rq] == 0) and np.all(dk[rk] == 0) and np.all(dv[rk] == 0)
            continue
        row = None if slopes is None else slopes[i]
        refs = reference.attention_backward_reference(doh[None, rq], qh[None, rq], kh[None, rk], vh[None, rk],
                                                      alibi_slopes=row, **opts)
        sl = lambda x, r: x[int(r.start):int(r.stop)][None]  # noqa: E731
        base = naive_backward_same_dtype(sl(dout, rq), sl(q, rq), sl(k, rk), sl(v, rk), alibi_slopes=row, **opts)
        for name, ours, ref, b in zip(("dq", "dk", "dv"), (dq[None, rq], dk[None, rk], dv[None, rk]), refs, base):
            _grad_rule(ours, ref, b, f"{name} of sequence {i}", float(np.abs(doh[rq]).max()))
    assert np.all(dq[cu_q[-1]:] == 0) and np.all(dk[cu_k[-1]:] == 0) and np.all(dv[cu_k[-1]:] == 0)
    hopper = cupy.cuda.Device().compute_capability == "90"
    assert f"bwd_{family if hopper else 'sm80'}" in loaded_families()


def test_torch_varlen_autograd_on_cuda():
    """flash_attn_varlen_func on CUDA tensors: autograd's gradients are attention_varlen_backward's."""
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_varlen_func
    host, _, cu_q, cu_k = _packed("bfloat16", d=64, seed=4)
    q, k, v = (torch.from_numpy(np.nan_to_num(x)).to("cuda", torch.bfloat16).requires_grad_() for x in host)
    cq, ck = torch.from_numpy(cu_q).cuda(), torch.from_numpy(cu_k).cuda()
    out = flash_attn_varlen_func(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    _, lse = cuflash.attention_varlen(q.detach(), k.detach(), v.detach(), cq, ck, max(LENS_Q), max(LENS_K),
                                      causal=True, return_lse=True)
    want = cuflash.attention_varlen_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cq, ck,
                                             max(LENS_Q), max(LENS_K), causal=True)
    for x, w in zip((q, k, v), want):  # dQ is summed with atomics: equal up to the order of fp32 additions
        torch.testing.assert_close(x.grad.float(), w.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the
    variable-length kernels, NaN in the uncovered rows, tails at tile boundaries (sanitize_varlen.py)."""
    from gpu_helpers import run_sanitizer
    run_sanitizer("sanitize_varlen.py", tool)


def test_torch_varlen_cuda_graph_replays_new_lengths():
    """flash_attn_varlen_func forward + backward captured in one CUDA graph, replayed after new sequence
    lengths (same total, same max_seqlen bound) and new values are copied into the captured tensors: the
    kernels read cu_seqlens on the device, so the replay equals an eager call on the new batch."""
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_varlen_func
    rng = np.random.default_rng(21)
    total, bound, hq, hk, d = 1200, 700, 4, 2, 64
    cu_a = torch.tensor([0, 100, 700, 701, 1200], dtype=torch.int32, device="cuda")
    cu_b = torch.tensor([0, 500, 517, 1100, 1200], dtype=torch.int32, device="cuda")

    def leaves(seed):
        r = np.random.default_rng(seed)
        return [torch.from_numpy(r.standard_normal((total, h, d)).astype(np.float32)).to("cuda", torch.bfloat16)
                for h in (hq, hk, hk)]
    q, k, v = (x.requires_grad_() for x in leaves(1))
    dout = torch.from_numpy(rng.standard_normal((total, hq, d)).astype(np.float32)).to("cuda", torch.bfloat16)
    cu = cu_a.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            flash_attn_varlen_func(q, k, v, cu, cu, bound, bound, causal=True).backward(dout)
            q.grad = k.grad = v.grad = None
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_varlen_func(q, k, v, cu, cu, bound, bound, causal=True)
        out.backward(dout)
    new = leaves(2)
    with torch.no_grad():
        for x, y in zip((q, k, v), new):
            x.copy_(y)
        cu.copy_(cu_b)
    graph.replay()
    torch.cuda.synchronize()
    eager = [x.detach().clone().requires_grad_() for x in new]
    want_out = flash_attn_varlen_func(*eager, cu_b, cu_b, bound, bound, causal=True)
    want_out.backward(dout)
    assert torch.equal(out, want_out)  # the forward is deterministic
    for got, want in zip((q.grad, k.grad, v.grad), eager):  # dQ: atomics, equal up to fp32 addition order
        torch.testing.assert_close(got.float(), want.grad.float(), atol=2e-2, rtol=2e-2)


def test_torch_varlen_compile_fullgraph_on_cuda():
    """flash_attn_varlen_func inside torch.compile(fullgraph=True) on CUDA tensors, total lengths marked
    dynamic: the eager loss and gradients for two packings, with one compiled graph."""
    torch = pytest.importorskip("torch")
    from torch._dynamo.testing import CompileCounterWithBackend

    from cuflash.torch import flash_attn_varlen_func
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu):
        return (flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=True).float() ** 2).sum()
    cf = torch.compile(f, fullgraph=True, backend=counter)
    for lens in ([30, 200, 1], [64, 64, 300, 7]):
        rng = np.random.default_rng(len(lens))
        total = sum(lens)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
        q, k, v = (torch.from_numpy(rng.standard_normal((total, 2, 64)).astype(np.float32))
                   .to("cuda", torch.float16).requires_grad_() for _ in range(3))
        for t in (q, k, v, cu):
            torch._dynamo.mark_dynamic(t, 0)
        loss = cf(q, k, v, cu)
        got = torch.autograd.grad(loss, (q, k, v))
        ref = f(q, k, v, cu)
        torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-3)
        for a, b in zip(got, torch.autograd.grad(ref, (q, k, v))):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    assert counter.frame_count == 1


@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(40, 7))])
@pytest.mark.parametrize("one_cu", [False, True])
def test_bound_calls_equal_the_general_path(fw, opts, one_cu, sequence_runs):
    """The third call of a signature replays the second one's recorded launches (executor.BoundSequence):
    on new values and new cu_seqlens (the last sequence shorter, so more rows stay uncovered and must come
    out zero although the allocator may hand back the first call's memory), the bound forward (with and
    without the LSE) and backward (dK, dV bit for bit; deterministic dQ bit for bit, atomic dQ to fp32
    rounding) equal the general path's run on the same inputs; also with one cu_seqlens array passed for both
    q and k (self-attention), which the recording takes once."""
    import cupy
    from cuflash import executor
    if fw == "torch":
        require_torch_cuda()
        import torch
    runs = sequence_runs
    def inputs(seed, lens):
        host, dev, _, _ = _packed("bfloat16", hq=8, hk=2, d=128, seed=seed)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        dout = np.random.default_rng(seed + 100).standard_normal(host[0].shape).astype(np.float32)
        arrs = [*dev, to_device(dout.astype(np_dtype("bfloat16"))), cupy.asarray(cu)]
        arrs = [torch.from_dlpack(x) for x in arrs] if fw == "torch" else arrs
        return arrs + [arrs[-1] if one_cu else arrs[-1].clone() if fw == "torch" else arrs[-1].copy()]

    def run(xs):
        q, k, v, dout, cu_q, cu_k = xs
        out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 1000, 1000, return_lse=True, **opts)
        out_only = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 1000, 1000, **opts)
        grads = [cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 1000, 1000,
                                                   deterministic=det, **opts) for det in (False, True)]
        return out, lse, out_only, grads

    from cuflash import varlen
    varlen._seen.clear()
    try:
        # A signature is recorded the second time it comes and replayed from the third. All calls' arrays
        # stay alive, so the bound call cannot find the recorded call's addresses again by chance.
        first = inputs(1, LENS_Q)
        recorded = inputs(3, LENS_Q)
        kept = [run(first), run(recorded)]
        assert runs == []
        lens = [17, 0, 1, 1000, 33, 100]
        second = inputs(2, lens)
        got = run(second)
        assert runs == [True] * 4
        ptr = (lambda x: x.data_ptr()) if fw == "torch" else (lambda x: x.data.ptr)
        assert ptr(got[0]) not in {ptr(r[0]) for r in kept} and ptr(second[0]) != ptr(recorded[0])
        executor.clear()
        want = run(second)
    finally:
        executor.clear()
        varlen._seen.clear()
    for a, b in zip(got[:3], want[:3]):
        same_bits(a, b)
    (dq, dk, dv), (dq_det, dk_det, dv_det) = got[3]
    (wq, wk, wv), (wq_det, wk_det, wv_det) = want[3]
    for a, b in ((dk, wk), (dv, wv), (dq_det, wq_det), (dk_det, wk_det), (dv_det, wv_det)):
        same_bits(a, b)
    hq, hw = (to_host(x).astype(np.float32) for x in (dq, wq))
    np.testing.assert_allclose(hq, hw, rtol=0, atol=2e-2 * float(np.abs(hw).max()))
    assert not np.any(to_host(got[0]).astype(np.float32)[sum(lens):])  # uncovered rows: zeros


def test_dropout_on_gpu_arrays_raises_before_any_work():
    """dropout_p > 0 in the variable-length functions on GPU arrays (CuPy; torch CUDA tensors, autograd or not)
    raises NotImplementedError naming it, before any launch: torch's CUDA generator draws no seed for it."""
    import cupy
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_varlen_func
    _, (q, k, v), cu_q, cu_k = _packed("float16")
    args = (cupy.asarray(cu_q), cupy.asarray(cu_k), max(LENS_Q), max(LENS_K))
    with pytest.raises(NotImplementedError, match="dropout_p > 0 in the variable-length"):
        cuflash.attention_varlen(q, k, v, *args, dropout_p=0.1, dropout_seed=1)
    with pytest.raises(NotImplementedError, match="dropout_p > 0 in the variable-length"):
        cuflash.attention_varlen_backward(q, q, k, v, q, cupy.zeros((4, q.shape[0]), cupy.float32), *args,
                                          dropout_p=0.1, dropout_seed=1)
    tq, tk, tv = (torch.as_tensor(x, device="cuda").requires_grad_() for x in (q, k, v))
    tcu_q, tcu_k = torch.from_numpy(cu_q).cuda(), torch.from_numpy(cu_k).cuda()
    rng = torch.cuda.get_rng_state()
    with pytest.raises(NotImplementedError, match="dropout_p > 0 in the variable-length"):
        flash_attn_varlen_func(tq, tk, tv, tcu_q, tcu_k, max(LENS_Q), max(LENS_K), dropout_p=0.1)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
