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

from megatron_dispo.algorithms.loss_contract import LossInputs, LossTerms

REGIMES: tuple[int, ...] = (1, 2, 3, 4)
_REGIME_VALUES = 3 * len(REGIMES)
"""`regime_stats` flattened: token count, clipped count and is_weight sum per regime."""


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

LAG_KEYS: tuple[str, ...] = (
    "token_frac",
    *(f"regime{k}/{name}" for k in REGIMES for name in ("token_frac", "clip_frac", "is_weight_mean")),
)
"""Per version lag d (``lag{d}/`` + key): the lag-d share of all tokens, and the regime statistics of the lag-d tokens
(token fractions of all tokens as well, so every key reduces like its unlagged counterpart)."""


def metric_keys(num_lags: int = 0) -> tuple[str, ...]:
    """The keys `compute_policy_loss` returns: `METRIC_KEYS`, plus `LAG_KEYS` for lags 0..num_lags-1 when the tokens
    carry their version lag (partial and asynchronous rollouts: a token sampled ``d`` versions before pi_old)."""
    return METRIC_KEYS + tuple(f"lag{d}/{key}" for d in range(num_lags) for key in LAG_KEYS)


def reduction_of(key: str) -> MetricReduction | None:
    """The reduction of a loss metric key, per-lag keys included; None for a key that is not a loss metric."""
    if key in METRIC_REDUCTIONS:
        return METRIC_REDUCTIONS[key]
    prefix, _, rest = key.partition("/")
    if not (prefix.startswith("lag") and prefix[3:].isdigit() and rest in LAG_KEYS):
        return None
    base = METRIC_REDUCTIONS.get(rest, MetricReduction("sum"))
    return MetricReduction(base.kind, None if base.weight_key is None else f"{prefix}/{base.weight_key}")


@torch.no_grad()
def loss_metrics(
    loss: torch.Tensor,
    terms: LossTerms,
    inputs: LossInputs,
    correct: torch.Tensor | None,
    num_tokens: float,
    token_lag: torch.Tensor | None = None,
    num_lags: int = 0,
) -> dict[str, float]:
    """The `metric_keys(num_lags)` of one `compute_policy_loss` call, as plain floats read back in one host sync.

    Args:
        loss: the aggregated loss. terms, inputs: what the loss function returned and read.
        correct: bool [batch, 1] or [batch, seq] verifier outcome, or None (then no disagreement is counted).
        num_tokens: N, the normaliser of every "sum" key (the global token count when one was given).
        token_lag: int [batch, seq], with ``num_lags`` > 0: each token's version lag, in 0..num_lags-1 on response
            tokens; the regime statistics are then also reported per lag (``lag{d}/``).
    """
    regime_terms = (inputs.side, terms.regime_log_ratio, terms.is_weight, terms.clipped)
    parts = [
        loss.detach().reshape(1),
        inputs.log_ratio.detach().abs().sum().reshape(1),  # padding holds log r = 0
        sign_correct_disagreement(inputs.advantages, correct, inputs.mask).reshape(1),
        regime_stats(*regime_terms).reshape(-1),
    ]
    if num_lags:
        assert token_lag is not None, "num_lags > 0 needs token_lag"
        response = inputs.mask > 0
        outside = response & ((token_lag < 0) | (token_lag >= num_lags))
        parts.append(torch.count_nonzero(outside).reshape(1))
        for lag in range(num_lags):
            at_lag = response & (token_lag == lag)
            parts += [torch.count_nonzero(at_lag).reshape(1), regime_stats(*regime_terms, where=at_lag).reshape(-1)]
    values = torch.cat([p.double() for p in parts]).tolist()
    (loss_value, log_ratio_abs_sum, disagree_count), rest = values[:3], values[3:]
    per_regime, rest = rest[:_REGIME_VALUES], rest[_REGIME_VALUES:]
    metrics = {
        "loss": loss_value,
        "log_ratio_abs_mean": log_ratio_abs_sum / num_tokens,
        "sign_correct_disagree_frac": disagree_count / num_tokens,
        "clip_frac": sum(per_regime[1::3]) / num_tokens,  # the clipped counts of regimes 1..4
        **_regime_metrics(per_regime, num_tokens),
    }
    if num_lags:
        outside, rest = rest[0], rest[1:]
        if outside:
            raise ValueError(f"{int(outside)} response tokens have a version lag outside 0..{num_lags - 1}.")
        for lag in range(num_lags):
            (count, *lag_regimes), rest = rest[: 1 + _REGIME_VALUES], rest[1 + _REGIME_VALUES :]
            metrics[f"lag{lag}/token_frac"] = count / num_tokens
            metrics.update({f"lag{lag}/{k}": v for k, v in _regime_metrics(lag_regimes, num_tokens).items()})
    return {key: metrics[key] for key in metric_keys(num_lags)}


