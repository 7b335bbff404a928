"""Kernel source -> compiled function: NVRTC compile, disk cache, module load.

Compilation needs no GPU (CI compiles every variant for sm_80 and sm_90a); loading does. A cubin is cached
on disk under a name built from the variant key, the target, a digest of every file in ``kernels_cu/``
and the NVRTC version, so editing any kernel source or upgrading NVRTC invalidates exactly what it must.

Each cache file holds the cubin behind a header with its length and a BLAKE2b digest, checked before the
cubin reaches the driver: the driver does not validate a cubin and crashes the process on a truncated one,
so a damaged entry (a full disk, a copied cache) would otherwise crash every later process. A damaged entry
is deleted with a warning and compiled again. Where the cache directory cannot be written, cubins stay in
memory for the life of the process (one warning).

Environment:
  ``CUFLASH_CACHE_DIR``   where cubins live (default ``~/.cache/cuflash``)
  ``CUFLASH_NO_COMPILE``  ``1``: a cache miss raises instead of compiling (deployments that precompiled)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from .dispatch import KernelKey, allowed_spill_bytes

log = logging.getLogger("cuflash")

_lock = threading.Lock()
_loaded: dict = {}          # (key name, entry, arch, device id) -> (module, function)
_digest: str | None = None

INSTALL_HINT = ('pip install "cuflash[cuda13]" (CUDA 13 driver) or pip install "cuflash[cuda12]" '
                '(CUDA 12 driver)')


class CompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message carries the variant name and the compiler log."""


class CacheWarning(RuntimeWarning):
    """The kernel cache on disk was damaged or cannot be written; cuflash recovered by compiling."""


def _nvrtc():
    """CuPy's NVRTC module, or an ImportError that says which extra brings it (not a bare module name)."""
    try:
        from cupy.cuda import nvrtc
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "cupy"
        cause = "CuPy is not installed" if missing else f"CuPy failed to import ({type(e).__name__}: {e})"
        raise ModuleNotFoundError(f"cuflash compiles its kernels with NVRTC through CuPy, and {cause}; install "
                                  f"the GPU extra: {INSTALL_HINT}", name="cupy") from e
    return nvrtc


def kernel_root() -> Path:
    """``kernels_cu/``: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels_cu", here.parent / "kernels_cu"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("cuflash kernel sources (kernels_cu/) not found next to the package")


def source_digest() -> str:
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        root = kernel_root()
        for f in sorted(root.rglob("*")):
            if f.suffix in (".cu", ".cuh"):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _digest = h.hexdigest()[:16]
    return _digest


def cache_dir() -> Path:
    return Path(os.environ.get("CUFLASH_CACHE_DIR") or Path.home() / ".cache" / "cuflash")


def nvrtc_version() -> tuple:
    return tuple(_nvrtc().getVersion())


# Cache files end in ".cfcubin", not ".cubin": they carry a header (below) that plain cubins written by
# earlier cuflash versions lack, and a new suffix leaves those to be ignored rather than each discarded with
# a warning.
CACHE_SUFFIX = ".cfcubin"


def _cache_path(key: KernelKey, arch: str) -> Path:
    major, minor = nvrtc_version()
    return cache_dir() / f"{key.name}.{arch}.{source_digest()}.nvrtc{major}{minor}{CACHE_SUFFIX}"


def cached_variants() -> list[str]:
    """Readable names (``variant@arch``) of the cubins in the disk cache built from the current sources."""
    d = cache_dir()
    if not d.is_dir():
        return []
    digest = source_digest()
    out = []
    for f in sorted(d.glob("*" + CACHE_SUFFIX)):
        parts = f.name.split(".")
        if len(parts) == 5 and parts[2] == digest:
            out.append(f"{parts[0]}@{parts[1]}")
    return out


# ---------------------------------------------------------------------------
# Cache entries: header (magic, payload length, digest of the entry's file name and payload) + cubin
# ---------------------------------------------------------------------------

_MAGIC = b"CFCUBIN1"
_HEADER = struct.Struct("<8sQ32s")


def _entry_digest(name: str, cubin: bytes) -> bytes:
    # The file name is hashed too, so that an entry copied or renamed onto another variant's name is caught
    # as foreign instead of loading the wrong kernel.
    return hashlib.blake2b(name.encode() + b"\0" + cubin, digest_size=32).digest()


def pack_entry(name: str, cubin: bytes) -> bytes:
    """The bytes of the cache file ``name`` holding ``cubin``."""
    return _HEADER.pack(_MAGIC, len(cubin), _entry_digest(name, cubin)) + cubin


def unpack_entry(name: str, data: bytes) -> bytes:
    """The cubin of cache file ``name`` with contents ``data``; ValueError saying what is wrong with it."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a cuflash cache entry (unknown header)")
    cubin = data[_HEADER.size:]
    if len(cubin) != length:
        raise ValueError(f"truncated or padded: {len(cubin)} bytes of cubin, the header says {length}")
    if _entry_digest(name, cubin) != digest:
        raise ValueError("checksum mismatch")
    return cubin


