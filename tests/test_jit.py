"""Tests of cuflash/jit.py: the disk cache survives damaged entries and unwritable directories, and
precompile builds exactly what a GPU of the named target runs, rejects bad arguments by name, shows progress
and says what is missing when CuPy or a GPU is. CPU only: NVRTC compiles need no GPU."""

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from gpu_helpers import nvrtc_available

import cuflash
from cuflash import api, dispatch, jit, ops
from cuflash.arrays import DeviceArray

ROOT = Path(__file__).resolve().parent.parent

nvrtc_ok = nvrtc_available()

needs_nvrtc = pytest.mark.skipif(not nvrtc_ok, reason="CuPy with NVRTC is not installed")

# The smallest, fastest variants (about 0.5 s each): the backward's preprocess kernel.
PRE = dispatch.backward_keys("fp16", 64, is_local=False, softcap=False, alibi=False, deterministic=False)[0]
PRE_128 = dispatch.backward_keys("fp16", 128, is_local=False, softcap=False, alibi=False, deterministic=False)[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own, and a process state with no cubin kept in memory and no
    "cannot write" warning given yet."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(d))
    monkeypatch.delenv("CUFLASH_NO_COMPILE", raising=False)
    monkeypatch.setattr(jit, "_memory", {})
    monkeypatch.setattr(jit, "_unwritable_warned", False)
    return d


def _cache_warnings(record):
    return [w for w in record if issubclass(w.category, jit.CacheWarning)]


# ---------------------------------------------------------------------------
# Damaged entries
# ---------------------------------------------------------------------------

def _truncate(path, other):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path, other):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _empty(path, other):
    path.write_bytes(b"")


def _plain_cubin(path, other):
    # What cuflash before the checked format wrote, or any other tool's cubin.
    path.write_bytes(jit.compile_cubin(PRE_128, "sm_80")[0])


def _other_variants_entry(path, other):
    # A valid entry of another variant copied onto this one's name.
    path.write_bytes(other.read_bytes())


@needs_nvrtc
@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _empty, _plain_cubin, _other_variants_entry],
                         ids=["truncated", "flipped-byte", "empty", "plain-cubin", "other-variant"])
