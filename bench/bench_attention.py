"""Attention throughput benchmark: cuflash against torch SDPA backends and JAX/cuDNN.

Grid (FlashAttention-2 paper): every config holds ``batch * seqlen = 16384`` tokens at hidden size 2048,
so ``heads = 2048 / head_dim`` (rounded where it does not divide: 11 at head dim 192) and ``batch = 16384 /
seqlen``; head dims 64, 128, 256 (any other by --hdims); seqlens 512 ... 16k;
causal and not; forward, backward and forward+backward passes; bf16 and fp16.

FLOP count (see :func:`attention_flops`), the convention of the FlashAttention papers::

    forward   = 4 * batch * heads * seqlen_q * seqlen_k * head_dim    (two matmuls, 2 flops per MAC)
                halved when causal (only the lower triangle is computed)
    backward  = 2.5 * forward                                          (five matmuls instead of two)
    fwd + bwd = 3.5 * forward

Timing: CUDA events around each call on the stream torch launches on, warm-up calls excluded, the median of
many calls (at least ``--min-runs``, more until ``--budget`` seconds pass), rotating over several distinct
input sets so that no call finds its inputs in L2 from the previous one. The backward is timed alone: the
forward runs once per input set outside the timed region and each timed call is
``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``. Inputs are fresh standard-normal data.
JAX runs on its own stream, so it is timed on the host clock over a batch of back-to-back calls ending in
``block_until_ready`` (noted in the output).

Usage::

    python bench/bench_attention.py --quick            # hd 64/128, seqlen 1k/4k/16k, bf16 (~1-2 min)
    python bench/bench_attention.py --full --plot      # the whole grid, with PNG charts
    python bench/bench_attention.py --memory           # peak extra memory of fwd+bwd, longest seqlen
    python bench/bench_attention.py --jit              # cold compile, warm start, per-call host overhead
    python bench/bench_attention.py --dropout 0.1 --hdims 64,128 --seqlens 16k --causal no   # issue 17
    python bench/plot.py bench/results/<gpu>/results-<stamp>.json   # re-plot a saved run

Results go to ``bench/results/<gpu-name-slug>/results-<stamp>.{json,csv}`` (``--out`` changes the root).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# JAX must not grab most of the GPU before torch allocates anything.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results"

TOTAL_TOKENS = 16384
HIDDEN = 2048
ALL_HDIMS = (64, 128, 256)
ALL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
ALL_PASSES = ("fwd", "bwd", "fwdbwd")
ALL_DTYPES = ("bf16", "fp16")
QUICK_HDIMS = (64, 128)
QUICK_SEQLENS = (1024, 4096, 16384)
QUICK_DTYPES = ("bf16",)

PASS_FACTOR = {"fwd": (1, 1), "bwd": (5, 2), "fwdbwd": (7, 2)}  # multiplier of the forward count, as n/d
PASS_TITLE = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + Backward"}

IMPLS = ("cuflash", "cuflash_sm80", "cuflash_nodropout", "flash", "cudnn", "efficient", "math", "jax_cudnn",
         "jax_cuflash", "jax_xla")
# Attention dropout of every torch-side contender (--dropout): cuflash and SDPA's backends take the same p;
# "cuflash_nodropout" is ours without it, the yardstick for what dropout costs.
DROPOUT = {"p": 0.0}
# --mask bool: every torch contender gets one dense boolean attn_mask (seqlen, seqlen), about half of it True,
# drawn once per seqlen (seed 0); SDPA's flash backend takes no mask and is skipped.
MASK = {"kind": None, "cache": {}}
# Under jax.jit on JAX arrays (DLPack views of the same inputs); not in the default set but jax_cudnn.
JAX_IMPLS = ("jax_cudnn", "jax_cuflash", "jax_xla")
IMPL_LABEL = {
    "cuflash": "cuflash",
    "cuflash_sm80": "cuflash (sm80 kernel)",
    "cuflash_nodropout": "cuflash, no dropout",
    "flash": "SDPA flash",
    "cudnn": "SDPA cuDNN",
    "efficient": "SDPA mem-efficient",
    "math": "SDPA math",
    "jax_cudnn": "JAX cuDNN",
    "jax_cuflash": "cuflash.jax",
    "jax_xla": "JAX XLA",
}
SHORT = {"cuflash": "cuflash", "cuflash_sm80": "cf-sm80", "cuflash_nodropout": "cf-nodrop", "flash": "flash",
         "cudnn": "cudnn", "efficient": "mem-eff", "math": "math", "jax_cudnn": "jax-cudnn", "jax_cuflash": "jax-cf",
         "jax_xla": "jax-xla"}
MATH_SCORE_LIMIT = 8e9  # bytes of one float32 score matrix above which the math backend is skipped

# The setting for the --memory and longest-seqlen searches.
MEM_BATCH, MEM_HEADS, MEM_HDIM = 1, 16, 128


# ---------------------------------------------------------------------------
# Grid and FLOPs (pure Python: no GPU needed)
# ---------------------------------------------------------------------------

def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, pass_="fwd"):
    """FLOPs of one attention call, as an exact integer.

    forward = 4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when causal;
    backward = 2.5x forward; forward+backward = 3.5x forward.
    """
    f = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        f //= 2
    num, den = PASS_FACTOR[pass_]
    return f * num // den


@dataclass(frozen=True)
class Config:
    pass_: str
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    tokens: int = TOTAL_TOKENS
    hidden: int = HIDDEN

    @property
    def batch(self) -> int:
        return max(1, self.tokens // self.seqlen)

    @property
    def heads(self) -> int:
        # the nearest whole number of heads where the head dim does not divide the hidden size (192: 11 heads)
        return max(1, round(self.hidden / self.head_dim))

    @property
    def flops(self) -> int:
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal,
                               self.pass_)

    def label(self) -> str:
        return (f"{self.pass_:<6} {self.dtype} hd{self.head_dim:<3} s{self.seqlen:<5} "
                f"{'causal' if self.causal else 'full  '} b{self.batch} h{self.heads}")


def _int_list(s):
    return [int(x.lower().replace("k", "")) * (1024 if x.lower().endswith("k") else 1)
            for x in s.split(",") if x]


def _str_list(s, allowed, what):
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return out


def build_parser(prog="bench_attention.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="hd 64,128; seqlen 1k,4k,16k; bf16 (the default when no grid option is given)")
    mode.add_argument("--full", action="store_true", help="the whole FlashAttention-2 grid")
    p.add_argument("--passes", type=lambda s: _str_list(s, ALL_PASSES, "pass"), default=None,
                   help="comma list of fwd,bwd,fwdbwd (default: all)")
    p.add_argument("--dtypes", type=lambda s: _str_list(s, ALL_DTYPES, "dtype"), default=None,
                   help="comma list of bf16,fp16")
    p.add_argument("--hdims", type=_int_list, default=None, help="comma list of head dims, e.g. 64,128,256")
    p.add_argument("--seqlens", type=_int_list, default=None, help="comma list, e.g. 512,1k,2k,4k,8k,16k")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--impls", type=lambda s: _str_list(s, IMPLS, "impl"), default=None,
                   help=f"comma list of {','.join(IMPLS)} (default: all present; --quick leaves out math "
                        "and runs JAX for the forward only)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (a <gpu> folder goes inside)")
    p.add_argument("--plot", action="store_true", help="write PNG charts (matplotlib)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory and the longest seqlen")
    p.add_argument("--memory-only", action="store_true", help="only the --memory measurements")
    p.add_argument("--jit", action="store_true", help="also measure compile time, warm start, host overhead")
    p.add_argument("--jit-only", action="store_true", help="only the --jit measurements")
    p.add_argument("--jit-variants", type=int, default=8,
                   help="how many kernel variants to cold-compile in --jit (0 = all shipped)")
    p.add_argument("--max-seqlen-search", type=_int_list, default=[262144],
                   help="upper bound of the longest-seqlen doubling search (default 256k)")
    p.add_argument("--min-runs", type=int, default=None, help="timed calls at least (default 30; quick 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per measurement (default 1.0; quick 0.3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sets", type=int, default=3, help="distinct input sets rotated through (default 3)")
    p.add_argument("--no-verify", action="store_true", help="skip the cuflash-vs-SDPA output sanity check")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="attention dropout p of every torch contender (JAX left out); adds cuflash_nodropout")
    p.add_argument("--mask", choices=("none", "bool"), default="none",
                   help="bool: a dense boolean attn_mask for every torch contender (issue 18's dense-mask cell)")
    p.add_argument("--progress", action="store_true", help="show a progress bar instead of per-row lines")
    p.add_argument("--no-save", action="store_true", help="do not write JSON/CSV")
    return p


def parse_args(argv=None, prog="bench_attention.py"):
    args = build_parser(prog).parse_args(argv)
    grid_given = any(x is not None for x in (args.passes, args.dtypes, args.hdims, args.seqlens))
    if args.full:
        hdims, seqlens, dtypes = ALL_HDIMS, ALL_SEQLENS, ALL_DTYPES
    elif args.quick or not grid_given:
        args.quick = True
        hdims, seqlens, dtypes = QUICK_HDIMS, QUICK_SEQLENS, QUICK_DTYPES
    else:
        hdims, seqlens, dtypes = ALL_HDIMS, ALL_SEQLENS, ALL_DTYPES
    args.hdims = list(args.hdims or hdims)
    args.seqlens = list(args.seqlens or seqlens)
    args.dtypes = list(args.dtypes or dtypes)
    args.passes = list(args.passes or ALL_PASSES)
    args.max_seqlen_search = args.max_seqlen_search[0]
    args.jax_passes = ("fwd",) if args.quick else ALL_PASSES
    if args.impls is None:
        args.impls = [i for i in IMPLS if not (args.quick and i == "math") and i not in ("jax_cuflash", "jax_xla")
                      and (i != "cuflash_nodropout" or args.dropout > 0)
                      and not (args.dropout > 0 and i in JAX_IMPLS)]
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    DROPOUT["p"] = args.dropout
    MASK["kind"] = None if args.mask == "none" else args.mask
    if MASK["kind"]:
        args.impls = [i for i in args.impls if i not in JAX_IMPLS]
    if args.min_runs is None:
        args.min_runs = 10 if args.quick else 30
    if args.budget is None:
        args.budget = 0.25 if args.quick else 1.0
    return args


def build_grid(args) -> list:
    """Configs in run order: grouped by (dtype, head dim, causal, seqlen) so one input set serves all passes."""
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    return [Config(p, dt, d, s, c)
            for dt in args.dtypes for d in args.hdims for c in causals for s in args.seqlens
            for p in args.passes]


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def _try_import(name):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - anything from a broken install counts as absent
        return None


def import_cuflash():
    """cuflash from this checkout (preferred) or the installed package; None if unimportable."""
    if str(REPO) not in sys.path and (REPO / "cuflash").is_dir():
        sys.path.insert(0, str(REPO))
    try:
        import cuflash
        return cuflash
    except Exception as e:  # noqa: BLE001
        print(f"note: cuflash not importable ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def import_jax():
    try:
        import jax
        if not any(d.platform == "gpu" for d in jax.devices()):
            return None
        return jax
    except Exception:  # noqa: BLE001
        return None


def environment(torch=None, jax=None, cuflash=None) -> dict:
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "gpu": None,
    }
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = p.name
            env["compute_capability"] = f"{p.major}.{p.minor}"
            env["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
            env["sm_count"] = p.multi_processor_count
            try:
                env["cudnn"] = torch.backends.cudnn.version()
            except Exception:  # noqa: BLE001
                pass
    cupy = _try_import("cupy")
    if cupy is not None:
        env["cupy"] = cupy.__version__
        try:
            env["nvrtc"] = ".".join(str(x) for x in cupy.cuda.nvrtc.getVersion())
        except Exception:  # noqa: BLE001
            pass
        try:
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception:  # noqa: BLE001
            pass
    if jax is not None:
        env["jax"] = jax.__version__
    if cuflash is not None:
        env["cuflash"] = getattr(cuflash, "__version__", "?")
    return env


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

class Skip(Exception):
    """An implementation cannot run a config (not present, unsupported, out of memory)."""


def _is_oom(e: BaseException) -> bool:
    name = type(e).__name__
    return "OutOfMemory" in name or "out of memory" in str(e).lower() or "RESOURCE_EXHAUSTED" in str(e)


def cuda_time(torch, calls, *, warmup, min_runs, budget_s, max_runs=10000):
    """Median milliseconds of ``calls[i % len(calls)]()`` measured with CUDA events on torch's stream."""
    for i in range(max(warmup, len(calls))):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    times, pending = [], []
    t_end = time.perf_counter() + budget_s
    i = 0
    while i < max_runs and (i < min_runs or time.perf_counter() < t_end):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        stop.record()
        pending.append((start, stop))
        i += 1
        if len(pending) >= 16:  # bound queued work so the host clock tracks the budget
            pending[0][1].synchronize()
            times += [a.elapsed_time(b) for a, b in pending[:1]]
            pending = pending[1:]
    torch.cuda.synchronize()
    times += [a.elapsed_time(b) for a, b in pending]
    return statistics.median(times), len(times)


