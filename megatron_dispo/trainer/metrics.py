"""Where per-step metrics go: ``metrics.jsonl`` (always), TensorBoard (always), W&B (when configured), the console.

Keys are namespaced ``{phase}/{group}/{name}`` (``train/regime1/token_frac``, ``rollout/reward/mean``,
``perf/time/rollout_s``); values are plain floats by the time they get here (``.item()`` happens once, at log time).
``metrics.jsonl`` holds one JSON object per step with a ``step`` key; on resume the file is truncated to the steps
before the resumed one, so a resumed run's file reads exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from megatron_dispo.trainer.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All step records of a run, in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no} is not a JSON object ({exc}); the file is corrupt.") from exc
    return records


def wandb_run_id(name: str) -> str:
    """W&B run id for a run directory name: the same directory maps to the same id, so a resume continues the run.

    W&B rejects ids with ``:;,#?/'`` or surrounding whitespace; those characters become ``-``.
    """
    cleaned = re.sub(r"[:;,#?/'\s]", "-", name).strip("-")
    return cleaned or "run"


class MetricsLogger:
    """Fan-out of step metrics to the JSONL file, TensorBoard, W&B and a console line."""

    def __init__(
        self,
        run_dir: str | Path,
        config: LoggingConfig,
        *,
        resume_from_step: int | None = None,
        run_config: Mapping[str, Any] | None = None,
        console: Console | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.console = console or Console(stderr=False, highlight=False)
        self.path = self.run_dir / METRICS_FILE
        if resume_from_step is not None:
            self._truncate_after(resume_from_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_from_step)
        self._wandb = None
        if config.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError(
                    "logging.wandb=true needs the wandb package: pip install 'megatron-dispo[logging]'"
                ) from exc
            name = self.run_dir.resolve().name
            self._wandb = wandb.init(
                project=config.wandb_project,
                # W&B files go next to the run's other outputs (run_dir/wandb/) unless WANDB_DIR says otherwise;
                # an explicit dir= would override the environment variable.
                dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
                mode=config.wandb_mode,
                config=dict(run_config or {}),
                resume="allow",
                id=wandb_run_id(name),
                name=name,
            )

    def _truncate_after(self, step: int) -> None:
        """Keep only records with ``step < step`` (those a checkpoint at ``step`` already covers)."""
        kept = [r for r in read_metrics(self.run_dir) if int(r["step"]) < step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            record[key] = _finite_or_none(float(value))
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), step)
            self._tb.flush()
        if self._wandb is not None:
            # Non-finite values are left out, as for TensorBoard: the step shows a gap instead of a NaN summary.
            finite = {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
            self._wandb.log(finite, step=step)
        self.console.print(self.format_line(step, metrics), soft_wrap=True)

    def format_line(self, step: int, metrics: Mapping[str, float]) -> str:
        parts = [f"step {step:>5d}"]
        for key in self.config.console_keys:
            if key in metrics:
                name = "heldout_acc" if key == "eval/heldout/accuracy" else key.split("/", 1)[-1]
                parts.append(f"{name}={float(metrics[key]):.4g}")
        return " | ".join(parts)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
