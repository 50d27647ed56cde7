"""Optional FP8 refit: block-wise 128x128 e4m3 quantisation in the layout of vLLM's FP8 block checkpoints.

The quantiser and the engine's FP8 config live in :mod:`megatron_dispo.rollout.fp8_engine`, which the engine uses to
start from an FP8 copy of its checkpoint; this module adds the refit's stream, the dequantiser and the error bound.

Layout (Qwen3-FP8 / DeepSeek-V3, read from vLLM's ``Fp8LinearMethod.create_weights`` and
``fp8_utils.create_fp8_scale_parameter``): a linear weight ``W[out, in]`` named ``<prefix>.weight`` is sent as

- ``<prefix>.weight``: ``torch.float8_e4m3fn``, same shape as ``W``;
- ``<prefix>.weight_scale_inv``: ``float32`` ``[ceil(out / 128), ceil(in / 128)]``,

with ``W[i, j] ~= float(q[i, j]) * scale_inv[i // 128, j // 128]`` and ``scale_inv = amax(|W_block|) / 448`` (448 is the
largest finite e4m3fn value), the same rule as vLLM's ``per_block_cast_to_fp8``. Edge blocks of a shape that is not a
multiple of 128 are partial; their scale covers only the elements that exist. An all-zero block gets
``scale_inv = 1`` (its codes are 0, so it dequantises exactly to 0; vLLM clamps amax to 1e-4 instead, which is
equivalent for the values).

What is quantised follows the Qwen3 FP8 checkpoints and vLLM's ``Fp8Config``: every attention and MLP/expert
projection (``q/k/v/o_proj``, ``gate/up/down_proj``, shared experts included). Kept in the training dtype: embeddings,
``lm_head``, all norms, and the MoE router ``mlp.gate`` (vLLM's ``GateLinear`` is a ``LinearBase``, so the engine's
config must list the routers in ``modules_to_not_convert``; ``fp8_quantization_config`` writes that list).

Error bound (tested): with ``y = W / scale_inv`` in ``[-448, 448]``, e4m3 round-to-nearest has 3 mantissa bits, so for a
normal code (``|y| >= 2^-6``) ``|y - q| <= 2^-4 * 2^floor(log2 |y|)`` (half a unit in the last place), and below the
smallest normal the codes are subnormal with spacing ``2^-9``, so ``|y - q| <= 2^-10``. Dequantised:
``|W - q * scale_inv| <= scale_inv * max(2^-4 * 2^floor(log2 |y|), 2^-10)`` plus float32 rounding of the division and
the product (relative 2^-22 of ``|W|`` plus of the smallest code).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from megatron_dispo.rollout.fp8_engine import (
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    block_quantize_fp8,
    fp8_quantization_config,
    is_fp8_quantized_weight,
    scale_name_for,
)

__all__ = [
    "FP8_BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "block_dequantize_fp8",
    "block_quantize_fp8",
    "e4m3_error_bound",
    "fp8_quantization_config",
    "is_fp8_quantized_weight",
    "quantize_named_tensors",
    "scale_name_for",
]

_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXP = -6  # smallest normal e4m3fn value is 2^-6


def block_dequantize_fp8(codes: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """float32 ``codes * scale_inv`` broadcast per block: what vLLM's block-FP8 GEMM computes with."""
    rows, cols = codes.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match codes {(rows, cols)}: {expected}.")
    expanded = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return codes.float() * expanded


def e4m3_error_bound(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """Per-element bound on ``|W - dequant(quant(W))|`` (see the module docstring for the derivation)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    scaled = (weight.float() / scale).abs()
    exponent = torch.floor(torch.log2(scaled.clamp_min(2.0**_E4M3_MIN_NORMAL_EXP)))
    half_ulp = torch.where(
        scaled >= 2.0**_E4M3_MIN_NORMAL_EXP,
        torch.exp2(exponent - (_E4M3_MANTISSA_BITS + 1)),
        torch.full_like(scaled, 2.0 ** (_E4M3_MIN_NORMAL_EXP - _E4M3_MANTISSA_BITS - 1)),
    )
    smallest_code = 2.0 ** (_E4M3_MIN_NORMAL_EXP - _E4M3_MANTISSA_BITS)
    float32_slack = (weight.float().abs() + scale * smallest_code) * 2.0**-22  # division + product roundings
    return scale * half_ulp + float32_slack


def quantize_named_tensors(named_tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Lazily replace each FP8-eligible weight by ``(name, codes)`` and ``(name + '_scale_inv', scale)``.

    Other tensors pass through unchanged. One tensor at a time: the stream stays lazy for the bucketing.
    """
    for name, tensor in named_tensors:
        if is_fp8_quantized_weight(name, tensor):
            codes, scale_inv = block_quantize_fp8(tensor)
            yield name, codes
            yield scale_name_for(name), scale_inv
        else:
            yield name, tensor
