"""The Hopper backward kernel (bwd_sm90.cu) on a compute-capability-9.0 GPU: it is the kernel that runs,
its gradients pass the rule of test_backward.py as do the sm80 kernel's in the same process, deterministic
mode and views TMA cannot address take the sm80 kernel, the tiles are exact at every tail with GQA, and
the host mirrors of its parameter block and shared memory match the kernel. (test_backward.py runs its
whole grid through this kernel on Hopper as well.)"""

import pytest

from cuflash import dispatch, jit, ops

from gpu_helpers import loaded_families, run_sanitizer, skip_unless_hopper
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


def test_deterministic_and_broadcast_heads_use_sm80():
    """deterministic=True and stride-0 (broadcast) heads run the sm80 backward, exactly."""
    q, k, v = _inputs(2, 300, 300, 4, 1, 64, "float16", seed=7)
    jit._loaded.clear()
    _check(q, k, v, causal=True, deterministic=True)
    assert "bwd_sm90" not in loaded_families()
    jit._loaded.clear()
    _check(q, cp.broadcast_to(k, (2, 300, 4, 64)), cp.broadcast_to(v, (2, 300, 4, 64)))
    assert "bwd_sm90" not in loaded_families() and "bwd_sm80" in loaded_families()


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (63, 65), (129, 127), (191, 385), (385, 191), (1000, 1000)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_at_tails_with_gqa(sq, sk, d, causal):
    """Query tiles of 64 (hd128) or 128 (hd64) rows and 128-key CTAs: rows on both sides of every tile and
    warpgroup boundary are exact, sq != sk both ways, batch 3, three query heads per key/value head."""
    q, k, v = _inputs(3, sq, sk, 6, 2, d, "bfloat16", seed=sq + 7 * sk + d)
    jit._loaded.clear()
    _check(q, k, v, causal=causal)
    assert "bwd_sm90" in loaded_families()


def test_params_and_smem_formulas_match_sm90_kernel():
    """ops.py packs exactly sizeof(BackwardSm90Params) (five tensor maps), and dispatch's shared-memory formula and
    dQ reduction box match the kernel's, for both tile configurations."""
    from test_forward import _device_int
    for d in dispatch.BWD_SM90_TILES:
        key = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False)
        assert _device_int(key, "cf_bwd_sm90_params_bytes") == ops.sm90_params_bytes(5)
        assert _device_int(key, "cf_bwd_sm90_smem_bytes") == dispatch.backward_sm90_smem_bytes(key)
        assert _device_int(key, "cf_bwd_sm90_dq_box_cols") == dispatch.BWD_SM90_DQ_BOX[1]


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """compute-sanitizer finds no memory error (memcheck) and no shared-memory race (racecheck) in the
    Hopper backward at seqlens 1, 17 and 1000, both tile configurations, causal and not, GQA."""
    run_sanitizer("sanitize_backward_sm90.py", tool)
