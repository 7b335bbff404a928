"""Tests for cuflash.reference: naive float64 references and the tiled NumPy
FlashAttention forward / backward."""

import math

import numpy as np
import pytest

from cuflash.reference import (
    attention_backward_numpy,
    attention_backward_reference,
    attention_numpy,
    attention_reference,
    visible_mask,
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _inputs(rng, b, sq, sk, hq, hk, d, dtype=np.float64):
    q = rng.standard_normal((b, sq, hq, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def _slopes(rng, b, hq, per_batch):
    shape = (b, hq) if per_batch else (hq,)
    return rng.uniform(0.05, 0.5, size=shape).astype(np.float32)


def _loop_attention(q, k, v, causal=False, scale=None, window=(-1, -1),
                    softcap=0.0, slopes=None):
    """Row-by-row attention in plain Python, written straight from the spec."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    left, right = window
    if causal:
        right = 0
    out = np.zeros((b, sq, hq, d))
    lse = np.zeros((b, hq, sq))
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            if slopes is None:
                slope = 0.0
            else:
                slope = float(slopes[h] if slopes.ndim == 1 else slopes[bi, h])
            for i in range(sq):
                scores, rows = [], []
                for j in range(sk):
                    c = i + sk - sq
                    if right >= 0 and j > c + right:
                        continue
                    if left >= 0 and j < c - left:
                        continue
                    x = scale * sum(float(q[bi, i, h, t]) * float(k[bi, j, kh, t])
                                    for t in range(d))
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    x -= slope * abs(i + sk - sq - j)
                    scores.append(x)
                    rows.append(v[bi, j, kh].astype(np.float64))
                if not scores:
                    lse[bi, h, i] = math.inf
                    continue
                mx = max(scores)
                w = [math.exp(x - mx) for x in scores]
                tot = sum(w)
                lse[bi, h, i] = mx + math.log(tot)
                out[bi, i, h] = sum(wi / tot * r for wi, r in zip(w, rows))
    return out, lse


def _naive_fp16(q, k, v, causal=False, window=(-1, -1), softcap=0.0,
                slopes=None):
    """Attention computed entirely in float16 arithmetic (the error yardstick)."""
    h16 = np.float16
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, ke).astype(h16) * h16(d ** -0.5)
    if softcap > 0:
        s = (h16(softcap) * np.tanh(s / h16(softcap))).astype(h16)
    if slopes is not None:
        sl = np.broadcast_to(slopes, (b, hq)).astype(h16)
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        s = s - sl[:, :, None, None] * np.abs(i + sk - sq - j).astype(h16)
    mask = visible_mask(sq, sk, causal, window)
    s = np.where(mask, s, h16(-np.inf))
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, h16(0))
    p = np.exp(s - m).astype(h16)
    tot = p.sum(-1, keepdims=True, dtype=h16)
    p = (p / np.where(tot == 0, h16(1), tot)).astype(h16)
    return np.einsum("bhqk,bkhd->bqhd", p, ve).astype(h16)


# Feature combinations exercised by the odd-shape sweeps.
FEATURES = [
    dict(),
    dict(causal=True),
    dict(window_size=(5, 3)),
    dict(causal=True, window_size=(9, -1)),
    dict(window_size=(-1, 0)),
    dict(window_size=(4, -1), softmax_scale=0.3),
    dict(softcap=2.5),
    dict(alibi="head"),
    dict(alibi="batch", causal=True, softcap=4.0),
    dict(softcap=3.0, window_size=(20, 7), alibi="head"),
]


def _kwargs(feat, rng, b, hq):
    kw = dict(feat)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = _slopes(rng, b, hq, alibi == "batch")
    return kw


# ---------------------------------------------------------------------------
# visible_mask
# ---------------------------------------------------------------------------

def test_visible_mask_blocks_match_full_mask():
    """Any sub-block of visible_mask equals the same slice of the full mask."""
    full = visible_mask(7, 11, causal=True, window_size=(3, -1))
    blk = visible_mask(7, 11, True, (3, -1), q_start=2, q_stop=6,
                       k_start=4, k_stop=10)
    assert blk.dtype == bool and blk.shape == (4, 6)
    np.testing.assert_array_equal(blk, full[2:6, 4:10])
    # Bottom-right alignment: the last query sees the last key, causal.
    assert full[-1, -1] and not full[-1, :-1][:6].any()


# ---------------------------------------------------------------------------
# attention_reference vs the per-row loop
# ---------------------------------------------------------------------------

LOOP_CASES = [
    ("plain", dict(b=2, sq=5, sk=6, hq=2, hk=2, d=4), dict()),
    ("causal sq<sk", dict(b=1, sq=4, sk=7, hq=2, hk=2, d=3), dict(causal=True)),
    ("causal sq>sk", dict(b=1, sq=7, sk=4, hq=2, hk=2, d=3), dict(causal=True)),
    ("window", dict(b=1, sq=6, sk=8, hq=1, hk=1, d=4),
     dict(window=(2, 1))),
    ("softcap", dict(b=1, sq=5, sk=5, hq=2, hk=1, d=4),
     dict(softcap=1.5, scale=0.9)),
    ("alibi head", dict(b=2, sq=5, sk=6, hq=2, hk=2, d=3), dict(slopes="head")),
    ("alibi batch", dict(b=2, sq=6, sk=5, hq=2, hk=2, d=3),
     dict(slopes="batch", causal=True)),
    ("gqa", dict(b=1, sq=4, sk=5, hq=4, hk=2, d=3), dict(window=(1, 2))),
    ("mqa", dict(b=2, sq=4, sk=3, hq=3, hk=1, d=3), dict(softcap=2.0)),
    ("all", dict(b=1, sq=6, sk=9, hq=4, hk=2, d=4),
     dict(causal=True, window=(3, -1), softcap=2.0, slopes="batch")),
]


@pytest.mark.parametrize("case", range(len(LOOP_CASES)),
                         ids=[c[0] for c in LOOP_CASES])
def test_reference_matches_row_loop(case):
    """attention_reference equals a plain per-row softmax loop."""
    name, shape, feat = LOOP_CASES[case]
    rng = np.random.default_rng(100 + case)
    q, k, v = _inputs(rng, shape["b"], shape["sq"], shape["sk"], shape["hq"],
                      shape["hk"], shape["d"])
    feat = dict(feat)
    slopes = feat.pop("slopes", None)
    if slopes is not None:
        slopes = _slopes(rng, shape["b"], shape["hq"], slopes == "batch")
    out_l, lse_l = _loop_attention(q, k, v, slopes=slopes, **feat)
    out, lse = attention_reference(
        q, k, v, causal=feat.get("causal", False),
        softmax_scale=feat.get("scale"),
        window_size=feat.get("window", (-1, -1)),
        softcap=feat.get("softcap", 0.0), alibi_slopes=slopes)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2],
                                                  q.shape[1])
    np.testing.assert_allclose(out, out_l, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_l, rtol=1e-12, atol=1e-12)


def test_reference_empty_rows():
    """Rows that see no key give out exactly 0 and lse +inf, never NaN."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 2, 6, 3, 2, 1, 4)
    # causal with sq > sk: queries 0..2 are above the bottom-right diagonal.
    out, lse = attention_reference(q, k, v, causal=True)
    out_l, lse_l = _loop_attention(q, k, v, causal=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[:, :3] == 0.0)
    assert np.all(np.isposinf(lse[:, :, :3]))
    assert np.all(np.isfinite(lse[:, :, 3:]))
    np.testing.assert_allclose(out, out_l, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_l, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# attention_numpy vs attention_reference
# ---------------------------------------------------------------------------

# (b, sq, sk, hq, hk, d, block_q, block_k)
SHAPES = [
    (1, 1, 17, 2, 2, 8, 16, 16),
    (3, 17, 1, 2, 1, 8, 8, 4),
    (1, 127, 200, 4, 2, 40, 32, 48),
    (3, 200, 127, 3, 1, 8, 64, 37),
    (1, 17, 127, 2, 2, 64, 128, 128),
    (3, 127, 17, 2, 2, 40, 50, 7),
]


def _sweep():
    """Every (shape, feature) pair."""
    for si, shape in enumerate(SHAPES):
        for fi, feat in enumerate(FEATURES):
            yield si, shape, fi, feat


@pytest.mark.parametrize("dtype,rtol,atol", [
    (np.float64, 1e-12, 1e-12),
    (np.float32, 1e-5, 1e-5),
])
def test_numpy_forward_matches_reference(dtype, rtol, atol):
    """Tiled forward equals the float64 reference on odd shapes and features."""
    rng = np.random.default_rng(2)
    for si, (b, sq, sk, hq, hk, d, bq, bk), fi, feat in _sweep():
        q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, dtype)
        kw = _kwargs(feat, rng, b, hq)
        out, lse = attention_numpy(q, k, v, block_q=bq, block_k=bk, **kw)
        ref_out, ref_lse = attention_reference(q, k, v, **kw)
        assert out.dtype == dtype and out.shape == q.shape
        assert lse.dtype == dtype and lse.shape == (b, hq, sq)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol,
                                   err_msg=f"shape {si} feature {feat}")
        np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
        fin = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=rtol,
                                   atol=atol)


def test_numpy_forward_float16_beats_naive_half():
    """float16 tiled forward errs at most 2x a naive float16 computation."""
    rng = np.random.default_rng(3)
    for si, (b, sq, sk, hq, hk, d, bq, bk), fi, feat in _sweep():
        q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, np.float16)
        kw = _kwargs(feat, rng, b, hq)
        out, lse = attention_numpy(q, k, v, block_q=bq, block_k=bk, **kw)
        assert out.dtype == np.float16 and lse.dtype == np.float32
        ref_out, ref_lse = attention_reference(q, k, v, **kw)
        naive = _naive_fp16(q, k, v, causal=kw.get("causal", False),
                            window=kw.get("window_size", (-1, -1)),
                            softcap=kw.get("softcap", 0.0),
                            slopes=kw.get("alibi_slopes"))
        ours_err = np.abs(out.astype(np.float64) - ref_out).max()
        naive_err = np.abs(naive.astype(np.float64) - ref_out).max()
        assert ours_err <= 2 * naive_err + 1e-5, (si, feat, ours_err,
                                                  naive_err)
        fin = np.isfinite(ref_lse)
        np.testing.assert_array_equal(np.isinf(lse), ~fin)
        np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-5,
                                   atol=1e-5)


