"""GPU forward kernel vs the float64 reference, with FlashAttention's error rule, over odd shapes,
every masking and score feature, both dtypes, every head-dim class and every array library.

Inputs are CuPy arrays (bf16 through ml_dtypes); the yardstick of the rule (the same math in the input
dtype) is gpu_helpers' NumPy emulation. Only the tests of torch and JAX callers need those libraries."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import (device_int, flash_rule, host_inputs, host_randn, inputs, naive_same_dtype, poison_cupy_pool,
                         rand_slopes, require_jax_gpu, require_torch_cuda, scaled, synchronize, to_device, to_host,
                         to_np64, to_torch)

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="the GPU kernel tests need CuPy (the cuda12 or cuda13 extra)")

_inputs = inputs


def _check(q, k, v, **kw):
    b, sq, hq, d = q.shape
    # Blocks of the output's size: for the output, and for aligned copies of q, k and v (misaligned views).
    poison_cupy_pool([q.nbytes] * 4 + [b * hq * sq * 4])
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kw)
    synchronize()
    assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.id == q.device.id
    assert lse.shape == (b, hq, sq) and lse.dtype == np.float32
    ref_kw = dict(kw)
    if kw.get("alibi_slopes") is not None:
        ref_kw["alibi_slopes"] = to_host(kw["alibi_slopes"])
    ref_out, ref_lse = reference.attention_reference(to_np64(q), to_np64(k), to_np64(v), **ref_kw)
    base = naive_same_dtype(q, k, v, **ref_kw)
    out64 = to_np64(out)
    flash_rule(out64, ref_out, base)
    lse_np = to_host(lse).astype(np.float64)
    empty = np.isinf(ref_lse)
    assert np.array_equal(np.isinf(lse_np), empty), "LSE must be +inf exactly on rows that see no key"
    assert np.all(lse_np[empty] > 0)
    assert np.max(np.abs(lse_np[~empty] - ref_lse[~empty]), initial=0.0) < 2e-3
    assert np.all(out64[np.moveaxis(empty, 1, 2)] == 0), "rows that see no key must be exactly 0"


SEQLENS = [(1, 1), (17, 17), (127, 127), (1000, 1000), (4097, 4097), (1, 4097), (17, 1000), (1000, 17),
           (127, 4097), (4097, 127)]


@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_seqlens_causal(sq, sk, causal, dtype):
    """Every seqlen pair (tails, sq != sk both ways, 1) is exact, causal bottom-right aligned included."""
    q, k, v = _inputs(1, sq, sk, 2, 2, 128, dtype, seed=sq * 7 + sk)
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("d", [8, 32, 40, 64, 72, 96, 128, 136, 160, 192, 224, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_dims(d, dtype):
    """Every head-dim class (native 64/128/192/256 and the zero-padded ones) is exact, batch 3."""
    q, k, v = _inputs(3, 333, 271, 4, 2, d, dtype, seed=d)
    _check(q, k, v, causal=d % 16 == 0)


@pytest.mark.parametrize("window", [(0, 0), (16, 0), (100, 3), (-1, 50), (5, -1), (300, 300)])
@pytest.mark.parametrize("sq,sk", [(257, 257), (129, 700), (700, 129)])
def test_window(window, sq, sk):
    """Sliding windows with FlashAttention-2 semantics, including rows that see no key."""
    q, k, v = _inputs(2, sq, sk, 2, 1, 64, "bfloat16", seed=sum(window) + sq)
    _check(q, k, v, window_size=window)
    _check(q, k, v, window_size=window, causal=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_softcap_alibi(dtype, d):
    """Softcap and ALiBi (both slope shapes), alone and together with causal masking."""
    q, k, v = _inputs(2, 300, 411, 4, 4, d, dtype, seed=d + 1)
    q = scaled(q, 3)  # larger scores so that the cap matters
    slopes_h = rand_slopes((4,), seed=d + 2)
    slopes_bh = rand_slopes((2, 4), seed=d + 3)
    _check(q, k, v, softcap=5.0)
    _check(q, k, v, alibi_slopes=slopes_h)
    _check(q, k, v, alibi_slopes=slopes_bh, causal=True)
    _check(q, k, v, softcap=8.0, alibi_slopes=slopes_bh, window_size=(64, 32))


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 1), (6, 3)])
def test_gqa_mqa(hq, hk):
    """Grouped-query and multi-query attention read the right key/value head."""
    q, k, v = _inputs(2, 200, 333, hq, hk, 128, "float16", seed=hq * 10 + hk)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_transposed_views_and_scale(dtype):
    """(b, h, s, d) storage passed as a transposed view works without a copy, with a custom scale."""
    q, k, v = _inputs(2, 513, 1025, 4, 2, 64, dtype, seed=5, transposed=True)
    assert not q.flags.c_contiguous and q.strides[-1] == q.itemsize
    _check(q, k, v, softmax_scale=0.3)
    _check(q, k, v, causal=True)


def test_misaligned_view_is_copied():
    """A view whose rows are not 16-byte aligned (offset by one element) still gives the exact result."""
    base = to_device(host_randn((1, 100, 2, 72), "float16", np.random.default_rng(0)))
    q = base[..., 1:65]
    assert q.data.ptr % 16 != 0
    _check(q, q, q)


def test_large_batch_heads_grid():
    """Many (batch, head) pairs map onto the 1-D grid correctly (grid index decomposition)."""
    q, k, v = _inputs(64, 65, 65, 16, 16, 64, "bfloat16", seed=3)
    _check(q, k, v, causal=True)


def test_cupy_inputs():
    """CuPy arrays in, CuPy arrays out, on CuPy's current stream (a non-blocking one here)."""
    rng = cp.random.default_rng(1)
    q = rng.standard_normal((2, 300, 4, 64), dtype=cp.float32).astype(cp.float16)
    k = rng.standard_normal((2, 257, 2, 64), dtype=cp.float32).astype(cp.float16)
    v = rng.standard_normal((2, 257, 2, 64), dtype=cp.float32).astype(cp.float16)
    with cp.cuda.Stream(non_blocking=True) as s:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        assert isinstance(out, cp.ndarray) and out.dtype == cp.float16 and isinstance(lse, cp.ndarray)
        s.synchronize()
    ref, _ = reference.attention_reference(q.get(), k.get(), v.get(), causal=True)
    flash_rule(out.get().astype(np.float64), ref, naive_same_dtype(q, k, v, causal=True))


