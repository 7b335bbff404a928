"""The PyTorch adapter on the CPU (CI): autograd through the custom op, torch.compile fullgraph, opcheck,
and FlashAttention-2's function names, argument order and return values."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="tests of the PyTorch adapter (cuflash.torch); need torch")

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from cuflash import reference  # noqa: E402


def _qkv(b=2, sq=9, sk=13, hq=4, hk=2, d=16, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, h: torch.randn(b, s, h, d, dtype=dtype, generator=g).requires_grad_(grad)
    return mk(sq, hq), mk(sk, hk), mk(sk, hk)


def test_attention_on_grad_tensors_is_differentiable():
    """cuflash.attention on tensors that require grad returns a tensor connected to autograd whose
    gradients equal the float64 reference gradients."""
    q, k, v = _qkv()
    out = cuflash.attention(q, k, v, causal=True, softcap=2.0)
    assert out.grad_fn is not None
    dout = torch.randn_like(out)
    out.backward(dout)
    refs = reference.attention_backward_reference(dout.numpy(), q.detach().numpy(), k.detach().numpy(),
                                                  v.detach().numpy(), causal=True, softcap=2.0)
    for t, r in zip((q, k, v), refs):
        np.testing.assert_allclose(t.grad.numpy(), r, atol=1e-12)


def test_gradcheck_with_every_feature():
    """torch.autograd.gradcheck (finite differences, float64) passes with window, softcap, ALiBi and GQA."""
    q, k, v = _qkv(sq=5, sk=7, hq=4, hk=2, d=8)
    slopes = torch.rand(4, dtype=torch.float32)
    f = lambda q, k, v: ct.attention(q, k, v, window_size=(3, 1), softcap=1.5, alibi_slopes=slopes)
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_forward_and_backward_ops():
    """torch.library.opcheck validates the fake implementations and registrations of both ops."""
    q, k, v = (t.detach().float() for t in _qkv())
    for p, state in ((0.0, None), (0.2, [7, 3]), (0.2, [-5, 0])):  # a negative int64 seed is 2**64 - 5
        state = None if state is None else torch.tensor(state, dtype=torch.int64)
        args = (None, True, 0.25, -1, -1, 0.0, False, p, state, None)
        torch.library.opcheck(torch.ops.cuflash.fwd.default, (q, k, v) + args)
        out, lse = torch.ops.cuflash.fwd(q, k, v, *args)
        torch.library.opcheck(torch.ops.cuflash.bwd.default, (torch.randn_like(out), q, k, v, out, lse) + args)


def _assert_compiled_matches_eager(compiled, f, q, k, v):
    """The compiled loss and its gradients equal eager's."""
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert torch.allclose(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b)


def test_torch_compile_fullgraph():
    """A function using the op compiles with fullgraph=True (no graph break) and matches eager, grads too."""
    q, k, v = _qkv(dtype=torch.float32)
    f = lambda q, k, v: (ct.attention(q, k, v, causal=True) ** 2).sum()
    _assert_compiled_matches_eager(torch.compile(f, fullgraph=True, backend="aot_eager"), f, q, k, v)


def test_torch_compile_fullgraph_with_dropout():
    """Dropout with the seed drawn from torch's generator compiles with fullgraph=True (the draw is a tensor
    op in the graph, not an int read at trace time), and after the same torch.manual_seed the compiled
    function gives eager's output and gradients: it draws the same seed."""
    q, k, v = _qkv(dtype=torch.float32)
    f = lambda q, k, v: (ct.flash_attn_func(q, k, v, dropout_p=0.3, causal=True) ** 2).sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    torch.manual_seed(3)
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(4)  # another seed, another mask
    assert not torch.equal(compiled(q, k, v), loss_c)


