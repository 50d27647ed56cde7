"""SSPO (arXiv 2511.04256) pieces: subsentence segmentation, subsentence ratios and entropy-adaptive bounds.

Segmentation rule (our choice; the loss only sees ids). A subsentence ends at a delimiter token: a token whose text
contains one of , . ; : ! ? or a newline. The delimiter belongs to the subsentence it closes, and the next token starts
a new one. Why: these are the natural step/clause boundaries of math reasoning ("so x = 3, hence ..."); a clause is
short enough that one outlier token cannot be diluted by a whole response (GSPO's failure mode, near-zero clip
fraction) and long enough to average out single-token noise (GRPO's). The tokenizer knows which ids are delimiters,
so the caller passes them to `segment_ids_from_delimiters` and gives the result to `compute_policy_loss(...,
segment_ids=...)`. Without segment ids the loss falls back to fixed windows of `sspo_segment_len` tokens
(deterministic, tokenizer-free; a clause is ~10-40 tokens).

Entropy-adaptive bounds (our parametrisation of "wider bounds for high-entropy, narrower for low-entropy"):
scale_k = clamp(H_k / sspo_entropy_ref, sspo_scale_min, sspo_scale_max) with H_k the mean per-token entropy of
subsentence k; the bounds are [1 - min(1, eps_low * scale_k), 1 + eps_high * scale_k]. Without `entropy`, scale = 1.
Everything depends on one subsentence only, so the loss stays split-invariant.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from megatron_dispo.algorithms.loss_contract import LossInputs

SUBSENTENCE_DELIMITERS: tuple[str, ...] = (",", ".", ";", ":", "!", "?", "\n")
"""Characters whose presence in a token's text ends a subsentence (see the module docstring)."""


def segment_ids_from_delimiters(token_ids: torch.Tensor, delimiter_ids: Collection[int]) -> torch.Tensor:
    """Subsentence id per token: 0 for the first subsentence, +1 after every delimiter token.

    Args:
        token_ids: [batch, seq] integer token ids (response tokens; prompt/padding ids do not matter because the
            loss ignores masked tokens).
        delimiter_ids: ids whose text contains a delimiter (see SUBSENTENCE_DELIMITERS).
    Returns:
        [batch, seq] int64 ids, non-decreasing along each row, < seq.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise ValueError("token_ids must be a [batch, seq] integer tensor.")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids has dtype {token_ids.dtype}; expected an integer dtype.")
    delimiters = torch.as_tensor(sorted(set(delimiter_ids)), dtype=token_ids.dtype, device=token_ids.device)
    is_delimiter = torch.isin(token_ids, delimiters).to(torch.int64)
    # a delimiter closes its own subsentence: the count of delimiters strictly before t
    return torch.cumsum(is_delimiter, dim=1) - is_delimiter


def _segment_index(inputs: LossInputs, segment_len: int) -> tuple[torch.Tensor, int]:
    """Flat segment index per token (row * segments_per_row + segment) and the number of flat slots."""
    batch, seq = inputs.log_ratio.shape
    device = inputs.log_ratio.device
    if inputs.segment_ids is None:
        per_row = math.ceil(seq / segment_len)
        segment = (torch.arange(seq, device=device) // segment_len).expand(batch, seq)
    else:
        segment = inputs.segment_ids.to(torch.int64)
        low, high = (int(v) for v in torch.aminmax(segment))
        if low < 0 or high >= seq:
            raise ValueError(
                f"segment_ids must lie in [0, {seq}) (one subsentence index per token, counted within the row); got "
                f"values in [{low}, {high}]. Build them with segment_ids_from_delimiters()."
            )
        per_row = seq
    rows = torch.arange(batch, device=device).unsqueeze(1) * per_row
    return (rows + segment).reshape(-1), batch * per_row


def subsentence_ratio_and_bounds(inputs: LossInputs, config: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: the log of its subsentence's geometric-mean ratio (detached, 0 on padding) and the log clip bounds.

    log s_k = sum_{t in k} m_t log r_t / sum_{t in k} m_t   (masked tokens excluded).
    """
    index, slots = _segment_index(inputs, config.sspo_segment_len)
    mask = inputs.mask.reshape(-1)
    dtype = inputs.log_ratio.dtype
    counts = torch.zeros(slots, dtype=dtype, device=mask.device).index_add_(0, index, mask)
    safe_counts = counts.clamp(min=1.0)
    log_ratio = inputs.log_ratio.detach().reshape(-1)
    sums = torch.zeros(slots, dtype=dtype, device=mask.device).index_add_(0, index, log_ratio)
    segment_log_ratio = (sums / safe_counts)[index].reshape(inputs.mask.shape) * inputs.mask
    if inputs.entropy is None:
        scale = torch.ones_like(inputs.mask)
    else:
        if bool((inputs.entropy < 0).any()):
            raise ValueError("entropy has negative values; pass the per-token entropy of pi_theta (>= 0, in nats).")
        entropy_sums = torch.zeros(slots, dtype=dtype, device=mask.device).index_add_(
            0, index, inputs.entropy.reshape(-1) * mask
        )
        mean_entropy = (entropy_sums / safe_counts)[index].reshape(inputs.mask.shape)
        scale = (mean_entropy / config.sspo_entropy_ref).clamp_(config.sspo_scale_min, config.sspo_scale_max)
    eps_low = (scale * config.eps_low).clamp_(max=1.0)
    low = torch.log1p(-eps_low)  # -inf where eps_low reaches 1
    high = torch.log1p(scale * config.eps_high)
    return segment_log_ratio, low, high
