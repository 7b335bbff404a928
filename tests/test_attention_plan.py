"""cuflash.plan (cuflash/attention_plan.py): a planned problem runs exactly like cuflash.attention and
cuflash.attention_backward with the same options, checks each array of a run against the plan (type,
shape, dtype, device) before computing anything, and checks its options at plan time as attention does.
CPU path (NumPy, torch CPU tensors); the GPU cases (bitwise equality, nothing compiled or planned at run
time) are marked gpu.
"""

import numpy as np
import pytest

import cuflash

from gpu_helpers import inputs, randn_like, to_host

OPTIONS = [
    dict(),
    dict(causal=True, return_lse=True),
    dict(window_size=(5, 2), softcap=3.0, softmax_scale=0.3),
    dict(causal=True, alibi_slopes="per-head", return_lse=True),
]


def _arrays(dtype=np.float64, sq=13, sk=21, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, sq, 4, 24)).astype(dtype)
    k, v = (rng.standard_normal((2, sk, 2, 24)).astype(dtype) for _ in range(2))
    return q, k, v


def _resolve(opts):
    opts = dict(opts)
    if opts.get("alibi_slopes") == "per-head":
        opts["alibi_slopes"] = np.linspace(0.1, 0.8, 4, dtype=np.float32)
    return opts


@pytest.mark.parametrize("opts", OPTIONS)
def test_run_equals_attention(opts):
    """run() on new arrays of the planned kind gives attention()'s result with the same options, bit for bit;
    run_backward() gives attention_backward()'s."""
    opts = _resolve(opts)
    p = cuflash.plan(*_arrays(seed=0), **opts)
    q, k, v = _arrays(seed=1)
    got, want = p.run(q, k, v), cuflash.attention(q, k, v, **opts)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(a, b)
    out, lse = cuflash.attention(q, k, v, **{**opts, "return_lse": True})
    dout = np.random.default_rng(2).standard_normal(out.shape)
    bwd_opts = {n: x for n, x in opts.items() if n != "return_lse"}
    for a, b in zip(p.run_backward(dout, q, k, v, out, lse), cuflash.attention_backward(dout, q, k, v, out, lse,
                                                                                         **bwd_opts)):
        np.testing.assert_array_equal(a, b)


def test_plan_reports_what_it_planned():
    p = cuflash.plan(*_arrays(np.float32), causal=True)
    assert p.shapes == ((2, 13, 4, 24), (2, 21, 2, 24))
    assert (p.dtype, p.device, p.framework, p.causal, p.softmax_scale) == ("float32", "cpu", "numpy", True,
                                                                          pytest.approx(24 ** -0.5))
    assert "causal=True" in repr(p)


@pytest.mark.parametrize("bad,arg,exc,match", [
    (lambda q, k, v: (q[:, :5], k, v), "q", ValueError, r"q has shape \(2, 5, 4, 24\); this plan was made for"),
    (lambda q, k, v: (q, k[:, :7], v), "k", ValueError, "k has shape"),
    (lambda q, k, v: (q, k, v.astype(np.float32)), "v", TypeError, "v has dtype float32; this plan was made for float64"),
    (lambda q, k, v: (q.tolist(), k, v), "q", TypeError, "expected an array"),
])
def test_run_rejects_arrays_of_another_kind(bad, arg, exc, match):
    """Each argument is checked against the plan and the error names it."""
    p = cuflash.plan(*_arrays())
    with pytest.raises(exc, match=match):
        p.run(*bad(*_arrays()))


def test_run_rejects_another_framework():
    torch = pytest.importorskip("torch")
    p = cuflash.plan(*_arrays())
    q, k, v = _arrays()
    with pytest.raises(TypeError, match="q is a torch array; this plan was made for numpy arrays"):
        p.run(torch.from_numpy(q), k, v)


def test_run_backward_checks_dout_out_lse():
    q, k, v = _arrays()
    p = cuflash.plan(q, k, v, return_lse=True)
    out, lse = p.run(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        p.run_backward(out[:, :3], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse"):
        p.run_backward(out, q, k, v, out, lse[:, :1])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(window_size=(1,)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
    (dict(backward=None), TypeError, "backward must be a bool"),
    (dict(dropout_p=0.1), NotImplementedError, "dropout"),
])
def test_plan_checks_options_like_attention(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cuflash.plan(*_arrays(), **kwargs)


def test_plan_checks_arrays_like_attention():
    q, k, v = _arrays()
    with pytest.raises(ValueError, match="heads_q"):
        cuflash.plan(q[:, :, :3], k, v)


def test_torch_cpu_run_is_differentiable():
    """On torch tensors that require grad, run() records the autograd graph like attention() does."""
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in _arrays())
    p = cuflash.plan(q, k, v, causal=True)
    p.run(q, k, v).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    cuflash.attention(q, k, v, causal=True).square().sum().backward()
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_run_compiles_and_plans_nothing_and_matches_attention(dtype, causal):
    """On the GPU, plan() compiles and plans the forward and backward for the arrays' layout; run() and
    run_backward() then load no kernel and make no launch plan, and give attention()'s and
    attention_backward()'s bits (deterministic dQ; dK and dV are written once per key block either way)."""
    from cuflash import jit, launch_plan
    q, k, v = inputs(2, 200, 333, 4, 2, 128, dtype, seed=3)
    p = cuflash.plan(q, k, v, causal=causal, return_lse=True, deterministic=True)
    loaded, planned = len(jit._loaded), len(launch_plan._plans)
    q2, k2, v2 = inputs(2, 200, 333, 4, 2, 128, dtype, seed=4)
    out, lse = p.run(q2, k2, v2)
    dout = randn_like(out, 5)
    grads = p.run_backward(dout, q2, k2, v2, out, lse)
    assert (len(jit._loaded), len(launch_plan._plans)) == (loaded, planned)
    out_ref, lse_ref = cuflash.attention(q2, k2, v2, causal=causal, return_lse=True)
    grads_ref = cuflash.attention_backward(dout, q2, k2, v2, out_ref, lse_ref, causal=causal, deterministic=True)
    for a, b in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        ha, hb = to_host(a), to_host(b)
        assert np.array_equal(ha.view(np.uint8), hb.view(np.uint8))


@pytest.mark.gpu
def test_gpu_run_rejects_another_device_or_dtype():
    """A run with arrays of another dtype is refused before launching (naming the argument)."""
    q, k, v = inputs(1, 64, 64, 2, 2, 64, "float16", seed=0)
    p = cuflash.plan(q, k, v)
    qb = inputs(1, 64, 64, 2, 2, 64, "bfloat16", seed=0)[0]
    with pytest.raises(TypeError, match="q has dtype bfloat16; this plan was made for float16"):
        p.run(qb, k, v)