def test_dropout_seed_drawn_on_the_cpu_under_a_default_device():
    """With torch.set_default_device set (to the meta device here, as a stand-in for "cuda"), the dropout
    state is still drawn and read on the CPU: same output as without it after the same manual_seed."""
    q, k, v = (t.detach().float() for t in _qkv())
    torch.manual_seed(2)
    want = ct.flash_attn_func(q, k, v, dropout_p=0.4)
    torch.set_default_device("meta")
    try:
        torch.manual_seed(2)
        got = ct.flash_attn_func(q, k, v, dropout_p=0.4)
    finally:
        torch.set_default_device(None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_state_is_checked():
    """The ops' dropout_state must be an int64 tensor of (seed, offset): anything else is a TypeError naming
    it, before any work. A tensor dropout_seed of cuflash.torch.attention is held to cuflash.attention's rules
    for (seed, offset) arrays (a dtype is a TypeError, a shape a ValueError) and takes no dropout_offset."""
    q, k, v = (t.detach().float() for t in _qkv())
    for bad in (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2, 3]), torch.tensor(1)):
        with pytest.raises(TypeError, match="dropout_state must be an int64 tensor"):
            torch.ops.cuflash.fwd(q, k, v, None, False, 0.25, -1, -1, 0.0, False, 0.2, bad, None)
        with pytest.raises(TypeError if bad.dtype != torch.int64 else ValueError, match="dropout_seed as a tensor"):
            ct.attention(q, k, v, dropout_p=0.2, dropout_seed=bad)
    with pytest.raises(ValueError, match="dropout_offset must be 0"):
        ct.attention(q, k, v, dropout_p=0.2, dropout_seed=torch.tensor([1, 2]), dropout_offset=3)


def test_s_dmask_under_torch_compile():
    """flash_attn_func(return_attn_probs=True) with dropout compiles (S_dmask, NumPy on the host, is a graph
    break) and gives eager's S_dmask for the same seed."""
    q, k, v = (t.detach().float() for t in _qkv())
    f = torch.compile(lambda q, k, v: ct.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True),
                      backend="aot_eager")
    torch.manual_seed(4)
    out, _, s_dmask = f(q, k, v)
    torch.manual_seed(4)
    want_out, _, want = ct.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
    torch.testing.assert_close(s_dmask, want, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out)


def test_dropout_tensor_seed_equals_the_int_seed():
    """A (seed, offset) tensor as dropout_seed draws what the ints do (CPU path: read on the host), with bits
    above 2**63 as int64's negative values; the functional API takes a NumPy (seed, offset) array the same way."""
    import cuflash
    q, k, v = (t.detach().float() for t in _qkv())
    seed, offset = (1 << 63) + 99, 5
    want = ct.attention(q, k, v, dropout_p=0.3, dropout_seed=seed, dropout_offset=offset)
    state = torch.tensor([seed - (1 << 64), offset], dtype=torch.int64)
    torch.testing.assert_close(ct.attention(q, k, v, dropout_p=0.3, dropout_seed=state), want, rtol=0, atol=0)
    as_numpy = ct.attention(q, k, v, dropout_p=0.3, dropout_seed=np.array([seed, offset], np.uint64))
    torch.testing.assert_close(as_numpy, want, rtol=0, atol=0)
    qn, kn, vn = (x.numpy() for x in (q, k, v))
    got = cuflash.attention(qn, kn, vn, dropout_p=0.3, dropout_seed=np.array([seed, offset], np.uint64))
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_torch_compile_new_seqlens_do_not_recompile(how):
    """Under torch.compile with dynamic sequence lengths (dynamic=True, or mark_dynamic on the seqlen
    dimension) five seqlens, forward and backward, compile one graph: the op's fake implementation keeps
    symbolic sizes symbolic. Every result equals eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v):
        return (ct.flash_attn_func(q, k, v, causal=True) ** 2).sum()

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True if how == "dynamic=True" else None)
    first = None
    for seqlen in (33, 64, 100, 129, 200):
        q, k, v = _qkv(b=2, sq=seqlen, sk=seqlen + 3, hq=4, hk=2, d=16, dtype=torch.float32, seed=seqlen)
        if how == "mark_dynamic":
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 1)
        _assert_compiled_matches_eager(compiled, f, q, k, v)
        # The first call's count: one graph, or two backend calls when dynamo restarts its one analysis to
        # specialize float arguments (dynamic=True traces Python floats as symbols at first).
        first = counter.frame_count if first is None else first
    assert first <= 2 and counter.frame_count == first, f"{counter.frame_count - first} recompiles for 4 new seqlens"


def test_flash_attn_func_signature_and_returns():
    """flash_attn_func keeps FlashAttention-2's positional order, defaults and (out, lse, S) return tuple."""
    import inspect
    params = list(inspect.signature(ct.flash_attn_func).parameters)
    assert params == ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                      "alibi_slopes", "deterministic", "return_attn_probs"]
    q, k, v = _qkv(grad=False)
    out = ct.flash_attn_func(q, k, v, 0.0, None, True)
    out2, lse, s = ct.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out, out2) and lse.shape == (2, 4, 9) and s is None


