"""Decoding (issue 16): one query per sequence against a KV cache, GQA, as a decode step runs it, in one
process: K and V bytes read per second.

    python bench/bench_decode.py [--batches 1,8,32] [--lengths 1024,8192,32768] [--runs 20] [--out bench/results]

q (batch, 1, 32, 128), caches (batch, length, 8, 128), bf16, every cache full (cache_seqlens = length).
Contenders, CUDA events around back-to-back calls (median of --runs samples of 4 calls, warm-up excluded):

- cuflash.attention_with_kvcache (no new keys: attention over the cache only), with its split-KV choice
  and with num_splits=1;
- the same with the query heads of a group not packed into one tile (api.decode_groups forced to 1): what
  the packing gains;
- cuflash.attention on the same arrays (the dense path, also packed);
- SDPA's cuDNN, flash and memory-efficient backends with enable_gqa, where this torch runs them.

Bandwidth counts the cache bytes each call must read once (2 * batch * length * 8 * 128 * 2 bytes); a
call short enough to be host-bound reads as slow here, as it does in an eager decode loop. Prints a table
and writes ``decode-<stamp>.json`` under ``<out>/<gpu-slug>/``.
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
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="1024,8192,32768")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import api, executor
    rows = []
    for batch in (int(x) for x in args.batches.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
            kc, vc = (torch.randn(batch, length, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            nbytes = 2 * kc.numel() * kc.element_size()
            qt, kt, vt = (x.transpose(1, 2) for x in (q, kc, vc))
            cases = {
                "cuflash kvcache": lambda: cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=length),
                "cuflash kvcache, no split": lambda: cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=length,
                                                                                   num_splits=1),
                "cuflash dense": lambda: cuflash.attention(q, kc, vc),
            }
            for name, backend in (("SDPA cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("SDPA flash", SDPBackend.FLASH_ATTENTION),
                                  ("SDPA mem-eff", SDPBackend.EFFICIENT_ATTENTION)):
                def sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                cases[name] = sdpa
            result = {}
            for name, fn in cases.items():
                try:
                    ms = results_io.median_ms(fn, args.runs)
                except RuntimeError as e:  # a backend that refuses the shape
                    print(f"  {name}: skipped ({str(e).splitlines()[0][:80]})")
                    continue
                result[name] = nbytes / ms / 1e9
            original = api.decode_groups
            api.decode_groups = lambda *a: 1
            try:
                result["cuflash kvcache, unpacked"] = nbytes / results_io.median_ms(cases["cuflash kvcache"],
                                                                                     args.runs) / 1e9
            finally:
                api.decode_groups = original
                executor._forward.clear()
            rows.append({"batch": batch, "length": length, "tb_per_s": result})
            best = max((v for k, v in result.items() if k.startswith("SDPA")), default=float("nan"))
            line = "  ".join(f"{k} {v:5.2f}" for k, v in result.items())
            ratio = result["cuflash kvcache"] / best
            print(f"b={batch:3d} L={length:6d}  TB/s: {line}  | kvcache / best SDPA {ratio:.2f}", flush=True)
    path = results_io.result_path(args.out, torch.cuda.get_device_name(), "decode")
    results_io.write_json(path, {"heads_q": HQ, "heads_k": HK, "head_dim": D, "dtype": "bfloat16", "rows": rows})


if __name__ == "__main__":
    main()
