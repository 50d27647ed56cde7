#!/usr/bin/env python
"""Asynchronous DISPO on the demo task: step time of three placements on the same 2 ranks, measured in one run.

    python benchmarks/bench_async.py [--steps 8] [--warmup-steps 80] [--trees . /path/to/other/checkout]
    python benchmarks/bench_async.py --curves --curve-steps 30 --seeds 0 1 2   # + held-out accuracy curves (PNG)

Every arm runs the demo config (tiny Qwen3, synthetic arithmetic) under ``torchrun --nproc_per_node=2``:

- ``colocated``: both ranks generate (one engine replica each) and train (DP=2): what a user launches by default;
- ``dedicated k=0``: rank 0 trains, rank 1 runs the engine, each batch waits for the previous step's weights;
- ``dedicated k=1``: the same ranks, batch s+1 generated while the trainer updates on batch s.

Step time = mean ``perf/time/step_s`` of the trainer over steps 2..N (step 1 holds the engine start-up), with no
evaluation and no intermediate checkpoints. Ratios printed are baseline / k=1 (above 1: k=1 is faster): against
dedicated k=0 (what pipelining buys), and against colocated (what a user gains over the run they would launch).
``--trees`` runs the same arms from other source trees (e.g. an older commit's checkout) in the same invocation.
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


def train_run(
    tree: Path, model: Path, run_dir: Path, placement: str, staleness: int, steps: int, seed: int, *extra: str
) -> list[dict]:
    """One 2-process run of ``tree``'s code (``placement`` colocated, or dedicated with 1 training + 1 rollout rank)."""
    arm = ["rollout.placement=dedicated", f"trainer.max_staleness={staleness}"] if placement == "dedicated" else []
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "megatron_dispo", "train", str(DEFAULT_CONFIG), f"model.hf_path={model}", f"trainer.run_dir={run_dir}",
        *arm, f"trainer.max_steps={steps}", f"trainer.seed={1234 + seed}", f"rollout.seed={seed}",
        "trainer.plot_every=0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=tree)
    return read_metrics(run_dir)


def train_dedicated(model: Path, run_dir: Path, staleness: int, steps: int, seed: int, *extra: str) -> list[dict]:
    """One dedicated-placement run of this tree (1 training rank + 1 rollout rank); its metrics records."""
    return train_run(REPO, model, run_dir, "dedicated", staleness, steps, seed, *extra)


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
    parser.add_argument("--trees", nargs="+", default=[str(REPO)], help="source trees whose code each arm runs")
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

    arms = {"colocated": ("colocated", 0), "dedicated k=0": ("dedicated", 0), "dedicated k=1": ("dedicated", 1)}
    for index, tree in enumerate([] if args.skip_timing else [Path(t).resolve() for t in args.trees]):
        timed = {}
        for name, (placement, k) in arms.items():
            started = time.perf_counter()
            seed = args.seeds[0]
            records = train_run(
                tree, models[seed], work / f"time_{index}_{placement}_k{k}", placement, k, args.steps, seed,
                "eval.every_steps=0", "trainer.checkpoint_every=0",
            )  # fmt: skip
            timed[name] = step_seconds(records)
            waits = mean(r.get("perf/time/wait_for_rollout_s", 0.0) for r in records if r["step"] >= 2)
            console.print(
                f"{tree.name} {name}: {timed[name]:.3f} s/step over steps 2..{args.steps} (trainer waits "
                f"{waits:.3f} s/step for rollout; run {time.perf_counter() - started:.0f} s)"
            )
        k1 = timed["dedicated k=1"]
        console.print(
            f"[bold]{tree}: dedicated k=0 / k=1 {timed['dedicated k=0'] / k1:.2f}x; colocated / dedicated k=1 "
            f"{timed['colocated'] / k1:.2f}x"
        )

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