_memory: dict = {}           # cache path (str) -> cubin, for entries the disk cache could not keep
_cache_lock = threading.Lock()
_unwritable_warned = False


def _read_entry(path: Path) -> tuple[bytes | None, str]:
    """(cubin, "") for a valid entry; (None, why) for a missing or damaged one (a damaged one is deleted)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as e:  # unreadable, or the cache path runs through a regular file: a miss
        return None, f"unreadable ({type(e).__name__})"
    try:
        return unpack_entry(path.name, data), ""
    except ValueError as e:
        why = str(e)
    warnings.warn(f"cuflash: discarding damaged kernel cache entry {path} ({why}); it is compiled again",
                  CacheWarning, stacklevel=3)
    try:
        path.unlink()
    except OSError:
        pass  # a read-only cache: the entry stays, and each process compiles this variant again
    return None, f"damaged: {why}"


def _write_entry(path: Path, cubin: bytes) -> None:
    """Publish an entry atomically, or keep the cubin in memory when the cache cannot be written."""
    global _unwritable_warned
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic publish: concurrent processes may compile the same variant; the last rename wins whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(pack_entry(path.name, cubin))
        os.replace(tmp, path)
        return
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        error = e
    with _cache_lock:
        _memory[str(path)] = cubin
        first, _unwritable_warned = not _unwritable_warned, True
    if first:
        warnings.warn(
            f"cuflash: cannot write the kernel cache {path.parent} ({type(error).__name__}: {error}); compiled "
            "kernels are kept in memory for this process only. Set CUFLASH_CACHE_DIR to a writable directory.",
            CacheWarning, stacklevel=3)


_SPILL = re.compile(r"(\d+) bytes spill stores")


def spill_bytes(ptxas_log: str) -> int:
    """Bytes of local-memory spill stores ptxas reported (0 for a clean variant)."""
    return sum(int(m) for m in _SPILL.findall(ptxas_log))


_nvrtc_ready = False
_nvrtc_lock = threading.Lock()  # not _lock: get_function compiles while holding that one


def _warm_nvrtc(nvrtc) -> None:
    """NVRTC loads its builtins library lazily on the first compile, and two threads doing that first
    compile at once can fail ("failed to open libnvrtc-builtins"); one tiny compile under a lock first."""
    global _nvrtc_ready
    with _nvrtc_lock:
        if not _nvrtc_ready:
            prog = nvrtc.createProgram('extern "C" __global__ void cuflash_warm() {}', "warm.cu", [], [])
            try:
                nvrtc.compileProgram(prog, [])
            finally:
                nvrtc.destroyProgram(prog)
            _nvrtc_ready = True


def compile_cubin(key: KernelKey, arch: str) -> tuple[bytes, str]:
    """Compile one variant with NVRTC for ``arch`` (``sm_80``, ``sm_90a``, ...). Returns (cubin, log)."""
    nvrtc = _nvrtc()
    if not _nvrtc_ready:
        _warm_nvrtc(nvrtc)
    root = kernel_root()
    src = (root / key.source).read_text()
    opts = [f"-arch={arch}", "-std=c++17", f"-I{root}", "--ptxas-options=-v", f"--ptxas-options=-O{key.ptxas_opt}"]
    opts += [f"-D{k}={v}" for k, v in key.defines().items()]
    prog = nvrtc.createProgram(src, key.source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed on {key.name} for {arch}:\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def cubin_for(key: KernelKey, arch: str) -> bytes:
    """The cubin of a variant: from the disk cache, or compiled now (and cached) unless forbidden."""
    path = _cache_path(key, arch)
    hit = _memory.get(str(path))
    if hit is not None:
        return hit
    cubin, why = _read_entry(path)
    if cubin is not None:
        return cubin
    if os.environ.get("CUFLASH_NO_COMPILE", "") not in ("", "0"):
        state = f"is {why} in" if why else "is not in"
        raise RuntimeError(
            f"cuflash: kernel {key.name} for {arch} {state} the cache {cache_dir()} and "
            "CUFLASH_NO_COMPILE is set; run cuflash.precompile() for it first")
    t0 = time.perf_counter()
    cubin, ptxas_log = compile_cubin(key, arch)
    log.info("cuflash: compiled %s for %s in %.2f s", key.name, arch, time.perf_counter() - t0)
    spilled = spill_bytes(ptxas_log)
    if spilled > allowed_spill_bytes(key):
        log.warning("cuflash: %s for %s spills %d bytes to local memory", key.name, arch, spilled)
    _write_entry(path, cubin)
    return cubin


def get_function(key: KernelKey, arch: str, device_id: int, smem_bytes: int):
    """The loaded kernel function of a variant on a device (compiled and loaded once per process)."""
    slot = (key.name, key.entry, arch, device_id)
    hit = _loaded.get(slot)
    if hit is not None:
        return hit[1]
    with _lock:
        hit = _loaded.get(slot)
        if hit is not None:
            return hit[1]
        import cupy
        from cupy.cuda import driver, function

        cubin = cubin_for(key, arch)
        with cupy.cuda.Device(device_id):
            module = function.Module()
            module.load(cubin)
            fn = module.get_function(key.entry)
            if smem_bytes > 48 * 1024:
                # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: above 48 KB must be opted into per kernel.
                driver.funcSetAttribute(fn.ptr, 8, smem_bytes)
        _loaded[slot] = (module, fn)
        return fn


def all_variants() -> list[KernelKey]:
    """Every kernel variant cuflash ships."""
    from . import dispatch
    return dispatch.all_keys()


# ---------------------------------------------------------------------------
# precompile
# ---------------------------------------------------------------------------

_DTYPE_NAMES = {"fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


def _norm_dtypes(dtypes) -> set:
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    out = set()
    for dt in dtypes:
        name = _DTYPE_NAMES.get(dt) if isinstance(dt, str) else None
        if name is None:
            raise ValueError(f"dtypes: {dt!r} is not a kernel dtype; expected 'fp16'/'float16' or "
                             "'bf16'/'bfloat16'")
        out.add(name)
    return out


def _norm_head_dims(head_dims) -> set:
    from .dispatch import padded_head_dim
    if isinstance(head_dims, int):
        head_dims = [head_dims]
    out = set()
    for d in head_dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 256:
            raise ValueError(f"head_dims: {d!r} is not a head dim; expected integers from 1 to 256 (each is "
                             "served by the compiled head dim 64, 128, 192 or 256 at or above it)")
        out.add(padded_head_dim(d))
    return out


def _current_arch() -> str:
    """The compile target of the current GPU, or an error telling how to precompile without one."""
    _nvrtc()  # no CuPy at all: say that, before anything about GPUs
    import cupy
    from .dispatch import compile_arch
    try:
        major, minor = divmod(int(cupy.cuda.Device().compute_capability), 10)
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError, driver missing, ...: all mean "no usable GPU"
        raise RuntimeError(
            f"cuflash.precompile() without arch= compiles for the current GPU, and no usable CUDA GPU was found "
            f"({type(e).__name__}: {e}). Compiling needs no GPU: pass arch=, e.g. arch=\"sm_90a\" (H100/H200), "
            "\"sm_80\" (A100), \"sm_86\" or \"sm_89\" (RTX 30/40), \"sm_120\" (RTX 50)") from e
    return compile_arch(major, minor)


def _check_nvrtc_target(arch: str) -> None:
    nvrtc = _nvrtc()
    number = int(arch[3:].rstrip("a"))
    try:
        supported = tuple(nvrtc.getSupportedArchs())
    except Exception:  # noqa: BLE001 - an NVRTC too old to tell: let the compile itself decide
        return
    if number not in supported:
        raise ValueError(f"arch={arch!r}: this NVRTC ({'.'.join(map(str, nvrtc_version()))}) compiles for "
                         f"sm_{min(supported)}..sm_{max(supported)} {sorted(supported)}, not {arch}")


def _show_progress(progress) -> bool:
    if progress is None:
        stream = sys.stderr
        try:
            return bool(stream is not None and stream.isatty())
        except (AttributeError, ValueError):  # a replaced or closed stderr: no bar
            return False
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected True, False or None (a bar when stderr is a terminal), got "
                        f"{progress!r}")
    return progress


def precompile(variants=None, *, arch: str | None = None, dtypes=None, head_dims=None, workers: int | None = None,
               progress: bool | None = None):
    """Compile kernel variants into the disk cache ahead of first use.

    Parameters
    ----------
    variants : iterable of KernelKey or str, optional
        Variant keys or names (as printed by ``python -m cuflash info -v``); default: every variant a GPU of
        ``arch`` runs (the tiles its shared memory allows; on ``sm_90a`` the Hopper kernels and the sm80
        ones they fall back to), filtered by ``dtypes`` and ``head_dims``.
    arch : str, optional
        NVRTC target the runtime uses for the GPU: ``"sm_80"`` (A100, A30), ``"sm_86"`` (RTX 30, A40, A10),
        ``"sm_87"``, ``"sm_89"`` (RTX 40, L4, L40), ``"sm_90a"`` (H100/H200), ``"sm_100"``, ``"sm_120"``
        (RTX 50), ... Default: the current GPU's. Needs no GPU when given.
    dtypes : iterable of str, optional
        ``"fp16"``/``"float16"``, ``"bf16"``/``"bfloat16"``.
    head_dims : iterable of int, optional
        Head dims from 1 to 256; each selects the compiled head dim that serves it (64, 128, 192 or 256).
    workers : int, optional
        Parallel NVRTC compiles (default: the number of CPUs).
    progress : bool, optional
        Show a progress bar on stderr; default: when stderr is a terminal.

    Returns
    -------
    list of str: the ``variant@arch`` names compiled or found in the cache (kept in memory only, with a
    warning, when the cache directory cannot be written).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from . import dispatch

    if dtypes is not None:
        dtypes = _norm_dtypes(dtypes)
    if head_dims is not None:
        head_dims = _norm_head_dims(head_dims)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    show = _show_progress(progress)
    if arch is None:
        arch = _current_arch()
    else:
        dispatch.arch_compute_capability(arch)  # ValueError naming arch for a target the runtime never uses
    _check_nvrtc_target(arch)  # a GPU newer than this NVRTC: one clear error, not one per variant

    if variants is None:
        keys = dispatch.keys_for_arch(arch)
    else:
        if isinstance(variants, (str, KernelKey)):
            variants = [variants]
        known = {k.name: k for k in all_variants()}
        known.update((k.name, k) for k in dispatch.keys_for_arch(arch))
        wanted = [str(v) for v in variants]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise ValueError(f"variants: unknown kernel variants {unknown} (python -m cuflash info -v lists "
                             "cached ones; cuflash.jit.all_variants() every shipped one)")
        keys = list({n: known[n] for n in wanted}.values())
        # The wgmma/TMA families exist only for Hopper's sm_90a: any other target fails inside NVRTC.
        wrong = [k.name for k in keys if k.family.endswith("_sm90") and arch != "sm_90a"]
        if wrong:
            raise ValueError(f"variants: {wrong} are Hopper kernels, which compile only for arch='sm_90a', "
                             f"not {arch!r}")
    if dtypes is not None:
        keys = [k for k in keys if k.dtype in dtypes]
    if head_dims is not None:
        keys = [k for k in keys if k.head_dim in head_dims]

    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(keys), desc=f"cuflash precompile {arch}", unit="variant", file=sys.stderr)
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        futures = [pool.submit(cubin_for, k, arch) for k in keys]
        for f in as_completed(futures):
            f.result()  # the first compile error propagates
            if bar is not None:
                bar.update(1)
    finally:
        # On an error, drop the compiles not started yet instead of finishing hundreds of them first.
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return [f"{k.name}@{arch}" for k in keys]
