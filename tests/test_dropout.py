"""Attention dropout (cuflash/dropout.py and the CPU path): the generator is Philox4x32-10 (Random123's known
answers), the mask keeps 1 - p of the elements within statistical bounds and is a function of (seed,
offset, batch, head, query, key) only, so every tiling draws the same mask; forward and backward with
dropout equal the float64 reference with that mask, whose gradients finite differences confirm; on the GPU
(gpu-marked) the device generator the kernels draw with (philox.cuh) keeps exactly the NumPy path's elements.
"""

import numpy as np
import pytest

import cuflash
from cuflash import dropout, reference

# Random123's known-answer vectors for Philox4x32-10 (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in dropout.philox4x32_10(counter, key)) == expected


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_bounds(p):
    """The kept fraction is 1 - p within 5 standard deviations, overall and for each of the 8 keys one
    Philox call serves (no biased 16-bit half)."""
    m = cuflash.dropout_mask(2, 4, 300, 304, dropout_p=p, dropout_seed=1234)
    n = m.size
    tol = 5 * np.sqrt(p * (1 - p) / n)
    assert abs(m.mean() - (1 - p)) < tol
    for r in range(8):
        part = m[..., r::8]
        assert abs(part.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / part.size)


def test_threshold_rounds_keep_probability():
    assert dropout.keep_threshold(0.1) == round(0.9 * 65536)
    assert dropout.keep_threshold(0.0) == 65536
    assert not cuflash.dropout_mask(1, 1, 4, 4, dropout_p=1 - 2 ** -20, dropout_seed=0).any()


def test_mask_depends_on_seed_offset_and_position_only():
    """A tile's mask equals the same slice of the whole mask (any tiling draws the same bits); another seed,
    another offset, or an offset that differs only above 32 bits gives another mask."""
    kw = dict(dropout_p=0.3, dropout_seed=99, dropout_offset=7)
    whole = cuflash.dropout_mask(2, 3, 40, 53, **kw)
    tile = dropout.keep_tile(99, 7, 0.3, np.array([[3, 5]]), (11, 29), (5, 50))  # (b, h) = (1, 0), (1, 2)
    np.testing.assert_array_equal(tile[0, 0], whole[1, 0, 11:29, 5:50])
    np.testing.assert_array_equal(tile[0, 1], whole[1, 2, 11:29, 5:50])
    np.testing.assert_array_equal(whole, cuflash.dropout_mask(2, 3, 40, 53, **kw))
    for other in (dict(kw, dropout_seed=100), dict(kw, dropout_offset=8), dict(kw, dropout_offset=7 + (1 << 32)),
                  dict(kw, dropout_seed=99 + (1 << 40))):
        assert (cuflash.dropout_mask(2, 3, 40, 53, **other) != whole).mean() > 0.2


def _inputs(dtype, b=2, sq=37, sk=45, hq=4, hk=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d),
                                                                 (b, sq, hq, d)))


CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(6, 2), softcap=2.5),
    dict(causal=True, alibi_slopes=np.array([0.1, 0.3, 0.5, 0.7], np.float32)),
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_cpu_path_equals_reference_with_the_mask(opts, dtype, tol):
    """cuflash.attention / attention_backward with dropout equal the float64 reference (which applies
    dropout_mask's mask) on the tiled CPU path, GQA included; the LSE is the softmax's, without dropout."""
    q, k, v, do = _inputs(dtype)
    drop = dict(dropout_p=0.2, dropout_seed=5, dropout_offset=1 << 33)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts, **drop)
    ref_out, ref_lse = reference.attention_reference(q, k, v, **opts, **drop)
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, ref_lse, atol=tol, rtol=tol)
    _, plain_lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    np.testing.assert_array_equal(lse, plain_lse)
    grads = cuflash.attention_backward(do, q, k, v, out, lse, **opts, **drop)
    for g, r in zip(grads, reference.attention_backward_reference(do, q, k, v, **opts, **drop)):
        np.testing.assert_allclose(g, r, atol=10 * tol, rtol=10 * tol)


