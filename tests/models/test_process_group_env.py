"""ensure_process_group_env: the one place that gives a lone process torchrun's variables (trainer and converter)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist

from megatron_dispo.models.parallel import ensure_process_group_env

NUM_GPUS = 0
_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this test process; run this file on its own")
    for name in _NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_lone_process_becomes_rank_0_of_1_on_a_free_port(bare_env: pytest.MonkeyPatch) -> None:
    ensure_process_group_env()
    assert [os.environ[name] for name in _NAMES[:4]] == ["0", "1", "0", "127.0.0.1"]
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as sock:  # the port is free: binding it works
        sock.bind(("127.0.0.1", port))


def test_variables_already_set_are_kept(bare_env: pytest.MonkeyPatch) -> None:
    bare_env.setenv("RANK", "3")
    bare_env.setenv("WORLD_SIZE", "4")
    bare_env.setenv("MASTER_PORT", "29511")
    ensure_process_group_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("3", "4", "29511")
    assert os.environ["LOCAL_RANK"] == "0"


def _seed_worker(tensor_parallel: int, lone: bool) -> list[int]:
    from megatron_dispo.models.config import ParallelConfig
    from megatron_dispo.models.parallel import initialize_parallel, parallel_seed

    if lone:  # started as a plain process: initialize_parallel fills the torchrun variables itself
        for name in _NAMES:
            os.environ.pop(name, None)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel)
    seeds = []
    for seed in (77, 5):
        initialize_parallel(parallel, seed=seed)
        seeds.append(parallel_seed())
    return seeds


@pytest.mark.parametrize(("world", "lone"), [(1, True), (2, False)], ids=["lone_process", "tp2"])
def test_parallel_seed_is_the_seed_given_to_initialize_parallel(world: int, lone: bool) -> None:
    """build_model's default init seed is read back from Megatron's RNG tracker on every rank (TP ranks included)."""
    from tests.models.distributed import run_workers

    assert run_workers(_seed_worker, world, args=(world, lone), timeout_s=240) == [[77, 5]] * world
