"""What the trainer does with one rollout batch: rewards -> advantages -> pi_old -> K optimizer updates.

The same for every placement: the batch may come from engines on these ranks or from dedicated rollout ranks, and
``trainer.old_logprobs`` decides whether pi_old is recomputed by the trainer or taken from the engine. The batch is
cut once into an :class:`UpdatePlan` (mini-batches, this rank's share, micro-batches carrying everything an update
reads), which serves the pi_old pass and the K updates alike. The maths comes from ``algorithms/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_dispo.algorithms.advantages import group_relative_advantages
from megatron_dispo.algorithms.batch_metrics import (
    combine_minibatch_metrics,
    finish_reason_metrics,
    lag_regime_metrics,
    reward_metrics,
)
from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.regime_control import RegimeController, StepSignals, apply_bounds
from megatron_dispo.algorithms.repetition import batch_repeated_ngram_rate
from megatron_dispo.algorithms.shaping import apply_overlong_penalty, binary_rewards
from megatron_dispo.comm.channel import GroupChannel
from megatron_dispo.config import Config
from megatron_dispo.models.microbatch import MicroBatch, build_microbatch, with_old_logprobs
from megatron_dispo.models.routing_replay import RoutingCounts
from megatron_dispo.refit import ProbeBatch
from megatron_dispo.trainer.batching import (
    exclude_dropped,
    pack_microbatches,
    shard_for_data_parallel,
    split_minibatches,
)
from megatron_dispo.trainer.phases import PhaseTimer
from megatron_dispo.trainer.step_batch import StepBatch, deliver_routing
from megatron_dispo.trainer.step_metrics import mismatch_metrics

PiOld = dict[int, torch.Tensor]
"""pi_old of each of this rank's sequences' response tokens, by sequence index in the batch."""


@dataclass(frozen=True)
class UpdatePlan:
    """How one step's sequences are cut for the update phase (the same cut serves pi_old and the K updates)."""

    minibatches: list[list[int]]
    """Sequence indices of each of the K mini-batches (whole groups)."""
    micro: list[list[MicroBatch]]
    """This data-parallel rank's share of each mini-batch, packed into micro-batches (without pi_old yet)."""
    token_counts: list[int]
    """Response tokens of each whole mini-batch: its ``num_global_tokens``."""
    sequence_counts: list[int]
    """Sequences of each whole mini-batch that carry loss tokens: its ``num_global_sequences``."""


