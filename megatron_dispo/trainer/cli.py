"""`megatron-dispo train CONFIG [section.field=value ...]` (run under torchrun for several processes)."""

from __future__ import annotations

import argparse
import os

from megatron_dispo.config_loader import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. examples/configs/tiny_cpu_dispo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=5 trainer.lr=2e-6")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-request INFO lines drown the step metrics
    from megatron_dispo.config import load_run_config

    try:
        config = load_run_config(args.config, args.overrides)
        # layout vs world size, checkpoint folder, layers vs PP: before any process group or model exists
        world = config.training_world(int(os.environ.get("WORLD_SIZE", "1")))
        config.validate_for_world(world, hf_config=config.load_hf_config())
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from exc
    from megatron_dispo.trainer.launch import run_training_job

    return run_training_job(config)
