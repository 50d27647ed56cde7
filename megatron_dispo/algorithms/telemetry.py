"""Per-regime telemetry of the policy losses and how to reduce it across micro-batches and DP ranks.

DISPO's four regimes (arXiv 2602.00983, Sec. 3): the bound pair is picked by the side of a token (positive: A > 0,
or correct under `condition_on="correctness"`; negative: A < 0, or incorrect) and the regime by the ratio r:

    regime 1: positive, r > 1     (exploration: raises entropy)        bounded by eps_high_pos
    regime 2: positive, r < 1     (distillation: lowers entropy)       bounded by eps_low_pos
    regime 3: negative, r > 1     (too tight -> repetitive outputs)    bounded by eps_high_neg
    regime 4: negative, r < 1     (too tight -> vanishing lengths)     bounded by eps_low_neg

Tokens with r == 1 exactly (on-policy) or no side (A == 0 under advantage-sign conditioning) are in no regime.

Reduction. Every "sum" key is normalised by the global token count (`num_global_tokens`), so summing it over
micro-batches and ranks gives the single-batch value exactly. Each "weighted_mean" key is a mean inside one regime;
its exact global value is sum(value * weight) / sum(weight) with the weight key given in `METRIC_REDUCTIONS`.
`pack_metrics` turns a metrics dict into a vector whose plain element-wise sum (over micro-batches, or one
`all_reduce(SUM)` over ranks) `unpack_metrics` turns back into the exact global metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

REGIMES: tuple[int, ...] = (1, 2, 3, 4)


@dataclass(frozen=True)
class MetricReduction:
    """How the trainer combines one metric over micro-batches and data-parallel ranks."""

    kind: Literal["sum", "weighted_mean"]
    """'sum': already divided by the global count, add the parts. 'weighted_mean': sum(v * w) / sum(w)."""
    weight_key: str | None = None
    """For 'weighted_mean': the key holding the weight (itself a 'sum' key)."""


def _build_reductions() -> dict[str, MetricReduction]:
    reductions: dict[str, MetricReduction] = {
        "loss": MetricReduction("sum"),
        "clip_frac": MetricReduction("sum"),
        "log_ratio_abs_mean": MetricReduction("sum"),
        "sign_correct_disagree_frac": MetricReduction("sum"),
    }
    for k in REGIMES:
        reductions[f"regime{k}/token_frac"] = MetricReduction("sum")
        reductions[f"regime{k}/clip_frac"] = MetricReduction("weighted_mean", f"regime{k}/token_frac")
        reductions[f"regime{k}/is_weight_mean"] = MetricReduction("weighted_mean", f"regime{k}/token_frac")
    return reductions


METRIC_REDUCTIONS: dict[str, MetricReduction] = _build_reductions()
"""Relative metric key -> reduction. `compute_policy_loss` returns exactly these keys (the trainer adds `train/`)."""

METRIC_KEYS: tuple[str, ...] = tuple(METRIC_REDUCTIONS)


def sides_matrix(side: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 2] indicator of the positive / negative side, for a per-sequence `side` [batch, 1]."""
    return torch.cat([side > 0, side < 0], dim=1).to(dtype)


def regime_stats_from_tokens(
    side: torch.Tensor, regime_log_ratio: torch.Tensor, is_weight: torch.Tensor, clipped: torch.Tensor
) -> torch.Tensor:
    """Counts per side, [2, 6]: rows positive / negative; columns n(r>1), n(r<1), clipped n(r>1), clipped n(r<1),
    sum of is_weight over r>1, over r<1 (the `LossTerms.regime_stats` layout). Call under torch.no_grad().

    Args:
        side: int8 [batch, 1] or [batch, seq]; +1 positive pair, -1 negative pair, 0 none.
        regime_log_ratio: [batch, seq], 0 on padding; its sign picks r > 1 vs r < 1.
        is_weight: [batch, seq] effective IS weight. clipped: bool [batch, seq], False on padding.
    """
    up = regime_log_ratio > 0
    down = regime_log_ratio < 0
    if side.shape[1] == 1:  # reduce each row, then split rows by side with one tiny matmul
        per_row = torch.stack(
            [
                torch.count_nonzero(up, dim=1),
                torch.count_nonzero(down, dim=1),
                torch.count_nonzero(up & clipped, dim=1),
                torch.count_nonzero(down & clipped, dim=1),
            ],
            dim=1,
        ).to(torch.float64)
        weights = torch.stack([(is_weight * up).sum(1), (is_weight * down).sum(1)], dim=1).to(torch.float64)
        return sides_matrix(side, torch.float64).T @ torch.cat([per_row, weights], dim=1)
    rows = []
    for side_mask in (side > 0, side < 0):
        up_side, down_side = up & side_mask, down & side_mask
        parts = [
            torch.count_nonzero(up_side),
            torch.count_nonzero(down_side),
            torch.count_nonzero(up_side & clipped),
            torch.count_nonzero(down_side & clipped),
            (is_weight * up_side).sum(),
            (is_weight * down_side).sum(),
        ]
        rows.append(torch.stack([part.to(torch.float64) for part in parts]))
    return torch.stack(rows)