def test_cupy_bfloat16_in_bfloat16_out():
    """A CuPy bf16 (ml_dtypes.bfloat16) call returns a CuPy bf16 array, not raw 16-bit words."""
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, "bfloat16", seed=31)
    out = cuflash.attention(q, k, v)
    assert isinstance(out, cp.ndarray) and out.dtype == q.dtype and str(out.dtype) == "bfloat16"


def test_jax_inputs():
    """JAX arrays (bf16 included) in, JAX arrays out."""
    jax = require_jax_gpu()
    jnp = jax.numpy
    key = jax.random.PRNGKey(0)
    for dtype in (jnp.float16, jnp.bfloat16):
        k1, k2, k3, key = jax.random.split(key, 4)
        q = jax.random.normal(k1, (2, 200, 4, 128), dtype)
        k = jax.random.normal(k2, (2, 300, 4, 128), dtype)
        v = jax.random.normal(k3, (2, 300, 4, 128), dtype)
        out = cuflash.attention(q, k, v, causal=True)
        assert isinstance(out, jax.Array) and out.dtype == dtype and out.shape == q.shape
        f64 = lambda x: np.asarray(x.astype(jnp.float32)).astype(np.float64)  # noqa: E731
        ref, _ = reference.attention_reference(f64(q), f64(k), f64(v), causal=True)
        name = "bfloat16" if dtype == jnp.bfloat16 else "float16"
        flash_rule(f64(out), ref, naive_same_dtype(f64(q), f64(k), f64(v), dtype=name, causal=True))


def _torch_inputs(torch, *args, **kwargs):
    """The data of _inputs as torch CUDA tensors."""
    return tuple(to_torch(x, torch) for x in host_inputs(*args, **kwargs))


def test_torch_side_stream_with_pending_work():
    """The kernel runs on torch's current stream: it sees inputs written by still-pending work there."""
    torch = require_torch_cuda()
    q, k, v = _torch_inputs(torch, 1, 1000, 1000, 4, 4, 64, "float16", seed=9)
    s = torch.cuda.Stream()
    qs = torch.full_like(q, float("nan"))
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of pending work ahead of the copy
        qs.copy_(q)
        out = cuflash.attention(qs, k, v)
    s.synchronize()
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.is_cuda
    ref, _ = reference.attention_reference(to_np64(q), to_np64(k), to_np64(v))
    flash_rule(to_np64(out), ref, naive_same_dtype(q, k, v))


def test_cuda_graph_capture():
    """A torch call captured in a CUDA graph after warm-up replays correctly on new inputs."""
    torch = require_torch_cuda()
    q, k, v = _torch_inputs(torch, 2, 500, 700, 4, 2, 128, "bfloat16", seed=11)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuflash.attention(q, k, v, causal=True)  # warm-up: compile and load outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuflash.attention(q, k, v, causal=True)
    q2, k2, v2 = _torch_inputs(torch, 2, 500, 700, 4, 2, 128, "bfloat16", seed=12)
    q.copy_(q2); k.copy_(k2); v.copy_(v2)  # noqa: E702
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = reference.attention_reference(to_np64(q2), to_np64(k2), to_np64(v2), causal=True)
    flash_rule(to_np64(out), ref, naive_same_dtype(q2, k2, v2, causal=True))


def test_empty_query_blocks_and_poisoned_lse():
    """Whole query blocks that see no key (causal with sq >> sk) give exact zeros and LSE +inf."""
    q, k, v = _inputs(2, 1000, 50, 2, 2, 64, "float16", seed=13)
    _check(q, k, v, causal=True)


def test_params_layout_and_smem_formulas_match_kernels():
    """The host's parameter block has the size of the kernels' AttentionParams, and the host's shared
    memory formulas equal the sizes the kernels export (the sm80 forward, paged or not, and the backward)."""
    from cuflash import dispatch, params_layout
    fwd = dispatch.all_forward_keys()[0]
    assert device_int(fwd, "cf_params_bytes") == params_layout.STRUCT.size
    for paged in (False, True):
        key = dispatch.forward_key("bfloat16", 128, is_local=False, softcap=False, alibi=False, varlen=True,
                                   split_kv=True, paged=paged)
        assert device_int(key, "cf_fwd_sm80_smem_bytes") == dispatch.forward_smem_bytes(key)
    for key in dispatch.all_backward_keys():
        if key.family == "bwd_sm80" and key.head_dim in (64, 256):
            assert device_int(key, "cf_bwd_smem_bytes") == dispatch.backward_smem_bytes(key)
        if key.family == "bwd_dq_sm80" and key.head_dim in (64, 256):
            assert device_int(key, "cf_bwd_dq_smem_bytes") == dispatch.dq_smem_bytes(key)
