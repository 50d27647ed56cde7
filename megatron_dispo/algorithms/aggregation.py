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

from megatron_dispo.algorithms.registry import Aggregation


def aggregation_row_scale(
    aggregation: Aggregation,
    row_tokens: torch.Tensor,
    *,
    num_tokens: float,
    num_sequences: float,
) -> torch.Tensor | float:
    """The factor that, times the mask, gives scale_{i,t}: a float (token_mean) or a [batch, 1] tensor.

    Args:
        aggregation: 'token_mean' or 'seq_mean_token_mean'.
        row_tokens: [batch] number of response tokens per sequence of this call.
        num_tokens: N, the global token count (or this call's own when no global one was given).
        num_sequences: G, the global count of sequences with >= 1 response token (or this call's own).
    """
    if aggregation == "token_mean":
        if num_tokens == 0:
            raise ValueError(
                "response_mask is all zero: there is no response token to average over; drop the empty batch, "
                "or pass num_global_tokens when this is one micro-batch of a larger mini-batch."
            )
        return 1.0 / num_tokens
    if aggregation == "seq_mean_token_mean":
        if num_sequences == 0:
            raise ValueError(
                "response_mask is all zero: there is no response to average over; drop the empty batch, or "
                "pass num_global_sequences when this is one micro-batch of a larger mini-batch."
            )
        return (1.0 / (row_tokens.clamp(min=1) * num_sequences)).unsqueeze(1)
    raise ValueError(f"aggregation={aggregation!r} is unknown; use 'token_mean' or 'seq_mean_token_mean'.")
