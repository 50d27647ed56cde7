"""`megatron-dispo train CONFIG [section.field=value ...]` (run under torchrun for several processes).

Every process of the job runs :func:`run_training_job`: the one loop on the training ranks, the rollout program on
the dedicated rollout ranks (``rollout.placement=dedicated``)."""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from megatron_dispo.config_loader import ConfigError

if TYPE_CHECKING:
    from megatron_dispo.config import Config


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
    return run_training_job(config)


def run_training_job(config: Config) -> int:
    """This process's part of the job; a rank that lost its peer exits with one line that says so."""
    from megatron_dispo.comm.channel import BridgeError
    from megatron_dispo.trainer.bridge import init_training_world, job_layout, job_store

    if config.rollout.placement != "dedicated":
        return _train(config, dedicated=None)
    layout = job_layout(config.rollout.num_ranks)
    timeout = timedelta(seconds=config.trainer.bridge_timeout_s)
    store = job_store(layout, timeout)
    if layout.is_rollout_rank:
        return _rollout(config, layout, store)
    init_training_world(layout, store, timeout)
    try:
        return _train(config, dedicated=(layout, store))
    except BridgeError as exc:
        raise SystemExit(f"training rank {layout.global_rank}: {exc}") from None


def _train(config: Config, dedicated: tuple | None) -> int:
    from megatron_dispo.trainer.loop import Trainer

    trainer = Trainer(config, dedicated=dedicated)
    try:
        trainer.train()
    except BaseException:
        trainer.close(failed=True)  # no goodbye to the rollout ranks: they may be mid-send, and would wait for it
        raise
    trainer.close()
    return 0


def _rollout(config: Config, layout: object, store: object) -> int:
    from megatron_dispo.comm.channel import BridgeError
    from megatron_dispo.trainer.rollout_ranks import RolloutRank

    rank = RolloutRank(config, layout, store)  # type: ignore[arg-type]
    try:
        return rank.run()
    except BridgeError as exc:
        raise SystemExit(f"rollout rank: {exc}") from None
    except Exception as exc:
        rank.fail(exc)
        raise
    finally:
        rank.close()
