"""Declarative HF <-> Megatron-Core name tables for Qwen3 / Qwen3-MoE, and the pure tensor transforms behind them.

Two separate, pure steps (no process groups, no I/O), so each can be tested on its own:

1. **Format** (``ParamMap.merge`` / ``ParamMap.split``): HF tensor(s) <-> one *full* (unsharded) Megatron tensor.
   Plain renames, QKV fusion interleaved per query group, fused gate/up, vocabulary padding.
2. **Sharding** (:func:`shard_tensor` / :func:`unshard_tensors`): a full Megatron tensor <-> its tensor-parallel
   shards, by parameter kind (:data:`TPSplit`). Expert numbering across expert-parallel ranks is
   :func:`global_expert_index`.

For sharded loading a rank reads only its slices: :meth:`ParamMap.source_slices` names the rows/columns of each HF
tensor that a TP rank needs, and :meth:`ParamMap.merge_shard` builds the local shard from them; by construction
``merge_shard(slices) == shard_tensor(merge(full))`` (tested).

Names use ``*`` for the layer index and, for experts, the expert index (second ``*``). A table lists every layout
variant a model can have (local spec vs Transformer-Engine fused layer norms, SequentialMLP vs TE grouped experts);
the model's own parameter names decide which entries apply (:func:`resolve_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "QWEN3_DENSE",
    "QWEN3_MOE",
    "TABLES",
    "FuseGateUp",
    "FuseQKV",
    "ModelDims",
    "ParamMap",
    "Rename",
    "ResolvedParam",
    "SliceSpec",
    "TPSplit",
    "VocabRename",
    "global_expert_index",
    "padded_vocab_size",
    "resolve_names",
    "shard_tensor",
    "table_for",
    "unshard_tensors",
]

TPSplit = Literal["replicated", "column", "row", "vocab", "gated_column"]
"""How a Megatron parameter is split over tensor-parallel ranks.

