"""Command line: ``python -m cuflash {info,check,bench}``.

    python -m cuflash info     versions, GPU, NVRTC, the kernel cache and a count of what is cached (-v: each)
    python -m cuflash check    small forward/backward runs on every array library present vs a float64 reference
    python -m cuflash bench    the benchmark's quick subset (``--full`` for the whole grid, ``--plot`` for charts)

Everything works without a GPU (``bench`` then says it needs one).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import sys
from collections import Counter
from pathlib import Path


def _version(mod_name):
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


def _fmt_cuda_version(v):
    """CUDA's integer version (12040) as 12.4."""
    try:
        v = int(v)
        if v == 0:
            return "none (no CUDA driver installed)"
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001
        return str(v)


_FAMILY = re.compile(r"^(.+?)_(?:fp16|bf16)_")


def summarize_cached(names) -> list:
    """``variant@arch`` names -> one (family, "arch count, ...") pair per kernel family, e.g.
    ("fwd_sm80", "sm_80 64, sm_90a 64"): a full cache holds 400+ variants, too many to read one a line."""
    counts = Counter()
    for name in names:
        variant, _, arch = name.partition("@")
        m = _FAMILY.match(variant)
        counts[(m.group(1) if m else variant, arch)] += 1
    families = sorted({f for f, _ in counts})
    return [(f, ", ".join(f"{a} {n}" for (g, a), n in sorted(counts.items()) if g == f)) for f in families]


def info_lines(verbose: bool = False) -> list:
    """The ``info`` report as (label, value) pairs; never raises, never needs a GPU. ``verbose`` lists every
    cached variant instead of counts per kernel family and target."""
    lines = []
    try:
        import cuflash
        lines.append(("cuflash", getattr(cuflash, "__version__", "?")))
        lines.append(("package", str(Path(cuflash.__file__).resolve().parent)))
    except Exception as e:  # noqa: BLE001
        lines.append(("cuflash", f"import failed: {type(e).__name__}: {e}"))
        cuflash = None
    lines.append(("python", f"{platform.python_version()} ({sys.executable})"))
    lines.append(("numpy", _version("numpy") or "not installed"))
    cupy_v = _version("cupy")
    lines.append(("cupy", cupy_v or "not installed"))

    gpu = None
    if cupy_v:
        try:
            import cupy
            rt = cupy.cuda.runtime
            lines.append(("CUDA driver", _fmt_cuda_version(rt.driverGetVersion())))
            lines.append(("CUDA runtime", _fmt_cuda_version(rt.runtimeGetVersion())))
            n = rt.getDeviceCount()
            for i in range(n):
                props = rt.getDeviceProperties(i)
                name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
                mem = props.get("totalGlobalMem", 0) / 2 ** 30
                lines.append((f"GPU {i}", f"{name}, compute capability {props['major']}.{props['minor']}, "
                                          f"{mem:.0f} GiB, {props.get('multiProcessorCount', '?')} SMs"))
                if gpu is None:
                    gpu = (props["major"], props["minor"])
            if n == 0:
                lines.append(("GPU", "no GPU found"))
        except Exception as e:  # noqa: BLE001
            lines.append(("GPU", f"no GPU found ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"))
    else:
        from cuflash.jit import INSTALL_HINT
        lines.append(("GPU", "no GPU found (CuPy is not installed; the NumPy CPU path is available; for the "
                             f"GPU: {INSTALL_HINT})"))
    if gpu is not None and gpu < (8, 0):
        lines.append(("note", "cuflash kernels need compute capability 8.0 or newer"))
    if cuflash is not None:
        try:
            avail = cuflash.gpu_available()
            lines.append(("gpu_available()", str(avail)))
        except Exception:  # noqa: BLE001
            pass

    jit = None
    if cuflash is not None:
        try:
            from cuflash import jit
        except Exception as e:  # noqa: BLE001
            lines.append(("jit", f"import failed: {e}"))
    if jit is not None:
        try:
            lines.append(("NVRTC", ".".join(str(x) for x in jit.nvrtc_version())))
        except ImportError:
            lines.append(("NVRTC", f"unavailable: CuPy is not installed ({jit.INSTALL_HINT})"))
        except Exception as e:  # noqa: BLE001
            lines.append(("NVRTC", f"unavailable ({type(e).__name__})"))
        try:
            if gpu is not None:
                from cuflash import dispatch
                lines.append(("compile target", dispatch.compile_arch(*gpu)))
        except Exception as e:  # noqa: BLE001
            lines.append(("compile target", str(e)))
        try:
            lines.append(("cache dir", str(jit.cache_dir())))
        except Exception as e:  # noqa: BLE001
            lines.append(("cache dir", f"unknown ({e})"))
        try:
            cached = list(jit.cached_variants())
            hint = "" if verbose or not cached else " (python -m cuflash info -v lists them)"
            lines.append(("cached variants", f"{len(cached)}{hint}"))
            if verbose:
                lines += [("", f"  {name}") for name in cached]
            else:
                lines += [("", f"  {family:<12} {counts}") for family, counts in summarize_cached(cached)]
        except Exception as e:  # noqa: BLE001
            lines.append(("cached variants", f"unknown ({type(e).__name__}: {e})"))
    for lib in ("torch", "jax"):
        lines.append((lib, _version(lib) or "not installed"))
    return lines


