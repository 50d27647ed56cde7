"""What the refit asks of a GPU engine, checked on CPU (issue 24): the transport ``auto`` picks, and the calls of a
CUDA-IPC refit (packed on CPU buffers, as the engine-in-this-process test path allows)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_dispo.refit.transports import CudaIpcTransport, resolve_transport

NUM_GPUS = 0


def test_gpu_contract_auto_transport_is_colocated_for_an_in_process_engine() -> None:
    """vLLM's collective_rpc exists on every engine, so RPC says nothing about where the workers run; a CUDA-IPC
    handle cannot be opened by the process that made it. An engine object here means colocated."""
    picked = resolve_transport("auto", has_engine=True, has_rpc=True, has_group=False, cuda_available=True)
    assert picked == "colocated"
    assert resolve_transport("auto", has_engine=False, has_rpc=True, has_group=False, cuda_available=True) == "cuda_ipc"


def test_gpu_contract_cuda_ipc_refit_is_one_session_then_a_prefix_cache_reset() -> None:
    """The engine's cached KV blocks were computed with the old weights: the IPC refit resets them after the session."""
    calls: list[str] = []

    def rpc(fn: Any, *args: Any) -> list[Any]:
        calls.append(fn.__name__)
        return [None]

    transport = CudaIpcTransport(rpc, reset_prefix_cache=lambda: calls.append("reset_prefix_cache"), device="cpu")
    buckets = [[("a.weight", torch.ones(2, 2))], [("b.weight", torch.zeros(3))]]
    counters = transport.transfer(iter(buckets))
    assert counters.num_buckets == 2
    assert calls == ["begin_reload", "load_ipc_bucket", "load_ipc_bucket", "finish_reload", "reset_prefix_cache"]


class _TorchEngine:
    """An engine whose ``score`` is an HF model in the engine's precision: bf16 compute, FP8 weights dequantised."""

    def __init__(self, model: Any, config: Any, sequences: torch.Tensor) -> None:
        self.model, self.config, self.sequences = model, config, sequences

    def update_weights(self, named_tensors: Any) -> dict[str, float]:
        raise AssertionError("not called: the test only scores")

    def score(self, sequences: list[list[int]], prompt_lens: list[int] | None = None) -> list[torch.Tensor]:
        return _logprobs(self.model, torch.tensor(sequences), prompt_lens or [1] * len(sequences))


def _logprobs(model: Any, sequences: torch.Tensor, prompt_lens: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(sequences).logits.float()
    values = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, sequences[:, 1:, None])[..., 0]
    return [row[start - 1 :] for row, start in zip(values, prompt_lens, strict=True)]


def test_gpu_contract_probe_thresholds_pass_correct_bf16_and_fp8_refits_and_fail_a_swapped_tensor() -> None:
    """Default thresholds follow the engine dtype: the trainer's fp32 log-probs vs a correct bf16 / FP8 engine pass,
    the same engine with one projection swapped between layers fails (random 4-layer Qwen3, sampled probe)."""
    from transformers import Qwen3ForCausalLM

    from megatron_dispo.models.tiny import random_tiny_state_dict, tiny_qwen3_config
    from megatron_dispo.refit import ProbeBatch, RefitCheckError, RefitConfig, Refitter
    from megatron_dispo.refit.fp8 import block_dequantize_fp8, quantize_named_tensors
    from megatron_dispo.rollout.config import RolloutConfig

    config = tiny_qwen3_config(vocab_size=1024, hidden_size=256, num_hidden_layers=4, intermediate_size=512)
    config.num_attention_heads = 8
    state = random_tiny_state_dict(config, seed=3)

    def model(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
        built = Qwen3ForCausalLM(config)
        built.load_state_dict(weights, strict=False)
        return built.eval().to(dtype)

    trainer = model(state, torch.float32)
    prompts = torch.randint(3, 1024, (4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sequences = trainer.generate(prompts, max_new_tokens=24, do_sample=True, top_k=0, pad_token_id=0)
    probe = ProbeBatch(tuple(map(tuple, sequences.tolist())), (8,) * 4)
    reference = _logprobs(trainer, sequences, [8] * 4)
    quantized = dict(quantize_named_tensors(state.items()))
    fp8_state = dict(state)
    for name in state:
        if name + "_scale_inv" in quantized:  # what the FP8 engine computes with: e4m3 codes x block scales
            fp8_state[name] = block_dequantize_fp8(quantized[name], quantized[name + "_scale_inv"])
    swapped = dict(state)
    swapped["model.layers.0.mlp.gate_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"]
    swapped["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.gate_proj.weight"]
    bf16: dict[str, Any] = {"dtype": "bfloat16"}
    cases = [("bf16", state, bf16, False), ("fp8", fp8_state, bf16 | {"quantization": "fp8"}, True)]
    for name, weights, engine_fields, fp8_refit in cases:
        engine_config = RolloutConfig(**engine_fields)
        engine = _TorchEngine(model(weights, torch.bfloat16), engine_config, sequences)
        refitter = Refitter(engine, RefitConfig(fp8=fp8_refit), probe=probe)
        report = refitter.check(reference)  # raises RefitCheckError when too far
        assert report.max_abs > 0, name
        broken = _TorchEngine(model(swapped, torch.bfloat16), engine_config, sequences)
        with pytest.raises(RefitCheckError, match="refit self-check failed"):
            Refitter(broken, RefitConfig(fp8=fp8_refit), probe=probe).check(reference)


def test_gpu_contract_fp8_refit_requires_an_fp8_engine() -> None:
    """e4m3 codes and scales fit only an engine built from an FP8 checkpoint: the mismatch is refused up front."""
    from megatron_dispo.refit import RefitConfig, Refitter
    from megatron_dispo.rollout.config import RolloutConfig

    bf16_engine = _TorchEngine(None, RolloutConfig(dtype="bfloat16"), torch.zeros(0))
    with pytest.raises(ValueError, match="needs an FP8 engine"):
        Refitter(bf16_engine, RefitConfig(fp8=True))
    fp8_engine = _TorchEngine(None, RolloutConfig(dtype="bfloat16", quantization="fp8"), torch.zeros(0))
    assert Refitter(fp8_engine, RefitConfig(fp8=True)).engine_dtype == "fp8"