def test_tilings_agree():
    """Small and odd tiles (every online-softmax branch) give the default tiling's result."""
    q, k, v, do = _inputs(np.float64, sq=29, sk=61)
    kw = dict(causal=True, dropout_p=0.4, dropout_seed=17)
    out, lse = reference.attention_numpy(q, k, v, **kw)
    small, _ = reference.attention_numpy(q, k, v, block_q=3, block_k=7, **kw)
    np.testing.assert_allclose(small, out, atol=1e-13)
    g = reference.attention_backward_numpy(do, q, k, v, out, lse, **kw)
    gs = reference.attention_backward_numpy(do, q, k, v, out, lse, block_q=5, block_k=4, **kw)
    for a, b in zip(g, gs):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_reference_gradients_match_finite_differences():
    """With the mask fixed by the seed, the reference's analytic gradients are the derivatives of its output."""
    q, k, v, do = _inputs(np.float64, b=1, sq=6, sk=9, hq=2, hk=1, d=4, seed=3)
    kw = dict(dropout_p=0.5, dropout_seed=21, causal=True)
    grads = reference.attention_backward_reference(do, q, k, v, **kw)
    eps = 1e-6
    for x, g, idx in ((q, grads[0], (0, 4, 1, 2)), (k, grads[1], (0, 3, 0, 1)), (v, grads[2], (0, 2, 0, 3))):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        args_p = [plus if y is x else y for y in (q, k, v)]
        args_m = [minus if y is x else y for y in (q, k, v)]
        fd = ((reference.attention_reference(*args_p, **kw)[0] * do).sum()
              - (reference.attention_reference(*args_m, **kw)[0] * do).sum()) / (2 * eps)
        assert abs(fd - g[idx]) < 1e-6


def test_p_zero_is_the_plain_path():
    q, k, v, _ = _inputs(np.float32)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, dropout_p=0.0, dropout_seed=3),
                                  cuflash.attention(q, k, v))


def test_expected_output_is_unbiased():
    """Averaged over seeds, the dropped output approaches the output without dropout (the 1 / (1 - p)
    scaling): the mean over 200 seeds is within 5 standard errors of it."""
    q, k, v, _ = _inputs(np.float64, b=1, sq=4, sk=16, hq=1, hk=1, d=4)
    plain = cuflash.attention(q, k, v)
    outs = np.stack([cuflash.attention(q, k, v, dropout_p=0.3, dropout_seed=s) for s in range(200)])
    err = np.abs(outs.mean(0) - plain)
    assert (err < 5 * outs.std(0) / np.sqrt(len(outs)) + 1e-12).all()


def test_like_a_cpu_array_is_the_numpy_mask():
    """``like=`` a CPU array (NumPy) keeps the NumPy path: the same mask as without it."""
    kw = dict(dropout_p=0.3, dropout_seed=5, dropout_offset=7)
    np.testing.assert_array_equal(cuflash.dropout_mask(2, 3, 17, 29, like=np.zeros(1), **kw),
                                  cuflash.dropout_mask(2, 3, 17, 29, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), ((1 << 40) + 77, (1 << 33) + 5), ((1 << 64) - 1, 1 << 63)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999])
def test_device_generator_draws_the_numpy_mask(seed, offset, p):
    """The device Philox (philox.cuh, as the kernels will draw) keeps exactly the elements the NumPy path
    keeps, bit for bit, for seeds and offsets past 2**32 and sizes off multiples of 8; ``like=`` a CuPy array
    or a CUDA torch tensor gives a bool array of that type on its device."""
    import cupy
    shape = (2, 3, 37, 45)
    want = cuflash.dropout_mask(*shape, dropout_p=p, dropout_seed=seed, dropout_offset=offset)
    got = cuflash.dropout_mask(*shape, dropout_p=p, dropout_seed=seed, dropout_offset=offset, like=cupy.zeros(1))
    assert isinstance(got, cupy.ndarray) and got.dtype == np.bool_ and got.shape == shape
    np.testing.assert_array_equal(cupy.asnumpy(got), want)
    torch = pytest.importorskip("torch")
    t = cuflash.dropout_mask(*shape, dropout_p=p, dropout_seed=seed, dropout_offset=offset,
                             like=torch.zeros(1, device="cuda"))
    assert t.dtype == torch.bool and t.is_cuda
    np.testing.assert_array_equal(t.cpu().numpy(), want)


