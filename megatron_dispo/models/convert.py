"""HF checkpoints in and out of a sharded Megatron-Core model, using the tables of :mod:`megatron_dispo.models.mapping`.

* :func:`load_hf_weights`: every rank reads only the slices of the safetensors files that its TP / EP / expert-TP shard
  needs (``safe_open(...).get_slice(...)``) and copies them into its parameters, checking every shape.
* :func:`export_hf_weights`: a **streaming generator** of ``(hf_name, full_tensor)`` that gathers one Megatron
  parameter at a time over TP (expert TP for experts) and EP, splits it into HF tensors and yields them. The full
  model is never materialised: at most one gathered parameter lives at a time. This is the generator the refit path
  consumes, and :func:`save_hf_checkpoint` writes it to disk in size-bounded shards.

Every rank of the model-parallel world must run these functions together (they issue collectives). With pipeline
parallelism each stage holds its own layers (layer indices are mapped through the stage's offset); the export streams
every stage's tensors in stage order.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dispo.hf_checkpoint import INDEX_FILE, HFCheckpointReader
from megatron_dispo.models.mapping import (
    ModelDims,
    ResolvedParam,
    resolve_names,
    table_for,
    unshard_tensors,
)

__all__ = [
    "TOKENIZER_FILES",
    "ShardLayout",
    "export_hf_weights",
    "load_hf_weights",
    "model_dims",
    "resolve_model_params",
    "save_hf_checkpoint",
    "unwrap_model",
]

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files copied next to exported weights when present (tokenizer and generation settings)."""

_TIED_ALIAS = {"lm_head.weight": "model.embed_tokens.weight"}