def test_damaged_entry_is_discarded_and_recompiled(cache, damage):
    """A cache entry that was truncated, altered, emptied, is a bare cubin or belongs to another variant is
    detected before it could reach the driver: one CacheWarning, and cubin_for returns exactly what a fresh
    compile gives (and rewrites a valid entry)."""
    fresh = jit.compile_cubin(PRE, "sm_80")[0]
    assert jit.cubin_for(PRE, "sm_80") == fresh
    jit.cubin_for(PRE_128, "sm_80")
    path = jit._cache_path(PRE, "sm_80")
    damage(path, jit._cache_path(PRE_128, "sm_80"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = jit.cubin_for(PRE, "sm_80")
    assert len(_cache_warnings(record)) == 1, [str(w.message) for w in record]
    assert str(path) in str(_cache_warnings(record)[0].message)
    assert got == fresh
    assert jit.unpack_entry(path.name, path.read_bytes()) == fresh  # the entry was written again, valid


def test_entry_format_round_trips_and_rejects_damage():
    """pack_entry/unpack_entry: a packed cubin comes back unchanged under its own name; a shorter, longer,
    altered or renamed entry raises ValueError saying what is wrong."""
    cubin = b"\x7fELF" + bytes(range(256)) * 4
    entry = jit.pack_entry("a.cfcubin", cubin)
    assert jit.unpack_entry("a.cfcubin", entry) == cubin
    with pytest.raises(ValueError, match="truncated"):
        jit.unpack_entry("a.cfcubin", entry[:-1])
    with pytest.raises(ValueError, match="truncated"):
        jit.unpack_entry("a.cfcubin", entry + b"\0")
    with pytest.raises(ValueError, match="checksum"):
        jit.unpack_entry("a.cfcubin", entry[:-1] + b"\1")
    with pytest.raises(ValueError, match="checksum"):
        jit.unpack_entry("b.cfcubin", entry)
    with pytest.raises(ValueError, match="header"):
        jit.unpack_entry("a.cfcubin", cubin)


@needs_nvrtc
def test_damaged_entry_under_no_compile_raises_naming_it(cache, monkeypatch):
    """With CUFLASH_NO_COMPILE set, a damaged entry is not loaded either: the error names the variant and
    says the entry was damaged."""
    jit.cubin_for(PRE, "sm_80")
    _truncate(jit._cache_path(PRE, "sm_80"), None)
    monkeypatch.setenv("CUFLASH_NO_COMPILE", "1")
    with pytest.warns(jit.CacheWarning), pytest.raises(RuntimeError, match=f"{PRE.name} .*damaged"):
        jit.cubin_for(PRE, "sm_80")


@needs_nvrtc
def test_no_compile_reads_precompiled_entries(cache, monkeypatch):
    """Entries precompile wrote are served under CUFLASH_NO_COMPILE without touching NVRTC."""
    names = cuflash.precompile([PRE], arch="sm_80", progress=False)
    assert names == [f"{PRE.name}@sm_80"] and jit.cached_variants() == names
    expected = jit.compile_cubin(PRE, "sm_80")[0]
    monkeypatch.setenv("CUFLASH_NO_COMPILE", "1")
    monkeypatch.setattr(jit, "compile_cubin", lambda *a: pytest.fail("compiled under CUFLASH_NO_COMPILE"))
    assert jit.cubin_for(PRE, "sm_80") == expected


# ---------------------------------------------------------------------------
# Unwritable cache directory
# ---------------------------------------------------------------------------

def _assert_memory_only_cache(monkeypatch):
    """Two variants compile with exactly one CacheWarning between them, and the first comes back from memory
    afterwards without a second compile."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = jit.cubin_for(PRE, "sm_80")
        second = jit.cubin_for(PRE_128, "sm_80")
        monkeypatch.setattr(jit, "compile_cubin", lambda *a: pytest.fail("compiled twice in one process"))
        again = jit.cubin_for(PRE, "sm_80")
    assert len(_cache_warnings(record)) == 1, [str(w.message) for w in record]
    assert "kept in memory" in str(_cache_warnings(record)[0].message)
    assert first[:4] == second[:4] == b"\x7fELF" and again == first


@needs_nvrtc
def test_cache_dir_under_a_regular_file(tmp_path, cache, monkeypatch):
    """CUFLASH_CACHE_DIR inside a regular file (unwritable even for root): kernels compile, stay in memory,
    and the process warns once."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(blocker / "cache"))
    _assert_memory_only_cache(monkeypatch)
    assert jit.cached_variants() == []


@needs_nvrtc
def test_read_only_file_system(cache, monkeypatch):
    """A cache on a read-only file system (EROFS on creating the entry, as root gets too): compile, keep in
    memory, warn once, no temporary file left behind."""
    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(jit.tempfile, "mkstemp", erofs)
    _assert_memory_only_cache(monkeypatch)
    assert not any(cache.iterdir())


@needs_nvrtc
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_cache_dir(cache, monkeypatch):
    """A cache directory without write permission: compile, keep in memory, warn once."""
    cache.mkdir()
    cache.chmod(0o555)
    try:
        _assert_memory_only_cache(monkeypatch)
    finally:
        cache.chmod(0o755)


# ---------------------------------------------------------------------------
# precompile: which variants
# ---------------------------------------------------------------------------

# Compute capability of each target, written out here rather than derived with dispatch's own functions.
ARCH_CC = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_87": (8, 7), "sm_89": (8, 9), "sm_90a": (9, 0),
           "sm_100": (10, 0), "sm_120": (12, 0)}


def _runtime_keys(monkeypatch, cc) -> set:
    """Every (variant name, target) that ops.forward and ops.backward (and their variable-length forms) ask
    the JIT for on a GPU of compute capability ``cc``, over all dtypes, head dims 8..256, masks, softcap,
    ALiBi, dropout, element masks (attn_mask), deterministic mode and views that TMA can or cannot address. Launches are stubbed out: this records the runtime's choices only."""
    asked = set()
    monkeypatch.setattr(ops.jit, "get_function", lambda key, arch, dev, smem: asked.add((key, arch)))
    monkeypatch.setattr(ops, "_launch", lambda *a, **k: None)
    monkeypatch.setattr(ops, "fill_zero", lambda *a, **k: None)
    monkeypatch.setattr(ops, "fill_float32", lambda *a, **k: None)
    monkeypatch.setattr(ops, "_sm_count", lambda dev: 1 << 20)  # no persistent schedule, so no counter
    monkeypatch.setattr(ops.tma, "tile_map", lambda *a: b"")
    monkeypatch.setattr(ops.tma, "accumulator_map", lambda *a: b"")
    monkeypatch.setattr(ops.arrays, "empty", lambda fw, shape, dtype, dev, stream: (
        None, DeviceArray(4096, tuple(shape), (0,) * len(shape), dtype, dev)))
    for tma_ok in (True, False):
        monkeypatch.setattr(ops.tma, "supports", lambda *a, ok=tma_ok: ok)
        for dtype in ("float16", "bfloat16"):
            for d in range(8, 257, 8):
                def view():
                    return DeviceArray(4096, (1, 64, 2, d), (128 * d, 2 * d, d, 1), dtype, 0)
                for causal in (False, True):
                    for softcap in (0.0, 30.0):
                        for alibi in (None, DeviceArray(4096, (2,), (1,), "float32", 0)):
                            kw = dict(causal=causal, window_size=(-1, -1), softmax_scale=0.1, softcap=softcap,
                                      stream=0, cc=cc, framework="cupy")
                            ops.forward(view(), view(), view(), view(), view(), alibi, **kw)
                            ops.forward(view(), view(), view(), view(), view(), alibi,
                                        dropout=api._Dropout(0.1, 1, 0), **kw)
                            for det in (False, True):
                                for drop in (None, api._Dropout(0.1, 1, 0)):
                                    try:
                                        ops.backward(view(), view(), view(), view(), view(), view(), alibi, view(),
                                                     view(), view(), deterministic=det, dropout=drop, **kw)
                                    except NotImplementedError:  # this GPU's shared memory cannot run it
                                        continue
                            # element masks (boolean, additive): no ALiBi with them (api refuses it)
                            # (row stride 64: a boolean mask Hopper stages in shared memory; 72: one it cannot)
                            masks = [] if alibi is not None else [
                                DeviceArray(4096, (1, 2, 64, 64), (0, 0, rs, 1), mdt, 0)
                                for mdt, rs in (("bool", 64), ("bool", 72), (dtype, 64))]
                            for mask in masks:
                                ops.forward(view(), view(), view(), view(), view(), None, mask=mask, **kw)
                                for det in (False, True):
                                    try:
                                        ops.backward(view(), view(), view(), view(), view(), view(), None, view(),
                                                     view(), view(), deterministic=det, mask=mask, **kw)
                                    except NotImplementedError:
                                        continue
                            if alibi is None:  # block masks: no ALiBi with them either
                                _block_sparse_calls(view, kw)
                            _varlen_calls(view, alibi, kw)
    return asked


class _StubBlockMask:
    """What ops reads of a cuflash.BlockMask: its block size and its device tables (no upload here)."""

    block_size = (128, 128)

    def device_tables(self, device, **kwargs):
        from cuflash.block_mask import DeviceTables
        return DeviceTables(4096, 4096, 4096, 4096, 0, 0, 1)


def _block_sparse_calls(view, kw):
    """ops.forward / ops.backward with a block mask (the Hopper kernels' block-sparse builds); combinations
    the kernels lack raise NotImplementedError, as at run time."""
    for call in (lambda: ops.forward(view(), view(), view(), view(), view(), None, block_mask=_StubBlockMask(), **kw),
                 lambda: ops.backward(view(), view(), view(), view(), view(), view(), None, view(), view(), view(),
                                      deterministic=False, block_mask=_StubBlockMask(), **kw)):
        try:
            call()
        except NotImplementedError:
            continue


def _varlen_calls(view, alibi, kw):
    """ops.forward_varlen (over paged caches too, and its split-KV form where decoding runs it: no mask, no
    ALiBi) and ops.backward_varlen (both dQ modes) on packed (1, total, heads, d) views."""
    cu = DeviceArray(4096, (3,), (1,), "int32", 0)
    lse = DeviceArray(4096, (2, 64), (64, 1), "float32", 0)
    sizes = dict(max_seqlen_q=40, max_seqlen_k=40)
    # pages of 16 rows (Hopper: row gathers) and of 64 (Hopper: a TMA box per page)
    tables = [dict(block_table=DeviceArray(4096, (2, 4), (4, 1), "int32", 0), page_size=page) for page in (16, 64)]
    ops.forward_varlen(view(), view(), view(), view(), lse, alibi, cu, cu, None, None, **sizes, **kw)
    for table in tables:
        ops.forward_varlen(view(), view(), view(), view(), lse, alibi, cu, cu, None, None, **table, **sizes, **kw)
    if alibi is None and not kw["causal"]:
        for paged in [{}] + tables:
            ops.forward_varlen(view(), view(), view(), view(), lse, alibi, cu, cu, None, None, num_splits=4,
                               **paged, **sizes, **kw)
    for det in (False, True):
        try:
            ops.backward_varlen(view(), view(), view(), view(), view(), lse, alibi, view(), view(), view(), cu, cu,
                                None, None, deterministic=det, **sizes, **kw)
        except NotImplementedError:
            continue


@pytest.mark.parametrize("arch", sorted(ARCH_CC))
def test_keys_for_arch_are_exactly_what_the_runtime_runs(arch, monkeypatch):
    """The attention variants of dispatch.keys_for_arch(arch) (what precompile builds) are exactly those the
    runtime loads on a GPU of that target: nothing missing (a cache miss after precompiling), nothing extra
    (wasted compiles). Hopper gets the wgmma and sm80 families, every other target the sm80 ones with tiles
    for its shared memory. Helper kernels the runtime asked for are included too."""
    asked = _runtime_keys(monkeypatch, ARCH_CC[arch])
    built = dispatch.keys_for_arch(arch)
    assert {a for _, a in asked} == {arch}
    attention = dispatch.ATTENTION_FAMILIES
    assert ({k.name for k, _ in asked if k.family in attention}
            == {k.name for k in built if k.family in attention})
    assert {k.name for k, _ in asked} <= {k.name for k in built}
    assert ({"fwd_sm90", "bwd_sm90"} <= {k.family for k in built}) == (arch == "sm_90a")


@pytest.mark.parametrize("arch", sorted(ARCH_CC))
def test_keys_for_arch_fit_the_arch_shared_memory(arch):
    """Every sm80-family forward and backward variant keys_for_arch lists for a target fits that target's
    shared memory (a tile override that ignored the limit would ask a 99 KB GPU for 128 KB at launch)."""
    limit = dispatch.max_smem(*ARCH_CC[arch])
    for key in dispatch.keys_for_arch(arch):
        if key.family == "fwd_sm80":
            assert dispatch.forward_smem_bytes(key) <= limit, key.name
        elif key.family == "bwd_sm80":
            assert dispatch.backward_smem_bytes(key) <= limit, key.name


def _record_compiles(monkeypatch):
    done = []
    monkeypatch.setattr(jit, "cubin_for", lambda key, arch: done.append((key.name, arch)) or b"")
    return done


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100", "sm_120"])
def test_precompile_builds_every_variant_of_the_arch(arch, monkeypatch):
    """precompile(arch=...) asks for each variant of keys_for_arch once, for that arch: for sm_86, sm_89,
    sm_100 and sm_120 too (it used to compile nothing there)."""
    done = _record_compiles(monkeypatch)
    names = cuflash.precompile(arch=arch, progress=False)
    expected = [k.name for k in dispatch.keys_for_arch(arch)]
    assert sorted(done) == sorted((n, arch) for n in expected)
    assert names == [f"{n}@{arch}" for n in expected] and len(names) > 100


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_86", "sm_89", "sm_100", "sm_120"])
def test_nvrtc_compiles_for_the_newer_archs(arch, cache):
    """The NVRTC installed accepts sm_86, sm_89, sm_100 and sm_120, and precompile puts a real cubin for
    each into the cache."""
    from cupy.cuda import nvrtc
    assert int(arch[3:]) in nvrtc.getSupportedArchs()
    names = cuflash.precompile([PRE], arch=arch, progress=False)
    assert names == jit.cached_variants() == [f"{PRE.name}@{arch}"]
    assert jit.cubin_for(PRE, arch)[:4] == b"\x7fELF"


@needs_nvrtc
def test_precompile_maps_head_dims_and_dtype_names(monkeypatch):
    """head_dims take any head dim 1..256 (each selects the padded head dim that serves it) and dtypes the
    NumPy names too: 40 and 'float16' select exactly the fp16 head-dim-64 variants."""
    done = _record_compiles(monkeypatch)
    names = cuflash.precompile(arch="sm_80", dtypes=["float16"], head_dims=[40], progress=False)
    expected = [k for k in dispatch.keys_for_arch("sm_80") if k.dtype == "fp16" and k.head_dim == 64]
    assert names == [f"{k.name}@sm_80" for k in expected] and len(expected) > 8
    assert len(done) == len(expected)
    assert cuflash.precompile(arch="sm_80", dtypes="bfloat16", head_dims=1, progress=False) == [
        f"{k.name}@sm_80" for k in dispatch.keys_for_arch("sm_80") if k.dtype == "bf16" and k.head_dim == 64]


SM90_KEY = dispatch.all_forward_sm90_keys()[0]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(arch="sm90a"), ValueError, "arch='sm90a'"),
    (dict(arch="sm_70"), ValueError, "arch='sm_70'.*8.0"),
    (dict(arch="sm_75"), ValueError, "arch='sm_75'.*8.0"),
    (dict(arch="sm_90"), ValueError, "arch='sm_90'.*sm_90a"),
    (dict(arch=80), ValueError, "arch=80"),
    (dict(arch="sm_80", head_dims=[0]), ValueError, "head_dims"),
    (dict(arch="sm_80", head_dims=[257]), ValueError, "head_dims"),
    (dict(arch="sm_80", head_dims=["64"]), ValueError, "head_dims"),
    (dict(arch="sm_80", dtypes=["float32"]), ValueError, "dtypes"),
    (dict(arch="sm_80", dtypes=["fp8"]), ValueError, "dtypes"),
    (dict(arch="sm_80", workers=0), ValueError, "workers"),
    (dict(arch="sm_80", progress="yes"), TypeError, "progress"),
])
def test_precompile_rejects_bad_arguments(kwargs, exc, match, monkeypatch):
    """Unknown targets (including ones older than cc 8.0, and sm_90 which Hopper never loads), head dims
    outside 1..256, dtypes other than fp16/bf16 and bad workers/progress raise naming the argument, before
    anything compiles."""
    _record_compiles(monkeypatch)
    with pytest.raises(exc, match=match):
        cuflash.precompile(**kwargs)


