"""MetricsLogger: JSONL with a step key, TensorBoard events, resume truncation, non-finite values."""

from __future__ import annotations

import io
import math

from rich.console import Console

from megatron_dispo.trainer.metrics import LoggingConfig, MetricsLogger, read_metrics


def _logger(tmp_path, **kwargs):
    console = Console(file=io.StringIO(), width=200)
    return MetricsLogger(tmp_path, LoggingConfig(), console=console, **kwargs), console


def test_jsonl_tensorboard_and_console_line(tmp_path):
    logger, console = _logger(tmp_path)
    logger.log(1, {"rollout/accuracy": 0.25, "train/loss": -0.5, "train/nan_metric": math.nan})
    logger.log(2, {"rollout/accuracy": 0.5, "train/loss": -0.25})
    logger.close()
    records = read_metrics(tmp_path)
    assert records == [
        {"step": 1, "rollout/accuracy": 0.25, "train/loss": -0.5, "train/nan_metric": None},
        {"step": 2, "rollout/accuracy": 0.5, "train/loss": -0.25},
    ]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    out = console.file.getvalue()
    assert "step     1 | accuracy=0.25 | loss=-0.5" in out


def test_resume_truncates_steps_at_and_after_the_checkpoint(tmp_path):
    logger, _ = _logger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    logger, _ = _logger(tmp_path, resume_from_step=4)
    logger.log(4, {"train/loss": 40.0})
    logger.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_new_run_starts_a_fresh_file(tmp_path):
    logger, _ = _logger(tmp_path)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    logger, _ = _logger(tmp_path)
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}]
