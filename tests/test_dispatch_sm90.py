"""Hopper kernel selection without a GPU: which forward kernel a compute capability gets, the switch back
to the sm80 kernel, the tensor-map eligibility of array views, and the L2 launch-order groups."""

import pytest

from cuflash import dispatch, tma
from cuflash.arrays import DeviceArray


def _view(shape, strides, ptr=1 << 20, dtype="bfloat16"):
    return DeviceArray(ptr=ptr, shape=shape, strides=strides, dtype=dtype, device=0)


def test_hopper_gets_the_sm90_kernel_and_others_sm80(monkeypatch):
    """CC 9.0 runs fwd_sm90 by default; CUFLASH_FWD_KERNEL=sm80 switches back; other GPUs ignore it."""
    monkeypatch.delenv(dispatch.FWD_KERNEL_ENV, raising=False)
    assert dispatch.forward_family((9, 0)) == "fwd_sm90"
    assert dispatch.forward_family((8, 0)) == "fwd_sm80"
    assert dispatch.forward_family((12, 0)) == "fwd_sm80"
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm80")
    assert dispatch.forward_family((9, 0)) == "fwd_sm80"
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm90")
    assert dispatch.forward_family((8, 6)) == "fwd_sm80"


def test_bad_kernel_choice_is_named(monkeypatch):
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "hopper")
    with pytest.raises(ValueError, match="CUFLASH_FWD_KERNEL"):
        dispatch.forward_family((9, 0))


@pytest.mark.parametrize("d", [8, 64, 96, 128, 160, 192, 256])
def test_sm90_keys_fit_hopper_shared_memory(d):
    """Every Hopper variant's tiles fit the 227 KB a CTA may use, and build only for sm_90a."""
    for softcap in (False, True):
        key = dispatch.forward_key_sm90("bf16", d, is_local=True, softcap=softcap, alibi=True)
        assert key.head_dim == dispatch.padded_head_dim(d)
        assert dispatch.forward_sm90_smem_bytes(key) <= dispatch.MAX_SMEM[(9, 0)]
        assert key.archs == ("sm_90a",) and key.threads == 128 + 2 * key.block_m


def test_tma_accepts_common_layouts():
    """(b, s, h, d) contiguous, (b, h, s, d) transposed and size-1 dims with odd strides are expressible."""
    b, s, h, d = 2, 1000, 8, 128
    assert tma.supports(_view((b, s, h, d), (s * h * d, h * d, d, 1)))
    assert tma.supports(_view((b, s, h, d), (h * s * d, d, s * d, 1)))
    assert tma.supports(_view((1, s, 1, 72), (0, 72, 5, 1)))  # strides of length-1 dims are never used


def test_tma_rejects_what_it_cannot_address():
    """Broadcast heads (stride 0), strides off 16 bytes, misaligned pointers and fp32 go to the sm80 kernel."""
    assert not tma.supports(_view((2, 100, 8, 64), (100 * 64, 64, 0, 1)))
    assert not tma.supports(_view((2, 100, 8, 60), (100 * 8 * 60, 8 * 60, 60, 1)))  # 120-byte head stride
    assert not tma.supports(_view((2, 100, 8, 64), (51200, 512, 64, 1), ptr=(1 << 20) + 8))
    assert not tma.supports(_view((2, 100, 8, 64), (51200, 512, 64, 1), dtype="float32"))


@pytest.mark.parametrize("bh,seqlen_k,d", [(128, 2048, 128), (16, 16384, 128), (16, 16384, 256), (3, 17, 64)])
def test_launch_groups_keep_kv_within_budget(bh, seqlen_k, d):
    """A launch-order group holds at least one (batch, head) pair and, when it holds more, its K/V fit the
    L2 budget; never more pairs than exist."""
    g = dispatch.launch_group(bh, seqlen_k, d)
    assert 1 <= g <= bh
    assert g == 1 or g * 4 * seqlen_k * d <= dispatch.L2_GROUP_BYTES


def test_launch_schedules():
    """Unmasked calls up to 8k keys: one CTA per SM on a static stride; causal/window up to 2k keys: one CTA
    per SM on the tile counter; longer calls, head dim 256 and grids smaller than the GPU: one CTA per tile."""
    def key(d, local):
        return dispatch.forward_key_sm90("bf16", d, is_local=local, softcap=False, alibi=False)
    sched = dispatch.forward_sm90_schedule
    assert sched(key(128, False), 2048, 2048, 132) == (132, False)
    assert sched(key(64, False), 2048, 8192, 132) == (132, False)
    assert sched(key(128, False), 2048, 16384, 132) == (2048, False)
    assert sched(key(128, True), 2048, 2048, 132) == (132, True)
    assert sched(key(64, True), 2048, 4096, 132) == (2048, False)
    assert sched(key(128, False), 100, 2048, 132) == (100, False)
    assert sched(key(256, False), 2048, 2048, 132) == (2048, False)