``column``: dim 0 in equal contiguous chunks (ColumnParallelLinear, also QKV: its rows are grouped per query group).
``row``: dim 1 in equal chunks (RowParallelLinear). ``vocab``: dim 0 of the padded vocabulary (VocabParallelEmbedding,
output layer). ``gated_column``: fused [gate; up] where rank r holds [gate_r; up_r] (Megatron's SwiGLU fc1).
``replicated``: every rank holds the full tensor (norms, router)."""

_SPLITS: tuple[str, ...] = ("replicated", "column", "row", "vocab", "gated_column")
_WILDCARD = "*"


@dataclass(frozen=True)
class ModelDims:
    """The architecture numbers the transforms need (all global, i.e. unsharded)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """The HF vocabulary (rows of ``embed_tokens`` / ``lm_head``)."""
    padded_vocab_size: int
    """Megatron's vocabulary rows (>= ``vocab_size``; padded to a multiple of make_vocab_size_divisible_by * TP)."""

    def __post_init__(self) -> None:
        for name in ("num_attention_heads", "num_query_groups", "head_dim", "vocab_size", "padded_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_query_groups "
                f"({self.num_query_groups}) for grouped-query attention."
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size}).")

    @classmethod
    def from_hf_config(cls, hf_config: Any, *, padded_vocab_size: int | None = None) -> ModelDims:
        """Dims of an HF Qwen3 / Qwen3-MoE config; ``padded_vocab_size`` defaults to the HF vocabulary."""
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=hf_config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=hf_config.vocab_size,
            padded_vocab_size=padded_vocab_size or hf_config.vocab_size,
        )

    def local(self, tp_size: int) -> ModelDims:
        """The dims one of ``tp_size`` tensor-parallel ranks sees (heads, groups and padded vocab divided)."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("padded_vocab_size", self.padded_vocab_size),
        ):
            if value % tp_size:
                raise ValueError(f"{name} ({value}) must be divisible by the tensor-parallel size ({tp_size}).")
        return ModelDims(
            num_attention_heads=self.num_attention_heads // tp_size,
            num_query_groups=self.num_query_groups // tp_size,
            head_dim=self.head_dim,
            vocab_size=self.padded_vocab_size // tp_size,  # a shard has no notion of the true vocabulary
            padded_vocab_size=self.padded_vocab_size // tp_size,
        )


def padded_vocab_size(vocab_size: int, *, make_vocab_size_divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padded vocabulary: round up to a multiple of ``make_vocab_size_divisible_by * tp_size``."""
    if vocab_size <= 0 or make_vocab_size_divisible_by <= 0 or tp_size <= 0:
        raise ValueError(
            f"vocab_size={vocab_size}, make_vocab_size_divisible_by={make_vocab_size_divisible_by} and "
            f"tp_size={tp_size} must all be positive."
        )
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class SliceSpec:
    """Rows (``dim=0``) or columns (``dim=1``) ``[start, stop)`` of one HF tensor; ``dim=None`` = the whole tensor."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def apply(self, tensor: Tensor) -> Tensor:
        """The slice of an in-memory tensor (a view)."""
        return tensor if self.dim is None else tensor.narrow(self.dim, self.start, self.stop - self.start)


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name).replace(re.escape(_WILDCARD), r"(\d+)") + "$")


@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter <- one or more HF tensors. Subclasses define the format transform."""

    megatron: str
    hf: tuple[str, ...]
    tp_split: TPSplit
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tp_split not in _SPLITS:
            raise ValueError(f"tp_split={self.tp_split!r} for {self.megatron!r} must be one of {_SPLITS}.")
        count = self.megatron.count(_WILDCARD)
        if count > 2:
            raise ValueError(f"{self.megatron!r} has {count} wildcards; at most 2 (layer, expert) are supported.")
        for hf_name in self.hf:
            if hf_name.count(_WILDCARD) != count:
                raise ValueError(
                    f"Wildcard count mismatch: megatron={self.megatron!r} has {count} '*' but hf={hf_name!r} has "
                    f"{hf_name.count(_WILDCARD)}; each '*' (layer, then expert) must appear in every name."
                )
        object.__setattr__(self, "_regex", _pattern(self.megatron))

    @property
    def is_expert(self) -> bool:
        """Expert weights carry a second wildcard (the expert index) and are split over EP / expert-TP."""
        return self.megatron.count(_WILDCARD) == 2

    def match(self, megatron_name: str) -> tuple[int, ...] | None:
        """The wildcard indices if ``megatron_name`` is this entry's parameter, else None."""
        found = self._regex.match(megatron_name)
        return None if found is None else tuple(int(g) for g in found.groups())

    def hf_names(self, indices: Sequence[int]) -> tuple[str, ...]:
        """The concrete HF names for wildcard ``indices`` (layer[, global expert])."""
        names = []
        for template in self.hf:
            parts = template.split(_WILDCARD)
            names.append(parts[0] + "".join(f"{index}{part}" for index, part in zip(indices, parts[1:], strict=True)))
        return tuple(names)

    # Format transform: subclasses override these three.
    def merge(self, tensors: Sequence[Tensor], dims: ModelDims) -> Tensor:
        """HF tensors (in ``hf`` order) -> the full Megatron tensor."""
        raise NotImplementedError

    def split(self, tensor: Tensor, dims: ModelDims) -> tuple[Tensor, ...]:
        """The full Megatron tensor -> HF tensors (in ``hf`` order); exact inverse of :meth:`merge`."""
        raise NotImplementedError

    def source_slices(
        self, hf_shapes: Sequence[Sequence[int]], dims: ModelDims, rank: int, size: int
    ) -> tuple[SliceSpec, ...]:
        """The part of each HF tensor (full shapes ``hf_shapes``) that TP ``rank`` of ``size`` needs for its shard."""
        raise NotImplementedError

    def merge_shard(self, pieces: Sequence[Tensor], dims: ModelDims, rank: int, size: int) -> Tensor:
        """Build rank ``rank``'s shard from the :meth:`source_slices` pieces (= ``shard_tensor(merge(full))``)."""
        return self.merge(pieces, dims.local(size))


