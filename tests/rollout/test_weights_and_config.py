"""Pure checks (no vLLM start): update validation (megatron_dispo.rollout.weights) and RolloutConfig rules."""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.algorithms.repetition import RepetitionConfig
from megatron_dispo.models.tiny import checkpoint_tensor_shapes, tiny_qwen3_config
from megatron_dispo.rollout import RolloutBatch, RolloutConfig
from megatron_dispo.rollout.weights import fused_group, validate_update

NUM_GPUS = 0


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.qkv_proj.weight"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"),
        ("model.layers.1.mlp.experts.17.down_proj.weight", "model.layers.1.mlp.experts"),
        ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight"),  # the MoE router is not fused
        ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_fused_group_names_the_vllm_parameter(name: str, group: str) -> None:
    assert fused_group(name) == group


def test_validate_update_accepts_whole_groups_and_names_every_problem() -> None:
    shapes = checkpoint_tensor_shapes(tiny_qwen3_config(moe=True, vocab_size=1024))
    experts = {n: torch.zeros(s) for n, s in shapes.items() if n.startswith("model.layers.0.mlp.experts.")}
    assert len(validate_update(experts.items(), shapes)) == 12
    with pytest.raises(ValueError) as error:
        validate_update(
            [
                ("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(64, 128)),
                ("model.norm.weight", torch.zeros(127)),
                ("lm_head.weight", torch.zeros(1024, 128, dtype=torch.int64)),
            ],
            shapes,
        )
    message = str(error.value)
    assert "model.norm.weight: shape (127,) != checkpoint shape (128,)" in message
    assert "lm_head.weight: dtype torch.int64 is not floating point" in message
    assert "model.layers.0.mlp.experts: fused in vLLM" in message and "experts.0.down_proj" in message
    with pytest.raises(KeyError, match=r"not\.a\.tensor"):
        validate_update([("not.a.tensor", torch.zeros(1))], shapes)


def test_rollout_config_rules() -> None:
    assert RolloutConfig().kv_cache_bytes == 256 << 20
    for field, value, pattern in (
        ("temperature", -0.1, "temperature=-0.1"),
        ("top_p", 1.5, "top_p=1.5"),
        ("max_new_tokens", 0, "max_new_tokens=0"),
        ("kv_cache_gib", 0.0, "kv_cache_gib=0.0"),
        ("dtype", "float16", "dtype='float16'"),
        ("device", "tpu", "device='tpu'"),
    ):
        with pytest.raises(ValueError, match=pattern.replace(".", r"\.").replace("(", r"\(")):
            RolloutConfig(**{field: value})
    with pytest.raises(TypeError, match="RepetitionConfig"):
        RolloutConfig(repetition={"enabled": False})  # type: ignore[arg-type]
    assert RolloutConfig(repetition=RepetitionConfig(enabled=False)).repetition.enabled is False


def test_partial_rollout_rules() -> None:
    assert RolloutConfig(partial=True, max_new_tokens=256).chunk_tokens == 64  # max_new_tokens / 4 by default
    assert RolloutConfig(partial=True, max_new_tokens=16, partial_chunk_tokens=2).chunk_tokens == 2
    with pytest.raises(ValueError, match="partial_chunk_tokens=5 must divide max_new_tokens=16"):
        RolloutConfig(partial=True, max_new_tokens=16, partial_chunk_tokens=5)
    with pytest.raises(ValueError, match="partial_chunk_tokens=0 must divide max_new_tokens=10"):
        RolloutConfig(partial=True, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"routing replay \(capture_routed_experts=True\)"):
        RolloutConfig(partial=True, capture_routed_experts=True)
    assert RolloutConfig(max_new_tokens=10, partial_chunk_tokens=3).max_new_tokens == 10  # checked only when partial


def test_rollout_batch_checks_its_fields() -> None:
    batch = RolloutBatch([[1]], [[2, 3], [4]], [[-0.1, -0.2], [-0.3]], ["stop", "length"], [0, 0], 2, ["a", "b"])
    assert batch.response_lengths == [2, 1] and batch.num_responses == 2
    with pytest.raises(ValueError, match="response 1: 1 tokens but 2 log-probs"):
        RolloutBatch([[1]], [[2, 3], [4]], [[-0.1, -0.2], [-0.3, -1.0]], ["stop", "stop"], [0, 0], 2, ["a", "b"])
    with pytest.raises(ValueError, match="3 prompts x group_size 2"):
        RolloutBatch([[1], [2], [3]], [[2], [4]], [[-0.1], [-0.3]], ["stop", "stop"], [0, 0], 2, ["a", "b"])
