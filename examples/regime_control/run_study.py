#!/usr/bin/env python
"""The regime-control study (issue 25, docs/algorithms.md "The regime-control study"), from one command.

    .venv/bin/python examples/regime_control/run_study.py                        # full study: 9 arms x 3 seeds
    .venv/bin/python examples/regime_control/run_study.py --seeds 0 --arms dispo dapo   # a part of it

For each seed: one supervised warm-up of the demo's tiny Qwen3 on the chain-of-thought task, with the RL run's prompt
template (shared by every arm of the seed), then one `megatron-dispo train` run per arm (a subprocess each, as a user
would launch it), each in its own run directory. The metrics JSONL of every finished run is copied under
``--results`` (committed), with the figures, a per-arm summary and the per-seed claim verdicts (summarize.py).

Resuming: a run whose metrics reach the last step is kept and not run again; an interrupted run continues from its
last checkpoint (`trainer.resume=true`, a checkpoint every `trainer.checkpoint_every` steps); a seed whose warm-up
model exists is not warmed up again. So the study can be run in parts (a few arms or seeds per invocation) and
re-invoked after any interruption.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from examples.regime_control.summarize import write_report  # noqa: E402
from examples.replication.run_study import keep_metrics, logged_steps, warmup_model_dir  # noqa: E402
from megatron_dispo.config import load_run_config  # noqa: E402
from megatron_dispo.demo import build_warmup_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(HERE / "study.yaml"), help="arms, seeds, figures, claims")
    parser.add_argument("--config", default=str(HERE / "base.yaml"), help="shared RL config")
    parser.add_argument("--runs", default="runs/regime_control", help="folder for models and full run directories")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for the kept metrics and plots")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--arms", nargs="+", help="run only these arms (default: all)")
    parser.add_argument("--steps", type=int, help="override trainer.max_steps (smoke runs)")
    parser.add_argument("--warmup-steps", type=int, help="override the study's warm-up steps")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run, e.g. eval.n=2")
    return parser.parse_args(argv)


def train_command(config: str, spec: dict, warm_model: Path, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    """One arm x seed: the arm's preset and overrides, the seed's warm-up model, resuming from its checkpoints."""
    return [
        sys.executable, "-m", "megatron_dispo", "train", config,
        f"algorithm.preset={spec['preset']}", *spec.get("overrides", []),
        f"model.hf_path={warm_model}", f"trainer.run_dir={run_dir}", "trainer.resume=true",
        f"trainer.seed={1234 + seed}", f"rollout.seed={seed}", *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False)
    study = yaml.safe_load(Path(args.study).read_text())
    if args.arms and set(args.arms) - set(study["arms"]):
        raise SystemExit(f"error: unknown arms {sorted(set(args.arms) - set(study['arms']))}; see {args.study}.")
    seeds = args.seeds if args.seeds is not None else list(study["seeds"])
    arms = {name: spec for name, spec in study["arms"].items() if not args.arms or name in args.arms}
    overrides = list(args.overrides) + ([f"trainer.max_steps={args.steps}"] if args.steps is not None else [])
    config = load_run_config(args.config, overrides)  # validates the shared setting before anything runs
    for name, spec in arms.items():  # ... and every arm's, so a typo in one stops the study before the first run
        try:
            load_run_config(args.config, [f"algorithm.preset={spec['preset']}", *spec.get("overrides", []), *overrides])
        except (ValueError, TypeError, KeyError) as error:
            raise SystemExit(f"error: arm {name}: {error}") from None
    max_steps = config.trainer.max_steps
    runs_root, results = Path(args.runs), Path(args.results)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(study["warmup_steps"])
    env = {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))), **os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    started = time.perf_counter()
    console.rule(f"[bold]regime-control study: {len(arms)} arms x seeds {seeds}, {max_steps} steps each")

    trained: list[str] = []
    for seed in seeds:
        warm_model = warmup_model_dir(runs_root, seed)
        if not (warm_model / "config.json").is_file():  # once per seed; every arm of the seed starts from it
            build_warmup_model(
                warm_model.parent, seed, warmup_steps, config.data.train[0], console, template=config.data.template
            )
        for name, spec in arms.items():
            run_dir = runs_root / name / f"seed{seed}"
            logged = logged_steps(run_dir)
            if any(step > max_steps for step in logged):  # never resume (truncate) a longer run into a shorter one
                raise SystemExit(
                    f"error: {run_dir} holds a run longer than {max_steps} steps; pass another --runs folder for "
                    "a shorter study (e.g. --runs /tmp/smoke/runs)."
                )
            if "eval/heldout/accuracy" not in logged.get(max_steps, {}):  # not complete: train (or resume) it
                run_dir.mkdir(parents=True, exist_ok=True)
                command = train_command(args.config, spec, warm_model, run_dir, seed, overrides)
                run_started = time.perf_counter()
                console.print(f"{name} seed {seed}: training{' (resuming)' if logged else ''} -> {run_dir}")
                with open(run_dir / "train.log", "a") as log:
                    proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                if proc.returncode != 0:
                    tail = (run_dir / "train.log").read_text()[-3000:]
                    raise SystemExit(
                        f"error: arm {name} seed {seed} failed (rc {proc.returncode}):\n{tail}\n"
                        "Fix the cause and rerun: complete runs are kept, this one resumes from its last checkpoint."
                    )
                trained.append(f"{name}/seed{seed}")
                console.print(f"{name} seed {seed}: done in {time.perf_counter() - run_started:.0f} s")
            final = keep_metrics(run_dir, results / name / f"seed{seed}")
            console.print(f"{name} seed {seed}: final held-out accuracy {final:.3f}")

    wall = time.perf_counter() - started
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    invocation = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arms": list(arms), "seeds": seeds, "max_steps": max_steps, "warmup_steps": warmup_steps,
        "trained": trained, "wall_s_this_invocation": round(wall, 1), "cpu_s_this_invocation": round(cpu, 1),
    }  # fmt: skip
    written = write_report(results, study, invocation)
    console.print(f"summary: {results / 'summary.md'}  figures: {len(written)} PNG under {results / 'plots'}")
    console.print(f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min (this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
