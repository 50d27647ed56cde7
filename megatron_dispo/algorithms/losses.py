"""Policy losses of DISPO (arXiv 2602.00983) and its baselines, pure torch, selected by name.

Notation: r_t = exp(logprobs_t - old_logprobs_t), A the advantage, sg[.] stop-gradient, m the response mask.
Every loss is written as a per-token loss l_t and its derivative g_t = dl_t/dlogprobs_t (see `LossTerms`);
`compute_policy_loss` aggregates (`aggregation.py`), applies the gradient through one autograd node, and reports
per-regime telemetry (`telemetry.py`). On CPU, dispo and cispo with per-sequence advantages go through the one-pass
kernel of `fused_cpu.py` instead (same results; the eager code below is its fallback and the CUDA path). Equation
numbers are those of the DISPO paper unless stated.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import torch

from megatron_dispo.algorithms import fused_cpu
from megatron_dispo.algorithms import sspo as _sspo
from megatron_dispo.algorithms.aggregation import aggregation_row_scale
from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.registry import LossInputs, LossTerms, get_policy_loss, register_policy_loss
from megatron_dispo.algorithms.telemetry import (
    METRIC_KEYS,
    regime_stats_from_tokens,
    sides_matrix,
    sign_correct_disagreement,
    telemetry_values,
)
from megatron_dispo.algorithms.validation import (
    as_global_count,
    broadcast_per_sequence,
    check_mask_summary,
    float_mask_unchecked,
    require_finite,
    require_tensor,
)

__all__ = ["PolicyLossConfig", "compute_policy_loss"]


def log_bound_low(eps_low: float) -> float:
    """log(1 - eps_low); -inf for eps_low = 1 (no lower clip)."""
    return math.log1p(-eps_low) if eps_low < 1.0 else -math.inf


def log_bound_high(eps_high: float) -> float:
    """log(1 + eps_high)."""
    return math.log1p(eps_high)


def _pair_log_bounds(config: PolicyLossConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """(low, high) log-space clip bounds of the positive and of the negative side: DISPO's two pairs (Eq. 9), or
    CISPO's one pair on both sides (Eq. 7)."""
    if config.loss_type == "cispo":
        pair = (log_bound_low(config.eps_low), log_bound_high(config.eps_high))
        return pair, pair
    return (
        (log_bound_low(config.eps_low_pos), log_bound_high(config.eps_high_pos)),
        (log_bound_low(config.eps_low_neg), log_bound_high(config.eps_high_neg)),
    )


