"""The yardstick of the GPU tests, checked on the CPU: gpu_helpers' NumPy emulation of "the same attention
math in the input dtype" (forward, and backward as autograd computes it) against the plain torch ops it
replaces, run by torch on the CPU in bf16/fp16 with autograd. They must round at the same points: the
outputs agree bit for bit almost everywhere (torch's CPU float16 kernels accumulate some sums in another
order: a last-bit difference on a few % of the elements), and the max errors against the float64
reference, which is what FlashAttention's rule compares, agree (to one ulp of the element where it
occurs). No GPU needed; the comparisons skip without torch."""

import zlib

import numpy as np
import pytest

from cuflash import reference

import gpu_helpers as gh


def _torch():
    return pytest.importorskip("torch", reason="the yardstick is checked against torch on the CPU; needs torch")


def _torch_naive(torch, q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None):
    """The yardstick as the GPU tests computed it before: plain torch ops in the input dtype."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    g = hq // hk
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i + sk - sq - j).abs().to(q.dtype)
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(b, hq)
        s = s - (slopes[:, :, None, None].to(q.dtype) * dist)
    vis = torch.from_numpy(reference.visible_mask(sq, sk, causal, window_size)).to(q.device)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


_SLOPES_H = np.random.default_rng(7).random(4, dtype=np.float32) * np.float32(0.3)
_SLOPES_BH = np.random.default_rng(8).random((2, 4), dtype=np.float32) * np.float32(0.3)

# (b, sq, sk, hq, hk, d, q factor, options): every feature and shape class the GPU tests use it for.
CASES = {
    "plain": (2, 70, 90, 2, 2, 64, 1, {}),
    "causal_sq_lt_sk": (1, 60, 130, 2, 2, 128, 1, dict(causal=True)),
    "causal_empty_rows": (2, 130, 40, 2, 2, 64, 1, dict(causal=True)),
    "gqa": (2, 70, 90, 8, 2, 64, 1, dict(causal=True)),
    "mqa_scale": (1, 70, 90, 4, 1, 32, 1, dict(softmax_scale=0.3)),
    "softcap": (2, 70, 110, 4, 4, 64, 3, dict(softcap=5.0)),
    "alibi_h": (2, 70, 110, 4, 4, 64, 1, dict(alibi_slopes=_SLOPES_H, causal=True)),
    "alibi_bh_window_softcap": (2, 70, 110, 4, 4, 64, 3, dict(softcap=8.0, alibi_slopes=_SLOPES_BH,
                                                              window_size=(20, 10))),
    "window_empty_rows": (2, 120, 50, 4, 2, 64, 1, dict(window_size=(5, 0))),
    "alibi_long_distance": (1, 40, 700, 4, 2, 64, 1, dict(alibi_slopes=_SLOPES_H)),
}

ULP = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
# torch's CPU fp16 matmuls sum in another order than NumPy's float32 ones: a last-bit difference in one
# probability moves the rounding of the outputs of its row, so fp16 agrees bitwise on fewer elements. bf16
# too over long sums: dK of alibi_long_distance (700 keys) agreed on 0.916 of its elements with NumPy 2.4.6
# and torch 2.13.0 (CPU) where earlier versions gave >= 0.99; every difference stays within the 4-ulp bound.
SAME = {"bfloat16": 0.9, "float16": 0.9}


def _case(name, dtype, seed=0):
    b, sq, sk, hq, hk, d, factor, kw = CASES[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), len(dtype), seed])
    dt = gh.np_dtype(dtype)
    q = (rng.standard_normal((b, sq, hq, d), dtype=np.float32) * np.float32(factor)).astype(dt)
    k, v = gh.host_randn((b, sk, hk, d), dtype, rng), gh.host_randn((b, sk, hk, d), dtype, rng)
    dout = gh.host_randn((b, sq, hq, d), dtype, rng)
    return q, k, v, dout, kw


def _compare(name, ours, theirs, ref, dtype):
    """Bitwise agreement on most elements (SAME), any difference within 4 ulps of the largest magnitude, and
    the max error against the float64 reference equal to torch's within 5% plus one ulp at the element where
    either has its max error (a sum in another order can move that element by one ulp)."""
    assert ours.shape == theirs.shape and np.isfinite(ours).all()
    diff = np.abs(ours - theirs)
    scale = float(np.max(np.abs(theirs), initial=0.0))
    assert np.mean(diff == 0) >= SAME[dtype], f"{name}: only {np.mean(diff == 0):.4f} of the elements equal torch's"
    assert diff.max(initial=0.0) <= 4 * ULP[dtype] * scale, f"{name}: differs from torch by {diff.max():.3e}"
    if ref.size == 0:
        return
    err_ours, err_torch = np.abs(ours - ref), np.abs(theirs - ref)
    i, j = np.argmax(err_ours), np.argmax(err_torch)
    e_ours, e_torch = float(err_ours.flat[i]), float(err_torch.flat[j])
    one_ulp = ULP[dtype] * max(abs(ref.flat[i]), abs(ref.flat[j]), 2.0 ** -14)
    assert abs(e_ours - e_torch) <= 0.05 * e_torch + one_ulp, f"{name}: max error {e_ours:.4e} vs torch {e_torch:.4e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_yardstick_matches_torch_ops(case, dtype):
    """naive_same_dtype and naive_backward_same_dtype give torch's output and autograd gradients (the old
    yardstick of the GPU tests), and the same max error against the float64 reference."""
    torch = _torch()
    q, k, v, dout, kw = _case(case, dtype)
    tdt = getattr(torch, dtype)
    to_t = lambda x: torch.from_numpy(x.astype(np.float32)).to(tdt)  # noqa: E731  exact: values are in the dtype
    tkw = dict(kw)
    if kw.get("alibi_slopes") is not None:
        tkw["alibi_slopes"] = torch.from_numpy(kw["alibi_slopes"])
    tq, tk, tv = (to_t(x).requires_grad_(True) for x in (q, k, v))
    tout = _torch_naive(torch, tq, tk, tv, **tkw)
    tgrads = torch.autograd.grad(tout, (tq, tk, tv), to_t(dout))

    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref_out, _ = reference.attention_reference(q64, k64, v64, **kw)
    ref_grads = reference.attention_backward_reference(do64, q64, k64, v64, **kw)
    out = gh.naive_same_dtype(q, k, v, **kw)
    grads = gh.naive_backward_same_dtype(dout, q, k, v, **kw)
    _compare("out", out, gh.to_np64(tout), ref_out, dtype)
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, tgrads, ref_grads):
        assert ours.shape == ref.shape
        _compare(name, ours, gh.to_np64(theirs), ref, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_yardstick_takes_the_dtype_of_float64_inputs(dtype):
    """Inputs given as float64 (JAX/torch results brought back) use the dtype passed, with identical results."""
    q, k, v, dout, kw = _case("gqa", dtype)
    a = gh.naive_same_dtype(q, k, v, **kw)
    b = gh.naive_same_dtype(*(x.astype(np.float64) for x in (q, k, v)), dtype=dtype, **kw)
    np.testing.assert_array_equal(a, b)
    ga = gh.naive_backward_same_dtype(dout, q, k, v, **kw)
    gb = gh.naive_backward_same_dtype(*(x.astype(np.float64) for x in (dout, q, k, v)), dtype=dtype, **kw)
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)


def test_empty_rows_are_zero():
    """Rows that see no key give an output and dq of exactly 0 (softmax NaN -> nan_to_num in the torch ops)."""
    q, k, v, dout, kw = _case("causal_empty_rows", "float16")
    out = gh.naive_same_dtype(q, k, v, **kw)
    dq, _, _ = gh.naive_backward_same_dtype(dout, q, k, v, **kw)
    empty = ~reference.visible_mask(130, 40, True).any(axis=1)
    assert empty.sum() == 90
    assert np.all(out[:, empty] == 0) and np.all(dq[:, empty] == 0)


def test_rounding_is_nearest_even():
    """round_to rounds to nearest even on 8 (bf16) and 11 (fp16) significant bits, keeps subnormals and
    infinities."""
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5, 2.0 ** -130, np.inf, -np.inf],
                 dtype=np.float32)
    np.testing.assert_array_equal(gh.round_to(x, "bfloat16"),
                                  [1.0, 1.0, 1.0 + 2 ** -6, 1.0, -2.5, 2.0 ** -130, np.inf, -np.inf])
    y = np.array([1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 2.0 ** -20, 70000.0], dtype=np.float32)
    np.testing.assert_array_equal(gh.round_to(y, "float16"), [1.0, 1.0 + 2 ** -9, 2.0 ** -20, np.inf])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_matches_torch(dtype):
    """round_to equals torch's float32 -> bf16/fp16 conversion on random values over many binades."""
    torch = _torch()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 16, 200_000))).astype(np.float32)
    theirs = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(gh.round_to(x, dtype), theirs)


def test_to_host_keeps_bf16_and_strides():
    """to_host/to_np64 read torch bf16 tensors (also transposed views) exactly."""
    torch = _torch()
    t = torch.randn(2, 5, 3, 8).to(torch.bfloat16).transpose(1, 2)
    h = gh.to_host(t)
    assert gh.dtype_name(h) == "bfloat16" and h.shape == (2, 3, 5, 8)
    np.testing.assert_array_equal(gh.to_np64(t), t.double().numpy())
