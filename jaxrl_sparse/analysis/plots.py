"""Matplotlib (Agg) figures of the analysis; inputs are plain lists/dicts from `report`."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402


def _curves(path: str, steps: Sequence[int], series: Dict[str, Sequence[float]], ylabel: str,
            title: str) -> str:
    """One curve per view over steps; NaN values are drawn as gaps (missing checkpoints)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ys in series.items():
        ys = np.asarray([np.nan if y is None else y for y in ys], dtype=float)
        style = "-" if name.startswith("tau=") else "--"
        ax.plot(steps, ys, style, marker="o", markersize=3, label=name.replace("tau=", "τ="))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def coverage_and_density(out_dir: str, steps: Sequence[int], coverage: Dict[str, Sequence[float]],
                         density: Dict[str, Sequence[float]]) -> List[str]:
    """`coverage_combined.png` and `density_combined.png` (as the seed: one curve per tau)."""
    return [
        _curves(os.path.join(out_dir, "coverage_combined.png"), steps, coverage,
                "% of final subnetwork already updated", "Coverage of the final subnetwork"),
        _curves(os.path.join(out_dir, "density_combined.png"), steps, density,
                "% of tracked weights updated", "Global update density"),
    ]


def _layer_value(rows: Sequence[dict], key: str):
    """{module: (layers, values)} for stacked modules; {module: value} for unstacked ones."""
    stacked: Dict[str, list] = {}
    single: Dict[str, float] = {}
    for r in rows:
        if r["layer"] is None:
            single[r["module"]] = r[key]
        else:
            stacked.setdefault(r["module"], []).append((r["layer"], r[key]))
    return {m: tuple(zip(*sorted(v))) for m, v in stacked.items()}, single


def layer_ranks(path: str, rows: Sequence[dict]) -> str:
    """Rank / min(m, n) of ΔW per layer (classical, effective, stable), one line per module;
    unstacked matrices (lm_head) are drawn as a marker right of the last layer."""
    keys = [("rank", "classical rank"), ("effective_rank", "effective rank"),
            ("stable_rank", "stable rank")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    n_layers = 1 + max([r["layer"] for r in rows if r["layer"] is not None], default=-1)
    for ax, (key, label) in zip(axes, keys):
        frac = [dict(r, _v=r[key] / max(min(r["rows"], r["cols"]), 1)) for r in rows]
        stacked, single = _layer_value(frac, "_v")
        for m, (ls, vs) in stacked.items():
            ax.plot(ls, vs, marker="o", markersize=3, label=m)
        for m, v in single.items():
            ax.plot([n_layers], [v], marker="*", markersize=10, linestyle="none", label=m)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("layer" + (" (★ = unstacked matrix)" if single else ""))
        ax.set_ylabel(f"{label} / min(m, n)")
        ax.set_title(f"{label} of ΔW = W_final − W_0")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def density_heatmap(path: str, rows: Sequence[dict], tau: Optional[float]) -> str:
    """Layer × module heatmap of % updated entries; the last row '-' holds unstacked matrices."""
    modules = sorted({r["module"] for r in rows})
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    has_single = any(r["layer"] is None for r in rows)
    labels = [str(l) for l in layers] + (["-"] if has_single else [])
    grid = np.full((len(labels), len(modules)), np.nan)
    for r in rows:
        i = len(layers) if r["layer"] is None else layers.index(r["layer"])
        grid[i, modules.index(r["module"])] = r["density"]
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 3, 0.22 * len(labels) + 2.5))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right", fontsize=8)
    step = max(1, math.ceil(len(labels) / 32))
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
    ax.set_ylabel("layer")
    tau_s = f" (τ={tau:g})" if tau is not None else ""
    ax.set_title(f"% of entries updated, final step{tau_s}")
    fig.colorbar(im, ax=ax, label="% updated")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
