"""Build a Megatron-Core ``GPTModel`` for a Hugging Face Qwen3 / Qwen3-MoE config, and run it to vocab-parallel logits.

The mapping HF config -> ``TransformerConfig`` is written out field by field in :func:`transformer_config_from_hf`
(RMSNorm, qk-layernorm, SwiGLU, GQA, RoPE theta, untied embeddings, no bias; MoE: softmax router over experts, top-k,
renormalised when ``norm_topk_prob``), so a reader can check it against the HF modelling code. The layer spec is
Transformer Engine's when TE imports (needed for FP8), Megatron's local spec otherwise. Parameters are initialised on
the CPU from one seed (``use_cpu_initialization``), which makes the full weights identical at any TP/EP layout.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_dispo.models.parallel import (
    ParallelConfig,
    global_param_name,
    parallel_seed,
    pipeline_layer_offset,
    shard_of_full,
    tensor_parallel_coords,
)

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from transformers import PretrainedConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "build_model",
    "has_transformer_engine",
    "initialize_weights",
    "model_forward_logits",
    "moe_layer_pattern",
    "transformer_config_from_hf",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen3", "qwen3_moe")
_FP8_FORMATS: tuple[str, ...] = ("e4m3", "hybrid")
_FP8_RECIPES: tuple[str, ...] = ("delayed", "tensorwise", "mxfp8", "blockwise")


def has_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (decides the layer spec; FP8 needs it)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _rope_theta(hf_config: PretrainedConfig) -> float:
    """RoPE base: transformers 5 keeps it in ``rope_parameters``, older configs in ``rope_theta``."""
    rope_parameters = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope_parameters.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(
            f"rope_parameters.rope_type={rope_type!r} is not supported (only plain RoPE, 'default'); "
            "remove rope scaling from the HF config or extend builder._rope_theta."
        )
    if theta is None:
        raise ValueError("the HF config has no rope_theta (rope_parameters['rope_theta']); set it in config.json.")
    return float(theta)


def moe_layer_pattern(hf_config: PretrainedConfig) -> list[int]:
    """Per layer 1 (MoE) or 0 (dense MLP), following Qwen3-MoE's ``decoder_sparse_step`` and ``mlp_only_layers``."""
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    dense_layers = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [int(layer not in dense_layers and (layer + 1) % step == 0) for layer in range(hf_config.num_hidden_layers)]


def _check_supported(hf_config: PretrainedConfig) -> bool:
    """Return whether the config is MoE; reject unsupported architectures and options."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}.")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError(
            "tie_word_embeddings=True is not supported (Qwen3 8B/14B/30B-A3B are untied); set it to False in the "
            "HF config or add share_embeddings_and_output_weights support to the builder."
        )
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not supported (Qwen3 has no QKV bias); use a Qwen3 config.")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported; Qwen3 uses 'silu' (SwiGLU).")
    return model_type == "qwen3_moe"


def _check_fp8(fp8: str | None, fp8_recipe: str) -> None:
    if fp8 is None:
        return
    if fp8 not in _FP8_FORMATS:
        raise ValueError(f"fp8={fp8!r} is not a known FP8 format; use one of {list(_FP8_FORMATS)} or None.")
    if fp8_recipe not in _FP8_RECIPES:
        raise ValueError(f"fp8_recipe={fp8_recipe!r} is not a known recipe; use one of {list(_FP8_RECIPES)}.")
    if not has_transformer_engine():
        raise ValueError(
            f"fp8={fp8!r} needs Transformer Engine, which does not import here (it needs CUDA); install "
            "transformer-engine on a GPU machine or set fp8=None."
        )


def transformer_config_from_hf(
    hf_config: PretrainedConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    **overrides: Any,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` equivalent to a Qwen3 / Qwen3-MoE HF config, with the given parallel layout.

    ``overrides`` replace any ``TransformerConfig`` field after the mapping (e.g. ``moe_token_dispatcher_type``,
    ``moe_aux_loss_coeff``, ``recompute_granularity``). Raises ``ValueError`` for unsupported configs or layouts.
    """
    from megatron.core.transformer import TransformerConfig

    is_moe = _check_supported(hf_config)
    _check_fp8(fp8, fp8_recipe)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype={params_dtype} is not supported; use torch.float32, bfloat16 or float16.")
    num_experts = int(hf_config.num_experts) if is_moe else 0
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    smallest_world = math.lcm(tp * pp, parallel.expert_model_parallel_size * parallel.expert_tensor_size * pp)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else smallest_world
    parallel.validate(
        world_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        num_experts=num_experts,
        num_layers=hf_config.num_hidden_layers,
    )
    if hf_config.vocab_size % parallel.tensor_model_parallel_size != 0:
        raise ValueError(
            f"vocab_size ({hf_config.vocab_size}) must be a multiple of tensor_model_parallel_size "
            f"({parallel.tensor_model_parallel_size}) for the vocab-parallel embedding and output layer; pad the "
            "vocabulary or pick a TP size that divides it."
        )
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    fields: dict[str, Any] = {
        # parallel layout
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "expert_model_parallel_size": parallel.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallel.expert_tensor_parallel_size,
        "sequence_parallel": parallel.sequence_parallel and tp > 1,
        # model architecture (Qwen3)
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "ffn_hidden_size": hf_config.intermediate_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": hf_config.num_key_value_heads,
        "kv_channels": head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf_config.rms_norm_eps),
        "qk_layernorm": True,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": float(getattr(hf_config, "initializer_range", 0.02)),
        "attention_softmax_in_fp32": True,
        # numerics / kernels: the portable path (fusions need CUDA kernels or Apex/TE)
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        # micro-batches differ in [batch, seq]: pipeline stages exchange each activation's shape before it
        "variable_seq_lengths": pp > 1,
        "moe_token_dispatcher_type": "alltoall",  # Megatron refuses its default (allgather) with variable lengths
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        # Megatron's own init depends on the layout (EP ranks draw experts from one RNG stream); build_model()
        # overwrites every tensor from (seed, global name), see initialize_weights(). Megatron's init still runs
        # because it also tags the TP-split parameters (tensor_model_parallel, partition_dim, partition_stride).
        "use_cpu_initialization": not torch.cuda.is_available(),
        "perform_initialization": True,
        "transformer_impl": "transformer_engine" if has_transformer_engine() else "local",
    }
    if fp8 is not None:
        fields |= {"fp8": fp8, "fp8_recipe": fp8_recipe}
    if is_moe:
        fields |= {
            "num_moe_experts": num_experts,
            "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
            "moe_layer_freq": moe_layer_pattern(hf_config),
            "moe_router_topk": hf_config.num_experts_per_tok,
            "moe_router_score_function": "softmax",
            # norm_topk_prob=True: softmax over the top-k logits == renormalised top-k of the full softmax (HF).
            "moe_router_pre_softmax": not bool(getattr(hf_config, "norm_topk_prob", False)),
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            "moe_grouped_gemm": False,
            "moe_permute_fusion": False,
            "moe_router_dtype": "fp32",
        }
    unknown = set(overrides) - set(TransformerConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"overrides {sorted(unknown)} are not TransformerConfig fields; check the spelling.")
    fields |= overrides
    return TransformerConfig(**fields)