def test_numpy_window_block_grid():
    """Tiled fwd/bwd match the reference for every small window/block layout."""
    rng = np.random.default_rng(11)
    for sq, sk in ((9, 13), (13, 9), (12, 12)):
        q, k, v = _inputs(rng, 1, sq, sk, 2, 1, 4)
        dout = rng.standard_normal(q.shape)
        ref_fwd, ref_bwd = {}, {}
        for bq, bk in ((1, 3), (4, 4), (5, 2), (3, 6)):
            for left in (-1, 0, 1, 2, 4, 5):
                for right in (-1, 0, 1, 3, 4):
                    for causal in (False, True):
                        kw = dict(causal=causal, window_size=(left, right))
                        key = (left, 0 if causal else right)
                        if key not in ref_fwd:
                            ref_fwd[key] = attention_reference(q, k, v, **kw)
                            ref_bwd[key] = attention_backward_reference(
                                dout, q, k, v, **kw)
                        out, lse = attention_numpy(q, k, v, block_q=bq,
                                                   block_k=bk, **kw)
                        np.testing.assert_allclose(out, ref_fwd[key][0],
                                                   rtol=1e-12, atol=1e-12)
                        np.testing.assert_array_equal(
                            np.isinf(lse), np.isinf(ref_fwd[key][1]))
                        grads = attention_backward_numpy(
                            dout, q, k, v, out, lse, block_q=bq, block_k=bk,
                            **kw)
                        for g, r in zip(grads, ref_bwd[key]):
                            np.testing.assert_allclose(g, r, rtol=1e-10,
                                                       atol=1e-10)


