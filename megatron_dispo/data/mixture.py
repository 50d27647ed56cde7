"""A weighted, deterministic, resumable stream of training problems drawn from several sources.

Step k picks a source with probability proportional to its weight, using an RNG seeded by (seed, k); each source
is walked through a per-epoch permutation seeded by (seed, source, epoch). So the whole stream is a pure function
of the seed, and the state needed to resume is just the step count and each source's (epoch, position).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_dispo.data.problem import Problem


@dataclass(frozen=True)
class MixtureSource:
    """One source of the mixture: its problems and its sampling weight."""

    name: str
    problems: Sequence[Problem]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("MixtureSource.name must be a non-empty string.")
        if len(self.problems) == 0:
            raise ValueError(f"MixtureSource {self.name!r} has no problems; drop it or fix its loader.")
        if not self.weight > 0:
            raise ValueError(f"MixtureSource {self.name!r}: weight={self.weight} must be > 0.")


class ProblemMixture:
    """Infinite iterator of problems; `state_dict`/`load_state_dict` resume it exactly."""

    def __init__(self, sources: Sequence[MixtureSource], seed: int = 0) -> None:
        if not sources:
            raise ValueError("ProblemMixture needs at least one MixtureSource.")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"MixtureSource names must be unique, got {names}.")
        self.sources = list(sources)
        self.seed = seed
        total = sum(source.weight for source in sources)
        self._cumulative = list(itertools.accumulate(source.weight / total for source in sources))
        self.step = 0
        self._cursors: dict[str, list[int]] = {name: [0, 0] for name in names}  # name -> [epoch, position]
        self._orders: dict[str, tuple[int, list[int]]] = {}

    def _order(self, source: MixtureSource, epoch: int) -> list[int]:
        cached = self._orders.get(source.name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = list(range(len(source.problems)))
        random.Random(f"mixture:{self.seed}:{source.name}:{epoch}").shuffle(order)
        self._orders[source.name] = (epoch, order)
        return order

    def _pick_source(self, step: int) -> MixtureSource:
        draw = random.Random(f"mixture:{self.seed}:pick:{step}").random()
        index = min(bisect.bisect_right(self._cumulative, draw), len(self.sources) - 1)
        return self.sources[index]

    def __iter__(self) -> Iterator[Problem]:
        return self

    def __next__(self) -> Problem:
        source = self._pick_source(self.step)
        cursor = self._cursors[source.name]
        problem = source.problems[self._order(source, cursor[0])[cursor[1]]]
        cursor[1] += 1
        if cursor[1] == len(source.problems):
            cursor[0] += 1
            cursor[1] = 0
        self.step += 1
        return problem

    def take(self, count: int) -> list[Problem]:
        """The next `count` problems."""
        return [next(self) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream."""
        return {
            "seed": self.seed,
            "step": self.step,
            "cursors": {name: list(cursor) for name, cursor in self._cursors.items()},
            "sizes": {source.name: len(source.problems) for source in self.sources},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the sources (names and sizes) and the seed must be the same."""
        sizes = {source.name: len(source.problems) for source in self.sources}
        if state.get("seed") != self.seed:
            raise ValueError(f"state seed={state.get('seed')} != mixture seed={self.seed}; build with the same seed.")
        if state.get("sizes") != sizes:
            raise ValueError(
                f"state sources {state.get('sizes')} != mixture sources {sizes}: resuming needs the same sources."
            )
        self.step = int(state["step"])
        self._cursors = {name: [int(epoch), int(position)] for name, (epoch, position) in state["cursors"].items()}
