"""Named model presets: the real Qwen3 architectures (HF ``config.json`` numbers) and tiny ones for tests and demos.

A preset is an HF config (what the builder, the converter and vLLM all read) plus a suggested starting layout for a
node of 8 x 80 GB GPUs. The big presets carry architecture numbers only: real weights come from the HF checkpoint.
Numbers: Qwen/Qwen3-8B, Qwen/Qwen3-14B and Qwen/Qwen3-30B-A3B ``config.json`` (rope_theta 1e6, rms_norm_eps 1e-6,
head_dim 128, vocab 151936, untied embeddings, max_position_embeddings 40960).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_dispo.models.parallel import ParallelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["PRESETS", "ModelPreset", "count_parameters", "preset_hf_config"]

_QWEN3_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "head_dim": 128,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


@dataclass(frozen=True)
class ModelPreset:
    """A named architecture: HF config fields and a suggested layout."""

    name: str
    """Preset name used in configs and on the command line."""
    moe: bool
    """Qwen3-MoE (True) or dense Qwen3 (False)."""
    hf_fields: dict[str, Any] = field(default_factory=dict)
    """Fields of the HF Qwen3Config / Qwen3MoeConfig (architecture numbers)."""
    suggested_parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Starting layout for one node of 8 x 80 GB GPUs (DP takes the remaining ranks)."""
    description: str = ""
    """One line for listings."""
    factory: Callable[..., PretrainedConfig] | None = None
    """Builds the config instead of ``hf_fields`` (tiny presets delegate to models.tiny)."""


def _tiny_factory(moe: bool) -> Callable[..., PretrainedConfig]:
    def build(**overrides: Any) -> PretrainedConfig:
        from megatron_dispo.models.tiny import TOKENIZER_VOCAB_SIZE, tiny_qwen3_config

        vocab_size = overrides.pop("vocab_size", TOKENIZER_VOCAB_SIZE)
        return tiny_qwen3_config(moe=moe, vocab_size=vocab_size, **overrides)

    return build


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="qwen3-8b",
            moe=False,
            hf_fields=_QWEN3_COMMON
            | {
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
            },
            suggested_parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
            description="Qwen3-8B dense: 36 layers, hidden 4096, 32 heads / 8 KV heads, FFN 12288",
        ),
        ModelPreset(
            name="qwen3-14b",
            moe=False,
            hf_fields=_QWEN3_COMMON
            | {
                "hidden_size": 5120,
                "intermediate_size": 17408,
                "num_hidden_layers": 40,
                "num_attention_heads": 40,
                "num_key_value_heads": 8,
            },
            suggested_parallel=ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True),
            description="Qwen3-14B dense: 40 layers, hidden 5120, 40 heads / 8 KV heads, FFN 17408",
        ),
        ModelPreset(
            name="qwen3-30b-a3b",
            moe=True,
            hf_fields=_QWEN3_COMMON
            | {
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "moe_intermediate_size": 768,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "router_aux_loss_coef": 0.001,
            },
            suggested_parallel=ParallelConfig(
                tensor_model_parallel_size=2,
                expert_model_parallel_size=8,
                expert_tensor_parallel_size=1,
                sequence_parallel=True,
                use_distributed_optimizer=True,
            ),
            description="Qwen3-30B-A3B MoE: 48 layers, hidden 2048, 32 / 4 KV heads, 128 experts top-8, expert FFN 768",
        ),
        ModelPreset(
            name="qwen3-1b",
            moe=False,
            hf_fields=_QWEN3_COMMON
            | {
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_hidden_layers": 12,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
            },
            description="~1.2B-param Qwen3-shaped dense model (Qwen3-1.7B widths, 12 layers, untied), GPU benchmarks",
        ),
        ModelPreset(
            name="tiny-qwen3",
            moe=False,
            factory=_tiny_factory(moe=False),
            description="tiny Qwen3 for tests: 2 layers, hidden 128, 4 heads / 2 KV heads (models.tiny)",
        ),
        ModelPreset(
            name="tiny-qwen3-moe",
            moe=True,
            factory=_tiny_factory(moe=True),
            description="tiny Qwen3-MoE for tests: 2 layers, hidden 128, 4 experts top-2 (models.tiny)",
        ),
    )
}


def preset_hf_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The HF config of a preset; ``overrides`` replace fields (e.g. ``num_hidden_layers=4`` for a smoke test)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}.")
    preset = PRESETS[name]
    if preset.factory is not None:
        return preset.factory(**overrides)
    from transformers import Qwen3Config, Qwen3MoeConfig

    fields = dict(preset.hf_fields) | overrides
    rope_theta = fields.pop("rope_theta")
    config_class = Qwen3MoeConfig if preset.moe else Qwen3Config
    config = config_class(**fields, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    return config


def count_parameters(hf_config: PretrainedConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts of a Qwen3 / Qwen3-MoE config, embeddings included.

    Active counts only the routed top-k experts of each MoE layer; used for model-FLOPs utilisation (6 N per token).
    """
    from megatron_dispo.models.builder import moe_layer_pattern

    hidden, vocab = hf_config.hidden_size, hf_config.vocab_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q_size = hf_config.num_attention_heads * head_dim
    kv_size = hf_config.num_key_value_heads * head_dim
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden + 2 * head_dim + 2 * hidden  # + q/k norm, 2 norms
    embeddings = vocab * hidden * (1 if hf_config.tie_word_embeddings else 2) + hidden  # + final norm
    is_moe = getattr(hf_config, "model_type", "") == "qwen3_moe"
    pattern = moe_layer_pattern(hf_config) if is_moe else [0] * hf_config.num_hidden_layers
    total = active = embeddings
    for sparse in pattern:
        if sparse:
            expert = 3 * hidden * hf_config.moe_intermediate_size
            router = hf_config.num_experts * hidden
            total += attention + router + hf_config.num_experts * expert
            active += attention + router + hf_config.num_experts_per_tok * expert
        else:
            dense = 3 * hidden * hf_config.intermediate_size
            total += attention + dense
            active += attention + dense
    return total, active