def test_numpy_forward_transposed_views():
    """Non-contiguous (b,h,s,d).transpose(0,2,1,3) views give the same result."""
    rng = np.random.default_rng(4)
    b, sq, sk, hq, hk, d = 2, 33, 45, 4, 2, 16
    qh = rng.standard_normal((b, hq, sq, d))
    kh = rng.standard_normal((b, hk, sk, d))
    vh = rng.standard_normal((b, hk, sk, d))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qh, kh, vh))
    assert not q.flags.c_contiguous
    kw = dict(causal=True, softcap=3.0,
              alibi_slopes=_slopes(rng, b, hq, False))
    out, lse = attention_numpy(q, k, v, block_q=16, block_k=10, **kw)
    ref_out, ref_lse = attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    out_c, _ = attention_numpy(*(np.ascontiguousarray(x) for x in (q, k, v)),
                               block_q=16, block_k=10, **kw)
    np.testing.assert_array_equal(out, out_c)
    dout = rng.standard_normal((b, hq, sq, d)).transpose(0, 2, 1, 3)
    grads = attention_backward_numpy(dout, q, k, v, out, lse, block_q=16,
                                     block_k=10, **kw)
    ref = attention_backward_reference(dout, q, k, v, **kw)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


def test_numpy_forward_empty_rows():
    """Tiled forward gives out 0 and lse +inf for rows that see no key."""
    rng = np.random.default_rng(5)
    for dtype in (np.float64, np.float32, np.float16):
        q, k, v = _inputs(rng, 2, 40, 9, 2, 1, 8, dtype)
        out, lse = attention_numpy(q, k, v, causal=True, block_q=16,
                                   block_k=4)
        assert not np.isnan(out.astype(np.float64)).any()
        assert np.all(out[:, :31] == 0)
        assert np.all(np.isposinf(lse[:, :, :31]))
        assert np.all(np.isfinite(lse[:, :, 31:]))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

