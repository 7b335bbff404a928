"""Every shipped kernel variant compiles with NVRTC for sm_80 and sm_90a (no GPU needed), uses no local
memory spills, and the JIT cache behaves: one compile per variant, reused across processes, and a miss
turns into an error under CUFLASH_NO_COMPILE."""

import os
import subprocess
import sys

import pytest
from gpu_helpers import nvrtc_available

nvrtc_ok = nvrtc_available()

pytestmark = pytest.mark.skipif(not nvrtc_ok, reason="CuPy with NVRTC is not installed")

from cuflash import dispatch, jit  # noqa: E402


_TARGETS = [(k, arch) for k in dispatch.all_keys() for arch in k.archs]


@pytest.mark.parametrize("key,arch", _TARGETS, ids=[f"{k.name}-{a}" for k, a in _TARGETS])
def test_variant_compiles_without_spills(key, arch):
    """NVRTC accepts the variant for each architecture it ships for (sm_80 and sm_90a; the wgmma kernels
    sm_90a only), ptxas reports no spill beyond the variant's measured allowance (zero for all but some
    head-dim-64 Hopper backward builds, dispatch.allowed_spill_bytes) and does not serialize wgmma."""
    cubin, log = jit.compile_cubin(key, arch)
    assert cubin[:4] == b"\x7fELF"
    assert jit.spill_bytes(log) <= dispatch.allowed_spill_bytes(key), f"{key.name} for {arch} spills:\n{log}"
    # ptxas serializes wgmma (each one waits for the previous) when it must insert a warpgroup fence on a
    # divergent path itself: a silent slowdown, so a missing wgmma::fence() fails here.
    assert "instructions are serialized" not in log, f"{key.name}: wgmma serialized by ptxas:\n{log}"


def test_disk_cache_reused_across_processes(tmp_path):
    """A variant compiled once is loaded from the disk cache by a new process, which compiles nothing."""
    env = dict(os.environ, CUFLASH_CACHE_DIR=str(tmp_path))
    key = dispatch.all_forward_keys()[0]
    code = ("import cuflash, sys; from cuflash import jit; "
            "print(jit.cubin_for(jit.all_variants()[0], 'sm_80')[:4]); print(jit.cached_variants())")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert f"{key.name}@sm_80" in first.stdout
    env["CUFLASH_NO_COMPILE"] = "1"  # the second process must not need the compiler
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert f"{key.name}@sm_80" in second.stdout


def test_no_compile_switch_turns_miss_into_error(tmp_path, monkeypatch):
    """With CUFLASH_NO_COMPILE=1 and an empty cache, asking for a variant raises naming the variant."""
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CUFLASH_NO_COMPILE", "1")
    key = dispatch.all_forward_keys()[0]
    with pytest.raises(RuntimeError, match=key.name):
        jit.cubin_for(key, "sm_80")


def test_cold_compile_is_fast():
    """One forward variant compiles cold in at most 2 s here (the issue's JIT latency bound)."""
    import time
    key = dispatch.forward_key("bf16", 128, is_local=True, softcap=False, alibi=False)
    t0 = time.perf_counter()
    jit.compile_cubin(key, "sm_90a")
    assert time.perf_counter() - t0 < 2.0


def test_precompile_fills_cache(tmp_path, monkeypatch):
    """cuflash.precompile compiles the chosen variants of a named arch without a GPU, into the disk cache."""
    import cuflash
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    names = cuflash.precompile(arch="sm_80", dtypes=["fp16"], head_dims=[64], workers=2)
    expected = [k for k in dispatch.keys_for_arch("sm_80") if k.dtype == "fp16" and k.head_dim == 64]
    assert len(names) == len(expected) > 8 and set(names) <= set(jit.cached_variants())


def test_key_names_are_readable_and_unique():
    """Each variant has one distinct readable name that spells out its specialization."""
    names = [k.name for k in dispatch.all_keys()]
    assert len(names) == len(set(names))
    k = dispatch.forward_key("bf16", 100, is_local=True, softcap=True, alibi=False)
    assert k.name.startswith("fwd_sm80_bf16_d128_local_softcap_")


def test_generated_wgmma_shapes_are_current():
    """kernels_cu/ptx/wgmma_shapes.cuh is exactly what its generator writes (nobody edited it by hand,
    and a shape added to the generator was regenerated)."""
    import importlib.util
    path = jit.kernel_root() / "ptx" / "gen_wgmma_shapes.py"
    spec = importlib.util.spec_from_file_location("gen_wgmma_shapes", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUTPUT.read_text() == gen.render()


def test_sm90_wgmma_shapes_cover_dispatch():
    """Every Hopper tile the dispatcher can pick has its wgmma shapes generated: N = block_n for Q.K^T and
    N = head dim for P.V."""
    import re
    text = (jit.kernel_root() / "ptx" / "wgmma_shapes.cuh").read_text()
    shapes = {int(n) for n in re.findall(r"struct WgmmaShape<(\d+)>", text)}
    for k in dispatch.all_forward_sm90_keys():
        assert {k.block_n, k.head_dim} <= shapes, k.name
