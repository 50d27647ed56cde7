"""MoE routing replay (R3) through the trainer's plumbing: config switch, replica payloads, the leftover cache, vLLM's
GPU output. The replay itself is tested in ``tests/models/test_routing_replay.py``, its effect on the engine/trainer
mismatch in ``tests/rollout/test_routing_replay_mismatch.py``, and the whole loop under TP2+SP and EP2 (two engine
replicas) in ``tests/trainer/test_layouts.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_dispo.config import load_run_config
from megatron_dispo.config_loader import ConfigError
from megatron_dispo.rollout.engine import _vllm_routed_experts
from megatron_dispo.rollout.routing_payload import decode_routing, encode_routing
from megatron_dispo.trainer.config import DynamicSamplingConfig
from megatron_dispo.trainer.rollout_phase import DynamicSampler, GroupRollout
from tests.trainer.conftest import TINY_CONFIG


def _routing(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 8, (rows, 3, 2), generator=torch.Generator().manual_seed(seed)).to(torch.int16)


def test_replay_switch_turns_on_capture_and_needs_a_moe_model(tiny_checkpoints: dict[str, Path]) -> None:
    moe = load_run_config(TINY_CONFIG, [f"model.hf_path={tiny_checkpoints['moe']}", "model.moe_routing_replay=rollout"])
    assert moe.rollout.capture_routed_experts  # one switch: the engine records what the trainer replays
    moe.validate_for_world(1, hf_config=moe.load_hf_config())
    dense = load_run_config(
        TINY_CONFIG, [f"model.hf_path={tiny_checkpoints['dense']}", "model.moe_routing_replay=rollout"]
    )
    with pytest.raises(ConfigError, match=r"model.moe_routing_replay needs a MoE model .* has no experts"):
        dense.validate_for_world(1, hf_config=dense.load_hf_config())
    with pytest.raises(ConfigError, match="moe_routing_replay"):
        load_run_config(TINY_CONFIG, [f"model.hf_path={tiny_checkpoints['moe']}", "model.moe_routing_replay=always"])


def test_replica_payload_gives_back_every_responses_routing() -> None:
    routed = [_routing(5, 0), _routing(1, 1), _routing(7, 2)]
    routed[1][0, 0, 0] = -1  # NO_ROUTE survives the byte codes
    for num_experts in (8, 512):  # uint8 codes, int16 codes
        back = decode_routing(encode_routing(routed, num_experts), [5, 1, 7], num_experts)
        assert all(torch.equal(a, b) and b.dtype == torch.int16 for a, b in zip(routed, back, strict=True))
    assert decode_routing(encode_routing([], 8), [], 8) == []  # a replica dealt no prompts


def test_cached_groups_keep_their_routing_through_a_json_checkpoint() -> None:
    group = GroupRollout(
        problem_id="p", answer="3", prompt_ids=[1, 2], response_ids=[[3], [4, 5]], rollout_logprobs=[[-0.5], [-1, -2]],
        finish_reasons=["stop", "stop"], correct=[True, False], outcomes=["correct", "incorrect"],
        routed_experts=[_routing(2, 3), _routing(3, 4)],
    )  # fmt: skip
    sampler = DynamicSampler(DynamicSamplingConfig(), group_size=2)
    sampler.cache = [group]
    restored = DynamicSampler(DynamicSamplingConfig(), group_size=2)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    (back,) = restored.cache
    assert back.routed_experts is not None and group.routed_experts is not None
    assert all(torch.equal(a, b) for a, b in zip(group.routed_experts, back.routed_experts, strict=True))
    assert back.response_ids == group.response_ids


def test_vllm_gpu_routing_output_is_cut_to_the_kept_tokens() -> None:
    rows = np.arange(5 * 3 * 2, dtype=np.int32).reshape(5, 3, 2)
    cut = _vllm_routed_experts(rows, 3, "r0")  # repetition truncation kept 3 rows
    assert cut.dtype == torch.int16 and torch.equal(cut, torch.as_tensor(rows[:3]).to(torch.int16))
    short = _vllm_routed_experts(rows[:2], 4, "r1")
    assert (short[2:] == -1).all() and torch.equal(short[:2], torch.as_tensor(rows[:2]).to(torch.int16))
    with pytest.raises(RuntimeError, match="no routed experts for request r2"):
        _vllm_routed_experts(None, 3, "r2")
