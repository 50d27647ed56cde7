"""The FP8 rollout engine: 128x128 block e4m3 weights in the layout of vLLM's FP8 block checkpoints.

vLLM builds block-FP8 linear layers only from a checkpoint whose ``config.json`` carries an FP8
``quantization_config`` (``Fp8Config.from_config``: ``quant_method``, ``activation_scheme``, ``weight_block_size``,
``modules_to_not_convert``), and then loads ``<prefix>.weight`` as e4m3 codes plus ``<prefix>.weight_scale_inv``.
An engine given the bf16 checkpoint instead builds bf16 layers, into which the FP8 refit's codes and scales do not
fit. So an engine with ``rollout.quantization='fp8'`` starts from :func:`write_fp8_checkpoint`'s copy of its
checkpoint, quantised with the same rule the refit sends (:mod:`megatron_dispo.refit.fp8`).

Layout (Qwen3-FP8 / DeepSeek-V3, read from vLLM's ``Fp8LinearMethod.create_weights`` and
``fp8_utils.create_fp8_scale_parameter``): ``W[out, in]`` is sent as e4m3 codes of the same shape and a float32
``weight_scale_inv[ceil(out / 128), ceil(in / 128)]`` with ``W[i, j] ~= float(q[i, j]) * scale_inv[i // 128, j // 128]``
and ``scale_inv = amax(|W_block|) / 448``. Quantised: every attention and MLP/expert projection; kept in the training
dtype: embeddings, ``lm_head``, norms and the MoE routers (listed in ``modules_to_not_convert``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from megatron_dispo.hf_checkpoint import INDEX_FILE, safetensors_files

__all__ = [
    "FP8_BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "block_quantize_fp8",
    "fp8_quantization_config",
    "is_fp8_quantized_weight",
    "scale_name_for",
    "write_fp8_checkpoint",
]

FP8_DTYPE = torch.float8_e4m3fn
"""The e4m3 variant vLLM's FP8 checkpoints store (no infinities, max 448)."""
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
"""Largest finite e4m3fn value: 448."""
FP8_BLOCK = (128, 128)
"""(rows, cols) of one quantisation block: the ``weight_block_size`` of Qwen3-FP8 / DeepSeek-V3."""
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


def _field(hf_config: Any, name: str, default: Any) -> Any:
    """A field of an HF config given as an object (``transformers`` config) or as its ``config.json`` dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def fp8_quantization_config(hf_config: Any) -> dict[str, Any]:
    """The ``quantization_config`` an FP8 engine must be built with to accept this refit (vLLM ``Fp8Config``).

    Routers (``model.layers.<i>.mlp.gate``) and ``lm_head`` are listed in ``modules_to_not_convert`` (vLLM matches
    ignored layers exactly by prefix), so the engine keeps them unquantised, as this module sends them.
    """
    ignored = ["lm_head"]
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts in config.json; hub files say num_experts
    num_experts = int(_field(hf_config, "num_experts", None) or _field(hf_config, "num_local_experts", 0) or 0)
    if num_experts > 0:
        mlp_only = set(_field(hf_config, "mlp_only_layers", []) or [])
        step = int(_field(hf_config, "decoder_sparse_step", 1) or 1)
        for layer in range(int(_field(hf_config, "num_hidden_layers", 0))):
            if layer not in mlp_only and (layer + 1) % step == 0:
                ignored.append(f"model.layers.{layer}.mlp.gate")
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(FP8_BLOCK),
        "modules_to_not_convert": ignored,
    }


def write_fp8_checkpoint(source: str | Path, out_dir: str | Path) -> Path:
    """Write ``source`` (a bf16/fp32 HF checkpoint) as an FP8 block checkpoint in ``out_dir``; returns ``out_dir``.

    Shard by shard (the weight map is kept, scales land in their weight's shard), so the peak host memory is one
    shard. ``config.json`` gains :func:`fp8_quantization_config`; the other non-weight files are copied.
    """
    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((source / "config.json").read_text())
    weight_map: dict[str, str] = {}
    for shard in safetensors_files(source):
        state: dict[str, Tensor] = {}
        for name, tensor in load_file(str(shard)).items():
            if is_fp8_quantized_weight(name, tensor):
                state[name], state[scale_name_for(name)] = block_quantize_fp8(tensor)
            else:
                state[name] = tensor
        save_file(state, str(out / shard.name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(state, shard.name)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(file, out / file.name)
    hf_config["quantization_config"] = fp8_quantization_config(hf_config)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out
