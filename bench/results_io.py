"""Where the benchmarks write: ``<root>/<gpu-slug>/<name>-<stamp>.json`` (and a PNG beside it)."""

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
