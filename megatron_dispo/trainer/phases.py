"""Wall time and (on CUDA) peak allocated memory of each phase of a step: ``perf/time/<phase>_s``,
``perf/memory/<phase>_peak_gib``.

The memory figure is what shows the colocated engine's handoff working: with the engine asleep during the log-prob
and update phases, their peaks hold the trainer's tensors only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

_GIB = float(1 << 30)


class PhaseTimer:
    """Collects one step's phase timings; a phase that runs twice adds up."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._cuda = torch.cuda.is_available()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"perf/time/{name}_s"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - started
            if self._cuda:
                peak_key = f"perf/memory/{name}_peak_gib"
                peak = torch.cuda.max_memory_allocated() / _GIB
                self.metrics[peak_key] = max(self.metrics.get(peak_key, 0.0), peak)
