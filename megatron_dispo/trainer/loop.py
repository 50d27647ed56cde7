"""The RL loop. One step reads top to bottom as its phases, each taking the previous one's data explicitly:

    rollout (engine rank)  -> StepBatch on every rank (tensors, a few broadcasts)
    rewards -> advantages  -> pi_old log-probs -> K optimizer updates -> refit into the engine (+ probe check)

One process per rank (``torchrun``); every rank holds a Megatron shard of the policy and its share of a vLLM engine
replica (``rollout.tensor_parallel_size`` consecutive ranks per replica). Global rank 0 hosts the
:class:`RolloutCollector` (data, dynamic sampling, verification) and drives every replica; every rank refits its own
engine and checks it with the probe. On GPU the engines sleep from the end of rollout until the refit, and wake in
the order that never holds two copies of anything: weights, then the refit into them, then the KV cache. The trainer
holds no maths of its own: losses, advantages, filters and shaping come from ``algorithms/``, the model from
``models/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from megatron_dispo.algorithms.advantages import group_relative_advantages
from megatron_dispo.algorithms.shaping import apply_overlong_penalty
from megatron_dispo.config import Config
from megatron_dispo.config_loader import to_dict
from megatron_dispo.models.microbatch import MicroBatch, build_microbatch
from megatron_dispo.models.routing_replay import RoutingCounts
from megatron_dispo.refit import ProbeBatch, RefitCheckError, RefitMismatchError, RefitStats, send_weights
from megatron_dispo.trainer.batching import (
    exclude_dropped,
    pack_microbatches,
    shard_for_data_parallel,
    split_minibatches,
)
from megatron_dispo.trainer.checkpoint_manager import CheckpointManager
from megatron_dispo.trainer.metrics import MetricsLogger
from megatron_dispo.trainer.phases import PhaseTimer
from megatron_dispo.trainer.step_batch import StepBatch, broadcast_step_batch
from megatron_dispo.trainer.step_metrics import (
    combine_minibatch_metrics,
    finish_reason_metrics,
    mismatch_metrics,
    replica_refit_metrics,
    reward_metrics,
)

ENGINE_RANK = 0
"""Global rank that hosts the rollout engine, the collector and the refitter."""


@dataclass(frozen=True)
class UpdatePlan:
    """How one step's sequences are cut for the update phase (the same cut serves pi_old and the K updates)."""

    minibatches: list[list[int]]
    """Sequence indices of each of the K mini-batches (whole groups)."""
    local: list[list[int]]
    """This data-parallel rank's share of each mini-batch."""
    token_counts: list[int]
    """Response tokens of each whole mini-batch: its ``num_global_tokens``."""
    sequence_lengths: list[int]
    """Prompt + response tokens of every sequence (micro-batch packing)."""


