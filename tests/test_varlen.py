"""Variable-length attention (cuflash/varlen.py) on the CPU path: each packed sequence gives exactly the
dense attention of that sequence alone (outputs, LSE in (heads, total) layout, gradients), with lengths 0,
1, 17 and ~100, causal and windows bottom-right aligned per sequence, softcap, ALiBi (shared and per
sequence), GQA and seqused; NaN in rows outside every sequence never reaches a result; bad arguments raise
named errors before any work."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

LENS_Q = [17, 0, 1, 100, 33]
LENS_K = [20, 5, 0, 100, 40]


def _packed(lens_q, lens_k, hq=4, hk=2, d=24, dtype=np.float64, seed=0, spare=3):
    rng = np.random.default_rng(seed)
    tq, tk = sum(lens_q) + spare, sum(lens_k) + spare  # `spare` rows past the last sequence
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((tq, hq, d), (tk, hk, d), (tk, hk, d), (tq, hq, d)))
    for x in (q, k, v, dout):
        x[-spare:] = np.nan  # outside every sequence: must never be read
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    return q, k, v, dout, cu_q, cu_k


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(6, 2)), dict(causal=True, softcap=1.5),
                                  dict(alibi="shared"), dict(alibi="per_sequence", causal=True)])
def test_each_sequence_equals_its_dense_attention(opts):
    """Forward and backward per packed sequence equal the float64 reference of that sequence alone."""
    opts = dict(opts)
    q, k, v, dout, cu_q, cu_k = _packed(LENS_Q, LENS_K)
    alibi = opts.pop("alibi", None)
    slopes = None
    if alibi == "shared":
        slopes = np.linspace(0.1, 0.4, 4).astype(np.float32)
    elif alibi == "per_sequence":
        slopes = np.random.default_rng(3).random((5, 4)).astype(np.float32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, alibi_slopes=slopes, return_lse=True, **opts)
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 100, 100,
                                                   alibi_slopes=slopes, **opts)
    assert lse.shape == (4, q.shape[0])
    for i in range(len(LENS_Q)):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        row = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i])
        ref_out, ref_lse = reference.attention_reference(q[None, rq], k[None, rk], v[None, rk], alibi_slopes=row, **opts)
        np.testing.assert_allclose(out[rq], ref_out[0], atol=1e-12)
        np.testing.assert_allclose(lse[:, rq], ref_lse[0], atol=1e-12)
        ref_g = reference.attention_backward_reference(dout[None, rq], q[None, rq], k[None, rk], v[None, rk],
                                                       alibi_slopes=row, **opts)
        for g, r, rows in zip((dq, dk, dv), ref_g, (rq, rk, rk)):
            np.testing.assert_allclose(g[rows], r[0], atol=1e-11)
    spare = slice(cu_q[-1], None)
    assert np.all(out[spare] == 0) and np.all(lse[:, spare] == np.inf) and np.all(dq[spare] == 0)
    assert np.all(dk[cu_k[-1]:] == 0) and np.isfinite(dq).all() and np.isfinite(dk).all()


def test_seqused_shortens_each_sequence():
    """seqused_q/k: only each sequence's first rows take part (masks aligned to the used lengths); its other
    query rows are 0 with LSE +inf and get no gradient."""
    q, k, v, dout, cu_q, cu_k = _packed(LENS_Q, LENS_K)
    used_q = np.array([10, 0, 1, 100, 0], np.int32)
    used_k = np.array([20, 3, 0, 50, 7], np.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, causal=True, seqused_q=used_q,
                                        seqused_k=used_k, return_lse=True)
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 100, 100, causal=True,
                                                   seqused_q=used_q, seqused_k=used_k)
    for i in range(5):
        rq, rk = slice(cu_q[i], cu_q[i] + used_q[i]), slice(cu_k[i], cu_k[i] + used_k[i])
        ref_out, _ = reference.attention_reference(q[None, rq], k[None, rk], v[None, rk], causal=True)
        np.testing.assert_allclose(out[rq], ref_out[0], atol=1e-12)
        rest = slice(cu_q[i] + used_q[i], cu_q[i + 1])
        assert np.all(out[rest] == 0) and np.all(lse[:, rest] == np.inf) and np.all(dq[rest] == 0)
        assert np.all(dk[cu_k[i] + used_k[i]:cu_k[i + 1]] == 0)


def test_float16_and_float32_follow_the_dense_cpu_path():
    """Lower precisions run the same tiled CPU code per sequence: bitwise what cuflash.attention gives on
    each sequence as a batch of one."""
    for dtype in (np.float16, np.float32):
        q, k, v, _, cu_q, cu_k = _packed([9, 30], [12, 30], dtype=dtype, spare=1)
        out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 30, 30, causal=True)
        assert out.dtype == dtype
        for i in range(2):
            rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            dense = cuflash.attention(q[None, rq], k[None, rk], v[None, rk], causal=True)
            assert np.array_equal(out[rq], dense[0])


def test_torch_cpu_tensors():
    """CPU torch tensors in, torch tensors out (float64 here), same values as NumPy."""
    torch = pytest.importorskip("torch")
    q, k, v, _, cu_q, cu_k = _packed([5, 7], [6, 8], spare=1)
    out = cuflash.attention_varlen(*(torch.from_numpy(x) for x in (q, k, v, cu_q, cu_k)), 7, 8)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), cuflash.attention_varlen(q, k, v, cu_q, cu_k, 7, 8))


@pytest.mark.parametrize("change, exc, text", [
    (dict(cu_q=np.array([0, 5, 3, 20], np.int32)), ValueError, "cu_seqlens_q must start at 0, never decrease"),
    (dict(cu_q=np.array([1, 5, 9, 20], np.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_k=np.array([0, 5, 9, 999], np.int32)), ValueError, "cu_seqlens_k must start at 0"),
    (dict(cu_q=np.array([0, 5, 9, 20], np.int64)), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_k=np.array([0, 5, 20], np.int32)), ValueError, "cu_seqlens_k must have shape (4,)"),
    (dict(max_q=10), ValueError, "max_seqlen_q=10 is below the longest sequence (11)"),
    (dict(max_k=2.5), TypeError, "max_seqlen_k must be a Python int"),
    (dict(seqused_k=np.array([1, 2, 99], np.int32)), ValueError, "seqused_k must lie in"),
    (dict(q_3d=False), ValueError, "q must be 3-D"),
])
def test_bad_arguments_raise_named_errors(change, exc, text):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((20, 2, 8)), rng.standard_normal((20, 1, 8)), rng.standard_normal((20, 1, 8))
    args = dict(cu_q=np.array([0, 5, 9, 20], np.int32), cu_k=np.array([0, 6, 9, 20], np.int32), max_q=11, max_k=11,
                seqused_k=None)
    args.update({key: val for key, val in change.items() if key != "q_3d"})
    if change.get("q_3d") is False:
        q = q[None]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        cuflash.attention_varlen(q, k, v, args["cu_q"], args["cu_k"], args["max_q"], args["max_k"],
                                 seqused_k=args["seqused_k"])


def test_bound_call_key_takes_a_repeated_array_once():
    """varlen._sequence_key (the bound-call signature): one cu_seqlens object passed for q and k is taken once
    (its repeat becomes None, so the recording's pointers stay unambiguous) and the key tells that call from
    one with two equal but distinct arrays; a window that is not a tuple gives no key."""
    torch = pytest.importorskip("torch")
    from cuflash import varlen
    q = torch.zeros(6, 2, 8, dtype=torch.float16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    opts = (6, 6, True, None, 0.0, False)
    key_one, taken = varlen._sequence_key("varlen_forward", (q, q, q, cu, cu, None, None, None), (-1, -1), opts)
    assert taken == (q, None, None, cu, None, None, None, None)
    key_two, taken = varlen._sequence_key("varlen_forward", (q, q, q, cu, cu.clone(), None, None, None), (-1, -1),
                                          opts)
    assert taken[3] is cu and taken[4] is not None and key_one != key_two
    assert varlen._sequence_key("varlen_forward", (q, q, q, cu, cu, None, None, None), [-1, -1], opts)[0] is None
    # a fresh view of the same memory (what the autograd Functions pass for a repeat) is a repeat too
    assert varlen._sequence_key("varlen_forward", (q, q, q, cu, cu.view_as(cu), None, None, None), (-1, -1),
                                opts)[0] == key_one
    # same layout of present arrays, different repeats: (q, k, q) against (q, k, k)
    k = torch.ones(6, 2, 8, dtype=torch.float16)
    assert (varlen._sequence_key("varlen_forward", (q, k, q, cu, cu, None, None, None), (-1, -1), opts)[0]
            != varlen._sequence_key("varlen_forward", (q, k, k, cu, cu, None, None, None), (-1, -1), opts)[0])


def test_mixed_array_kinds_raise_type_error_before_autograd_routing():
    """A torch q with NumPy k / v: the documented TypeError naming the argument, not an AttributeError from
    the autograd check."""
    torch = pytest.importorskip("torch")
    q = torch.zeros(6, 2, 8, dtype=torch.float32)
    k = np.zeros((6, 2, 8), np.float32)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="k is a numpy array"):
        cuflash.attention_varlen(q, k, k, cu, cu, 6, 6)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(6, 2), softcap=1.5)])
def test_dropout_each_sequence_draws_its_batch_index_mask(opts):
    """dropout_p: sequence i draws the keep mask of batch index i of a dense call with the same seed and
    offset (rows and keys from the sequence's start), forward and backward: each sequence's output, LSE
    and gradients equal the float64 reference of that sequence with that mask; the mask really drops
    (the output differs from p = 0) and the seed picks it."""
    q, k, v, dout, cu_q, cu_k = _packed(LENS_Q, LENS_K, seed=5)
    drop = dict(dropout_p=0.3, dropout_seed=(1 << 63) + 11, dropout_offset=(3 << 32) + 7)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, return_lse=True, **drop, **opts)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 100, 100, **drop, **opts)
    for i in range(len(LENS_Q)):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        # the dense call of batch i + 1 whose example i is this sequence: its mask for example i
        qs, ks, vs, ds = (np.zeros((i + 1, n, *x.shape[1:])) for x, n in ((q, sq), (k, sk), (v, sk), (dout, sq)))
        qs[i], ks[i], vs[i], ds[i] = q[rq], k[rk], v[rk], dout[rq]
        ref_out, ref_lse = reference.attention_reference(qs, ks, vs, **drop, **opts)
        np.testing.assert_allclose(out[rq], ref_out[i], atol=1e-12)
        np.testing.assert_allclose(lse[:, rq], ref_lse[i], atol=1e-12)
        ref_g = reference.attention_backward_reference(ds, qs, ks, vs, **drop, **opts)
        for g, r, rows in zip(grads, ref_g, (rq, rk, rk)):
            np.testing.assert_allclose(g[rows], r[i], atol=1e-11)
    plain = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, **opts)
    other = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, **dict(drop, dropout_seed=12), **opts)
    rows = slice(0, cu_q[-1])
    assert not np.allclose(out[rows], plain[rows]) and not np.allclose(out[rows], other[rows])
    assert np.all(out[cu_q[-1]:] == 0) and np.isfinite(grads[0]).all()


def test_dropout_equal_lengths_equal_the_dense_batch():
    """A packed batch of sequences of one length with dropout equals cuflash.attention on that dense batch with
    the same seed and offset (outputs and gradients), GQA included."""
    b, n = 3, 37
    q, k, v, dout, cu_q, cu_k = _packed([n] * b, [n] * b, spare=0, seed=9)
    drop = dict(dropout_p=0.25, dropout_seed=99, dropout_offset=4)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, n, n, causal=True, return_lse=True, **drop)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, n, n, causal=True, **drop)
    dense = [x.reshape(b, n, *x.shape[1:]) for x in (q, k, v, dout)]
    d_out, d_lse = cuflash.attention(*dense[:3], causal=True, return_lse=True, **drop)
    d_grads = cuflash.attention_backward(dense[3], *dense[:3], d_out, d_lse, causal=True, **drop)
    np.testing.assert_allclose(out.reshape(b, n, *out.shape[1:]), d_out, atol=1e-12)
    for g, dg in zip(grads, d_grads):
        np.testing.assert_allclose(g.reshape(dg.shape), dg, atol=1e-11)


def test_dropout_arguments():
    """dropout_p > 0 needs a seed (TypeError naming dropout_seed); p outside [0, 1) is a ValueError; CPU torch
    tensors, with and without autograd, take the NumPy call's mask for the same int seed."""
    q, k, v, dout, cu_q, cu_k = _packed(LENS_Q, LENS_K)
    with pytest.raises(TypeError, match="dropout_seed"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, dropout_p=1.0, dropout_seed=1)
    with pytest.raises(TypeError, match="dropout_seed"):
        cuflash.attention_varlen_backward(dout, q, k, v, q, np.zeros((4, q.shape[0])), cu_q, cu_k, 100, 100,
                                          dropout_p=0.1)
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tcu_q, tcu_k = torch.from_numpy(cu_q), torch.from_numpy(cu_k)
    want = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 100, 100, dropout_p=0.1, dropout_seed=1)
    out = cuflash.attention_varlen(tq, tk, tv, tcu_q, tcu_k, 100, 100, dropout_p=0.1, dropout_seed=1)
    assert out.requires_grad
    np.testing.assert_array_equal(out.detach().numpy(), want)
    with torch.no_grad():
        out = cuflash.attention_varlen(tq, tk, tv, tcu_q, tcu_k, 100, 100, dropout_p=0.1, dropout_seed=1)
    np.testing.assert_array_equal(out.numpy(), want)
