"""Where a step's rollouts come from and where new weights go: the one part of the loop that differs by placement.

- :class:`~megatron_dispo.trainer.colocated.ColocatedRollout`: an engine replica on every group of training ranks;
  the engines sleep while the trainer learns and are refitted in place after each update.
- :class:`~megatron_dispo.trainer.dedicated.DedicatedRollout`: the last ``rollout.num_ranks`` ranks of the job only
  generate; batches and weights cross the bridge, and with ``trainer.max_staleness=k`` both sides overlap.

The loop (``trainer/loop.py``) calls only this interface.
"""

from __future__ import annotations

from typing import Any, Protocol

from megatron_dispo.refit import ProbeBatch
from megatron_dispo.trainer.phases import PhaseTimer
from megatron_dispo.trainer.step_batch import StepBatch


class RolloutSource(Protocol):
    """The rollout side of the loop, seen from the training ranks (every training rank calls every method)."""

    probe: ProbeBatch
    """The refit self-check's probe batch (the engine side owns the data that makes it)."""

    def begin(self, start_step: int, state: dict[str, Any] | None) -> None:
        """Start generating at ``start_step``; ``state`` is the checkpoint's rollout state when resuming."""

    def initial_evaluation(self) -> dict[str, float] | None:
        """Held-out metrics of the starting weights now, or None when they arrive later as version 0's report."""

    def next_batch(self, step: int, timer: PhaseTimer) -> tuple[StepBatch, dict[str, float]]:
        """Batch ``step`` on every training rank, with its rollout metrics."""

    def batch_metrics(self, step: int, batch: StepBatch) -> dict[str, float]:
        """Placement-specific metrics of a trained batch (staleness)."""

    def publish_weights(self, version: int, *, learned: bool, evaluate: bool, force: bool = False) -> dict[str, float]:
        """Make the trainer's weights (``version`` updates done) reach the engines that need them, evaluating them
        on the held-out set when ``evaluate``; ``learned=False`` means the weights did not change. The metrics of
        this refit (and evaluation) now, or later through :meth:`reports`. ``force`` sends even a version no batch
        needs (the checkpoint's, on resume)."""

    def reports(self) -> dict[int, dict[str, float]]:
        """Metrics of versions that arrived since the last call (the same on every training rank)."""

    def awaiting(self, version: int) -> bool:
        """Whether metrics of ``version`` are still to come through :meth:`reports`."""

    def checkpoint_state(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint at ``step`` must hold to resume generating after it (on training rank 0): JSON-able
        state, plus under ``files`` any tensors (name -> content) to be saved beside it; :meth:`begin` gets both
        back (``state["files"]``)."""

    def close(self, *, failed: bool = False) -> None:
        """Stop the engines (and the rollout ranks); ``failed``: the loop raised, skip any handshake that could wait
        on the other side."""