@dataclass(frozen=True)
class ShardLayout:
    """This rank's coordinates in the TP, expert-TP and EP groups (from Megatron's parallel_state)."""

    tp_rank: int
    tp_size: int
    tp_group: Any
    etp_rank: int
    etp_size: int
    etp_group: Any
    ep_rank: int
    ep_size: int
    ep_group: Any
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: Any = None
    host_pp_group: Any = None
    """A gloo mirror of ``pp_group`` for the stages' manifests (objects; ``pp_group`` is NCCL on GPU)."""
    dp_rank: int = 0
    """Data-parallel rank of the dense part; DP replicas hold identical weights."""
    expert_dp_rank: int = 0
    """Data-parallel rank of the experts (expert-DP replicas hold identical experts)."""

    @classmethod
    def from_parallel_state(cls) -> ShardLayout:
        """Read the layout of the initialised Megatron parallel state."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise ValueError("HF conversion needs Megatron's parallel state; call initialize_parallel() first.")
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_group=ps.get_tensor_model_parallel_group(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            etp_group=ps.get_expert_tensor_parallel_group(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            ep_group=ps.get_expert_model_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            host_pp_group=_host_pp_group(),
            dp_rank=ps.get_data_parallel_rank(),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
        )

    def split_coords(self, resolved: ResolvedParam) -> tuple[int, int, Any]:
        """(rank, size, group) of the tensor-parallel split that applies to this parameter."""
        if resolved.mapping.is_expert:
            return self.etp_rank, self.etp_size, self.etp_group
        return self.tp_rank, self.tp_size, self.tp_group


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron DDP / Float16Module wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_dims(model: torch.nn.Module, hf_config: Any, layout: ShardLayout) -> ModelDims:
    """Dims of the built model, checked against the HF config (a mismatch names both values)."""
    inner = unwrap_model(model)
    config = inner.config
    if inner.pre_process:
        vocab_rows = inner.embedding.word_embeddings.weight.shape[0]
    elif inner.post_process:
        vocab_rows = inner.output_layer.weight.shape[0]
    else:  # a middle pipeline stage holds neither; the builder does not pad the vocabulary
        vocab_rows = inner.vocab_size // layout.tp_size
    dims = ModelDims(
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=vocab_rows * layout.tp_size,
    )
    expected = ModelDims.from_hf_config(hf_config, padded_vocab_size=dims.padded_vocab_size)
    if dims != expected:
        raise ValueError(f"the built model {dims} does not match the HF config {expected}; build it from this config.")
    return dims


def _num_local_experts(model: torch.nn.Module, layout: ShardLayout) -> int:
    num_experts = getattr(unwrap_model(model).config, "num_moe_experts", None) or 0
    return max(1, num_experts // layout.ep_size)


def resolve_model_params(
    model: torch.nn.Module, hf_config: Any, layout: ShardLayout
) -> list[tuple[ResolvedParam, torch.nn.Parameter]]:
    """Every parameter of this rank's shard with its table entry and global HF names (experts renumbered for EP,
    layers for the pipeline stage)."""
    inner = unwrap_model(model)
    params = dict(inner.named_parameters())
    resolved = resolve_names(
        table_for(hf_config),
        params,
        ep_rank=layout.ep_rank,
        num_local_experts=_num_local_experts(model, layout),
        layer_offset=_layer_offset(inner),
    )
    return [(entry, params[entry.megatron_name]) for entry in resolved]


def _layer_offset(inner: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    from megatron_dispo.models.parallel import pipeline_layer_offset

    return pipeline_layer_offset(inner.config)


def _all_expected_hf_names(model: torch.nn.Module, hf_config: Any, layout: ShardLayout) -> set[str]:
    """HF names the whole model (all EP ranks, all pipeline stages) consumes; names only (at PP > 1 the stages'
    names are all-gathered over the pipeline group)."""
    inner = unwrap_model(model)
    names = list(dict(inner.named_parameters()))
    table = table_for(hf_config)
    expected: set[str] = set()
    for ep_rank in range(layout.ep_size):
        num_local = _num_local_experts(model, layout)
        for entry in resolve_names(
            table, names, ep_rank=ep_rank, num_local_experts=num_local, layer_offset=_layer_offset(inner)
        ):
            expected.update(entry.hf_names)
    if layout.pp_size > 1:
        stages: list[set[str] | None] = [None] * layout.pp_size
        dist.all_gather_object(stages, expected, group=layout.host_pp_group or layout.pp_group)
        expected = set().union(*(stage or set() for stage in stages))
    return expected


def _host_pp_group() -> Any:
    """The pipeline group's host mirror when ``initialize_parallel`` made one (Megatron's state alone has none)."""
    from megatron_dispo.models.parallel import host_group

    try:
        return host_group("pp")
    except RuntimeError:
        return None


def _full_shape(local_shape: torch.Size, tp_split: str, size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if tp_split in ("column", "vocab", "gated_column"):
        shape[0] *= size
    elif tp_split == "row":
        shape[1] *= size
    return tuple(shape)


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, hf_config: Any | None = None) -> None:
    """Copy an HF Qwen3 / Qwen3-MoE checkpoint into this rank's shard of ``model``, reading only this rank's slices.

    Raises ValueError listing every missing or unknown HF tensor, and naming the tensor of any shape mismatch.
    Call it on every rank (at PP > 1 the stages exchange their tensor names to check the checkpoint as a whole).
    Load before building the optimizer: a mixed-precision optimizer keeps its own fp32 copy of the weights, made when
    it is built.
    """
    if hf_config is None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(hf_dir))
    layout = ShardLayout.from_parallel_state()
    dims = model_dims(model, hf_config, layout)
    params = resolve_model_params(model, hf_config, layout)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    with HFCheckpointReader(Path(hf_dir)) as reader:
        available = reader.names()

        def source(name: str) -> str:
            return _TIED_ALIAS[name] if tied and name not in available and name in _TIED_ALIAS else name

        expected = _all_expected_hf_names(model, hf_config, layout)
        missing = sorted(name for name in expected if source(name) not in available)
        unknown = sorted(available - expected - ({"lm_head.weight"} if tied else set()))
        if missing or unknown:
            raise ValueError(
                f"HF checkpoint {hf_dir} does not match the built {hf_config.model_type} model: "
                f"missing {_preview(missing)}; unknown {_preview(unknown)}. Check that the config and the weights "
                "belong together (and the model was built from this config)."
            )
        for entry, param in params:
            rank, size, _ = layout.split_coords(entry)
            full_megatron = torch.empty(_full_shape(param.shape, entry.mapping.tp_split, size), device="meta")
            want_shapes = [tuple(t.shape) for t in entry.mapping.split(full_megatron, dims)]
            have_shapes = [reader.shape(source(name)) for name in entry.hf_names]
            if want_shapes != have_shapes:
                raise ValueError(
                    f"{entry.megatron_name} <- {list(entry.hf_names)}: the checkpoint has shapes {have_shapes} but "
                    f"the built model needs {want_shapes}."
                )
            slices = entry.mapping.source_slices(have_shapes, dims, rank, size)
            pieces = [reader.read(source(name), spec) for name, spec in zip(entry.hf_names, slices, strict=True)]
            shard = entry.mapping.merge_shard(pieces, dims, rank, size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"{entry.megatron_name} <- {list(entry.hf_names)}: built shard {tuple(shard.shape)} but the "
                    f"parameter is {tuple(param.shape)} (rank {rank} of {size})."
                )
            with torch.no_grad():
                param.copy_(shard)


def _preview(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {names[:limit]}{more}"


def _collect(tensor: Tensor, group: Any, to_all: bool) -> list[Tensor] | None:
    """The tensors of every rank of ``group`` in group-rank order (on all ranks, or only on group rank 0)."""
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    if to_all:
        out = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(out, tensor, group=group)
        return out
    dst = dist.get_global_rank(group, 0)
    if dist.get_rank() == dst:
        out = [torch.empty_like(tensor) for _ in range(size)]
        dist.gather(tensor, out, dst=dst, group=group)
        return out
    dist.gather(tensor, None, dst=dst, group=group)
    return None


def export_hf_weights(
    model: torch.nn.Module, hf_config: Any, *, destination: Literal["all", "rank0"] = "all"
) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(hf_name, full_tensor)`` for the whole model, one Megatron parameter at a time.

    Contract (the refit path relies on it):
      * every rank of the world must iterate the generator to the end together (it issues collectives);
      * ``destination="all"``: every rank receives every tensor (all-gather, then a broadcast over the pipeline
        group); ``"rank0"``: tensors go to global rank 0 only, and other ranks iterate an empty stream while taking
        part: only the ranks that send to rank 0 (data-parallel replica 0 of each stage, and of its experts) gather,
        and a later stage's tensors travel to rank 0 point-to-point;
      * each HF tensor appears exactly once (per receiving rank), stage by stage in Megatron parameter order (layer by
        layer, layer indices global; an expert parameter yields all experts of its local slot across EP ranks);
      * tensors have the parameters' dtype and may alias parameter memory (replicated params at TP=1): clone before
        modifying, and consume each before advancing if the model may change.
    """
    if destination not in ("all", "rank0"):
        raise ValueError(f"destination={destination!r} must be 'all' (every rank) or 'rank0'.")
    to_all = destination == "all"
    layout = ShardLayout.from_parallel_state()
    dims = model_dims(model, hf_config, layout)
    num_local = _num_local_experts(model, layout)
    receives = to_all or dist.get_rank() == 0
    own = resolve_model_params(model, hf_config, layout)
    device = next(unwrap_model(model).parameters()).device  # receive buffers live where the collectives run
    stages = _stage_manifests(own, layout)
    for stage, manifest in enumerate(stages):
        local = own if stage == layout.pp_rank else [(entry, None) for entry in _resolve_manifest(manifest, hf_config)]
        for (entry, param), (_, shape, dtype) in zip(local, manifest, strict=True):
            items = None
            if param is not None and (to_all or _sends_to_rank0(entry, layout)):
                items = _gather_items(entry, param, layout, to_all, num_local)
            if layout.pp_size > 1:
                items = _from_stage(items, stage, entry, (shape, dtype, device), layout, to_all, num_local)
            if items is None or not receives:
                continue
            for expert, tensor in items:
                indices = tuple(i for i in (entry.layer, expert) if i is not None)
                names = entry.mapping.hf_names(indices)
                yield from zip(names, entry.mapping.split(tensor, dims), strict=True)


