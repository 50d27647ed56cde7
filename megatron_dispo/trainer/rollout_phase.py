"""Rollout phase of a step: sample G responses per prompt, score them, and fill the batch with informative groups.

DAPO dynamic sampling (arXiv 2503.14476, Sec. 3.2): a group whose responses are all correct or all wrong has zero
advantage for every response, so it only dilutes the batch. We over-sample, keep mixed groups, and sample again until
the batch is full or ``max_rounds`` is reached. Kept groups beyond the batch are cached and used first next step
(their pi_old is recomputed by the trainer at that step, so staleness only affects which prompts are seen, not the
importance weights). The cache is part of the checkpoint, so resume continues exactly.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from megatron_dispo.algorithms.filters import filter_mixed_groups
from megatron_dispo.data.problem import Problem
from megatron_dispo.trainer.config import DynamicSamplingConfig


@dataclass
class GroupRollout:
    """One prompt's G responses with their verifier results; JSON-serialisable for the leftover cache."""

    problem_id: str
    answer: str
    prompt_ids: list[int]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]
    """Per-token log-probs of the sampled tokens under the engine's sampling distribution."""
    finish_reasons: list[str]
    """stop | length | repetition"""
    correct: list[bool]
    """Raw outcome: verified correct and not repetition-truncated."""
    outcomes: list[str]
    """Verifier outcome per response (correct, incorrect, no_answer, timeout, error, repetition)."""
    texts: list[str] = field(default_factory=list)
    routed_experts: list[torch.Tensor] | None = None
    """MoE routing replay: per response, the engine's int16 ``[prompt + response - 1, layers, k]`` routing."""
    token_versions: list[list[int]] | None = None
    """Partial rollouts: per response, the policy version that sampled each token (None: one version per batch)."""
    start_versions: list[int] | None = None
    """Partial rollouts: per response, the version of its first chunk (its oldest token's)."""
    carried: list[bool] | None = None
    """Partial rollouts: per response, whether it was still running when an earlier batch was cut."""

    def to_state(self) -> dict[str, Any]:
        """JSON-able form (the routing as base64 int16 bytes with its shape)."""
        state = asdict(self)
        if self.routed_experts is not None:
            state["routed_experts"] = [_encode_int16(rows) for rows in self.routed_experts]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GroupRollout:
        routed = state.get("routed_experts")
        return cls(**{**state, "routed_experts": None if routed is None else [_decode_int16(r) for r in routed]})

    @property
    def group_size(self) -> int:
        return len(self.response_ids)

    @property
    def is_mixed(self) -> bool:
        return any(self.correct) and not all(self.correct)


@dataclass
class RolloutPhaseStats:
    rounds: int = 0
    sampled_groups: int = 0
    kept_groups: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0
    from_cache: int = 0
    sampled_correct: int = 0
    sampled_responses: int = 0

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/dynamic_sampling/rounds": float(self.rounds),
            "rollout/dynamic_sampling/sampled_groups": float(self.sampled_groups),
            "rollout/dynamic_sampling/kept_groups": float(self.kept_groups),
            "rollout/dynamic_sampling/dropped_all_correct": float(self.dropped_all_correct),
            "rollout/dynamic_sampling/dropped_all_wrong": float(self.dropped_all_wrong),
            "rollout/dynamic_sampling/from_cache": float(self.from_cache),
            # accuracy over everything sampled this step, before filtering: the policy's own success rate
            "rollout/accuracy": self.sampled_correct / max(self.sampled_responses, 1),
        }


class DynamicSampler:
    """Fills a batch of ``target_groups`` groups; ``state_dict`` carries the leftover cache across a resume."""

    def __init__(self, config: DynamicSamplingConfig, group_size: int) -> None:
        if group_size < 2:
            raise ValueError(f"group_size={group_size} must be >= 2: group-relative advantages need 2+ responses.")
        self.config = config
        self.group_size = group_size
        self.cache: list[GroupRollout] = []

    def keep(self, groups: Sequence[GroupRollout], stats: RolloutPhaseStats) -> list[GroupRollout]:
        """The sampled ``groups`` that enter a batch, counted into ``stats``: the mixed ones (all when dynamic
        sampling is off). Partial rollouts call it group by group as groups end."""
        stats.sampled_groups += len(groups)
        for group in groups:
            if group.group_size != self.group_size:
                raise ValueError(f"a group has {group.group_size} responses; expected group_size={self.group_size}.")
            stats.sampled_correct += sum(group.correct)
            stats.sampled_responses += group.group_size
        if not self.config.enabled or not groups:
            return list(groups)
        result = filter_mixed_groups(
            torch.tensor([c for g in groups for c in g.correct], dtype=torch.bool), self.group_size
        )
        stats.dropped_all_correct += result.num_dropped_all_correct
        stats.dropped_all_wrong += result.num_dropped_all_wrong
        return [groups[i] for i in result.kept_groups.tolist()]

    def collect(
        self,
        target_groups: int,
        next_problems: Callable[[int], Sequence[Problem]],
        sample_groups: Callable[[Sequence[Problem]], list[GroupRollout]],
        *,
        granularity: int = 1,
    ) -> tuple[list[GroupRollout], RolloutPhaseStats]:
        """Return up to ``target_groups`` groups (a multiple of ``granularity``) and what it took to get them."""
        stats = RolloutPhaseStats()
        batch: list[GroupRollout] = []
        if self.config.enabled and self.cache:
            batch, self.cache = self.cache[:target_groups], self.cache[target_groups:]
            stats.from_cache = len(batch)
        while len(batch) < target_groups and stats.rounds < self.config.max_rounds:
            missing = target_groups - len(batch)
            factor = self.config.oversample_factor if self.config.enabled else 1.0
            groups = sample_groups(next_problems(math.ceil(missing * factor)))
            stats.rounds += 1
            batch.extend(self.keep(groups, stats))
            if not self.config.enabled:
                break
        if len(batch) > target_groups:
            leftovers = batch[target_groups:]
            batch = batch[:target_groups]
            if self.config.enabled and self.config.max_cached_groups:
                self.cache = (self.cache + leftovers)[-self.config.max_cached_groups :]
        usable = len(batch) - len(batch) % granularity
        if usable < len(batch) and self.config.enabled and self.config.max_cached_groups:
            self.cache = (batch[usable:] + self.cache)[: self.config.max_cached_groups]
        batch = batch[:usable]
        stats.kept_groups = len(batch)
        return batch, stats

    def state_dict(self) -> dict[str, Any]:
        return {"cache": [group.to_state() for group in self.cache]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = [GroupRollout.from_state(group) for group in state.get("cache", [])]


def _encode_int16(tensor: torch.Tensor) -> dict[str, Any]:
    data = tensor.to(torch.int16).contiguous().numpy().tobytes()
    return {"shape": list(tensor.shape), "int16_base64": base64.b64encode(data).decode("ascii")}


def _decode_int16(state: dict[str, Any]) -> torch.Tensor:
    data = bytearray(base64.b64decode(state["int16_base64"]))
    return torch.frombuffer(data, dtype=torch.int16).reshape(state["shape"]).clone()
