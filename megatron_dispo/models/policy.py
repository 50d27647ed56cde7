"""The trainable policy: a Megatron-Core GPT shard with DDP and optimizer, seen as token log-probs.

The trainer never touches Megatron directly. It hands this class padded micro-batches (``trainer.batching``) and a
loss config, and gets back log-probs, entropies, metrics and a stream of HF-named weights for the rollout engine.

Gradient normalisation across data-parallel ranks: every micro-batch loss is already divided by the mini-batch's
global token count (``num_global_tokens``), so the correct gradient is the plain SUM over micro-batches and DP ranks.
Megatron DDP averages over DP by default; building the model with ``calculate_per_token_loss=True`` makes it sum
(gradient scaling factor 1 for dense and expert grads), which is exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.losses import compute_policy_loss
from megatron_dispo.algorithms.telemetry import pack_metrics, unpack_metrics
from megatron_dispo.models.builder import build_model, model_forward_logits
from megatron_dispo.models.convert import export_hf_weights, load_hf_weights
from megatron_dispo.models.logprobs import vocab_parallel_logprobs_entropy
from megatron_dispo.models.optimizer import OptimizerSettings, build_optimizer, finalize_and_step, wrap_ddp, zero_grads
from megatron_dispo.models.parallel import ParallelConfig
from megatron_dispo.models.prefix_sharing import shared_prefix_logits
from megatron_dispo.models.prefix_sharing import supported as prefix_sharing_supported
from megatron_dispo.trainer.batching import MicroBatch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MegatronPolicy:
    """One rank's shard of the policy model (``initialize_parallel`` must have run on every rank)."""

    def __init__(
        self,
        hf_dir: str | Path,
        parallel: ParallelConfig,
        optimizer: OptimizerSettings,
        *,
        params_dtype: Literal["float32", "bfloat16"] = "float32",
        temperature: float = 1.0,
        fp8: str | None = None,
    ) -> None:
        from megatron.core import parallel_state
        from transformers import AutoConfig

        self.hf_dir = Path(hf_dir)
        self.hf_config = AutoConfig.from_pretrained(str(self.hf_dir))
        self.parallel = parallel
        self.temperature = temperature
        model = build_model(
            self.hf_config, parallel, params_dtype=DTYPES[params_dtype], fp8=fp8, calculate_per_token_loss=True
        )
        load_hf_weights(model, self.hf_dir, self.hf_config)
        self.model = wrap_ddp(model, parallel, optimizer)
        self.optimizer = build_optimizer([self.model], parallel, optimizer)
        self._tp_group = (
            parallel_state.get_tensor_model_parallel_group()
            if parallel_state.get_tensor_model_parallel_world_size() > 1
            else None
        )
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_moe = bool(getattr(self.hf_config, "num_experts", 0))

    # ------------------------------------------------------------------ forward
    def token_logprobs(
        self, batch: MicroBatch, *, with_entropy: bool, temperature: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target-aligned [n, T-1] log pi(token) (and entropy) under softmax(logits / T), T = rollout temperature."""
        logits = model_forward_logits(self.model, batch.input_ids)
        return vocab_parallel_logprobs_entropy(
            logits[:, :-1],
            batch.input_ids[:, 1:],
            tp_group=self._tp_group,
            temperature=self.temperature if temperature is None else temperature,
            vocab_size=self.hf_config.vocab_size,
            compute_entropy=with_entropy,
        )

    @torch.no_grad()
    def response_logprobs(
        self, batches: Sequence[MicroBatch], *, temperature: float | None = None
    ) -> dict[int, list[float]]:
        """pi_old of every response token: {sequence index: per-token log-probs}, one forward per micro-batch."""
        self.model.eval()
        out: dict[int, list[float]] = {}
        for batch in batches:
            logprobs, _ = self.token_logprobs(batch, with_entropy=False, temperature=temperature)
            out.update(response_values(batch, logprobs))
        return out

    @property
    def supports_prompt_sharing(self) -> bool:
        """Whether `shared_prompt_logprobs` can run on this model (local attention, no sequence/context parallel)."""
        return prefix_sharing_supported(self.model)

    @torch.no_grad()
    def shared_prompt_logprobs(
        self,
        chunks: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        temperature: float | None = None,
    ) -> dict[int, list[float]]:
        """pi_old of every response token like `response_logprobs`, but each distinct prompt of a chunk runs once
        and its keys/values serve all its responses (`prefix_sharing.py`). `chunks` lists sequence indices per
        forward (memory budget); empty responses get an empty list."""
        self.model.eval()
        out: dict[int, list[float]] = {}
        for chunk in chunks:
            rows = [i for i in chunk if response_ids[i]]
            out.update({i: [] for i in chunk if not response_ids[i]})
            if not rows:
                continue
            logits = shared_prefix_logits(
                self.model, [prompt_ids[i] for i in rows], [response_ids[i] for i in rows], pad_token_id=0
            )
            targets = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
            for row, index in enumerate(rows):
                targets[row, : len(response_ids[index])] = torch.as_tensor(response_ids[index])
            logprobs, _ = vocab_parallel_logprobs_entropy(
                logits,
                targets,
                tp_group=None,  # the inference path gathers the full vocabulary on every rank
                temperature=self.temperature if temperature is None else temperature,
                vocab_size=self.hf_config.vocab_size,
                compute_entropy=False,
            )
            out.update({index: logprobs[row, : len(response_ids[index])].tolist() for row, index in enumerate(rows)})
        return out

    # ------------------------------------------------------------------ update
    def train_minibatch(
        self,
        batches: Sequence[MicroBatch],
        loss_config: PolicyLossConfig,
        *,
        num_global_tokens: int,
        num_global_sequences: int,
        correct: Sequence[torch.Tensor | None] | None = None,
        token_advantages: Sequence[torch.Tensor | None] | None = None,
        captured_old_logprobs: dict[int, list[float]] | None = None,
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of a mini-batch; metrics are global (all DP ranks).

        ``token_advantages[i]`` optionally replaces micro-batch i's per-sequence advantages by a [n, T-1] tensor
        (used for truncated importance-sampling correction: A times a per-token weight).

        A micro-batch without ``old_logprobs`` is trained on-policy: before this step's first update the policy *is*
        pi_old, so its own detached log-probs serve as pi_old (r = 1 exactly) and the separate no-grad pi_old forward
        for that mini-batch is saved. They are stored per sequence in ``captured_old_logprobs`` when given.
        """
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.model.train()
        zero_grads([self.model], self.optimizer)
        if self.is_moe:
            # the router's load-balancing loss is a per-micro-batch mean: weight it so the step sees its average
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / max(len(batches) * self.dp_size, 1)))
        packed_total: torch.Tensor | None = None
        entropy_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            logprobs, entropy = self.token_logprobs(batch, with_entropy=True)
            old_logprobs = batch.old_logprobs
            if old_logprobs is None:
                old_logprobs = logprobs.detach() * batch.response_mask
                if captured_old_logprobs is not None:
                    captured_old_logprobs.update(response_values(batch, old_logprobs))
            advantages = (
                token_advantages[i] if token_advantages and token_advantages[i] is not None else batch.advantages
            )
            loss, metrics = compute_policy_loss(
                logprobs,
                old_logprobs,
                advantages,
                batch.response_mask,
                loss_config,
                correct=None if correct is None else correct[i],
                num_global_tokens=num_global_tokens,
                num_global_sequences=num_global_sequences,
                entropy=entropy,
            )
            loss.backward()
            packed = torch.tensor(pack_metrics(metrics), dtype=torch.float64)
            packed_total = packed if packed_total is None else packed_total + packed
            entropy_sum += (entropy.detach().to(torch.float64) * batch.response_mask).sum()
        result = finalize_and_step([self.model], self.optimizer)
        if packed_total is None:
            raise ValueError("train_minibatch got no micro-batches; every DP rank needs at least one.")
        totals = torch.cat([packed_total, entropy_sum.reshape(1)])
        if self.dp_size > 1:
            torch.distributed.all_reduce(totals, group=self.dp_group)
        metrics = unpack_metrics(totals[:-1])
        metrics["entropy"] = float(totals[-1]) / max(num_global_tokens, 1)
        metrics["grad_norm"] = result.grad_norm
        metrics["update_skipped"] = float(not result.updated)
        return metrics

    # ------------------------------------------------------------------ weights
    def export_weights(self, destination: Literal["all", "rank0"] = "rank0") -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (hf_name, full tensor) for refit / HF export; every rank must consume it to the end."""
        return export_hf_weights(self.model, self.hf_config, destination=destination)


def response_values(batch: MicroBatch, values: torch.Tensor) -> dict[int, list[float]]:
    """{sequence index: its response tokens' entries of a target-aligned [n, T-1] tensor}."""
    return {index: values[row][batch.response_mask[row] > 0].tolist() for row, index in enumerate(batch.indices)}
