#!/usr/bin/env python
"""Asynchronous DISPO on a workload with a tail: colocated vs dedicated vs partial rollouts, same ranks, one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_async_tail.py --model runs/regime_control/warmup/seed0/warmup_model \
        [--worlds 2 3] [--steps 6]
    ... --model runs/regime_control/warmup/seed{seed}/warmup_model --accuracy-steps 12 --skip-timing  # 3 seeds

The workload is the regime-control study's (``examples/regime_control/base.yaml``): the demo Qwen3 warmed up on
chained arithmetic answered with a written chain of thought, responses of p50 ~108 / max ~224 tokens
(``bench_decode_batch.py``), 12 prompts x 8 responses per step, dynamic sampling off (``WORKLOAD``). Arms, each under
``torchrun --nproc_per_node=W`` for every world size W:

- ``colocated``: every rank generates (one engine replica each) and trains (DP=W);
- ``dedicated k=1``: rank 0 trains, the other W-1 ranks run engine replicas, one batch generated ahead;
- ``dedicated k=2``: the same, two batches ahead;
- ``partial k=2``: ``dedicated k=2`` with ``rollout.partial=true``: responses advance in chunks, a batch is cut as
  soon as it holds its groups and the responses still running continue under the next weights (one batch ahead, the
  oldest token two versions behind, the bound ``k=2`` allows).

Step time = mean trainer ``perf/time/step_s`` over steps 2..N; idle times per step: the trainer's wait for rollout
(``perf/time/wait_for_rollout_s``) and the rollout driver's time between two batches (``perf/time/rollout_idle_s``).
Ratios printed: colocated / arm (above 1: the arm is faster). ``--accuracy-steps N``: also the held-out accuracy
(64 problems x 2 samples) after N steps of colocated and partial k=2 at world 2 for each of ``--seeds`` (one warm-up
model per seed), their means with standard errors and whether they differ by more than colocated's.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402

CONFIG = REPO / "examples" / "regime_control" / "base.yaml"
WORKLOAD = (
    "trainer.prompts_per_step=12",
    "trainer.num_minibatches=2",
    "algorithm.dynamic_sampling.enabled=false",
    "eval.every_steps=0",
    "trainer.checkpoint_every=0",
)
"""12 prompts split into 2 mini-batches divide over DP = 1, 2 and 3. Dynamic sampling off: every arm then generates
and trains exactly the batch's 12 groups per step. With it on, at the warm-up model's ~5 % accuracy, the colocated
and plain dedicated collectors end most steps at ``max_rounds`` with a partly filled batch while partial rollouts keep
sampling until the batch is full (measured: 34-54 vs 52-96 groups sampled per step), so the arms would not do the
same work."""
ARMS: dict[str, tuple[str, ...]] = {
    "colocated": (),
    "dedicated k=1": ("rollout.placement=dedicated", "trainer.max_staleness=1"),
    "dedicated k=2": ("rollout.placement=dedicated", "trainer.max_staleness=2"),
    "partial k=2": ("rollout.placement=dedicated", "trainer.max_staleness=2", "rollout.partial=true"),
}


def run_arm(model: Path, run_dir: Path, world: int, steps: int, overrides: tuple[str, ...], *extra: str) -> list[dict]:
    dedicated = any(o == "rollout.placement=dedicated" for o in overrides)
    ranks = (f"rollout.num_ranks={world - 1}",) if dedicated else ()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        "-m", "megatron_dispo", "train", str(CONFIG), f"model.hf_path={model}", f"trainer.run_dir={run_dir}",
        f"trainer.max_steps={steps}", *WORKLOAD, *overrides, *ranks, *extra,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return [r for r in read_metrics(run_dir) if r["step"] >= 2]


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    spread = stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean(values), spread


def accuracy_after(args: argparse.Namespace, work: Path, console: Console) -> None:
    """Held-out accuracy after ``--accuracy-steps`` steps for each seed, colocated vs partial k=2 (world 2)."""
    final: dict[str, list[float]] = {}
    for seed in args.seeds:
        model = Path(args.model.format(seed=seed))
        for name in ("colocated", "partial k=2"):
            run_dir = work / f"accuracy_{name.replace(' ', '_')}_seed{seed}"
            extra = (f"eval.every_steps={args.accuracy_steps}", f"trainer.seed={1234 + seed}", f"rollout.seed={seed}")
            records = run_arm(model, run_dir, 2, args.accuracy_steps, ARMS[name], *extra)
            accuracy = [r["eval/heldout/accuracy"] for r in records if "eval/heldout/accuracy" in r][-1]
            final.setdefault(name, []).append(accuracy)
            console.print(f"seed {seed} {name}: held-out accuracy after {args.accuracy_steps} steps {accuracy:.4f}")
    (col, col_se), (par, par_se) = (mean_and_standard_error(final[n]) for n in ("colocated", "partial k=2"))
    verdict = "within" if abs(par - col) <= col_se * (1 + 1e-9) else "outside"  # a tie is within
    console.print(
        f"[bold]held-out accuracy, {len(args.seeds)} seeds: colocated {col:.4f} +- {col_se:.4f} (standard error), "
        f"partial k=2 {par:.4f} +- {par_se:.4f}; difference {par - col:+.4f}, {verdict} one standard error of colocated"
    )


def per_step(records: list[dict], key: str) -> float:
    return mean(r.get(key, 0.0) for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="the chain-of-thought warm-up model (regime-control study); {seed} per seed"
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--accuracy-steps", type=int, default=0, help="also: held-out accuracy after N steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the accuracy runs")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    for seed in args.seeds if args.accuracy_steps else args.seeds[:1]:
        if not (Path(args.model.format(seed=seed)) / "config.json").is_file():
            raise SystemExit(
                f"error: --model {args.model.format(seed=seed)} has no config.json; build it with "
                "examples/regime_control/run_study.py (its warm-up) or pass its warmup_model folder."
            )
    model = Path(args.model.format(seed=args.seeds[0]))
    console = Console(highlight=False)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_async_tail_"))
    for world in [] if args.skip_timing else args.worlds:
        timed: dict[str, float] = {}
        for name in args.arms:
            started = time.perf_counter()
            records = run_arm(model, work / f"w{world}_{name.replace(' ', '_')}", world, args.steps, ARMS[name])
            timed[name] = per_step(records, "perf/time/step_s")
            waits = per_step(records, "perf/time/wait_for_rollout_s"), per_step(records, "perf/time/rollout_idle_s")
            console.print(
                f"world {world} {name}: {timed[name]:.2f} s/step over steps 2..{args.steps}; rollout "
                f"{per_step(records, 'perf/time/rollout_s'):.2f} s, trainer waits {waits[0]:.2f} s, rollout idle "
                f"{waits[1]:.2f} s per step; partial share {per_step(records, 'rollout/partial/share'):.2f}, token "
                f"lag mean {per_step(records, 'rollout/token_version_lag/mean'):.2f}; response len max "
                f"{per_step(records, 'rollout/response/len_max'):.0f} (run {time.perf_counter() - started:.0f} s)"
            )
        if "colocated" in timed:
            ratios = ", ".join(
                f"{name} {timed['colocated'] / t:.2f}x" for name, t in timed.items() if name != "colocated"
            )
            console.print(f"[bold]world {world}: colocated / arm: {ratios}")
    if args.accuracy_steps:
        accuracy_after(args, work, console)
    console.print(f"runs kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
