"""What every process of a training job runs: the one loop on the training ranks, the rollout program on the
dedicated rollout ranks (``rollout.placement=dedicated``)."""

from __future__ import annotations

from datetime import timedelta

from megatron_dispo.comm.channel import BridgeError
from megatron_dispo.config import Config
from megatron_dispo.trainer.bridge import init_training_world, job_layout, job_store


def run_training_job(config: Config) -> int:
    """This process's part of the job; a rank that lost its peer exits with one line that says so."""
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
    finally:
        trainer.close()
    return 0


def _rollout(config: Config, layout: object, store: object) -> int:
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