def test_packed_variants_match_unpacked():
    """qkvpacked and kvpacked read the packed tensors in place and give the unpacked result."""
    q, k, v = _qkv(sq=11, sk=11, hq=2, hk=2, grad=False)
    ref = ct.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(ct.flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), causal=True), ref)
    assert torch.equal(ct.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), causal=True), ref)
    with pytest.raises(ValueError, match="qkv must have shape"):
        ct.flash_attn_qkvpacked_func(q)


def test_dropout_on_cpu_tensors():
    """flash_attn_func with dropout_p > 0 on CPU tensors: the seed comes from torch's default generator
    (torch.manual_seed reproduces output and gradients), and output and gradients equal the float64
    reference with the mask cuflash.dropout_mask gives for that seed (drawn the same way here)."""
    q, k, v = _qkv()
    dout = torch.randn(q.shape, dtype=q.dtype)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        out = ct.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        runs.append((out.detach(), *grads))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(11)
    seed = int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64))
    arrays = [x.detach().double().numpy() for x in (q, k, v)]
    kw = dict(causal=True, dropout_p=0.3, dropout_seed=seed)
    ref_out, _ = reference.attention_reference(*arrays, **kw)
    ref_grads = reference.attention_backward_reference(dout.double().numpy(), *arrays, **kw)
    for got, want in zip(runs[0], (ref_out, *ref_grads)):
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=1e-5)



def test_bad_input_through_adapter():
    """Bad input through the adapter raises the core's named errors."""
    q, k, v = _qkv(grad=False)
    with pytest.raises(ValueError, match="head_dim"):
        ct.flash_attn_func(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="k has dtype"):
        ct.flash_attn_func(q, k.float(), v)


# --- flash_attn_varlen_func (CPU tensors) ----------------------------------------------------------------------

def _packed(lens_q, lens_k, hq=4, hk=2, d=8, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda t, h: torch.randn(t, h, d, dtype=torch.float64, generator=g).requires_grad_(grad)
    cu = lambda lens: torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    return mk(sum(lens_q), hq), mk(sum(lens_k), hk), mk(sum(lens_k), hk), cu(lens_q), cu(lens_k)


def test_flash_attn_varlen_func_signature_and_returns():
    """FlashAttention-2's positional order and defaults; (out, lse (heads, total_q), None) returns."""
    import inspect
    params = list(inspect.signature(ct.flash_attn_varlen_func).parameters)
    assert params == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                      "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                      "return_attn_probs", "block_table"]
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 6], grad=False)
    out, lse, s = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, 8) and s is None


