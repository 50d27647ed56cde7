"""Atomic, layout-independent checkpoints of the policy model and its optimizer (Megatron ``dist_checkpointing``).

Format: ``<root>/iter_<NNNNNNN>/`` is a ``torch_dist`` distributed checkpoint (each rank writes its own shards in
parallel) plus ``megatron_dispo.json`` (iteration, layout, what it holds, caller metadata); ``<root>/latest`` names the
newest complete one. Model weights are stored as full logical tensors, so they load under any TP/EP/PP layout. The
distributed optimizer's state uses ``distrib_optim_sharding_type="dp_reshardable"`` (the format that works on this
path), which reshards over DP only: loading it needs the same TP/EP/PP layout; the plain optimizer reshards freely.

Atomicity: all ranks write into ``<root>/.tmp_iter_<NNNNNNN>/``; after a barrier rank 0 writes the metadata file last,
renames the folder to its final name and then atomically replaces ``latest``. A crash at any point leaves either the
previous checkpoint as ``latest`` or no ``iter_`` folder at all; leftover ``.tmp_*`` folders are ignored and removed by
the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_dispo.lifetime import die_with_parent
from megatron_dispo.models.parallel import ParallelConfig

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer

__all__ = ["CheckpointInfo", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

METADATA_FILE = "megatron_dispo.json"
LATEST_FILE = "latest"
_FORMAT_VERSION = 1

CheckpointInfo = dict[str, Any]
"""Contents of ``megatron_dispo.json``: format_version, iteration, parallel (layout), has_optimizer, user metadata."""


def _iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state(model: torch.nn.Module, optimizer: MegatronOptimizer | None, *, is_loading: bool) -> dict:
    model_state = _unwrap(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_state}
    if optimizer is None:
        return state
    if optimizer.config.use_distributed_optimizer:
        # DP-reshardable buffers: Megatron's own format (the only one that works on this path); same TP/EP/PP to load.
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
        return state
    state["optimizer"] = _layout_free_optimizer_state(optimizer, model_state, is_loading=is_loading)
    return state


def _materialize_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give a never-stepped torch AdamW its state (zeros, step 0) so a distributed optimizer can be saved / loaded.

    Without Apex/TE (CPU, and the GPU image without TE) Megatron's DistributedOptimizer uses torch AdamW, whose
    ``step`` lives in the per-param state that only exists after the first step; ``DistributedOptimizer.state_dict``
    then fails (``assert len(steps) == 1``) when building the load request of a fresh optimizer.
    """
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                param_state = inner.state[param]
                if "step" not in param_state:
                    param_state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    param_state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    param_state["step"] = torch.tensor(0.0)


def _adam_step(optimizer: MegatronOptimizer) -> int:
    """The optimizer's step count (torch AdamW keeps it per param; all params share the same value)."""
    steps = set()
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for param_state in inner.state.values() if inner is not None else ():
            if "step" in param_state:
                steps.add(int(param_state["step"]))
    if len(steps) > 1:
        raise ValueError(f"optimizer params are at different steps {sorted(steps)}; cannot save a consistent state.")
    return steps.pop() if steps else 0


def _set_adam_step(optimizer: MegatronOptimizer, step: int) -> None:
    """Give every param its own AdamW ``step`` tensor equal to ``step`` after a distributed-optimizer load.

    Without Apex/TE, ``DistributedOptimizer.load_state_dict`` puts one shared step tensor into every param's state and
    the dp_reshardable buffers then overwrite it with a stale value (0 for a fresh optimizer), so bias correction after
    a resume is wrong (caught by test_checkpoints_reshard_resume_and_save_atomically). The step count is saved in
    ``megatron_dispo.json`` and restored here.
    """
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for param_state in inner.state.values() if inner is not None else ():
            if "step" in param_state:
                param_state["step"] = torch.tensor(float(step))


def _sub_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _layout_free_optimizer_state(optimizer: MegatronOptimizer, model_state: dict, *, is_loading: bool) -> dict:
    """Plain-optimizer state that reloads under any TP/EP layout.

    The per-param tensors (exp_avg, exp_avg_sq, fp32 master copies) are ShardedTensors keyed by the model's global
    param keys, so they reshard like the weights. What depends on the layout is the rest: how params are split into
    dense / expert sub-optimizers and their param groups. Those stay local (param groups are rebuilt from
    OptimizerSettings), and only the shared step count is stored as one number.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    subs, steps = [], []
    for sub in _sub_optimizers(optimizer):
        sub_state = sub.sharded_state_dict(model_state, is_loading=is_loading)
        inner = sub_state.get("optimizer", sub_state)  # Float16Optimizer nests the torch state under "optimizer"
        step = inner["state"].pop("common_step", None)
        if step is not None:
            steps.append(int(step))

        def keep_local(value: Any) -> Any:
            if isinstance(value, ShardedBase | LocalNonpersistentObject):
                return value
            return LocalNonpersistentObject(value)

        subs.append(dict_list_map_inplace(keep_local, sub_state))
    if len(set(steps)) > 1:
        raise ValueError(f"sub-optimizers are at different steps {steps}; cannot save a consistent checkpoint.")
    return {"sub_optimizers": subs, "step": steps[0] if steps else 0}


def _load_layout_free_optimizer_state(optimizer: MegatronOptimizer, loaded: dict) -> None:
    for sub, sub_state in zip(_sub_optimizers(optimizer), loaded["sub_optimizers"], strict=True):
        inner = sub_state.get("optimizer", sub_state)
        if loaded["step"]:
            inner["state"]["common_step"] = loaded["step"]
        sub.load_state_dict(sub_state)


def _write_json_atomic(path: Path, payload: dict | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, sort_keys=True) + "\n"
    tmp.write_text(text)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


_RESULTS_MANAGERS: list[Any] = []
"""The manager behind Megatron's results queue, kept referenced as long as Megatron's module global holds its queue."""


def _results_manager_dies_with_this_process() -> None:
    """Megatron's torch_dist writer (``filesystem_async._get_write_results_queue``) starts a spawned multiprocessing
    ``Manager`` for its results queue on the first save and keeps it for the life of the process; when that process
    is SIGKILLed (a preempted job) the manager is re-parented to init and lives on. Start that manager here instead,
    with the guards of ``lifetime.die_with_parent`` armed in it, and hand Megatron its queue."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=torch.multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _RESULTS_MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()


