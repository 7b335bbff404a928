"""CPU (NumPy) path of cuflash against the naive NumPy formula, forward and backward.

``ours`` is ``cuflash.attention`` / ``cuflash.attention_backward`` on NumPy arrays, i.e. the tiled
``cuflash.reference.attention_numpy`` / ``attention_backward_numpy``. ``naive`` is the same math written
the obvious way with NumPy's BLAS on the whole ``(batch*heads, seqlen_q, seqlen_k)`` score matrix::

    forward   p = softmax(scale * q @ k^T [masked]);  out = p @ v
    backward  p = exp(scale * q @ k^T - lse) [masked];  dv = p^T @ dout;  dp = dout @ v^T
              ds = p * (dp - rowsum(dout * out));  dq = scale * ds @ k;  dk = scale * ds^T @ q

Both start from and return ``(batch, seqlen, heads, head_dim)`` arrays, so layout changes are timed for
both. Timing: ``timeit`` of one call, the median of ``--repeats`` runs after one warm-up run; ours and naive
alternate run by run, so a busy machine slows both alike.

Usage::

    python bench/bench_cpu.py                         # seqlen 512..4k, hd 64/128, causal and not
    python bench/bench_cpu.py --seqlens 2048 --hdims 64 --causal no --json
    python bench/bench_cpu.py --json                  # also writes bench/results/cpu/cpu-<stamp>.json
    git show <rev>:cuflash/reference.py > /tmp/ref_old.py
    python bench/bench_cpu.py --baseline /tmp/ref_old.py   # adds that version's tiled path, same runs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cuflash  # noqa: E402


def naive_forward(q, k, v, causal):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    s = (qh @ kh.swapaxes(-1, -2)) * np.float32(d ** -0.5)
    if causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        s = np.where(j <= i + sk - sq, s, np.float32(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = (p / l) @ vh
    lse = (m + np.log(l))[..., 0]
    return out.transpose(0, 2, 1, 3), lse


def naive_backward(dout, q, k, v, out, lse, causal):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = np.float32(d ** -0.5)
    qh, kh, vh, doh, oh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, dout, out))
    s = (qh @ kh.swapaxes(-1, -2)) * scale
    p = np.exp(s - lse[..., None])
    if causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        p = np.where(j <= i + sk - sq, p, np.float32(0))
    dv = p.swapaxes(-1, -2) @ doh
    dp = doh @ vh.swapaxes(-1, -2)
    delta = (doh * oh).sum(axis=-1)
    ds = p * (dp - delta[..., None])
    dq = (ds @ kh) * scale
    dk = (ds.swapaxes(-1, -2) @ qh) * scale
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))


def median_ms(fns, repeats):
    """Median ms of each function; runs alternate so that both see the same machine load."""
    for fn in fns:
        fn()  # warm-up: page faults of fresh buffers, BLAS thread start
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(timeit.timeit(fn, number=1))
    return [1e3 * statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", help="a reference.py (e.g. an older revision) whose attention_numpy / "
                    "attention_backward_numpy are timed too, in the same alternating runs")
    ap.add_argument("--json", action="store_true", help="write bench/results/cpu/cpu-<stamp>.json")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. the commit)")
    args = ap.parse_args(argv)

    seqlens = [int(s) for s in args.seqlens.split(",")]
    hdims = [int(s) for s in args.hdims.split(",")]
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    passes = args.passes.split(",")
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_reference", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"batch {args.batch}, heads {args.heads}, {dtype}, median of {args.repeats}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    head = f"{'pass':<4} {'seqlen':>6} {'hd':>4} {'causal':>6} {'ours ms':>9} {'naive ms':>9} {'ours/naive':>10}"
    print(head + (f" {'base ms':>9} {'base/naive':>10}" if base else ""))
    rows = []
    for p in passes:
        for d in hdims:
            for causal in causals:
                for n in seqlens:
                    shape = (args.batch, n, args.heads, d)
                    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
                    if p == "fwd":
                        ours = lambda: cuflash.attention(q, k, v, causal=causal, return_lse=True)  # noqa: E731
                        naive = lambda: naive_forward(q, k, v, causal)  # noqa: E731
                        old = base and (lambda: base.attention_numpy(q, k, v, causal=causal))  # noqa: E731
                    else:
                        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                        ours = lambda: cuflash.attention_backward(dout, q, k, v, out, lse,  # noqa: E731
                                                                  causal=causal)
                        naive = lambda: naive_backward(dout, q, k, v, out, lse, causal)  # noqa: E731
                        old = base and (lambda: base.attention_backward_numpy(  # noqa: E731
                            dout, q, k, v, out, lse, causal=causal))
                    fns = (ours, naive, old) if base else (ours, naive)
                    t_ours, t_naive, *t_old = median_ms(fns, args.repeats)
                    row = dict(pass_=p, seqlen=n, head_dim=d, causal=causal, ours_ms=t_ours,
                               naive_ms=t_naive, ratio=t_ours / t_naive)
                    line = (f"{p:<4} {n:>6} {d:>4} {str(causal):>6} {t_ours:>9.1f} {t_naive:>9.1f} "
                            f"{t_ours / t_naive:>10.2f}")
                    if base:
                        row.update(base_ms=t_old[0], base_ratio=t_old[0] / t_naive)
                        line += f" {t_old[0]:>9.1f} {t_old[0] / t_naive:>10.2f}"
                    rows.append(row)
                    print(line, flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        out_dir = HERE / "results" / "cpu"
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = out_dir / f"cpu-{stamp}.json"
        meta = dict(label=args.label, baseline=args.baseline, cores=os.cpu_count(), machine=platform.machine(),
                    openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"), numpy=np.__version__,
                    batch=args.batch, heads=args.heads, dtype=str(dtype), repeats=args.repeats,
                    load_average_start=load0, load_average_end=os.getloadavg())
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"# wrote {path}")


if __name__ == "__main__":
    main()
