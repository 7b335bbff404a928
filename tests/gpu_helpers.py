"""Helpers for GPU tests: CuPy inputs built from NumPy data, results back as float64, the float64
references, FlashAttention's error rule and its yardstick (the same math in the input dtype, emulated in
NumPy), output poisoning and the sanitizer runner.

Nothing here imports torch: the kernel tests run with CuPy alone. CuPy and ml_dtypes (NumPy's bfloat16)
are imported when first needed, so that this module also serves the CPU tests of the yardstick.

The yardstick (:func:`naive_same_dtype`, :func:`naive_backward_same_dtype`) is what the GPU tests used to
get from plain torch ops in bf16/fp16 and from torch autograd through them; it reproduces their rounding
points: each matmul accumulates in float32 and rounds its output to the input dtype, each elementwise op
computes in float32 from input-dtype operands and rounds its result, softmax (and its backward) computes in
float32 and rounds once. tests/test_gpu_helpers.py checks it against torch on the CPU.
"""

import numpy as np

from cuflash import reference

def nvrtc_available() -> bool:
    """Whether CuPy's NVRTC can compile here (no GPU needed): the compile and JIT tests skip without it."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return True
    except Exception:  # noqa: BLE001 -- CuPy or NVRTC missing: nothing to compile with
        return False


_SKIP_BF16 = "bfloat16 tests need ml_dtypes (NumPy's bfloat16, which CuPy uses for bf16 arrays): pip install ml_dtypes"


# ---------------------------------------------------------------------------
# dtypes, inputs, results
# ---------------------------------------------------------------------------

def np_dtype(name):
    """NumPy dtype of a GPU dtype name: ``float16`` -> np.float16, ``bfloat16`` -> ml_dtypes.bfloat16 (the
    calling test skips when ml_dtypes is not installed)."""
    name = dtype_name(name)
    if name == "bfloat16":
        import pytest
        return np.dtype(pytest.importorskip("ml_dtypes", reason=_SKIP_BF16).bfloat16)
    return np.dtype(name)


def dtype_name(x) -> str:
    """``float16``/``bfloat16``/... of a dtype name, a dtype, or an array of any library."""
    if isinstance(x, str):
        return x.replace("torch.", "")
    dt = getattr(x, "dtype", x)
    return str(dt).replace("torch.", "")


def host_randn(shape, dtype, rng):
    """Standard normal data drawn in float32 on the host, rounded to ``dtype`` (a NumPy array of it)."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(dtype))


def to_device(x):
    """A host array (float16, ml_dtypes.bfloat16, float32, ...) uploaded as a contiguous CuPy array (bf16
    needs CuPy >= 14: the calling test skips on an older CuPy)."""
    import cupy
    if dtype_name(x) == "bfloat16" and int(cupy.__version__.split(".")[0]) < 14:
        import pytest
        pytest.skip(f"CuPy {cupy.__version__} has no bfloat16 arrays (CuPy >= 14 has, through ml_dtypes)")
    return cupy.asarray(np.ascontiguousarray(x))


def host_inputs(b, sq, sk, hq, hk, d, dtype, seed, transposed=False):
    """q ``(b, sq, hq, d)``, k and v ``(b, sk, hk, d)`` as NumPy arrays of ``dtype``: standard normal values
    from NumPy's generator with ``seed``. ``transposed``: (b, h, s, d) storage viewed as (b, s, h, d)."""
    rng = np.random.default_rng(seed)

    def make(s, h):
        if transposed:
            return host_randn((b, h, s, d), dtype, rng).transpose(0, 2, 1, 3)
        return host_randn((b, s, h, d), dtype, rng)
    return make(sq, hq), make(sk, hk), make(sk, hk)