def _layer_spec(config: TransformerConfig) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = config.transformer_impl == "transformer_engine"
    return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization)


def build_model(
    hf_config: PretrainedConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    seed: int | None = None,
    initialize: bool = True,
    **overrides: Any,
) -> GPTModel:
    """This rank's ``GPTModel`` shard (pipeline stage, TP/EP slices) for the HF config; needs initialize_parallel().

    Weights come from :func:`initialize_weights` with ``seed`` (default: the seed of initialize_parallel()), identical
    at any layout. ``initialize=False`` is for a model whose HF weights are loaded next: no random draw at all
    (Megatron's init methods become no-ops that only tag the TP-split parameters, and :func:`initialize_weights` is
    skipped), so every parameter holds uninitialised memory until the load. On GPU the model lives on the current
    device. The output layer returns vocab-parallel logits ([b, s, V/TP]); reduce them with vocab-parallel ops rather
    than all-gathering the vocabulary.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("build_model() needs the parallel state; call initialize_parallel(parallel) first.")
    if not initialize:  # Megatron still runs its init to tag TP-split parameters; make the draw itself a no-op
        overrides = {"init_method": _no_init, "output_layer_init_method": _no_init, **overrides}
    config = transformer_config_from_hf(
        hf_config, parallel, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe, **overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=_rope_theta(hf_config),
    )
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    if initialize:
        initialize_weights(model, parallel_seed() if seed is None else seed)
    return model


def _no_init(tensor: torch.Tensor) -> None:
    """Init method for weights about to be overwritten by a checkpoint: leaves the tensor as allocated."""


def initialize_weights(model: torch.nn.Module, seed: int) -> None:
    """Layout-independent init: each full tensor is drawn from a generator seeded by (seed, global name), then sliced.

    Same seed -> identical full weights at any TP/EP/PP layout. Distributions follow Megatron's: norms 1, output
    projections (``linear_proj``, ``linear_fc2``) N(0, (std / sqrt(2 L))^2), every other matrix N(0, std^2).
    """
    config = model.config
    output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    layer_offset = pipeline_layer_offset(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_name = global_param_name(name, config.num_moe_experts, layer_offset)
            full_shape = _full_shape(name, param)
            generator = torch.Generator(device=param.device)
            generator.manual_seed(zlib.crc32(f"{seed}:{full_name}".encode()))
            if "norm" in full_name.rsplit(".", 2)[-2] or full_name.endswith("layer_norm_weight"):
                full = torch.ones(full_shape, device=param.device)
            elif full_name.endswith("bias"):
                full = torch.zeros(full_shape, device=param.device)
            else:
                std = output_std if full_name.endswith(("linear_proj.weight", "linear_fc2.weight")) else None
                std = config.init_method_std if std is None else std
                full = torch.empty(full_shape, device=param.device).normal_(0.0, std, generator=generator)
            param.copy_(shard_of_full(name, param, full).to(param.dtype))


def _full_shape(name: str, param: torch.Tensor) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        _, size, _ = tensor_parallel_coords(name)
        shape[int(param.partition_dim)] *= size
    return tuple(shape)


def model_forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vocab-parallel logits [b, s, V/TP] of ``input_ids`` [b, s] (causal; right padding needs no mask).

    ``model`` is a ``GPTModel`` or a Megatron DDP wrapper around one. With PP > 1 call it only as the forward step
    of Megatron's pipeline schedule (``MegatronPolicy`` does): a stage other than the first reads its input from the
    previous stage (``set_input_tensor``), and a stage other than the last returns its hidden states [s, b, h]
    instead of logits. With sequence parallelism, s must be a multiple of the TP size.
    """
    from megatron.core import parallel_state

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
    batch, seq = input_ids.shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    inner = getattr(model, "module", model)
    if getattr(inner.config, "sequence_parallel", False) and seq % tp != 0:
        raise ValueError(
            f"with sequence_parallel the sequence length ({seq}) must be a multiple of the TP size ({tp}); pad the "
            "batch to a multiple of TP."
        )
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
