"""Keep an in-process vLLM engine out of the trainer's torch.distributed world.

vLLM builds its own parallel groups over torch.distributed's *default* group: inside rank 0 of a multi-rank trainer
world (torchrun + gloo/NCCL for Megatron) its ``new_group`` calls are collectives that wait for every rank, so the
engine hangs at start-up; and its clean-up destroys the default group, i.e. the trainer's. While this context is
active the default group is set aside: vLLM creates (and later destroys) a private 1-rank world of its own, and the
trainer's world is put back untouched. Every engine construction and tear-down goes through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist


class DefaultGroupGuard:
    """One per engine: runs its vLLM start-up / clean-up outside the trainer's world (see the module docstring).

    It remembers whether the current default group is the one this engine's vLLM created itself (no trainer world
    existed): vLLM's clean-up may destroy that one, never the trainer's.
    """

    def __init__(self) -> None:
        self._engine_owned: object | None = None
        """The default group this engine's vLLM created (no trainer world existed); vLLM's clean-up destroys it."""

    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Run vLLM start-up / clean-up as if torch.distributed were not initialised; restore the trainer's world after.

        Start-up: vLLM initialises a private 1-rank default world and builds its groups on it; afterwards the trainer's
        world is the default again (vLLM's groups keep their own handles). Clean-up: with no default group vLLM
        destroys its groups but skips ``destroy_process_group()``, which would tear down every group, the trainer's
        included. Without a trainer world, vLLM owns the default group outright and destroys it itself.
        """
        from torch.distributed import distributed_c10d as c10d

        current = c10d._world.default_pg if dist.is_initialized() else None
        if current is None or current is self._engine_owned:
            try:
                yield
            finally:
                self._engine_owned = c10d._world.default_pg if dist.is_initialized() else None
            return
        c10d._world.default_pg = None
        try:
            yield
        finally:
            c10d._world.default_pg = current