def test_seed_as_an_array_is_checked():
    """dropout_seed as an array must be two 64-bit integers (seed, offset) of the inputs' array type, with
    dropout_offset left at 0; each mistake raises naming the argument, and the right one equals the ints."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 9, 2, 16)) for _ in range(3))
    want = cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=7, dropout_offset=9)
    got = cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=np.array([7, 9], np.int64))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="dropout_seed as an array"):
        cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=np.array([7, 9], np.int32))
    for bad in (np.array([7, 9, 1]), np.array([[7, 9]]), np.array(7)):
        with pytest.raises(ValueError, match="dropout_seed as an array"):
            cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=bad)
    for scalar in (np.int64(7), np.uint64(7)):  # NumPy integer scalars are ints
        np.testing.assert_array_equal(cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=scalar,
                                                        dropout_offset=np.int64(9)), want)
    with pytest.raises(ValueError, match="dropout_offset must be 0"):
        cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=np.array([7, 9]), dropout_offset=1)
    grads = cuflash.attention_backward(q, q, k, v, want, *cuflash.attention(q, k, v, return_lse=True)[1:],
                                       dropout_p=0.25, dropout_seed=np.array([7, 9], np.uint64))
    ref = cuflash.attention_backward(q, q, k, v, want, *cuflash.attention(q, k, v, return_lse=True)[1:],
                                     dropout_p=0.25, dropout_seed=7, dropout_offset=9)
    for g, r in zip(grads, ref):
        np.testing.assert_array_equal(g, r)


def test_dropout_mask_checks_its_arguments():
    """cuflash.dropout_mask refuses what cuflash.attention refuses (p outside [0, 1), non-numbers, negative or
    non-integer sizes), on the NumPy path as on the device one."""
    for bad, exc in ((dict(dropout_p=1.0), ValueError), (dict(dropout_p=-0.1), ValueError),
                     (dict(dropout_p="0.1"), TypeError), (dict(dropout_p=True), TypeError),
                     (dict(dropout_p=float("nan")), ValueError)):
        with pytest.raises(exc, match="dropout_p"):
            cuflash.dropout_mask(1, 1, 4, 8, dropout_seed=1, **bad)
    for sizes, name in (((-1, 1, 4, 8), "batch"), ((1, 1, 4, -3), "seqlen_k"), ((1, 2.0, 4, 8), "heads")):
        with pytest.raises(ValueError, match=name):
            cuflash.dropout_mask(*sizes, dropout_p=0.5, dropout_seed=1)
    assert cuflash.dropout_mask(np.int64(1), 1, 4, 8, dropout_p=0.5, dropout_seed=1).shape == (1, 1, 4, 8)



def test_empty_sizes_give_empty_masks():
    """A size of 0 anywhere gives an empty mask of that shape (a packed sequence without queries or keys draws
    one), and attention with dropout over zero queries or zero keys runs."""
    for sizes in ((2, 3, 0, 5), (2, 3, 4, 0), (0, 3, 4, 5)):
        mask = cuflash.dropout_mask(*sizes, dropout_p=0.5, dropout_seed=1)
        assert mask.shape == sizes and mask.dtype == bool
    q, k = np.ones((1, 0, 2, 8)), np.ones((1, 5, 2, 8))
    assert cuflash.attention(q, k, k, dropout_p=0.5, dropout_seed=3).shape == (1, 0, 2, 8)
    out = cuflash.attention(k, q, q, dropout_p=0.5, dropout_seed=3)
    assert out.shape == (1, 5, 2, 8) and not out.any()
