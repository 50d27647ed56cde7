#!/usr/bin/env python
"""Does a resumed run continue exactly? One uninterrupted run against the same run resumed from a checkpoint.

    python tools/resume_check.py --steps 3 --resume-after 1 CONFIG [dotted overrides ...] [--nproc 2]

Trains ``--steps`` steps with a checkpoint every ``--resume-after`` steps; copies the run directory as a run stopped
after step ``--resume-after`` would have left it (later checkpoints removed); resumes the copy to ``--steps``; and
compares every non-timing metric of the steps after the checkpoint, exactly (``==`` on the logged floats). Prints
one line per step (metrics compared, equal, differing) and the ``--show`` metrics side by side; exits 1 on any
difference. Both runs use the same launcher (``torchrun`` with ``--nproc`` > 1), config and overrides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402

TIMING = ("perf/", "seconds", "time_s", "_s/", "gb_per_s", "tokens_per_s", "replica_imbalance", "wait_for", "/time/")
"""Substrings of metric names that measure wall-clock time (they differ between any two runs)."""


def non_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and not any(t in k for t in TIMING)}


def train(config: str, overrides: list[str], run_dir: Path, steps: int, nproc: int, *extra: str) -> None:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "megatron_dispo", "train", config, *overrides, f"trainer.run_dir={run_dir}",
           f"trainer.max_steps={steps}", *extra]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: training failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def copy_until(run_dir: Path, into: Path, step: int) -> None:
    """``run_dir`` as a run stopped after ``step`` leaves it: the later checkpoints gone."""
    shutil.copytree(run_dir, into)
    for checkpoint in (into / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    if not (into / "checkpoints" / f"step_{step:06d}").is_dir():
        raise SystemExit(f"error: {run_dir} has no checkpoint at step {step}")
    (into / "checkpoints" / "latest").write_text(str(step), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume-after", type=int, required=True, help="the checkpoint's step")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--show", default="control/", help="print these metrics (a name prefix) side by side")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    if not 1 <= args.resume_after < args.steps:
        raise SystemExit(f"error: --resume-after={args.resume_after} must be in [1, --steps={args.steps}).")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="resume_check_"))
    full, resumed = work / "uninterrupted", work / "resumed"
    every = f"trainer.checkpoint_every={args.resume_after}"
    keep = f"trainer.keep_last={args.steps}"  # the checkpoint to resume from must survive the later ones
    train(args.config, args.overrides, full, args.steps, args.nproc, every, keep)
    copy_until(full, resumed, args.resume_after)
    train(args.config, args.overrides, resumed, args.steps, args.nproc, every, keep, "trainer.resume=true")

    want = {int(r["step"]): r for r in read_metrics(full)}
    got = {int(r["step"]): r for r in read_metrics(resumed)}
    failed = False
    for step in range(args.resume_after + 1, args.steps + 1):
        expected, actual = non_timing(want[step]), non_timing(got.get(step, {}))
        differing = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        failed |= bool(differing)
        print(f"step {step}: {len(expected)} non-timing metrics, {len(expected) - len(differing)} equal, "
              f"{len(differing)} differ{': ' + ', '.join(differing[:12]) if differing else ''}")  # fmt: skip
        for key in sorted(k for k in expected if k.startswith(args.show)):
            print(f"    {key:<40} {expected[key]!r:>24} {actual.get(key)!r:>24}")
    print(f"runs kept in {work}")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