def test_backward_reference_matches_finite_differences():
    """attention_backward_reference equals central finite differences."""
    rng = np.random.default_rng(6)
    b, sq, sk, hq, hk, d = 1, 4, 5, 4, 2, 3
    q, k, v = _inputs(rng, b, sq, sk, hq, hk, d)
    dout = rng.standard_normal(q.shape)
    kw = dict(causal=True, window_size=(2, -1), softcap=1.7,
              alibi_slopes=_slopes(rng, b, hq, True), softmax_scale=0.8)

    def loss(q_, k_, v_):
        return float(np.sum(attention_reference(q_, k_, v_, **kw)[0] * dout))

    dq, dk, dv = attention_backward_reference(dout, q, k, v, **kw)
    eps = 1e-6
    for idx, (x, grad) in enumerate(((q, dq), (k, dk), (v, dv))):
        fd = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            args = [q, k, v]
            xp, xm = x.copy(), x.copy()
            xp[pos] += eps
            xm[pos] -= eps
            args[idx] = xp
            lp = loss(*args)
            args[idx] = xm
            lm = loss(*args)
            fd[pos] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8,
                                   err_msg="dq dk dv"[3 * idx:3 * idx + 2])


@pytest.mark.parametrize("dtype,rtol,atol", [
    (np.float64, 1e-10, 1e-10),
    (np.float32, 2e-4, 2e-4),
])
def test_backward_numpy_matches_reference(dtype, rtol, atol):
    """Tiled backward equals the float64 reference backward."""
    rng = np.random.default_rng(7)
    for si, (b, sq, sk, hq, hk, d, bq, bk), fi, feat in _sweep():
        q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, dtype)
        dout = rng.standard_normal(q.shape).astype(dtype)
        kw = _kwargs(feat, rng, b, hq)
        out, lse = attention_numpy(q, k, v, block_q=bq, block_k=bk, **kw)
        grads = attention_backward_numpy(dout, q, k, v, out, lse,
                                         block_q=bk, block_k=bq, **kw)
        ref = attention_backward_reference(dout, q, k, v, **kw)
        for name, x, g, r in zip("qkv", (q, k, v), grads, ref):
            assert g.dtype == dtype and g.shape == x.shape
            assert not np.isnan(g).any()
            scale = max(1.0, np.abs(r).max())
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * scale,
                                       err_msg=f"d{name} shape {si} {feat}")


