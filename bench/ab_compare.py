"""A/B timing of two cuflash trees in one process, for kernel changes that must not cost speed.

    python bench/ab_compare.py --base /path/to/other/checkout [--hdims 64,128] [--seqlens 1024,4096,16384]
        [--passes fwd,bwd] [--groups 1,4] [--cudnn]

Imports the checkout's cuflash as ``cuflash`` and the other tree's as ``cuflash_base`` (each compiles and
caches its own kernels), then times cuflash.attention (forward) and attention_backward on CuPy bf16 inputs
of the FlashAttention-2 grid (batch x seqlen = 16k tokens, hidden 2048) with CUDA events, the two trees'
samples interleaved one by one (each contender taking every position in turn) so that clocks, temperature
and neighbours weigh on all alike. A sample
is --calls back-to-back calls between two events, so that the GPU time, not the host's per-call cost
(which issue 14 measures on its own), decides the ratio. --groups runs GQA cells too (heads_q / heads_k);
--cudnn adds torch SDPA's cuDNN backend as a third contender in the same interleave (its ratio printed as
new/cudnn), on the same bf16 buffers viewed as torch tensors in SDPA's (batch, heads, seqlen, dim) layout.
--varlen times the variable-length functions instead, on 16k tokens packed from bench_varlen.py's lengths
(--seqlens is ignored; TFLOP/s counted per sequence; no cuDNN contender).
--deterministic runs the checkout's backward in deterministic mode (against --base . : that mode's cost);
with --base-deterministic the base tree's too (an A/B of that mode).
Warm-up excluded, median of --runs samples each; prints a table and one JSON line per cell (TFLOP/s as in
bench_attention.py: 4 B H S^2 D, halved for causal, x2.5 for the backward).
"""

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def load_tree(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path / "cuflash" / "__init__.py",
                                                  submodule_search_locations=[str(path / "cuflash")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path, help="the other checkout (its cuflash/ and kernels_cu/)")
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--calls", type=int, default=8, help="calls per timed sample (1: host cost included)")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--groups", default="1", help="query heads per KV head, one cell set per value")
    ap.add_argument("--causal", default="both", choices=["both", "true", "false"])
    ap.add_argument("--cudnn", action="store_true", help="time torch SDPA's cuDNN backend alongside")
    ap.add_argument("--deterministic", action="store_true",
                    help="the checkout's backward runs with deterministic=True (with --base . : what it costs)")
    ap.add_argument("--base-deterministic", action="store_true",
                    help="with --deterministic, the base tree's backward too")
    ap.add_argument("--varlen", action="store_true", help="packed sequences through the variable-length functions")
    args = ap.parse_args()
    if args.base_deterministic and not args.deterministic:
        ap.error("--base-deterministic needs --deterministic")
    sys.path.insert(0, str(REPO))
    import cupy
    import ml_dtypes
    import cuflash
    trees = {"base": load_tree(args.base.resolve(), "cuflash_base"), "new": cuflash}
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    passes = args.passes.split(",")
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    ratios = {p: [] for p in passes}
    sdpa = _cudnn_calls() if args.cudnn else None
    if args.varlen:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_varlen import lengths
        lens = lengths(16384, np.random.default_rng(0))
        cu = cupy.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        print(f"{len(lens)} sequences of {min(lens)}..{max(lens)} tokens", flush=True)
        args.seqlens, sdpa = str(max(lens)), None
    for d in (int(x) for x in args.hdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            for group in (int(x) for x in args.groups.split(",")):
                b, h = 16384 // s, 2048 // d
                shape = (16384,) if args.varlen else (b, s)
                q, do = (cupy.asarray(rng.standard_normal(shape + (h, d), dtype=np.float32).astype(bf16)) for _ in range(2))
                k, v = (cupy.asarray(rng.standard_normal(shape + (h // group, d), dtype=np.float32).astype(bf16))
                        for _ in range(2))
                for causal in causals:
                    calls = {}
                    for label, cf in trees.items():
                        det = args.deterministic and (label == "new" or args.base_deterministic)
                        if args.varlen:
                            out, lse = cf.attention_varlen(q, k, v, cu, cu, s, s, causal=causal, return_lse=True)
                            if out.dtype != q.dtype:  # as below
                                out = out.view(q.dtype)
                            calls[("fwd", label)] = lambda cf=cf: cf.attention_varlen(q, k, v, cu, cu, s, s,
                                                                                      causal=causal)
                            calls[("bwd", label)] = (lambda cf=cf, out=out, lse=lse, det=det:
                                                     cf.attention_varlen_backward(do, q, k, v, out, lse, cu, cu, s, s,
                                                                                  causal=causal, deterministic=det))
                            continue
                        out, lse = cf.attention(q, k, v, causal=causal, return_lse=True)
                        if out.dtype != q.dtype:  # a tree from before CuPy bfloat16 outputs: raw 16-bit words
                            out = out.view(q.dtype)
                        calls[("fwd", label)] = lambda cf=cf: cf.attention(q, k, v, causal=causal)
                        calls[("bwd", label)] = (lambda cf=cf, out=out, lse=lse, det=det:
                                                 cf.attention_backward(do, q, k, v, out, lse, causal=causal,
                                                                       deterministic=det))
                    labels = list(trees)
                    if sdpa is not None:
                        calls[("fwd", "cudnn")], calls[("bwd", "cudnn")] = sdpa(q, k, v, do, causal)
                        labels.append("cudnn")
                    for pass_ in passes:
                        times = {lab: [] for lab in labels}
                        for i in range(args.runs + 5):
                            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                                start.record()
                                for _ in range(args.calls):
                                    calls[(pass_, label)]()
                                stop.record()
                                stop.synchronize()
                                if i >= 5:
                                    times[label].append(cupy.cuda.get_elapsed_time(start, stop) / args.calls)
                        work = sum(n * n for n in lens) if args.varlen else b * s * s
                        flops = 4 * h * work * d * (0.5 if causal else 1) * (2.5 if pass_ == "bwd" else 1)
                        tf = {lab: flops / statistics.median(t) / 1e9 for lab, t in times.items()}
                        ratio = tf["new"] / tf["base"]
                        ratios[pass_].append(ratio)
                        row = dict(pass_=pass_, d=d, seqlen=s, group=group, causal=causal,
                                   base_tflops=round(tf["base"], 1), new_tflops=round(tf["new"], 1),
                                   ratio=round(ratio, 4))
                        if "cudnn" in tf:
                            row.update(cudnn_tflops=round(tf["cudnn"], 1), new_over_cudnn=round(tf["new"] / tf["cudnn"], 4))
                        print(json.dumps(row), flush=True)
    for pass_, rs in ratios.items():
        if rs:
            print(f"{pass_}: geomean new/base {statistics.geometric_mean(rs):.4f}, min {min(rs):.3f}, "
                  f"max {max(rs):.3f} over {len(rs)} cells", flush=True)


def _cudnn_calls():
    """A factory of (forward, backward) callables running torch SDPA's cuDNN backend on CuPy buffers."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(q, k, v, do, causal):
        tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
        group = tq.shape[1] // tk.shape[1]
        tq = tq.detach().requires_grad_()
        tk, tv = (x.repeat_interleave(group, 1).detach().requires_grad_() if group > 1 else x.detach().requires_grad_()
                  for x in (tk, tv))

        def fwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        def bwd():
            return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)
        return fwd, bwd
    return make


if __name__ == "__main__":
    main()