def test_flash_attn_varlen_gradcheck():
    """torch.autograd.gradcheck through the varlen op (float64, causal, window, ALiBi per sequence, GQA,
    a zero-length sequence)."""
    q, k, v, cu_q, cu_k = _packed([3, 0, 4], [5, 2, 4])
    slopes = torch.rand(3, 4, dtype=torch.float32)
    f = lambda q, k, v: ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True, window_size=(3, 0),
                                                  alibi_slopes=slopes)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_varlen_ops(dropout_p):
    q, k, v, cu_q, cu_k = (x.detach() if x.dtype != torch.int32 else x for x in _packed([3, 5], [4, 6]))
    args = (cu_q, cu_k, 5, 6, None, None, None, True, 0.3, -1, -1, 0.0)
    state = torch.tensor([11, 2], dtype=torch.int64) if dropout_p else None
    torch.library.opcheck(torch.ops.cuflash.varlen_fwd.default, (q, k, v, *args, dropout_p, state))
    out, lse = torch.ops.cuflash.varlen_fwd(q, k, v, *args, dropout_p, state)
    torch.library.opcheck(torch.ops.cuflash.varlen_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *args,
                                                                 True, dropout_p, state))


def test_flash_attn_varlen_func_dropout_on_cpu_tensors():
    """dropout_p > 0 on CPU tensors: the seed comes from torch's default generator (torch.manual_seed repeats
    the output and gradients bit for bit, another seed gives another mask), the gradients pass gradcheck with
    the mask held fixed, and cuflash.attention_varlen with an int seed equals the functional call with it."""
    q, k, v, cu_q, cu_k = _packed([3, 0, 4], [5, 2, 4])

    def run(seed):
        torch.manual_seed(seed)
        out = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, dropout_p=0.4, causal=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out.detach(), grads

    (o1, g1), (o2, g2), (o3, _) = run(0), run(0), run(1)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2)) and not torch.equal(o1, o3)
    f = lambda q, k, v: cuflash.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, dropout_p=0.4,  # noqa: E731
                                                 dropout_seed=7, dropout_offset=3)
    assert torch.autograd.gradcheck(f, (q, k, v))
    plain = [x.detach().numpy() for x in (q, k, v)]
    want = cuflash.attention_varlen(*plain, cu_q.numpy(), cu_k.numpy(), 4, 5, causal=True, dropout_p=0.4,
                                    dropout_seed=7, dropout_offset=3)
    np.testing.assert_array_equal(f(q, k, v).detach().numpy(), want)


def test_varlen_packed_functions_read_in_place_and_differentiate():
    """flash_attn_varlen_qkvpacked_func and flash_attn_varlen_kvpacked_func (FlashAttention-2's signatures)
    give the unpacked function's output and gradients, deterministic mode included."""
    import inspect
    assert list(inspect.signature(ct.flash_attn_varlen_qkvpacked_func).parameters)[:3] == ["qkv", "cu_seqlens",
                                                                                           "max_seqlen"]
    assert list(inspect.signature(ct.flash_attn_varlen_kvpacked_func).parameters)[:6] == [
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    q, k, v, cu, _ = _packed([3, 5], [3, 5], hq=2, hk=2, grad=False)
    ref = ct.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    qkv = torch.stack([q, k, v], dim=1).requires_grad_()
    out = ct.flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True, deterministic=True)
    assert torch.equal(out, ref)
    out.sum().backward()
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    ct.flash_attn_varlen_func(q2, k2, v2, cu, cu, 5, 5, causal=True).sum().backward()
    assert torch.equal(qkv.grad, torch.stack([q2.grad, k2.grad, v2.grad], dim=1))
    kv = torch.stack([k, v], dim=1)
    assert torch.equal(ct.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 5, 5, causal=True), ref)
    with pytest.raises(ValueError, match="qkv must have shape"):
        ct.flash_attn_varlen_qkvpacked_func(q, cu, 5)
    with pytest.raises(ValueError, match="kv must have shape"):
        ct.flash_attn_varlen_kvpacked_func(q, k, cu, cu, 5, 5)