def _chunk(length: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if length % size:
        raise ValueError(f"{what}: size {length} is not divisible by the parallel size {size}.")
    step = length // size
    return rank * step, (rank + 1) * step


@dataclass(frozen=True)
class Rename(ParamMap):
    """A 1:1 copy. ``tp_split`` says how Megatron shards it (norms and router: ``replicated``)."""

    def __init__(self, megatron: str, hf: str, tp_split: TPSplit = "replicated") -> None:
        if tp_split in ("vocab", "gated_column"):
            raise ValueError(f"Rename({megatron!r}) cannot use tp_split={tp_split!r}; use VocabRename / FuseGateUp.")
        super().__init__(megatron, (hf,), tp_split)

    def merge(self, tensors: Sequence[Tensor], dims: ModelDims) -> Tensor:
        return tensors[0]

    def split(self, tensor: Tensor, dims: ModelDims) -> tuple[Tensor, ...]:
        return (tensor,)

    def source_slices(
        self, hf_shapes: Sequence[Sequence[int]], dims: ModelDims, rank: int, size: int
    ) -> tuple[SliceSpec, ...]:
        if self.tp_split == "replicated" or size == 1:
            return (SliceSpec(None),)
        dim = 0 if self.tp_split == "column" else 1
        start, stop = _chunk(hf_shapes[0][dim], rank, size, f"{self.hf[0]} dim {dim}")
        return (SliceSpec(dim, start, stop),)

    def merge_shard(self, pieces: Sequence[Tensor], dims: ModelDims, rank: int, size: int) -> Tensor:
        return pieces[0]


@dataclass(frozen=True)
class VocabRename(ParamMap):
    """Embedding / output layer: rows padded with zeros from the HF vocabulary to Megatron's padded vocabulary."""

    def __init__(self, megatron: str, hf: str) -> None:
        super().__init__(megatron, (hf,), "vocab")

    def merge(self, tensors: Sequence[Tensor], dims: ModelDims) -> Tensor:
        (tensor,) = tensors
        if tensor.shape[0] != dims.vocab_size:
            raise ValueError(f"{self.hf[0]}: {tensor.shape[0]} rows but the vocabulary has {dims.vocab_size}.")
        return _pad_rows(tensor, dims.padded_vocab_size)

    def split(self, tensor: Tensor, dims: ModelDims) -> tuple[Tensor, ...]:
        return (tensor[: dims.vocab_size],)

    def source_slices(
        self, hf_shapes: Sequence[Sequence[int]], dims: ModelDims, rank: int, size: int
    ) -> tuple[SliceSpec, ...]:
        start, stop = _chunk(dims.padded_vocab_size, rank, size, f"{self.megatron} padded vocabulary")
        return (SliceSpec(0, min(start, dims.vocab_size), min(stop, dims.vocab_size)),)

    def merge_shard(self, pieces: Sequence[Tensor], dims: ModelDims, rank: int, size: int) -> Tensor:
        return _pad_rows(pieces[0], dims.padded_vocab_size // size)


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)


@dataclass(frozen=True)
class FuseQKV(ParamMap):
    """Megatron ``linear_qkv`` = for each query group g: [q heads of g; k_g; v_g] stacked along dim 0.

    Grouping per query group is what lets column-parallel TP split the fused tensor in plain contiguous chunks: each
    rank gets whole groups (num_query_groups / TP of them) with their q, k and v rows."""

    def __init__(self, megatron: str, *, q: str, k: str, v: str) -> None:
        super().__init__(megatron, (q, k, v), "column")

    def merge(self, tensors: Sequence[Tensor], dims: ModelDims) -> Tensor:
        q, k, v = tensors
        groups, head_dim = dims.num_query_groups, dims.head_dim
        heads_per_group = dims.num_attention_heads // groups
        expected = {
            "q": (q, dims.num_attention_heads * head_dim),
            "k": (k, groups * head_dim),
            "v": (v, groups * head_dim),
        }
        for label, (tensor, rows) in expected.items():
            if tensor.shape[0] != rows:
                raise ValueError(
                    f"{self.megatron} <- {label}: {tensor.shape[0]} rows, expected {rows} "
                    f"(heads={dims.num_attention_heads}, query groups={groups}, head_dim={head_dim})."
                )
        rest = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, heads_per_group * head_dim, *rest),
                k.reshape(groups, head_dim, *rest),
                v.reshape(groups, head_dim, *rest),
            ],
            dim=1,
        )
        return fused.reshape(groups * (heads_per_group + 2) * head_dim, *rest)

    def split(self, tensor: Tensor, dims: ModelDims) -> tuple[Tensor, ...]:
        groups, head_dim = dims.num_query_groups, dims.head_dim
        heads_per_group = dims.num_attention_heads // groups
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, (heads_per_group + 2) * head_dim, *rest)
        q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return (
            q.reshape(groups * heads_per_group * head_dim, *rest),
            k.reshape(groups * head_dim, *rest),
            v.reshape(groups * head_dim, *rest),
        )

    def source_slices(
        self, hf_shapes: Sequence[Sequence[int]], dims: ModelDims, rank: int, size: int
    ) -> tuple[SliceSpec, ...]:
        q_rows = dims.num_attention_heads * dims.head_dim
        kv_rows = dims.num_query_groups * dims.head_dim
        dims.local(size)  # raises if heads / groups do not divide
        return (
            SliceSpec(0, *_chunk(q_rows, rank, size, f"{self.hf[0]} rows")),
            SliceSpec(0, *_chunk(kv_rows, rank, size, f"{self.hf[1]} rows")),
            SliceSpec(0, *_chunk(kv_rows, rank, size, f"{self.hf[2]} rows")),
        )


