"""Policy losses of DISPO (arXiv 2602.00983) and its baselines: one small torch function each, selected by name.

Notation: r_t = exp(logprobs_t - old_logprobs_t), A the advantage, sg[.] stop-gradient (`.detach()`), m the mask.
Each loss returns its per-token loss l_t (`LossTerms`); autograd gives the gradient. `compute_policy_loss` validates
the inputs, aggregates (`aggregation.py`) and reports per-regime telemetry under no_grad (`telemetry.py`). Equation
numbers are those of the DISPO paper unless another paper is named.
"""

from __future__ import annotations

import math

import torch

from megatron_dispo.algorithms import sspo as _sspo
from megatron_dispo.algorithms.aggregation import aggregate
from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.loss_contract import LossInputs, LossTerms
from megatron_dispo.algorithms.registry import get_policy_loss, register_policy_loss
from megatron_dispo.algorithms.telemetry import loss_metrics
from megatron_dispo.algorithms.validation import (
    as_global_count,
    broadcast_per_sequence,
    float_mask,
    require_finite,
    require_tensor,
)

__all__ = ["PolicyLossConfig", "compute_policy_loss"]


def log_bound_low(eps_low: float) -> float:
    """log(1 - eps_low); -inf for eps_low = 1 (no lower clip). Clipping log r is exact and avoids overflow of r."""
    return math.log1p(-eps_low) if eps_low < 1.0 else -math.inf


def log_bound_high(eps_high: float) -> float:
    """log(1 + eps_high)."""
    return math.log1p(eps_high)


