"""A/B timing of two cuflash trees in one process each, for kernel changes that must not cost speed.

    python bench/ab_compare.py --tree /path/to/other/checkout --label base
    python bench/ab_compare.py --tree . --label new

Times cuflash.attention (forward) and attention_backward on CuPy bf16 inputs of the FlashAttention-2 grid
(batch x seqlen = 16k tokens, hidden 2048) with CUDA events: warm-up excluded, median of --runs calls.
Prints one JSON line per cell (TFLOP/s as in bench_attention.py). Run the trees alternately, several
times, on one machine: the ratio of medians is the number to quote.
"""

import argparse
import json
import statistics
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", required=True, help="checkout whose cuflash/ is imported")
    ap.add_argument("--label", required=True)
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    sys.path.insert(0, args.tree)
    import cupy
    import ml_dtypes
    import cuflash
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    for d in (int(x) for x in args.hdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            b, h = 16384 // s, 2048 // d
            q, k, v, do = (cupy.asarray(rng.standard_normal((b, s, h, d), dtype=np.float32).astype(bf16))
                           for _ in range(4))
            for causal in (False, True):
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                if out.dtype != q.dtype:  # a tree from before CuPy bfloat16 outputs: raw 16-bit words
                    out = out.view(q.dtype)
                calls = {"fwd": lambda: cuflash.attention(q, k, v, causal=causal),
                         "bwd": lambda: cuflash.attention_backward(do, q, k, v, out, lse, causal=causal)}
                for name, fn in calls.items():
                    for _ in range(5):
                        fn()
                    times = []
                    for _ in range(args.runs):
                        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                        start.record()
                        fn()
                        stop.record()
                        stop.synchronize()
                        times.append(cupy.cuda.get_elapsed_time(start, stop))
                    ms = statistics.median(times)
                    flops = 4 * b * h * s * s * d * (0.5 if causal else 1) * (2.5 if name == "bwd" else 1)
                    print(json.dumps(dict(label=args.label, pass_=name, d=d, seqlen=s, causal=causal, ms=ms,
                                          tflops=flops / ms / 1e9)), flush=True)


if __name__ == "__main__":
    main()
