"""Tests for megatron_dispo.models.tiny: deterministic tiny Qwen3 / Qwen3-MoE checkpoints and the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_dispo.models.tiny import (
    _train_tokenizer_json,
    build_tiny_tokenizer,
    checkpoint_digest,
    make_tiny_checkpoint,
    tiny_qwen3_config,
)

NUM_GPUS = 0


def test_tokenizer_round_trips_math_text_and_has_special_tokens() -> None:
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == 1024
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    text = "Find x if 3*x - (12 / 4) = 27.\nAnswer: \\boxed{10}\n  spaces and Ünïcode ∑ stay"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # digits are split one by one (as in Qwen), so "2026" is four tokens of one digit each
    digits = tokenizer.encode("2026", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "6"]
    # special tokens are single ids inside text
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 1


def test_tokenizer_training_is_deterministic() -> None:
    first = _train_tokenizer_json()
    assert first == _train_tokenizer_json()
    cached = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    assert cached["model"] == json.loads(first)["model"]  # the cached copy has the same vocab and merges


def test_chat_template_renders_qwen_format(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # the saved files carry the template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected
    no_prompt = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


def test_config_defaults_match_the_documented_shapes() -> None:
    dense = tiny_qwen3_config(vocab_size=1024)
    assert (dense.hidden_size, dense.num_hidden_layers, dense.num_attention_heads) == (128, 2, 4)
    assert (dense.num_key_value_heads, dense.head_dim, dense.intermediate_size) == (2, 32, 256)
    assert dense.tie_word_embeddings is False and dense.max_position_embeddings == 1024
    moe = tiny_qwen3_config(moe=True, vocab_size=1024, num_hidden_layers=3)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 2, 64)
    assert moe.num_hidden_layers == 3 and moe.norm_topk_prob is True
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen3_config(vocab_size=0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_checkpoint_is_deterministic_and_seed_dependent(tmp_path: Path, moe: bool) -> None:
    first = make_tiny_checkpoint(tmp_path / "a", moe=moe, seed=3)
    again = make_tiny_checkpoint(tmp_path / "b", moe=moe, seed=3)
    other = make_tiny_checkpoint(tmp_path / "c", moe=moe, seed=4)
    assert checkpoint_digest(first) == checkpoint_digest(again)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    weights, other_weights = load_file(first / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights.keys() == other_weights.keys()
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], other_weights["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hf_loads_checkpoint_with_every_tensor_and_peaked_outputs(tmp_path: Path, moe: bool) -> None:
    path = make_tiny_checkpoint(tmp_path, moe=moe, seed=0)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")
    # the loaded parameters are exactly the file's tensors (spot-check one attention and one MLP/expert tensor)
    saved = load_file(path / "model.safetensors")
    torch.testing.assert_close(
        model.model.layers[1].self_attn.k_proj.weight, saved["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0
    )
    if moe:
        fused = model.model.layers[0].mlp.experts.gate_up_proj[3]  # HF fuses [gate; up] per expert
        torch.testing.assert_close(fused[:64], saved["model.layers.0.mlp.experts.3.gate_proj.weight"], rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tokenizer.encode("What is 12 + 30? Answer: \\boxed{42}")])
    with torch.no_grad():
        logprobs = model(ids).logits.float().log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).mean().item()
    # far from uniform (log 1024 = 6.93) but not collapsed either
    assert 1.0 < entropy < 5.0


def test_looping_checkpoint_greedy_decoding_cycles_with_the_given_period(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, seed=1, loop_period=6)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = torch.tensor([[10, 20, 30]])
    out = model.generate(prompt, max_new_tokens=30, do_sample=False)[0, 3:].tolist()
    assert len(out) == 30
    assert out[6:] == out[:-6]  # period 6 ...
    assert len(set(out[:6])) == 6  # ... and not shorter