def test_flash_attn_varlen_compiles_once_for_new_total_lengths():
    """torch.compile(fullgraph=True) with the total token count marked dynamic: three different packings,
    forward and backward, one compile (the fake implementation keeps the sizes symbolic)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu_q, cu_k):
        return (ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 64, causal=True) ** 2).sum()

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    first = None
    for lens in ([5, 9], [17, 3, 30], [64, 1, 2, 7]):
        q, k, v, cu_q, cu_k = _packed(lens, lens, seed=len(lens))
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(cu_q, 0)
        torch._dynamo.mark_dynamic(cu_k, 0)
        loss = compiled(q, k, v, cu_q, cu_k)
        grads = torch.autograd.grad(loss, (q, k, v))
        ref = f(q, k, v, cu_q, cu_k)
        assert torch.allclose(loss, ref)
        for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v))):
            assert torch.allclose(a, b)
        first = counter.frame_count if first is None else first
    assert counter.frame_count == first, f"{counter.frame_count - first} recompiles for new packings"


# --- flash_attn_with_kvcache (CPU tensors) ---------------------------------------------------------------------

def test_flash_attn_with_kvcache_signature_op_and_compile():
    """FlashAttention-2's signature; the op declares the caches mutated (opcheck) and a compiled decode step
    (fullgraph) writes the new key/value into the cache like eager, twice in a row."""
    import inspect
    assert list(inspect.signature(ct.flash_attn_with_kvcache).parameters) == [
        "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
        "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
        "alibi_slopes", "num_splits", "return_softmax_lse"]
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(2, 16, 2, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g)
    q, k, v = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 2, 8, generator=g), torch.randn(2, 1, 2, 8, generator=g)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.cuflash.kvcache_fwd.default,
                          (q, kc.clone(), vc.clone(), k, v, None, None, lens, 0, None, None, None, 0.3, True, -1, -1,
                           0.0, True, None, 0))

    def step(q, kc, vc, k, v, lens):
        return ct.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc_e, vc_e, kc_c, vc_c = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    for i in range(2):
        out_e = step(q, kc_e, vc_e, k, v, lens + i)
        out_c = compiled(q, kc_c, vc_c, k, v, lens + i)
        assert torch.allclose(out_c, out_e)
    assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e)
    assert torch.equal(kc_e[0, 3], k[0, 0]) and torch.equal(kc_e[1, 10], k[1, 0])


SDPA_CASES = {
    "plain": (9, 9, 4, 4, {}),
    "causal L == S": (9, 9, 4, 4, dict(is_causal=True)),
    "causal L > S (top-left)": (20, 13, 4, 4, dict(is_causal=True)),
    "causal L < S (top-left)": (9, 13, 4, 4, dict(is_causal=True)),
    "bool mask (L, S)": (9, 13, 4, 4, dict(attn_mask="bool")),
    "float mask (B, 1, L, S)": (9, 13, 4, 4, dict(attn_mask="float")),
    "GQA, scale": (9, 13, 4, 2, dict(enable_gqa=True, scale=0.3)),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_stand_in_equals_torch_sdpa(name):
    """cuflash.torch.scaled_dot_product_attention gives torch SDPA's output and gradients (float64 CPU
    tensors, SDPA's (batch, heads, seqlen, head_dim) layout), including SDPA's top-left causal alignment."""
    import torch.nn.functional as F
    sq, sk, hq, hk, kw = SDPA_CASES[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, sq, 16, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, hk, sk, 16, dtype=torch.float64, generator=g) for _ in range(2))
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(sq, sk, generator=g) > 0.3
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(2, 1, sq, sk, dtype=torch.float64, generator=g)
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ct.scaled_dot_product_attention(*ours, **kw)
    ref = F.scaled_dot_product_attention(*theirs, **kw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, ours, dout), torch.autograd.grad(ref, theirs, dout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(attn_mask="bool"), dict(is_causal=True)])
def test_sdpa_stand_in_compiles_fullgraph(kw):
    """The SDPA stand-in with a boolean mask, and with SDPA's top-left causal mask at L < S (which becomes a
    mask), compiles with fullgraph=True and gives eager's loss and gradients."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 13, 16, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(9, 13, generator=g) > 0.3

    def f(q, k, v):
        return ct.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, loss = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss_c, (q, k, v)), torch.autograd.grad(loss, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_numpy_mask_and_slopes_with_tensors_under_autograd():
    """cuflash.attention takes a NumPy attn_mask / alibi_slopes beside CPU tensors, also when autograd is on
    (the adapter turns them into tensors sharing their memory), and the gradients are the reference's."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    mask = np.tril(np.ones((5, 5), bool))
    slopes = np.array([0.3, 0.7], np.float32)
    out = cuflash.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qn, kn, vn = (x.detach().numpy() for x in (q, k, v))
    refs = reference.attention_backward_reference(dout.numpy(), qn, kn, vn, attn_mask=mask, alibi_slopes=slopes)
    for a, r in zip(grads, refs):
        np.testing.assert_allclose(a.numpy(), r, atol=1e-10)
    out = ct.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    assert out.shape == (1, 2, 5, 8)


def test_mask_that_requires_grad_is_refused():
    """A mask that requires grad (a learned bias) raises NotImplementedError instead of silently getting no
    gradient, through cuflash.attention even when q, k and v need none."""
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    bias = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask requires grad"):
        cuflash.attention(x, x, x, attn_mask=bias)
    with torch.no_grad():
        cuflash.attention(x, x, x, attn_mask=bias)


def test_block_mask_with_bad_arguments_names_them():
    """With a block_mask, the adapter's own checks (before folding the masks) name q, attn_mask."""
    bm = cuflash.BlockMask.from_dense(np.ones((8, 8), bool), block_size=4)
    t = torch.randn(4, 8, 2, 4)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        ct.attention(t, t, t, attn_mask=torch.ones(3, 8), block_mask=bm)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        ct.attention(t, t, t, attn_mask=torch.ones(8, 8, dtype=torch.int32), block_mask=bm)
    with pytest.raises(TypeError, match="attn_mask must be a tensor"):
        ct.attention(t, t, t, attn_mask=[[1.0]])
    with pytest.raises(ValueError, match="must be 4-D"):
        ct.attention(t[0], t[0], t[0], block_mask=bm)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch 2.11's assume_constant_result takes Python constants only (H200 run, 2026-12-02)")
def test_block_mask_compiles_fullgraph():
    """cuflash.torch.attention with a cuflash.BlockMask compiles with fullgraph=True (its dense mask is a
    constant of the graph) and gives eager's loss and gradients."""
    m = np.random.default_rng(0).random((9, 13)) < 0.6
    bm = cuflash.BlockMask.from_dense(m, block_size=(2, 3))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 13, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        return ct.attention(q, k, v, block_mask=bm).square().sum()

    loss_c, loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss_c, (q, k, v)), torch.autograd.grad(loss, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_sdpa_stand_in_3d_and_errors():
    import torch.nn.functional as F
    q, k, v = (torch.randn(2, 7, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ct.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        ct.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool), is_causal=True)
    q4, k4 = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        ct.scaled_dot_product_attention(q4, k4, k4)
    with pytest.raises(ValueError, match="4-D"):
        ct.scaled_dot_product_attention(q4[0, 0], k4[0, 0], k4[0, 0])


def test_return_attn_probs_gives_s_dmask_with_dropout():
    """With dropout, return_attn_probs=True returns FlashAttention-2's S_dmask: the probabilities with the
    dropped entries negated, whose sign pattern is cuflash.dropout_mask for the seed drawn from torch's
    generator, and whose magnitudes times the kept mask / (1 - p), times V, give the output."""
    q, k, v = _qkv(grad=False)
    torch.manual_seed(5)
    out, lse, s_dmask = ct.flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    torch.manual_seed(5)
    seed = int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64))
    keep = cuflash.dropout_mask(2, 4, 9, 13, dropout_p=0.25, dropout_seed=seed)
    nonzero = s_dmask != 0
    np.testing.assert_array_equal((s_dmask > 0).numpy(), keep & nonzero.numpy())
    p_kept = torch.where(s_dmask > 0, s_dmask, torch.zeros_like(s_dmask)) / 0.75
    ref = torch.einsum("bhqk,bkhd->bqhd", p_kept, v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, ref)
    assert ct.flash_attn_func(q, k, v, return_attn_probs=True)[2] is None


