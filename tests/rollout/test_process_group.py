"""An in-process vLLM engine on rank 0 of a multi-rank torch.distributed world (the trainer's layout).

Without `rollout.process_group.DefaultGroupGuard`, vLLM builds its groups over the trainer's default group (its
`new_group` calls wait for every rank: start-up hangs) and its shutdown destroys the default group (the trainer's
world dies). Here both ranks keep all-reducing around the engine's whole life.
"""

from __future__ import annotations

import os

import pytest

from tests.models.distributed import run_workers

pytestmark = [pytest.mark.vllm]


def _rank_main(model_dir: str) -> tuple[float, float, list[list[int]] | None]:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine, tokens = None, None
    if rank == 0:
        from megatron_dispo.rollout import RolloutConfig, RolloutEngine

        engine = RolloutEngine(model_dir, RolloutConfig(max_new_tokens=4, max_model_len=128, kv_cache_gib=0.0625))
        tokens = engine.generate([[3, 4, 5]], 2, seed=0).response_ids
    before = torch.tensor([float(rank + 1)])
    dist.all_reduce(before)  # the trainer's world still works while the engine lives
    if engine is not None:
        engine.shutdown()
    after = torch.tensor([float(rank + 1)])
    dist.all_reduce(after)  # ... and after vLLM's clean-up
    dist.destroy_process_group()
    return float(before), float(after), tokens


def test_engine_on_rank0_leaves_the_trainer_world_intact(tiny_checkpoints):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    results = run_workers(_rank_main, 2, timeout_s=180, args=(str(tiny_checkpoints["dense"]),), env=env)
    assert [r[:2] for r in results] == [(3.0, 3.0), (3.0, 3.0)]
    assert results[0][2] is not None and len(results[0][2]) == 2 and results[1][2] is None
