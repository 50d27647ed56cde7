"""Partial rollouts on the rollout ranks (issue 26): responses advance in chunks and a batch never waits for its tail.

Without them, a batch is done when its longest response is: the engine decodes the last few sequences nearly idle
while the trainer waits. Here the driver keeps a pool of prompt groups in flight and advances every running response
by ``rollout.chunk_tokens`` per round (one ``generate`` over all of them, the prompt plus the response so far as
context, so the engine runs a full batch). A group whose responses have all ended is verified and passes dynamic
sampling on its own (kept when mixed); the batch is cut as soon as it holds its groups. The responses still running
stay in the pool and continue under the next batch's weights (slime's and AReaL's partial rollouts): each token
records the version that sampled it and its engine log-prob, so TIS and the loss see per-token behaviour policies.

The oldest token of batch s must be at most ``trainer.max_staleness = k`` versions behind the trainer's s-1. The
rollout ranks collect batch s under version ``s - k`` (:func:`.dedicated.batches_ahead`: one batch less ahead than
without partial rollouts), so a response carried over one cut has tokens of version ``s - 1 - k``, the oldest allowed;
one that would be carried over two cuts is restarted (its tokens dropped). Every choice depends on the pool at the
cut, never on timing, and the pool is part of the checkpoint state: a resumed run continues exactly.

A chunk's repetition detector sees that chunk's tokens only (the earlier ones are context), so a loop that starts
before a chunk boundary is caught within the next chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_dispo.config import Config
from megatron_dispo.rewards import OutcomeCounts
from megatron_dispo.trainer.collector import RolloutCollector, RoundCosts, round_seed
from megatron_dispo.trainer.rollout_phase import GroupRollout, RolloutPhaseStats
from megatron_dispo.trainer.step_batch import StepBatch


@dataclass
class _Response:
    """One response in progress: its tokens so far, their engine log-probs and sampling versions."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    start_version: int = -1
    """The version of its first chunk (-1: not started)."""
    started_for: int = 0
    """The step whose batch was being collected when its first chunk was sampled."""
    finish: str | None = None
    """stop | length | repetition once ended; None while running."""

    def restart(self) -> None:
        self.ids, self.logprobs, self.versions, self.start_version, self.finish = [], [], [], -1, None


@dataclass
class _Group:
    problem_id: str
    answer: str
    prompt_ids: list[int]
    responses: list[_Response]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Group:
        return cls(**{**state, "responses": [_Response(**r) for r in state["responses"]]})