def test_backward_numpy_float16_dtypes():
    """float16 backward returns float16 gradients close to the reference."""
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, 2, 37, 29, 4, 2, 16, np.float16)
    dout = rng.standard_normal(q.shape).astype(np.float16)
    kw = dict(causal=True, softcap=3.0, alibi_slopes=_slopes(rng, 2, 4, True))
    out, lse = attention_numpy(q, k, v, block_q=16, block_k=8, **kw)
    grads = attention_backward_numpy(dout, q, k, v, out, lse, block_q=16,
                                     block_k=8, **kw)
    ref = attention_backward_reference(dout, q, k, v, **kw)
    for x, g, r in zip((q, k, v), grads, ref):
        assert g.dtype == np.float16 and g.shape == x.shape
        np.testing.assert_allclose(g.astype(np.float64), r, rtol=2e-2,
                                   atol=2e-2 * np.abs(r).max())


def test_numpy_skips_invisible_key_blocks(monkeypatch):
    """Causal / window tiling computes only key blocks a query block can see,
    masking just the strips at the mask edges."""
    import cuflash.reference as ref_mod

    tiles = []
    real = ref_mod._tile_scores

    def recording(t, qt, kt, s, tanh, h0, h1, q0, q1, k0, k1, masked, visible=None):
        tiles.append((q0, q1, k0, k1, masked))
        return real(t, qt, kt, s, tanh, h0, h1, q0, q1, k0, k1, masked, visible)

    monkeypatch.setattr(ref_mod, "_tile_scores", recording)
    rng = np.random.default_rng(10)
    n = 256
    q, k, v = _inputs(rng, 1, n, n, 1, 1, 8)
    dout = rng.standard_normal(q.shape)

    def check(kw, max_area):
        full = visible_mask(n, n, kw.get("causal", False),
                            kw.get("window_size", (-1, -1)))
        for run in ("fwd", "bwd"):
            tiles.clear()
            if run == "fwd":
                attention_numpy(q, k, v, block_q=64, block_k=64, **kw)
            else:
                out, lse = attention_numpy(q, k, v, **kw)
                tiles.clear()
                attention_backward_numpy(dout, q, k, v, out, lse,
                                         block_q=64, block_k=64, **kw)
            area = 0
            for q0, q1, k0, k1, masked in tiles:
                blk = full[q0:q1, k0:k1]
                assert blk.any(), (run, q0, k0)       # nothing invisible
                assert masked or blk.all(), (run, q0, k0)
                area += (q1 - q0) * (k1 - k0)
            # Every visible score is covered exactly once.
            cover = np.zeros((n, n), int)
            for q0, q1, k0, k1, _ in tiles:
                cover[q0:q1, k0:k1] += 1
            assert np.all(cover[full] == 1) and cover.max() == 1
            assert area <= max_area, (run, area)

    # Causal: the lower triangle plus a 64 x 63 / 2 overhang per row block.
    check(dict(causal=True), n * (n + 1) // 2 + 4 * 64 * 63 // 2)
    # A (10, 10) window: each 64-row block sees at most 64 + 20 keys.
    check(dict(window_size=(10, 10)), 4 * 64 * 84)
    # Unmasked: one tile per (row block, 64 keys), nothing masked.
    tiles.clear()
    attention_numpy(q, k, v, block_q=64, block_k=64)
    assert len(tiles) == 16 and not any(t[4] for t in tiles)


def test_backward_empty_rows_zero_gradient():
    """Rows that see no key get zero dq and contribute nothing to dk / dv."""
    rng = np.random.default_rng(8)
    for dtype in (np.float64, np.float32):
        q, k, v = _inputs(rng, 2, 12, 5, 2, 2, 8, dtype)
        dout = rng.standard_normal(q.shape).astype(dtype)
        kw = dict(causal=True, softcap=2.0)
        out, lse = attention_numpy(q, k, v, block_q=4, block_k=3, **kw)
        dq, dk, dv = attention_backward_numpy(dout, q, k, v, out, lse,
                                              block_q=4, block_k=3, **kw)
        for g in (dq, dk, dv):
            assert not np.isnan(g).any()
        assert np.all(dq[:, :7] == 0)
        rdq, rdk, rdv = attention_backward_reference(dout, q, k, v, **kw)
        assert np.all(rdq[:, :7] == 0)
        # Perturbing dout on empty rows must not move dk / dv.
        dout2 = dout.copy()
        dout2[:, :7] = rng.standard_normal(dout2[:, :7].shape)
        _, dk2, dv2 = attention_backward_numpy(dout2, q, k, v, out, lse,
                                               block_q=4, block_k=3, **kw)
        np.testing.assert_array_equal(dk, dk2)
        np.testing.assert_array_equal(dv, dv2)


# ---------------------------------------------------------------------------
# Any head_dim, empty inputs, strides, default tiles, memory
# ---------------------------------------------------------------------------

ODD_FEATURES = [
    dict(),
    dict(causal=True, softcap=3.0),
    dict(window_size=(6, 2), alibi="batch"),
]


@pytest.mark.parametrize("d", [1, 3, 59, 111, 256])
@pytest.mark.parametrize("dtype,rtol,atol", [
    (np.float64, 1e-10, 1e-10),
    (np.float32, 2e-4, 2e-4),
])
def test_numpy_any_head_dim(d, dtype, rtol, atol):
    """Head dims that are not multiples of 8 (1 .. 256) match the float64
    reference, forward and backward, with GQA and seqlen_q != seqlen_k."""
    rng = np.random.default_rng(20 + d)
    b, sq, sk, hq, hk = 2, 23, 37, 4, 2
    for feat in ODD_FEATURES:
        q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, dtype)
        dout = rng.standard_normal(q.shape).astype(dtype)
        kw = _kwargs(feat, rng, b, hq)
        for blocks in (dict(), dict(block_q=8, block_k=16)):
            out, lse = attention_numpy(q, k, v, **blocks, **kw)
            ref_out, ref_lse = attention_reference(q, k, v, **kw)
            assert out.shape == q.shape and out.dtype == dtype
            np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol,
                                       err_msg=f"d={d} {feat} {blocks}")
            fin = np.isfinite(ref_lse)
            np.testing.assert_array_equal(np.isfinite(lse), fin)
            np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=rtol,
                                       atol=atol)
            grads = attention_backward_numpy(dout, q, k, v, out, lse,
                                             **blocks, **kw)
            ref = attention_backward_reference(dout, q, k, v, **kw)
            for name, x, g, r in zip("qkv", (q, k, v), grads, ref):
                assert g.shape == x.shape and g.dtype == dtype
                np.testing.assert_allclose(
                    g, r, rtol=rtol, atol=atol * max(1.0, np.abs(r).max()),
                    err_msg=f"d{name} d={d} {feat} {blocks}")


