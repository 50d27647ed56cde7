"""CPU tests for megatron_dispo.refit.fp8: 128x128 block e4m3 quantisation in vLLM's FP8 block-checkpoint layout.

Error bound (see the module docstring): with y = W / scale_inv, |y - q| <= 2^-4 * 2^floor(log2|y|) for normal codes
(3 mantissa bits, round to nearest) and <= 2^-10 for subnormal codes (|y| < 2^-6, spacing 2^-9).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.refit.fp8 import (
    FP8_DTYPE,
    block_dequantize_fp8,
    block_quantize_fp8,
    e4m3_error_bound,
    fp8_quantization_config,
    quantize_named_tensors,
)

NUM_GPUS = 0


def _reference_scales(weight: torch.Tensor) -> torch.Tensor:
    """amax / 448 per 128x128 block, by explicit loops (independent of the vectorised code)."""
    rows, cols = weight.shape
    out = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = weight[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().max().item()
            out[i, j] = amax / 448.0 if amax > 0 else 1.0
    return out


@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (64, 300), (1, 129)])
def test_round_trip_error_within_e4m3_bound_and_scale_layout(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    rows, cols = shape
    # magnitudes spanning 5 decades across rows, so blocks hold both normal and subnormal codes
    weight = torch.randn(shape, generator=generator) * torch.logspace(-4, 1, rows)[:, None]
    codes, scale_inv = block_quantize_fp8(weight)
    assert codes.dtype == FP8_DTYPE and tuple(codes.shape) == shape
    assert scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (math.ceil(rows / 128), math.ceil(cols / 128))
    torch.testing.assert_close(scale_inv, _reference_scales(weight), rtol=1e-6, atol=0)
    error = (block_dequantize_fp8(codes, scale_inv) - weight).abs()
    bound = e4m3_error_bound(weight, scale_inv)
    assert bool((error <= bound).all()), f"worst error / bound = {(error / bound).max().item():.4f}"
    # the bound is tight: some element gets at least a third of it (a loose bound would make this test vacuous)
    assert (error / bound).max().item() > 0.33


def test_hand_worked_codes_of_one_block() -> None:
    # amax 448 -> scale_inv 1, so codes are the e4m3 roundings of the values themselves.
    weight = torch.zeros(2, 4)
    weight[0] = torch.tensor([448.0, 1.0625, 3 * 2.0**-11, -0.3])
    codes, scale_inv = block_quantize_fp8(weight)
    assert scale_inv.tolist() == [[1.0]]
    # 1.0625 lies halfway between 1.0 and 1.125 -> ties to even mantissa -> 1.0 (error 2^-4, exactly the bound);
    # 3 * 2^-11 is subnormal: nearest multiple of 2^-9 is 2^-9; -0.3 -> -0.3125 (spacing 2^-5 in [0.25, 0.5)).
    assert codes.float()[0].tolist() == [448.0, 1.0, 2.0**-9, -0.3125]
    assert codes.float()[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_zero_block_gets_unit_scale_and_dequantises_to_zero() -> None:
    weight = torch.randn(256, 256)
    weight[128:, :128] = 0.0
    codes, scale_inv = block_quantize_fp8(weight)
    assert scale_inv[1, 0].item() == 1.0
    assert torch.count_nonzero(block_dequantize_fp8(codes, scale_inv)[128:, :128]) == 0


def test_matches_vllm_per_block_cast_bit_for_bit() -> None:
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(3)) * 0.05
    codes, scale_inv = block_quantize_fp8(weight)
    vllm_codes, vllm_scale = per_block_cast_to_fp8(weight, [128, 128])
    assert torch.equal(codes.view(torch.uint8), vllm_codes.view(torch.uint8))
    torch.testing.assert_close(scale_inv, vllm_scale, rtol=0, atol=0)


def test_only_linear_projections_are_quantised() -> None:
    named = [
        ("model.embed_tokens.weight", torch.randn(8, 4)),
        ("model.layers.0.input_layernorm.weight", torch.ones(4)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 4)),
        ("model.layers.0.self_attn.q_norm.weight", torch.ones(2)),
        ("model.layers.0.mlp.gate.weight", torch.randn(4, 4)),  # MoE router: kept
        ("model.layers.0.mlp.experts.3.down_proj.weight", torch.randn(4, 2)),
        ("model.layers.1.mlp.gate_proj.weight", torch.randn(2, 4)),
        ("lm_head.weight", torch.randn(8, 4)),
    ]
    out = dict(quantize_named_tensors(iter(named)))
    quantised = sorted(name for name, tensor in out.items() if tensor.dtype == FP8_DTYPE)
    assert quantised == [
        "model.layers.0.mlp.experts.3.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ]
    scales = sorted(name for name in out if name.endswith("weight_scale_inv"))
    assert scales == [name + "_scale_inv" for name in quantised]
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.float32


def test_quantization_config_lists_routers_and_lm_head() -> None:
    from megatron_dispo.models.tiny import tiny_qwen3_config

    config = tiny_qwen3_config(moe=True, vocab_size=64, num_hidden_layers=3, mlp_only_layers=[1])
    quant = fp8_quantization_config(config)
    assert quant["weight_block_size"] == [128, 128] and quant["quant_method"] == "fp8"
    assert quant["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2-D weight"):
        block_quantize_fp8(torch.randn(4))
    with pytest.raises(ValueError, match="inf/nan"):
        block_quantize_fp8(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        block_quantize_fp8(torch.ones(2, 2, dtype=torch.int32))