def _side_log_bounds(
    side: torch.Tensor, config: PolicyLossConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """DISPO's per-side log clip bounds (Eq. 9), shaped like `side`: the positive pair where side > 0, else the
    negative pair."""

    def pick(positive: float, negative: float) -> torch.Tensor:
        # tensor operands in `dtype`: bare Python floats would give float32 bounds for float64 inputs
        as_tensor = torch.tensor([positive, negative], dtype=dtype, device=side.device)
        return torch.where(side > 0, as_tensor[0], as_tensor[1])

    low = pick(log_bound_low(config.eps_low_pos), log_bound_low(config.eps_low_neg))
    high = pick(log_bound_high(config.eps_high_pos), log_bound_high(config.eps_high_neg))
    return low, high


def _detached_clipped_weight(
    log_ratio: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sg[clip(r, exp(low), exp(high))] and where the clip is active; padding (log r = 0) is never clipped."""
    log_r = log_ratio.detach()
    return torch.clamp(log_r, low, high).exp(), (log_r < low) | (log_r > high)


def _weighted_logprob_terms(
    inputs: LossInputs, weight: torch.Tensor, clipped: torch.Tensor, coefficient: torch.Tensor | float
) -> LossTerms:
    """The REINFORCE family (Eq. 6): l_t = -sg[w_t] * c_t * logprobs_t, so the gradient is -w_t * c_t."""
    token_loss = -(weight * coefficient) * inputs.logprobs
    return LossTerms(token_loss, weight, clipped, inputs.log_ratio.detach())


@register_policy_loss("dispo", aggregation="token_mean")
def dispo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """DISPO, Eqs. 8-9: REINFORCE with an IS weight clipped by a bound pair chosen per side.

        l_t = -sg[w_t] * A_t * logprobs_t,
        w_t = clip(r_t, 1 - eps_low_pos, 1 + eps_high_pos)  if A_t > 0 (or correct)
              clip(r_t, 1 - eps_low_neg, 1 + eps_high_neg)  if A_t < 0 (or incorrect)

    The four eps values bound the four regimes (telemetry.py) separately, which is the point of the paper.
    """
    low, high = _side_log_bounds(inputs.side, config, inputs.log_ratio.dtype)
    weight, clipped = _detached_clipped_weight(inputs.log_ratio, low, high)
    return _weighted_logprob_terms(inputs, weight, clipped, inputs.advantages)


@register_policy_loss("cispo", aggregation="token_mean")
def cispo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """CISPO, Eq. 7 (MiniMax-M1, arXiv 2506.13585): l_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * logprobs_t.

    DISPO with the same pair on both sides. Paper setting eps = (1, 100) (preset 'cispo').
    """
    low, high = log_bound_low(config.eps_low), log_bound_high(config.eps_high)
    weight, clipped = _detached_clipped_weight(inputs.log_ratio, low, high)
    return _weighted_logprob_terms(inputs, weight, clipped, inputs.advantages)


@register_policy_loss("reinforce", aggregation="seq_mean_token_mean")
def reinforce_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """REINFORCE with off-policy correction, Eq. 6: l_t = -sg[r_t] * A_t * logprobs_t (no clipping), per-sequence
    token mean, then mean over sequences."""
    weight, clipped = _detached_clipped_weight(inputs.log_ratio, -math.inf, math.inf)
    return _weighted_logprob_terms(inputs, weight, clipped, inputs.advantages)


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
    weight, clipped = _detached_clipped_weight(inputs.log_ratio, low, high)
    keep = inputs.side > 0  # dropped responses: weight and clip counts 0 (their tokens still sit in a regime)
    coefficient = inputs.advantages if config.online_sft_coefficient == "advantage" else 1.0
    return _weighted_logprob_terms(inputs, weight * keep, clipped & keep, coefficient)


def _ppo_clip_terms(
    log_ratio: torch.Tensor, advantages: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
) -> LossTerms:
    """PPO's clipped surrogate l = -min(r A, clip(r, lo, hi) A), r differentiated.

    The min picks the clipped branch (gradient 0) exactly when A > 0 and r > hi, or A < 0 and r < lo; elsewhere the
    gradient is -A r. The effective IS weight reported is r there and 0 where clipped."""
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.exp(torch.clamp(log_ratio, low, high))
    token_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        log_r = log_ratio.detach()
        clipped = ((advantages > 0) & (log_r > high)) | ((advantages < 0) & (log_r < low))
        is_weight = ratio.detach().masked_fill(clipped, 0.0)
    return LossTerms(token_loss, is_weight, clipped, log_r)


def _token_form(group_log_ratio: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """log s_{i,t} = sg[log s_i] + logprobs_t - sg[logprobs_t]: equal to the group's log-ratio in value, with
    gradient 1 w.r.t. the token's own log-prob (GSPO's token form, arXiv 2507.18071 Eq. 7). 0 on padding."""
    return (group_log_ratio.detach() + inputs.logprobs - inputs.logprobs.detach()) * inputs.mask


@register_policy_loss("dapo", aggregation="token_mean")
def dapo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """DAPO, Eqs. 4-5 (arXiv 2503.14476): l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), token-mean.
    Decoupled bounds, default eps = (0.2, 0.28)."""
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
    (geometric-mean) sequence ratio and s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)];

        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t}).

    Averaged over tokens then sequences it equals sequence-level GSPO (value and gradient) when A is constant per
    sequence, and it also accepts per-token A. GSPO's own ranges are (3e-4, 4e-4) (preset 'gspo')."""
    row_tokens = inputs.mask.sum(1, keepdim=True).clamp(min=1)
    sequence_log_ratio = inputs.log_ratio.detach().sum(1, keepdim=True) / row_tokens
    low, high = log_bound_low(config.eps_low), log_bound_high(config.eps_high)
    return _ppo_clip_terms(_token_form(sequence_log_ratio, inputs), inputs.advantages, low, high)


