"""The safetensors files of an HF checkpoint folder: which files hold the weights, names and shapes, sliced reads.

A leaf of the package (see tests/test_layering.py): the model loader (``models/``), the rollout engine (``rollout/``)
and the refit (``refit/``) all read checkpoint headers, and ``rollout/`` may not import ``models/``, so the one reader
lives here and imports nothing from the package. Sharded checkpoints (``save_pretrained(max_shard_size=...)``) are
read through ``model.safetensors.index.json``: exactly the files it names, so a stray ``*.safetensors`` beside them
(an older export) is never mixed in.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safetensors import safe_open

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["INDEX_FILE", "HFCheckpointReader", "checkpoint_shapes", "safetensors_files"]

INDEX_FILE = "model.safetensors.index.json"
"""Index of a sharded checkpoint: ``weight_map`` maps each tensor name to the shard file that holds it."""


class SliceLike(Protocol):
    """Rows (dim 0) or columns (dim 1) ``start:stop`` of a tensor, or all of it (dim None)."""

    @property
    def dim(self) -> int | None: ...
    @property
    def start(self) -> int: ...
    @property
    def stop(self) -> int: ...


def safetensors_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of ``hf_dir``: the shards its index names, else every ``*.safetensors`` file (sorted)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({hf_dir / file_name for file_name in weight_map.values()})
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {hf_dir}.")
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}; pass an HF checkpoint directory.")
    return files


class HFCheckpointReader:
    """Header and sliced reads of an HF safetensors checkpoint; a context manager that keeps the files open."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        try:
            for file in safetensors_files(self.hf_dir):
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name in self._handles:
                        raise ValueError(f"tensor {name!r} appears in more than one file of {self.hf_dir}.")
                    self._handles[name] = handle
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        """All tensor names in the checkpoint."""
        return set(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of ``name`` without reading it."""
        return tuple(self._handles[name].get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape (headers only, no data read)."""
        return {name: self.shape(name) for name in self._handles}

    def read(self, name: str, spec: SliceLike) -> Tensor:
        """Only the rows/columns ``spec`` of ``name`` (safetensors reads just that byte range for row slices)."""
        view = self._handles[name].get_slice(name)
        if spec.dim is None:
            return view[:]
        if spec.dim == 0:
            return view[spec.start : spec.stop]
        if spec.dim == 1:
            return view[:, spec.start : spec.stop]
        raise ValueError(f"slice dim={spec.dim} of {name} is not supported (0 or 1).")


def checkpoint_shapes(hf_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of the checkpoint in ``hf_dir`` (headers only, no data read)."""
    with HFCheckpointReader(hf_dir) as reader:
        return reader.shapes()
