"""Launch plans (cuflash/launch_plan.py), on the CPU: a plan is decided once per problem and reused whatever the
addresses; anything the launch depends on (layout, alignment, flags, device, the dispatch environment)
gives a different plan; the planned launches are the kernels, grids and parameter blocks dispatch implies.
Kernel functions are stubbed (nothing is loaded or launched here); the GPU tests run the real thing."""

import numpy as np
import pytest

from cuflash import dispatch, launch_plan, params_layout
from cuflash.arrays import DeviceArray


@pytest.fixture(autouse=True)
def stub_functions(monkeypatch):
    loaded = []

    def get_function(key, arch, device, smem):
        loaded.append((key.name, arch, device, smem))
        return ("fn", key.name)

    monkeypatch.setattr(launch_plan.jit, "get_function", get_function)
    monkeypatch.delenv(dispatch.FWD_KERNEL_ENV, raising=False)
    monkeypatch.delenv(dispatch.BWD_KERNEL_ENV, raising=False)
    monkeypatch.delenv("CUFLASH_FWD_TILES", raising=False)
    launch_plan._plans.clear()
    yield loaded
    launch_plan._plans.clear()


def _view(shape, ptr, dtype="bfloat16", strides=None):
    if strides is None:
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return DeviceArray(ptr, tuple(shape), tuple(strides), dtype, 0)


def _qkvo(base=0x10000, b=2, sq=300, sk=260, hq=8, hk=2, d=128):
    return (_view((b, sq, hq, d), base), _view((b, sk, hk, d), base + 0x1000000),
            _view((b, sk, hk, d), base + 0x2000000), _view((b, sq, hq, d), base + 0x3000000))


def _fwd(q, k, v, o, cc=(9, 0), **kw):
    args = dict(causal=True, window_size=(-1, -1), softmax_scale=0.125, softcap=0.0)
    args.update(kw)
    return launch_plan.forward(q, k, v, o, None, cc=cc, sm_count=132, **args)


def _block(launch):
    return np.frombuffer(launch.block, dtype=params_layout.DTYPE)[0]


def test_forward_plan_is_reused_for_new_addresses(stub_functions):
    """Same layout and flags at other (equally aligned) addresses: the same plan object, nothing reloaded."""
    first = _fwd(*_qkvo(base=0x10000))
    again = _fwd(*_qkvo(base=0x7770000))
    assert again is first and len(stub_functions) == 1


@pytest.mark.parametrize("change", ["seqlen", "stride", "alignment", "flags", "device_cc", "env"])
def test_forward_plan_changes_with_the_problem(change, monkeypatch):
    """Each thing the launch depends on besides addresses gives a new launch_plan."""
    base = _fwd(*_qkvo())
    q, k, v, o = _qkvo()
    kw = {}
    cc = (9, 0)
    if change == "seqlen":
        q, k, v, o = _qkvo(sq=301)
    elif change == "stride":  # a (b, h, s, d) tensor seen as (b, s, h, d)
        q = _view(q.shape, q.ptr, strides=(8 * 300 * 128, 128, 300 * 128, 1))
    elif change == "alignment":
        k = _view(k.shape, k.ptr + 8)
    elif change == "flags":
        kw = dict(softcap=30.0)
    elif change == "device_cc":
        cc = (8, 0)
    else:
        monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm80")
    other = _fwd(q, k, v, o, cc=cc, **kw)
    assert other is not base


def test_forward_plan_follows_dispatch():
    """Hopper, aligned contiguous views: the sm90 kernel with its four tensor maps; the dispatch environment
    selects the sm80 kernel (no maps, one CTA per tile); the block carries shapes, window and scales."""
    hopper = _fwd(*_qkvo())
    assert hopper.launch.fn[1].startswith("fwd_sm90") and [m[0] for m in hopper.launch.maps] == ["q", "k", "v", "o"]
    row = _block(hopper.launch)
    assert (row["batch"], row["seqlen_q"], row["seqlen_k"], row["heads_q"], row["heads_k"]) == (2, 300, 260, 8, 2)
    assert row["window_right"] == 0 and row["window_left"] == 560  # causal; left unbounded = seqlen_q + seqlen_k
    assert row["q"] == 0 and row["o"] == 0  # pointers are bound per call
    assert row["scale_log2"] == np.float32(0.125 * 1.4426950408889634)


