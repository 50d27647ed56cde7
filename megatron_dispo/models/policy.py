"""The trainable policy: a Megatron-Core GPT shard with DDP and optimizer, seen as token log-probs.

The trainer never touches Megatron directly. It hands this class padded micro-batches (``models/microbatch.py``) and a
loss config, and gets back log-probs, metrics and a stream of HF-named weights for the rollout engine. Every forward
and backward goes through Megatron's pipeline schedules (PP = 1 included); the loss and the log-probs run on the last
stage and their results are broadcast over the pipeline group, so every rank returns the same values. The policy owns
device placement (inputs moved to the model's device, results returned on the CPU) and the sequence-parallel padding.

Gradient normalisation across data-parallel ranks: every micro-batch loss is already divided by the mini-batch's
global token count (``num_global_tokens``), so the correct gradient is the plain SUM over micro-batches and DP ranks.
Megatron DDP averages over DP by default; building the model with ``calculate_per_token_loss=True`` makes it sum
(gradient scaling factor 1 for dense and expert grads), which is exactly that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.losses import compute_policy_loss
from megatron_dispo.algorithms.telemetry import metric_keys, pack_metrics, unpack_metrics
from megatron_dispo.algorithms.tis import truncated_is_weights
from megatron_dispo.models.builder import build_model, model_forward_logits
from megatron_dispo.models.convert import export_hf_weights, load_hf_weights
from megatron_dispo.models.logprobs import vocab_parallel_logprobs_entropy
from megatron_dispo.models.microbatch import MicroBatch, width_multiple
from megatron_dispo.models.optimizer import OptimizerSettings, build_optimizer, finalize_and_step, wrap_ddp, zero_grads
from megatron_dispo.models.parallel import ParallelConfig
from megatron_dispo.models.prefix_sharing import shared_prefix_logits
from megatron_dispo.models.prefix_sharing import supported as prefix_sharing_supported
from megatron_dispo.models.routing_replay import NO_ROUTE, RoutingCounts, observe_routing

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
        routing_replay: bool = False,
    ) -> None:
        """``routing_replay``: forwards of micro-batches that carry the engine's routing use those experts (R3);
        without it that routing only feeds the router-agreement metric."""
        from megatron.core import parallel_state
        from transformers import AutoConfig

        self.hf_dir = Path(hf_dir)
        self.hf_config = AutoConfig.from_pretrained(str(self.hf_dir))
        self.parallel = parallel
        self.temperature = temperature
        self.routing_replay = routing_replay
        model = build_model(
            self.hf_config, parallel, params_dtype=DTYPES[params_dtype], fp8=fp8, initialize=False,
            calculate_per_token_loss=True,
        )  # fmt: skip
        load_hf_weights(model, self.hf_dir, self.hf_config)  # the only values the weights ever take: no random init
        self.model = wrap_ddp(model, parallel, optimizer)
        self.optimizer = build_optimizer([self.model], parallel, optimizer)
        self._tp_group = (
            parallel_state.get_tensor_model_parallel_group()
            if parallel_state.get_tensor_model_parallel_world_size() > 1
            else None
        )
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group() if pp_size > 1 else None
        self._pp_last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        # sequence parallelism splits the sequence over TP: micro-batches are padded to a multiple of TP here
        self._sp_multiple = parallel.tensor_model_parallel_size if self.model.config.sequence_parallel else 1
        recipe = getattr(self.model.config, "fp8_recipe", "delayed") or "delayed"
        self._width_multiple = width_multiple(
            parallel.tensor_model_parallel_size, bool(self.model.config.sequence_parallel), fp8, str(recipe)
        )
        self._tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.device = next(self.model.parameters()).device
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_moe = bool(getattr(self.hf_config, "num_experts", 0))

    # ------------------------------------------------------------------ forward
    def _device_batch(self, batch: MicroBatch) -> MicroBatch:
        """The micro-batch on the model's device, input_ids right-padded to :func:`width_multiple` (a multiple of TP
        under sequence parallelism, which splits the sequence over TP ranks; times Transformer Engine's FP8 GEMM
        alignment with FP8). Causal attention keeps the real positions exact."""
        input_ids, routed = batch.input_ids, batch.routed_experts
        width = input_ids.shape[1]
        if self._width_multiple > 1 and width % self._width_multiple:
            padded = -(-width // self._width_multiple) * self._width_multiple
            input_ids = torch.nn.functional.pad(input_ids, (0, padded - width), value=batch.pad_token_id)
            if routed is not None:
                routed = torch.nn.functional.pad(routed, (0, 0, 0, 0, 0, padded - width), value=NO_ROUTE)

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(self.device, non_blocking=True)

        return dataclasses.replace(
            batch,
            input_ids=move(input_ids),
            response_mask=move(batch.response_mask),
            old_logprobs=move(batch.old_logprobs),
            advantages=move(batch.advantages),
            routed_experts=move(routed),
            correct=move(batch.correct),
            rollout_logprobs=move(batch.rollout_logprobs),
            token_lag=move(batch.token_lag),
        )

    def _token_logprobs(
        self, batch: MicroBatch, logits: torch.Tensor, *, with_entropy: bool, temperature: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target-aligned [n, T-1] log pi(token) (and entropy) under softmax(logits / T), T = rollout temperature;
        ``batch`` is the device batch (input_ids maybe SP-padded), ``logits`` the last stage's [n, T', V/TP]."""
        width = batch.response_mask.shape[1] + 1  # the unpadded T
        return vocab_parallel_logprobs_entropy(
            logits[:, : width - 1],
            batch.input_ids[:, 1:width],
            tp_group=self._tp_group,
            temperature=self.temperature if temperature is None else temperature,
            vocab_size=self.hf_config.vocab_size,
            compute_entropy=with_entropy,
        )

    def _run_schedule(
        self,
        batches: Sequence[MicroBatch],
        last_stage_loss: Callable[[int, MicroBatch, torch.Tensor], torch.Tensor],
        *,
        forward_only: bool,
        aux_loss_scale: float | None = None,
        routing: RoutingCounts | None = None,
    ) -> None:
        """Forward (and backward) over ``batches`` through Megatron's pipeline schedule (PP = 1 included).

        ``last_stage_loss(i, device_batch, logits)`` runs on the last pipeline stage only, inside the schedule's
        loss function, and returns micro-batch i's loss (already normalised by the global token count; the
        schedule adds no scaling because the model has ``calculate_per_token_loss``); it keeps whatever else it
        needs itself. ``aux_loss_scale``: the MoE load-balancing loss weight of each micro-batch (see
        :class:`_SetAuxLossScale`). Micro-batches carrying the engine's routing are replayed (``routing_replay``)
        or observed; ``routing`` accumulates how the routers matched it on the response tokens.
        """
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device_batches = [self._device_batch(batch) for batch in batches]
        last_stage = parallel_state.is_pipeline_last_stage()
        flags: list[torch.Tensor | None] = [None] * len(device_batches)

        def forward_step(data_iterator: Iterator[tuple[int, MicroBatch]], model: torch.nn.Module) -> tuple:
            index, batch = next(data_iterator)
            with observe_routing(model, batch.routed_experts, replay=self.routing_replay) as observed:
                output = model_forward_logits(model, batch.input_ids)
            if observed is not None and routing is not None:
                flags[index] = observed.token_flags()
            aux_scale = None
            if aux_loss_scale is not None:
                # In per-token-loss mode Megatron's router multiplies its loss by the tokens it saw on this rank
                # (expecting grads divided by the global token count later); dividing that back out keeps the
                # weight layout-independent (those tokens halve under SP at TP=2).
                aux_scale = aux_loss_scale * self._sp_multiple / batch.input_ids.numel()
            if aux_scale is not None and not last_stage:
                output = _SetAuxLossScale.apply(output, aux_scale)

            def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss = last_stage_loss(index, batch, logits)
                if aux_scale is not None:
                    loss = _SetAuxLossScale.apply(loss, aux_scale)
                return loss, batch.response_mask.sum().to(torch.int), {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(enumerate(device_batches)),
            model=self.model,
            num_microbatches=len(device_batches),
            seq_length=max(batch.input_ids.shape[1] for batch in device_batches),
            micro_batch_size=max(batch.input_ids.shape[0] for batch in device_batches),
            forward_only=forward_only,
        )
        if routing is not None and any(flag is not None for flag in flags):
            routing.add(*self._routing_totals(device_batches, flags))

    def _routing_totals(
        self, batches: Sequence[MicroBatch], flags: Sequence[torch.Tensor | None]
    ) -> tuple[float, float, float]:
        """(tokens, agree, replayed_exact) over the response positions of every DP rank's micro-batches.

        Each rank's flags cover its own layers (pipeline stage) and sequence shard (SP): they are completed to whole
        sequences and AND-ed (MIN) over the TP and pipeline groups, so "every layer" means every layer of the model.
        """
        pieces, valid = [], []
        for batch, flag in zip(batches, flags, strict=True):
            rows, width = batch.input_ids.shape
            full = torch.ones((3, rows, width), dtype=torch.long, device=self.device)
            if flag is not None:
                offset = self._tp_rank * flag.shape[2] if self._sp_multiple > 1 else 0
                full[:, :, offset : offset + flag.shape[2]] = flag.to(self.device)
            pieces.append(full.reshape(3, -1))
            mask = batch.response_mask > 0  # [n, T-1]: position j's routing scored target token j + 1
            valid.append(torch.nn.functional.pad(mask, (0, width - mask.shape[1])).reshape(-1))
        stacked = torch.cat(pieces, dim=1)
        if self._sp_multiple > 1 and self._tp_group is not None:
            torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MIN, group=self._tp_group)
        if self._pp_group is not None:
            torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MIN, group=self._pp_group)
        recorded = stacked[0].bool() & torch.cat(valid)
        totals = torch.stack(
            [recorded.sum(), (recorded & stacked[1].bool()).sum(), (recorded & stacked[2].bool()).sum()]
        ).to(torch.float64)
        if self.dp_size > 1:
            torch.distributed.all_reduce(totals, group=self.dp_group)
        tokens, agree, exact = totals.tolist()
        return tokens, agree, exact

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the last pipeline stage holds it, on every stage (same shape everywhere; no-op at PP=1)."""
        if self._pp_group is None:
            return tensor
        tensor = tensor.to(self.device).contiguous()
        torch.distributed.broadcast(tensor, src=self._pp_last_rank, group=self._pp_group)
        return tensor

    def _logprobs_of_all_stages(
        self, batches: Sequence[MicroBatch], values: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """Per-micro-batch [n, T-1] tensors the last stage computed, on every stage (one broadcast), as CPU tensors.

        ``values[i]`` None stands for zeros (nothing computed: a stage before the last, or a skipped micro-batch)."""
        shapes = [tuple(batch.response_mask.shape) for batch in batches]
        sizes = [n * t for n, t in shapes]
        pieces = [
            torch.zeros(size, dtype=torch.float32, device=self.device) if value is None else value.detach().reshape(-1)
            for value, size in zip(values, sizes, strict=True)
        ]
        flat = self._from_last_stage(torch.cat(pieces).float()).cpu()
        return [chunk.reshape(shape) for chunk, shape in zip(flat.split(sizes), shapes, strict=True)]

    @torch.no_grad()
    def response_logprobs(
        self,
        batches: Sequence[MicroBatch],
        *,
        temperature: float | None = None,
        routing: RoutingCounts | None = None,
    ) -> dict[int, torch.Tensor]:
        """pi_old of every response token: {sequence index: per-token log-probs}, one forward per micro-batch
        (forward-only pipeline schedule); every pipeline stage returns the same values. ``routing`` accumulates the
        router agreement of micro-batches that carry the engine's routing."""
        if not batches:
            return {}
        self.model.eval()
        values: list[torch.Tensor | None] = [None] * len(batches)

        def store(index: int, batch: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
            values[index], _ = self._token_logprobs(batch, logits, with_entropy=False, temperature=temperature)
            return torch.zeros((), device=logits.device)

        self._run_schedule(batches, store, forward_only=True, routing=routing)
        out: dict[int, torch.Tensor] = {}
        for batch, logprobs in zip(batches, self._logprobs_of_all_stages(batches, values), strict=True):
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
    ) -> dict[int, torch.Tensor]:
        """pi_old of every response token like `response_logprobs`, but each distinct prompt of a chunk runs once
        and its keys/values serve all its responses (`prefix_sharing.py`). `chunks` lists sequence indices per
        forward (memory budget); empty responses get an empty list."""
        self.model.eval()
        out: dict[int, torch.Tensor] = {}
        for chunk in chunks:
            rows = [i for i in chunk if len(response_ids[i]) > 0]
            out.update({i: torch.zeros(0) for i in chunk if len(response_ids[i]) == 0})
            if not rows:
                continue
            logits = shared_prefix_logits(
                self.model, [_ids(prompt_ids[i]) for i in rows], [_ids(response_ids[i]) for i in rows], pad_token_id=0
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
            for row, index in enumerate(rows):
                out[index] = logprobs[row, : len(response_ids[index])].float().cpu()
        return out

    # ------------------------------------------------------------------ update
    def train_minibatch(
        self,
        batches: Sequence[MicroBatch],
        loss_config: PolicyLossConfig,
        *,
        num_global_tokens: int,
        num_global_sequences: int,
        old_logprobs: OldLogprobsMode = "given",
        tis_cap: float | None = None,
        routing: RoutingCounts | None = None,
        num_lags: int = 0,
    ) -> MinibatchResult:
        """One optimizer step over this rank's micro-batches of a mini-batch; metrics are global (all DP ranks).

        Everything an update reads travels in the micro-batches: advantages, correctness, pi_old, the engine's
        log-probs (for TIS) and the engine's routing. ``old_logprobs`` says where pi_old comes from:

        - ``"given"``: every micro-batch carries it (the no-grad pi_old pass ran before);
        - ``"capture"``: none does: this is the step's first update, before any weight change, so the policy *is*
          pi_old and its own detached log-probs serve (r = 1 exactly); they are returned per sequence, and
          ``routing`` accumulates that forward's router agreement (it is those sequences' pi_old pass).

        With ``tis_cap`` each token's advantage is multiplied by min(pi_old / pi_rollout, cap) (``algorithms/tis``),
        which needs pi_old given. With ``num_lags`` > 0 every micro-batch carries its tokens' version lags and the
        regime telemetry is also reported per lag (the same on every rank: it sizes the metric all-reduce).
        """
        _check_update_inputs(batches, old_logprobs, tis_cap, num_lags)
        self.model.train()
        zero_grads([self.model], self.optimizer)
        packed: list[list[float] | None] = [None] * len(batches)
        entropy_sums: list[torch.Tensor | None] = [None] * len(batches)
        on_policy: list[torch.Tensor | None] = [None] * len(batches)

        def loss_of(i: int, batch: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
            logprobs, entropy = self._token_logprobs(batch, logits, with_entropy=True, temperature=None)
            pi_old = batch.old_logprobs
            if pi_old is None:
                pi_old = on_policy[i] = logprobs.detach() * batch.response_mask
            advantages = batch.advantages
            if tis_cap is not None and batch.rollout_logprobs is not None and advantages is not None:
                weights = truncated_is_weights(pi_old, batch.rollout_logprobs, batch.response_mask, tis_cap)
                advantages = advantages.unsqueeze(1) * weights
            loss, metrics = compute_policy_loss(
                logprobs,
                pi_old,
                advantages,
                batch.response_mask,
                loss_config,
                correct=batch.correct,
                num_global_tokens=num_global_tokens,
                num_global_sequences=num_global_sequences,
                entropy=entropy,
                token_lag=batch.token_lag,
                num_lags=num_lags,
            )
            packed[i] = pack_metrics(metrics, num_lags)
            entropy_sums[i] = (entropy.detach().to(torch.float64) * batch.response_mask).sum()
            return loss

        # the router's load-balancing loss is a per-micro-batch mean: weight it so the step sees its average
        aux_scale = 1.0 / (len(batches) * self.dp_size) if self.is_moe else None
        self._run_schedule(
            batches, loss_of, forward_only=False, aux_loss_scale=aux_scale,
            routing=routing if old_logprobs == "capture" else None,
        )  # fmt: skip
        result = finalize_and_step([self.model], self.optimizer)
        totals = self._global_loss_totals(packed, entropy_sums, len(metric_keys(num_lags)))
        captured: dict[int, torch.Tensor] = {}
        if old_logprobs == "capture":
            for batch, values in zip(batches, self._logprobs_of_all_stages(batches, on_policy), strict=True):
                captured.update(response_values(batch, values))
        metrics = unpack_metrics(totals[:-1], num_lags)
        metrics["entropy"] = float(totals[-1]) / max(num_global_tokens, 1)
        metrics["grad_norm"] = result.grad_norm
        metrics["update_skipped"] = float(not result.updated)
        return MinibatchResult(metrics, captured)

    def _global_loss_totals(
        self, packed: Sequence[list[float] | None], entropy_sums: Sequence[torch.Tensor | None], num_keys: int
    ) -> torch.Tensor:
        """The loss metrics' and entropy's sums over this mini-batch on every rank (from the last pipeline stage,
        which alone computed them, then over data-parallel ranks), on the CPU."""
        totals = torch.zeros(num_keys + 1, dtype=torch.float64, device=self.device)
        if all(p is not None for p in packed):
            totals = torch.cat(
                [
                    torch.tensor(packed, dtype=torch.float64, device=self.device).sum(dim=0),
                    torch.stack(entropy_sums).sum().reshape(1),  # type: ignore[arg-type]
                ]
            )
        totals = self._from_last_stage(totals)
        if self.dp_size > 1:
            torch.distributed.all_reduce(totals, group=self.dp_group)
        return totals.cpu()

    # ------------------------------------------------------------------ weights
    def export_weights(self, destination: Literal["all", "rank0"] = "rank0") -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (hf_name, full tensor) for refit / HF export; every rank must consume it to the end."""
        return export_hf_weights(self.model, self.hf_config, destination=destination)


OldLogprobsMode = Literal["given", "capture"]
"""Where an update's pi_old comes from (:meth:`MegatronPolicy.train_minibatch`)."""


@dataclasses.dataclass(frozen=True)
class MinibatchResult:
    """One optimizer step's global metrics, and pi_old per sequence when it was captured by that step's forward."""

    metrics: dict[str, float]
    captured_old_logprobs: dict[int, torch.Tensor]


def _check_update_inputs(
    batches: Sequence[MicroBatch], mode: OldLogprobsMode, tis_cap: float | None, num_lags: int
) -> None:
    """The micro-batches must carry what the mode says (a programming error otherwise, named here)."""
    if not batches:
        raise ValueError("train_minibatch got no micro-batches; every DP rank needs at least one.")
    if mode not in ("given", "capture"):
        raise ValueError(f"old_logprobs={mode!r}: use 'given' or 'capture'.")
    carried = [batch.old_logprobs is not None for batch in batches]
    if mode == "given" and not all(carried):
        raise ValueError("old_logprobs='given' but a micro-batch has no old_logprobs; run the pi_old pass first.")
    if mode == "capture" and any(carried):
        raise ValueError("old_logprobs='capture' but a micro-batch already carries old_logprobs.")
    if tis_cap is not None and mode == "capture":
        raise ValueError("TIS needs pi_old before the update's forward: use old_logprobs='given' with tis_cap.")
    if num_lags and any(batch.token_lag is None for batch in batches):
        raise ValueError(f"num_lags={num_lags} but a micro-batch carries no token_lag (build_microbatch(token_lags=)).")


class _SetAuxLossScale(torch.autograd.Function):
    """Identity whose backward sets the MoE load-balancing loss's gradient scale before the router's backward runs.

    Megatron's schedule resets ``MoEAuxLossAutoScaler``'s scale to 1 after every forward (per-token loss mode), so
    the policy's weight 1 / (micro-batches x DP) is set from the first backward node of each micro-batch instead:
    the loss on the last stage, the stage output elsewhere (the backward of a stage starts there).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(ctx.scale, device=grad.device))
        return grad, None


def _ids(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids as a list (prompt sharing finds a group's shared prompt by value)."""
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)


def response_values(batch: MicroBatch, values: torch.Tensor) -> dict[int, torch.Tensor]:
    """{sequence index: its response tokens' entries of a target-aligned [n, T-1] tensor} (1-D float32 tensors: pi_old
    goes from here into the next micro-batches' tensors without a detour through Python lists)."""
    return {index: values[row][batch.response_mask[row] > 0] for row, index in enumerate(batch.indices)}