def host_time_batched(calls, block, *, warmup, min_runs, budget_s, inner=None):
    """Median per-call milliseconds of back-to-back calls, each batch ended by ``block(last result)``."""
    out = None
    for i in range(max(warmup, len(calls))):
        out = calls[i % len(calls)]()
    block(out)
    t0 = time.perf_counter()
    block(calls[0]())
    one = time.perf_counter() - t0
    inner = inner or max(1, min(20, int(0.05 / max(one, 1e-6))))
    per_call, t_end = [], time.perf_counter() + budget_s
    while len(per_call) < max(5, min_runs // inner) or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for i in range(inner):
            out = calls[i % len(calls)]()
        block(out)
        per_call.append((time.perf_counter() - t0) / inner * 1e3)
        if len(per_call) > 2000:
            break
    return statistics.median(per_call), len(per_call) * inner


# ---------------------------------------------------------------------------
# Implementations: each builder returns a list of zero-argument callables (one per input set)
# ---------------------------------------------------------------------------

def _torch_dtype(torch, name):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_inputs(torch, cfg: Config, n_sets: int, requires_grad: bool):
    dt = _torch_dtype(torch, cfg.dtype)
    shape = (cfg.batch, cfg.seqlen, cfg.heads, cfg.head_dim)
    sets = []
    for _ in range(n_sets):
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(4))
        if requires_grad:
            for t in (q, k, v):
                t.requires_grad_(True)
        sets.append((q, k, v, do))
    return sets