def _side_log_bounds(
    side: torch.Tensor, config: PolicyLossConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-side clip bounds in log space, shaped like `side`: positive pair where side > 0, negative otherwise."""
    positive = side > 0
    (low_pos, high_pos), (low_neg, high_neg) = _pair_log_bounds(config)

    def pick(positive_value: float, negative_value: float) -> torch.Tensor:
        # a 0-dim tensor operand fixes the dtype (a bare Python float would give float32 bounds)
        return torch.where(positive, torch.tensor(positive_value, dtype=dtype, device=side.device), negative_value)

    return pick(low_pos, low_neg), pick(high_pos, high_neg)


def _clamp(values: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """clip(values, low, high) into a new tensor. With broadcast tensor bounds, maximum + in-place clamp_max_ is ~4x
    faster on CPU than the three-operand torch.clamp (its broadcast path is slow); same values."""
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low_t = torch.as_tensor(low, dtype=values.dtype, device=values.device)
        high_t = torch.as_tensor(high, dtype=values.dtype, device=values.device)
        return torch.maximum(values, low_t).clamp_max_(high_t)
    return torch.clamp(values, low, high)


def _count_nonzero_signs(signs: torch.Tensor) -> torch.Tensor:
    """Per-row number of nonzero entries of a {-1, 0, 1} tensor: the squared L2 norm, rounded (exact for counts up
    to 2**24; the L2 reduction is ~7x faster on CPU than an L1 norm or a bool count)."""
    return torch.linalg.vector_norm(signs, ord=2, dim=1).square_().round_()


LOG2E = 1.0 / math.log(2.0)


def _exp_(values: torch.Tensor) -> torch.Tensor:
    """exp in place as exp2(x * log2(e)): ~5x faster than torch.exp on CPU (float32 and float64) at <= 2 ulp more
    error (float32: relative error < 2e-7 for |x| <= 5, float64: < 1e-15)."""
    return values.mul_(LOG2E).exp2_()


_WORKSPACE = threading.local()


def _scratch(like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` uninitialised buffers shaped like `like` that the caller uses only within this call (never returned).

    On CPU they are views of one per-thread, per-dtype buffer kept between calls: a fresh 1 MB allocation there
    can cost more in page faults than the arithmetic done in it. Elsewhere (CUDA has a caching allocator) plain
    `empty_like`. The cache holds the largest size seen, `count * numel` elements per dtype and thread."""
    if like.device.type != "cpu":
        return [torch.empty_like(like) for _ in range(count)]
    cache: dict[torch.dtype, torch.Tensor] = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = like.numel()
    flat = cache.get(like.dtype)
    if flat is None or flat.numel() < count * numel:
        flat = cache[like.dtype] = torch.empty(count * numel, dtype=like.dtype)
    return [flat[i * numel : (i + 1) * numel].view(like.shape) for i in range(count)]


def _clipped_weight_terms(
    inputs: LossInputs,
    low: torch.Tensor | float,
    high: torch.Tensor | float,
    coefficient: torch.Tensor | float,
    keep: torch.Tensor | None = None,
) -> LossTerms:
    """The REINFORCE-style family (dispo, cispo, reinforce, online_sft): l_t = -sg[w_t] * c_t * logprobs_t with
    w_t = clip(r_t, lo, hi), so g_t = -w_t * c_t. Clipping is done on log r (exact; exp once).

    Args:
        low, high: log-space bounds, floats or tensors broadcastable to [batch, seq].
        coefficient: c_t (A, or 1 for online SFT), [batch, 1] / [batch, seq] tensor or float.
        keep: optional bool mask of the tokens that contribute (online SFT: correct responses only).
    """
    log_ratio = inputs.log_ratio  # owned: becomes the weight buffer
    per_row = inputs.side.shape[1] == 1 and all(
        not isinstance(x, torch.Tensor) or x.shape[1] == 1 for x in (low, high, coefficient, keep)
    )
    if not per_row:
        clipped = (log_ratio > high) | (log_ratio < low)
        regime_log_ratio = log_ratio.clone()
        log_ratio_abs_sum = regime_log_ratio.abs().sum()
        if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
            low_t = torch.as_tensor(low, dtype=log_ratio.dtype, device=log_ratio.device)
            high_t = torch.as_tensor(high, dtype=log_ratio.dtype, device=log_ratio.device)
            weight = _exp_(log_ratio.clamp_min_(low_t).clamp_max_(high_t))
        else:
            weight = _exp_(log_ratio.clamp_(low, high))
        if keep is not None:
            weight.mul_(keep)
            clipped &= keep
        stats = regime_stats_from_tokens(inputs.side, regime_log_ratio, weight, clipped)
        return LossTerms(weight * -coefficient, None, None, stats, None, None, None, log_ratio_abs_sum)
    # Per-sequence side and coefficient (the common case). Every per-row count comes from the log-ratio buffer and
    # two scratch buffers reused between calls (`_scratch`), with in-place passes and plain reductions only: fresh
    # allocations, bool reductions (an int64 copy each) and L1 norms (a slow kernel) cost more than the arithmetic.
    # Counts of {-1, 0, 1} vectors are squared L2 norms, rounded. The log-ratio buffer ends as the masked gradient
    # coefficient. Padding has log r = 0: no sign, never clipped (lo <= 0 <= hi), weight 1 (masked at the end).
    signs, clamped = _scratch(log_ratio, 2)
    torch.sign(log_ratio, out=signs)  # +1: r > 1, -1: r < 1
    log_ratio_abs_sum = torch.dot(signs.reshape(-1), log_ratio.reshape(-1))  # sum |log r|
    sign_sum = signs.sum(1)  # n(r>1) - n(r<1)
    moved = _count_nonzero_signs(signs)  # n(r>1) + n(r<1)
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low_t = torch.as_tensor(low, dtype=log_ratio.dtype, device=log_ratio.device)
        high_t = torch.as_tensor(high, dtype=log_ratio.dtype, device=log_ratio.device)
        torch.maximum(log_ratio, low_t, out=clamped).clamp_max_(high_t)  # log of the clipped IS weight
    else:
        torch.clamp(log_ratio, low, high, out=clamped)
    clip_signs = log_ratio.sub_(clamped).sign_()  # +1 clipped at the top, -1 at the bottom, 0 inside
    clip_sum = clip_signs.sum(1)  # n_clipped(r>1) - n_clipped(r<1)
    clip_total = _count_nonzero_signs(clip_signs)  # n_clipped(r>1) + n_clipped(r<1)
    weight = _exp_(clamped)
    signs.mul_(weight)  # +w where r > 1, -w where r < 1 (w > 0), 0 elsewhere
    weight_signed = signs.sum(1)  # w(r>1) - w(r<1)
    weight_down = -signs.clamp_(max=0.0).sum(1)  # w(r<1)
    grad_coef = torch.mul(weight, inputs.mask, out=log_ratio)  # the owned buffer leaves as the gradient
    per_row_stats = torch.stack(
        [
            (moved + sign_sum) / 2,
            (moved - sign_sum) / 2,
            (clip_total + clip_sum) / 2,
            (clip_total - clip_sum) / 2,
            weight_signed + weight_down,
            weight_down,
        ],
        dim=1,
    )
    row_factor = torch.as_tensor(coefficient, dtype=weight.dtype, device=weight.device).expand(weight.shape[0], 1)
    if keep is not None:  # dropped responses: no gradient, weight and clip counts reported as 0
        per_row_stats[:, 2:] *= keep
        row_factor = row_factor * keep
    row_factor = -row_factor
    stats = sides_matrix(inputs.side, torch.float64).T @ per_row_stats.double()  # exact totals at any batch size
    return LossTerms(grad_coef, row_factor, None, stats, None, None, None, log_ratio_abs_sum, grad_coef_masked=True)


@register_policy_loss("dispo", aggregation="token_mean")
def dispo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """DISPO, Eqs. 8-9: REINFORCE with an IS weight clipped by a bound pair chosen per side.

        l_t = -sg[w_t] * A_t * logprobs_t,
        w_t = clip(r_t, 1 - eps_low_pos, 1 + eps_high_pos)  if A_t > 0 (or correct)
              clip(r_t, 1 - eps_low_neg, 1 + eps_high_neg)  if A_t < 0 (or incorrect)

    The four eps values bound the four regimes (telemetry.py). Gradient: g_t = -w_t * A_t.
    """
    low, high = _side_log_bounds(inputs.side, config, inputs.log_ratio.dtype)
    return _clipped_weight_terms(inputs, low, high, inputs.advantages)


@register_policy_loss("cispo", aggregation="token_mean")
def cispo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """CISPO, Eq. 7 (MiniMax-M1, arXiv 2506.13585): l_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * logprobs_t.

    DISPO with the same pair on both sides. Paper setting eps = (1, 100) (preset 'cispo').
    """
    (low, high), _ = _pair_log_bounds(config)
    return _clipped_weight_terms(inputs, low, high, inputs.advantages)


@register_policy_loss("reinforce", aggregation="seq_mean_token_mean")
def reinforce_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """REINFORCE with off-policy correction, Eq. 6: l_t = -sg[r_t] * A_t * logprobs_t (no clipping), per-sequence
    token mean, then mean over sequences."""
    return _clipped_weight_terms(inputs, -math.inf, math.inf, inputs.advantages)


@register_policy_loss("online_sft", aggregation="token_mean")
def online_sft_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """Online SFT (Table 1 baseline and its +Regime 1/2 ablations): learn only from correct responses.

        l_t = -sg[clip(r_t, 1 - eps_low_pos, 1 + eps_high_pos)] * c_t * logprobs_t   on positive-side responses,
        l_t = 0                                                                       elsewhere,

    c_t = 1 ('one', default) or A_t ('advantage'). With eps_low_pos = eps_high_pos = 0 the IS weight is 1: plain
    online SFT on self-generated correct answers; eps_high_pos > 0 adds regime 1, eps_low_pos > 0 adds regime 2.
    Token-mean over all response tokens of the batch (incorrect tokens count in N but add 0), like DISPO.
    """
    low, high = log_bound_low(config.eps_low_pos), log_bound_high(config.eps_high_pos)
    coefficient = inputs.advantages if config.online_sft_coefficient == "advantage" else 1.0
    return _clipped_weight_terms(inputs, low, high, coefficient, keep=inputs.side > 0)


def _ppo_clip_terms(
    log_ratio: torch.Tensor, advantages: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
) -> LossTerms:
    """PPO clipped surrogate l = -min(r A, clip(r, lo, hi) A) for a (possibly sequence-level) log-ratio.

    The min picks the clipped branch exactly when A > 0 and r > hi, or A < 0 and r < lo; there the gradient is 0,
    elsewhere it is -A r."""
    ratio = log_ratio.exp()
    clipped = ((advantages > 0) & (log_ratio > high)) | ((advantages < 0) & (log_ratio < low))
    clipped_ratio = _clamp(log_ratio, low, high).exp_()
    token_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    effective_weight = ratio.masked_fill_(clipped, 0.0)
    grad_coef = -(effective_weight * advantages)
    return LossTerms(grad_coef, None, token_loss, None, effective_weight, clipped, log_ratio)


@register_policy_loss("dapo", aggregation="token_mean")
def dapo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """DAPO, Eqs. 4-5 (arXiv 2503.14476): l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), token-mean,
    r_t differentiated (PPO-style). Default eps = (0.2, 0.28)."""
    low, high = log_bound_low(config.eps_low), log_bound_high(config.eps_high)
    return _ppo_clip_terms(inputs.log_ratio, inputs.advantages, low, high)


@register_policy_loss("grpo", aggregation="seq_mean_token_mean")
def grpo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """GRPO, Eqs. 1-2 (arXiv 2402.03300) without the KL term (beta = 0, as in DAPO/DISPO): the PPO clipped surrogate
    with symmetric eps = 0.2 (preset 'grpo'), mean over each response's tokens, then over responses."""
    return dapo_loss(inputs, config)


@register_policy_loss("gspo", aggregation="seq_mean_token_mean")
def gspo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """GSPO (arXiv 2507.18071, Eqs. 5-7), token form: s_i = exp(mean_t log r_{i,t}) is the length-normalised
    (geometric-mean) sequence ratio; s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)] equals s_i in value;

        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t}),

    averaged over tokens then sequences, identical to sequence-level GSPO (value and gradient) when A is constant per
    sequence and also defined for per-token A. Gradient: g_{i,t} = -A_{i,t} s_i where unclipped. GSPO's own ranges
    are (3e-4, 4e-4) (preset 'gspo')."""
    mask = inputs.mask
    row_tokens = mask.sum(1, keepdim=True).clamp(min=1)
    sequence_log_ratio = inputs.log_ratio.sum(1, keepdim=True) / row_tokens
    token_sequence_log_ratio = sequence_log_ratio * mask  # broadcast to tokens, 0 on padding
    low, high = log_bound_low(config.eps_low), log_bound_high(config.eps_high)
    return _ppo_clip_terms(token_sequence_log_ratio, inputs.advantages, low, high)


@register_policy_loss("sspo", aggregation="seq_mean_token_mean")
def sspo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """SSPO (arXiv 2511.04256): GSPO's geometric-mean ratio taken per subsentence instead of per response, with clip
    bounds scaled by the subsentence's mean entropy (wider where the policy is uncertain). Segmentation and scaling
    rules: `sspo.py`. Per token: l_t = -min(s_k A_t, clip(s_k, 1 - eps_low^k, 1 + eps_high^k) A_t) with k the
    subsentence of t; gradient -A_t s_k where unclipped (token form, as for gspo)."""
    segment_log_ratio, low, high = _sspo.subsentence_ratio_and_bounds(inputs, config)
    return _ppo_clip_terms(segment_log_ratio, inputs.advantages, low, high)


class _LinearInLogprobs(torch.autograd.Function):
    """Returns the precomputed loss value; the gradient is coef * grad (coef = dLoss/dlogprobs in closed form).

    One autograd node instead of recording every elementwise op. The first backward hands the [batch, seq]
    coefficient buffer to autograd (it becomes .grad without a copy); a later backward through a retained graph gets
    a freshly computed one from `recompute`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logprobs: torch.Tensor,
        coef: torch.Tensor,
        value: torch.Tensor,
        recompute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        ctx.coef, ctx.recompute, ctx.logprobs_dtype = coef, recompute, logprobs.dtype
        return value.clone()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        coef = ctx.coef
        if coef is None:  # the buffer went to the first backward (retain_graph=True)
            coef = ctx.recompute()
        ctx.coef = None  # drop our reference so autograd can adopt the buffer as .grad without a copy
        # loss.backward() seeds 1.0: skip that pass on CPU (reading the value there is not a device sync)
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            coef.mul_(grad_output)
        return coef.to(ctx.logprobs_dtype), None, None, None


def _recompute_gradient(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    options: dict[str, object],
) -> torch.Tensor:
    """dLoss/dlogprobs computed again (for a second backward through the same graph)."""
    leaf = logprobs.detach().requires_grad_()
    with torch.enable_grad():
        loss, _ = compute_policy_loss(leaf, old_logprobs, advantages, response_mask, config, **options)  # type: ignore[arg-type]
        (gradient,) = torch.autograd.grad(loss, leaf)
    return gradient


def _attach_gradient(
    value: torch.Tensor,
    coef: torch.Tensor,
    arguments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig, dict[str, object]],
) -> torch.Tensor:
    """The loss tensor: `value`, with gradient `coef` w.r.t. logprobs (arguments[0]) when it requires grad."""
    logprobs = arguments[0]
    if not logprobs.requires_grad:
        return value
    return _LinearInLogprobs.apply(logprobs, coef, value, functools.partial(_recompute_gradient, *arguments))


def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    *,
    correct: torch.Tensor | None = None,
    num_global_tokens: int | float | torch.Tensor | None = None,
    num_global_sequences: int | float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss named by `config.loss_type`, as a scalar, plus telemetry (plain floats).

    Args:
        logprobs: [batch, seq] log pi_theta of the sampled tokens (requires grad in training).
        old_logprobs: [batch, seq] log pi_old of the same tokens (behaviour policy); never differentiated.
        advantages: [batch] or [batch, 1] (one per response, broadcast over its tokens) or [batch, seq].
        response_mask: [batch, seq], 1 on response tokens (bool or 0/1). Padding values of the other tensors must
            be finite (fill with 0) and are otherwise ignored.
        config: which loss and its bounds.
        correct: [batch] (or [batch, seq]) raw verifier outcome; required for condition_on="correctness", and
            enables `sign_correct_disagree_frac` otherwise.
        num_global_tokens: response tokens of the whole mini-batch over all micro-batches and DP ranks. With it, the
            sum over any split of the returned losses, gradients and 'sum' metrics equals the single-batch result;
            without it, this call's mask sum is used.
        num_global_sequences: the same for sequences with >= 1 response token; required with num_global_tokens for
            the sequence-mean losses (grpo, reinforce, gspo, sspo).
        entropy: [batch, seq] per-token entropy of pi_theta (sspo's adaptive bounds; detached here).
        segment_ids: [batch, seq] integer subsentence id per token (sspo; see `sspo.py`).

    Returns:
        (loss, metrics): loss is a 0-dim tensor whose gradient w.r.t. logprobs is the loss's closed-form gradient
        (IS weights are detached where the paper says sg); metrics has the keys of `telemetry.METRIC_REDUCTIONS`.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}; use get_preset(name).")
    registered = get_policy_loss(config.loss_type)
    aggregation = registered.default_aggregation if config.aggregation == "default" else config.aggregation
    options = {
        "correct": correct,
        "num_global_tokens": num_global_tokens,
        "num_global_sequences": num_global_sequences,
        "entropy": entropy,
        "segment_ids": segment_ids,
    }
    arguments = (logprobs, old_logprobs, advantages, response_mask, config, options)
    fusable = config.loss_type in _FUSED_LOSSES and aggregation == "token_mean"
    if fusable and entropy is None and segment_ids is None:
        fused = _fused_policy_loss(
            logprobs, old_logprobs, advantages, response_mask, config, correct, num_global_tokens
        )
        if fused is not None:
            value, coef, metrics = fused
            return _attach_gradient(value, coef, arguments), metrics  # type: ignore[arg-type]
    inputs, correct_b, row_tokens, local_tokens, local_sequences = _prepare_inputs(
        logprobs, old_logprobs, advantages, response_mask, config, correct, entropy, segment_ids
    )
    num_tokens = as_global_count("num_global_tokens", num_global_tokens, local_tokens, "response tokens")
    num_sequences = as_global_count("num_global_sequences", num_global_sequences, local_sequences, "sequences")
    if aggregation == "seq_mean_token_mean" and num_tokens is not None and num_sequences is None:
        raise ValueError(
            f"loss_type={config.loss_type!r} averages per sequence; with num_global_tokens also pass "
            "num_global_sequences (sequences with >= 1 response token in the whole mini-batch), or the micro-batch "
            "results will not add up to the mini-batch loss."
        )
    row_scale = aggregation_row_scale(
        aggregation,
        row_tokens,
        num_tokens=num_tokens if num_tokens is not None else local_tokens,
        num_sequences=num_sequences if num_sequences is not None else local_sequences,
    )

    with torch.no_grad():
        terms = registered.fn(inputs, config)
        log_ratio_abs_sum = terms.log_ratio_abs_sum
        if log_ratio_abs_sum is None:  # the loss left inputs.log_ratio untouched
            log_ratio_abs_sum = inputs.log_ratio.abs().sum()
        coef = terms.grad_coef if terms.grad_coef_masked else terms.grad_coef.mul_(inputs.mask)
        row = row_scale  # scale_t = mask_t * row_b (aggregation.py)
        if terms.row_factor is not None:
            row = terms.row_factor.to(coef.dtype) * row
        if terms.token_loss is None:  # linear: l_t = g_t * logprobs_t, so the value is <gradient, logprobs>
            coef.mul_(row)  # now the full gradient
            value = torch.dot(coef.reshape(-1), inputs.logprobs.reshape(-1))
        else:
            value = _row_weighted_sum(terms.token_loss.mul_(inputs.mask), None, row_scale)
            coef.mul_(row)
        if terms.regime_stats is not None:
            regime_stats = terms.regime_stats
        else:
            regime_stats = regime_stats_from_tokens(inputs.side, terms.regime_log_ratio, terms.is_weight, terms.clipped)
        parts = [value.reshape(1), regime_stats.reshape(-1), log_ratio_abs_sum.reshape(1)]
        if correct_b is not None:
            parts.append(sign_correct_disagreement(inputs.advantages, correct_b, row_tokens, inputs.mask).reshape(1))
        synced = torch.cat([part.to(torch.float64) for part in parts]).tolist()  # one host sync for all metrics
    telemetry_tokens = num_tokens if num_tokens is not None else max(local_tokens, 1.0)
    disagree_count = synced[14] if correct_b is not None else 0.0
    telemetry = telemetry_values(synced[1:13], synced[13], disagree_count, telemetry_tokens)
    loss = _attach_gradient(value, coef, arguments)
    return loss, dict(zip(METRIC_KEYS, [synced[0], *telemetry], strict=True))


_FUSED_LOSSES = frozenset({"dispo", "cispo"})
"""Losses the one-pass CPU kernel computes (`fused_cpu.py`): clipped IS weight times a per-sequence advantage."""


def _fused_policy_loss(
    logprobs: object,
    old_logprobs: object,
    advantages: object,
    response_mask: object,
    config: PolicyLossConfig,
    correct: object,
    num_global_tokens: object,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]] | None:
    """(value, gradient w.r.t. logprobs, metrics) of dispo / cispo with token-mean aggregation from the one-pass CPU
    kernel, or None when it does not apply.

    It applies to contiguous CPU float32/float64 tensors of one dtype with per-sequence advantages and a float (or
    bool) mask. Anything else, and any input the kernel's probes reject (non-finite values, a mask that is not 0/1,
    an empty batch without num_global_tokens), returns None: the eager path then computes the result or raises its
    precise error. A num_global_tokens below this call's count raises here, with `as_global_count`'s message. Same
    values as the eager path up to float rounding (exp by polynomial, float64 accumulation); tested against it in
    tests/algorithms/test_fused_cpu.py."""
    if not (
        isinstance(logprobs, torch.Tensor)
        and isinstance(old_logprobs, torch.Tensor)
        and isinstance(advantages, torch.Tensor)
        and isinstance(response_mask, torch.Tensor)
        and logprobs.device.type == "cpu"
        and logprobs.dim() == 2
        and logprobs.numel() > 0
    ):
        return None
    dtype, shape = logprobs.dtype, logprobs.shape
    batch = shape[0]
    if (
        dtype not in (torch.float32, torch.float64)
        or old_logprobs.dtype != dtype
        or advantages.dtype != dtype
        or old_logprobs.shape != shape
        or response_mask.shape != shape
        or advantages.numel() != batch
        or advantages.dim() > 2
        or (advantages.dim() == 2 and advantages.shape[1] != 1)
        or old_logprobs.device.type != "cpu"
        or advantages.device.type != "cpu"
        or response_mask.device.type != "cpu"
        or response_mask.dtype not in (dtype, torch.bool)
    ):
        return None
    if correct is not None:
        if not (isinstance(correct, torch.Tensor) and correct.dtype == torch.bool and correct.device.type == "cpu"):
            return None
        if correct.numel() != batch or correct.dim() > 2 or (correct.dim() == 2 and correct.shape[1] != 1):
            return None
    side_by_correct = config.condition_on == "correctness"
    if side_by_correct and correct is None:
        return None
    kernel = fused_cpu.kernel()
    if kernel is None:
        return None
    num_tokens = as_global_count("num_global_tokens", num_global_tokens, 0.0, "response tokens")
    positive_pair, negative_pair = _pair_log_bounds(config)
    lp = logprobs.detach().contiguous()
    mask = response_mask.contiguous() if response_mask.dtype == dtype else response_mask.to(dtype)
    grad = torch.empty_like(lp)
    stats = kernel(
        lp,
        old_logprobs.detach().contiguous(),
        mask,
        advantages.detach().reshape(batch).contiguous(),
        None if correct is None else correct.reshape(batch).contiguous(),
        side_by_correct,
        (*positive_pair, *negative_pair),
        0.0 if num_tokens is None else 1.0 / num_tokens,
        grad,
    )
    if not math.isfinite(stats.log_ratio_abs_sum + stats.advantage_sum) or stats.bad_mask_rows:
        return None  # the eager path names the bad field
    if num_tokens is None and stats.tokens == 0:
        return None  # ... or the empty batch
    if num_tokens is not None:  # a global count below this call's own raises here, as on the eager path
        as_global_count("num_global_tokens", num_global_tokens, stats.tokens, "response tokens")
    telemetry_tokens = num_tokens if num_tokens is not None else stats.tokens
    telemetry = telemetry_values(stats.regime_stats, stats.log_ratio_abs_sum, stats.disagree_tokens, telemetry_tokens)
    metrics = dict(zip(METRIC_KEYS, [stats.value, *telemetry], strict=True))
    return torch.tensor(stats.value, dtype=dtype), grad, metrics


def _row_weighted_sum(values: torch.Tensor, other: torch.Tensor | None, row: torch.Tensor | float) -> torch.Tensor:
    """sum_{b,t} row_b * values_bt (* other_bt): one pass, no [batch, seq] temporary (row dot products)."""
    row_sums = values.sum(1) if other is None else torch.linalg.vecdot(values, other, dim=1)
    if isinstance(row, torch.Tensor) and row.dim() > 0:
        return torch.dot(row_sums, row.reshape(-1).to(row_sums.dtype))
    return row_sums.sum() * row


def _prepare_inputs(
    logprobs: object,
    old_logprobs: object,
    advantages: object,
    response_mask: object,
    config: PolicyLossConfig,
    correct: object,
    entropy: object,
    segment_ids: object,
) -> tuple[LossInputs, torch.Tensor | None, torch.Tensor, float, float]:
    """Validate shapes, dtypes and values; return detached, broadcast inputs, the bool `correct`, the per-row token
    counts and this call's token and sequence counts (host floats)."""
    logprobs = require_tensor("logprobs", logprobs)
    old_logprobs = require_tensor("old_logprobs", old_logprobs)
    advantages = require_tensor("advantages", advantages)
    response_mask = require_tensor("response_mask", response_mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {list(logprobs.shape)}; expected [batch, seq] (2-D).")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"logprobs has dtype {logprobs.dtype}; expected a floating dtype.")
    batch, seq = logprobs.shape
    for name, tensor in (("old_logprobs", old_logprobs), ("response_mask", response_mask)):
        if tuple(tensor.shape) != (batch, seq):
            raise ValueError(
                f"{name} has shape {list(tensor.shape)} but logprobs has [{batch}, {seq}]; pass one value per token."
            )
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} has dtype {tensor.dtype}; expected a floating dtype.")
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("response_mask", response_mask)):
        if tensor.device != logprobs.device:
            raise ValueError(f"{name} is on {tensor.device} but logprobs on {logprobs.device}; move it with .to().")
    compute_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    lp = logprobs.detach().to(compute_dtype)
    old = old_logprobs.detach().to(compute_dtype)
    adv = broadcast_per_sequence("advantages", advantages.detach(), batch, seq).to(compute_dtype)
    mask, mask_summary = float_mask_unchecked(response_mask, compute_dtype)
    log_ratio = torch.sub(lp, old).mul_(mask)
    row_tokens = mask.sum(1)
    # Everything the checks and the normalisers need, read back in one host sync. log r is non-finite wherever
    # logprobs or old_logprobs is (inf - x, inf * 0 and nan all stay non-finite), so its sum is the finiteness
    # probe of both; the element-wise search that names the field runs only when a probe fails.
    probes = [
        log_ratio.sum().to(torch.float64).reshape(1),
        adv.sum().to(torch.float64).reshape(1),
        row_tokens.double().sum().reshape(1),
        (row_tokens > 0).sum().to(torch.float64).reshape(1),
    ]
    if mask_summary is not None:
        probes.append(mask_summary)
    summary = torch.cat(probes).tolist()
    if not math.isfinite(summary[0] + summary[1]):
        require_finite(
            [
                ("logprobs", lp, "log-probs must be finite everywhere (fill padding with 0); check the forward."),
                ("old_logprobs", old, "log-probs must be finite everywhere (fill padding with 0)."),
                ("advantages", adv, "advantages must be finite; check the reward/advantage computation."),
            ]
        )  # raises, unless the probe overflowed on finite values (then the mask check below decides)
    if mask_summary is not None:
        check_mask_summary([*summary[4:7], summary[2]])
    local_tokens, local_sequences = summary[2], summary[3]
    correct_b = _as_correct(correct, batch, seq, logprobs.device)
    if config.condition_on == "correctness":
        if correct_b is None:
            raise ValueError(
                "condition_on='correctness' needs the `correct` tensor ([batch] raw verifier outcome); pass "
                "correct=... or use condition_on='advantage_sign'."
            )
        side = torch.where(correct_b, 1, -1).to(torch.int8)
    else:
        side = torch.sign(adv).to(torch.int8)
    entropy_t = _as_token_tensor("entropy", entropy, batch, seq, logprobs.device, floating=True)
    if entropy_t is not None:
        entropy_t = entropy_t.detach().to(compute_dtype)
        require_finite([("entropy", entropy_t, "per-token entropy must be finite (fill padding with 0).")])
    segment_t = _as_token_tensor("segment_ids", segment_ids, batch, seq, logprobs.device, floating=False)
    inputs = LossInputs(
        logprobs=lp,
        old_logprobs=old,
        log_ratio=log_ratio,
        advantages=adv,
        mask=mask,
        side=side,
        entropy=entropy_t,
        segment_ids=segment_t,
    )
    return inputs, correct_b, row_tokens, local_tokens, local_sequences


def _as_correct(correct: object, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
    if correct is None:
        return None
    correct = require_tensor("correct", correct)
    if correct.device != device:
        raise ValueError(f"correct is on {correct.device} but logprobs on {device}; move it with .to().")
    correct = broadcast_per_sequence("correct", correct.detach(), batch, seq)
    if correct.dtype != torch.bool:
        as_float = correct.to(torch.float64)
        if int(torch.count_nonzero(as_float * (as_float - 1))):
            raise ValueError("correct must hold only 0/1 (or bool): the raw verifier outcome per response.")
        correct = correct != 0
    return correct


def _as_token_tensor(
    name: str, value: object, batch: int, seq: int, device: torch.device, *, floating: bool
) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = require_tensor(name, value)
    if tuple(tensor.shape) != (batch, seq):
        raise ValueError(f"{name} has shape {list(tensor.shape)}; expected [{batch}, {seq}] like logprobs.")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logprobs on {device}; move it with .to().")
    if floating and not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected a floating dtype.")
    if not floating and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dtype.is_complex):
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected an integer dtype (segment index per token).")
    return tensor
