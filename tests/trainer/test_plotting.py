"""plot_run: seeds aggregate to mean/min/max on shared steps; PNGs are written for every panel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_dispo.trainer.plotting import DEFAULT_PANELS, aggregate_seeds, series

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_series_skips_missing_and_nonfinite():
    records = [{"step": 1, "a": 1.0}, {"step": 2}, {"step": 3, "a": None}, {"step": 4, "a": 4.0}]
    steps, values = series(records, "a")
    assert steps.tolist() == [1, 4] and values.tolist() == [1.0, 4.0]


def test_aggregate_uses_common_steps():
    a = (np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([2, 3, 4]), np.array([5.0, 6.0, 7.0]))
    steps, mean, low, high = aggregate_seeds([a, b])
    assert steps.tolist() == [2, 3]
    assert mean.tolist() == [3.5, 4.5] and low.tolist() == [2.0, 3.0] and high.tolist() == [5.0, 6.0]


def test_cli_writes_pngs(tmp_path):
    rows = [
        {"step": s, "rollout/accuracy": 0.1 * s, "train/entropy": 1.0 / s, "train/regime1/token_frac": 0.25}
        for s in range(1, 6)
    ]
    _write_run(tmp_path / "s0", rows)
    _write_run(tmp_path / "s1", rows)
    out = tmp_path / "plots"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "plot_run.py"), f"dispo={tmp_path / 's0'},{tmp_path / 's1'}"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(DEFAULT_PANELS) + 1 and "summary.png" in pngs
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([*cmd[:2], str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "has no metrics.jsonl" in bad.stderr
