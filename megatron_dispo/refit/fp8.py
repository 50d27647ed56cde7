"""Optional FP8 refit: block-wise 128x128 e4m3 quantisation in the layout of vLLM's FP8 block checkpoints.

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
config must list the routers in ``modules_to_not_convert``; :func:`fp8_quantization_config` writes that list).

Error bound (tested): with ``y = W / scale_inv`` in ``[-448, 448]``, e4m3 round-to-nearest has 3 mantissa bits, so for a
normal code (``|y| >= 2^-6``) ``|y - q| <= 2^-4 * 2^floor(log2 |y|)`` (half a unit in the last place), and below the
smallest normal the codes are subnormal with spacing ``2^-9``, so ``|y - q| <= 2^-10``. Dequantised:
``|W - q * scale_inv| <= scale_inv * max(2^-4 * 2^floor(log2 |y|), 2^-10)`` plus float32 rounding of the division and
the product (relative 2^-22 of ``|W|`` plus of the smallest code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

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

FP8_DTYPE = torch.float8_e4m3fn
"""The e4m3 variant vLLM's FP8 checkpoints store (no infinities, max 448)."""
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
"""Largest finite e4m3fn value: 448."""
FP8_BLOCK = (128, 128)
"""(rows, cols) of one quantisation block: the ``weight_block_size`` of Qwen3-FP8 / DeepSeek-V3."""

_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXP = -6  # smallest normal e4m3fn value is 2^-6
_QUANTISED_PROJECTIONS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def is_fp8_quantized_weight(name: str, tensor: Tensor) -> bool:
    """True for a 2-D floating linear projection weight that an FP8 Qwen3 checkpoint stores in e4m3."""
    return bool(_QUANTISED_PROJECTIONS.search(name)) and tensor.dim() == 2 and tensor.is_floating_point()


def scale_name_for(weight_name: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_scale_inv`` (the name vLLM's block-FP8 linear layers register)."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"weight name {weight_name!r} must end in '.weight' to have a block scale.")
    return weight_name + "_scale_inv"


def _block_view(padded: Tensor, block: tuple[int, int]) -> Tensor:
    rows, cols = padded.shape
    return padded.view(rows // block[0], block[0], cols // block[1], block[1])


def _padded(weight: Tensor, block: tuple[int, int]) -> Tensor:
    rows, cols = weight.shape
    padded_rows = -(-rows // block[0]) * block[0]
    padded_cols = -(-cols // block[1]) * block[1]
    if (padded_rows, padded_cols) == (rows, cols):
        return weight
    out = weight.new_zeros(padded_rows, padded_cols)
    out[:rows, :cols] = weight
    return out


def block_quantize_fp8(weight: Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """Quantise ``weight[out, in]`` to (e4m3 codes of the same shape, float32 ``scale_inv[ceil(out/b0), ceil(in/b1)]``).

    Computed in float32 on the weight's device. Zero padding of partial edge blocks never changes a block's amax.
    """
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantisation needs a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
    if not weight.is_floating_point():
        raise TypeError(f"block FP8 quantisation needs a floating-point weight, got dtype={weight.dtype}.")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds inf/nan; FP8 e4m3fn cannot represent them (the trainer diverged?).")
    rows, cols = weight.shape
    padded = _padded(weight.detach().float(), block)
    blocks = _block_view(padded, block)  # [nb_rows, b0, nb_cols, b1]
    amax = blocks.abs().amax(dim=(1, 3))  # [nb_rows, nb_cols]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = blocks / scale_inv[:, None, :, None]
    codes = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    codes = codes.view(padded.shape)[:rows, :cols].contiguous()
    return codes, scale_inv.contiguous()


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


def fp8_quantization_config(hf_config: Any) -> dict[str, Any]:
    """The ``quantization_config`` an FP8 engine must be built with to accept this refit (vLLM ``Fp8Config``).

    Routers (``model.layers.<i>.mlp.gate``) and ``lm_head`` are listed in ``modules_to_not_convert`` (vLLM matches
    ignored layers exactly by prefix), so the engine keeps them unquantised, as this module sends them.
    """
    ignored = ["lm_head"]
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    if num_experts > 0:
        mlp_only = set(getattr(hf_config, "mlp_only_layers", []) or [])
        step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
        for layer in range(hf_config.num_hidden_layers):
            if layer not in mlp_only and (layer + 1) % step == 0:
                ignored.append(f"model.layers.{layer}.mlp.gate")
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(FP8_BLOCK),
        "modules_to_not_convert": ignored,
    }