def test_varlen_launch_schedule():
    """A variable-length forward with more tiles than SMs runs one CTA per SM on the tile counter at every
    max_seqlen_k, causal or not (the static order's slots are mostly tiles past short sequences); head dim
    256 and grids smaller than the GPU run one CTA per tile."""
    def key(d, local):
        return dispatch.forward_key_sm90("bf16", d, is_local=local, softcap=False, alibi=False, varlen=True)
    sched = dispatch.forward_sm90_varlen_schedule
    for local in (False, True):
        assert sched(key(128, local), 4928, 132) == (132, True)
        assert sched(key(64, local), 133, 132) == (132, True)
        assert sched(key(128, local), 100, 132) == (100, False)
        assert sched(key(256, local), 4928, 132) == (4928, False)


def test_hopper_backward_selection(monkeypatch):
    """CC 9.0 runs bwd_sm90 at every head dim, deterministic mode included (a variant of its own);
    CUFLASH_BWD_KERNEL=sm80 switches back; other GPUs, and element-mask calls at head dims 192/256 (which have
    no Hopper build), run bwd_sm80."""
    monkeypatch.delenv(dispatch.BWD_KERNEL_ENV, raising=False)
    for d in (8, 64, 96, 128, 160, 192, 256):
        assert dispatch.backward_family((9, 0), d, False) == "bwd_sm90"
        assert dispatch.backward_family((9, 0), d, True) == "bwd_sm90"
        assert dispatch.backward_family((8, 0), d, False) == "bwd_sm80"
        assert dispatch.backward_family((8, 0), d, True) == "bwd_sm80"
        det = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False, deterministic=True)
        plain = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False)
        assert ("CF_DETERMINISTIC", 1) in det.extra and det.name != plain.name
        wide = dispatch.padded_head_dim(d) > 128
        assert dispatch.backward_family((9, 0), d, False, attn_mask=True) == ("bwd_sm80" if wide else "bwd_sm90")
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, "sm80")
    assert dispatch.backward_family((9, 0), 128, False) == "bwd_sm80"
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, "wgmma")
    with pytest.raises(ValueError, match="CUFLASH_BWD_KERNEL"):
        dispatch.backward_family((9, 0), 128, False)


@pytest.mark.parametrize("d", [8, 64, 96, 128, 160, 192, 256])
def test_sm90_backward_keys_fit_hopper_shared_memory(d):
    """Every Hopper backward variant fits the 227 KB a CTA may use, builds only for sm_90a, and runs a
    producer plus two consumer warpgroups over 128 keys (64 at head dims 192/256, which have variable-length
    builds but no element-mask one)."""
    wide = dispatch.padded_head_dim(d) > 128
    for local in (False, True):
        for det in (False, True):
            for build in (dict(deterministic=det, dropout=True), dict(varlen=True)):
                key = dispatch.backward_key_sm90("fp16", d, is_local=local, softcap=True, alibi=True, **build)
                assert key.head_dim == dispatch.padded_head_dim(d)
                assert dispatch.backward_sm90_smem_bytes(key) <= dispatch.MAX_SMEM[(9, 0)]
                assert key.archs == ("sm_90a",) and key.threads == 384 and key.block_n == (64 if wide else 128)
    varlen_softcap = dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=True, alibi=False, varlen=True)
    assert varlen_softcap.ptxas_opt == (1 if dispatch.padded_head_dim(d) == 256 else 3)  # -O3 spilled there
    if wide:
        with pytest.raises(AssertionError):
            dispatch.backward_key_sm90("bf16", d, is_local=False, softcap=False, alibi=False, attn_mask=1)
        assert dispatch.block_sparse_tiles(d, True) is None


def test_hopper_backward_dropout_builds_and_their_ptxas_level():
    """The Hopper backward's dropout builds (CF_DROPOUT) are listed for sm_90a, deterministic ones too, and take
    ptxas -O1 exactly where -O3 spilled on sm_90a (head dim 64, and ALiBi at 128: bench/NOTES.md); the
    element-mask and variable-length builds refuse dropout."""
    keys = [k for k in dispatch.keys_for_arch("sm_90a") if k.family == "bwd_sm90" and ("CF_DROPOUT", 1) in k.extra]
    assert len(keys) == 2 * 4 * 2 * 2 * 2 * 2  # dtypes x head dims x local x softcap x alibi x deterministic
    for k in keys:
        assert k.ptxas_opt == (1 if k.head_dim == 64 or k.alibi else 3), k.name
    plain = dispatch.backward_key_sm90("bf16", 128, is_local=False, softcap=False, alibi=False)
    assert plain.ptxas_opt == 3 and ("CF_DROPOUT", 1) not in plain.extra
    with pytest.raises(AssertionError):
        dispatch.backward_key_sm90("bf16", 128, is_local=False, softcap=False, alibi=False, attn_mask=1, dropout=True)
    with pytest.raises(AssertionError):
        dispatch.backward_key_sm90("bf16", 128, is_local=False, softcap=False, alibi=False, varlen=True, dropout=True)
