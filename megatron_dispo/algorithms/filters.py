"""DAPO dynamic sampling (arXiv 2503.14476, Sec. 3.2): keep only groups whose responses are neither all correct nor
all wrong. Such groups give every response advantage 0 (Eq. 3), so they only dilute the batch.

The test uses the RAW verifier outcome, not the shaped reward: an overlong penalty makes rewards of an all-correct
group differ, yet the group still says nothing about correctness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DynamicSamplingResult:
    """Outcome of `filter_mixed_groups`."""

    kept_indices: torch.Tensor
    """int64 indices of the responses to keep (whole groups, in order)."""
    kept_groups: torch.Tensor
    """int64 indices of the kept groups."""
    num_kept_groups: int
    num_dropped_groups: int
    num_dropped_all_correct: int
    """Dropped because every response was correct."""
    num_dropped_all_wrong: int
    """Dropped because every response was wrong."""


def filter_mixed_groups(correct: torch.Tensor, group_size: int) -> DynamicSamplingResult:
    """Keep the groups with at least one correct and one wrong response.

    Args:
        correct: [num_groups * group_size] raw outcome (bool or 0/1), groups contiguous.
        group_size: G, responses per prompt.
    """
    if not isinstance(correct, torch.Tensor):
        raise TypeError(f"correct must be a torch.Tensor, got {type(correct).__name__}.")
    if correct.dim() != 1:
        raise ValueError(f"correct has shape {list(correct.shape)}; expected [num_groups * group_size] (1-D).")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int >= 1 (responses per prompt).")
    if correct.numel() % group_size != 0:
        raise ValueError(
            f"correct has {correct.numel()} entries, not a multiple of group_size={group_size}; pass whole groups."
        )
    if correct.dtype != torch.bool:
        if bool(((correct != 0) & (correct != 1)).any()):
            raise ValueError("correct must hold only 0/1 (or bool): the raw verifier outcome, not a shaped reward.")
        correct = correct != 0
    per_group = correct.reshape(-1, group_size).sum(dim=1)
    all_correct = per_group == group_size
    all_wrong = per_group == 0
    mixed = ~(all_correct | all_wrong)
    kept_groups = mixed.nonzero().reshape(-1)
    offsets = torch.arange(group_size, device=correct.device)
    kept_indices = (kept_groups.unsqueeze(1) * group_size + offsets).reshape(-1)
    num_kept = int(kept_groups.numel())
    return DynamicSamplingResult(
        kept_indices=kept_indices,
        kept_groups=kept_groups,
        num_kept_groups=num_kept,
        num_dropped_groups=int(per_group.numel()) - num_kept,
        num_dropped_all_correct=int(all_correct.sum()),
        num_dropped_all_wrong=int(all_wrong.sum()),
    )
