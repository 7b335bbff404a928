"""Charts of a bench_attention.py results file.

    python bench/plot.py bench/results/<gpu>/results-<stamp>.json [--out DIR]

One PNG per (dtype, pass): a grid of panels, rows = without / with causal mask, columns = head dim; in each
panel grouped bars per sequence length, one bar per implementation, labelled with its TFLOP/s. With memory
results in the file, also a peak-memory chart (MiB vs seqlen) and a longest-seqlen chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PASS_TITLE = {"fwd": "Forward pass", "bwd": "Backward pass", "fwdbwd": "Forward + backward pass"}
ORDER = ("cuflash", "cuflash_sm80", "flash", "cudnn", "efficient", "math", "jax_cudnn", "jax_cuflash", "jax_xla")
LABEL = {"cuflash": "cuflash", "cuflash_sm80": "cuflash sm80 kernel", "flash": "SDPA flash", "cudnn": "SDPA cuDNN", "efficient": "SDPA mem-efficient",
         "math": "SDPA math", "jax_cudnn": "JAX cuDNN", "jax_cuflash": "cuflash.jax", "jax_xla": "JAX XLA"}
COLOR = {"cuflash": "#d62728", "cuflash_sm80": "#e377c2", "flash": "#1f77b4", "cudnn": "#2ca02c", "efficient": "#ff7f0e",
         "math": "#7f7f7f", "jax_cudnn": "#9467bd",
         "jax_cuflash": "#8c564b", "jax_xla": "#17becf"}

# Backends with identical memory curves overlap: distinct markers and dashes keep each one visible.
MARKER = {"cuflash": "o", "cuflash_sm80": "x", "flash": "s", "cudnn": "^", "efficient": "v", "math": "D", "jax_cudnn": "P",
          "jax_cuflash": "*", "jax_xla": "h"}
DASH = {"cuflash": "-", "cuflash_sm80": ":", "flash": "--", "cudnn": "-.", "efficient": ":", "math": "-", "jax_cudnn": "--",
        "jax_cuflash": "-.", "jax_xla": ":"}


def _seqlen_label(s):
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(doc: dict, out_dir: Path, stem: str = "chart") -> list:
    """Write the charts of a results document; returns the PNG paths."""
    plt = _mpl()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = (doc.get("environment") or {}).get("gpu") or "GPU"
    rows = [r for r in doc.get("results", []) if r.get("tflops")]
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for pass_ in [p for p in PASS_TITLE if any(r["pass_"] == p and r["dtype"] == dtype for r in rows)]:
            sub = [r for r in rows if r["dtype"] == dtype and r["pass_"] == pass_]
            hdims = sorted({r["head_dim"] for r in sub})
            causals = sorted({r["causal"] for r in sub})
            impls = [i for i in ORDER if any(r["impl"] == i for r in sub)]
            fig, axes = plt.subplots(len(causals), len(hdims), squeeze=False,
                                     figsize=(6.4 * len(hdims), 4.2 * len(causals)))
            for ri, causal in enumerate(causals):
                for ci, hd in enumerate(hdims):
                    ax = axes[ri][ci]
                    cell = [r for r in sub if r["causal"] == causal and r["head_dim"] == hd]
                    seqlens = sorted({r["seqlen"] for r in cell})
                    width = 0.8 / max(len(impls), 1)
                    for k, impl in enumerate(impls):
                        val = {r["seqlen"]: r["tflops"] for r in cell if r["impl"] == impl}
                        xs = [i + (k - (len(impls) - 1) / 2) * width for i, s in enumerate(seqlens) if s in val]
                        ys = [val[s] for s in seqlens if s in val]
                        bars = ax.bar(xs, ys, width, label=LABEL.get(impl, impl), color=COLOR.get(impl))
                        for b, y in zip(bars, ys):
                            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.0f}", ha="center", va="bottom",
                                    fontsize=6.5)
                    ax.set_xticks(range(len(seqlens)))
                    ax.set_xticklabels([_seqlen_label(s) for s in seqlens])
                    ax.set_xlabel("Sequence length")
                    ax.set_ylabel("Speed (TFLOP/s)")
                    ax.set_title(f"{'With' if causal else 'Without'} causal mask, head dim {hd}", fontsize=10)
                    ax.grid(axis="y", alpha=0.3)
                    ax.set_axisbelow(True)
                    ax.spines[["top", "right"]].set_visible(False)
                    ymax = max([r["tflops"] for r in cell] or [1])
                    ax.set_ylim(0, ymax * 1.15)
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper center", ncol=len(impls), frameon=False,
                       bbox_to_anchor=(0.5, 0.995))
            fig.suptitle(f"Attention {PASS_TITLE[pass_].lower()} speed, {dtype} ({gpu})", y=1.04)
            fig.tight_layout()
            path = out_dir / f"{stem}-{pass_}-{dtype}.png"
            fig.savefig(path, dpi=130, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    mem = doc.get("memory")
    if mem and mem.get("peak_extra_bytes"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for impl in [i for i in ORDER if i in mem["peak_extra_bytes"]]:
            pts = sorted((int(s), b) for s, b in mem["peak_extra_bytes"][impl].items() if s.isdigit())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 2 ** 20 for p in pts], marker=MARKER.get(impl, "o"),
                        linestyle=DASH.get(impl, "-"), label=LABEL.get(impl, impl), color=COLOR.get(impl),
                        alpha=0.85)
        st = mem.get("setting", {})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Sequence length")
        ax.set_ylabel("Peak memory beyond q, k, v, dout (MiB)")
        ax.set_title(f"Forward + backward memory beyond inputs, batch {st.get('batch')}, {st.get('heads')} heads, "
                     f"hd {st.get('head_dim')} ({gpu})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        path = out_dir / f"{stem}-memory.png"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if mem and mem.get("max_seqlen"):
        items = [(i, mem["max_seqlen"][i].get("seqlen") or 0) for i in ORDER if i in mem["max_seqlen"]]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        bars = ax.bar([LABEL.get(i, i) for i, _ in items], [s for _, s in items],
                      color=[COLOR.get(i) for i, _ in items])
        for b, (_, s) in zip(bars, items):
            ax.text(b.get_x() + b.get_width() / 2, s, _seqlen_label(s) if s else "-", ha="center", va="bottom")
        ax.set_yscale("log", base=2)
        ax.set_ylabel("Longest sequence length")
        ax.set_title(f"Longest forward + backward at batch 1 ({gpu})", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        path = out_dir / f"{stem}-max-seqlen.png"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_file(json_path, out_dir=None) -> list:
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    return plot_results(doc, Path(out_dir) if out_dir else json_path.parent, stem=json_path.stem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot a bench_attention.py results JSON file")
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to the JSON)")
    a = p.parse_args(argv)
    try:
        paths = plot_file(a.json, a.out)
    except ImportError as e:
        print(f"plotting needs matplotlib: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
