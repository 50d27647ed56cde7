"""pi_old log-probs with each distinct prompt run once: the prompt's keys and values are shared by its G responses.

Why: the responses of a group share their prompt, and in a causal model the prompt's hidden states do not depend on
what follows. The no-grad pi_old forward can therefore run each distinct prompt once (a prefill into Megatron's
static KV cache), copy its cached keys/values to the rows of its responses, and run only the response tokens. With
G = 8 and prompts longer than the answers (the demo: ~110 prompt tokens, ~15 response tokens) that is ~4x fewer
tokens. Training forwards still run whole sequences (the backward needs the prompt's activations per response).

Ragged prompts are left-padded to a common length P and the pads are masked as keys. RoPE scores depend only on
the distance between query and key, so the shifted positions leave every real score unchanged: results equal the
full forward up to float summation order (tests/models/test_prefix_sharing.py compares them).

Applies to Megatron's local attention (the explicit boolean mask this needs reaches its softmax; Transformer
Engine's fused attention ignores a custom mask in decode) without sequence or context parallelism; `supported`
says whether a model qualifies, and the caller falls back to the full forward otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["shared_prefix_logits", "supported"]


def supported(model: torch.nn.Module) -> bool:
    """Whether `model` (a GPTModel, possibly DDP-wrapped) can run the shared-prefix forward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    inner = getattr(model, "module", model)
    config = inner.config
    if getattr(config, "sequence_parallel", False) or getattr(config, "context_parallel_size", 1) > 1:
        return False
    if getattr(config, "pipeline_model_parallel_size", 1) > 1:  # the forward here runs the whole model
        return False
    if getattr(config, "flash_decode", False):
        return False
    layers = getattr(inner.decoder, "layers", [])
    return bool(layers) and all(type(layer.self_attention.core_attention) is DotProductAttention for layer in layers)


def _distinct_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct prompts in first-seen order, and for each sequence the index of its prompt."""
    index: dict[tuple[int, ...], int] = {}
    owner = []
    for prompt in prompts:
        key = tuple(prompt)
        owner.append(index.setdefault(key, len(index)))
    return list(index), owner


@torch.no_grad()
def shared_prefix_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
) -> torch.Tensor:
    """Logits [n, L, V] (full vocabulary, gathered over TP) where row i, column j predicts responses[i][j]
    (L = longest response).

    One prefill over the distinct prompts, then one forward over all response tokens with the prompts' cached keys
    and values; the model must be in eval mode (Megatron uses the KV cache only outside training)."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext

    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses; pass one prompt per response.")
    if any(not prompt for prompt in prompts) or any(not response for response in responses):
        raise ValueError("every prompt and every response needs at least one token.")
    inner = getattr(model, "module", model)
    if inner.training:
        raise RuntimeError("shared_prefix_logits needs the model in eval mode (call model.eval()).")
    distinct, owner = _distinct_prompts(prompts)
    device = next(inner.parameters()).device
    prompt_len = max(len(prompt) for prompt in distinct)
    response_len = max(len(response) for response in responses)
    num_distinct, num_rows = len(distinct), len(responses)

    prompt_ids = torch.full((num_distinct, prompt_len), pad_token_id, dtype=torch.long)
    prompt_pads = torch.tensor([prompt_len - len(prompt) for prompt in distinct])
    for row, prompt in enumerate(distinct):
        prompt_ids[row, prompt_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    response_ids = torch.full((num_rows, response_len), pad_token_id, dtype=torch.long)
    for row, response in enumerate(responses):
        response_ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)

    # Boolean masks, True = not attended: keys that are left pads, and keys after the query (causal).
    key_is_pad = torch.arange(prompt_len).unsqueeze(0) < prompt_pads.unsqueeze(1)  # [U, P]
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool).triu(1)
    prefill_mask = (causal.unsqueeze(0) | key_is_pad.unsqueeze(1)).unsqueeze(1)  # [U, 1, P, P]
    owner_t = torch.tensor(owner)
    response_causal = torch.ones(response_len, response_len, dtype=torch.bool).triu(1)
    decode_mask = torch.cat(
        [
            key_is_pad[owner_t].unsqueeze(1).expand(num_rows, response_len, prompt_len),
            response_causal.unsqueeze(0).expand(num_rows, response_len, response_len),
        ],
        dim=2,
    ).unsqueeze(1)  # [n, 1, L, P + L]

    context = StaticInferenceContext(max(num_distinct, num_rows), prompt_len + response_len)
    context.materialize_only_last_token_logits = False
    positions = torch.arange(prompt_len + response_len, device=device)
    prompt_logits = model(
        input_ids=prompt_ids.to(device),
        position_ids=positions[:prompt_len].unsqueeze(0).expand(num_distinct, -1),
        attention_mask=prefill_mask.to(device),
        inference_context=context,
        runtime_gather_output=True,  # Megatron's inference path always gathers the TP vocab shards
    )
    # every response row gets its prompt's cached keys and values
    for key_memory, value_memory in context.key_value_memory_dict.values():
        for memory in (key_memory, value_memory):
            memory[:prompt_len, :num_rows] = memory[:prompt_len, owner_t.to(device)].clone()
    context.sequence_len_offset = prompt_len
    response_logits = model(
        input_ids=response_ids.to(device),
        position_ids=positions[prompt_len:].unsqueeze(0).expand(num_rows, -1),
        attention_mask=decode_mask.to(device),
        inference_context=context,
        runtime_gather_output=True,  # Megatron's inference path always gathers the TP vocab shards
    )
    first = prompt_logits[owner_t.to(device), -1:]  # the last prompt position predicts each first response token
    return torch.cat([first, response_logits[:, :-1]], dim=1)