@register_policy_loss("sspo", aggregation="seq_mean_token_mean")
def sspo_loss(inputs: LossInputs, config: PolicyLossConfig) -> LossTerms:
    """SSPO (arXiv 2511.04256): GSPO's geometric-mean ratio taken per subsentence instead of per response, so one
    outlier token is not diluted by a whole response, with clip bounds scaled by the subsentence's mean entropy
    (wider where the policy is uncertain). Rules: `sspo.py`. l_t = -min(s_k A_t, clip(s_k, 1 - eps_low^k,
    1 + eps_high^k) A_t), k the subsentence of t, in token form as for gspo."""
    segment_log_ratio, low, high = _sspo.subsentence_ratio_and_bounds(inputs, config)
    return _ppo_clip_terms(_token_form(segment_log_ratio, inputs), inputs.advantages, low, high)


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
    token_lag: torch.Tensor | None = None,
    num_lags: int = 0,
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
        token_lag: [batch, seq] integer version lag per token (sampled ``d`` policy versions before pi_old; partial
            and asynchronous rollouts), in 0..num_lags-1 on response tokens; with ``num_lags`` > 0 the regime
            telemetry is also reported per lag (``lag{d}/`` keys). It never changes the loss.

    Returns:
        (loss, metrics): loss is a 0-dim tensor, differentiable w.r.t. logprobs (IS weights are detached where the
        paper says sg); metrics has the keys of `telemetry.metric_keys(num_lags)`.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}; use get_preset(name).")
    registered = get_policy_loss(config.loss_type)
    aggregation = registered.default_aggregation if config.aggregation == "default" else config.aggregation
    inputs, correct_b = _prepare_inputs(
        logprobs, old_logprobs, advantages, response_mask, config, correct, entropy, segment_ids
    )
    row_tokens = inputs.mask.sum(1)
    local_tokens, local_sequences = torch.stack(
        [row_tokens.sum(dtype=torch.float64), (row_tokens > 0).sum(dtype=torch.float64)]
    ).tolist()
    num_tokens = as_global_count("num_global_tokens", num_global_tokens, local_tokens, "response tokens")
    num_sequences = as_global_count("num_global_sequences", num_global_sequences, local_sequences, "sequences")
    if aggregation == "seq_mean_token_mean" and num_tokens is not None and num_sequences is None:
        raise ValueError(
            f"loss_type={config.loss_type!r} averages per sequence; with num_global_tokens also pass "
            "num_global_sequences (sequences with >= 1 response token in the whole mini-batch), or the micro-batch "
            "results will not add up to the mini-batch loss."
        )
    terms = registered.fn(inputs, config)
    loss = aggregate(
        terms.token_loss,
        inputs.mask,
        aggregation,
        num_tokens=num_tokens if num_tokens is not None else local_tokens,
        num_sequences=num_sequences if num_sequences is not None else local_sequences,
    )
    telemetry_tokens = num_tokens if num_tokens is not None else max(local_tokens, 1.0)
    if num_lags and (token_lag is None or token_lag.shape != inputs.mask.shape):
        shape = None if token_lag is None else tuple(token_lag.shape)
        expected = tuple(inputs.mask.shape)
        raise ValueError(f"num_lags={num_lags} needs token_lag shaped like logprobs {expected}, got {shape}.")
    return loss, loss_metrics(loss, terms, inputs, correct_b, telemetry_tokens, token_lag, num_lags)


def _prepare_inputs(
    logprobs: object,
    old_logprobs: object,
    advantages: object,
    response_mask: object,
    config: PolicyLossConfig,
    correct: object,
    entropy: object,
    segment_ids: object,
) -> tuple[LossInputs, torch.Tensor | None]:
    """Validate shapes, dtypes and values; return the broadcast inputs (computed in float32 or wider, so a bf16
    forward does not round the IS weights) and `correct` as bool."""
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
    lp = logprobs.to(compute_dtype)
    old = old_logprobs.detach().to(compute_dtype)
    adv = broadcast_per_sequence("advantages", advantages.detach(), batch, seq).to(compute_dtype)
    require_finite(
        [
            ("logprobs", lp, "log-probs must be finite everywhere (fill padding with 0); check the forward."),
            ("old_logprobs", old, "log-probs must be finite everywhere (fill padding with 0)."),
            ("advantages", adv, "advantages must be finite; check the reward/advantage computation."),
        ]
    )
    mask = float_mask(response_mask, compute_dtype)
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
        log_ratio=(lp - old) * mask,
        advantages=adv,
        mask=mask,
        side=side,
        entropy=entropy_t,
        segment_ids=segment_t,
    )
    return inputs, correct_b


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