def _cuflash_torch_fn(cuflash):
    try:
        import importlib
        fn = getattr(importlib.import_module("cuflash.torch"), "attention", None)
    except Exception:  # noqa: BLE001
        fn = None
    return fn


def bench_mask(torch, seqlen, causal=False):
    """The --mask bool mask for ``seqlen``: (seqlen, seqlen) bool on the GPU, or None without --mask.
    ``causal``: the mask with the causal triangle folded in, for SDPA, which refuses attn_mask with
    is_causal (cuflash takes both and intersects them)."""
    if MASK["kind"] is None:
        return None
    hit = MASK["cache"].get((seqlen, causal))
    if hit is None:
        if causal:
            hit = bench_mask(torch, seqlen) & torch.ones(seqlen, seqlen, device="cuda", dtype=torch.bool).tril()
        else:
            gen = torch.Generator(device="cuda").manual_seed(0)
            hit = torch.rand(seqlen, seqlen, device="cuda", generator=gen) < 0.5
        MASK["cache"][(seqlen, causal)] = hit
    return hit


def _sdpa(torch, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    if MASK["kind"] is not None and backend == "flash":
        raise Skip("SDPA's flash backend takes no attn_mask")

    def run(q, k, v, causal):
        # SDPA wants (b, h, s, d): transposed views of the same (b, s, h, d) storage, no copies.
        mask = bench_mask(torch, q.shape[1], causal)
        with sdpa_kernel(be):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=causal and mask is None,
                                               dropout_p=DROPOUT["p"])
        return o.transpose(1, 2)

    return run


