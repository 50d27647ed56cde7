"""Worker for the refit end-to-end tests: a sharded Megatron policy that trains one step and exports its weights.

Runs on every rank of a gloo world started by ``tests.models.distributed.run_workers``: loads the tiny HF checkpoint
into a TP x EP Megatron-Core model, takes one AdamW step (lr 1e-3, so every weight moves visibly), then computes the
probe sequences' per-token log-probs with the vocab-parallel log-prob kernel and streams the export generator
(``export_hf_weights(..., destination="rank0")``, the generator the trainer refits from). Rank 0 returns both.
"""

from __future__ import annotations

from typing import Any

import torch

LR = 1e-3


def train_step_and_export(
    checkpoint_dir: str, tensor_parallel: int, expert_parallel: int, probe: list[list[int]]
) -> dict[str, Any]:  # pragma: no cover - runs in the workers
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.convert import export_hf_weights, load_hf_weights
    from megatron_dispo.models.logprobs import vocab_parallel_logprobs_entropy
    from megatron_dispo.models.optimizer import (
        OptimizerSettings,
        build_optimizer,
        finalize_and_step,
        wrap_ddp,
        zero_grads,
    )
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel

    hf_config = AutoConfig.from_pretrained(checkpoint_dir)
    moe = int(getattr(hf_config, "num_experts", 0) or 0) > 0
    parallel = ParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        sequence_parallel=moe and tensor_parallel > 1,
    )
    initialize_parallel(parallel, seed=7)
    overrides = {"moe_aux_loss_coeff": 0.0} if moe else {}
    model = build_model(hf_config, parallel, **overrides)
    load_hf_weights(model, checkpoint_dir, hf_config)
    settings = OptimizerSettings(lr=LR, adam_eps=1e-6, weight_decay=0.0)
    ddp = wrap_ddp(model, parallel, settings)
    optimizer = build_optimizer([ddp], parallel, settings)
    tp_group = parallel_state.get_tensor_model_parallel_group() if tensor_parallel > 1 else None
    tokens = torch.tensor(probe, dtype=torch.long)

    def logprobs() -> torch.Tensor:
        logits = model_forward_logits(ddp, tokens)
        values, _ = vocab_parallel_logprobs_entropy(
            logits[:, :-1], tokens[:, 1:], tp_group=tp_group, vocab_size=hf_config.vocab_size, compute_entropy=False
        )
        return values

    with torch.no_grad():
        before = logprobs()
    zero_grads([ddp], optimizer)
    loss = -logprobs().mean()  # any loss: raise the probe's likelihood
    loss.backward()
    step = finalize_and_step([ddp], optimizer)
    with torch.no_grad():
        after = logprobs()
    exported: list[tuple[str, torch.Tensor]] = []
    for name, tensor in export_hf_weights(model, hf_config, destination="rank0"):
        exported.append((name, tensor.detach().clone()))  # own storage: the tensors leave the process
    result: dict[str, Any] = {"rank": dist.get_rank(), "grad_norm": step.grad_norm}
    if dist.get_rank() == 0:
        result |= {"before": before, "after": after, "weights": exported}
    return result
