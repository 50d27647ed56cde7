"""megatron_dispo.hf_checkpoint: the one reader of HF safetensors checkpoints (model loader, engine, refit).

Reference: the checkpoint as HF transformers writes it, once whole and once sharded by
``save_pretrained(max_shard_size=...)`` (shards + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dispo.hf_checkpoint import INDEX_FILE, HFCheckpointReader, checkpoint_shapes, safetensors_files
from megatron_dispo.models.mapping import SliceSpec
from megatron_dispo.models.tiny import make_tiny_checkpoint

NUM_GPUS = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(whole, sharded) folders of one tiny Qwen3; the sharded one has a stray old file that the index does not name."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf_checkpoint")
    whole = make_tiny_checkpoint(root / "whole", seed=3)
    sharded = root / "sharded"
    AutoModelForCausalLM.from_pretrained(str(whole), dtype=torch.float32).save_pretrained(
        str(sharded), max_shard_size="200KB"
    )
    save_file({"stale.weight": torch.zeros(2, 2)}, str(sharded / "old-export.safetensors"))
    return whole, sharded


def test_sharded_checkpoint_reads_exactly_the_indexed_shards(checkpoints: tuple[Path, Path]) -> None:
    whole, sharded = checkpoints
    files = safetensors_files(sharded)
    assert len(files) > 2 and (sharded / INDEX_FILE).is_file()
    assert sharded / "old-export.safetensors" not in files
    reference = {name: tuple(tensor.shape) for name, tensor in load_file(str(whole / "model.safetensors")).items()}
    assert checkpoint_shapes(sharded) == checkpoint_shapes(whole) == reference
    assert safetensors_files(whole) == [whole / "model.safetensors"]


def test_sliced_reads_match_the_full_tensor(checkpoints: tuple[Path, Path]) -> None:
    whole, sharded = checkpoints
    full = load_file(str(whole / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.weight"
    with HFCheckpointReader(sharded) as reader:
        assert reader.names() == set(full)
        assert torch.equal(reader.read(name, SliceSpec(dim=None)), full[name])
        assert torch.equal(reader.read(name, SliceSpec(dim=0, start=2, stop=5)), full[name][2:5])
        assert torch.equal(reader.read(name, SliceSpec(dim=1, start=1, stop=4)), full[name][:, 1:4])


def test_missing_shards_and_empty_folders_are_named(tmp_path: Path, checkpoints: tuple[Path, Path]) -> None:
    _, sharded = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim.name)):
        checkpoint_shapes(broken)
    with pytest.raises(FileNotFoundError, match=re.escape("no *.safetensors files")):
        safetensors_files(tmp_path / "empty")
