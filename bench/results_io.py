"""Where the benchmarks write (``<root>/<gpu-slug>/<name>-<stamp>.json``, a PNG beside it), and their CUDA-event
timing of back-to-back calls."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path


def result_path(root: Path, gpu: str, name: str) -> Path:
    """``<root>/<slug of the GPU's name>/<name>-<YYYYmmdd-HHMMSS>.json``, its folder created."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown-gpu"
    folder = Path(root) / slug
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1))
    print("wrote", path)


def save_png(fig, path: Path) -> None:
    """``fig`` as the PNG beside the JSON at ``path``."""
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print("wrote", path.with_suffix(".png"))


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a line saying so) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return None
    return plt


def median_ms(fn, runs: int, calls: int = 4, warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` over ``runs`` samples, each ``calls`` back-to-back calls
    between two CUDA events on the current CuPy stream (warm-up calls excluded)."""
    import statistics

    import cupy
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / calls)
    return statistics.median(samples)