def test_compile_fullgraph_with_one_tensor_passed_twice():
    """Self-attention passes one tensor twice (cu_seqlens as both boundaries in the qkv-packed varlen call,
    ``k is v``): torch.compile(fullgraph=True) traces it (dynamo rejects an autograd.Function applied to a
    duplicate tensor, so the adapter passes a view for the repeat) and the gradients equal eager's, the
    repeated tensor's being the sum over both uses."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    qkv = torch.randn(7, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    packed = lambda qkv, cu: ct.flash_attn_varlen_qkvpacked_func(qkv, cu, 4, causal=True)  # noqa: E731
    got = torch.compile(packed, backend="aot_eager", fullgraph=True)(qkv, cu)
    want = packed(qkv, cu)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), qkv)[0], torch.autograd.grad(want.sum(), qkv)[0])
    q, k = (torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dense = lambda q, k: ct.flash_attn_func(q, k, k, causal=True)  # noqa: E731
    got = torch.compile(dense, backend="aot_eager", fullgraph=True)(q, k)
    gk = torch.autograd.grad(got.sum(), k)[0]
    v = k.detach().clone().requires_grad_()
    out = ct.flash_attn_func(q, k, v, causal=True)
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    torch.testing.assert_close(gk, dk + dv)


def test_attention_varlen_on_tensors_that_require_grad_is_differentiable():
    """cuflash.attention_varlen (the array function) on torch tensors that require grad returns a
    differentiable output, as cuflash.attention does, with attention_varlen_backward's gradients."""
    q, k, v, cu_q, cu_k = _packed([3, 0, 5], [4, 2, 5])
    out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    assert out.requires_grad and out.grad_fn is not None
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, lse = cuflash.attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 5, 5, causal=True,
                                      return_lse=True)
    want = cuflash.attention_varlen_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k,
                                             5, 5, causal=True)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_window_size_that_is_not_a_pair_raises_type_error():
    q, k, v, cu_q, cu_k = _packed([3], [3], grad=False)
    with pytest.raises(TypeError, match="window_size"):
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3, window_size=None)
    with pytest.raises(TypeError, match="window_size"):
        ct.flash_attn_func(q[None], k[None], v[None], window_size=5)