def telemetry_values(
    regime_stats: list[float], log_ratio_abs_sum: float, disagree_count: float, num_tokens: float
) -> list[float]:
    """All metrics except `loss`, in `METRIC_KEYS[1:]` order, from host floats: after the loss's one host sync, a
    dozen Python float64 divisions cost less than ~15 tiny tensor ops.

    Args:
        regime_stats: the 12 values of the [2, 6] `LossTerms.regime_stats`, row-major.
    """
    per_regime: list[float] = []
    clipped_total = 0.0
    for side in range(2):  # regimes 1..4 = (+, r>1), (+, r<1), (-, r>1), (-, r<1)
        for direction in range(2):
            count, clipped, weight = (regime_stats[side * 6 + column * 2 + direction] for column in range(3))
            safe_count = max(count, 1.0)
            per_regime += [count / num_tokens, clipped / safe_count, weight / safe_count]
            clipped_total += clipped
    head = [clipped_total / num_tokens, log_ratio_abs_sum / num_tokens, disagree_count / num_tokens]
    return head + per_regime


def sign_correct_disagreement(
    advantages: torch.Tensor, correct: torch.Tensor | None, row_tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Response tokens whose advantage sign contradicts the verifier (A > 0 but wrong, or A < 0 but right)."""
    if correct is None:
        return torch.zeros((), dtype=torch.float64, device=row_tokens.device)
    disagree = ((advantages > 0) & ~correct) | ((advantages < 0) & correct)
    if disagree.shape[1] == 1:
        return (disagree[:, 0].to(torch.float64) * row_tokens.to(torch.float64)).sum()
    return torch.count_nonzero(disagree & (mask > 0)).to(torch.float64)


def pack_metrics(metrics: Mapping[str, float]) -> list[float]:
    """Metrics -> vector to be summed element-wise over micro-batches / all-reduced (SUM) over ranks."""
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack keys {missing}; pass the dict returned by compute_policy_loss.")
    packed = []
    for key in METRIC_KEYS:
        reduction = METRIC_REDUCTIONS[key]
        value = float(metrics[key])
        packed.append(value if reduction.kind == "sum" else value * float(metrics[reduction.weight_key]))
    return packed


def unpack_metrics(summed: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """Inverse of `pack_metrics` after summing: weighted means are divided by their summed weight (0 if none)."""
    values = [float(v) for v in (summed.tolist() if isinstance(summed, torch.Tensor) else summed)]
    if len(values) != len(METRIC_KEYS):
        raise ValueError(f"expected {len(METRIC_KEYS)} packed values (METRIC_KEYS order), got {len(values)}.")
    by_key = dict(zip(METRIC_KEYS, values, strict=True))
    out: dict[str, float] = {}
    for key in METRIC_KEYS:
        reduction = METRIC_REDUCTIONS[key]
        if reduction.kind == "sum":
            out[key] = by_key[key]
        else:
            weight = by_key[reduction.weight_key]
            out[key] = by_key[key] / weight if weight > 0 else 0.0
    return out


def reduce_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Exact global metrics from the per-micro-batch dicts (computed with the same num_global_tokens)."""
    total: list[float] | None = None
    for part in parts:
        packed = pack_metrics(part)
        total = packed if total is None else [a + b for a, b in zip(total, packed, strict=True)]
    if total is None:
        raise ValueError("reduce_metrics needs at least one metrics dict.")
    return unpack_metrics(total)
