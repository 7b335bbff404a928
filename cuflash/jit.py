"""Kernel source -> compiled function: NVRTC compile, disk cache, module load.

Compilation needs no GPU (CI compiles every variant for sm_80 and sm_90a); loading does. A cubin is cached
on disk under a name built from the variant key, the target, a digest of every file in ``kernels_cu/``
and the NVRTC version, so editing any kernel source or upgrading NVRTC invalidates exactly what it must.

Environment:
  ``CUFLASH_CACHE_DIR``   where cubins live (default ``~/.cache/cuflash``)
  ``CUFLASH_NO_COMPILE``  ``1``: a cache miss raises instead of compiling (deployments that precompiled)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from .dispatch import KernelKey

log = logging.getLogger("cuflash")

_lock = threading.Lock()
_loaded: dict = {}          # (key name, entry, arch, device id) -> (module, function)
_digest: str | None = None


class CompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message carries the variant name and the compiler log."""


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
    from cupy.cuda import nvrtc
    return tuple(nvrtc.getVersion())


def _cache_path(key: KernelKey, arch: str) -> Path:
    major, minor = nvrtc_version()
    return cache_dir() / f"{key.name}.{arch}.{source_digest()}.nvrtc{major}{minor}.cubin"


def cached_variants() -> list[str]:
    """Readable names (``variant@arch``) of the cubins in the disk cache built from the current sources."""
    d = cache_dir()
    if not d.is_dir():
        return []
    digest = source_digest()
    out = []
    for f in sorted(d.glob("*.cubin")):
        parts = f.name.split(".")
        if len(parts) == 5 and parts[2] == digest:
            out.append(f"{parts[0]}@{parts[1]}")
    return out


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
    from cupy.cuda import nvrtc

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
    if path.is_file():
        return path.read_bytes()
    if os.environ.get("CUFLASH_NO_COMPILE", "") not in ("", "0"):
        raise RuntimeError(
            f"cuflash: kernel {key.name} for {arch} is not in the cache {cache_dir()} and "
            "CUFLASH_NO_COMPILE is set; run cuflash.precompile() for it first")
    t0 = time.perf_counter()
    cubin, ptxas_log = compile_cubin(key, arch)
    log.info("cuflash: compiled %s for %s in %.2f s", key.name, arch, time.perf_counter() - t0)
    spilled = spill_bytes(ptxas_log)
    if spilled:
        log.warning("cuflash: %s for %s spills %d bytes to local memory", key.name, arch, spilled)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic publish: concurrent processes may compile the same variant; the last rename wins whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    os.replace(tmp, path)
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


def precompile(variants=None, *, arch: str | None = None, dtypes=None, head_dims=None, workers: int | None = None):
    """Compile kernel variants into the disk cache ahead of first use.

    Parameters
    ----------
    variants : iterable of KernelKey or str, optional
        Variant keys or names (as printed by ``python -m cuflash info``); default: every shipped variant,
        filtered by ``dtypes`` (``"fp16"``, ``"bf16"``) and ``head_dims`` (padded head dims 64/128/192/256).
    arch : str, optional
        NVRTC target such as ``"sm_80"`` or ``"sm_90a"``; default: the current GPU's. Needs no GPU when given.

    Returns
    -------
    list of str: the ``variant@arch`` names now in the cache.
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = all_variants()
    if variants is not None:
        wanted = {str(v) for v in variants}
        unknown = wanted - {k.name for k in keys}
        if unknown:
            raise ValueError(f"unknown kernel variants: {sorted(unknown)}")
        keys = [k for k in keys if k.name in wanted]
    if dtypes is not None:
        keys = [k for k in keys if k.dtype in dtypes]
    if head_dims is not None:
        keys = [k for k in keys if k.head_dim in head_dims]
    if arch is None:
        import cupy
        from .dispatch import compile_arch
        major, minor = divmod(int(cupy.cuda.Device().compute_capability), 10)
        arch = compile_arch(major, minor)
    keys = [k for k in keys if arch in k.archs]  # the wgmma kernels exist only for sm_90a
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(lambda k: cubin_for(k, arch), keys))
    return [f"{k.name}@{arch}" for k in keys]