@dataclass(frozen=True)
class FuseGateUp(ParamMap):
    """SwiGLU ``linear_fc1`` = [gate; up] along dim 0 (Megatron applies silu to the first half)."""

    def __init__(self, megatron: str, *, gate: str, up: str) -> None:
        super().__init__(megatron, (gate, up), "gated_column")

    def merge(self, tensors: Sequence[Tensor], dims: ModelDims) -> Tensor:
        gate, up = tensors
        if gate.shape != up.shape:
            raise ValueError(f"{self.megatron}: gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ.")
        return torch.cat([gate, up], dim=0)

    def split(self, tensor: Tensor, dims: ModelDims) -> tuple[Tensor, ...]:
        if tensor.shape[0] % 2:
            raise ValueError(f"{self.megatron}: fused gate/up has an odd number of rows ({tensor.shape[0]}).")
        gate, up = torch.chunk(tensor, 2, dim=0)
        return gate, up

    def source_slices(
        self, hf_shapes: Sequence[Sequence[int]], dims: ModelDims, rank: int, size: int
    ) -> tuple[SliceSpec, ...]:
        """Rank r reads rows chunk r of gate and of up (its shard is [gate_r; up_r])."""
        start, stop = _chunk(hf_shapes[0][0], rank, size, f"{self.hf[0]} rows")
        return SliceSpec(0, start, stop), SliceSpec(0, start, stop)

    def merge_shard(self, pieces: Sequence[Tensor], dims: ModelDims, rank: int, size: int) -> Tensor:
        return self.merge(pieces, dims)


# ---------------------------------------------------------------------------------------------------------------------
# Sharding (pure): full Megatron tensor <-> TP shards; expert numbering across EP ranks.