@pytest.mark.parametrize("b,sq,sk,hq,hk", [
    (0, 5, 7, 2, 1),      # no batch
    (2, 0, 7, 2, 1),      # no queries
    (2, 5, 0, 2, 1),      # no keys: every row sees nothing
    (2, 0, 0, 2, 2),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_numpy_empty_inputs(b, sq, sk, hq, hk, dtype):
    """Empty shapes give empty / zero outputs of the right shape and dtype;
    with seqlen_k == 0 every row has out 0, lse +inf and zero gradients."""
    rng = np.random.default_rng(12)
    d = 6
    q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    for kw in (dict(), dict(causal=True, softcap=2.0,
                            alibi_slopes=np.full(hq, 0.3))):
        out, lse = attention_numpy(q, k, v, **kw)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (b, hq, sq) and lse.dtype == acc
        assert np.all(out == 0) and np.all(np.isposinf(lse))
        ref_out, ref_lse = attention_reference(q, k, v, **kw)
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(lse, ref_lse)
        grads = attention_backward_numpy(dout, q, k, v, out, lse, **kw)
        for x, g in zip((q, k, v), grads):
            assert g.shape == x.shape and g.dtype == dtype
            assert np.all(g == 0)


def test_numpy_non_unit_last_stride():
    """Inputs whose last axis is strided (every other element) give the same
    result as their contiguous copies."""
    rng = np.random.default_rng(13)
    b, sq, sk, hq, hk, d = 2, 19, 26, 4, 2, 24
    q, k, v, dout, = (rng.standard_normal(s + (2 * d,))[..., ::2]
                      for s in ((b, sq, hq), (b, sk, hk), (b, sk, hk),
                                (b, sq, hq)))
    assert q.strides[-1] == 16
    kw = dict(causal=True, window_size=(7, -1), softcap=2.0,
              alibi_slopes=_slopes(rng, b, hq, False))
    out, lse = attention_numpy(q, k, v, block_q=8, block_k=8, **kw)
    cont = [np.ascontiguousarray(x) for x in (q, k, v, dout)]
    out_c, lse_c = attention_numpy(*cont[:3], block_q=8, block_k=8, **kw)
    np.testing.assert_array_equal(out, out_c)
    np.testing.assert_array_equal(lse, lse_c)
    assert out.flags.c_contiguous
    ref_out, _ = attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    grads = attention_backward_numpy(dout, q, k, v, out, lse, **kw)
    grads_c = attention_backward_numpy(cont[3], *cont[:3], out_c, lse_c, **kw)
    for g, gc in zip(grads, grads_c):
        np.testing.assert_array_equal(g, gc)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True),
    dict(window_size=(700, 300), softcap=5.0, alibi="head"),
], ids=["plain", "causal", "window-softcap-alibi"])
def test_numpy_default_tiles_many_key_blocks(kw):
    """Default tile sizes, with seqlen_k past one key block (online softmax
    across blocks, masked edge strips inside a block), match the reference."""
    rng = np.random.default_rng(14)
    b, sq, sk, hq, hk, d = 1, 300, 4500, 2, 1, 8
    q, k, v = _inputs(rng, b, sq, sk, hq, hk, d, np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    kw = _kwargs(kw, rng, b, hq)
    out, lse = attention_numpy(q, k, v, **kw)
    ref_out, ref_lse = attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    grads = attention_backward_numpy(dout, q, k, v, out, lse, **kw)
    ref = attention_backward_reference(dout, q, k, v, **kw)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=2e-4,
                                   atol=2e-4 * np.abs(r).max())


