"""The variable-length forward on the GPU (cuflash/varlen.py -> ops.forward_varlen -> the sm80 forward built
with CF_VARLEN, seq_context.cuh): every packed sequence equals the float64 reference of that sequence alone
under FlashAttention's rule (its same-dtype naive error x 2), with lengths 0, 1, 17, 1000, seqlen_q != seqlen_k,
causal, windows, softcap, ALiBi shared and per sequence, GQA, fp16 / bf16 and an odd head dim; NaN stored in
the rows no sequence covers never reaches an output, which are zeros with LSE +inf there; seqused shortens
sequences; the backward raises NotImplementedError (CPU path only so far)."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import flash_rule, naive_same_dtype, np_dtype, to_device, to_host

pytestmark = pytest.mark.gpu

LENS_Q = [17, 0, 1, 1000, 33, 128]
LENS_K = [20, 5, 0, 1000, 40, 300]


def _packed(dtype, hq=4, hk=2, d=64, seed=0, spare=5):
    rng = np.random.default_rng(seed)
    tq, tk = sum(LENS_Q) + spare, sum(LENS_K) + spare
    host = [rng.standard_normal(s).astype(np.float32) for s in ((tq, hq, d), (tk, hk, d), (tk, hk, d))]
    for x in host:
        x[-spare:] = np.nan  # rows past the last sequence: must never be read
    cu_q = np.concatenate([[0], np.cumsum(LENS_Q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(LENS_K)]).astype(np.int32)
    dev = [to_device(x.astype(np_dtype(dtype))) for x in host]
    return host, dev, cu_q, cu_k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 72])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(50, 10), softcap=5.0),
                                  dict(alibi="shared"), dict(alibi="per_sequence", causal=True)])
def test_each_sequence_follows_flash_rule(dtype, d, opts):
    import cupy
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    host, (q, k, v), cu_q, cu_k = _packed(dtype, d=d)
    slopes = None
    if alibi == "shared":
        slopes = np.linspace(0.05, 0.3, 4).astype(np.float32)
    elif alibi == "per_sequence":
        slopes = np.random.default_rng(3).random((len(LENS_Q), 4)).astype(np.float32) * 0.3
    out, lse = cuflash.attention_varlen(q, k, v, cupy.asarray(cu_q), cupy.asarray(cu_k), max(LENS_Q), max(LENS_K),
                                        alibi_slopes=None if slopes is None else cupy.asarray(slopes),
                                        return_lse=True, **opts)
    out, lse = to_host(out).astype(np.float64), to_host(lse)
    qh, kh, vh = (to_host(x).astype(np.float64) for x in (q, k, v))
    assert out.shape == qh.shape and lse.shape == (4, qh.shape[0])
    for i in range(len(LENS_Q)):
        rq, rk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        row = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i])
        ref_out, ref_lse = reference.attention_reference(qh[None, rq], kh[None, rk], vh[None, rk], alibi_slopes=row,
                                                         **opts)
        if LENS_Q[i] and LENS_K[i]:
            base = naive_same_dtype(q[int(cu_q[i]):int(cu_q[i + 1])][None], k[int(cu_k[i]):int(cu_k[i + 1])][None],
                                    v[int(cu_k[i]):int(cu_k[i + 1])][None], alibi_slopes=row, **opts)
            flash_rule(out[None, rq], ref_out, base)
        else:
            assert np.all(out[rq] == 0)
        fin = np.isfinite(ref_lse[0])
        np.testing.assert_array_equal(np.isinf(lse[:, rq]), ~fin)
        np.testing.assert_allclose(lse[:, rq][fin], ref_lse[0][fin], rtol=1e-4, atol=1e-4)
    assert np.all(out[cu_q[-1]:] == 0) and np.all(lse[:, cu_q[-1]:] == np.inf)


def test_seqused_and_backward_not_implemented():
    import cupy
    host, (q, k, v), cu_q, cu_k = _packed("float16")
    used_q = np.array([10, 0, 1, 500, 33, 1], np.int32)
    used_k = np.array([20, 5, 0, 999, 1, 300], np.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cupy.asarray(cu_q), cupy.asarray(cu_k), 1000, 1000, causal=True,
                                        seqused_q=cupy.asarray(used_q), seqused_k=cupy.asarray(used_k),
                                        return_lse=True)
    want, want_lse = cuflash.attention_varlen(*(to_host(x).astype(np.float32) for x in (q, k, v)), cu_q, cu_k,
                                              1000, 1000, causal=True, seqused_q=used_q, seqused_k=used_k,
                                              return_lse=True)
    np.testing.assert_allclose(to_host(out).astype(np.float32), want, atol=2e-3)
    np.testing.assert_array_equal(np.isinf(to_host(lse)), np.isinf(want_lse))
    with pytest.raises(NotImplementedError, match="variable-length backward"):
        cuflash.attention_varlen_backward(out, q, k, v, out, lse, cupy.asarray(cu_q), cupy.asarray(cu_k), 1000, 1000)
