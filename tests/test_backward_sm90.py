"""The Hopper backward kernel (bwd_sm90.cu) on a compute-capability-9.0 GPU: it is the kernel that runs,
its gradients pass the rule of test_backward.py as do the sm80 kernel's in the same process, deterministic
mode runs it too (exact, bitwise repeatable, deadlock-free many waves deep), views TMA cannot address take
the sm80 kernel, the tiles are exact at every tail with GQA, and
the host mirrors of its parameter block and shared memory match the kernel. (test_backward.py runs its
whole grid through this kernel on Hopper as well.)"""

import pytest

import cuflash
from cuflash import dispatch, jit, ops

from gpu_helpers import loaded_families, randn_like, raw_words, run_sanitizer, skip_unless_hopper, synchronize
from test_backward import _check, _inputs, cp

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _hopper_only():
    skip_unless_hopper()


@pytest.mark.parametrize("d", [64, 128])
def test_sm90_and_sm80_backward_in_one_process(monkeypatch, d):
    """Both main kernels are selectable in one run (CUFLASH_BWD_KERNEL) and both pass the gradient rule."""
    q, k, v = _inputs(2, 1000, 777, 4, 2, d, "bfloat16", seed=d)
    for choice in ("sm90", "sm80"):
        jit._loaded.clear()
        monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, choice)
        _check(q, k, v, causal=True)
        assert f"bwd_{choice}" in loaded_families()


def test_broadcast_heads_use_sm80():
    """Stride-0 (broadcast) heads, which TMA cannot address, run the sm80 backward, exactly."""
    q, k, v = _inputs(2, 300, 300, 4, 1, 64, "float16", seed=7)
    jit._loaded.clear()
    _check(q, cp.broadcast_to(k, (2, 300, 4, 64)), cp.broadcast_to(v, (2, 300, 4, 64)))
    assert "bwd_sm90" not in loaded_families() and "bwd_sm80" in loaded_families()


@pytest.mark.parametrize("d", [64, 128, 192, 256])
@pytest.mark.parametrize("mask", [{}, {"causal": True}, {"window_size": (300, 40)}])
def test_deterministic_hopper_exact_and_bitwise_repeatable(d, mask):
    """deterministic=True runs the Hopper kernel (its CTAs add into dQ in turns): gradients pass the rule with
    GQA and tails on both sides, 20 repeats are bitwise identical, and dK / dV (never accumulated across
    CTAs) equal the default mode's bit for bit."""
    q, k, v = _inputs(2, 1100, 900, 6, 2, d, "bfloat16", seed=d + len(mask))
    jit._loaded.clear()
    _check(q, k, v, deterministic=True, **mask)
    assert "bwd_sm90" in loaded_families() and "bwd_dq_sm80" not in loaded_families()
    out, lse = cuflash.attention(q, k, v, return_lse=True, **mask)
    dout = randn_like(out, seed=d)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **mask)
    for _ in range(20):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **mask)
        for a, b in zip(first, again):
            assert bool(cp.array_equal(raw_words(a), raw_words(b)))
    default = cuflash.attention_backward(dout, q, k, v, out, lse, **mask)
    for a, b in zip(first[1:], default[1:]):
        assert bool(cp.array_equal(raw_words(a), raw_words(b)))


@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_hopper_many_waves(causal):
    """A grid many waves deep (16k keys: 128 key blocks a head, 16 heads, about 15 waves on 132 SMs) finishes,
    since a CTA only waits on CTAs launched before it, and repeats bitwise; its dQ differs from the
    default mode's only by the order of fp32 additions."""
    q, k, v = _inputs(1, 16384, 16384, 16, 16, 128, "bfloat16", seed=5)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = randn_like(out, seed=6)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=True)
    again = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=True)
    default = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    synchronize()
    for a, b in zip(first, again):
        assert bool(cp.array_equal(raw_words(a), raw_words(b)))
    dq, dq_default = first[0].astype(cp.float32), default[0].astype(cp.float32)
    assert float(cp.abs(dq - dq_default).max()) <= 2 ** -6 * float(cp.abs(dq_default).max())


