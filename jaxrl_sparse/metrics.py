"""Run folders and metric logs: `metrics.jsonl` (always), W&B (when asked), curves as PNG.

Only process 0 writes; every process may call these (multi-host runs stay one code path).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import jax
import numpy as np


def is_writer() -> bool:
    return jax.process_index() == 0


def default_workdir(job: str, model: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{job}-{os.path.basename(model.rstrip('/'))}-{stamp}")


def _clean(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if hasattr(v, "shape") and getattr(v, "shape", None) == ():
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends one JSON object per step to `<workdir>/metrics.jsonl`; mirrors to W&B if enabled.

    `truncate_after(step)` drops lines of steps > step, so a resumed run rewrites them identically.
    """

    def __init__(self, workdir: str, *, use_wandb: bool = False, wandb_project: str = "jaxrl_sparse",
                 run_config: Optional[dict] = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.wandb = None
        if is_writer():
            os.makedirs(workdir, exist_ok=True)
            if use_wandb:
                try:
                    import wandb  # optional
                except ImportError as e:
                    from jaxrl_sparse.errors import UserError
                    raise UserError("--use_wandb needs the wandb package: pip install wandb") from e
                self.wandb = wandb.init(project=wandb_project, config=run_config or {},
                                        dir=workdir, resume="allow")

    def truncate_after(self, step: int) -> None:
        if not is_writer() or not os.path.exists(self.path):
            return
        keep = [r for r in self.read() if r.get("step", -1) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Dict) -> None:
        if not is_writer():
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=int(step))

    def read(self) -> List[Dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_curves(rows: Sequence[Dict], keys: Iterable[str], path: str, title: str = "",
                smooth: int = 1) -> Optional[str]:
    """One subplot per metric key over `step`; returns the PNG path (None when nothing to draw)."""
    if not is_writer():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)
        ax.plot(x, y, alpha=0.35 if smooth > 1 else 1.0, lw=1)
        if smooth > 1 and len(y) >= smooth:
            ys = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(x[smooth - 1:], ys, lw=2, label=f"mean of {smooth}")
            ax.legend(fontsize=7)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
