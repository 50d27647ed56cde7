"""Per-token loss -> scalar, invariant to how the mini-batch is split.

Both modes are written as sum_t scale_t * loss_t with a per-token scale that does not depend on the other
micro-batches, given the global normaliser; so the sum of per-micro-batch losses (and gradients) over any split into
micro-batches and data-parallel ranks equals the single-batch result exactly:

    token_mean            scale_{i,t} = m_{i,t} / N,                N = response tokens in the mini-batch
                          (num_global_tokens; without it, the mask sum of this call)        DAPO Eq. 4, DISPO Eq. 8
    seq_mean_token_mean   scale_{i,t} = m_{i,t} / (|o_i| * G),     |o_i| = response tokens of sequence i,
                          G = sequences with >= 1 response token in the mini-batch
                          (num_global_sequences; without it, those of this call)            GRPO Eq. 1
"""

from __future__ import annotations

import torch

from megatron_dispo.algorithms.loss_contract import Aggregation


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    *,
    num_tokens: float,
    num_sequences: float,
) -> torch.Tensor:
    """sum_t scale_t * token_loss_t (see the module docstring), a 0-dim tensor.

    Args:
        token_loss, mask: [batch, seq]; padding (mask 0) is excluded even where token_loss is not 0.
        aggregation: 'token_mean' or 'seq_mean_token_mean'.
        num_tokens: N, the global token count (or this call's own when no global one was given).
        num_sequences: G, the global count of sequences with >= 1 response token (or this call's own).
    """
    masked = token_loss * mask
    if aggregation == "token_mean":
        if num_tokens == 0:
            raise ValueError(
                "response_mask is all zero: there is no response token to average over; drop the empty batch, "
                "or pass num_global_tokens when this is one micro-batch of a larger mini-batch."
            )
        return masked.sum() / num_tokens
    if aggregation == "seq_mean_token_mean":
        if num_sequences == 0:
            raise ValueError(
                "response_mask is all zero: there is no response to average over; drop the empty batch, or "
                "pass num_global_sequences when this is one micro-batch of a larger mini-batch."
            )
        row_tokens = mask.sum(1).clamp(min=1)  # an empty row adds 0 either way
        return (masked.sum(1) / row_tokens).sum() / num_sequences
    raise ValueError(f"aggregation={aggregation!r} is unknown; use 'token_mean' or 'seq_mean_token_mean'.")