def _small_qkv(grad, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 4, 2, 8, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kw,exc", [(dict(causal=1), TypeError), (dict(causal=torch.tensor(True)), TypeError),
                                    (dict(softmax_scale=True), TypeError), (dict(softcap=True), TypeError),
                                    (dict(deterministic="yes"), TypeError), (dict(dropout_p=True), TypeError),
                                    (dict(window_size=(-1.0, -1.0)), TypeError)])
def test_options_are_checked_alike_with_and_without_grad(grad, kw, exc):
    """A new user's findings: with requires_grad the autograd path called the implementation, which rejected
    what the op schema converted without grad (causal=1, a 0-d tensor), a bad `deterministic` surfaced only in
    backward, and (-1.0, -1.0) passed as the default window. Both paths now check as cuflash.attention does,
    before anything runs."""
    q, k, v = _small_qkv(grad)
    with pytest.raises(exc):
        ct.flash_attn_func(q, k, v, **kw)


def test_float64_lse_under_torch_compile_and_opcheck():
    """The forward op's fake gave a float32 LSE for float64 inputs (the real op returns float64): opcheck's
    fake-tensor test failed and inductor computed with the wrong dtype (2e12 against 27.9 in eager)."""
    q, k, v = _small_qkv(False, torch.float64)
    args = (q, k, v, None, True, 0.25, -1, -1, 0.0, False, 0.0, None, None)
    torch.library.opcheck(torch.ops.cuflash.fwd.default, args)

    def f(q, k, v):
        return (ct.attention(q, k, v, return_lse=True)[1] * 2).sum()
    from torch._inductor import config as inductor_config
    with inductor_config.patch(fx_graph_cache=False):  # a graph cached before a fake changed would be stale
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_double_backward_raises():
    """A second-order gradient through the attention raises instead of silently dropping the term (the
    backward is not differentiable): create_graph=True raises whether the loss's gradient at the output
    depends on it ((out ** 2).sum()) or not (out.sum(), where once_differentiable alone returned gradients
    without a graph and a gradient penalty built on them contributed nothing); first-order gradients, and
    those of a graph that merely has grad mode on around the forward, are unaffected."""
    q, k, v = _small_qkv(True)
    for loss in (lambda o: (o ** 2).sum(), lambda o: o.sum()):
        with pytest.raises(RuntimeError, match="second-order"):
            torch.autograd.grad(loss(ct.flash_attn_func(q, k, v)), q, create_graph=True)
    g, = torch.autograd.grad(ct.flash_attn_func(q, k, v).sum(), q)
    assert g.grad_fn is None and torch.isfinite(g).all()