def torch_impl(torch, impl, cuflash):
    """(forward callable for torch tensors, differentiable callable or None) of a torch-side implementation."""
    if impl in ("cuflash", "cuflash_nodropout"):
        if cuflash is None:
            raise Skip("cuflash not importable")
        p = DROPOUT["p"] if impl == "cuflash" else 0.0
        drop = dict(dropout_p=p, dropout_seed=1) if p else {}  # (the torch function draws its own seed)
        mask = (lambda q: bench_mask(torch, q.shape[1])) if MASK["kind"] else (lambda q: None)  # noqa: E731
        fwd = lambda q, k, v, causal: cuflash.attention(q, k, v, causal=causal, attn_mask=mask(q), **drop)  # noqa: E731
        tfn = _cuflash_torch_fn(cuflash)
        diff = None if tfn is None else (lambda q, k, v, causal: tfn(q, k, v, causal=causal, dropout_p=p,  # noqa: E731
                                                                     attn_mask=mask(q)))
        return fwd, diff
    if impl == "cuflash_sm80":
        # The mma.sync kernels on a GPU that would otherwise run the Hopper ones (measure_torch selects them).
        return torch_impl(torch, "cuflash", cuflash)
    run = _sdpa(torch, impl)
    return run, run


_SM80_ENV = ("CUFLASH_FWD_KERNEL", "CUFLASH_BWD_KERNEL")


def measure_torch(torch, impl, cfg, sets, cuflash, timing):
    if impl != "cuflash_sm80":
        return _measure_torch(torch, impl, cfg, sets, cuflash, timing)
    import os
    prev = {name: os.environ.get(name) for name in _SM80_ENV}
    os.environ.update({name: "sm80" for name in _SM80_ENV})
    try:
        return _measure_torch(torch, impl, cfg, sets, cuflash, timing)
    finally:
        for name, value in prev.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _measure_torch(torch, impl, cfg, sets, cuflash, timing):
    if impl == "math":
        score_bytes = cfg.batch * cfg.heads * cfg.seqlen * cfg.seqlen * 4
        if score_bytes > MATH_SCORE_LIMIT:
            raise Skip(f"S would be {score_bytes / 1e9:.0f} GB")
        sets = sets[:1]  # its saved probabilities are large: one input set only
    fwd, diff = torch_impl(torch, impl, cuflash)
    c = cfg.causal
    if cfg.pass_ == "fwd":
        def mk(q, k, v, do):
            def call():
                with torch.no_grad():
                    return fwd(q, k, v, c)
            return call
        calls = [mk(*s) for s in sets]
    else:
        if diff is None:
            raise Skip("cuflash.torch.attention missing (no autograd)")
        if cfg.pass_ == "bwd":
            calls = []
            for q, k, v, do in sets:
                out = diff(q, k, v, c)  # forward outside the timed region
                calls.append(lambda out=out, q=q, k=k, v=v, do=do:
                             torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
        else:
            calls = [lambda q=q, k=k, v=v, do=do: torch.autograd.grad(diff(q, k, v, c), (q, k, v), do)
                     for q, k, v, do in sets]
    ms, n = cuda_time(torch, calls, **timing)
    return ms, n, ""


def jax_attention(jax, impl, causal):
    """The attention function of a JAX contender, (batch, seqlen, heads, head_dim) in and out."""
    import functools
    if impl == "jax_cuflash":
        import cuflash.jax
        return functools.partial(cuflash.jax.attention, causal=causal)
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="cudnn" if impl == "jax_cudnn" else "xla")


def measure_jax(jax, torch, impl, cfg, sets, timing):
    import jax.dlpack

    if impl == "jax_xla" and cfg.batch * cfg.heads * cfg.seqlen ** 2 * 4 > MATH_SCORE_LIMIT:
        raise Skip("XLA's attention materializes the float32 scores")
    attn = jax_attention(jax, impl, cfg.causal)
    torch.cuda.synchronize()
    jsets = [tuple(jax.dlpack.from_dlpack(t.detach()) for t in s) for s in sets]
    block = lambda x: jax.block_until_ready(x)  # noqa: E731
    if cfg.pass_ == "fwd":
        f = jax.jit(attn)
        calls = [lambda s=s: f(s[0], s[1], s[2]) for s in jsets]
    elif cfg.pass_ == "fwdbwd":
        g = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
        calls = [lambda s=s: g(*s) for s in jsets]
    else:
        apply = jax.jit(lambda vjp_fn, do: vjp_fn(do))
        calls = []
        for q, k, v, do in jsets:
            _, vjp_fn = jax.vjp(jax.jit(attn), q, k, v)  # forward outside the timed region
            calls.append(lambda f=vjp_fn, do=do: apply(f, do))
    ms, n = host_time_batched(calls, block, warmup=timing["warmup"], min_runs=timing["min_runs"],
                              budget_s=timing["budget_s"])
    return ms, n, "host clock"


