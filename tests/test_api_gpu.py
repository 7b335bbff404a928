"""The public API on the GPU where users go beyond the plain case: CuPy bfloat16 in and out, arrays on a GPU
other than the current one, head dims that are not multiples of 8, views the kernels cannot read in place,
empty inputs, and scores so large that a fused exponent offset loses every digit.

Each test compares with an exact expectation: bitwise equality with a call the kernels run unchanged
(padded, contiguous, on device 0), or the float64 reference under FlashAttention's error rule. CuPy only;
the torch and JAX cases skip themselves without their library.
"""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import (flash_rule, host_randn, inputs, naive_backward_same_dtype, naive_same_dtype, np_dtype,
                         rand_slopes, randn_like, require_torch_cuda, same_bits, to_device, to_host, to_np64)

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16"]


def _in_fresh_thread(fn):
    """fn() on a new thread, which has made no CUDA call and so has no current CUDA context (as torch's
    autograd engine thread when cuflash's backward is the first node it runs); returns (whether the thread
    had a context when it started, fn's result)."""
    import threading

    from cuflash import arrays
    box = {}

    def run():
        box["had_context"] = arrays._context_is_current()
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["had_context"], box["result"]


@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_calls_from_a_thread_without_a_cuda_context(fw):
    """Forward and backward from a thread with no current CUDA context (CUDA_ERROR_INVALID_CONTEXT from the
    launch before arrays.device_scope bound one) equal the same calls on this thread, bit for bit."""
    import cupy
    q, k, v = inputs(2, 200, 200, 4, 2, 64, "bfloat16", seed=8)
    dout = randn_like(q, 9)
    if fw == "torch":
        torch = require_torch_cuda()
        q, k, v, dout = (torch.from_dlpack(x) for x in (q, k, v, dout))

    def both():
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        return (out, lse, *cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True))
    want = both()
    had_context, got = _in_fresh_thread(both)
    cupy.cuda.runtime.deviceSynchronize()
    assert not had_context, "the new thread already had a CUDA context: this test no longer tests anything"
    for a, b in zip(got, want):
        same_bits(a, b)

# --- item 1: CuPy bfloat16 ---------------------------------------------------------------------------------

def test_cupy_bfloat16_comes_back_as_bfloat16():
    """bf16 CuPy inputs give bf16 CuPy outputs (ml_dtypes.bfloat16), forward and backward, with values
    within FlashAttention's rule of the float64 reference (not raw uint16 words)."""
    import cupy
    q, k, v = inputs(1, 64, 64, 2, 2, 64, "bfloat16", seed=1)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == np_dtype("bfloat16") and lse.dtype == np.float32
    flash_rule(to_np64(out), reference.attention_reference(*(to_np64(x) for x in (q, k, v)))[0],
               naive_same_dtype(q, k, v))
    grads = cuflash.attention_backward(randn_like(out, 2), q, k, v, out, lse)
    assert all(isinstance(g, cupy.ndarray) and g.dtype == np_dtype("bfloat16") for g in grads)


def test_cupy_bfloat16_bitwise_equals_torch_call():
    """The same bf16 inputs through CuPy and through torch give bitwise identical outputs and gradients."""
    torch = require_torch_cuda()
    import cupy
    t = [torch.randn(1, 64, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    c = [cupy.from_dlpack(x) for x in t]
    out_t, lse_t = cuflash.attention(*t[:3], return_lse=True)
    out_c, lse_c = cuflash.attention(*c[:3], return_lse=True)
    torch.cuda.synchronize()
    same_bits(out_c, out_t)
    same_bits(lse_c, lse_t)
    grads_t = cuflash.attention_backward(t[3], *t[:3], out_t, lse_t)
    grads_c = cuflash.attention_backward(c[3], *c[:3], out_c, lse_c)
    for gc, gt in zip(grads_c, grads_t):
        same_bits(gc, gt)


# --- item 2: arrays on another GPU -------------------------------------------------------------------------
# Each two-GPU scenario runs in a fresh interpreter (tests/multi_gpu_checks.py): JAX and torch keep
# per-thread device state of their own, which must not leak into the other tests of this process (a later
# CUDA-graph capture on device 0 failed after all three ran in one process).

@pytest.mark.parametrize("check", ["cupy_arrays_on_second_gpu", "torch_autograd_on_second_gpu",
                                   "jax_arrays_on_second_gpu"])
def test_arrays_on_second_gpu(check):
    """With device 0 current, arrays on device 1 (CuPy forward and backward, torch autograd, JAX) give results
    on device 1, bitwise equal to the same call on device 0, and leave device 0 current."""
    import os
    import subprocess
    import sys
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(here), here,
                                                                      os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, os.path.join(here, "multi_gpu_checks.py"), check], capture_output=True,
                         text=True, env=env, timeout=600)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