def test_tensor_subclasses_are_torch_tensors():
    class MyTensor(torch.Tensor):
        pass
    q, k, v = (x.detach().as_subclass(MyTensor) for x in _small_qkv(False))
    want = ct.flash_attn_func(*(x.as_subclass(torch.Tensor) for x in (q, k, v)))
    torch.testing.assert_close(ct.flash_attn_func(q, k, v).as_subclass(torch.Tensor), want)


def test_kvcache_append_is_seen_by_autograd_and_options_are_checked():
    """flash_attn_with_kvcache writes the caches in place: autograd refuses a backward that saved them
    before (as for kc[:, 0] = x), instead of silently using the new values; cache_seqlens=True, a lone
    rotary_sin and a non-bool rotary_interleaved are errors; a NumPy integer cache_seqlens works."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 2, 8, generator=g)
    kc, vc = (torch.randn(2, 6, 1, 8, generator=g) for _ in range(2))
    kn, vn = (torch.randn(2, 1, 1, 8, generator=g) for _ in range(2))
    w = torch.ones(1, requires_grad=True)
    y = (kc * w).sum()
    ct.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()
    with pytest.raises(TypeError, match="cache_seqlens"):
        ct.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=True)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin"):
        cuflash.attention_with_kvcache(q.numpy(), kc.numpy(), vc.numpy(), cache_seqlens=2,
                                       rotary_sin=np.zeros((8, 2), np.float32))
    with pytest.raises(TypeError, match="rotary_interleaved"):
        cuflash.attention_with_kvcache(q.numpy(), kc.numpy(), vc.numpy(), cache_seqlens=2, rotary_interleaved="no")
    with pytest.raises(TypeError, match="num_splits"):
        cuflash.attention_with_kvcache(q.numpy(), kc.numpy(), vc.numpy(), cache_seqlens=2, num_splits=1.5)
    out = ct.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.int64(2))
    torch.testing.assert_close(out, ct.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=2))


def test_numpy_seed_array_is_copied_for_the_backward():
    """A NumPy (seed, offset) array advanced by the caller between the forward and the backward (as one steps an
    offset) does not change the mask the backward replays: the adapter holds its own copy (autograd cannot see
    writes to NumPy memory)."""
    q, k, v, cu_q, cu_k = _packed([3, 4], [5, 4])
    state = np.array([1234, 0], np.uint64)
    out = ct.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, dropout_p=0.5, dropout_seed=state)
    state[1] += 1
    got = torch.autograd.grad(out.sum(), (q, k, v))
    again = ct.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, dropout_p=0.5, dropout_seed=np.array([1234, 0], np.uint64))
    want = torch.autograd.grad(again.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    qd, kd, vd = (torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    state = np.array([99, 5], np.int64)
    out = ct.attention(qd, kd, vd, dropout_p=0.5, dropout_seed=state)
    state[0] += 1
    got = torch.autograd.grad(out.sum(), (qd, kd, vd))
    again = ct.attention(qd, kd, vd, dropout_p=0.5, dropout_seed=np.array([99, 5], np.int64))
    assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(again.sum(), (qd, kd, vd))))