def save_checkpoint(
    root: str | Path,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None,
    *,
    iteration: int,
    parallel: ParallelConfig,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save model (and optimizer) shards from every rank; return the final ``iter_`` folder. Collective call."""
    from megatron.core import dist_checkpointing

    if iteration < 0:
        raise ValueError(f"iteration={iteration} must be >= 0.")
    root = Path(root)
    final_dir = _iteration_dir(root, iteration)
    tmp_dir = root / f".tmp_{final_dir.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final_dir.exists():
            raise ValueError(f"checkpoint {final_dir} already exists; pick a new iteration or delete it first.")
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a crashed save
        tmp_dir.mkdir()
    _barrier()
    if optimizer is not None and optimizer.config.use_distributed_optimizer:
        _materialize_adam_state(optimizer)
    state = _sharded_state(model, optimizer, is_loading=False)
    _results_manager_dies_with_this_process()
    dist_checkpointing.save(state, str(tmp_dir))
    _barrier()
    if _rank() == 0:
        info: CheckpointInfo = {
            "format_version": _FORMAT_VERSION,
            "iteration": iteration,
            "parallel": asdict(parallel),
            "has_optimizer": optimizer is not None,
            "optimizer_step": _adam_step(optimizer) if optimizer is not None else 0,
            "metadata": metadata or {},
        }
        _write_json_atomic(tmp_dir / METADATA_FILE, info)
        os.replace(tmp_dir, final_dir)
        _write_json_atomic(root / LATEST_FILE, final_dir.name + "\n")
    _barrier()
    return final_dir


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (per ``latest``), or None if there is none."""
    root = Path(root)
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    candidate = root / latest.read_text().strip()
    return candidate if (candidate / METADATA_FILE).is_file() else None


def read_info(checkpoint_dir: str | Path) -> CheckpointInfo:
    """The metadata of a complete checkpoint; ValueError if the folder is not one (e.g. a crashed save)."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        raise ValueError(
            f"{checkpoint_dir} is not a complete megatron_dispo checkpoint ({METADATA_FILE} missing); use "
            "latest_checkpoint(root) to find the newest complete one."
        )
    return json.loads(path.read_text())


def load_checkpoint(
    checkpoint_dir: str | Path,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None,
    *,
    parallel: ParallelConfig,
) -> CheckpointInfo:
    """Load weights (any layout) and, if given, optimizer state (see module doc for layout rules). Collective call."""
    from megatron.core import dist_checkpointing

    info = read_info(checkpoint_dir)
    if optimizer is not None:
        if not info["has_optimizer"]:
            raise ValueError(f"{checkpoint_dir} holds no optimizer state; pass optimizer=None to load weights only.")
        saved = ParallelConfig(**info["parallel"])
        same_model_layout = (
            saved.tensor_model_parallel_size == parallel.tensor_model_parallel_size
            and saved.expert_model_parallel_size == parallel.expert_model_parallel_size
            and saved.expert_tensor_size == parallel.expert_tensor_size
            and saved.pipeline_model_parallel_size == parallel.pipeline_model_parallel_size
        )
        if saved.use_distributed_optimizer != parallel.use_distributed_optimizer:
            raise ValueError(
                f"checkpoint optimizer has use_distributed_optimizer={saved.use_distributed_optimizer} but the run "
                f"uses {parallel.use_distributed_optimizer}; match it, or load weights only (optimizer=None)."
            )
        if saved.use_distributed_optimizer and not same_model_layout:
            raise ValueError(
                f"distributed-optimizer state saved at TP={saved.tensor_model_parallel_size}, "
                f"EP={saved.expert_model_parallel_size}, ETP={saved.expert_tensor_size}, "
                f"PP={saved.pipeline_model_parallel_size} can only be resharded over DP ('dp_reshardable'); load it "
                "with the same TP/EP/PP, or load weights only (optimizer=None)."
            )
    if optimizer is not None and optimizer.config.use_distributed_optimizer:
        _materialize_adam_state(optimizer)
    state = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(checkpoint_dir))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        if optimizer.config.use_distributed_optimizer:
            with torch.no_grad():  # it copies into views of leaf main params
                optimizer.load_state_dict(loaded["optimizer"])
            _set_adam_step(optimizer, int(info["optimizer_step"]))
        else:
            _load_layout_free_optimizer_state(optimizer, loaded["optimizer"])
    _barrier()
    return info