def inputs(b, sq, sk, hq, hk, d, dtype, seed, transposed=False):
    """:func:`host_inputs` as CuPy arrays; ``transposed`` ones keep their layout on the device (a
    non-contiguous view with a unit last stride)."""
    host = host_inputs(b, sq, sk, hq, hk, d, dtype, seed, transposed)
    if transposed:
        return tuple(to_device(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in host)
    return tuple(to_device(x) for x in host)


def to_torch(x, torch, device="cuda"):
    """A host or CuPy array of float16/bfloat16 values as a torch tensor of that dtype (exact)."""
    h = to_host(x)
    return torch.from_numpy(h.astype(np.float32)).to(device).to(getattr(torch, dtype_name(h)))


def randn_like(x, seed):
    """A CuPy array of x's shape and dtype with standard normal values (rounded to the dtype)."""
    return to_device(host_randn(x.shape, dtype_name(x), np.random.default_rng(seed)))


def scaled(x, factor):
    """``x * factor`` rounded to x's dtype, as a new contiguous CuPy array (computed on the host)."""
    return to_device((to_host(x).astype(np.float32) * np.float32(factor)).astype(np_dtype(dtype_name(x))))


def rand_slopes(shape, seed, scale=0.3):
    """Float32 ALiBi slopes uniform in [0, scale), as a CuPy array."""
    rng = np.random.default_rng(seed)
    return to_device(rng.random(shape, dtype=np.float32) * np.float32(scale))


def to_host(x):
    """Any array (CuPy, NumPy, torch, JAX) as a NumPy array of its own dtype (bf16 as ml_dtypes.bfloat16).
    A CuPy 16-bit array travels as raw 16-bit words (a plain copy, for any strides)."""
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "cupy":
        import cupy
        if x.dtype.itemsize == 2 and x.dtype.kind != "u":
            return cupy.asnumpy(x.view(cupy.uint16)).view(np_dtype(dtype_name(x)))
        return cupy.asnumpy(x)
    if mod == "torch":
        x = x.detach()
        if dtype_name(x) == "bfloat16":
            import torch
            return x.cpu().view(torch.int16).numpy().view(np_dtype("bfloat16"))
        return x.cpu().numpy()
    if mod in ("jax", "jaxlib"):
        return np.asarray(x)
    return np.asarray(x)


def same_bits(a, b):
    """Asserts two arrays (any framework, any device) hold the same shape, dtype and bytes."""
    ha, hb = to_host(a), to_host(b)
    assert ha.shape == hb.shape and ha.dtype == hb.dtype
    assert np.array_equal(ha.view(np.uint8), hb.view(np.uint8))


def to_np64(x):
    """Any array (bf16 included) as a float64 NumPy array."""
    return to_host(x).astype(np.float64)


def raw_words(x):
    """The raw 16-bit words of a 16-bit float CuPy array (for bitwise comparisons, on the device)."""
    import cupy
    return x.view(cupy.uint16)


def synchronize():
    import cupy
    cupy.cuda.Device().synchronize()


# ---------------------------------------------------------------------------
# The yardstick: the same attention math in the input dtype (NumPy emulation)
# ---------------------------------------------------------------------------

def round_to(x, dtype):
    """``x`` rounded (to nearest even) to ``dtype`` and held as float32, as a framework rounds a float32
    intermediate into a bf16/fp16 tensor."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as in torch
        return np.asarray(x, dtype=np.float32).astype(np_dtype(dtype)).astype(np.float32)


def _host32(x):
    return to_host(x).astype(np.float32)


def _naive_forward(q, k, v, dtype, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout=None,
                   attn_mask=None):
    """Forward of the same-dtype naive attention. Inputs are float32 arrays holding input-dtype values;
    returns the output (b, sq, hq, d) and what the backward needs, all float32 holding dtype values.
    ``dropout`` (keep mask (b, hq, sq, sk), p): the probabilities dropped and scaled as torch's dropout does
    (p * mask * 1 / (1 - p), rounded) before P.V. ``attn_mask`` (host, broadcastable to (b, hq, sq, sk)):
    bool hides keys, a float one is added to the scaled scores (rounded), as SDPA's math backend does."""
    r = lambda x: round_to(x, dtype)  # noqa: E731
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qh = np.ascontiguousarray(q.transpose(0, 2, 1, 3))                       # (b, hq, sq, d)
    kh = np.ascontiguousarray(np.repeat(k, g, axis=2).transpose(0, 2, 1, 3))  # (b, hq, sk, d)
    vh = np.ascontiguousarray(np.repeat(v, g, axis=2).transpose(0, 2, 1, 3))
    s = r(qh @ kh.swapaxes(-1, -2))               # einsum: float32 accumulation, output rounded
    s = r(s * np.float32(scale))                  # * scale
    t = None
    if softcap > 0:
        t = r(np.tanh(r(s / np.float32(softcap))))  # tanh(s / softcap)
        s = r(np.float32(softcap) * t)              # softcap * tanh
    if alibi_slopes is not None:
        slopes = np.asarray(to_host(alibi_slopes), dtype=np.float32)
        slopes = np.broadcast_to(slopes, (b, hq)) if slopes.ndim == 1 else slopes
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        dist = r(np.abs(i + sk - sq - j).astype(np.float32))   # |i + off - j| in the dtype
        bias = r(r(slopes)[:, :, None, None] * dist)           # slope (in the dtype) * dist
        s = r(s - bias)
    vis = reference.visible_mask(sq, sk, causal, window_size)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            vis = vis & mask
        else:
            s = r(s + mask.astype(np.float32))
    s = np.where(vis, s, np.float32(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)                       # a row that sees no key: softmax NaN -> nan_to_num -> 0
    e = np.exp(s - np.where(empty, np.float32(0), m))
    l = e.sum(axis=-1, keepdims=True, dtype=np.float32)
    p = r(np.where(empty, np.float32(0), e / np.where(empty, np.float32(1), l)))  # softmax, float32 inside
    pv = p
    if dropout is not None:
        keep, drop_p = dropout
        pv = r(np.where(keep, p * np.float32(1.0 / (1.0 - drop_p)), np.float32(0)))
    out = r(pv @ vh)                              # einsum, output rounded
    return out.transpose(0, 2, 1, 3), (qh, kh, vh, p, t, scale, g)


def naive_same_dtype(q, k, v, *, dtype=None, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None, dropout=None, attn_mask=None):
    """The same attention math in the input dtype with plain ops (matmul, scale, softcap, ALiBi, mask,
    softmax, matmul), each rounded to the dtype: the error yardstick of FlashAttention's rule.

    q, k, v: arrays of any library (their values must be representable in ``dtype``, which defaults to
    q's dtype); ``dropout`` as :func:`_naive_forward` takes it. Returns the float64 output ``(b, sq, hq, d)``."""
    dtype = dtype_name(q) if dtype is None else dtype_name(dtype)
    out, _ = _naive_forward(_host32(q), _host32(k), _host32(v), dtype, causal, softmax_scale, window_size,
                            softcap, alibi_slopes, dropout, attn_mask)
    return out.astype(np.float64)


def naive_backward_same_dtype(dout, q, k, v, *, dtype=None, causal=False, softmax_scale=None,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout=None, attn_mask=None):
    """Gradients of :func:`naive_same_dtype` computed the way autograd through its ops computes them in the
    input dtype: dV = P^T dO, dP = dO V^T (each rounded), dS = P * (dP - rowsum(dP * P)) in float32 rounded
    once (softmax backward), then back through softcap (x softcap, x (1 - tanh^2), / softcap, each rounded)
    and the scale (rounded), dQ = dS K, dK = dS^T Q (rounded), and for GQA the sum over a key/value head's
    query heads in float32, rounded. ``dropout`` (keep mask, p) as :func:`_naive_forward`: dV takes the
    dropped P, and dP goes back through the dropout (x mask x 1 / (1 - p), rounded) before the softmax.
    Returns float64 ``(dq, dk, dv)`` with the shapes of q, k, v."""
    dtype = dtype_name(q) if dtype is None else dtype_name(dtype)
    r = lambda x: round_to(x, dtype)  # noqa: E731
    q32, k32 = _host32(q), _host32(k)
    _, (qh, kh, vh, p, t, scale, g) = _naive_forward(q32, k32, _host32(v), dtype, causal, softmax_scale,
                                                     window_size, softcap, alibi_slopes, attn_mask=attn_mask)
    b, sq, hq, d = q32.shape
    sk, hk = k32.shape[1], k32.shape[2]
    do = np.ascontiguousarray(_host32(dout).transpose(0, 2, 1, 3))   # (b, hq, sq, d)
    pv, keep_scale = p, None
    if dropout is not None:
        keep, drop_p = dropout
        keep_scale = np.where(keep, np.float32(1.0 / (1.0 - drop_p)), np.float32(0))
        pv = r(p * keep_scale)                                        # the dropped P of the forward
    dvh = r(pv.swapaxes(-1, -2) @ do)                                 # (b, hq, sk, d)
    dp = r(do @ vh.swapaxes(-1, -2))                                  # (b, hq, sq, sk)
    if keep_scale is not None:
        dp = r(dp * keep_scale)                                       # back through the dropout
    delta = (dp * p).sum(axis=-1, keepdims=True, dtype=np.float32)
    ds = r(p * (dp - delta))                                          # softmax backward
    del dp
    if t is not None:
        ds = r(ds * np.float32(softcap))                              # through softcap * t
        ds = r(ds * (np.float32(1) - t * t))                          # through tanh
        ds = r(ds / np.float32(softcap))                              # through s / softcap
    ds = r(ds * np.float32(scale))                                    # through * scale
    dq = r(ds @ kh)                                                   # (b, hq, sq, d)
    dkh = r(ds.swapaxes(-1, -2) @ qh)                                 # (b, hq, sk, d)
    # Query heads h = kv * g + i share kv head kv (repeat_interleave): their gradients sum in float32.
    dk = r(dkh.reshape(b, hk, g, sk, d).sum(axis=2, dtype=np.float32))
    dv = r(dvh.reshape(b, hk, g, sk, d).sum(axis=2, dtype=np.float32))
    back = lambda x: x.transpose(0, 2, 1, 3).astype(np.float64)  # noqa: E731
    return back(dq), back(dk), back(dv)


# ---------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------

def flash_rule(ours, ref, base, factor=2.0, atol=1e-5):
    """FlashAttention's acceptance rule: our max error <= factor x the same-dtype naive max error (+atol)."""
    ours_err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    base_err = float(np.max(np.abs(base - ref))) if base.size else 0.0
    assert np.isfinite(ours).all(), "output has NaN/inf (unwritten or broken element)"
    assert ours_err <= factor * base_err + atol, f"max error {ours_err:.3e} > {factor} x naive {base_err:.3e} + {atol}"
    return ours_err, base_err


# ---------------------------------------------------------------------------
# Poisoning
# ---------------------------------------------------------------------------

def poison_cupy_pool(nbytes_list):
    """Fill freed CuPy memory-pool blocks of these sizes with all-ones words (NaN as fp16, bf16 and fp32)
    so that an output element the kernel never writes shows up as NaN instead of a stale plausible value.

    CuPy's pool keeps free blocks per stream, binned by size (rounded up to 512 bytes), and serves an
    allocation from the smallest bin that fits. Releasing the pool's unsplit free blocks first leaves these
    as the ones the next allocations of these sizes on the current stream get."""
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    blocks = [cupy.full(((n + 1) // 2,), 0xFFFF, dtype=cupy.uint16) for n in nbytes_list]
    del blocks


# ---------------------------------------------------------------------------
# Optional libraries, GPU details, sanitizer
# ---------------------------------------------------------------------------

def require_torch_cuda():
    """torch with CUDA, or skip the calling test (the kernel tests themselves need only CuPy)."""
    import pytest
    torch = pytest.importorskip("torch", reason="a PyTorch-specific test (torch streams, CUDA graphs through "
                                                "torch, autograd, torch.compile, training); needs torch")
    if not torch.cuda.is_available():
        pytest.skip("a PyTorch-specific test; this torch has no CUDA")
    return torch


def require_jax_gpu():
    """JAX with a CUDA backend, or skip the calling test."""
    import os

    import pytest
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax", reason="a JAX caller test; needs jax")
    try:
        gpu = any(dev.platform == "gpu" for dev in jax.devices())
    except RuntimeError:
        gpu = False
    if not gpu:
        pytest.skip("a JAX caller test; this jax has no CUDA backend (jax[cuda12] or jax[cuda13])")
    return jax


def run_sanitizer(script_name, tool):
    """Runs tests/<script_name> under compute-sanitizer's `tool`; asserts it finished and found nothing."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not installed")
    script = os.path.join(os.path.dirname(__file__), script_name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([exe, "--tool", tool, "--error-exitcode", "9", sys.executable, script],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "sanitize run done" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in run.stdout + run.stderr or tool == "racecheck"
    assert "RACECHECK SUMMARY: 0 hazards" in run.stdout + run.stderr or tool == "memcheck"


def skip_unless_hopper():
    """Skips the calling test unless the current GPU has compute capability 9.0 (H100/H200)."""
    import cupy
    import pytest
    if int(cupy.cuda.Device().compute_capability) != 90:
        pytest.skip("needs a compute capability 9.0 GPU (H100/H200)")


def loaded_families():
    """Kernel families (fwd_sm90, bwd_sm80, ...) this process has loaded since jit._loaded was cleared."""
    from cuflash import jit
    return {name.split("_bf16")[0].split("_fp16")[0] for (name, *_rest) in jit._loaded}


def kernel_requests(monkeypatch) -> list:
    """The names of the kernel variants jit.get_function is asked for from now on (a list that grows), with
    the plan cache and bound calls cleared so that every call plans (and asks) again."""
    from cuflash import executor, jit, launch_plan
    requested = []
    original = jit.get_function

    def spy(key, *args):
        requested.append(key.name)
        return original(key, *args)
    monkeypatch.setattr(jit, "get_function", spy)
    launch_plan._plans.clear()
    executor.clear()
    return requested


def device_int(key, symbol):
    """Reads an `extern "C" __device__ const int` exported by a kernel variant's module (on device 0's arch)."""
    import cupy
    from cupy.cuda import function

    from cuflash import dispatch, jit
    arch = dispatch.compile_arch(*divmod(int(cupy.cuda.Device().compute_capability), 10))
    mod = function.Module()
    mod.load(jit.cubin_for(key, arch))
    ptr = mod.get_global_var(symbol)
    host = np.zeros(1, np.int32)
    cupy.cuda.runtime.memcpy(host.ctypes.data, getattr(ptr, "ptr", ptr), 4, 2)
    return int(host[0])