# --- item 7: any head dim ------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 7, 59, 111, 250, 255])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims_off_multiples_of_8(d, dtype):
    """Head dims 1..256 that are not multiples of 8: forward and backward within FlashAttention's rule of the
    float64 reference, and bitwise equal to the call on inputs zero-padded by hand (what the kernels see)."""
    q, k, v = inputs(2, 70, 90, 4, 2, d, dtype, seed=d)
    dout = randn_like(q, 5)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape
    ref_out, _ = reference.attention_reference(*(to_np64(x) for x in (q, k, v)), causal=True)
    flash_rule(to_np64(out), ref_out, naive_same_dtype(q, k, v, causal=True))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    ref_grads = reference.attention_backward_reference(*(to_np64(x) for x in (dout, q, k, v)), causal=True)
    naive_grads = naive_backward_same_dtype(dout, q, k, v, causal=True)
    for g, r, n in zip(grads, ref_grads, naive_grads):
        assert g.shape == r.shape
        flash_rule(to_np64(g), r, n, factor=3.0)

    width = -(-d // 8) * 8
    pad = lambda x: to_device(np.pad(to_host(x), ((0, 0),) * 3 + ((0, width - d),)))  # noqa: E731
    out_p, lse_p = cuflash.attention(pad(q), pad(k), pad(v), causal=True, softmax_scale=d ** -0.5, return_lse=True)
    same_bits(out, to_host(out_p)[..., :d])
    same_bits(lse, lse_p)


# --- item 9: views the kernels cannot read in place ----------------------------------------------------------

def test_non_unit_last_stride_and_misaligned_views():
    """Inputs with a non-unit last stride, rows off 16-byte boundaries and strided ALiBi slopes are copied
    once and give bitwise the result of the contiguous call (forward and backward); lse views too."""
    import cupy
    q, k, v = inputs(2, 64, 80, 4, 4, 64, "float16", seed=7)
    dout = randn_like(q, 8)
    slopes_wide = cupy.asarray(np.linspace(0.1, 0.8, 8, dtype=np.float32))
    slopes = cupy.ascontiguousarray(slopes_wide[::2])
    out, lse = cuflash.attention(q, k, v, alibi_slopes=slopes, return_lse=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, alibi_slopes=slopes)

    def every_other(x):  # same values, last stride 2
        wide = cupy.zeros(x.shape[:3] + (2 * x.shape[3],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]

    def shifted(x):  # same values, rows start 2 bytes past a 16-byte boundary
        flat = cupy.zeros(x.size + 1, x.dtype)
        y = flat[1:].reshape(x.shape)
        y[...] = x
        return y

    for view in (every_other, shifted):
        args = [view(x) for x in (q, k, v)]
        out2, lse2 = cuflash.attention(*args, alibi_slopes=slopes_wide[::2], return_lse=True)
        same_bits(out2, out)
        same_bits(lse2, lse)
        lse_strided = cupy.zeros(lse.shape + (2,), np.float32)
        lse_strided[..., 0] = lse
        grads2 = cuflash.attention_backward(view(dout), *args, view(out), lse_strided[..., 0],
                                            alibi_slopes=slopes_wide[::2])
        for a, b in zip(grads2, grads):
            same_bits(a, b)


# --- item 8: empty inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,sq,sk", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (0, 0, 0)])
def test_empty_inputs(b, sq, sk):
    """batch 0 / seqlen_q 0 / seqlen_k 0: outputs of the right shapes; seqlen_k 0 gives zeros and LSE +inf
    (over poisoned memory), and every gradient is 0."""
    import cupy
    from gpu_helpers import poison_cupy_pool
    q, k, v = inputs(b, sq, sk, 4, 2, 64, "bfloat16", seed=9)
    poison_cupy_pool([q.nbytes, b * 4 * sq * 4])
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, 4, sq)
    assert np.all(to_np64(out) == 0) and np.all(cupy.asnumpy(lse) == np.inf)
    grads = cuflash.attention_backward(randn_like(q, 1), q, k, v, out, lse, causal=True)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and np.all(to_np64(g) == 0)


# --- item 5: large scores -------------------------------------------------------------------------------------

FAMILIES = ["default", "sm80"]


def _family(monkeypatch, family):
    if family == "sm80":
        monkeypatch.setenv("CUFLASH_FWD_KERNEL", "sm80")
        monkeypatch.setenv("CUFLASH_BWD_KERNEL", "sm80")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_huge_score(family, monkeypatch):
    """q = k = v = 133120 (bf16), one key: out 133120 and LSE 8 * 133120**2 = 1.4177e11, not NaN; the
    backward's P is exactly 1, so dV = dO exactly and dQ, dK are finite."""
    _family(monkeypatch, family)
    x = to_device(np.full((1, 1, 1, 64), 133120.0, np.float32).astype(np_dtype("bfloat16")))
    out, lse = cuflash.attention(x, x, x, return_lse=True)
    assert np.all(to_np64(out) == 133120.0)
    assert float(lse[0, 0, 0]) == pytest.approx(8 * 133120.0 ** 2, rel=1e-6)
    dout = randn_like(x, 3)
    dq, dk, dv = cuflash.attention_backward(dout, x, x, x, out, lse)
    same_bits(dv, dout)
    assert np.isfinite(to_np64(dq)).all() and np.isfinite(to_np64(dk)).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
def test_constant_huge_inputs(family, causal, monkeypatch):
    """A (2, 129, 2, 64) constant input of 133120: every output equals the constant (all scores tie), the
    LSE is the score plus ln(visible keys) to float32 precision, nothing NaN."""
    import cupy
    _family(monkeypatch, family)
    x = to_device(np.full((2, 129, 2, 64), 133120.0, np.float32).astype(np_dtype("bfloat16")))
    out, lse = cuflash.attention(x, x, x, causal=causal, return_lse=True)
    assert np.all(to_np64(out) == 133120.0)
    visible = np.arange(1, 130) if causal else np.full(129, 129)
    expected = 8 * 133120.0 ** 2 + np.log(visible)
    np.testing.assert_allclose(cupy.asnumpy(lse), np.broadcast_to(expected, (2, 2, 129)), rtol=2 ** -23)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
def test_scores_past_fp16_range(family, causal, monkeypatch):
    """fp16 inputs scaled by 40 (raw q.k products past fp16's range, scores in the thousands): forward and
    backward within FlashAttention's rule of the float64 reference."""
    _family(monkeypatch, family)
    rng = np.random.default_rng(11)
    q, k, v = (to_device((host_randn(s, "float16", rng).astype(np.float32) * 40).astype(np.float16))
               for s in ((2, 150, 4, 64), (2, 170, 2, 64), (2, 170, 2, 64)))
    dout = randn_like(q, 12)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, _ = reference.attention_reference(*(to_np64(x) for x in (q, k, v)), causal=causal)
    flash_rule(to_np64(out), ref_out, naive_same_dtype(q, k, v, causal=causal))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    ref_grads = reference.attention_backward_reference(*(to_np64(x) for x in (dout, q, k, v)), causal=causal)
    for g, r, n in zip(grads, ref_grads, naive_backward_same_dtype(dout, q, k, v, causal=causal)):
        flash_rule(to_np64(g), r, n, factor=3.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["causal", "deterministic", "alibi"])
def test_backward_large_lse_rows_beside_ordinary_rows(family, variant, monkeypatch):
    """The backward picks P's exponent form per query tile or CTA from the LSE (bwd_common.cuh): rows whose
    |LSE| passes kFastLseLimit (here ~1e3-1e4, queries scaled by 40) share tiles, CTAs and a GQA group with
    ordinary rows, and tiles without any come between them. Every gradient stays within FlashAttention's rule
    of the float64 reference, the ordinary rows' dQ included."""
    _family(monkeypatch, family)
    rng = np.random.default_rng(17)
    q = host_randn((2, 333, 4, 64), "float16", rng).astype(np.float32)
    q[0, 7] *= 40.0          # head-wide query rows: large LSE in tile 0 of every head of batch 0
    q[1, 200:203, 1] *= 40.0  # three rows of one head, in a middle tile of batch 1
    q, k, v = (to_device(x.astype(np.float16)) for x in
               (q, host_randn((2, 301, 2, 64), "float16", rng) * np.float16(3), host_randn((2, 301, 2, 64), "float16", rng)))
    dout = randn_like(q, 18)
    kw = dict(causal=variant == "causal")
    if variant == "alibi":
        kw["alibi_slopes"] = rand_slopes((2, 4), 19)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kw)
    lse_host = to_host(lse)
    assert np.abs(lse_host[np.isfinite(lse_host)]).max() > 256.0  # rows past the fast form's limit ...
    ordinary = lse_host[1, 0][np.isfinite(lse_host[1, 0])]      # ... and a head without any (causal: some
    assert np.abs(ordinary).max() < 256.0                        # rows see no key, LSE +inf)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=variant == "deterministic", **kw)
    host = [to_np64(x) for x in (dout, q, k, v)]
    ref_kw = dict(kw, alibi_slopes=to_np64(kw["alibi_slopes"])) if "alibi_slopes" in kw else kw
    ref_grads = reference.attention_backward_reference(*host, **ref_kw)
    naive = naive_backward_same_dtype(dout, q, k, v, **kw)
    for g, r, n in zip(grads, ref_grads, naive):
        flash_rule(to_np64(g), r, n, factor=3.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_rows_beside_ordinary_rows(family, monkeypatch):
    """A warp whose rows switch to the exact offset partway (one huge query row among ordinary ones, keys
    whose huge scores come late) stays within the rule for every row, including the ordinary ones."""
    _family(monkeypatch, family)
    rng = np.random.default_rng(13)
    q = host_randn((1, 64, 2, 64), "bfloat16", rng).astype(np.float32)
    k = host_randn((1, 300, 2, 64), "bfloat16", rng).astype(np.float32)
    v = host_randn((1, 300, 2, 64), "bfloat16", rng)
    q[0, 5] *= 10000.0
    k[0, 250:] *= 10000.0   # the scores of query 5 reach ~1e8 (past the fast offset's 2^24) in the last key tiles
    bf = np_dtype("bfloat16")
    q, k, v = (to_device(x.astype(bf)) for x in (q, k, v))
    out = to_np64(cuflash.attention(q, k, v))
    ref_out, _ = reference.attention_reference(*(to_np64(x) for x in (q, k, v)))
    naive = naive_same_dtype(q, k, v)
    ordinary = np.arange(64) != 5
    flash_rule(out[:, ordinary], ref_out[:, ordinary], naive[:, ordinary])
    flash_rule(out[:, 5], ref_out[:, 5], naive[:, 5])


# --- variable-length attention: argument checks on GPU arrays (the kernels: test_varlen_gpu.py) ---------------

def test_varlen_cu_seqlens_dtype_checked_before_launch():
    """cu_seqlens of the wrong integer type get a TypeError naming the argument before any launch."""
    import cupy
    q = to_device(host_randn((10, 2, 64), "float16", np.random.default_rng(0)))
    cu = cupy.asarray(np.array([0, 4, 10], np.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        cuflash.attention_varlen(q, q, q, cu.astype(cupy.int64), cu, 6, 6)


def test_dropout_on_gpu_arrays_needs_a_seed():
    """GPU arrays with dropout_p > 0 need dropout_seed, forward and backward (TypeError before any launch);
    with one both run (test_dropout_gpu.py checks their values); dropout_p = 0 needs none."""
    q, k, v = inputs(1, 64, 64, 2, 2, 64, "float16", seed=0)
    out, lse = cuflash.attention(q, k, v, return_lse=True, dropout_p=0.0)
    with pytest.raises(TypeError, match="needs dropout_seed"):
        cuflash.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="needs dropout_seed"):
        cuflash.attention_backward(out, q, k, v, out, lse, dropout_p=0.1)
    out, lse = cuflash.attention(q, k, v, dropout_p=0.1, dropout_seed=5, return_lse=True)
    grads = cuflash.attention_backward(out, q, k, v, out, lse, dropout_p=0.1, dropout_seed=5)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_attn_mask_that_does_not_broadcast_raises_before_launching():
    """A GPU mask of the wrong shape is a ValueError naming attn_mask (tests/test_attn_mask_gpu.py runs the
    masks that fit)."""
    import cupy
    q, k, v = inputs(1, 64, 64, 2, 2, 64, "float16", seed=0)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        cuflash.attention(q, k, v, attn_mask=cupy.ones((64, 65), bool))


def test_sdpa_stand_in_on_cuda_equals_cuflash():
    """cuflash.torch.scaled_dot_product_attention on CUDA tensors (no mask) runs the kernels on SDPA's layout
    in place and gives cuflash.attention's bits on the transposed views, causal included."""
    torch = require_torch_cuda()
    import cuflash.torch as ct
    q, k, v = (torch.randn(2, 8, 300, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    for causal in (False, True):
        got = ct.scaled_dot_product_attention(q, k, v, is_causal=causal)
        want = cuflash.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal).transpose(1, 2)
        torch.cuda.synchronize()
        assert torch.equal(got, want)


def test_block_mask_with_blocks_the_tiles_do_not_divide_raises_before_launching():
    """A block mask of 32 x 32 blocks on GPU arrays: NotImplementedError naming block_size (the kernels' tiles
    nest in 128-blocks; tests/test_block_mask_gpu.py runs those), before any kernel."""
    q, k, v = inputs(1, 64, 64, 2, 2, 64, "float16", seed=0)
    with pytest.raises(NotImplementedError, match="block_size|block_mask on GPU arrays runs on the Hopper"):
        cuflash.attention(q, k, v, block_mask=cuflash.BlockMask.from_dense(np.ones((64, 64), bool), 32))