def test_deterministic_sm80_kernels_on_hopper(monkeypatch):
    """CUFLASH_BWD_KERNEL=sm80 keeps the A100 path's deterministic mode (Q-parallel dQ kernel) exact here."""
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, "sm80")
    q, k, v = _inputs(2, 300, 300, 4, 1, 64, "float16", seed=7)
    jit._loaded.clear()
    _check(q, k, v, causal=True, deterministic=True)
    assert "bwd_dq_sm80" in loaded_families() and "bwd_sm90" not in loaded_families()


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (63, 65), (129, 127), (191, 385), (385, 191), (1000, 1000)])
@pytest.mark.parametrize("d", [64, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_at_tails_with_gqa(sq, sk, d, causal):
    """Query tiles of 64 (hd128, hd160/256) or 128 (hd64) rows and 128-key (64 at hd160/256) CTAs: rows on both
    sides of every tile and warpgroup boundary are exact, sq != sk both ways, batch 3, three query heads per
    key/value head; head dim 160 runs the hd192 build with TMA's zero columns."""
    q, k, v = _inputs(3, sq, sk, 6, 2, d, "bfloat16", seed=sq + 7 * sk + d)
    jit._loaded.clear()
    _check(q, k, v, causal=causal)
    assert "bwd_sm90" in loaded_families()


def test_params_and_smem_formulas_match_sm90_kernel():
    """ops.py packs exactly sizeof(BackwardSm90Params) (five tensor maps), and dispatch's shared-memory formula and
    dQ reduction box match the kernel's, for every tile configuration and the staged-mask build."""
    from gpu_helpers import device_int
    for d in dispatch.BWD_SM90_TILES:
        key = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False)
        assert device_int(key, "cf_bwd_sm90_params_bytes") == ops.sm90_params_bytes(5)
        assert device_int(key, "cf_bwd_sm90_smem_bytes") == dispatch.backward_sm90_smem_bytes(key)
        if d not in dispatch.BWD_SM90_WIDE:
            staged = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False, attn_mask=1,
                                                mask_stage=True)
            assert device_int(staged, "cf_bwd_sm90_smem_bytes") == dispatch.backward_sm90_smem_bytes(staged)
        assert device_int(key, "cf_bwd_sm90_dq_box_cols") == dispatch.BWD_SM90_DQ_BOX[1]
        assert device_int(key, "cf_dq_turn_rows") == dispatch.BWD_SM90_DQ_TURN_ROWS == dispatch.BWD_PREPOST_ROWS


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the
    Hopper backward at seqlens 1, 17 and 1000, every tile configuration (head dims 64, 128, 192, 256), causal and
    not, GQA, deterministic and with dropout."""
    run_sanitizer("sanitize_backward_sm90.py", tool)


@pytest.mark.parametrize("d", [192, 256])
def test_wide_head_dims_score_mods(d):
    """Head dims 192 / 256 (bwd_sm90_wide.cuh): softcap, ALiBi with causal, a window with softcap and ALiBi, and
    both dtypes pass the rule on the Hopper kernel (test_varlen_gpu.py runs its variable-length build)."""
    from gpu_helpers import rand_slopes, scaled
    for dtype in ("float16", "bfloat16"):
        q, k, v = _inputs(2, 257, 300, 4, 2, d, dtype, seed=d)
        q = scaled(q, 2)
        slopes = rand_slopes((2, 4), seed=d + 1)
        jit._loaded.clear()
        _check(q, k, v, softcap=6.0)
        _check(q, k, v, alibi_slopes=slopes[0], causal=True)
        _check(q, k, v, softcap=4.0, alibi_slopes=slopes, window_size=(40, 20))
        assert "bwd_sm90" in loaded_families() and "bwd_sm80" not in loaded_families()