class PartialRollouts:
    """The rollout driver's collector with partial rollouts: ``collect`` / ``to_step_batch`` / ``evaluate`` and
    the checkpoint state of :class:`.RolloutCollector`, plus the pool of groups in flight."""

    def __init__(self, collector: RolloutCollector, config: Config, current_version: Callable[[], int]) -> None:
        self.collector = collector
        self.config = config
        self.current_version = current_version
        self.heldout = collector.heldout
        self.pool: list[_Group] = []
        self.carry: list[GroupRollout] = []
        """Kept groups that ended in the round that cut the previous batch, beyond its size."""
        sampling = config.algorithm.dynamic_sampling
        factor = sampling.oversample_factor if sampling.enabled else 1.0
        self.pool_groups = math.ceil(config.trainer.prompts_per_step * factor)
        """Groups kept in flight: the batch's size, times dynamic sampling's over-sampling."""
        self.max_rounds = sampling.max_rounds * (config.rollout.max_new_tokens // config.rollout.chunk_tokens)

    # ------------------------------------------------------------------ the collector's interface
    def probe_sequences(self) -> tuple[list[tuple[int, ...]], list[int]]:
        return self.collector.probe_sequences()

    def evaluate(self) -> dict[str, float]:
        return self.collector.evaluate()

    def to_step_batch(self, groups: list[GroupRollout], step: int) -> StepBatch:
        return self.collector.to_step_batch(groups, step)

    def collect(self, step: int, *, granularity: int) -> tuple[list[GroupRollout], dict[str, float]]:
        """Batch ``step``'s groups (a multiple of ``granularity``): the carried groups still fresh enough, then
        groups as they end, round by round, until the batch is full (or ``max_rounds``)."""
        oldest_allowed = step - 1 - self.config.trainer.max_staleness
        target = self.config.trainer.prompts_per_step
        stats, costs = RolloutPhaseStats(), RoundCosts()
        batch = [g for g in self.carry if min(g.start_versions or [0]) >= oldest_allowed]
        stale_groups = len(self.carry) - len(batch)
        stats.from_cache, self.carry = len(batch), []
        restarted = self._restart_stale(oldest_allowed)
        while len(batch) < target and stats.rounds < self.max_rounds:
            self._fill_pool()
            ended = self._advance(step, stats.rounds, costs)
            stats.rounds += 1
            batch.extend(self.collector.sampler.keep(self._verified(ended, step, costs), stats))
        batch, self.carry = batch[:target], batch[target:]
        usable = len(batch) - len(batch) % granularity
        batch, self.carry = batch[:usable], batch[usable:] + self.carry
        stats.kept_groups = len(batch)
        metrics = self._metrics(batch, stats, costs)
        metrics["rollout/partial/restarted"] = float(restarted)
        metrics["rollout/partial/stale_groups_dropped"] = float(stale_groups)
        return batch, metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.collector.state_dict(),
            "partial_pool": [asdict(group) for group in self.pool],
            "partial_carry": [group.to_state() for group in self.carry],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collector.load_state_dict(state)
        self.pool = [_Group.from_state(group) for group in state.get("partial_pool", [])]
        self.carry = [GroupRollout.from_state(group) for group in state.get("partial_carry", [])]

    # ------------------------------------------------------------------ rounds
    def _restart_stale(self, oldest_allowed: int) -> int:
        """Drop the tokens of responses that would be too old for this batch; how many were restarted."""
        stale = [r for g in self.pool for r in g.responses if 0 <= r.start_version < oldest_allowed]
        for response in stale:
            response.restart()
        return len(stale)

    def _fill_pool(self) -> None:
        missing = self.pool_groups - len(self.pool)
        if missing <= 0:
            return
        size = self.config.algorithm.group_size
        for problem, ids in self.collector.next_prompts(missing):
            self.pool.append(_Group(problem.id, problem.answer, list(ids), [_Response() for _ in range(size)]))

    def _advance(self, step: int, round_index: int, costs: RoundCosts) -> list[_Group]:
        """One chunk for every running response (one engine call); the groups that have ended, in pool order."""
        running = [r for g in self.pool for r in g.responses if r.finish is None]
        contexts = [g.prompt_ids + r.ids for g in self.pool for r in g.responses if r.finish is None]
        cfg = self.config
        seed = round_seed(cfg, step, round_index)
        out = self.collector.engine.generate(contexts, 1, seed=seed, max_new_tokens=cfg.rollout.chunk_tokens)
        costs.engine_stats.append(out.stats)
        version = self.current_version()
        for response, ids, logprobs, reason in zip(
            running, out.response_ids, out.response_logprobs, out.finish_reason, strict=True
        ):
            if response.start_version < 0:
                response.start_version, response.started_for = version, step
            response.ids += ids
            response.logprobs += logprobs
            response.versions += [version] * len(ids)
            if reason != "length" or len(response.ids) >= cfg.rollout.max_new_tokens:
                response.finish = reason
        ended = [g for g in self.pool if all(r.finish is not None for r in g.responses)]
        self.pool = [g for g in self.pool if any(r.finish is None for r in g.responses)]
        return ended

    def _verified(self, groups: list[_Group], step: int, costs: RoundCosts) -> list[GroupRollout]:
        """Ended groups, verified, as :class:`GroupRollout` with their per-token versions."""
        responses = [r for g in groups for r in g.responses]
        texts = self.collector.tokenizer.batch_decode([r.ids for r in responses], skip_special_tokens=True)
        golds = [g.answer for g in groups for _ in g.responses]
        started = time.perf_counter()
        results = self.collector.verify(texts, golds) if responses else []
        costs.reward_seconds += time.perf_counter() - started
        costs.outcomes += OutcomeCounts.from_results(results)
        out, row = [], 0
        for group in groups:
            rows = range(row, row + len(group.responses))
            row += len(group.responses)
            rs = group.responses
            outcomes = [
                "repetition" if r.finish == "repetition" else results[i].outcome for i, r in zip(rows, rs, strict=True)
            ]
            out.append(
                GroupRollout(
                    problem_id=group.problem_id,
                    answer=group.answer,
                    prompt_ids=group.prompt_ids,
                    response_ids=[r.ids for r in rs],
                    rollout_logprobs=[r.logprobs for r in rs],
                    finish_reasons=[str(r.finish) for r in rs],
                    correct=[outcome == "correct" for outcome in outcomes],
                    outcomes=outcomes,
                    texts=[texts[i] for i in rows],
                    token_versions=[r.versions for r in rs],
                    start_versions=[r.start_version for r in rs],
                    carried=[r.started_for < step for r in rs],
                )
            )
        return out

    def _metrics(self, batch: list[GroupRollout], stats: RolloutPhaseStats, costs: RoundCosts) -> dict[str, float]:
        metrics = {**stats.metrics(), **costs.metrics(self.collector.skipped_long_prompts)}
        carried = [c for g in batch for c in g.carried or ()]
        metrics["rollout/partial/share"] = sum(carried) / max(len(carried), 1)
        metrics["rollout/partial/in_flight_groups"] = float(len(self.pool))
        metrics["rollout/partial/chunk_tokens"] = float(self.config.rollout.chunk_tokens)
        return metrics
