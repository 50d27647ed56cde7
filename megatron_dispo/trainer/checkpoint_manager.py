"""Run checkpoints: atomic step directories, keep-last-N, and everything needed to resume exactly.

Layout under ``<run_dir>/checkpoints``::

    step_000010/            a complete checkpoint (only complete ones ever carry this name)
        trainer_state.json  step, data position, dynamic-sampling cache, anything JSON-able
        rng_state.pt        python / numpy / torch RNG states of this rank
        <files>             rank 0's tensors too large for JSON, named in trainer_state.json (batches in flight)
        model/ ...          written by the caller (Megatron dist checkpoint of model + optimizer)
        COMPLETE            marker written last, inside the temp dir, before the rename
    latest                  text file with the newest complete step (a hint; the scan is the authority)

A save writes into ``.tmp_step_000010`` and renames it to ``step_000010`` only when everything, the marker
included, is on disk, so a process killed mid-save (SIGKILL, node failure) leaves at worst a temp dir that the next
start deletes, and resume picks the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
COMPLETE_MARKER = "COMPLETE"


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU, plus CUDA when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    trainer_state: dict[str, Any]


class CheckpointManager:
    """Atomic save / latest-complete load / retention for one run directory.

    ``rank`` decides who writes the shared files (rank 0) and whose RNG file is which; every rank calls ``save`` so
    collective model writers (Megatron ``dist_checkpointing``) run on all ranks inside ``write_model``.
    """

    def __init__(
        self, run_dir: str | Path, *, keep_last: int = 2, rank: int = 0, barrier: Callable[[], None] | None = None
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 so that a resumable checkpoint always exists.")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self._barrier = barrier or (lambda: None)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_dirs()
        self._barrier()

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:06d}"

    def _remove_stale_temp_dirs(self) -> None:
        for path in self.root.glob(".tmp_step_*"):
            shutil.rmtree(path, ignore_errors=True)

    def complete_steps(self) -> list[int]:
        """Steps that have a complete checkpoint, ascending."""
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        write_model: Callable[[Path], None] | None = None,
        files: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step`` atomically; ``write_model(dir)`` writes model/optimizer into ``dir``;
        ``files`` (rank 0's: name -> tensors) are ``torch.save``-d beside the trainer state (data too large for
        JSON, e.g. a dedicated run's batches in flight), and read back by :func:`load_files`."""
        final = self.root / self.step_dir_name(step)
        # One temp name that every rank can derive on its own: from the step.
        tmp = self.root / f".tmp_{self.step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(capture_rng_state(), tmp / f"rng_state_rank{self.rank}.pt")
        if write_model is not None:
            write_model(tmp / "model")
        self._barrier()
        if self.rank == 0:
            for name, content in (files or {}).items():
                torch.save(content, tmp / name)
            state_file = tmp / "trainer_state.json"
            state_file.write_text(json.dumps({"step": step, **trainer_state}, sort_keys=True), encoding="utf-8")
            _fsync_tree(tmp)
            (tmp / COMPLETE_MARKER).write_text(str(step), encoding="utf-8")
            _fsync_file(tmp / COMPLETE_MARKER)
            if final.exists():  # re-saving a step (e.g. after resume): replace only once the new one is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            (self.root / "latest.tmp").write_text(str(step), encoding="utf-8")
            os.replace(self.root / "latest.tmp", self.root / "latest")
            self._apply_retention()
        self._barrier()
        return final

    def _apply_retention(self) -> None:
        steps = self.complete_steps()
        for step in steps[: -self.keep_last]:
            shutil.rmtree(self.root / self.step_dir_name(step), ignore_errors=True)

    def load_latest(self, *, restore_rng: bool = True) -> LoadedCheckpoint | None:
        """The newest complete checkpoint (trainer state read, RNG restored), or None when there is none."""
        steps = self.complete_steps()
        if not steps:
            return None
        path = self.root / self.step_dir_name(steps[-1])
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if restore_rng:
            rng_file = path / f"rng_state_rank{self.rank}.pt"
            if not rng_file.is_file():
                raise FileNotFoundError(
                    f"{rng_file} is missing: the checkpoint was written by fewer ranks than this run has. "
                    "Resume with the same number of processes, or start a new run from its model (convert)."
                )
            restore_rng_state(torch.load(rng_file, weights_only=False))
        return LoadedCheckpoint(step=int(state["step"]), path=path, trainer_state=state)


def load_files(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """The ``files`` a checkpoint was saved with (tensors only: ``weights_only`` loading)."""
    return {name: torch.load(path / name, weights_only=True) for name in names}


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))