def verify_cuflash(torch, cuflash, cfg, sets):
    """Max |cuflash - SDPA| of the forward on the first input set (a cheap guard against timing garbage)."""
    q, k, v, _ = sets[0]
    with torch.no_grad():
        ours = cuflash.attention(q.detach(), k.detach(), v.detach(), causal=cfg.causal,
                                 attn_mask=bench_mask(torch, q.shape[1]))
        for be in ("flash", "cudnn", "efficient"):
            try:
                ref = _sdpa(torch, be)(q.detach(), k.detach(), v.detach(), cfg.causal)
                return float((ours.float() - ref.float()).abs().max()), be
            except Exception:  # noqa: BLE001
                continue
    return None, None


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------

@dataclass
class Row:
    pass_: str
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int
    impl: str
    flops: int
    ms: float | None = None
    tflops: float | None = None
    runs: int = 0
    status: str = "ok"
    note: str = ""


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total, enabled=True, width=30):
        self.total, self.n, self.enabled, self.width = max(total, 1), 0, enabled, width
        self.t0 = time.perf_counter()

    def step(self, text=""):
        self.n += 1
        if not self.enabled:
            return
        frac = self.n / self.total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac else 0
        sys.stderr.write(f"\r[{bar}] {self.n}/{self.total} {el:5.0f}s eta {eta:4.0f}s {text[:48]:<48}")
        sys.stderr.flush()

    def done(self):
        if self.enabled:
            sys.stderr.write("\n")


def share_cupy_allocator(torch):
    """Route CuPy allocations through torch's caching allocator: one pool, and memory stats see both."""
    cupy = _try_import("cupy")
    if cupy is None:
        return False
    try:
        def malloc(size, device_id):
            return torch.cuda.caching_allocator_alloc(size, device_id, cupy.cuda.get_current_stream().ptr)

        def free(ptr, device_id):
            torch.cuda.caching_allocator_delete(ptr)

        cupy.cuda.set_allocator(cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc)
        return True
    except Exception:  # noqa: BLE001
        return False


def _free(torch):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def run_grid(args, torch, cuflash, jax, progress_cb=None) -> list:
    grid = build_grid(args)
    impls = [i for i in args.impls if i not in JAX_IMPLS or jax is not None]
    timing = dict(warmup=args.warmup, min_runs=args.min_runs, budget_s=args.budget)
    rows = []
    bar = Progress(len(grid) * len(impls), enabled=args.progress)
    cache = {}
    need_grad = any(p != "fwd" for p in args.passes)
    for cfg in grid:
        key = (cfg.dtype, cfg.head_dim, cfg.seqlen, cfg.causal)
        if cache.get("key") != (key, need_grad):
            cache.clear()
            _free(torch)
            torch.manual_seed(hash(key) & 0xFFFF)
            cache["sets"] = make_inputs(torch, cfg, args.sets, need_grad)
            cache["key"] = (key, need_grad)
        sets = cache["sets"]
        for impl in impls:
            row = Row(cfg.pass_, cfg.dtype, cfg.head_dim, cfg.seqlen, cfg.causal, cfg.batch, cfg.heads, impl,
                      cfg.flops)
            try:
                if impl in JAX_IMPLS and cfg.pass_ not in args.jax_passes:
                    raise Skip("JAX timed for the forward only in --quick")
                if impl in JAX_IMPLS:
                    ms, n, note = measure_jax(jax, torch, impl, cfg, sets, timing)
                else:
                    ms, n, note = measure_torch(torch, impl, cfg, sets, cuflash, timing)
                row.ms, row.runs, row.note = ms, n, note
                row.tflops = cfg.flops / (ms * 1e-3) / 1e12
                if impl == "cuflash" and cfg.pass_ == "fwd" and not args.no_verify and not DROPOUT["p"]:
                    err, against = verify_cuflash(torch, cuflash, cfg, sets)
                    if err is not None:
                        row.note = f"max|diff| vs {against} {err:.2e}"
                        if not err <= 0.05:
                            row.status = "wrong"
            except Skip as e:
                row.status, row.note = "skip", str(e)
            except NotImplementedError as e:
                row.status, row.note = "skip", f"not implemented: {e}"[:120]
            except Exception as e:  # noqa: BLE001
                row.status = "oom" if _is_oom(e) else "error"
                row.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                _free(torch)
            rows.append(row)
            bar.step(f"{cfg.label()} {impl}")
            if progress_cb:
                progress_cb(row)
        if not args.progress and cfg is not None:
            print_row_group([r for r in rows if _cfg_of(r) == cfg], impls)
    bar.done()
    cache.clear()
    _free(torch)
    return rows