def _regime_metrics(per_regime: Sequence[float], num_tokens: float) -> dict[str, float]:
    """``regime{k}/{token_frac,clip_frac,is_weight_mean}`` from `regime_stats`' flattened counts."""
    metrics = {}
    for k in REGIMES:
        count, clipped, weight_sum = per_regime[3 * (k - 1) : 3 * k]
        metrics[f"regime{k}/token_frac"] = count / num_tokens
        metrics[f"regime{k}/clip_frac"] = clipped / max(count, 1.0)
        metrics[f"regime{k}/is_weight_mean"] = weight_sum / max(count, 1.0)
    return metrics


def regime_stats(
    side: torch.Tensor,
    regime_log_ratio: torch.Tensor,
    is_weight: torch.Tensor,
    clipped: torch.Tensor,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 [4, 3]: for regimes 1..4, the token count, the clipped token count and the sum of is_weight.

    Args:
        side: int8 [batch, 1] or [batch, seq]; +1 positive pair, -1 negative pair, 0 none.
        regime_log_ratio: [batch, seq], 0 on padding; its sign picks r > 1 vs r < 1.
        is_weight: [batch, seq] effective IS weight. clipped: bool [batch, seq], False on padding.
        where: bool [batch, seq], optional: only these tokens count (one version lag's).
    """
    up, down = regime_log_ratio > 0, regime_log_ratio < 0
    if where is not None:
        up, down = up & where, down & where
    positive, negative = side > 0, side < 0
    rows = []
    for in_regime in (positive & up, positive & down, negative & up, negative & down):
        count = torch.count_nonzero(in_regime)
        clipped_count = torch.count_nonzero(in_regime & clipped)
        weight_sum = torch.where(in_regime, is_weight, 0.0).sum()
        rows.append(torch.stack([count.double(), clipped_count.double(), weight_sum.double()]))
    return torch.stack(rows)


def sign_correct_disagreement(
    advantages: torch.Tensor, correct: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """Response tokens whose advantage sign contradicts the verifier (A > 0 but wrong, or A < 0 but right)."""
    if correct is None:
        return torch.zeros((), dtype=torch.float64, device=mask.device)
    disagree = ((advantages > 0) & ~correct) | ((advantages < 0) & correct)
    return torch.count_nonzero(disagree & (mask > 0)).double()


def pack_metrics(metrics: Mapping[str, float], num_lags: int = 0) -> list[float]:
    """Metrics -> vector to be summed element-wise over micro-batches / all-reduced (SUM) over ranks."""
    keys = metric_keys(num_lags)
    missing = [key for key in keys if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack keys {missing}; pass the dict returned by compute_policy_loss.")
    packed = []
    for key in keys:
        reduction = reduction_of(key)
        assert reduction is not None
        value = float(metrics[key])
        packed.append(value if reduction.kind == "sum" else value * float(metrics[str(reduction.weight_key)]))
    return packed


def unpack_metrics(summed: Sequence[float] | torch.Tensor, num_lags: int = 0) -> dict[str, float]:
    """Inverse of `pack_metrics` after summing: weighted means are divided by their summed weight (0 if none)."""
    keys = metric_keys(num_lags)
    values = [float(v) for v in (summed.tolist() if isinstance(summed, torch.Tensor) else summed)]
    if len(values) != len(keys):
        raise ValueError(f"expected {len(keys)} packed values (metric_keys order), got {len(values)}.")
    by_key = dict(zip(keys, values, strict=True))
    out: dict[str, float] = {}
    for key in keys:
        reduction = reduction_of(key)
        assert reduction is not None
        if reduction.kind == "sum":
            out[key] = by_key[key]
        else:
            weight = by_key[str(reduction.weight_key)]
            out[key] = by_key[key] / weight if weight > 0 else 0.0
    return out


def num_lags_of(metrics: Mapping[str, float]) -> int:
    """How many version lags a metrics dict of `compute_policy_loss` reports (0: none)."""
    return sum(1 for key in metrics if key.startswith("lag") and key.endswith("/token_frac") and key.count("/") == 1)


def reduce_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Exact global metrics from the per-micro-batch dicts (computed with the same num_global_tokens)."""
    total: list[float] | None = None
    num_lags = 0
    for part in parts:
        num_lags = num_lags_of(part)
        packed = pack_metrics(part, num_lags)
        total = packed if total is None else [a + b for a, b in zip(total, packed, strict=True)]
    if total is None:
        raise ValueError("reduce_metrics needs at least one metrics dict.")
    return unpack_metrics(total, num_lags)