@needs_nvrtc
def test_precompile_rejects_unknown_and_misplaced_variants(monkeypatch):
    """An unknown variant name, and a Hopper (wgmma) variant asked for a non-Hopper target, raise ValueError
    naming `variants` instead of being dropped silently."""
    done = _record_compiles(monkeypatch)
    with pytest.raises(ValueError, match="variants.*no_such_kernel"):
        cuflash.precompile(["no_such_kernel"], arch="sm_80")
    with pytest.raises(ValueError, match=f"variants.*{SM90_KEY.name}"):
        cuflash.precompile([SM90_KEY], arch="sm_86")
    assert cuflash.precompile([SM90_KEY.name], arch="sm_90a", progress=False) == [f"{SM90_KEY.name}@sm_90a"]
    assert done == [(SM90_KEY.name, "sm_90a")]


@needs_nvrtc
def test_precompile_rejects_targets_nvrtc_lacks(monkeypatch):
    """A well-formed target this NVRTC cannot compile for (sm_99) raises ValueError naming arch, listing the
    targets it has, rather than an NVRTC error per variant."""
    _record_compiles(monkeypatch)
    with pytest.raises(ValueError, match="arch='sm_99'.*compiles for"):
        cuflash.precompile(arch="sm_99")


# ---------------------------------------------------------------------------
# precompile: progress and missing pieces
# ---------------------------------------------------------------------------

