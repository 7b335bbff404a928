"""In-process A/B of the variable-length Hopper kernels' launch choices (issue 15; bench/NOTES.md,
"Hopper variable-length kernels"), on bench_varlen.py's packing (16k tokens, lengths 64-4096, seed 0), bf16:

    python bench/ab_varlen.py [--runs 20] [--base /path/to/other/checkout]

- forward schedule: persistent CTAs on the tile counter (what launch_plan picks), persistent CTAs on the
  static order, one CTA per tile;
- the hd64 backward's ptxas level: -O3 with its 4-byte spill (what ships) against the spill-free -O1;
- with ``--base``: instead, this checkout's forward and backward against the other tree's (loaded as
  ``cuflash_base``, as bench/ab_compare.py does), hd64 / hd128, causal or not, for kernel changes.

Each variant is planned afresh (launch_plan's cache cleared) and the variants alternate twice; the table
gives the better of the two medians, TFLOP/s counted per sequence. Needs a Hopper GPU and CuPy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

import bench_varlen
import results_io

REPO = Path(__file__).resolve().parent.parent


def _best(variants: dict, run, rounds: int = 2) -> dict:
    """{name: best TFLOP/s} with variants[name] installed (a callable returning an undo) around run()."""
    from cuflash import launch_plan
    res = {}
    for _ in range(rounds):
        for name, install in variants.items():
            undo = install()
            launch_plan._plans.clear()
            try:
                res[name] = max(res.get(name, 0.0), run())
            finally:
                undo()
                launch_plan._plans.clear()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--base", type=Path, help="another checkout to A/B against (its cuflash/ and kernels_cu/)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import cupy
    import ml_dtypes

    import cuflash
    from cuflash import dispatch
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    lens = bench_varlen.lengths(16384, rng)
    cu = cupy.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    top = max(lens)

    def patch(module, name, value):
        def install():
            old = getattr(module, name)
            setattr(module, name, value)
            return lambda: setattr(module, name, old)
        return install

    if args.base is not None:
        _trees(args, cuflash, lens, cu, rng, bf16)
        return
    counter = dispatch.forward_sm90_varlen_schedule
    schedules = {"counter": patch(dispatch, "forward_sm90_varlen_schedule", counter),
                 "static": patch(dispatch, "forward_sm90_varlen_schedule",
                                 lambda key, tiles, sm: (counter(key, tiles, sm)[0], False)),
                 "per_tile": patch(dispatch, "forward_sm90_varlen_schedule", lambda key, tiles, sm: (tiles, False))}
    print("forward schedule, TFLOP/s")
    for d in (64, 128):
        h = 2048 // d
        q, k, v = (cupy.asarray(rng.standard_normal((16384, h, d), dtype=np.float32).astype(bf16)) for _ in range(3))
        for causal in (False, True):
            work = sum(4 * h * n * n * d for n in lens) * (0.5 if causal else 1)
            res = _best(schedules, lambda: work / results_io.median_ms(
                lambda: cuflash.attention_varlen(q, k, v, cu, cu, top, top, causal=causal), args.runs) / 1e9)
            print(f"  hd{d} {'causal' if causal else 'full  '} " + "  ".join(f"{n} {t:6.1f}" for n, t in res.items()))

    key_sm90 = dispatch.backward_key_sm90

    def at_o1(*a, **kw):
        key = key_sm90(*a, **kw)
        return dataclasses.replace(key, ptxas_opt=1) if kw.get("varlen") else key
    levels = {"O3": patch(dispatch, "backward_key_sm90", key_sm90), "O1": patch(dispatch, "backward_key_sm90", at_o1)}
    print("hd64 backward, ptxas level, TFLOP/s")
    d, h = 64, 32
    q, k, v, do = (cupy.asarray(rng.standard_normal((16384, h, d), dtype=np.float32).astype(bf16)) for _ in range(4))
    for causal in (False, True):
        work = 2.5 * sum(4 * h * n * n * d for n in lens) * (0.5 if causal else 1)
        out, lse = cuflash.attention_varlen(q, k, v, cu, cu, top, top, causal=causal, return_lse=True)
        res = _best(levels, lambda: work / results_io.median_ms(
            lambda: cuflash.attention_varlen_backward(do, q, k, v, out, lse, cu, cu, top, top, causal=causal),
            args.runs) / 1e9)
        print(f"  {'causal' if causal else 'full  '} " + "  ".join(f"{n} {t:6.1f}" for n, t in res.items()))


def _trees(args, cuflash, lens, cu, rng, bf16):
    """This checkout against --base, forward and backward, the trees' medians interleaved round by round."""
    import cupy
    from ab_compare import load_tree
    trees = {"base": load_tree(args.base.resolve(), "cuflash_base"), "new": cuflash}
    top = max(lens)
    print("TFLOP/s per sequence, new / base")
    for d in (64, 128):
        h = 2048 // d
        q, k, v, do = (cupy.asarray(rng.standard_normal((16384, h, d), dtype=np.float32).astype(bf16))
                       for _ in range(4))
        for causal in (False, True):
            work = sum(4 * h * n * n * d for n in lens) * (0.5 if causal else 1)
            fwd = {name: (lambda t=t: t.attention_varlen(q, k, v, cu, cu, top, top, causal=causal))
                   for name, t in trees.items()}
            saved = {name: t.attention_varlen(q, k, v, cu, cu, top, top, causal=causal, return_lse=True)
                     for name, t in trees.items()}
            bwd = {name: (lambda t=t, s=saved[name]: t.attention_varlen_backward(do, q, k, v, *s, cu, cu, top, top,
                                                                                 causal=causal))
                   for name, t in trees.items()}
            for pass_, calls, mult in (("fwd", fwd, 1.0), ("bwd", bwd, 2.5)):
                best = {}
                for _ in range(2):
                    for name, fn in calls.items():
                        best[name] = max(best.get(name, 0.0), mult * work / results_io.median_ms(fn, args.runs) / 1e9)
                print(f"  {pass_} hd{d} {'causal' if causal else 'full  '}  new {best['new']:6.1f}  base "
                      f"{best['base']:6.1f}  ({best['new'] / best['base']:.3f})", flush=True)


if __name__ == "__main__":
    main()
