"""GPU backward kernels vs float64 gradients, with FlashAttention's rule for gradients: our max error
<= 3x the error of the same math in the input dtype (what autograd through plain ops computes in that
dtype, emulated in NumPy by gpu_helpers.naive_backward_same_dtype), plus an absolute term of
1e-4 x max|reference| for the fp32 accumulation order of dQ (atomics) and the 16-bit rounding of dS as an
MMA operand, both of which FlashAttention-2 shares, plus 1e-5 x max|dout|: D = rowsum(dO * O) uses the
stored 16-bit O, so a gradient that is exactly 0 in float64 (one visible key) keeps a rounding residue.
Also determinism, CuPy and JAX callers, and (with torch) torch.compile, CUDA graphs and a short training
run against SDPA. Inputs are CuPy arrays; only the torch and JAX tests need those libraries."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import (host_inputs, inputs, naive_backward_same_dtype, poison_cupy_pool, rand_slopes, randn_like,
                         raw_words, require_jax_gpu, require_torch_cuda, scaled, synchronize, to_host, to_np64,
                         to_torch)

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="the GPU kernel tests need CuPy (the cuda12 or cuda13 extra)")

_inputs = inputs


def _grad_rule(ours, ref, base, name, dout_max):
    assert np.isfinite(ours).all(), f"{name} has NaN/inf"
    err = float(np.max(np.abs(ours - ref)))
    base_err = float(np.max(np.abs(base - ref)))
    bound = 3 * base_err + 1e-4 * float(np.max(np.abs(ref))) + 1e-5 * dout_max
    assert err <= bound, f"{name}: max error {err:.3e} > 3 x naive {base_err:.3e} + abs term"


def _check_grads(grads, dout, q, k, v, **kw):
    """dq, dk, dv (any array type) against the float64 gradients under the rule of this module."""
    ref_kw = dict(kw)
    if kw.get("alibi_slopes") is not None:
        ref_kw["alibi_slopes"] = to_host(kw["alibi_slopes"])
    do64 = to_np64(dout)
    refs = reference.attention_backward_reference(do64, to_np64(q), to_np64(k), to_np64(v), **ref_kw)
    base = naive_backward_same_dtype(dout, q, k, v, **ref_kw)
    for name, ours, ref, b in zip(("dq", "dk", "dv"), grads, refs, base):
        _grad_rule(to_np64(ours), ref, b, name, float(np.abs(do64).max()))


def _check(q, k, v, deterministic=False, **kw):
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kw)
    dout = randn_like(out, seed=[*q.shape, *k.shape, 17])
    poison_cupy_pool([q.nbytes, k.nbytes, v.nbytes])
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **kw)
    synchronize()
    assert all(isinstance(g, cp.ndarray) for g in (dq, dk, dv))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == q.dtype and dk.dtype == q.dtype and dv.dtype == q.dtype
    _check_grads((dq, dk, dv), dout, q, k, v, **kw)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (127, 127), (1000, 1000), (1, 1000), (17, 1000), (1000, 17),
                                   (127, 4097), (4097, 127)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_seqlens_causal(sq, sk, causal, dtype):
    """Gradients are exact over tails, seqlen 1, sq != sk both ways, causal bottom-right aligned."""
    q, k, v = _inputs(1, sq, sk, 2, 2, 128, dtype, seed=sq + 3 * sk)
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("d", [8, 40, 64, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_dims(d, dtype):
    """Every head-dim class, batch 3."""
    q, k, v = _inputs(3, 211, 333, 2, 1, d, dtype, seed=d)
    _check(q, k, v, causal=d % 16 == 0)


@pytest.mark.parametrize("window", [(0, 0), (32, 0), (50, 7), (-1, 40)])
def test_window(window):
    """Sliding windows, including rows that see no key (their dq rows are zero)."""
    q, k, v = _inputs(2, 300, 200, 4, 2, 64, "bfloat16", seed=sum(window))
    _check(q, k, v, window_size=window)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_softcap_alibi(d):
    """Softcap (through the tanh derivative) and ALiBi, with causal and a window."""
    q, k, v = _inputs(2, 257, 300, 4, 4, d, "float16", seed=d)
    q = scaled(q, 2)
    slopes = rand_slopes((2, 4), seed=d + 1)
    _check(q, k, v, softcap=6.0)
    _check(q, k, v, alibi_slopes=slopes[0], causal=True)
    _check(q, k, v, softcap=4.0, alibi_slopes=slopes, window_size=(40, 20))


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 1)])
def test_gqa_mqa(hq, hk):
    """dk/dv of a shared key/value head sum over its query heads."""
    q, k, v = _inputs(2, 190, 230, hq, hk, 128, "bfloat16", seed=hq + hk)
    _check(q, k, v, causal=True)


def test_transposed_views_and_deterministic():
    """Transposed (b, h, s, d) views, and the deterministic dQ path, are exact."""
    q, k, v = _inputs(2, 333, 444, 4, 2, 64, "float16", seed=4, transposed=True)
    assert not q.flags.c_contiguous
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=True, deterministic=True)
    _check(q, k, v, deterministic=True, softcap=3.0)


def test_deterministic_is_bitwise_reproducible():
    """deterministic=True gives bitwise-identical dq, dk, dv over 50 repeats."""
    q, k, v = _inputs(2, 1000, 1000, 4, 2, 128, "bfloat16", seed=21)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = randn_like(out, seed=22)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for _ in range(50):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert a.dtype == b.dtype and bool(cp.array_equal(raw_words(a), raw_words(b)))


def test_autograd_torch_compile_fullgraph():
    """cuflash.torch.attention inside torch.compile(fullgraph=True) gives the eager gradients."""
    torch = require_torch_cuda()
    import cuflash.torch as ct
    q, k, v = (to_torch(x, torch).requires_grad_(True)
               for x in host_inputs(2, 256, 256, 4, 4, 64, "bfloat16", seed=2))
    f = lambda q, k, v: (ct.attention(q, k, v, causal=True).float() ** 2).sum()  # noqa: E731
    cf = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(cf(q, k, v), (q, k, v))
    ge = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(gc, ge):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_cuda_graph_forward_backward():
    """Forward + backward captured in one CUDA graph replays correctly on new inputs."""
    torch = require_torch_cuda()
    import cuflash.torch as ct
    q, k, v = (to_torch(x, torch).requires_grad_(True)
               for x in host_inputs(2, 300, 300, 4, 2, 128, "bfloat16", seed=3))
    dout = to_torch(host_inputs(2, 300, 300, 4, 4, 128, "bfloat16", seed=5)[0], torch)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ct.attention(q, k, v, causal=True).backward(dout)
            q.grad = k.grad = v.grad = None
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ct.attention(q, k, v, causal=True)
        out.backward(dout)
    q2, k2, v2 = (to_torch(x, torch) for x in host_inputs(2, 300, 300, 4, 2, 128, "bfloat16", seed=4))
    with torch.no_grad():
        q.copy_(q2); k.copy_(k2); v.copy_(v2)  # noqa: E702
    graph.replay()
    torch.cuda.synchronize()
    _check_grads((q.grad, k.grad, v.grad), dout, q2, k2, v2, causal=True)


def test_cupy_backward():
    """attention_backward on CuPy arrays (made by CuPy's own generator) returns CuPy gradients equal to the
    reference."""
    rng = cp.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 150, 2, 64), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape, dtype=cp.float32).astype(cp.float16)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert all(isinstance(g, cp.ndarray) for g in grads)
    _check_grads(grads, dout, q, k, v)


def test_jax_backward():
    """attention_backward on JAX bf16 arrays returns JAX gradients close to the reference."""
    jax = require_jax_gpu()
    jnp = jax.numpy
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v, dout = (jax.random.normal(kk, (1, 130, 2, 64), jnp.bfloat16) for kk in ks)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert all(isinstance(g, jax.Array) and g.dtype == jnp.bfloat16 for g in grads)
    _check_grads(grads, dout, q, k, v, causal=True)


def test_training_matches_sdpa():
    """A small transformer block trained 100 steps in bf16 with cuflash and with SDPA from the same seed
    ends with losses within 2% of each other at every 10th step (bf16 training noise is ~0.5%)."""
    torch = require_torch_cuda()
    import torch.nn as nn
    import torch.nn.functional as F
    import cuflash.torch as ct

    class Block(nn.Module):
        def __init__(self, use_cuflash, dim=256, heads=4):
            super().__init__()
            self.use_cuflash, self.heads = use_cuflash, heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.head = nn.Linear(dim, 64)

        def forward(self, x):
            b, s, d = x.shape
            qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads)
            if self.use_cuflash:
                a = ct.flash_attn_qkvpacked_func(qkv, causal=True)
            else:
                q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
            x = x + self.proj(a.reshape(b, s, d))
            return self.head(x + self.mlp(self.norm2(x)))

    losses = {}
    for use in (True, False):
        torch.manual_seed(0)
        model = Block(use).cuda().to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator(device="cuda").manual_seed(1)
        curve = []
        for step in range(100):
            x = torch.randn(4, 257, 256, device="cuda", dtype=torch.bfloat16, generator=g)
            target = torch.randint(0, 64, (4, 257), device="cuda", generator=g)
            loss = F.cross_entropy(model(x).float().view(-1, 64), target.view(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[use] = np.array(curve)
    a, b = losses[True], losses[False]
    assert a[-1] < a[0], "training with cuflash must reduce the loss"
    assert np.all(np.abs(a[::10] - b[::10]) <= 0.02 * np.abs(b[::10])), f"{a[::10]} vs {b[::10]}"