def _cfg_of(r: Row):
    return Config(r.pass_, r.dtype, r.head_dim, r.seqlen, r.causal)


def _ratio(a, b):
    return f"{a / b:5.2f}" if a and b else "   - "


def table_header(impls):
    cols = "".join(f"{SHORT[i]:>10}" for i in impls)
    return f"{'config':<44}{cols}{'cf/flash':>9}{'cf/cudnn':>9}"


_printed_header = []


def print_row_group(rows, impls):
    if not rows:
        return
    if not _printed_header:
        print("TFLOP/s")
        print(table_header(impls))
        _printed_header.append(1)
    by = {r.impl: r for r in rows}
    cells = ""
    for i in impls:
        r = by.get(i)
        cells += f"{r.tflops:10.1f}" if r and r.tflops else f"{(r.status if r else '-'):>10}"
    t = {i: (by[i].tflops if i in by else None) for i in impls}
    print(f"{_cfg_of(rows[0]).label():<44}{cells}{_ratio(t.get('cuflash'), t.get('flash')):>9}"
          f"{_ratio(t.get('cuflash'), t.get('cudnn')):>9}", flush=True)


def print_table(rows, impls):
    _printed_header.clear()
    groups = {}
    for r in rows:
        groups.setdefault(_cfg_of(r), []).append(r)
    for g in groups.values():
        print_row_group(g, impls)
    print_notes(rows)


def print_notes(rows):
    notes = sorted({(r.impl, r.status, r.note) for r in rows if r.status != "ok" and r.note})
    for impl, status, note in notes[:20]:
        print(f"  note: {impl} {status}: {note}")


# ---------------------------------------------------------------------------
# --memory
# ---------------------------------------------------------------------------

def _fwdbwd_once(torch, impl, cuflash, seqlen, dtype="bf16", causal=False, batch=MEM_BATCH, heads=MEM_HEADS,
                 head_dim=MEM_HDIM):
    """Peak bytes allocated beyond the inputs (q, k, v, dout) during one forward+backward."""
    _, diff = torch_impl(torch, impl, cuflash)
    if diff is None:
        raise Skip("no autograd")
    dt = _torch_dtype(torch, dtype)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=dt)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        grads = torch.autograd.grad(diff(q, k, v, causal), (q, k, v), do)
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - base
    finally:
        del q, k, v, do


def run_memory(args, torch, cuflash, progress_cb=None) -> dict:
    impls = [i for i in args.impls if i not in JAX_IMPLS]
    seqlens = sorted({512 * 2 ** i for i in range(8)} | set(args.seqlens))  # 512 ... 64k
    shared = share_cupy_allocator(torch)
    res = {"setting": {"batch": MEM_BATCH, "heads": MEM_HEADS, "head_dim": MEM_HDIM, "dtype": "bf16",
                       "causal": False, "cupy_allocations_counted": shared},
           "peak_extra_bytes": {}, "max_seqlen": {}}
    print(f"\nPeak extra memory of forward+backward, batch {MEM_BATCH}, {MEM_HEADS} heads, hd {MEM_HDIM}, bf16 (MiB)")
    print(f"{'seqlen':>8}" + "".join(f"{SHORT[i]:>10}" for i in impls))
    stopped = set()
    for s in seqlens:
        line = f"{s:>8}"
        for impl in impls:
            cell = "-"
            if impl not in stopped:
                try:
                    b = _fwdbwd_once(torch, impl, cuflash, s)
                    res["peak_extra_bytes"].setdefault(impl, {})[str(s)] = b
                    cell = f"{b / 2 ** 20:.0f}"
                except Skip as e:
                    stopped.add(impl)
                    cell = "skip"
                    res["peak_extra_bytes"].setdefault(impl, {})["note"] = str(e)
                except Exception as e:  # noqa: BLE001
                    stopped.add(impl)
                    cell = "OOM" if _is_oom(e) else "err"
                    if not _is_oom(e):
                        res["peak_extra_bytes"].setdefault(impl, {})["note"] = f"{type(e).__name__}: {e}"[:160]
                _free(torch)
            line += f"{cell:>10}"
            if progress_cb:
                progress_cb(None)
        print(line, flush=True)

    print(f"\nLongest seqlen for forward+backward (batch {MEM_BATCH}, {MEM_HEADS} heads, hd {MEM_HDIM}, bf16), "
          f"doubling up to {args.max_seqlen_search}")
    for impl in impls:
        s, best, why = 1024, None, ""
        while s <= args.max_seqlen_search:
            try:
                _fwdbwd_once(torch, impl, cuflash, s)
                best = s
            except Skip as e:
                why = str(e)
                break
            except Exception as e:  # noqa: BLE001
                why = "OOM" if _is_oom(e) else f"{type(e).__name__}"
                break
            finally:
                _free(torch)
            s *= 2
        else:
            why = "search cap"
        res["max_seqlen"][impl] = {"seqlen": best, "stopped_by": why}
        print(f"  {IMPL_LABEL[impl]:<20} {best if best else '-':>8}  (next step: {why})", flush=True)
    return res


# ---------------------------------------------------------------------------
# --jit
# ---------------------------------------------------------------------------