def shard_tensor(full: Tensor, tp_split: TPSplit, rank: int, size: int) -> Tensor:
    """The TP shard of ``full`` held by ``rank`` of ``size`` (a view where possible)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank={rank} must be in [0, {size}).")
    if tp_split == "replicated" or size == 1:
        return full
    if tp_split in ("column", "vocab", "row"):
        dim = 1 if tp_split == "row" else 0
        start, stop = _chunk(full.shape[dim], rank, size, f"{tp_split}-parallel dim {dim}")
        return full.narrow(dim, start, stop - start)
    if tp_split == "gated_column":
        gate, up = torch.chunk(full, 2, dim=0)
        start, stop = _chunk(gate.shape[0], rank, size, "gate/up rows")
        return torch.cat([gate[start:stop], up[start:stop]], dim=0)
    raise ValueError(f"tp_split={tp_split!r} must be one of {_SPLITS}.")


def unshard_tensors(shards: Sequence[Tensor], tp_split: TPSplit) -> Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from the shards of ranks 0..size-1 in order."""
    if not shards:
        raise ValueError("unshard_tensors needs at least one shard.")
    if tp_split == "replicated" or len(shards) == 1:
        return shards[0]
    if tp_split in ("column", "vocab"):
        return torch.cat(list(shards), dim=0)
    if tp_split == "row":
        return torch.cat(list(shards), dim=1)
    if tp_split == "gated_column":
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    raise ValueError(f"tp_split={tp_split!r} must be one of {_SPLITS}.")


def global_expert_index(local_expert: int, ep_rank: int, num_local_experts: int) -> int:
    """Megatron numbers experts contiguously per EP rank: global = ep_rank * num_local_experts + local."""
    if not 0 <= local_expert < num_local_experts:
        raise ValueError(f"local_expert={local_expert} must be in [0, num_local_experts={num_local_experts}).")
    return ep_rank * num_local_experts + local_expert


# ---------------------------------------------------------------------------------------------------------------------
# Tables: Megatron name <- HF name(s). "*" = layer index, then expert index.

_L = "decoder.layers.*"
_H = "model.layers.*"

