"""The policy's input type: padded, target-aligned tensors of a few sequences (one micro-batch).

Lives in ``models/`` because it is what :class:`~megatron_dispo.models.policy.MegatronPolicy` consumes; the trainer's
batching (``trainer/batching.py``) decides which sequences go together and builds these with :func:`build_microbatch`.

Tensor alignment: sequences are ``prompt + response`` token ids, right-padded to ``T``. Per-token tensors are
``[n, T - 1]`` and *target aligned*: column ``j`` is about token ``input_ids[:, j + 1]`` predicted from the prefix
``input_ids[:, : j + 1]``. ``response_mask[:, j]`` is 1 when that target token is a response token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_dispo.models.routing_replay import align_routed_experts

__all__ = ["MicroBatch", "build_microbatch", "fp8_gemm_alignment", "width_multiple", "with_old_logprobs"]


@dataclass(frozen=True)
class MicroBatch:
    """Padded tensors of a few sequences, ready for a forward pass."""

    indices: tuple[int, ...]
    """Positions of these sequences in the rollout batch."""
    input_ids: torch.Tensor
    """[n, T] prompt + response ids, right-padded with ``pad_token_id``."""
    response_mask: torch.Tensor
    """[n, T-1] float, 1 where the target token is a response token."""
    old_logprobs: torch.Tensor | None
    """[n, T-1] log pi_old of the target tokens (0 outside the response), once computed."""
    advantages: torch.Tensor | None
    """[n] per-sequence advantage."""
    pad_token_id: int = 0
    """Id used for right padding; the policy pads further with it (sequence parallelism needs T % TP == 0)."""
    routed_experts: torch.Tensor | None = None
    """MoE only: int64 [n, T, moe_layers, top_k] experts the rollout engine routed input token j to (``NO_ROUTE``
    where it reported none), for routing replay and the router-agreement metric (``models/routing_replay.py``)."""
    correct: torch.Tensor | None = None
    """[n] bool: verified correct (the losses that treat correct and incorrect responses apart read it)."""
    rollout_logprobs: torch.Tensor | None = None
    """[n, T-1] the engine's log-probs of the sampled tokens (0 outside the response), for truncated importance
    sampling against pi_old (``algorithms/tis.py``)."""
    token_lag: torch.Tensor | None = None
    """int64 [n, T-1]: how many policy versions before pi_old each target token was sampled (0 outside the response),
    for the per-lag regime telemetry of asynchronous and partial rollouts."""

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def fp8_gemm_alignment(fp8_recipe: str) -> int:
    """Token-count alignment of Transformer Engine's FP8 GEMMs: 32 for MXFP8 (32-element scaling blocks), else 16.

    TE (``pytorch/utils.py: assert_dim_for_fp8_exec``) needs the product of an FP8 GEMM input's leading dims divisible
    by 8 and its last dim by 16; the weight-gradient GEMM takes the token dim as the inner one, so Megatron-Core aligns
    tokens to 16 (``fp8_utils.get_fp8_align_size``: 32 for MXFP8).
    """
    return 32 if fp8_recipe == "mxfp8" else 16


def width_multiple(tensor_parallel_size: int, sequence_parallel: bool, fp8: str | None, fp8_recipe: str) -> int:
    """Multiple the sequence width ``T`` of every micro-batch must be padded to for the policy's forward.

    Sequence parallelism splits ``T`` over TP ranks, so ``T % TP == 0``; FP8 execution needs each rank's token count
    (``n * T / TP`` with SP, ``n * T`` without) aligned to :func:`fp8_gemm_alignment`, which ``T`` being a multiple of
    alignment x TP (SP) or of the alignment guarantees for any row count ``n``.
    """
    tp = tensor_parallel_size if sequence_parallel else 1
    return tp * (fp8_gemm_alignment(fp8_recipe) if fp8 is not None else 1)


def build_microbatch(
    indices: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    old_logprobs: Sequence[Sequence[float]] | Mapping[int, Sequence[float]] | None = None,
    advantages: torch.Tensor | None = None,
    pad_to_multiple_of: int = 1,
    routed_experts: Sequence[torch.Tensor] | None = None,
    correct: torch.Tensor | None = None,
    rollout_logprobs: Sequence[Sequence[float]] | None = None,
    token_lags: Sequence[Sequence[int]] | None = None,
) -> MicroBatch:
    """Pad the chosen sequences into tensors; ``old_logprobs[i]`` (and ``rollout_logprobs[i]``) holds one value per
    response token of sequence i (a list indexed by sequence, or a mapping holding at least the chosen sequences), and
    so does ``token_lags[i]``;
    ``routed_experts[i]`` is sequence i's engine routing ``[tokens, moe_layers, top_k]``, row j for input token j;
    ``correct`` is indexed by sequence like ``advantages``."""
    lengths = [len(prompt_ids[i]) + len(response_ids[i]) for i in indices]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(indices)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width - 1), dtype=torch.float32)
    old = torch.zeros((n, width - 1), dtype=torch.float32) if old_logprobs is not None else None
    behaviour = torch.zeros((n, width - 1), dtype=torch.float32) if rollout_logprobs is not None else None
    lag = torch.zeros((n, width - 1), dtype=torch.int64) if token_lags is not None else None
    for row, index in enumerate(indices):
        prompt = torch.as_tensor(prompt_ids[index], dtype=torch.long)  # lists or tensor views of a packed batch
        response = torch.as_tensor(response_ids[index], dtype=torch.long)
        if prompt.numel() == 0:
            raise ValueError(f"sequence {index} has an empty prompt; every response needs at least one prompt token.")
        tokens = torch.cat([prompt, response])
        input_ids[row, : len(tokens)] = tokens
        start, stop = len(prompt) - 1, len(tokens) - 1  # target j predicts token j + 1
        mask[row, start:stop] = 1.0
        if old is not None:
            values = old_logprobs[index]
            if len(values) != len(response):
                raise ValueError(
                    f"old_logprobs of sequence {index} has {len(values)} values for {len(response)} response tokens."
                )
            old[row, start:stop] = torch.as_tensor(values, dtype=torch.float32)
        if behaviour is not None:
            assert rollout_logprobs is not None
            behaviour[row, start:stop] = torch.as_tensor(rollout_logprobs[index], dtype=torch.float32)
        if lag is not None:
            assert token_lags is not None
            lag[row, start:stop] = torch.as_tensor(token_lags[index], dtype=torch.int64)
    adv = advantages[list(indices)].to(torch.float32) if advantages is not None else None
    routed = None
    if routed_experts is not None:
        chosen = [routed_experts[i] for i in indices]
        layers, top_k = chosen[0].shape[1:]
        routed = align_routed_experts(chosen, width, num_layers=int(layers), top_k=int(top_k))
    chosen_correct = correct[list(indices)].to(torch.bool) if correct is not None else None
    return MicroBatch(tuple(indices), input_ids, mask, old, adv, pad_token_id, routed, chosen_correct, behaviour, lag)


def with_old_logprobs(batch: MicroBatch, values: Mapping[int, torch.Tensor]) -> MicroBatch:
    """``batch`` with pi_old filled in from per-sequence values of its response tokens (where ``response_mask`` is
    set: a sample excluded from the loss has no values and keeps zeros)."""
    old = torch.zeros_like(batch.response_mask)
    for row, index in enumerate(batch.indices):
        where = batch.response_mask[row] > 0
        if bool(where.any()):
            old[row, where] = torch.as_tensor(values[index], dtype=torch.float32)
    return dataclasses.replace(batch, old_logprobs=old)