@needs_nvrtc
def test_progress_bar(monkeypatch, capsys):
    """progress=True draws a tqdm bar on stderr that reaches the number of variants; progress=False and the
    default on a non-terminal stderr (as under pytest) print nothing."""
    _record_compiles(monkeypatch)
    n = len(cuflash.precompile(arch="sm_86", head_dims=[64], progress=True))
    err = capsys.readouterr().err
    assert "cuflash precompile sm_86" in err and f"{n}/{n}" in err
    cuflash.precompile(arch="sm_86", head_dims=[64], progress=False)
    cuflash.precompile(arch="sm_86", head_dims=[64])
    assert capsys.readouterr().err == ""


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


@needs_nvrtc
def test_precompile_without_gpu_or_arch_says_pass_arch():
    """With no GPU visible and no arch=, precompile raises a RuntimeError telling to pass arch= (with an
    example), not a CUDA error."""
    r = _run_python("import cuflash\ntry:\n    cuflash.precompile()\nexcept RuntimeError as e:\n    print(e)",
                    CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert 'pass arch=, e.g. arch="sm_90a"' in r.stdout


@pytest.mark.parametrize("call", ['cuflash.precompile(arch="sm_80")', "cuflash.precompile()"])
def test_precompile_without_cupy_names_the_extra(call):
    """Without CuPy (simulated: sys.modules["cupy"] = None), precompile raises ModuleNotFoundError that says
    CuPy is missing and which extra installs it, for both CUDA majors."""
    code = ("import sys\nsys.modules['cupy'] = None\nimport cuflash\n"
            f"try:\n    {call}\nexcept ModuleNotFoundError as e:\n    print('MNFE', e)")
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MNFE") and "CuPy is not installed" in r.stdout
    assert '"cuflash[cuda13]"' in r.stdout and '"cuflash[cuda12]"' in r.stdout