QWEN3_DENSE: tuple[ParamMap, ...] = (
    VocabRename("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    # Attention block. Local spec keeps input_layernorm; the TE spec fuses it into linear_qkv.
    Rename(f"{_L}.input_layernorm.weight", f"{_H}.input_layernorm.weight"),
    Rename(f"{_L}.self_attention.linear_qkv.layer_norm_weight", f"{_H}.input_layernorm.weight"),
    FuseQKV(
        f"{_L}.self_attention.linear_qkv.weight",
        q=f"{_H}.self_attn.q_proj.weight",
        k=f"{_H}.self_attn.k_proj.weight",
        v=f"{_H}.self_attn.v_proj.weight",
    ),
    Rename(f"{_L}.self_attention.q_layernorm.weight", f"{_H}.self_attn.q_norm.weight"),
    Rename(f"{_L}.self_attention.k_layernorm.weight", f"{_H}.self_attn.k_norm.weight"),
    Rename(f"{_L}.self_attention.linear_proj.weight", f"{_H}.self_attn.o_proj.weight", "row"),
    # Dense MLP. Local spec keeps pre_mlp_layernorm; the TE spec fuses it into linear_fc1.
    Rename(f"{_L}.pre_mlp_layernorm.weight", f"{_H}.post_attention_layernorm.weight"),
    Rename(f"{_L}.mlp.linear_fc1.layer_norm_weight", f"{_H}.post_attention_layernorm.weight"),
    FuseGateUp(f"{_L}.mlp.linear_fc1.weight", gate=f"{_H}.mlp.gate_proj.weight", up=f"{_H}.mlp.up_proj.weight"),
    Rename(f"{_L}.mlp.linear_fc2.weight", f"{_H}.mlp.down_proj.weight", "row"),
    Rename("decoder.final_layernorm.weight", "model.norm.weight"),
    VocabRename("output_layer.weight", "lm_head.weight"),
)
"""Qwen3 dense (Qwen3ForCausalLM)."""

_E = f"{_H}.mlp.experts.*"
QWEN3_MOE: tuple[ParamMap, ...] = (
    *QWEN3_DENSE,  # dense entries also cover mlp_only_layers / decoder_sparse_step layers
    Rename(f"{_L}.mlp.router.weight", f"{_H}.mlp.gate.weight"),
    # SequentialMLP (local spec): one module per local expert.
    FuseGateUp(
        f"{_L}.mlp.experts.local_experts.*.linear_fc1.weight",
        gate=f"{_E}.gate_proj.weight",
        up=f"{_E}.up_proj.weight",
    ),
    Rename(f"{_L}.mlp.experts.local_experts.*.linear_fc2.weight", f"{_E}.down_proj.weight", "row"),
    # TEGroupedMLP (TE spec with grouped GEMM): one parameter per local expert, suffixed with its index.
    FuseGateUp(f"{_L}.mlp.experts.linear_fc1.weight*", gate=f"{_E}.gate_proj.weight", up=f"{_E}.up_proj.weight"),
    Rename(f"{_L}.mlp.experts.linear_fc2.weight*", f"{_E}.down_proj.weight", "row"),
)
"""Qwen3-MoE (Qwen3MoeForCausalLM), HF hub format with one tensor per expert."""

TABLES: dict[str, tuple[ParamMap, ...]] = {"qwen3": QWEN3_DENSE, "qwen3_moe": QWEN3_MOE}
"""HF ``model_type`` -> table."""


def table_for(hf_config: Any) -> tuple[ParamMap, ...]:
    """The table for an HF config, by its ``model_type``."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in TABLES:
        raise ValueError(f"model_type={model_type!r} has no HF<->Megatron table; supported: {sorted(TABLES)}.")
    return TABLES[model_type]


@dataclass(frozen=True)
class ResolvedParam:
    """One Megatron parameter of a built model, with the concrete HF names it maps to."""

    megatron_name: str
    mapping: ParamMap
    hf_names: tuple[str, ...]
    layer: int | None
    expert: int | None
    """Global expert index (after EP renumbering), or None for non-expert parameters."""


def resolve_names(
    table: Sequence[ParamMap],
    megatron_names: Iterable[str],
    *,
    ep_rank: int = 0,
    num_local_experts: int = 1,
    layer_offset: int = 0,
) -> list[ResolvedParam]:
    """Map each (local) Megatron parameter name of a built model to its table entry and global HF names.

    Local expert ``i`` on EP rank ``ep_rank`` becomes global expert ``ep_rank * num_local_experts + i``; local layer
    ``l`` becomes ``l + layer_offset`` (pipeline stages). Names no entry matches, or that two entries match, are all
    reported in one ValueError.
    """
    resolved: list[ResolvedParam] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for name in megatron_names:
        hits = [(mapping, indices) for mapping in table if (indices := mapping.match(name)) is not None]
        if not hits:
            unknown.append(name)
            continue
        if len(hits) > 1:
            ambiguous.append(f"{name} ({[m.megatron for m, _ in hits]})")
            continue
        mapping, indices = hits[0]
        layer = indices[0] + layer_offset if indices else None
        expert = global_expert_index(indices[1], ep_rank, num_local_experts) if mapping.is_expert else None
        global_indices = tuple(i for i in (layer, expert) if i is not None)
        resolved.append(ResolvedParam(name, mapping, mapping.hf_names(global_indices), layer, expert))
    if unknown or ambiguous:
        raise ValueError(
            "Megatron parameters without exactly one HF mapping entry: "
            + (f"unknown {unknown}" if unknown else "")
            + (f" ambiguous {ambiguous}" if ambiguous else "")
            + ". Extend the architecture's table in megatron_dispo/models/mapping.py."
        )
    return resolved
