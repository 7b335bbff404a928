"""Turn a benchmark JSON (bench_attention.py) into the markdown report kept as bench/results/<GPU>.md.

    python bench/report.py bench/results/<gpu>/results-<stamp>.json > bench/results/H100.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHOW = ["cuflash", "cuflash_sm80", "flash", "cudnn", "efficient", "math", "jax_cudnn", "jax_cuflash", "jax_xla"]
NAMES = {"cuflash": "cuflash", "cuflash_sm80": "cuflash sm80 kernel", "flash": "SDPA flash (FA2)", "cudnn": "SDPA cuDNN", "efficient": "SDPA efficient",
         "math": "SDPA math", "jax_cudnn": "JAX cuDNN", "jax_cuflash": "cuflash.jax", "jax_xla": "JAX XLA"}


def _fmt(x):
    return f"{x:.0f}" if x else "–"


def report(doc: dict) -> str:
    env = doc["environment"]
    rows = doc["results"]
    impls = [i for i in SHOW if any(r["impl"] == i and r.get("tflops") for r in rows)]
    out = [f"# cuflash benchmark: {env.get('gpu')}", "",
           f"- date: {env.get('date')}",
           f"- command: `{env.get('command')}`",
           f"- versions: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), cuDNN {env.get('cudnn')}, "
           f"CuPy {env.get('cupy')}, NVRTC {env.get('nvrtc')}, JAX {env.get('jax', '–')}, cuflash {env.get('cuflash')}",
           f"- FLOPs: {doc.get('flops')}; TFLOP/s from the median of CUDA-event timings, inputs rotated",
           "- grid: batch × seqlen = 16384 tokens, hidden 2048 (heads = 2048 / head dim)", ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["pass_"], r["dtype"], r["head_dim"], r["causal"]), {}).setdefault(r["seqlen"], {})[r["impl"]] = r
    for (pass_, dtype, hd, causal), by_seq in sorted(groups.items()):
        out.append(f"## {pass_}, {dtype}, head dim {hd}, {'causal' if causal else 'non-causal'} (TFLOP/s)")
        out.append("")
        head = "| seqlen | " + " | ".join(NAMES[i] for i in impls) + " | cuflash / FA2 | cuflash / cuDNN |"
        out += [head, "|" + "---|" * (len(impls) + 3)]
        for s in sorted(by_seq):
            cells = by_seq[s]
            t = {i: (cells[i].get("tflops") if i in cells else None) for i in impls}
            ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"
            out.append(f"| {s} | " + " | ".join(_fmt(t[i]) for i in impls)
                       + f" | {ratio(t.get('cuflash'), t.get('flash'))} | {ratio(t.get('cuflash'), t.get('cudnn'))} |")
        out.append("")
    mem = doc.get("memory")
    if mem:
        out += ["## Peak extra memory of forward + backward (MiB; batch 1, 16 heads, head dim 128, bf16)", ""]
        impls_m = [i for i in SHOW if i in mem.get("peak_extra_bytes", {})]
        seqs = sorted({int(s) for i in impls_m for s in mem["peak_extra_bytes"][i] if s.isdigit()})
        out += ["| seqlen | " + " | ".join(NAMES[i] for i in impls_m) + " |", "|" + "---|" * (len(impls_m) + 1)]
        for s in seqs:
            vals = [mem["peak_extra_bytes"][i].get(str(s)) for i in impls_m]
            out.append(f"| {s} | " + " | ".join(f"{v / 2**20:.0f}" if v is not None else "–" for v in vals) + " |")
        if mem.get("max_seqlen"):
            out += ["", "Longest seqlen that runs (batch 1, 16 heads, head dim 128): "
                    + ", ".join(f"{NAMES.get(k, k)} {v}" for k, v in mem["max_seqlen"].items()), ""]
    jit = doc.get("jit")
    if jit:
        out += ["## JIT and host costs", "", "```", json.dumps(jit, indent=1)[:4000], "```", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    print(report(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
