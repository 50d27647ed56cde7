"""Per-step metrics reduced over ranks: the replicas' refit figures, the train/rollout mismatch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_dispo.algorithms.mismatch import mismatch_from_sums, mismatch_sums
from megatron_dispo.comm.channel import GroupChannel


def gather_refit_metrics(
    channel: GroupChannel | None, seconds: float, payload_bytes: int, tensor_parallel_size: int, *, failed: bool = False
) -> tuple[dict[str, float], list[int]]:
    """``refit/replica{i}/{time_s,bytes}`` of every replica (its leader's: the first of each ``tensor_parallel_size``
    consecutive ranks of ``channel``), and the ranks whose refit failed; one host all-gather."""
    mine = torch.tensor([float(failed), seconds, float(payload_bytes)], dtype=torch.float64)
    rows = channel.all_gather(mine) if channel is not None else [mine]
    out: dict[str, float] = {}
    for replica, row in enumerate(rows[::tensor_parallel_size]):
        out[f"refit/replica{replica}/time_s"] = float(row[1])
        out[f"refit/replica{replica}/bytes"] = float(row[2])
    return out, [rank for rank, row in enumerate(rows) if row[0] > 0]


def mismatch_metrics(
    trainer_logprobs: Mapping[int, torch.Tensor], rollout_logprobs: Sequence[torch.Tensor], host_dp: GroupChannel
) -> dict[str, float]:
    """Train/rollout mismatch of this rank's sequences (``algorithms.mismatch``), reduced over the data-parallel
    ranks on their host group (each holds a share of the sequences)."""
    sums, max_abs = mismatch_sums((values, rollout_logprobs[index]) for index, values in trainer_logprobs.items())
    host_dp.all_reduce(sums)
    host_dp.all_reduce(max_abs, op="max")
    return mismatch_from_sums(sums, max_abs)
