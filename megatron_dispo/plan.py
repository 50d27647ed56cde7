"""Plan a run for a cluster size without starting anything: parallel layout, engine placement, per-GPU memory.

``megatron-dispo plan CONFIG --nodes N --gpus-per-node G`` (see :mod:`megatron_dispo.plan_cli`) calls
:func:`make_plan`. Everything here is arithmetic on the config and the model's architecture numbers (the HF
``config.json`` when ``model.hf_path`` exists on this machine, else a preset of :mod:`megatron_dispo.models.presets`);
no process group, Megatron, vLLM or GPU is touched. Impossible layouts raise :class:`PlanError`, a one-line message
naming the dotted config fields, their values, the rule and the fix.

Memory model, per GPU, in bytes (the GiB figures of ``docs/launch.md`` come from here):

- **weights**: the rank's shard in ``model.params_dtype``: per transformer layer the TP-split matrices / TP, norms and
  the MoE router replicated, experts / EP each split / ETP; embedding on the first pipeline stage and the output layer
  on the last, both / TP. ``model.fp8`` adds 1 byte per local linear weight (Transformer Engine's cached FP8 cast).
- **gradients**: Megatron DDP's contiguous grad buffer covers every local parameter (the distributed optimizer
  reduce-scatters into it, it does not shrink it): 4 bytes each with ``optim.grad_reduce_in_fp32``, else the param size.
- **optimizer**: Adam with bf16 params keeps an fp32 master copy + 2 fp32 moments (12 B/param); fp32 params only the
  moments (8 B). ``use_distributed_optimizer`` shards them over DP x CP (dense) and expert-DP = world / (EP x ETP x PP).
- **activations**: bf16 tensors saved for backward at ``trainer.max_tokens_per_microbatch`` tokens, or the longest
  sequence (``data.max_prompt_tokens + rollout.max_new_tokens``) when that is longer, / CP; counted
  per token and layer as in Korthikanti et al. 2022 (arXiv:2205.05198, Sec. 4) but for Qwen3's layer with flash
  attention (no s^2 term, no dropout masks): see :func:`activation_bytes_per_token`. With SP every term is / TP
  (Megatron saves the sequence-sharded inputs and all-gathers again in backward); without SP the 4 hidden-size
  norm/linear inputs stay whole. 1F1B keeps PP micro-batches in flight on the first stage, so a stage holds
  (layers / PP) x PP = all layers' worth. The last stage also keeps the bf16 vocab-parallel logits (2 x vocab / TP
  bytes per token; the log-prob kernel saves only 3 fp32 numbers per token beyond them). ``full`` recompute keeps
  each layer's input (2 x hidden bytes, / TP with SP) plus one layer's activations while it is recomputed;
  ``selective`` recomputes the s^2 attention tensors that flash attention never stores, so it counts as ``none``.
  FP8 activations are counted as bf16 (an upper bound).
- **engine**: vLLM runs colocated and takes ``rollout.gpu_memory_utilization`` x GPU memory (weights + KV cache). Its
  weights are the full model / engine TP (experts included), bf16 (``rollout.dtype``) or, for an FP8 engine
  (``rollout.quantization=fp8``, refitted with ``refit.fp8``), 1 byte per linear weight plus a float32
  ``weight_scale_inv`` per 128 x 128 block; the KV cache is what the fraction leaves after the weights (vLLM's own
  activation workspace comes out of that too, so the KV figure is an upper bound), shown with how many
  ``rollout.max_model_len`` sequences fit.
- **phases**: the engine sleeps (level 2: weights and KV cache discarded, the refit rewrites the weights) while the
  trainer runs, and the trainer's weights, grad buffers and optimizer states stay on the GPU throughout. So the
  rollout phase holds trainer state + the engine's fraction, the training phase trainer state + activations; each
  plus ``reserve`` (CUDA context, NCCL, allocator fragmentation) must fit the GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_dispo.config import Config
from megatron_dispo.models.presets import PRESETS

__all__ = ["GIB", "MemoryPlan", "ModelArch", "Plan", "PlanError", "activation_bytes_per_token", "make_plan"]

GIB = 1 << 30
FP8_BLOCK_ELEMENTS = 128 * 128
"""Weights per float32 ``weight_scale_inv`` of the FP8 engine (``rollout/fp8_engine.py``)."""
Recompute = Literal["none", "selective", "full"]


class PlanError(ValueError):
    """A layout or budget that cannot work; the message is one line naming the fields, values, rule and fix."""


@dataclass(frozen=True)
class ModelArch:
    """Architecture numbers of a Qwen3 / Qwen3-MoE model (HF ``config.json`` names in the docstrings)."""

    name: str
    """Where the numbers came from: a config.json path or a preset name."""
    hidden_size: int
    ffn_hidden_size: int
    """intermediate_size (dense MLP layers)."""
    num_layers: int
    """num_hidden_layers."""
    num_attention_heads: int
    num_kv_heads: int
    """num_key_value_heads."""
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    num_experts: int = 0
    """0 for a dense model."""
    experts_per_token: int = 0
    """num_experts_per_tok (top-k)."""
    moe_ffn_hidden_size: int = 0
    """moe_intermediate_size (one expert's FFN width)."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: MoE (True) or dense MLP (False); from decoder_sparse_step and mlp_only_layers."""

    @classmethod
    def from_hf_fields(cls, name: str, fields: Mapping[str, Any], moe: bool) -> ModelArch:
        """Read the fields the planner needs from an HF config mapping (config.json or a preset's ``hf_fields``)."""
        layers = int(fields["num_hidden_layers"])
        heads = int(fields["num_attention_heads"])
        hidden = int(fields["hidden_size"])
        moe_layers: tuple[bool, ...] = (False,) * layers
        if moe:
            step = int(fields.get("decoder_sparse_step", 1) or 1)
            dense = set(fields.get("mlp_only_layers") or [])
            moe_layers = tuple(layer not in dense and (layer + 1) % step == 0 for layer in range(layers))
        return cls(
            name=name,
            hidden_size=hidden,
            ffn_hidden_size=int(fields["intermediate_size"]),
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=int(fields.get("num_key_value_heads") or heads),
            head_dim=int(fields.get("head_dim") or hidden // heads),
            vocab_size=int(fields["vocab_size"]),
            tied_embeddings=bool(fields.get("tie_word_embeddings", False)),
            num_experts=int(fields.get("num_experts", 0) or 0) if moe else 0,
            experts_per_token=int(fields.get("num_experts_per_tok", 0) or 0) if moe else 0,
            moe_ffn_hidden_size=int(fields.get("moe_intermediate_size", 0) or 0) if moe else 0,
            moe_layers=moe_layers,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_linear_params(self) -> int:
        """QKV and output projections of one layer (split over TP)."""
        return self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size

    @property
    def layer_norm_params(self) -> int:
        """Two RMSNorms + q/k norms of one layer (replicated over TP)."""
        return 2 * self.hidden_size + 2 * self.head_dim

    @property
    def dense_mlp_params(self) -> int:
        """SwiGLU MLP: gate, up, down."""
        return 3 * self.hidden_size * self.ffn_hidden_size

    @property
    def expert_params(self) -> int:
        """One routed expert (SwiGLU of width moe_ffn_hidden_size)."""
        return 3 * self.hidden_size * self.moe_ffn_hidden_size

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """One vocab x hidden matrix (the input embedding; the output layer is another unless tied)."""
        return self.vocab_size * self.hidden_size

    def linear_params(self) -> int:
        """All attention / MLP / expert projections (what FP8 quantises; embeddings, norms, routers excluded)."""
        moe = sum(self.moe_layers)
        dense = self.num_layers - moe
        return (
            self.num_layers * self.attention_linear_params
            + dense * self.dense_mlp_params
            + moe * self.num_experts * self.expert_params
        )

    def count(self) -> tuple[int, int]:
        """(total, active per token) parameters, embeddings included (same rule as ``presets.count_parameters``)."""
        moe = sum(self.moe_layers)
        dense = self.num_layers - moe
        shared = (
            self.embedding_params * (1 if self.tied_embeddings else 2)
            + self.hidden_size  # final norm
            + self.num_layers * (self.attention_linear_params + self.layer_norm_params)
            + dense * self.dense_mlp_params
            + moe * self.router_params
        )
        total = shared + moe * self.num_experts * self.expert_params
        active = shared + moe * self.experts_per_token * self.expert_params
        return total, active


def resolve_model(config: Config, preset: str | None = None) -> ModelArch:
    """Architecture of the run's model: ``preset`` if given, else ``model.hf_path``/config.json, else the preset the
    folder name spells (``/models/Qwen3-8B-Base`` -> ``qwen3-8b``)."""
    if preset is None:
        config_json = Path(config.model.hf_path) / "config.json"
        if config_json.is_file():
            try:
                fields = json.loads(config_json.read_text())
                return ModelArch.from_hf_fields(str(config_json), fields, moe=fields.get("model_type") == "qwen3_moe")
            except (ValueError, KeyError, TypeError) as exc:
                raise PlanError(
                    f"{config_json} (model.hf_path) is not a readable Qwen3 config.json ({type(exc).__name__}: {exc}); "
                    "fix the file or pass --model-preset."
                ) from exc
        preset = _preset_from_path(config.model.hf_path)
        if preset is None:
            raise PlanError(
                f"model.hf_path={config.model.hf_path!r} has no config.json on this machine and its name matches no "
                f"model preset; pass --model-preset, one of {_table_presets()}."
            )
    if preset not in _table_presets():
        valid = _table_presets()
        raise PlanError(f"--model-preset={preset!r} is not a preset with architecture numbers; use one of {valid}.")
    entry = PRESETS[preset]
    return ModelArch.from_hf_fields(f"preset {preset}", entry.hf_fields, moe=entry.moe)


def _table_presets() -> list[str]:
    """Presets defined by their HF fields (the tiny ones are built by code and need transformers)."""
    return sorted(name for name, preset in PRESETS.items() if preset.hf_fields)


def _preset_from_path(hf_path: str) -> str | None:
    name = Path(hf_path.rstrip("/")).name.lower()
    for suffix in ("-base", "-instruct", "-fp8"):
        name = name.removesuffix(suffix)
    return name if name in _table_presets() else None


def activation_bytes_per_token(arch: ModelArch, moe_layer: bool, etp: int = 1) -> tuple[int, int]:
    """bf16 bytes one token keeps for backward in one layer, as (split over TP, whole on every TP rank without SP).

    Attention: input-norm input and output (2h), q/k-norm inputs (q + kv), flash-attention Q, K, V (q + 2kv) and its
    output = projection input (q). Dense MLP: norm input and output (2h), fc1 output gate+up (2f), fc2 input (f).
    MoE MLP: norm input and output (2h), fp32 router logits and probabilities (2 x 4E bytes), then per routed copy
    (top-k of them): fc1 input (h), fc1 output (2f_e), fc2 input (f_e) and the expert output kept for the
    probability-weighted unpermute (h). The 4h of norm inputs / outputs is the part SP shards; the rest is always
    split over TP (heads, FFN columns, or, for MoE with SP, the token shard the rank dispatches). With expert TP
    (``etp``) > 1 the ETP group all-gathers the routed tokens, so each rank keeps ``etp`` x the fc1 inputs (the expert
    widths are split ``etp`` ways, which the division by TP already covers when ETP = TP).
    """
    h, q, kv = arch.hidden_size, arch.q_size, arch.kv_size
    whole = 2 * (4 * h)  # two norms: input and output each
    split = 2 * ((q + kv) + (q + 2 * kv) + q)
    if moe_layer:
        routed = (etp + 1) * h + 3 * arch.moe_ffn_hidden_size
        split += 2 * 4 * arch.num_experts + 2 * arch.experts_per_token * routed
    else:
        split += 2 * 3 * arch.ffn_hidden_size
    return split, whole


@dataclass(frozen=True)
class Layout:
    """Training layout and engine placement for one cluster size."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    sp: bool
    distributed_optimizer: bool
    engine_tp: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Dense data-parallel size: world / (TP x PP x CP)."""
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Expert data-parallel size: world / (EP x ETP x PP)."""
        return self.world // (self.ep * self.etp * self.pp)

    @property
    def engine_replicas(self) -> int:
        return self.world // self.engine_tp

    def engine_replica_ranks(self, replica: int) -> range:
        """Global ranks of one engine replica: consecutive, inside one node (engine TP divides GPUs per node)."""
        return range(replica * self.engine_tp, (replica + 1) * self.engine_tp)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of the most loaded pipeline stage (see the module docstring for each item)."""

    local_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    engine_budget: int
    engine_weights: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_sequences: int
    """How many rollout.max_model_len sequences the KV cache holds."""
    reserve: int
    gpu: int

    @property
    def trainer_state(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def training_phase(self) -> int:
        return self.trainer_state + self.activations + self.reserve

    @property
    def rollout_phase(self) -> int:
        return self.trainer_state + self.engine_budget + self.reserve

    @property
    def peak(self) -> int:
        return max(self.training_phase, self.rollout_phase)


@dataclass(frozen=True)
class Plan:
    """What :func:`make_plan` found: the model, the layout and the per-GPU memory of a layout that works."""

    arch: ModelArch
    layout: Layout
    memory: MemoryPlan
    recompute: Recompute
    tokens_per_microbatch: int


def _check_layout(config: Config, arch: ModelArch, lay: Layout) -> None:
    """Raise PlanError for the first rule the layout breaks (fields named as in the YAML)."""
    mp = "model.parallel."
    if lay.nodes < 1 or lay.gpus_per_node < 1:
        raise PlanError(f"--nodes={lay.nodes} and --gpus-per-node={lay.gpus_per_node} must both be >= 1.")
    if lay.world % (lay.tp * lay.pp * lay.cp):
        raise PlanError(
            f"world {lay.world} (--nodes {lay.nodes} x --gpus-per-node {lay.gpus_per_node}) is not divisible by "
            f"{mp}tensor_model_parallel_size ({lay.tp}) x pipeline_model_parallel_size ({lay.pp}) x "
            f"context_parallel_size ({lay.cp}) = {lay.tp * lay.pp * lay.cp}; change the node count or lower TP/PP/CP."
        )
    if lay.world % (lay.ep * lay.etp * lay.pp):
        raise PlanError(
            f"world {lay.world} is not divisible by {mp}expert_model_parallel_size ({lay.ep}) x "
            f"expert_tensor_parallel_size ({lay.etp}) x pipeline_model_parallel_size ({lay.pp}) = "
            f"{lay.ep * lay.etp * lay.pp}; change the node count or lower EP/ETP."
        )
    for field_name, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_kv_heads),
        ("vocab_size", arch.vocab_size),
    ):
        if value % lay.tp:
            raise PlanError(
                f"{field_name} ({value}) of {arch.name} is not divisible by {mp}tensor_model_parallel_size "
                f"({lay.tp}); use a TP size that divides {value}."
            )
    if arch.num_layers % lay.pp:
        raise PlanError(
            f"num_hidden_layers ({arch.num_layers}) of {arch.name} is not divisible by "
            f"{mp}pipeline_model_parallel_size ({lay.pp}); use a PP size that divides {arch.num_layers}."
        )
    if not arch.is_moe and lay.ep > 1:
        raise PlanError(
            f"{mp}expert_model_parallel_size={lay.ep} needs a MoE model but {arch.name} is dense; set it to 1."
        )
    if arch.is_moe and arch.num_experts % lay.ep:
        raise PlanError(
            f"num_experts ({arch.num_experts}) of {arch.name} is not divisible by {mp}expert_model_parallel_size "
            f"({lay.ep}); use an EP size that divides {arch.num_experts}."
        )
    if arch.is_moe and arch.moe_ffn_hidden_size % lay.etp:
        raise PlanError(
            f"moe_intermediate_size ({arch.moe_ffn_hidden_size}) is not divisible by "
            f"{mp}expert_tensor_parallel_size ({lay.etp}); use an ETP size that divides it."
        )
    if lay.sp and lay.tp == 1:
        fix = "set sequence_parallel to false at TP=1"
        raise PlanError(f"{mp}sequence_parallel=true needs {mp}tensor_model_parallel_size > 1; {fix}.")
    if arch.is_moe and lay.tp > 1 and not lay.sp:
        raise PlanError(
            f"a MoE model with {mp}tensor_model_parallel_size={lay.tp} needs {mp}sequence_parallel=true (Megatron's "
            "MoE layer requires it in training); set it."
        )
    if lay.engine_tp < 1 or lay.gpus_per_node % lay.engine_tp:
        raise PlanError(
            f"engine TP (rollout.tensor_parallel_size / --engine-tp) {lay.engine_tp} does not divide --gpus-per-node "
            f"{lay.gpus_per_node}: an engine replica must sit inside one node; use a divisor of {lay.gpus_per_node}."
        )
    if arch.num_attention_heads % lay.engine_tp:
        raise PlanError(
            f"num_attention_heads ({arch.num_attention_heads}) of {arch.name} is not divisible by engine TP "
            f"(rollout.tensor_parallel_size / --engine-tp) {lay.engine_tp}; use a divisor of both."
        )
    per_minibatch = config.trainer.prompts_per_step // config.trainer.num_minibatches
    if per_minibatch % lay.dp:
        raise PlanError(
            f"trainer.prompts_per_step / trainer.num_minibatches = {per_minibatch} prompts per mini-batch do not split "
            f"over DP {lay.dp} (world {lay.world} / TP x PP x CP); make it a multiple of {lay.dp}."
        )


def _stage_layers(arch: ModelArch, pp: int, stage: int) -> tuple[bool, ...]:
    per_stage = arch.num_layers // pp
    return arch.moe_layers[stage * per_stage : (stage + 1) * per_stage]


def _stage_params(arch: ModelArch, lay: Layout, stage: int) -> tuple[int, int, int]:
    """(dense, expert, linear) parameters one rank of pipeline ``stage`` holds."""
    layers = _stage_layers(arch, lay.pp, stage)
    moe = sum(layers)
    dense_layers = len(layers) - moe
    linear_dense = len(layers) * arch.attention_linear_params // lay.tp + dense_layers * arch.dense_mlp_params // lay.tp
    expert = moe * (arch.num_experts // lay.ep) * arch.expert_params // lay.etp
    dense = linear_dense + len(layers) * arch.layer_norm_params + moe * arch.router_params
    first, last = stage == 0, stage == lay.pp - 1
    if first:
        dense += arch.embedding_params // lay.tp
    if last:
        dense += arch.hidden_size  # final norm
        if not (arch.tied_embeddings and first):
            dense += arch.embedding_params // lay.tp
    return dense, expert, linear_dense + expert


def _stage_activations(arch: ModelArch, lay: Layout, stage: int, tokens: int, recompute: Recompute) -> int:
    """Activation bytes of one rank of ``stage`` (1F1B: PP - stage micro-batches in flight)."""
    in_flight = lay.pp - stage

    def per_token(moe_layer: bool) -> int:
        split, whole = activation_bytes_per_token(arch, moe_layer, lay.etp)
        return (split + whole) // lay.tp if lay.sp else split // lay.tp + whole

    layers = _stage_layers(arch, lay.pp, stage)
    if recompute == "full":
        layer_input = 2 * arch.hidden_size // (lay.tp if lay.sp else 1)
        kept = len(layers) * layer_input * in_flight + max(per_token(m) for m in layers)
    else:
        kept = sum(per_token(m) for m in layers) * in_flight
    if stage == lay.pp - 1:
        kept += 2 * arch.vocab_size // lay.tp  # bf16 vocab-parallel logits
    return kept * tokens


def make_plan(
    config: Config,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gib: float = 80.0,
    reserve_gib: float = 2.0,
    engine_tp: int | None = None,
    model_preset: str | None = None,
    recompute: Recompute | None = None,
) -> Plan:
    """Layout and per-GPU memory of ``config`` on ``nodes`` x ``gpus_per_node`` GPUs; PlanError if it cannot work.

    ``engine_tp`` / ``recompute`` default to ``rollout.tensor_parallel_size`` / ``model.recompute_granularity`` when
    the config has those fields, else 1 / ``none`` (what the trainer builds today).
    """
    arch = resolve_model(config, model_preset)
    par = config.model.parallel
    if engine_tp is None:
        engine_tp = int(getattr(config.rollout, "tensor_parallel_size", 1))
    if recompute is None:
        recompute = getattr(config.model, "recompute_granularity", None) or "none"
    if recompute not in ("none", "selective", "full"):
        raise PlanError(
            f"recompute={recompute!r} is not a Megatron recompute granularity; use none, selective or full."
        )
    lay = Layout(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tp=par.tensor_model_parallel_size,
        pp=par.pipeline_model_parallel_size,
        cp=int(getattr(par, "context_parallel_size", 1)),
        ep=par.expert_model_parallel_size,
        etp=par.expert_tensor_size,
        sp=par.sequence_parallel,
        distributed_optimizer=par.use_distributed_optimizer,
        engine_tp=engine_tp,
    )
    _check_layout(config, arch, lay)
    # trainer.batching.pack_microbatches gives a sequence longer than the budget a micro-batch of its own
    longest = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    tokens = math.ceil(max(config.trainer.max_tokens_per_microbatch, longest) / lay.cp)
    param_bytes = 2 if config.model.params_dtype == "bfloat16" else 4
    grad_bytes = 4 if config.optim.grad_reduce_in_fp32 else param_bytes
    optim_bytes = 12 if param_bytes == 2 else 8
    dense_shards = lay.dp * lay.cp if lay.distributed_optimizer else 1
    expert_shards = lay.expert_dp if lay.distributed_optimizer else 1

    stages = []
    for stage in {0, lay.pp - 1}:
        dense, expert, linear = _stage_params(arch, lay, stage)
        local = dense + expert
        weights = local * param_bytes + (linear if config.model.fp8 else 0)
        optimizer = optim_bytes * (math.ceil(dense / dense_shards) + math.ceil(expert / expert_shards))
        activations = _stage_activations(arch, lay, stage, tokens, recompute)
        stages.append((weights + local * grad_bytes + optimizer + activations, local, weights, optimizer, activations))
    _, local, weights, optimizer, activations = max(stages)

    engine_dtype = 2 if config.rollout.dtype == "bfloat16" else 4
    engine_weights = _engine_weight_bytes(config, arch, engine_dtype) // lay.engine_tp
    kv_heads = math.ceil(arch.num_kv_heads / lay.engine_tp)  # vLLM replicates KV heads when engine TP > KV heads
    kv_per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * engine_dtype
    gpu = int(gpu_memory_gib * GIB)
    engine_budget = int(config.rollout.gpu_memory_utilization * gpu)
    kv_cache = engine_budget - engine_weights
    memory = MemoryPlan(
        local_params=local,
        weights=weights,
        gradients=local * grad_bytes,
        optimizer=optimizer,
        activations=activations,
        engine_budget=engine_budget,
        engine_weights=engine_weights,
        kv_cache=kv_cache,
        kv_bytes_per_token=kv_per_token,
        kv_sequences=max(0, kv_cache // (kv_per_token * config.rollout.max_model_len)),
        reserve=int(reserve_gib * GIB),
        gpu=gpu,
    )
    _check_memory(config, lay, memory, gpu_memory_gib, longest)
    return Plan(arch=arch, layout=lay, memory=memory, recompute=recompute, tokens_per_microbatch=tokens)


def _engine_weight_bytes(config: Config, arch: ModelArch, engine_dtype: int) -> int:
    """The whole model's bytes in the engine: ``engine_dtype`` per weight, or for an FP8 engine 1 byte per linear
    weight plus a float32 ``weight_scale_inv`` per 128 x 128 block."""
    total, _ = arch.count()
    fp8_engine = config.rollout.quantization == "fp8"
    if config.refit.fp8 != fp8_engine:
        raise PlanError(
            f"refit.fp8={config.refit.fp8} but rollout.quantization={config.rollout.quantization!r}: FP8 refits fit "
            "only an FP8 engine; set both (refit.fp8=true, rollout.quantization=fp8) or neither."
        )
    if not fp8_engine:
        return total * engine_dtype
    linear = arch.linear_params()
    scales = linear // FP8_BLOCK_ELEMENTS * 4  # Qwen3's projection dims are multiples of 128
    return linear + scales + (total - linear) * engine_dtype


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _check_memory(config: Config, lay: Layout, mem: MemoryPlan, gpu_memory_gib: float, longest: int) -> None:
    util = config.rollout.gpu_memory_utilization
    if mem.kv_sequences < 1:
        raise PlanError(
            f"rollout.gpu_memory_utilization={util} gives the engine {_gib(mem.engine_budget)}, which after "
            f"{_gib(mem.engine_weights)} of weights (engine TP {lay.engine_tp}) holds no rollout.max_model_len="
            f"{config.rollout.max_model_len} sequence ({_gib(mem.kv_bytes_per_token * config.rollout.max_model_len)} "
            "of KV cache); raise gpu_memory_utilization or the engine TP (--engine-tp), or lower max_model_len."
        )
    if mem.training_phase > mem.gpu:
        raise PlanError(
            f"training phase needs {_gib(mem.training_phase)} per GPU > --gpu-memory-gib {gpu_memory_gib:g} "
            f"(trainer state {_gib(mem.trainer_state)}, activations {_gib(mem.activations)} at "
            f"trainer.max_tokens_per_microbatch={config.trainer.max_tokens_per_microbatch}, longest sequence "
            f"data.max_prompt_tokens + rollout.max_new_tokens={longest}); raise "
            "model.parallel.tensor_model_parallel_size / pipeline_model_parallel_size / expert_model_parallel_size "
            "or lower trainer.max_tokens_per_microbatch (or the sequence lengths)."
        )
    if mem.rollout_phase > mem.gpu:
        raise PlanError(
            f"rollout phase needs {_gib(mem.rollout_phase)} per GPU > --gpu-memory-gib {gpu_memory_gib:g} (trainer "
            f"state {_gib(mem.trainer_state)} + rollout.gpu_memory_utilization={util} x GPU = "
            f"{_gib(mem.engine_budget)}); raise model.parallel.tensor_model_parallel_size / "
            "pipeline_model_parallel_size / expert_model_parallel_size (smaller trainer shard) or lower "
            "rollout.gpu_memory_utilization."
        )
