"""Decoding (issue 16): one query per sequence against a KV cache, GQA, as a decode step runs it, in one
process: K and V bytes read per second; then a prefill into a cache against the dense forward.

    python bench/bench_decode.py [--cells 8x32768,64x8192,128x4096,1x131072,1x8192] [--runs 20]
                                 [--out bench/results]

q (batch, 1, 32, 128), caches (batch, length, 8, 128), bf16, every cache full (cache_seqlens = length); the
cells are issue 16's. Contenders, CUDA events around back-to-back calls (median of --runs samples of 4
calls, warm-up excluded; a decode loop's calls after the first are bound, executor.BoundSequence):

- cuflash.attention_with_kvcache (no new keys: attention over the cache only), with its split-KV choice
  and with num_splits=1;
- the same over a paged cache (page size 16, pages in a random order);
- the same with the query heads of a group not packed into one tile (api.decode_groups forced to 1): what
  the packing gains;
- cuflash.attention on the same arrays (the dense path, also packed);
- SDPA's cuDNN, flash and memory-efficient backends with enable_gqa, where this torch runs them;
- ours and SDPA's cuDNN captured in a CUDA graph and replayed (the GPU's share alone, as a serving loop
  with graphs runs a step).

Bandwidth counts the cache bytes each call must read once (2 * batch * length * 8 * 128 * 2 bytes); a
call short enough to be host-bound reads as slow here, as it does in an eager decode loop (microseconds
per call are printed beside it). Prefill: 512 new tokens appended onto 8192 cached keys, causal, batch 4,
against cuflash.attention over the same 8704 keys (TFLOP/s of the same count). Prints a table and writes
``decode-<stamp>.json`` and a PNG under ``<out>/<gpu-slug>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import results_io

REPO = Path(__file__).resolve().parent.parent
HQ, HK, D = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="8x32768,64x8192,128x4096,1x131072,1x8192")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    rows = []
    for cell in args.cells.split(","):
        batch, length = (int(x) for x in cell.split("x"))
        result, micros = _decode_cell(torch, batch, length, args.runs)
        rows.append({"batch": batch, "length": length, "tb_per_s": result, "us_per_call": micros})
        best = max((v for k, v in result.items() if k.startswith("SDPA") and "graph" not in k), default=float("nan"))
        nan = float("nan")
        graphed = result.get("cuflash kvcache, CUDA graph", nan) / result.get("SDPA cudnn, CUDA graph", nan)
        line = "  ".join(f"{k} {v:5.2f}" for k, v in result.items())
        print(f"b={batch:3d} L={length:6d}  TB/s: {line}  | kvcache {micros['cuflash kvcache']:.1f} us "
              f"({micros.get('cuflash kvcache, CUDA graph', nan):.1f} graphed), / best SDPA "
              f"{result['cuflash kvcache'] / best:.2f} (graphed / cuDNN graphed {graphed:.2f}), paged / contiguous "
              f"{result['cuflash kvcache, paged 16'] / result['cuflash kvcache']:.2f}", flush=True)
    prefill = _prefill(torch, args.runs)
    print(f"prefill 512 onto 8192 keys, batch 4: kvcache {prefill['kvcache']:.0f} TFLOP/s, dense "
          f"{prefill['dense']:.0f}, ratio {prefill['kvcache'] / prefill['dense']:.2f}")
    path = results_io.result_path(args.out, torch.cuda.get_device_name(), "decode")
    results_io.write_json(path, {"heads_q": HQ, "heads_k": HK, "head_dim": D, "dtype": "bfloat16", "rows": rows,
                                 "prefill_tflops": prefill})
    plt = results_io.pyplot()
    if plt is not None:
        names = list(rows[0]["tb_per_s"])
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(rows))], [r["tb_per_s"].get(name, 0) for r in rows], width,
                   label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([f"{r['batch']} x {r['length']}" for r in rows])
        ax.set_ylabel("K/V read, TB/s")
        ax.set_title(f"Decoding, bf16, 32 query / 8 KV heads, head dim 128 ({torch.cuda.get_device_name()})")
        ax.legend(fontsize=7)
        results_io.save_png(fig, path)


def _decode_cell(torch, batch, length, runs):
    """TB/s of every contender and microseconds per call of ours, at one (batch, length) cell."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import api, executor
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(batch, length, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    page = 16
    pages = batch * length // page
    table = torch.randperm(pages, device="cuda", dtype=torch.int32).reshape(batch, -1)
    kp, vp = (torch.empty(pages, page, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for dst, src in ((kp, kc), (vp, vc)):
        dst[table.flatten().long()] = src.reshape(pages, page, HK, D)
    nbytes = 2 * kc.numel() * kc.element_size()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, kc, vc))
    cases = {
        "cuflash kvcache": lambda: cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=length),
        "cuflash kvcache, no split": lambda: cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=length,
                                                                           num_splits=1),
        "cuflash kvcache, paged 16": lambda: cuflash.attention_with_kvcache(q, kp, vp, cache_seqlens=length,
                                                                           block_table=table),
        "cuflash dense": lambda: cuflash.attention(q, kc, vc),
    }
    for name, backend in (("SDPA cudnn", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION),
                          ("SDPA mem-eff", SDPBackend.EFFICIENT_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        cases[name] = sdpa
    for name in ("cuflash kvcache", "SDPA cudnn"):
        try:
            cases[name + ", CUDA graph"] = _graphed(torch, cases[name])
        except RuntimeError as e:
            print(f"  {name}, CUDA graph: skipped ({str(e).splitlines()[0][:80]})")
    result, micros = {}, {}
    for name, fn in cases.items():
        try:
            ms = results_io.median_ms(fn, runs)
        except RuntimeError as e:  # a backend that refuses the shape
            print(f"  {name}: skipped ({str(e).splitlines()[0][:80]})")
            continue
        result[name], micros[name] = nbytes / ms / 1e9, ms * 1e3
    original = api.decode_groups
    api.decode_groups = lambda *a: 1
    executor.clear()  # (bound calls keep the packing they were recorded with)
    try:
        ms = results_io.median_ms(cases["cuflash kvcache"], runs)
        result["cuflash kvcache, unpacked"], micros["cuflash kvcache, unpacked"] = nbytes / ms / 1e9, ms * 1e3
    finally:
        api.decode_groups = original
        executor.clear()
    return result, micros


def _graphed(torch, fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs asks): its
    replay, the GPU time of a decode step without the host's share, as a serving loop runs it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _prefill(torch, runs, batch=4, cached=8192, new=512):
    """TFLOP/s of attention_with_kvcache appending ``new`` causal queries onto ``cached`` keys, and of the
    dense forward over the same keys (bottom-right causal: query i sees cached + i + 1 keys)."""
    import cuflash
    q = torch.randn(batch, new, HQ, D, device="cuda", dtype=torch.bfloat16)
    kn, vn = (torch.randn(batch, new, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(batch, cached + new, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 4 * batch * HQ * D * (new * cached + new * (new + 1) / 2)
    kvcache = results_io.median_ms(lambda: cuflash.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=cached,
                                                                          causal=True), runs)
    dense = results_io.median_ms(lambda: cuflash.attention(q, kc, vc, causal=True), runs)
    return {"kvcache": flops / kvcache / 1e9, "dense": flops / dense / 1e9}


if __name__ == "__main__":
    main()