def test_numpy_memory_is_tiled():
    """At seqlen 4096 neither pass allocates anything near one head's score
    matrix (64 MiB in float32; the naive formula allocates several of them)."""
    import tracemalloc

    rng = np.random.default_rng(15)
    n, h, d = 4096, 2, 8
    q, k, v = _inputs(rng, 1, n, n, h, h, d, np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    one_head = n * n * 4
    # Plain, then the most buffers: softcap keeps tanh for the backward and
    # ALiBi needs a distance block and a bias temporary.
    for kw, bound in ((dict(), 24), (dict(softcap=3.0, alibi_slopes=np.full(
            h, 0.01, np.float32)), 48)):
        tracemalloc.start()
        try:
            out, lse = attention_numpy(q, k, v, **kw)
            fwd_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            attention_backward_numpy(dout, q, k, v, out, lse, **kw)
            bwd_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Tiles are at most 2M scores (8 MiB): the forward needs one (9 MiB
        # peak measured plain, 25 MiB with both), the backward two (18 MiB)
        # or three (42 MiB).
        assert bound * 2**20 < one_head
        assert fwd_peak < bound * 2**20, (kw, fwd_peak)
        assert bwd_peak < bound * 2**20, (kw, bwd_peak)
        assert np.isfinite(out).all()