_JIT_CHILD = r"""
import json, os, sys, time
t_start = float(sys.argv[1]); mode = sys.argv[2]; names = json.loads(sys.argv[3])
sys.path.insert(0, sys.argv[4])
t0 = time.perf_counter()
import cuflash
from cuflash import jit
res = {"import_s": time.perf_counter() - t0, "cache_files_at_start": len(list(jit.cache_dir().glob("*")))
       if jit.cache_dir().is_dir() else 0}
if mode == "compile":
    import cupy
    from cuflash import dispatch
    dev = cupy.cuda.Device(0)
    cc = str(dev.compute_capability)
    major, minor = int(cc[:-1]), int(cc[-1])
    arch = dispatch.compile_arch(major, minor) if hasattr(dispatch, "compile_arch") else f"sm_{major}{minor}"
    keys = {}
    if hasattr(jit, "all_variants"):
        keys = {str(getattr(k, "name", k)): k for k in jit.all_variants()}
    elif hasattr(dispatch, "all_forward_keys"):
        keys = {k.name: k for k in dispatch.all_forward_keys()}
    res["arch"] = arch
    res["compile_s"] = {}
    res["cubin_bytes"] = {}
    for n in names or list(keys):
        k = keys.get(n, n)
        t = time.perf_counter()
        if hasattr(jit, "compile_variant"):
            cubin = jit.compile_variant(k, arch)
        else:
            cubin = jit.compile_cubin(k, arch)[0]
        res["compile_s"][n] = time.perf_counter() - t
        res["cubin_bytes"][n] = len(cubin)
else:
    import torch
    q, k, v = (torch.randn(1, 128, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    t = time.perf_counter()
    cuflash.attention(q, k, v)
    torch.cuda.synchronize()
    res["first_call_s"] = time.perf_counter() - t
    res["process_to_result_s"] = time.time() - t_start
res["cached"] = list(jit.cached_variants()) if hasattr(jit, "cached_variants") else []
print("JITRESULT" + json.dumps(res))
"""


