"""What the layout copy (kernels_cu/attention/strided_copy.cu) costs at head dims that are not multiples of 8.

    python bench/bench_strided_copy.py [--tokens 16384] [--runs 30] [--out bench/results]

At such a head dim (FlashAttention-2's own tests use 59 and 111) a row of q, k, v is not a whole number of
16-byte chunks, which TMA and cp.async need, so cuflash copies the inputs into a zero-padded buffer of the
next multiple of 8 and crops the outputs back (api._device_input / _finish_output). Padding inside the
kernel instead would run the same padded tiles (the kernels already zero-fill up to a multiple of 64: head
dim 56 runs the 64 kernel, 104 and 112 the 128 one) but with 2-byte loads for every row. So the head dim
just above, a multiple of 8 and copy-free, is the bound any in-kernel padding could reach, and the gap
between the two is all the copy can cost:

    copy overhead = time(odd head dim) / time(next multiple of 8) - 1

Times cuflash.attention and attention_backward on CuPy bf16 inputs, ``tokens`` tokens at about 2048
hidden units (32 heads around head dim 64, 16 around 128), non-causal, with CUDA events around
back-to-back calls (median of --runs samples of 4 calls, warm-up excluded). Prints a table, writes
``strided-copy-<stamp>.json`` and a PNG of the overheads under ``<out>/<gpu-slug>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import results_io

REPO = Path(__file__).resolve().parent.parent
# (head dim, copy-free bound, heads); 56 vs 64: the kernels' own zero-fill padding, for scale
PAIRS = [(59, 64, 32), (56, 64, 32), (111, 112, 16), (100, 104, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import cupy
    import ml_dtypes
    import cuflash

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    s, b = args.seqlen, args.tokens // args.seqlen
    times = {}
    for d in sorted({d for pair in PAIRS for d in pair[:2]}):
        h = next(hh for dd, bound, hh in PAIRS if d in (dd, bound))
        q, k, v, do = (cupy.asarray(rng.standard_normal((b, s, h, d), dtype=np.float32).astype(bf16))
                       for _ in range(4))
        out, lse = cuflash.attention(q, k, v, return_lse=True)
        times[d] = {"heads": h,
                    "fwd_ms": results_io.median_ms(lambda: cuflash.attention(q, k, v), args.runs),
                    "bwd_ms": results_io.median_ms(lambda: cuflash.attention_backward(do, q, k, v, out, lse), args.runs)}
    rows = []
    print(f"{'head dim':>8} {'bound':>6} | {'fwd ms':>8} {'bound ms':>8} {'overhead':>8} | "
          f"{'bwd ms':>8} {'bound ms':>8} {'overhead':>8}")
    for d, bound, _ in PAIRS:
        row = {"head_dim": d, "bound_head_dim": bound, "heads": times[d]["heads"], "batch": b, "seqlen": s}
        for p in ("fwd", "bwd"):
            row[f"{p}_ms"] = round(times[d][f"{p}_ms"], 4)
            row[f"{p}_bound_ms"] = round(times[bound][f"{p}_ms"], 4)
            row[f"{p}_overhead"] = round(times[d][f"{p}_ms"] / times[bound][f"{p}_ms"] - 1, 4)
        rows.append(row)
        print(f"{d:>8} {bound:>6} | {row['fwd_ms']:>8.3f} {row['fwd_bound_ms']:>8.3f} {row['fwd_overhead']:>+8.1%} | "
              f"{row['bwd_ms']:>8.3f} {row['bwd_bound_ms']:>8.3f} {row['bwd_overhead']:>+8.1%}")
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    path = results_io.result_path(args.out, gpu, "strided-copy")
    results_io.write_json(path, {"gpu": gpu, "dtype": "bfloat16", "causal": False, "rows": rows})
    plt = results_io.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(rows))
    for i, p in enumerate(("fwd", "bwd")):
        ax.bar(x + (i - 0.5) * 0.38, [100 * r[f"{p}_overhead"] for r in rows], 0.38, label=p)
    ax.set_xticks(x, [f"{r['head_dim']} vs {r['bound_head_dim']}" for r in rows])
    ax.set_ylabel("time over the copy-free head dim (%)")
    ax.set_title(f"Layout copy at odd head dims, {gpu}, bf16, seqlen {s}", fontsize=9)
    ax.axhline(0, color="k", lw=0.6)
    ax.legend()
    results_io.save_png(fig, path)


if __name__ == "__main__":
    main()