_Manifest = list[tuple[str, tuple[int, ...], torch.dtype]]
"""One pipeline stage's parameters for the export: (Megatron name with its global layer index, full shape, dtype)."""


def _full_export_shape(entry: ResolvedParam, param: Tensor, layout: ShardLayout) -> tuple[int, ...]:
    _, size, _ = layout.split_coords(entry)
    return _full_shape(param.shape, "replicated" if size == 1 else entry.mapping.tp_split, size)


def _stage_manifests(own: list[tuple[ResolvedParam, Tensor]], layout: ShardLayout) -> list[_Manifest]:
    """Every stage's manifest (all-gathered over the pipeline group at PP > 1): names and shapes of what it sends."""
    manifest = [
        (_global_layer_name(entry), _full_export_shape(entry, param, layout), param.dtype) for entry, param in own
    ]
    if layout.pp_size == 1:
        return [manifest]
    stages: list[_Manifest | None] = [None] * layout.pp_size
    dist.all_gather_object(stages, manifest, group=layout.host_pp_group or layout.pp_group)
    return [stage or [] for stage in stages]


def _global_layer_name(entry: ResolvedParam) -> str:
    """The Megatron name with its layer index made global, so another stage resolves it without knowing the offset."""
    name = entry.megatron_name
    prefix = "decoder.layers."
    if entry.layer is None or not name.startswith(prefix):
        return name
    _, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{entry.layer}.{rest}"