class Learner:
    """Turns a :class:`StepBatch` into K optimizer updates of ``policy``; returns the step's learning metrics."""

    def __init__(
        self, config: Config, policy: object, host: GroupChannel, *, pad_token_id: int, share_prompts: bool
    ) -> None:
        from megatron_dispo.models.parallel import host_group
        from megatron_dispo.models.policy import MegatronPolicy

        assert isinstance(policy, MegatronPolicy)
        self.config = config
        self.policy = policy
        self.pad_token_id = pad_token_id
        self.share_prompts = share_prompts
        self.group_size = config.algorithm.group_size
        self.host = host
        self.host_dp = GroupChannel(host_group("dp"), "host", "host-dp")
        self.dp_rank_of = [int(row) for row in host.all_gather(torch.tensor([policy.dp_rank]))]
        """Data-parallel rank of every rank of the host world (whose sequences each rank trains on)."""
        control = config.algorithm.regime_control
        self.controller = RegimeController(control, config.algorithm.loss) if control.active else None
        """Adaptive DISPO (``algorithm.regime_control``): moves the clip bounds between steps; None when off."""
        dedicated = config.rollout.placement == "dedicated"
        self.num_lags = config.trainer.max_staleness + 1 if dedicated else 0
        """Version lags a token can have (0..max_staleness) when rollouts come from other versions, for the per-lag
        regime telemetry (``train/staleness{d}/``); 0 for colocated rollouts (always the current version)."""

    @property
    def loss_config(self) -> PolicyLossConfig:
        """The loss of the next update: the configured one, with the regime controller's bounds when it runs."""
        loss = self.config.algorithm.loss
        return apply_bounds(loss, self.controller.bounds()) if self.controller is not None else loss

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs to continue the learner exactly (the controller's state; the model and optimizer
        are checkpointed by Megatron)."""
        return {"regime_control": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.controller is not None and "regime_control" in state:
            self.controller.load_state_dict(state["regime_control"])  # type: ignore[arg-type]

    @property
    def recompute_old_logprobs(self) -> bool:
        return self.config.trainer.old_logprobs == "recompute"

    @property
    def first_update_on_policy(self) -> bool:
        """Whether the first update's own forward is pi_old (r = 1 exactly): only when pi_old is recomputed, and
        not with TIS, which needs pi_old before that forward."""
        return self.recompute_old_logprobs and self.config.algorithm.tis_cap is None

    def learn(self, batch: StepBatch, timer: PhaseTimer, *, version: int) -> dict[str, float]:
        """Rewards -> advantages -> pi_old -> K updates on one batch, trained from policy ``version`` (pi_old): its
        reward, ``train/`` and mismatch metrics, and with versioned rollouts the regime statistics per token lag."""
        if self.config.rollout.capture_routed_experts:
            batch = self._deliver_routing(batch)
        advantages, metrics = self.advantages(batch)
        plan = self.plan(batch, advantages, version)
        routing = RoutingCounts()  # the pi_old pass's router agreement with the engine (MoE, captured routing)
        with timer.phase("logprob"):
            pi_old = self.old_logprobs(batch, plan, routing)
        with timer.phase("update"):
            metrics.update(self.update(plan, pi_old, routing))
        metrics.update(mismatch_metrics(pi_old, batch.rollout_logprobs_per_sequence(), self.host_dp))
        metrics.update(routing.metrics())
        if self.controller is not None:  # the bounds this step trained with, and the next step's
            with timer.phase("control"):  # its cost, against perf/time/step_s
                self.controller.observe(self._control_signals(batch, metrics))
                metrics.update(self.controller.metrics())
        return metrics

    def _control_signals(self, batch: StepBatch, metrics: dict[str, float]) -> StepSignals:
        """The regime controller's inputs, all global (the same on every rank): the policy's token entropy over the
        step's updates, the mean response length, and the repetition signal its Regime 3 guard reads."""
        guard = self.config.algorithm.regime_control.regime3_guard
        ngram_rate = None
        if guard.enabled and guard.signal == "repeated_ngram_rate":
            ngram_rate = batch_repeated_ngram_rate([r.tolist() for r in batch.responses], guard.ngram_size)
        return StepSignals(
            entropy=metrics["train/entropy"],
            response_length_mean=metrics["rollout/response/len_mean"],
            repetition_truncated_share=metrics["rollout/finish/repetition_frac"],
            repeated_ngram_rate=ngram_rate,
        )

    def advantages(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards in {-1, +1} from correctness, DAPO's overlong shaping, group-relative advantages (Eq. 3)."""
        cfg = self.config
        lengths = batch.response_lens.to(torch.float32)
        rewards = binary_rewards(batch.correct)
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

    def plan(self, batch: StepBatch, advantages: torch.Tensor, version: int) -> UpdatePlan:
        """Mini-batches of whole groups, this rank's share of each, packed under the micro-batch token budget."""
        cfg = self.config.trainer
        policy = self.policy
        minibatches = split_minibatches(batch.num_sequences, self.group_size, cfg.num_minibatches)
        response_lengths = (batch.response_lens * batch.valid).tolist()  # dropped samples carry no loss tokens
        counted = (batch.response_lens > 0) & batch.valid
        shares = [shard_for_data_parallel(mb, self.group_size, policy.dp_rank, policy.dp_size) for mb in minibatches]
        return UpdatePlan(
            minibatches=minibatches,
            micro=[self._micro_batches(batch, share, advantages, version) for share in shares],
            token_counts=[sum(response_lengths[i] for i in mb) for mb in minibatches],
            sequence_counts=[int(counted[mb].sum()) for mb in minibatches],
        )

    def _deliver_routing(self, batch: StepBatch) -> StepBatch:
        """The engine's routing of this rank's sequences only (rank 0 holds the batch's)."""
        minibatches = split_minibatches(batch.num_sequences, self.group_size, self.config.trainer.num_minibatches)
        dp_size = self.policy.dp_size

        def trained_by(dp_rank: int) -> list[int]:
            return [i for mb in minibatches for i in shard_for_data_parallel(mb, self.group_size, dp_rank, dp_size)]

        shares = [trained_by(dp_rank) for dp_rank in self.dp_rank_of]
        num_experts = int(self.policy.hf_config.num_experts)
        return deliver_routing(batch, self.host, 0, shares, num_experts)

    def _micro_batches(
        self, batch: StepBatch, indices: Sequence[int], advantages: torch.Tensor, version: int
    ) -> list[MicroBatch]:
        """``indices`` as padded micro-batches carrying advantages, correctness, the engine's routing (replayed
        under R3, else compared with the trainer's own), with TIS the engine's log-probs and, with versioned
        rollouts, each token's version lag behind ``version``."""
        lengths = (batch.prompt_lens + batch.response_lens).tolist()
        routed = batch.routed_experts_per_sequence()
        behaviour = batch.rollout_logprobs_per_sequence() if self.config.algorithm.tis_cap is not None else None
        lags = batch.token_lags_per_sequence(version) if self.num_lags else None
        micro = []
        for chunk in pack_microbatches(indices, lengths, self.config.trainer.max_tokens_per_microbatch):
            built = build_microbatch(
                chunk, batch.prompts, batch.responses, pad_token_id=self.pad_token_id, advantages=advantages,
                routed_experts=routed, correct=batch.correct, rollout_logprobs=behaviour, token_lags=lags,
            )  # fmt: skip
            exclude_dropped(built, batch.valid)
            micro.append(built)
        return micro

    def old_logprobs(self, batch: StepBatch, plan: UpdatePlan, routing: RoutingCounts) -> PiOld:
        """pi_old of this rank's response tokens: the engine's (``trainer.old_logprobs=engine``), or one no-grad
        forward over every mini-batch but the first when that one captures its own (``first_update_on_policy``).
        ``routing`` accumulates this pass's router agreement."""
        if not self.recompute_old_logprobs:
            per_sequence = batch.rollout_logprobs_per_sequence()
            return {i: per_sequence[i] for micro in plan.micro for b in micro for i in b.indices}
        passes = plan.micro[1:] if self.first_update_on_policy else plan.micro
        micro = [b for minibatch in passes for b in minibatch]
        if not micro:
            return {}
        if self.share_prompts:  # each distinct prompt runs once per micro-batch
            chunks = [list(b.indices) for b in micro]
            return self.policy.shared_prompt_logprobs(chunks, batch.prompts, batch.responses)
        return self.policy.response_logprobs(micro, routing=routing)

    def update(self, plan: UpdatePlan, pi_old: PiOld, routing: RoutingCounts) -> dict[str, float]:
        """K optimizer updates, one per mini-batch; the on-policy first update captures its pi_old into ``pi_old``
        (and its router agreement into ``routing``: that forward is the pi_old pass of its sequences)."""
        cfg = self.config
        loss_config = self.loss_config
        results = []
        for index, micro in enumerate(plan.micro):
            capture = index == 0 and self.first_update_on_policy
            if not capture:
                micro = [with_old_logprobs(b, pi_old) for b in micro]
            result = self.policy.train_minibatch(
                micro, loss_config,
                num_global_tokens=plan.token_counts[index], num_global_sequences=plan.sequence_counts[index],
                old_logprobs="capture" if capture else "given", tis_cap=cfg.algorithm.tis_cap, routing=routing,
                num_lags=self.num_lags,
            )  # fmt: skip
            pi_old.update(result.captured_old_logprobs)
            results.append(result.metrics)
        metrics = {f"train/{k}": v for k, v in combine_minibatch_metrics(results, plan.token_counts).items()}
        metrics.update(lag_regime_metrics(metrics))
        metrics["train/grad_norm_max"] = max(m["grad_norm"] for m in results)
        return metrics

    def probe_logprobs(self, probe: ProbeBatch) -> list[torch.Tensor]:
        """The trainer's log-probs of the probe answers (temperature 1, as the engine scores), on every rank."""
        prompts = [list(seq[:n]) for seq, n in zip(probe.sequences, probe.prompt_lens or (), strict=True)]
        answers = [list(seq[n:]) for seq, n in zip(probe.sequences, probe.prompt_lens or (), strict=True)]
        micro = build_microbatch(range(len(prompts)), prompts, answers, pad_token_id=self.pad_token_id)
        values = self.policy.response_logprobs([micro], temperature=1.0)
        return [torch.as_tensor(values[i]) for i in range(len(prompts))]