class Trainer:
    """Builds every component from a validated Config and runs ``trainer.max_steps`` RL steps."""

    def __init__(self, config: Config, *, console: Console | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from megatron_dispo.models.parallel import initialize_parallel
        from megatron_dispo.models.policy import MegatronPolicy

        self.config = config
        self.console = console or Console(highlight=False)
        self.run_dir = Path(config.trainer.run_dir)
        hf_config = AutoConfig.from_pretrained(config.model.hf_path)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config.validate_for_world(world, hf_config=hf_config)
        initialize_parallel(config.model.parallel, seed=config.trainer.seed)
        self.rank = dist.get_rank()
        self.is_engine_rank = self.rank == ENGINE_RANK
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.policy = MegatronPolicy(
            config.model.hf_path,
            config.model.parallel,
            config.optim,
            params_dtype=config.model.params_dtype,
            temperature=config.rollout.temperature if config.rollout.temperature > 0 else 1.0,
            fp8=config.model.fp8,
            routing_replay=config.model.moe_routing_replay == "rollout",
        )
        self.share_prompts = config.trainer.share_prompt_prefix and self.policy.supports_prompt_sharing
        if config.trainer.share_prompt_prefix and not self.share_prompts and self.is_engine_rank:
            self.console.print(
                "[yellow]trainer.share_prompt_prefix: this model's attention (Transformer Engine, or sequence/context/"
                "pipeline parallel) does not take the shared-prompt KV cache; pi_old runs full padded forwards"
            )
        if self.share_prompts and config.rollout.capture_routed_experts:
            self.share_prompts = False  # pi_old must replay (or be compared with) the routing of every sequence
            if self.is_engine_rank:
                self.console.print(
                    "[yellow]trainer.share_prompt_prefix is off: with the engine's routing captured (MoE routing "
                    "replay), pi_old runs one forward per sequence so every token's routing is replayed or compared"
                )
        self.group_size = config.algorithm.group_size
        self.checkpoints = CheckpointManager(
            self.run_dir, keep_last=config.trainer.keep_last, rank=self.rank, barrier=dist.barrier
        )
        self.engine: Any = None
        self.collector: Any = None
        self.refitter: Any = None
        self.logger: MetricsLogger | None = None
        self.probe: ProbeBatch = self._start_engine()  # once, at start-up: every rank scores it at checks
        self.refit_count = 0
        self.start_step = 1
        if config.trainer.resume:
            self._resume()
        if self.is_engine_rank:
            self.logger = MetricsLogger(
                self.run_dir,
                config.logging,
                resume_from_step=self.start_step if config.trainer.resume else None,
                run_config=to_dict(config),
                console=self.console,
            )

    def _start_engine(self) -> ProbeBatch:
        """An engine replica on every group of ``rollout.tensor_parallel_size`` ranks (rank 0 drives them all and
        hosts the collector), a refitter per rank on its own engine; the refit probe batch on every rank."""
        from megatron_dispo.refit import Refitter
        from megatron_dispo.rollout.replicas import ReplicatedEngine

        self.engine = ReplicatedEngine(self.config.model.hf_path, self.config.rollout)
        probe: ProbeBatch | None = None
        if self.is_engine_rank:
            from megatron_dispo.trainer.collector import RolloutCollector

            self.collector = RolloutCollector(self.config, self.engine, self.tokenizer)
            sequences, prompt_lens = self.collector.probe_sequences()
            probe = ProbeBatch(tuple(sequences), tuple(prompt_lens))
        probe = _broadcast_object(probe)
        # every rank refits its own engine from the full HF tensors (vLLM slices them per engine rank)
        self.refitter = Refitter(self.engine.local_engine, self.config.refit, probe=probe)
        return probe

    def _first_update_on_policy(self) -> bool:
        """Whether the first update's own forward is pi_old (r = 1 exactly): not with TIS, which needs pi_old first."""
        return self.config.algorithm.tis_cap is None

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        started = time.perf_counter()
        with timer.phase("rollout"):
            batch, metrics = self._rollout(step)
        if batch.num_sequences == 0:
            # bounded rounds found no informative group: nothing to learn from this step, the policy is unchanged
            self._warn_empty_batch(step)
            metrics.update(timer.metrics)
            metrics["perf/time/step_s"] = time.perf_counter() - started
            return metrics
        with timer.phase("sleep"):
            self._engine_sleep()
        metrics.update(self._learn(batch, timer))
        with timer.phase("wake"):
            self._engine_wake(("weights",))  # the KV cache wakes after the refit (engine.score / generate)
        with timer.phase("refit"):
            metrics.update(self._refit())
        metrics.update(timer.metrics)
        # the rollout phase's time is the engine's: verification is reported on its own (perf/time/reward_s)
        metrics["perf/time/rollout_s"] -= metrics.get("perf/time/reward_s", 0.0)
        metrics["perf/time/step_s"] = time.perf_counter() - started
        return metrics

    def _learn(self, batch: StepBatch, timer: PhaseTimer) -> dict[str, float]:
        """Rewards -> advantages -> pi_old -> K updates on one batch: its reward, ``train/`` and mismatch metrics."""
        advantages, metrics = self._advantages(batch)
        plan = self._plan_updates(batch)
        routing = RoutingCounts()  # the pi_old pass's router agreement with the engine (MoE, captured routing)
        with timer.phase("logprob"):
            old_logprobs = self._old_logprobs(batch, plan, routing)
        with timer.phase("update"):
            metrics.update(self._update(batch, plan, old_logprobs, advantages, routing))
        metrics.update(mismatch_metrics(old_logprobs, batch.rollout_logprobs_per_sequence(), self.policy))
        metrics.update(routing.metrics())
        return metrics

    def _rollout(self, step: int) -> tuple[StepBatch, dict[str, float]]:
        """The engine rank samples and verifies this step's groups with every replica; every rank receives them."""
        local: StepBatch | None = None
        metrics: dict[str, float] = {}
        self.engine.wake_up()
        granularity = self.config.trainer.num_minibatches * self.policy.dp_size
        # rank 0 collects; every other rank generates its replica's share of each request until rank 0 releases
        collected = self.engine.serving_phase(lambda: self.collector.collect(step, granularity=granularity))
        if collected is not None:
            groups, metrics = collected
            local = self.collector.to_step_batch(groups, step)
        batch = broadcast_step_batch(local, src=ENGINE_RANK)
        metrics["rollout/dynamic_sampling/empty_batch"] = float(batch.num_sequences == 0)
        return batch, metrics

    def _advantages(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards in {-1, +1} from correctness, DAPO's overlong shaping, group-relative advantages (Eq. 3)."""
        cfg = self.config
        lengths = batch.response_lens.to(torch.float32)
        rewards = torch.where(batch.correct, 1.0, -1.0)
        shaped = apply_overlong_penalty(rewards, lengths, cfg.overlong) if cfg.algorithm.overlong_penalty else rewards
        dropped = not bool(batch.valid.all())  # reward.on_verifier_failure=drop removed some samples
        advantages = group_relative_advantages(
            shaped, self.group_size, scale_by_std=cfg.algorithm.scale_advantages_by_std,
            valid=batch.valid if dropped else None,
        )  # fmt: skip
        metrics = reward_metrics(rewards, shaped, batch.correct, lengths, advantages)
        metrics["rollout/prompt/len_mean"] = float(batch.prompt_lens.float().mean())
        metrics.update(finish_reason_metrics(batch.finish_reasons()))
        return advantages, metrics

    def _plan_updates(self, batch: StepBatch) -> UpdatePlan:
        cfg = self.config.trainer
        minibatches = split_minibatches(batch.num_sequences, self.group_size, cfg.num_minibatches)
        dp_size, dp_rank = self.policy.dp_size, self.policy.dp_rank
        response_lengths = (batch.response_lens * batch.valid).tolist()  # dropped samples carry no loss tokens
        return UpdatePlan(
            minibatches=minibatches,
            local=[shard_for_data_parallel(mb, self.group_size, dp_rank, dp_size) for mb in minibatches],
            token_counts=[sum(response_lengths[i] for i in mb) for mb in minibatches],
            sequence_lengths=(batch.prompt_lens + batch.response_lens).tolist(),
        )

    def _micro_batches(
        self, batch: StepBatch, plan: UpdatePlan, indices: Sequence[int], **fields: Any
    ) -> list[MicroBatch]:
        """``indices`` packed under the micro-batch token budget, as padded tensors (with the engine's routing when
        it was captured: replayed under R3, else compared with the trainer's own)."""
        budget = self.config.trainer.max_tokens_per_microbatch
        routed = batch.routed_experts_per_sequence()
        micro = [
            build_microbatch(
                chunk, batch.prompts, batch.responses, pad_token_id=self.pad_token_id, routed_experts=routed, **fields
            )
            for chunk in pack_microbatches(indices, plan.sequence_lengths, budget)
        ]
        for b in micro:
            exclude_dropped(b, batch.valid)
        return micro

    def _old_logprobs(self, batch: StepBatch, plan: UpdatePlan, routing: RoutingCounts) -> dict[int, torch.Tensor]:
        """pi_old of this rank's response tokens, one no-grad forward over every mini-batch but the first.

        The first update runs before any weight change, so its own forward gives pi_old (r = 1 exactly) and is
        captured there; TIS needs pi_old before that forward, so with TIS every mini-batch takes this pass.
        ``routing`` accumulates this pass's router agreement.
        """
        first_on_policy = self._first_update_on_policy()
        indices = [i for share in (plan.local[1:] if first_on_policy else plan.local) for i in share]
        if self.share_prompts:  # each distinct prompt runs once per chunk
            chunks = pack_microbatches(indices, plan.sequence_lengths, self.config.trainer.max_tokens_per_microbatch)
            return self.policy.shared_prompt_logprobs(chunks, batch.prompts, batch.responses)
        return self.policy.response_logprobs(self._micro_batches(batch, plan, indices), routing=routing)

    def _update(
        self,
        batch: StepBatch,
        plan: UpdatePlan,
        old_logprobs: dict[int, torch.Tensor],
        advantages: torch.Tensor,
        routing: RoutingCounts,
    ) -> dict[str, float]:
        """K optimizer updates, one per mini-batch; the on-policy first update fills in its pi_old (and adds its
        router agreement to ``routing``: that forward is the pi_old pass of its sequences)."""
        cfg = self.config
        tis_cap = cfg.algorithm.tis_cap
        rollout_logprobs = batch.rollout_logprobs_per_sequence() if tis_cap is not None else None
        counted = (batch.response_lens > 0) & batch.valid
        results = []
        for update_index, (minibatch, share) in enumerate(zip(plan.minibatches, plan.local, strict=True)):
            on_policy = update_index == 0 and self._first_update_on_policy()
            micro = self._micro_batches(
                batch, plan, share, old_logprobs=None if on_policy else old_logprobs, advantages=advantages
            )
            token_advantages = None
            if rollout_logprobs is not None and tis_cap is not None:
                token_advantages = [self._tis_advantages(b, batch, rollout_logprobs, tis_cap) for b in micro]
            results.append(
                self.policy.train_minibatch(
                    micro,
                    cfg.algorithm.loss,
                    num_global_tokens=plan.token_counts[update_index],
                    num_global_sequences=int(counted[minibatch].sum()),
                    correct=[batch.correct[list(b.indices)] for b in micro],
                    token_advantages=token_advantages,
                    captured_old_logprobs=old_logprobs if on_policy else None,
                    routing=routing if on_policy else None,
                )
            )
        metrics = {f"train/{k}": v for k, v in combine_minibatch_metrics(results, plan.token_counts).items()}
        metrics["train/grad_norm_max"] = max(m["grad_norm"] for m in results)
        return metrics

    def _tis_advantages(
        self, micro: MicroBatch, batch: StepBatch, rollout_logprobs: Sequence[torch.Tensor], cap: float
    ) -> torch.Tensor:
        """A x min(pi_old / pi_rollout, cap) per response token (``algorithms.tis``), target-aligned like ``micro``."""
        from megatron_dispo.algorithms.tis import truncated_is_weights

        aligned = build_microbatch(
            micro.indices, batch.prompts, batch.responses, pad_token_id=self.pad_token_id, old_logprobs=rollout_logprobs
        ).old_logprobs
        assert micro.old_logprobs is not None and micro.advantages is not None and aligned is not None
        weights = truncated_is_weights(micro.old_logprobs, aligned, micro.response_mask, cap)
        return micro.advantages.unsqueeze(1) * weights

    # ------------------------------------------------------------------ engine memory and refit
    def _engine_sleep(self) -> None:
        self.engine.sleep()

    def _engine_wake(self, tags: Sequence[str] | None) -> None:
        self.engine.wake_up(tags)

    def _refit(self) -> dict[str, float]:
        """Every replica receives the full HF tensors and checks itself; a failing replica is named on every rank."""
        self.refit_count += 1
        check_due = self.config.refit.check_due(self.refit_count)
        probe_logprobs = self._probe_logprobs() if check_due else None
        stream = self.policy.export_weights("all")
        stats, failure = None, ""
        try:
            stats = send_weights(stream, self.refitter, trainer_logprobs=probe_logprobs)
        except (RefitCheckError, RefitMismatchError) as error:
            failure = f"{type(error).__name__}: {error}"
        return self._replica_refit_metrics(stats, failure)

    def _replica_refit_metrics(self, stats: RefitStats | None, failure: str) -> dict[str, float]:
        """Gathers every rank's refit time, bytes and outcome; raises on every rank if any replica failed."""
        placement = self.engine.placement
        mine = torch.tensor(
            [float(bool(failure)), stats.seconds if stats else 0.0, float(stats.payload_bytes if stats else 0)],
            dtype=torch.float64,
        )
        rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        failed = [rank for rank, row in enumerate(rows) if row[0] > 0]
        if failed:
            detail = f": {failure}" if failure else f" (see rank {failed[0]}'s log for the details)"
            raise RefitCheckError(
                f"refit #{self.refit_count} failed on the engine replica(s) of rank(s) {failed} (this rank "
                f"{self.rank}, replica {placement.replica_index}){detail}"
            )
        assert stats is not None
        metrics = {f"refit/{k.split('/', 1)[-1]}": v for k, v in stats.metrics().items()}
        metrics |= replica_refit_metrics([row[1:].tolist() for row in rows], placement.tensor_parallel_size)
        return metrics

    def _probe_logprobs(self) -> list[torch.Tensor]:
        """The trainer's log-probs of the probe answers (temperature 1, as the engine scores), on every rank."""
        probe = self.probe
        prompts = [list(seq[:n]) for seq, n in zip(probe.sequences, probe.prompt_lens or (), strict=True)]
        answers = [list(seq[n:]) for seq, n in zip(probe.sequences, probe.prompt_lens or (), strict=True)]
        micro = build_microbatch(range(len(prompts)), prompts, answers, pad_token_id=self.pad_token_id)
        values = self.policy.response_logprobs([micro], temperature=1.0)
        return [torch.as_tensor(values[i]) for i in range(len(prompts))]

    # ------------------------------------------------------------------ eval (engine rank)
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, generated by every replica (rank 0 drives, the others serve)."""
        self.engine.wake_up()
        return self.engine.serving_phase(lambda: self.collector.evaluate()) or {}

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        from megatron_dispo.models.checkpoint import save_checkpoint
        from megatron_dispo.models.convert_cli import HF_SUBDIR

        state = _broadcast_object(self._checkpoint_state(step))

        def write_model(path: Path) -> None:
            save_checkpoint(
                path, self.policy.model, self.policy.optimizer, iteration=step, parallel=self.config.model.parallel
            )
            if self.is_engine_rank:  # what `megatron-dispo convert mcore-to-hf --ckpt <path>` needs besides weights
                self.policy.hf_config.save_pretrained(str(path / HF_SUBDIR))
                self.tokenizer.save_pretrained(str(path / HF_SUBDIR))

        self.checkpoints.save(step, state, write_model)

    def _checkpoint_state(self, step: int) -> dict[str, Any] | None:
        """The engine rank's run state at checkpoint ``step`` (next step, data order); None on the other ranks."""
        return {"next_step": step + 1, **self.collector.state_dict()} if self.collector is not None else None

    def _resume(self) -> None:
        from megatron_dispo.models.checkpoint import latest_checkpoint, load_checkpoint

        loaded = self.checkpoints.load_latest()
        if loaded is None:
            self.console.print(f"[yellow]trainer.resume=true but {self.run_dir} has no checkpoint: starting fresh")
            return
        model_dir = latest_checkpoint(loaded.path / "model")
        if model_dir is None:
            raise FileNotFoundError(f"{loaded.path} is marked complete but holds no model checkpoint under model/.")
        load_checkpoint(model_dir, self.policy.model, self.policy.optimizer, parallel=self.config.model.parallel)
        state = loaded.trainer_state
        if self.collector is not None:
            self.collector.load_state_dict(state)
        self.start_step = int(state["next_step"])
        self._refit()  # the engine started from the initial weights: give it the checkpoint's
        if self.is_engine_rank:
            self.console.print(f"resumed from {loaded.path} at step {self.start_step}")

    # ------------------------------------------------------------------ main loop
    def train(self) -> list[dict[str, float]]:
        cfg = self.config.trainer
        history: list[dict[str, float]] = []
        eval_every = self.config.eval.every_steps
        if self.start_step == 1:
            initial = self.evaluate()
            if initial:
                if self.logger is not None:
                    self.logger.log(0, initial)
                history.append({"step": 0, **initial})
        with self._progress() as advance:
            for step in range(self.start_step, cfg.max_steps + 1):
                metrics = self.train_step(step)
                if eval_every and (step % eval_every == 0 or step == cfg.max_steps):
                    t0 = time.perf_counter()
                    metrics.update(self.evaluate())
                    metrics["perf/time/eval_s"] = time.perf_counter() - t0
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                    t0 = time.perf_counter()
                    self.save(step)
                    metrics["perf/time/checkpoint_s"] = time.perf_counter() - t0
                if self.logger is not None:
                    self.logger.log(step, metrics)
                    if cfg.plot_every and (step % cfg.plot_every == 0 or step == cfg.max_steps):
                        self.write_plots()
                history.append({"step": step, **metrics})
                # one plain line per rank and step: multi-node launches show every rank is alive and in step
                loss = metrics.get("train/loss", float("nan"))
                print(f"step {step} rank {self.rank} world {dist.get_world_size()} loss {loss:.6f}", flush=True)
                advance()
        return history

    def _warn_empty_batch(self, step: int) -> None:
        if self.is_engine_rank:
            self.console.print(
                f"[yellow]step {step}: no group with mixed correctness in "
                f"{self.config.algorithm.dynamic_sampling.max_rounds} sampling rounds; skipping the update. If this "
                "repeats, raise algorithm.dynamic_sampling.max_rounds / oversample_factor or change the data."
            )

    def write_plots(self) -> list[Path]:
        from megatron_dispo.trainer.plotting import plot_runs

        return plot_runs({self.run_dir.name: [self.run_dir]}, self.run_dir / "plots")

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Callable[[], None]]:
        cfg = self.config.trainer
        if not self.is_engine_rank:
            yield lambda: None
            return
        progress = Progress(
            TextColumn("[bold]RL steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console
        )
        task = progress.add_task("train", total=cfg.max_steps, completed=self.start_step - 1)
        with progress:
            yield lambda: progress.advance(task)

    def close(self) -> None:
        from megatron_dispo.models.parallel import destroy_parallel

        if self.logger is not None:
            self.logger.close()
        if self.engine is not None:  # None on the training ranks of a dedicated-placement job
            self.engine.shutdown()
        destroy_parallel()


def _broadcast_object(obj: Any) -> Any:
    """The engine rank's small object (probe, checkpoint state) on every rank; never per-token data."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=ENGINE_RANK)
    return holder[0]