def _resolve_manifest(manifest: _Manifest, hf_config: Any) -> list[ResolvedParam]:
    """Table entries of another stage's parameters (global layer indices; experts as local slots of EP rank 0)."""
    from megatron.core import parallel_state as ps

    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    num_local = max(1, num_experts // ps.get_expert_model_parallel_world_size())
    return resolve_names(table_for(hf_config), [name for name, _, _ in manifest], num_local_experts=num_local)


def _sends_to_rank0(entry: ResolvedParam, layout: ShardLayout) -> bool:
    """Whether this rank's replica is the one whose gathers feed rank 0 (DP replica 0; expert-DP replica 0)."""
    return (layout.expert_dp_rank if entry.mapping.is_expert else layout.dp_rank) == 0


def _gather_items(
    entry: ResolvedParam, param: Tensor, layout: ShardLayout, to_all: bool, num_local: int
) -> list[tuple[int | None, Tensor]] | None:
    """(global expert or None, full tensor) of one parameter gathered over TP (expert TP) and EP; None on ranks
    that do not receive the gather."""
    _, size, group = layout.split_coords(entry)
    local = param.detach()
    if entry.mapping.tp_split == "replicated" or size == 1:
        shards: list[Tensor] | None = [local]
    else:
        shards = _collect(local, group, to_all)
    if shards is None:
        return None  # not the TP leader: its whole EP group skips the EP gather too (same expert-TP rank)
    full = unshard_tensors(shards, entry.mapping.tp_split)
    if not entry.mapping.is_expert:
        return [(None, full)]
    local_expert = entry.expert - layout.ep_rank * num_local
    per_rank = _collect(full, layout.ep_group, to_all) if layout.ep_size > 1 else [full]
    if per_rank is None:
        return None
    return [(rank * num_local + local_expert, tensor) for rank, tensor in enumerate(per_rank)]


def _from_stage(
    items: list[tuple[int | None, Tensor]] | None,
    stage: int,
    entry: ResolvedParam,
    buffer: tuple[tuple[int, ...], torch.dtype, torch.device],
    layout: ShardLayout,
    to_all: bool,
    num_local: int,
) -> list[tuple[int | None, Tensor]] | None:
    """Move one parameter's gathered tensors (one per EP rank for experts) from pipeline ``stage`` to the receivers.

    ``"all"``: a broadcast over the pipeline group (every rank of ``stage`` holds them after the all-gathers).
    ``"rank0"``: point-to-point from rank 0's pipeline peer on ``stage`` (same TP/DP/EP coordinates) to rank 0."""
    count = layout.ep_size if entry.mapping.is_expert else 1
    shape, dtype, device = buffer
    if to_all:
        if layout.pp_rank == stage:
            assert items is not None and len(items) == count
            stacked = torch.stack([tensor for _, tensor in items]).contiguous()
        else:
            stacked = torch.empty((count, *shape), dtype=dtype, device=device)
        dist.broadcast(stacked, src=dist.get_global_rank(layout.pp_group, stage), group=layout.pp_group)
        if layout.pp_rank == stage:
            return items
        return list(zip(_expert_ids(entry, count, num_local), stacked.unbind(0), strict=True))
    if stage == 0 or dist.get_global_rank(layout.pp_group, 0) != 0:
        return items  # stage 0 is rank 0's own stage; pipelines without rank 0 send nothing
    if layout.pp_rank == stage:
        assert items is not None and len(items) == count
        dist.send(torch.stack([tensor for _, tensor in items]).contiguous(), dst=0)
        return None
    if dist.get_rank() != 0:
        return None
    stacked = torch.empty((count, *shape), dtype=dtype, device=device)
    dist.recv(stacked, src=dist.get_global_rank(layout.pp_group, stage))
    return list(zip(_expert_ids(entry, count, num_local), stacked.unbind(0), strict=True))


def _expert_ids(entry: ResolvedParam, count: int, num_local: int) -> list[int | None]:
    """Global experts of ``entry``'s local slot on each of the ``count`` EP ranks ([None] for a dense parameter)."""
    if entry.expert is None:
        return [None]
    slot = entry.expert % num_local
    return [rank * num_local + slot for rank in range(count)]


def save_hf_checkpoint(
    weights: Iterable[tuple[str, Tensor]],
    out_dir: str | Path,
    hf_config: Any,
    *,
    max_shard_bytes: int = 4 * 1024**3,
    copy_files_from: str | Path | None = None,
) -> list[Path]:
    """Write streamed weights as HF safetensors (+ index when sharded) and ``config.json``; return the files.

    Memory is bounded by ``max_shard_bytes``: a shard is written as soon as it is full. Tokenizer / generation files
    (:data:`TOKENIZER_FILES`) found in ``copy_files_from`` are copied alongside.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temp_files: list[Path] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, Tensor] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        path = out / f".shard-{len(temp_files):05d}.safetensors.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        temp_files.append(path)
        pending, pending_bytes = {}, 0

    for name, tensor in weights:
        if name in weight_map:
            raise ValueError(f"tensor {name!r} was yielded twice by the export stream.")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.detach().to("cpu").contiguous().clone()  # own storage: safetensors refuses views
        weight_map[name] = len(temp_files)
        pending_bytes += size
        total_bytes += size
    flush()
    if not temp_files:
        raise ValueError("the export stream yielded no tensors; run it on the receiving rank.")
    count = len(temp_files)
    final = [
        out / ("model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
        for i in range(count)
    ]
    for temp, path in zip(temp_files, final, strict=True):
        os.replace(temp, path)
        path.chmod(0o644)  # a plain model file, not a private temp file
    if count > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())},
        }
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config.save_pretrained(str(out))
    if copy_files_from is not None:
        for file_name in TOKENIZER_FILES:
            source = Path(copy_files_from) / file_name
            if source.is_file():
                shutil.copy2(source, out / file_name)
    return final
