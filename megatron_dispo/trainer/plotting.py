"""Learning-curve PNGs from run directories, in the spirit of the paper's Figs. 5-8.

Runs sharing a label are seeds of one configuration: the plot shows their mean and a min-max band, so a claim such as
"Regime 1 raises entropy" is judged on the spread, not one lucky seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from megatron_dispo.trainer.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    """Metric keys drawn in this panel; the first one present in a run is used (several for regime fractions)."""
    ylabel: str
    overlay_keys: bool = False
    """Draw every key (e.g. the four regimes) instead of the first present one."""


DEFAULT_PANELS: tuple[Panel, ...] = (
    Panel("Held-out accuracy", ("eval/heldout/accuracy", "eval/accuracy"), "accuracy"),
    Panel("Rollout accuracy", ("rollout/accuracy",), "accuracy"),
    Panel("Token entropy", ("train/entropy",), "nats / token"),
    Panel("Response length", ("rollout/response/len_mean",), "tokens"),
    Panel(
        "Regime token fractions",
        tuple(f"train/regime{k}/token_frac" for k in range(1, 5)),
        "fraction of tokens",
        overlay_keys=True,
    ),
    Panel("Repetition-truncated responses", ("rollout/finish/repetition_frac",), "fraction"),
    Panel("Length-truncated responses", ("rollout/finish/length_frac",), "fraction"),
)


def series(records: Sequence[Mapping[str, float | None]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key``, skipping steps where it is absent or not finite."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is not None and np.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return np.asarray(steps), np.asarray(values)


def aggregate_seeds(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds at the steps every seed has: (steps, mean, low, high)."""
    common = set(curves[0][0].tolist())
    for steps, _ in curves[1:]:
        common &= set(steps.tolist())
    grid = np.asarray(sorted(common))
    if grid.size == 0:
        return grid, grid.astype(float), grid.astype(float), grid.astype(float)
    stacked = np.stack([values[np.searchsorted(steps, grid)] for steps, values in curves])
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def plot_runs(
    runs: Mapping[str, Sequence[str | Path]],
    out_dir: str | Path,
    panels: Sequence[Panel] = DEFAULT_PANELS,
) -> list[Path]:
    """Write one PNG per panel (plus ``summary.png`` with all panels) for ``{label: [run_dir, ...]}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {label: [read_metrics(d) for d in dirs] for label, dirs in runs.items()}
    for label, dirs in runs.items():
        for run_dir, recs in zip(dirs, records[label], strict=True):
            if not recs:
                raise FileNotFoundError(f"run {label!r}: {run_dir} has no metrics.jsonl records")
    written = []
    ncols = 3
    nrows = -(-len(panels) // ncols)
    summary, summary_axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for index, panel in enumerate(panels):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in (ax, summary_axes[index // ncols][index % ncols]):
            _draw_panel(target, panel, records)
        fig.tight_layout()
        path = out_dir / f"{_slug(panel.title)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for index in range(len(panels), nrows * ncols):
        summary_axes[index // ncols][index % ncols].axis("off")
    summary.tight_layout()
    summary_path = out_dir / "summary.png"
    summary.savefig(summary_path, dpi=100)
    plt.close(summary)
    written.append(summary_path)
    return written


def _draw_panel(ax: plt.Axes, panel: Panel, records: Mapping[str, list[list[dict]]]) -> None:
    drawn = False
    linestyles = ("-", "--", ":", "-.")
    for color_index, (label, seeds) in enumerate(records.items()):
        color = f"C{color_index % 10}"
        keys = panel.keys if panel.overlay_keys else _first_present(panel.keys, seeds)
        for key_index, key in enumerate(keys):
            curves = [series(recs, key) for recs in seeds]
            curves = [c for c in curves if c[0].size]
            if not curves:
                continue
            steps, mean, low, high = aggregate_seeds(curves)
            if steps.size == 0:
                continue
            name = label if not panel.overlay_keys else f"{label} · {key.split('/')[-2]}"
            style = linestyles[key_index % len(linestyles)] if panel.overlay_keys else "-"
            ax.plot(steps, mean, style, color=color, label=name + (f" (n={len(curves)})" if len(curves) > 1 else ""))
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.18, linewidth=0)
            drawn = True
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def _first_present(keys: Sequence[str], seeds: Sequence[Sequence[Mapping]]) -> tuple[str, ...]:
    for key in keys:
        if any(key in record for recs in seeds for record in recs):
            return (key,)
    return ()


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")
