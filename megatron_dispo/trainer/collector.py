"""The engine rank's side of a step: problems -> prompts -> engine samples -> verified groups; held-out evaluation.

One :class:`RolloutCollector` lives on the rank that hosts the rollout engine. It owns the training mixture, the
held-out set, the prompt rendering and the dynamic sampler, and talks to the engine only through ``generate``. Each
call returns its own results and timings; nothing is carried between calls in instance fields except the data order
(mixture position, leftover groups) that a checkpoint must restore.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_dispo.config import Config
from megatron_dispo.data.problem import Problem
from megatron_dispo.data.templates import encode_prompt
from megatron_dispo.rewards import OutcomeCounts, outcome_fractions, screen_verifier_failures, verify_batch
from megatron_dispo.trainer.data_setup import build_mixture, load_heldout
from megatron_dispo.trainer.rollout_phase import DynamicSampler, GroupRollout
from megatron_dispo.trainer.step_batch import StepBatch

logger = logging.getLogger(__name__)

PROBE_SIZE = 4
"""Sequences in the refit self-check's probe batch."""


@dataclass
class RoundCosts:
    """What the sampling rounds of one step cost; filled by the rounds, read once at the end of the step."""

    tokens: float = 0.0
    engine_seconds: float = 0.0
    reward_seconds: float = 0.0
    engine_stats: list[dict[str, float]] = field(default_factory=list)
    outcomes: OutcomeCounts = field(default_factory=OutcomeCounts)
    """Verifier outcomes of every sampled response (all rounds), before filtering."""

    def metrics(self, skipped_long_prompts: int) -> dict[str, float]:
        """Throughput, per-replica work, verification time and outcome fractions of the step's rounds."""
        tokens = sum(s.get("rollout/tokens", 0.0) for s in self.engine_stats)
        seconds = sum(s.get("rollout/seconds", 0.0) for s in self.engine_stats)
        metrics = {"perf/rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
        metrics.update(replica_metrics(self.engine_stats))
        metrics["perf/time/reward_s"] = self.reward_seconds
        metrics["rollout/skipped_long_prompts"] = float(skipped_long_prompts)
        metrics.update(outcome_fractions(self.outcomes))
        return metrics


def round_seed(config: Config, step: int, round_index: int) -> int:
    """One sampling seed per (run seed, step, round): resumed runs draw exactly the samples of uninterrupted ones."""
    return config.trainer.seed * 1_000_003 + step * 1_009 + round_index


class RolloutCollector:
    """Fills each step's batch of informative prompt groups from the engine (DAPO dynamic sampling)."""

    def __init__(self, config: Config, engine: Any, tokenizer: Any) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.group_size = config.algorithm.group_size
        self.mixture = build_mixture(config.data)
        self.heldout = load_heldout(config.data, config.eval.max_problems)
        self.sampler = DynamicSampler(config.algorithm.dynamic_sampling, self.group_size)
        self.skipped_long_prompts = 0
        self._heldout_prompts: list[tuple[Problem, list[int]]] | None = None

    # ------------------------------------------------------------------ prompts
    def encode(self, problem: Problem) -> list[int] | None:
        """The prompt's token ids, or None when it is longer than ``data.max_prompt_tokens`` (never truncated)."""
        data = self.config.data
        ids = (
            encode_prompt(problem.problem, data.template, self.tokenizer)
            if data.use_chat_template
            else self.tokenizer.encode(problem.problem)
        )
        return ids if len(ids) <= data.max_prompt_tokens else None

    def next_prompts(self, count: int) -> list[tuple[Problem, list[int]]]:
        """The next ``count`` problems of the mixture that fit, each tokenised once."""
        out: list[tuple[Problem, list[int]]] = []
        while len(out) < count:
            problem = next(self.mixture)
            ids = self.encode(problem)
            if ids is None:
                self.skipped_long_prompts += 1
                continue
            out.append((problem, ids))
        return out

    def probe_sequences(self) -> tuple[list[tuple[int, ...]], list[int]]:
        """Fixed probe sequences for the refit self-check: held-out (or training) prompts + their gold answer line."""
        first_source = self.mixture.sources[0].problems
        source = self.heldout or [first_source[i] for i in range(min(PROBE_SIZE, len(first_source)))]
        sequences, prompt_lens = [], []
        for problem in source[:PROBE_SIZE]:
            prompt = self.encode(problem) or self.tokenizer.encode(problem.problem)[:8]
            answer = self.tokenizer.encode(f"Answer: {problem.answer}", add_special_tokens=False)
            sequences.append(tuple(prompt + answer))
            prompt_lens.append(len(prompt))
        return sequences, prompt_lens

    # ------------------------------------------------------------------ one step's groups
    def _sample_round(
        self, prompts: Sequence[tuple[Problem, list[int]]], seed: int, costs: RoundCosts
    ) -> list[GroupRollout]:
        """G samples for each prompt, verified, as groups."""
        prompt_ids = [ids for _, ids in prompts]
        batch = self.engine.generate(prompt_ids, self.group_size, seed=seed)
        golds = [prompts[g][0].answer for g in batch.group_index]
        started = time.perf_counter()
        results = self.verify(batch.texts, golds)
        costs.reward_seconds += time.perf_counter() - started
        costs.engine_stats.append(batch.stats)
        costs.outcomes += OutcomeCounts.from_results(results)
        groups = []
        size = self.group_size
        for p, (problem, ids) in enumerate(prompts):
            rows = range(p * size, (p + 1) * size)
            outcomes = ["repetition" if batch.finish_reason[i] == "repetition" else results[i].outcome for i in rows]
            groups.append(
                GroupRollout(
                    problem_id=problem.id,
                    answer=problem.answer,
                    prompt_ids=list(ids),
                    response_ids=[list(batch.response_ids[i]) for i in rows],
                    rollout_logprobs=[list(batch.response_logprobs[i]) for i in rows],
                    finish_reasons=[batch.finish_reason[i] for i in rows],
                    correct=[outcome == "correct" for outcome in outcomes],
                    outcomes=outcomes,
                    texts=[batch.texts[i] for i in rows],
                    routed_experts=None if batch.routed_experts is None else [batch.routed_experts[i] for i in rows],
                )
            )
        return groups

    def verify(self, texts: list[str], golds: list[str]) -> list[Any]:
        reward = self.config.reward
        return verify_batch(
            texts, golds, answer_format=self.config.data.answer_format, timeout_s=reward.verify_timeout_s
        )

    def collect(self, step: int, *, granularity: int) -> tuple[list[GroupRollout], dict[str, float]]:
        """This step's groups (a multiple of ``granularity``) and the rollout metrics of getting them."""
        cfg = self.config
        costs = RoundCosts()
        rounds = itertools.count()

        def sample(problems: Sequence[tuple[Problem, list[int]]]) -> list[GroupRollout]:
            return self._sample_round(problems, round_seed(cfg, step, next(rounds)), costs)

        groups, stats = self.sampler.collect(
            cfg.trainer.prompts_per_step, self.next_prompts, sample, granularity=granularity
        )
        return groups, {**stats.metrics(), **costs.metrics(self.skipped_long_prompts)}

    def to_step_batch(self, groups: Sequence[GroupRollout], step: int) -> StepBatch:
        """The kept groups as the step's tensors; ``reward.on_verifier_failure`` decides which samples stay valid."""
        outcomes = [o for g in groups for o in g.outcomes]
        screen = screen_verifier_failures(outcomes, self.config.reward)
        if screen.warning is not None:
            logger.warning("step %d: %s", step, screen.warning)
        size = self.group_size
        partial = bool(groups) and all(g.token_versions is not None for g in groups)
        return StepBatch.from_sequences(
            prompts=[g.prompt_ids for g in groups for _ in range(size)],
            responses=[r for g in groups for r in g.response_ids],
            rollout_logprobs=[lp for g in groups for lp in g.rollout_logprobs],
            correct=[c for g in groups for c in g.correct],
            finish_reasons=[f for g in groups for f in g.finish_reasons],
            valid=screen.valid,
            routed_experts=_routed_experts(groups),
            token_versions=[v for g in groups for v in g.token_versions or ()] if partial else None,
            start_versions=[v for g in groups for v in g.start_versions or ()] if partial else None,
        )

    # ------------------------------------------------------------------ held-out evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of ``eval.n`` samples per problem under the engine's current weights."""
        if not self.heldout:
            return {}
        cfg = self.config.eval
        if self._heldout_prompts is None:
            encoded = ((p, self.encode(p)) for p in self.heldout)
            self._heldout_prompts = [(p, ids) for p, ids in encoded if ids is not None]
        kept = self._heldout_prompts
        batch = self.engine.generate(
            [ids for _, ids in kept], cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, seed=self.config.trainer.seed
        )
        golds = [kept[g][0].answer for g in batch.group_index]
        results = self.verify(batch.texts, golds)
        return {
            "eval/heldout/accuracy": sum(r.correct for r in results) / max(len(results), 1),
            "eval/heldout/len_mean": sum(batch.response_lengths) / max(len(results), 1),
            "eval/heldout/num_problems": float(len(kept)),
            **outcome_fractions(results, prefix="eval/heldout/verify/"),
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.mixture.state_dict(),
            "sampler": self.sampler.state_dict(),
            "skipped_long_prompts": self.skipped_long_prompts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mixture") is not None:
            self.mixture.load_state_dict(state["mixture"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped_long_prompts = int(state.get("skipped_long_prompts", 0))


def _routed_experts(groups: Sequence[GroupRollout]) -> list[Any] | None:
    """Every response's engine routing in batch order, or None when the engine captured none."""
    if not groups or any(group.routed_experts is None for group in groups):
        return None
    return [rows for group in groups for rows in group.routed_experts or ()]


def replica_metrics(engine_stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-replica tokens and seconds summed over the step's sampling rounds, and the step's load imbalance
    (slowest / mean replica seconds): ``rollout/replicas``, ``rollout/replica{i}/{tokens,seconds}``."""
    out: dict[str, float] = {}
    for stats in engine_stats:
        for key, value in stats.items():
            if key.startswith("rollout/replica") and key.endswith(("/tokens", "/seconds")):
                out[key] = out.get(key, 0.0) + value
            elif key == "rollout/replicas":
                out[key] = value
    seconds = [v for k, v in out.items() if k.endswith("/seconds")]
    if seconds and sum(seconds) > 0:
        out["rollout/replica_imbalance"] = max(seconds) / (sum(seconds) / len(seconds))
    return out
