"""cuflash.merge_attention_states on the GPU (cuflash/kvcache.py -> ops.merge_states -> merge_states.cu): the
merge of attention over disjoint key blocks equals attention over all keys under FlashAttention's rule
(fp16 / bf16, GQA, causal blocks that leave rows without keys); float32 states of many parts (more than one
launch takes, merged in rounds) equal the float64 CPU merge; a part's rows that saw no key (LSE +inf) are
never read, even when they hold NaN; strided views merge as contiguous ones; the parameter block the host
packs matches the kernel's."""

import numpy as np
import pytest

import cuflash
from cuflash import dispatch, ops, reference

from gpu_helpers import device_int, flash_rule, naive_same_dtype, np_dtype, to_device, to_host

pytestmark = pytest.mark.gpu


def test_parameter_block_matches_the_kernel():
    for key in dispatch.all_merge_states_keys():
        assert device_int(key, "cf_merge_params_bytes") == ops.MERGE_PARAMS.size
        assert device_int(key, "cf_merge_max_states") == dispatch.MERGE_MAX_STATES


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_merged_key_blocks_equal_attention_over_all_keys(dtype, causal):
    """Attention of q over three disjoint key blocks of 150, 1 and 300 keys (causal: the last block's own
    bottom-right mask is the global one there, the earlier blocks lie wholly before every query's diagonal),
    merged on the GPU, follows FlashAttention's rule against the float64 attention over all keys; its LSE
    equals the reference's."""
    rng = np.random.default_rng(4)
    b, sq, hq, hk, d = 2, 97, 4, 2, 64
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    kv = [rng.standard_normal((b, n, hk, d)).astype(np.float32) for n in (150, 1, 300) for _ in range(2)]
    ks, vs = kv[0::2], kv[1::2]
    dq = to_device(q.astype(np_dtype(dtype)))
    dk, dv = [to_device(k.astype(np_dtype(dtype))) for k in ks], [to_device(v.astype(np_dtype(dtype))) for v in vs]
    parts = [cuflash.attention(dq, k, v, causal=causal and i == 2, return_lse=True)
             for i, (k, v) in enumerate(zip(dk, dv))]
    out, lse = cuflash.merge_attention_states_list([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == dq.dtype and lse.dtype == np.float32
    k_all = np.concatenate([to_host(k).astype(np.float64) for k in dk], axis=1)
    v_all = np.concatenate([to_host(v).astype(np.float64) for v in dv], axis=1)
    q64 = to_host(dq).astype(np.float64)
    ref, ref_lse = reference.attention_reference(q64, k_all, v_all, causal=causal)
    import cupy
    base = naive_same_dtype(dq, cupy.concatenate(dk, axis=1), cupy.concatenate(dv, axis=1), causal=causal)
    flash_rule(to_host(out).astype(np.float64), ref, base)
    np.testing.assert_allclose(to_host(lse), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 16, 40])
def test_float32_states_equal_the_cpu_merge(n):
    """n float32 states (40: three launches of 16 into float32 states, then one) with random LSEs, some
    +inf (a part that saw no key, whose out rows hold NaN and must not be read) and one row +inf in every
    state: the GPU merge equals the float64 CPU merge to fp32 accuracy, the empty row 0 with LSE +inf."""
    import cupy
    rng = np.random.default_rng(n)
    b, s, h, d = 2, 5, 3, 40
    outs = [rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(n)]
    lses = [(rng.standard_normal((b, h, s)) * 3).astype(np.float32) for _ in range(n)]
    for i in range(0, n, 3):
        lses[i][0, 1, 2] = np.inf
        outs[i][0, 2, 1] = np.nan
    for x in lses:
        x[1, 2, 4] = np.inf
    for o in outs:
        o[1, 4, 2] = np.nan
    if n == 1:
        lses[0][0, 1, 2] = 0.5  # a lone state keeps its rows
        outs[0][0, 2, 1] = 1.0
    got, got_lse = cuflash.merge_attention_states_list([cupy.asarray(o) for o in outs], [cupy.asarray(x) for x in lses])
    want, want_lse = cuflash.merge_attention_states_list(outs, lses)
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(cupy.asnumpy(got_lse), want_lse, rtol=1e-6, atol=1e-5)
    assert np.all(cupy.asnumpy(got)[1, 4, 2] == 0) and cupy.asnumpy(got_lse)[1, 2, 4] == np.inf


def test_strided_views_and_torch_tensors():
    """States given as non-contiguous views (a transposed layout, every other column block) merge as their
    contiguous copies do, bit for bit; torch tensors come back as torch tensors of their dtype."""
    import cupy
    rng = np.random.default_rng(7)
    b, s, h, d = 2, 33, 4, 64
    wide = [cupy.asarray(rng.standard_normal((b, h, s, 2 * d)).astype(np.float16)) for _ in range(2)]
    views = [w.transpose(0, 2, 1, 3)[..., ::2] for w in wide]  # (b, s, h, d), strides (h s 2d, 2d, s 2d, 2)
    lses = [cupy.asarray(rng.standard_normal((b, s, h)).astype(np.float32)).transpose(0, 2, 1) for _ in range(2)]
    got, got_lse = cuflash.merge_attention_states(views[0], lses[0], views[1], lses[1])
    want, want_lse = cuflash.merge_attention_states(*(cupy.ascontiguousarray(x) for x in (views[0], lses[0], views[1],
                                                                                          lses[1])))
    assert bool(cupy.array_equal(got, want)) and bool(cupy.array_equal(got_lse, want_lse))
    torch = pytest.importorskip("torch")
    t = [torch.from_dlpack(x) for x in (views[0], lses[0], views[1], lses[1])]
    tout, tlse = cuflash.merge_attention_states(*t)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float16 and tout.is_cuda
    assert bool(cupy.array_equal(cupy.from_dlpack(tout), want))


def test_bad_states_raise_before_any_launch():
    import cupy
    o = cupy.zeros((1, 4, 2, 8), cupy.float16)
    x = cupy.zeros((1, 2, 4), cupy.float32)
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        cuflash.merge_attention_states(o, x, o[:, :3], x)
    with pytest.raises(ValueError, match=r"lses\[1\]"):
        cuflash.merge_attention_states(o, x, o, x.astype(cupy.float16))
    with pytest.raises(TypeError, match="outs\\[1\\] is a numpy array"):
        cuflash.merge_attention_states(o, x, np.zeros((1, 4, 2, 8), np.float16), x)