def _jit_child(mode, names, cache_dir):
    env = dict(os.environ, CUFLASH_CACHE_DIR=str(cache_dir))
    env.pop("CUFLASH_NO_COMPILE", None)
    t_start = time.time()
    p = subprocess.run([sys.executable, "-c", _JIT_CHILD, repr(t_start), mode, json.dumps(names), str(REPO)],
                       env=env, capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("JITRESULT"):
            r = json.loads(line[len("JITRESULT"):])
            r["wall_s"] = time.time() - t_start
            return r
    raise RuntimeError(f"jit child ({mode}) failed, rc={p.returncode}:\n{p.stderr[-2000:]}")


def _variant_names(cuflash, limit):
    try:
        from cuflash import jit
        if hasattr(jit, "all_variants"):
            names = [str(getattr(k, "name", k)) for k in jit.all_variants()]
        else:
            from cuflash import dispatch
            names = [k.name for k in dispatch.all_forward_keys()]
    except Exception as e:  # noqa: BLE001
        print(f"  cannot list variants: {e}")
        return []
    # The plain (no local / softcap / alibi) variants first: those are the ones the grid uses.
    def order(n):
        m = re.search(r"_d(\d+)", n)
        return (any(t in n for t in ("local", "softcap", "alibi")), "bf16" not in n, int(m.group(1)) if m else 0, n)

    names.sort(key=order)
    return names if limit <= 0 else names[:limit]


def run_jit(args, torch, cuflash) -> dict:
    res = {}
    print("\nJIT: cold compile (empty cache, new process), warm start, per-call host overhead")
    names = _variant_names(cuflash, args.jit_variants)
    with tempfile.TemporaryDirectory(prefix="cuflash-cold-") as d:
        try:
            r = _jit_child("compile", names, d)
            res["cold_compile_s"] = r["compile_s"]
            res["arch"] = r.get("arch")
            print(f"  target {r.get('arch')}, cache files at start: {r.get('cache_files_at_start')}")
            for n, s in r["compile_s"].items():
                print(f"  compile {n:<48} {s:6.2f} s  ({r['cubin_bytes'].get(n, 0) / 1024:.0f} KiB cubin)")
            if r["compile_s"]:
                vals = list(r["compile_s"].values())
                print(f"  {len(vals)} variants: mean {statistics.mean(vals):.2f} s, total {sum(vals):.1f} s")
        except Exception as e:  # noqa: BLE001
            res["cold_compile_error"] = str(e)[-500:]
            print(f"  cold compile failed: {str(e)[-300:]}")
    with tempfile.TemporaryDirectory(prefix="cuflash-warm-") as d:
        try:
            cold = _jit_child("first", [], d)   # empty cache: compile + load + run
            warm = _jit_child("first", [], d)   # same cache, new process: load from disk + run
            res["cold_first_call"] = cold
            res["warm_start"] = warm
            print(f"  first call, empty cache:  {cold['first_call_s']:.2f} s, cache files {cold['cache_files_at_start']}"
                  f" -> {len(cold['cached'])} variants "
                  f"(import {cold['import_s']:.2f} s, process start to result {cold['process_to_result_s']:.2f} s)")
            print(f"  first call, disk cache:   {warm['first_call_s']:.3f} s, cache files {warm['cache_files_at_start']} "
                  f"(import {warm['import_s']:.2f} s, process start to result {warm['process_to_result_s']:.2f} s)")
        except Exception as e:  # noqa: BLE001
            res["warm_start_error"] = str(e)[-500:]
            print(f"  warm-start measurement failed: {str(e)[-300:]}")
    res["host_overhead_us"] = host_overhead(torch, cuflash)
    return res


def host_overhead(torch, cuflash, n=2000):
    """Host microseconds per back-to-back call at a tiny shape (b1 s128 h16 d64 bf16)."""
    shape = (1, 128, 16, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cands = {"cuflash (torch)": lambda: cuflash.attention(q, k, v)} if cuflash is not None else {}
    cupy = _try_import("cupy")
    if cuflash is not None and cupy is not None:
        qc, kc, vc = (cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
                      for _ in range(3))
        cands["cuflash (cupy fp16)"] = lambda: cuflash.attention(qc, kc, vc)
    flash = _sdpa(torch, "flash")
    cands["SDPA flash"] = lambda: flash(q, k, v, False)
    out = {}
    print(f"  per-call host overhead, b1 s128 h16 d64, {n} back-to-back calls:")
    for name, f in cands.items():
        try:
            with torch.no_grad():
                for _ in range(20):
                    f()
                torch.cuda.synchronize()
                if cupy is not None:
                    cupy.cuda.Device().synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                if cupy is not None:
                    cupy.cuda.Device().synchronize()
                t2 = time.perf_counter()
            out[name] = {"enqueue_us": (t1 - t0) / n * 1e6, "with_sync_us": (t2 - t0) / n * 1e6}
            print(f"    {name:<22} {out[name]['enqueue_us']:7.1f} us/call host, "
                  f"{out[name]['with_sync_us']:7.1f} us/call until done")
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
            print(f"    {name:<22} failed: {out[name]['error']}")
    return out


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def save(out_root: Path, env: dict, rows, extra: dict) -> Path:
    d = Path(out_root) / slugify(env.get("gpu") or "no-gpu")
    d.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {"environment": env, "flops": "fwd = 4*B*H*Sq*Sk*D (/2 causal); bwd = 2.5*fwd; fwdbwd = 3.5*fwd",
           "results": [asdict(r) for r in rows], **extra}
    jpath = d / f"results-{stamp}.json"
    jpath.write_text(json.dumps(doc, indent=1))
    if rows:
        with open(d / f"results-{stamp}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            w.writeheader()
            for r in rows:
                w.writerow(asdict(r))
    print(f"\nwrote {jpath}" + (f" and {jpath.with_suffix('.csv').name}" if rows else ""))
    return jpath


def _plot(jpath):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuflash_bench_plot", HERE / "plot.py")
    bench_plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_plot)
    try:
        for p in bench_plot.plot_file(jpath):
            print(f"wrote {p}")
    except ImportError as e:
        print(f"--plot needs matplotlib ({e})")


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def main(argv=None, prog="bench_attention.py") -> int:
    args = parse_args(argv, prog)
    torch = _try_import("torch")
    if torch is None or not torch.cuda.is_available():
        print("The benchmark needs a CUDA GPU and PyTorch with CUDA; "
              f"{'torch is not installed' if torch is None else 'torch sees no CUDA GPU'}.")
        return 2
    cuflash = import_cuflash()
    jax = import_jax() if set(JAX_IMPLS) & set(args.impls) and not (args.memory_only or args.jit_only) else None
    env = environment(torch, jax, cuflash)
    env["command"] = " ".join([prog] + (sys.argv[1:] if argv is None else list(argv)))
    env["mask"] = MASK["kind"]
    print(f"{env.get('gpu')} (cc {env.get('compute_capability')}), torch {env.get('torch')}, "
          f"cupy {env.get('cupy', '-')}, jax {env.get('jax', '-')}, cuflash {env.get('cuflash', '-')}")
    if cuflash is not None and _cuflash_torch_fn(cuflash) is None:
        print("note: cuflash.torch.attention not found: cuflash backward columns are skipped")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, extra = [], {}
    if not (args.memory_only or args.jit_only):
        grid = build_grid(args)
        print(f"{len(grid)} configs x {len(args.impls)} implementations; "
              f"median of >= {args.min_runs} runs / {args.budget} s, {args.sets} input sets rotated")
        rows = run_grid(args, torch, cuflash, jax)
        if args.progress:
            impls = [i for i in args.impls if i not in JAX_IMPLS or jax is not None]
            print_table(rows, impls)
        else:
            print_notes(rows)
    if args.memory or args.memory_only:
        extra["memory"] = run_memory(args, torch, cuflash)
    if args.jit or args.jit_only:
        extra["jit"] = run_jit(args, torch, cuflash)
    if not args.no_save:
        jpath = save(args.out, env, rows, extra)
        if args.plot:
            _plot(jpath)
    bad = [r for r in rows if r.status == "wrong"]
    if bad:
        print(f"WARNING: {len(bad)} cuflash forward results disagree with SDPA (see notes)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