def test_forward_plan_sm80_family(monkeypatch):
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, "sm80")
    q, k, v, o = _qkvo()
    p = _fwd(q, k, v, o)
    key = dispatch.forward_key("bf16", 128, is_local=True, softcap=False, alibi=False,
                               smem_limit=dispatch.max_smem(9, 0))
    assert p.launch.fn == ("fn", key.name) and p.launch.maps == () and not p.tile_counter
    assert p.launch.grid == -(-300 // key.block_m) * 2 * 8 and _block(p.launch)["num_m_blocks"] == -(-300 // key.block_m)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_plan_launches(deterministic):
    """Preprocess, the Hopper main kernel, postprocess; dQ accumulated in fp32 both ways, deterministic mode
    with the kernel's turn-counter variant and a (batch, heads_q, ceil(seqlen_q / 64)) counter array; delta
    borrows a contiguous dq; the main kernel's block carries its key-block count."""
    q, k, v, o = _qkvo()
    dout, dq, dk, dv = _view(q.shape, 0x9000000), _view(q.shape, 0xa000000), _view(k.shape, 0xb000000), \
        _view(k.shape, 0xc000000)
    bp = launch_plan.backward(dout, q, k, v, o, None, dq, dk, dv, causal=False, window_size=(-1, -1), softmax_scale=0.1,
                       softcap=0.0, deterministic=deterministic, cc=(9, 0))
    names = [launch.fn[1] for launch in bp.launches]
    assert names[0].startswith("bwd_prepost")
    assert names[1].startswith("bwd_sm90") and names[2].startswith("bwd_prepost")
    assert ("_det" in names[1]) == deterministic
    assert bp.dq_accum_shape == (2, 300, 8, 128) and bp.delta_in_dq
    assert bp.dq_semaphore_shape == ((2, 8, -(-300 // 64)) if deterministic else None)
    assert [m[0] for m in bp.launches[1].maps] == ["q", "k", "v", "dout", "dq_accum"]
    main = bp.launches[1]
    assert _block(main)["num_n_blocks"] == -(-260 // 128) and main.grid == -(-260 // 128) * 2 * 2
    assert launch_plan.backward(dout, q, k, v, o, None, dq, dk, dv, causal=False, window_size=(-1, -1), softmax_scale=0.1,
                         softcap=0.0, deterministic=deterministic, cc=(9, 0)) is bp


def test_deterministic_backward_plan_sm80(monkeypatch):
    """On the sm80 kernels deterministic mode replaces the accumulation and the postprocess by the Q-parallel
    dQ kernel: no accumulator, no counters, and delta gets its own workspace (dq is written before the end)."""
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, "sm80")
    q, k, v, o = _qkvo()
    dout, dq, dk, dv = _view(q.shape, 0x9000000), _view(q.shape, 0xa000000), _view(k.shape, 0xb000000), \
        _view(k.shape, 0xc000000)
    bp = launch_plan.backward(dout, q, k, v, o, None, dq, dk, dv, causal=True, window_size=(-1, 0), softmax_scale=0.1,
                       softcap=0.0, deterministic=True, cc=(9, 0))
    names = [launch.fn[1] for launch in bp.launches]
    assert names[1].startswith("bwd_sm80") and names[2].startswith("bwd_dq_sm80")
    assert bp.dq_accum_shape is None and bp.dq_semaphore_shape is None and not bp.delta_in_dq


@pytest.mark.parametrize("family", ["sm90", "sm80"])
def test_varlen_backward_plan(stub_functions, monkeypatch, family):
    """The variable-length backward plans the CF_VARLEN builds of the preprocess, the main kernel the dense
    backward would run (Hopper's with its five tensor maps on compute capability 9.0, sm80's under
    CUFLASH_BWD_KERNEL=sm80) and the postprocess; deterministic, the sm80 main kernel and the dQ kernel.
    Rows grids over max_seqlen_q, key blocks over max_seqlen_k per (sequence, head), zero batch strides, the
    (heads, total_q) LSE / delta layout and a (1, total_q, heads, d) dQ accumulator."""
    monkeypatch.setenv(dispatch.BWD_KERNEL_ENV, family)
    total_q, total_k, hq, hk, d = 1234, 987, 8, 2, 64
    views = [_view((1, t, h, d), base, strides=(0, h * d, d, 1))
             for t, h, base in ((total_q, hq, 0x10000), (total_q, hq, 0x1000000), (total_k, hk, 0x2000000),
                                (total_k, hk, 0x3000000), (total_q, hq, 0x4000000), (total_q, hq, 0x5000000),
                                (total_k, hk, 0x6000000), (total_k, hk, 0x7000000))]
    dout, q, k, v, o, dq, dk, dv = views
    bp = launch_plan.backward_varlen(dout, q, k, v, o, None, dq, dk, dv, batch=5, max_seqlen_q=700,
                                     max_seqlen_k=600, causal=True, window_size=(-1, -1), softmax_scale=0.1,
                                     softcap=0.0, deterministic=False, cc=(9, 0))
    names = [launch.fn[1] for launch in bp.launches]
    assert [n.split("_bf16")[0] for n in names] == ["bwd_prepost", f"bwd_{family}", "bwd_prepost"]
    assert all("varlen" in n for n in names)
    if family == "sm90":
        main = dispatch.backward_key_sm90("bf16", d, is_local=True, softcap=False, alibi=False, varlen=True)
        assert [m[0] for m in bp.launches[1].maps] == ["q", "k", "v", "dout", "dq_accum"]
    else:
        main = dispatch.backward_varlen_keys("bf16", d, is_local=True, softcap=False, alibi=False)[2]
        assert "_br64_" in names[1] and bp.launches[1].maps == ()
    assert names[1] == main.name
    assert bp.launches[0].grid == bp.launches[2].grid == -(-700 // 64) * 5 * hq
    assert bp.launches[1].grid == -(-600 // main.block_n) * 5 * hk
    blk = _block(bp.launches[1])
    assert (blk["batch"], blk["seqlen_q"], blk["seqlen_k"], blk["total_q"], blk["total_k"]) == (5, 700, 600,
                                                                                                total_q, total_k)
    assert all(blk[f"{n}_batch_stride"] == 0 for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv"))
    assert blk["varlen_lse_head_stride"] == total_q and blk["num_n_blocks"] == -(-600 // main.block_n)
    assert bp.dq_accum_shape == (1, total_q, hq, 64) and bp.dq_semaphore_shape is None and not bp.delta_in_dq
    det = launch_plan.backward_varlen(dout, q, k, v, o, None, dq, dk, dv, batch=5, max_seqlen_q=700,
                                      max_seqlen_k=600, causal=True, window_size=(-1, -1), softmax_scale=0.1,
                                      softcap=0.0, deterministic=True, cc=(9, 0))
    names = [launch.fn[1] for launch in det.launches]
    assert names[1].startswith("bwd_sm80") and "_det" in names[1]
    assert names[2].startswith("bwd_dq_sm80") and "varlen" in names[2]
    dq_key = dispatch.backward_varlen_keys("bf16", d, is_local=True, softcap=False, alibi=False, deterministic=True)[3]
    assert det.launches[2].grid == -(-700 // dq_key.block_m) * 5 * hq and det.dq_accum_shape is None


@pytest.mark.parametrize("family", ["sm90", "sm80"])
def test_varlen_forward_plan(stub_functions, monkeypatch, family):
    """The variable-length forward plans the CF_VARLEN build of the forward the dense call would run (the
    Hopper kernel on compute capability 9.0 with its four packed tensor maps and the tile counter, the sm80
    kernel under CUFLASH_FWD_KERNEL=sm80 and elsewhere), work tiles of ceil(max_seqlen_q / block_m) query
    blocks per (sequence, head), the max_seqlen bounds and the packed totals, zero batch strides (rows come
    from cu_seqlens) and the (heads, total_q) LSE layout."""
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, family)
    total_q, total_k, hq, hk, d = 1234, 987, 8, 2, 128
    q = _view((1, total_q, hq, d), 0x10000, strides=(0, hq * d, d, 1))
    k = _view((1, total_k, hk, d), 0x2000000, strides=(0, hk * d, d, 1))
    v = _view((1, total_k, hk, d), 0x3000000, strides=(0, hk * d, d, 1))
    o = _view((1, total_q, hq, d), 0x4000000, strides=(0, hq * d, d, 1))
    fp = launch_plan.forward_varlen(q, k, v, o, None, batch=5, max_seqlen_q=700, max_seqlen_k=600, causal=True,
                                    window_size=(-1, -1), softmax_scale=0.1, softcap=0.0, cc=(9, 0), sm_count=132)
    key_name = stub_functions[-1][0]
    assert key_name.startswith(f"fwd_{family}_bf16_d128_local") and "varlen" in key_name
    if family == "sm90":
        kkey = dispatch.forward_key_sm90("bf16", d, is_local=True, softcap=False, alibi=False, varlen=True)
        tiles = -(-700 // kkey.block_m) * 5 * hq
        # More tiles than SMs: one persistent CTA per SM, taking tiles from the counter.
        assert tiles > 132 and fp.launch.grid == 132 and fp.tile_counter
        assert [m[0] for m in fp.launch.maps] == ["q", "k", "v", "o"] and _block(fp.launch)["bh_group"] >= 1
    else:
        kkey = dispatch.forward_key("bf16", d, is_local=True, softcap=False, alibi=False, varlen=True)
        assert fp.launch.grid == -(-700 // kkey.block_m) * 5 * hq and fp.launch.maps == ()
        assert not fp.tile_counter
    blk = _block(fp.launch)
    assert blk["num_m_blocks"] == -(-700 // kkey.block_m)
    assert (blk["batch"], blk["seqlen_q"], blk["seqlen_k"], blk["total_q"], blk["total_k"]) == (5, 700, 600,
                                                                                                total_q, total_k)
    assert blk["q_batch_stride"] == blk["k_batch_stride"] == blk["o_batch_stride"] == 0
    assert blk["varlen_lse_head_stride"] == total_q and blk["q_row_stride"] == hq * d
    dense = _block(_fwd(*_qkvo(b=2, sq=300, sk=260, hq=8)).launch)
    assert (dense["total_q"], dense["total_k"]) == (300, 260)


@pytest.mark.parametrize("family,d", [("sm90", 128), ("sm90", 256), ("sm80", 128)])
def test_split_kv_varlen_plan(stub_functions, monkeypatch, family, d):
    """A split-KV plan (decoding): on Hopper, head dims with the Hopper split build run it with (query tile,
    split) work tiles of persistent CTAs (gridDim.y 1, the split count in the parameter block); head dim 256
    and CUFLASH_FWD_KERNEL=sm80 run the sm80 split build with the splits on gridDim.y. Both get the fp32
    partial-state shapes, query i of sequence b at row b * max_seqlen_q + i."""
    monkeypatch.setenv(dispatch.FWD_KERNEL_ENV, family)
    batch, groups, hk, splits = 8, 4, 8, 5
    total_q = (batch - 1) * groups * hk + groups
    q = _view((1, total_q, hk, d), 0x10000, strides=(0, d, groups * d, 1))
    k = _view((1, batch * 4096, hk, d), 0x2000000, strides=(0, hk * d, d, 1))
    v = _view((1, batch * 4096, hk, d), 0x3000000, strides=(0, hk * d, d, 1))
    o = _view((1, total_q, hk, d), 0x4000000, strides=(0, d, groups * d, 1))
    fp = launch_plan.forward_varlen(q, k, v, o, None, batch=batch, max_seqlen_q=groups, max_seqlen_k=4096,
                                    causal=False, window_size=(-1, -1), softmax_scale=0.1, softcap=0.0, cc=(9, 0),
                                    sm_count=132, num_splits=splits)
    key_name = stub_functions[-1][0]
    hopper = family == "sm90" and d in dispatch.FWD_SM90_SPLIT_KV_HEAD_DIMS
    assert key_name.startswith("fwd_sm90" if hopper else "fwd_sm80") and "splitkv" in key_name
    assert _block(fp.launch)["num_splits"] == splits
    if hopper:
        assert fp.launch.splits == 1 and fp.launch.grid == 132 and fp.tile_counter  # 320 work tiles
    else:
        assert fp.launch.splits == splits and fp.launch.grid == batch * hk
    assert fp.accum_shapes == ((splits, batch * groups, hk, d), (splits, hk, batch * groups))


@pytest.mark.parametrize("page_size,shift,box", [(16, 4, None), (1, 0, None), (256, 8, 128), (3, -1, None),
                                                  (48, -1, None), (32, 5, 32), (64, 6, 64)])
@pytest.mark.parametrize("cc", [(9, 0), (8, 0)])
def test_paged_plan_page_shift(stub_functions, page_size, shift, box, cc):
    """A paged plan carries the page geometry in the parameter block, and a power-of-two page size also as its
    log2 (rows split into pages by a shift and a mask, not a division); other sizes pass -1. On Hopper,
    power-of-two pages of 32 rows or more run the Hopper kernel's paged build with K / V tensor-map boxes of
    min(page, key tile) rows (``box``), other sizes its row-gather build (K / V maps of whole tiles, unused);
    on an A100 every size runs the sm80 paged build."""
    batch, hk, d, max_pages = 4, 2, 128, 8
    q = _view((1, batch, 8, d), 0x10000, strides=(0, 8 * d, d, 1))
    k = _view((1, 40 * page_size, hk, d), 0x2000000, strides=(0, hk * d, d, 1))
    v = _view((1, 40 * page_size, hk, d), 0x3000000, strides=(0, hk * d, d, 1))
    o = _view((1, batch, 8, d), 0x4000000, strides=(0, 8 * d, d, 1))
    fp = launch_plan.forward_varlen(q, k, v, o, None, batch=batch, max_seqlen_q=1, max_seqlen_k=max_pages * page_size,
                                    causal=False, window_size=(-1, -1), softmax_scale=0.1, softcap=0.0, cc=cc,
                                    sm_count=132, paged=(page_size, 40, max_pages))
    block = _block(fp.launch)
    name = stub_functions[-1][0]
    assert "paged" in name
    assert (block["page_size"], block["num_pages"], block["page_shift"]) == (page_size, 40, shift)
    if cc == (8, 0):
        assert name.startswith("fwd_sm80") and fp.launch.maps == ()
    elif box is None:
        assert name.startswith("fwd_sm90") and "gather" in name
        assert dict(fp.launch.maps)["k"] == dict(fp.launch.maps)["v"] == 128
    else:
        assert name.startswith("fwd_sm90") and "gather" not in name
        assert dict(fp.launch.maps)["k"] == dict(fp.launch.maps)["v"] == box


@pytest.mark.parametrize("cc", [(9, 0), (8, 0)])
def test_dropout_plans_carry_threshold_and_scale(stub_functions, cc):
    """A dropout forward plan runs the forward kernel's dropout build (Hopper's on Hopper), a dropout backward
    plan the Hopper backward's dropout build on Hopper (deterministic too: its dQ turns) and the sm80 dropout
    builds elsewhere (deterministic: the dQ kernel's too); every launch's block holds round((1 - p) * 65536)
    and 1 / (1 - p), and p is part of the plan's key."""
    q, k, v, o = _qkvo()
    fp = _fwd(q, k, v, o, cc=cc, dropout_p=0.25)
    assert "dropout" in stub_functions[-1][0]
    assert stub_functions[-1][0].startswith("fwd_sm90" if cc == (9, 0) else "fwd_sm80")
    assert (_block(fp.launch)["dropout_threshold"], _block(fp.launch)["dropout_scale"]) == (49152, np.float32(1 / 0.75))
    assert _fwd(q, k, v, o, cc=cc, dropout_p=0.5) is not fp and _fwd(q, k, v, o, cc=cc) is not fp
    dout, dq, dk, dv = (_view(x.shape, 0x9000000 + i * 0x1000000) for i, x in enumerate((q, q, k, v)))
    for det in (False, True):
        bp = launch_plan.backward(dout, q, k, v, o, None, dq, dk, dv, causal=False, window_size=(-1, -1),
                                  softmax_scale=0.1, softcap=0.0, deterministic=det, cc=cc, dropout_p=0.25)
        names = [launch.fn[1] for launch in bp.launches]
        assert names[1].startswith("bwd_sm90" if cc == (9, 0) else "bwd_sm80") and "dropout" in names[1]
        assert ("det" in names[1]) == det
        assert ("dropout" in names[2]) == (det and cc != (9, 0))  # the sm80 dQ kernel, or the postprocess
        for launch in bp.launches:
            assert _block(launch)["dropout_threshold"] == 49152