def cmd_info(args) -> int:
    lines = info_lines(verbose=args.verbose)
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}" if k else f"{'':<{width}}{v}")
    return 0


def cmd_check(args) -> int:
    from cuflash import cli_check
    argv = []
    if args.libs is not None:
        argv += ["--libs", args.libs]
    argv += ["--seed", str(args.seed)]
    return cli_check.main(argv)


def bench_script() -> Path | None:
    """``bench/bench_attention.py`` of the source checkout this package sits in, or None (installed wheel)."""
    cand = Path(__file__).resolve().parent.parent / "bench" / "bench_attention.py"
    return cand if cand.is_file() else None


def load_bench_module():
    path = bench_script()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("cuflash_bench_attention", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def cmd_bench(args, extra) -> int:
    mod = load_bench_module()
    if mod is None:
        print("The benchmark lives in the source checkout (bench/bench_attention.py next to the cuflash "
              "package) and is not part of an installed wheel; run it from a clone of the repository.")
        return 2
    argv = ["--full" if args.full else "--quick"]
    if args.plot:
        argv.append("--plot")
    if not args.no_progress:
        argv.append("--progress")
    return mod.main(argv + list(extra), prog="python -m cuflash bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cuflash", description="cuflash command line tools.")
    sub = p.add_subparsers(dest="command", metavar="{info,check,bench}")
    i = sub.add_parser("info", help="versions, GPU, NVRTC, kernel cache contents")
    i.add_argument("-v", "--verbose", action="store_true",
                   help="list every cached kernel variant (default: counts per kernel family and target)")
    c = sub.add_parser("check", help="verify results on every array library present against a float64 reference")
    c.add_argument("--libs", default=None, help="comma list among numpy,cupy,torch,jax (default: all present)")
    c.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="benchmark against torch SDPA / JAX (source checkout only)",
                       description="Runs bench/bench_attention.py; options not listed here are passed to it "
                                   "(e.g. --passes fwd --dtypes fp16 --memory --jit).")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick subset (default)")
    g.add_argument("--full", action="store_true", help="the whole FlashAttention-2 grid")
    b.add_argument("--plot", action="store_true", help="write PNG charts")
    b.add_argument("--no-progress", action="store_true", help="print each row instead of a progress bar")
    return p


def main(argv=None) -> int:
    try:
        code = _main(argv)
        # Flush here, inside the handler: a reader that quit early (`| head`) fails the flush, and at exit
        # that would be an unhandled BrokenPipeError traceback.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The documented recipe (Python's signal module docs, "Note on SIGPIPE"): point stdout at devnull so
        # that the interpreter's own flush at exit cannot fail again, and exit 1 as Python does on EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv=None) -> int:
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    if args.command is None:
        p.print_help()
        return 0
    if extra and args.command != "bench":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    return cmd_bench(args, extra)


if __name__ == "__main__":
    sys.exit(main())
