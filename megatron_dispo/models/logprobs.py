"""Token log-probs and entropy from vocab-parallel logits, in bounded memory.

The policy's logits are ``[b, s, V/TP]`` (Megatron's output layer splits the vocabulary over tensor-parallel ranks).
The naive computation upcasts all of them to fp32 and keeps several ``[tokens x vocab]`` fp32 tensors alive for
autograd (log-softmax output, softmax, their product): ~5 GB each at 8k tokens x 151936 vocabulary.
:class:`_ChunkedLogProbEntropy` instead walks the tokens in chunks: the forward upcasts one chunk at a time and keeps
only three fp32 numbers per token (max, log-sum-exp, entropy); the backward recomputes the chunk's softmax from them
and writes the gradient straight into one logits-sized buffer. Peak extra memory is that gradient buffer plus one
chunk of fp32 work, whatever the sequence length.

Across TP ranks the max, the sum of exponentials, the target logit and the entropy's sum are all-reduced over the TP
group, so every rank returns the same full-vocabulary values. The input logits are never modified in place
(Megatron's ``vocab_parallel_cross_entropy`` does modify them).

Maths, with z = logits / T over the (true) vocabulary, m = max z, S = sum exp(z - m), p = softmax(z):
    log p_t = z_t - m - log S
    H = -sum_j p_j log p_j = m + log S - sum_j p_j z_j
    d log p_t / d logits_j = (1[j = t] - p_j) / T
    d H / d logits_j = -p_j (log p_j + H) / T
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_BYTES", "naive_logprobs_entropy", "vocab_parallel_logprobs_entropy"]

DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
"""Default fp32 working set of one chunk (tokens per chunk = this / (4 * V/TP)); 32 MiB ~ 55 tokens at V=151936."""


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _vocab_mask(vocab_start: int, local_vocab: int, vocab_size: int | None, device: torch.device) -> Tensor | None:
    """True for local columns that are padding (global index >= vocab_size), None when there are none."""
    if vocab_size is None or vocab_start + local_vocab <= vocab_size:
        return None
    return torch.arange(vocab_start, vocab_start + local_vocab, device=device) >= vocab_size


class _ChunkedLogProbEntropy(torch.autograd.Function):
    """Forward: per-token (log p_target, entropy) over token chunks; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        temperature: float,
        chunk_tokens: int,
        vocab_start: int,
        vocab_size: int | None,
        tp_group: dist.ProcessGroup | None,
        compute_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        local_vocab = logits.shape[-1]
        flat_target = target.reshape(-1)
        num_tokens = flat_target.shape[0]
        pad_mask = _vocab_mask(vocab_start, local_vocab, vocab_size, logits.device)
        # One pass per chunk with this rank's own max m_r; rescaled to the global max m after the MAX all-reduce:
        #   S = sum_r S_r e^{m_r - m},  sum e^{z-m} (z-m) = sum_r e^{m_r - m} (W_r + (m_r - m) S_r).
        compute_dtype = _compute_dtype(logits)
        local_max = torch.empty(num_tokens, dtype=compute_dtype, device=logits.device)
        local_sum = torch.empty_like(local_max)
        local_weighted = torch.zeros_like(local_max)
        target_z = torch.empty_like(local_max)
        for start, stop, rows in _chunks(logits, chunk_tokens):
            z = _chunk_z(rows, temperature, pad_mask)
            local_target = flat_target[start:stop] - vocab_start
            in_shard = (local_target >= 0) & (local_target < local_vocab)
            picked = z.gather(-1, local_target.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
            target_z[start:stop] = torch.where(in_shard, picked, torch.zeros_like(picked))
            chunk_max = z.amax(dim=-1)
            chunk_max = torch.where(torch.isinf(chunk_max), torch.zeros_like(chunk_max), chunk_max)  # all padding
            local_max[start:stop] = chunk_max
            shifted = z.sub_(chunk_max.unsqueeze(-1))  # z - m_r, in place on the fp32 copy
            exp_shifted = shifted.exp()
            local_sum[start:stop] = exp_shifted.sum(dim=-1)
            if compute_entropy:
                product = exp_shifted.mul_(shifted)
                if pad_mask is not None:
                    product.masked_fill_(pad_mask, 0.0)  # e^{-inf} * -inf = nan on padding columns
                local_weighted[start:stop] = product.sum(dim=-1)
        max_z = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
        _all_reduce(target_z, dist.ReduceOp.SUM, tp_group)
        offset = local_max - max_z  # <= 0
        scale = offset.exp()
        sum_exp = _all_reduce(local_sum * scale, dist.ReduceOp.SUM, tp_group)
        log_sum = sum_exp.log()
        logprobs = target_z - max_z - log_sum
        if compute_entropy:
            weighted = _all_reduce(scale * (local_weighted + offset * local_sum), dist.ReduceOp.SUM, tp_group)
            entropy = log_sum - weighted / sum_exp  # H = log S - sum_j p_j (z_j - m)
        else:
            entropy = torch.zeros_like(logprobs)
        ctx.save_for_backward(logits, target, max_z, log_sum, entropy)
        ctx.settings = (temperature, chunk_tokens, vocab_start, vocab_size, compute_entropy)
        shape = target.shape
        return logprobs.reshape(shape), entropy.reshape(shape)

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, target, max_z, log_sum, entropy = ctx.saved_tensors
        temperature, chunk_tokens, vocab_start, vocab_size, compute_entropy = ctx.settings
        local_vocab = logits.shape[-1]
        flat_target = target.reshape(-1)
        pad_mask = _vocab_mask(vocab_start, local_vocab, vocab_size, logits.device)
        grad_lp = None if grad_logprobs is None else grad_logprobs.reshape(-1).to(max_z.dtype)
        grad_h = None if (grad_entropy is None or not compute_entropy) else grad_entropy.reshape(-1).to(max_z.dtype)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        grad_flat = grad_logits.view(-1, local_vocab)
        for start, stop, rows in _chunks(logits, chunk_tokens):
            z = _chunk_z(rows, temperature, pad_mask)
            log_p = z.sub_((max_z[start:stop] + log_sum[start:stop]).unsqueeze(-1))  # log p_j (-inf on padding)
            probs = log_p.exp()
            # Two chunk buffers only: the gradient is built in place in log_p's (or probs') storage.
            if grad_h is not None:
                # dH/dz_j = -p_j (log p_j + H); padding has p_j = 0 and log p_j = -inf, so it is zeroed.
                grad = log_p.add_(entropy[start:stop].unsqueeze(-1)).mul_(probs)
                if pad_mask is not None:
                    grad.masked_fill_(pad_mask, 0.0)
                grad.mul_(-grad_h[start:stop].unsqueeze(-1))
                if grad_lp is not None:
                    grad.sub_(probs.mul_(grad_lp[start:stop].unsqueeze(-1)))  # - p_j * g
            elif grad_lp is not None:
                grad = probs.mul_(-grad_lp[start:stop].unsqueeze(-1))  # - p_j * g
            else:
                grad = probs.zero_()
            if grad_lp is not None:
                g = grad_lp[start:stop]
                local_target = flat_target[start:stop] - vocab_start
                in_shard = (local_target >= 0) & (local_target < local_vocab)
                hits = torch.nonzero(in_shard).squeeze(-1)
                grad[hits, local_target[hits]] += g[hits]  # + 1[j = t] * g
            if temperature != 1.0:
                grad.div_(temperature)
            grad_flat[start:stop] = grad  # cast to the logits dtype
        return grad_logits, None, None, None, None, None, None, None


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (gradient checks)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_blocks(logits: Tensor, offset: int = 0) -> list[tuple[int, Tensor]]:
    """``logits [..., V]`` as 2-D ``[n, V]`` views with their first flat token index, without copying.

    Contiguous logits are one block. A slice such as ``logits[:, :-1]`` (the usual next-token shift) cannot be
    flattened as a view, so it is split along its leading dims into per-row blocks; only a tensor whose vocabulary
    dim is itself strided is copied."""
    local_vocab = logits.shape[-1]
    try:
        return [(offset, logits.view(-1, local_vocab))]
    except RuntimeError:
        pass
    if logits.dim() <= 2:
        return [(offset, logits.contiguous().view(-1, local_vocab))]
    per_row = logits[0].numel() // local_vocab if logits.shape[0] else 0
    blocks: list[tuple[int, Tensor]] = []
    for index in range(logits.shape[0]):
        blocks += _row_blocks(logits[index], offset + index * per_row)
    return blocks


def _chunks(logits: Tensor, chunk_tokens: int) -> list[tuple[int, int, Tensor]]:
    """(flat start, flat stop, ``[stop - start, V]`` view) for every chunk of at most ``chunk_tokens`` tokens."""
    out = []
    for offset, block in _row_blocks(logits):
        for start in range(0, block.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, block.shape[0])
            out.append((offset + start, offset + stop, block[start:stop]))
    return out


def _chunk_z(rows: Tensor, temperature: float, pad_mask: Tensor | None) -> Tensor:
    """fp32 (fp64 for fp64 input) copy of the ``[n, V]`` rows divided by T, with padding columns at -inf."""
    z = rows.to(_compute_dtype(rows), copy=True)  # always a copy: the input is never written
    if temperature != 1.0:
        z.div_(temperature)
    if pad_mask is not None:
        z.masked_fill_(pad_mask, float("-inf"))
    return z


def vocab_parallel_logprobs_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of ``target`` and the entropy of the full-vocabulary distribution softmax(logits / T), per token.

    Args:
        logits: ``[..., V/TP]`` this rank's vocabulary shard (any float dtype; never modified).
        target: ``[...]`` global token ids (int64), same leading shape.
        tp_group: tensor-parallel group the vocabulary is split over (``None``: unsplit, i.e. TP=1). Pass Megatron's
            ``parallel_state.get_tensor_model_parallel_group()`` at TP > 1; rank r holds columns [r V/TP, (r+1) V/TP).
        temperature: sampling temperature T > 0; the distribution is softmax(logits / T) as in the rollout engine.
        vocab_size: the true vocabulary; columns at or beyond it (Megatron's padding) are excluded.
        chunk_tokens: tokens per chunk; default keeps one fp32 chunk near :data:`DEFAULT_CHUNK_BYTES`.
        compute_entropy: False skips the entropy (returned as None).

    Returns:
        ``(logprobs, entropy)``, fp32 (fp64 for fp64 logits) with the shape of ``target``; both differentiable
        w.r.t. ``logits``.
    """
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a float tensor, got dtype={logits.dtype}.")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer token ids, got dtype={target.dtype}.")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits shape without the vocabulary dim "
            f"{tuple(logits.shape[:-1])}."
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (the rollout's sampling temperature, e.g. 1.0).")
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    local_vocab = logits.shape[-1]
    if vocab_size is not None and not 0 < vocab_size <= local_vocab * tp_size:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {local_vocab * tp_size}] (V/TP * TP).")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= (vocab_size or local_vocab * tp_size)):
        raise ValueError(
            f"target ids must be in [0, {vocab_size or local_vocab * tp_size}); got min {int(target.min())}, "
            f"max {int(target.max())}. Mask padding positions with a valid id (e.g. 0) and ignore them in the loss."
        )
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_CHUNK_BYTES // (4 * local_vocab))
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive.")
    logprobs, entropy = _ChunkedLogProbEntropy.apply(
        logits,
        target.long(),
        float(temperature),
        int(chunk_tokens),
        tp_rank * local_vocab,
        vocab_size,
        tp_group,
        compute_entropy,
    )
    return logprobs, (entropy if compute_entropy else None)


def naive_logprobs_entropy(
    logits: Tensor, target: Tensor, *, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Reference on full (unsplit) logits with plain autograd: fp32 log-softmax over the whole ``[tokens x V]``.

    Used by the tests and the benchmark as the baseline; memory grows with tokens x vocabulary.
    """
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    if vocab_size is not None:
        z = z[..., :vocab_size]
    log_p = torch.log_softmax(z, dim=-1)
    del z  # log_softmax's backward needs only its output
    logprobs = log_p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return logprobs, entropy
