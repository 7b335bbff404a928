"""Public API on the CPU: argument validation (each bad input raises a clear error naming the argument,
before any kernel could launch), defaults, and the NumPy path's results and types."""

import numpy as np
import pytest

import cuflash
from cuflash import reference


def _qkv(b=2, sq=17, sk=23, hq=4, hk=2, d=64, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, sq, hq, d)).astype(dtype), rng.standard_normal((b, sk, hk, d)).astype(dtype),
            rng.standard_normal((b, sk, hk, d)).astype(dtype))


q0, k0, v0 = _qkv()

BAD = [
    # (description, call kwargs override, exception type, text the message must contain)
    ("q not an array", dict(q=[[1.0]]), TypeError, "expected an array"),
    ("k of another framework", dict(k=object()), TypeError, "expected an array"),
    ("q 3-D", dict(q=q0[0]), ValueError, "q must be 4-D"),
    ("k 5-D", dict(k=k0[None]), ValueError, "k must be 4-D"),
    ("v 3-D", dict(v=v0[0]), ValueError, "v must be 4-D"),
    ("int dtype", dict(q=q0.astype(np.int32)), TypeError, "q has dtype int32"),
    ("complex dtype", dict(q=q0.astype(np.complex64)), TypeError, "q has dtype complex64"),
    ("k dtype differs", dict(k=k0.astype(np.float64)), TypeError, "k has dtype float64"),
    ("v dtype differs", dict(v=v0.astype(np.float16)), TypeError, "v has dtype float16"),
    ("batch mismatch", dict(k=k0[:1], v=v0[:1]), ValueError, "batch"),
    ("k/v shape mismatch", dict(v=v0[:, :5]), ValueError, "v must have the shape of k"),
    ("head_dim mismatch", dict(k=k0[..., :32], v=v0[..., :32]), ValueError, "head_dim"),
    ("head_dim 0", dict(q=q0[..., :0], k=k0[..., :0], v=v0[..., :0]), ValueError, "head_dim must be in [1, 256]"),
    ("head_dim > 256", dict(q=np.zeros((1, 2, 1, 264), np.float32), k=np.zeros((1, 2, 1, 264), np.float32),
                            v=np.zeros((1, 2, 1, 264), np.float32)), ValueError, "[1, 256]"),
    ("heads not divisible", dict(q=_qkv(hq=3, hk=2)[0]), ValueError, "heads_q (3) must be a multiple of heads_k (2)"),
    ("heads_k zero", dict(k=k0[:, :, :0], v=v0[:, :, :0]), ValueError, "heads_k must be >= 1"),
    ("causal not bool", dict(causal=1), TypeError, "causal must be a bool"),
    ("return_lse not bool", dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    ("scale string", dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a real number"),
    ("scale negative", dict(softmax_scale=-0.1), ValueError, "softmax_scale must be > 0"),
    ("scale nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
    ("window not a pair", dict(window_size=(3,)), ValueError, "window_size must be a pair"),
    ("window below -1", dict(window_size=(-2, 0)), ValueError, "window_size left must be >= -1"),
    ("window float", dict(window_size=(1.5, 0)), TypeError, "window_size left must be an int"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    ("softcap inf", dict(softcap=float("inf")), ValueError, "softcap must be finite"),
    ("alibi wrong shape", dict(alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes must have shape"),
    ("alibi wrong dtype", dict(alibi_slopes=np.ones(4, np.float64)), TypeError, "alibi_slopes must be float32"),
    ("alibi not an array", dict(alibi_slopes=[0.1] * 4), TypeError, "expected an array"),
    ("dropout not a number", dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    ("dropout negative", dict(dropout_p=-0.1), ValueError, "dropout_p must be >= 0"),
    ("dropout one", dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    ("dropout without seed", dict(dropout_p=0.1), TypeError, "dropout_p=0.1 needs dropout_seed"),
    ("dropout seed float", dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
    ("dropout seed negative", dict(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed must be in [0, 2**64)"),
    ("dropout offset too big", dict(dropout_p=0.1, dropout_seed=1, dropout_offset=1 << 64), ValueError,
     "dropout_offset must be in"),
]


@pytest.mark.parametrize("desc,override,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_named_error(desc, override, exc, text, monkeypatch):
    """Each malformed argument raises TypeError/ValueError naming it, and no compute path is reached."""
    called = []
    monkeypatch.setattr(reference, "attention_numpy", lambda *a, **k: called.append(1))
    args = dict(q=q0, k=k0, v=v0)
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc) as info:
        cuflash.attention(q, k, v, **args)
    assert text in str(info.value)
    assert not called


def test_cpu_path_matches_reference_and_types():
    """NumPy inputs run the tiled CPU path: same dtype out, float32 LSE, values equal to the reference."""
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        q, k, v = _qkv(dtype=dtype, seed=1)
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        ref, ref_lse = reference.attention_reference(q, k, v, causal=True)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, 4, 17)
        np.testing.assert_allclose(out, ref, atol=tol, rtol=0)
        np.testing.assert_allclose(lse, ref_lse, atol=tol * 10, rtol=0)


def test_default_scale_is_inverse_sqrt_head_dim():
    """softmax_scale=None equals head_dim ** -0.5 exactly."""
    assert np.array_equal(cuflash.attention(q0, k0, v0), cuflash.attention(q0, k0, v0, softmax_scale=64 ** -0.5))


def test_import_pulls_no_framework():
    """`import cuflash` imports neither torch nor jax (checked in a fresh interpreter)."""
    import subprocess
    import sys
    code = "import sys, cuflash; print('torch' in sys.modules, 'jax' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_torch_cpu_tensors_use_cpu_path():
    """PyTorch CPU tensors run the CPU path and come back as tensors."""
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in _qkv(seed=2))
    out = cuflash.attention(q, k, v, window_size=(4, 4))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref, _ = reference.attention_reference(q.numpy(), k.numpy(), v.numpy(), window_size=(4, 4))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("entry", ["attention", "attention_backward", "torch.attention", "flash_attn_func",
                                   "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"])
def test_every_entry_point_takes_dropout_p(entry):
    """Every dense entry point takes ``dropout_p``: 0.0 gives the result without dropout, p > 0 applies
    the mask on the CPU path (differs from p = 0, reproducible with the same seed)."""
    q, k, v = _qkv(b=1, sq=5, sk=5, hq=2, hk=2, d=8)
    if entry.startswith(("torch", "flash")):
        torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")
        import cuflash.torch as ct
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
        fn = {"torch.attention": lambda p: ct.attention(q, k, v, dropout_p=p),
              "flash_attn_func": lambda p: ct.flash_attn_func(q, k, v, dropout_p=p),
              "flash_attn_qkvpacked_func": lambda p: ct.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), p),
              "flash_attn_kvpacked_func": lambda p: ct.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), p)}[entry]

        def seeded(p):
            torch.manual_seed(3)
            return fn(p).numpy()
        run = seeded
    elif entry == "attention":
        run = lambda p: cuflash.attention(q, k, v, dropout_p=p, dropout_seed=3)  # noqa: E731
    else:
        out, lse = cuflash.attention(q, k, v, return_lse=True)
        run = lambda p: cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, dropout_p=p,  # noqa: E731
                                                   dropout_seed=3)[0]
    plain, dropped = run(0.0), run(0.25)
    assert not np.array_equal(plain, dropped)
    np.testing.assert_array_equal(dropped, run(0.25))


def test_torch_head_dim_zero_is_a_value_error():
    """head_dim 0 through the PyTorch adapter raises ValueError naming head_dim (not ZeroDivisionError)."""
    torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")
    from cuflash.torch import flash_attn_func
    q = torch.zeros(1, 4, 2, 0)
    with pytest.raises(ValueError, match="head_dim must be in"):
        flash_attn_func(q, q, q)


def test_torch_gpu_tensor_without_cupy_names_the_extra():
    """A CUDA tensor with CuPy missing raises ModuleNotFoundError naming CuPy and the extra to install (run in a
    fresh interpreter where importing cupy fails; the tensor is faked, so no GPU is needed)."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["cupy"] = None
import numpy as np, cuflash
from cuflash import api, arrays
class Fake:  # what api sees of a CUDA tensor: a 4-D shape, a dtype, a device ordinal
    shape = (1, 4, 2, 8)
arrays.framework_of = lambda x: "torch"
arrays.device_of = lambda x, fw: 0
arrays.dtype_name = lambda x, fw: "float16"
arrays.current_stream = lambda fw, device: 0
api._needs_autograd = lambda *tensors: False
try:
    cuflash.attention(Fake(), Fake(), Fake())
except ModuleNotFoundError as e:
    print("ERR", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "ERR" in run.stdout and "needs CuPy" in run.stdout and "cuflash[cuda13]" in run.stdout, run.stdout + run.stderr
