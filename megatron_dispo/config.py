"""The run configuration: one typed tree, loaded from YAML with dotted overrides and validated once at start-up.

    megatron-dispo train examples/configs/tiny_cpu_dispo.yaml trainer.max_steps=5 algorithm.preset=cispo

Each component owns its section's dataclass (``RolloutConfig`` in ``rollout/``, ``ParallelConfig`` in ``models/``,
``PolicyLossConfig`` presets in ``algorithms/``...). This module adds the sections that belong to the run as a whole and
the checks that relate sections to each other (batch divisibility, lengths, parallel layout vs world size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.presets import get_preset, preset_names
from megatron_dispo.algorithms.regime_control import RegimeControlConfig, check_regime_control
from megatron_dispo.algorithms.shaping import OverlongConfig
from megatron_dispo.config_loader import ConfigError, load_config
from megatron_dispo.models.config import MoeRoutingReplay, OptimizerSettings, ParallelConfig, RoutingReplayConfig
from megatron_dispo.refit.config import RefitConfig
from megatron_dispo.rewards.config import RewardConfig
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.trainer.config import DynamicSamplingConfig, LoggingConfig

SourceKind = Literal[
    "synthetic_arithmetic", "gsm8k", "math", "math500", "minerva", "aime24", "aime25", "amc23", "jsonl", "parquet",
    "deepmind", "hub", "synthetic_chain",
]  # fmt: skip


@dataclass(frozen=True)
class DataSourceConfig:
    kind: SourceKind = "synthetic_arithmetic"
    """Where problems come from; file kinds need ``path``."""
    weight: float = 1.0
    """Sampling weight in the training mixture."""
    split: str = "train"
    """Split for datasets that have several (gsm8k, math)."""
    path: str | None = None
    """File or folder for jsonl / parquet / deepmind, or the eval-data folder for aime24/aime25/amc23."""
    name: str | None = None
    """Mixture name (defaults to ``kind``); must be unique within a mixture. For ``hub``: the dataset name."""
    num_problems: int = 20000
    """synthetic_arithmetic / synthetic_chain: how many problems to generate."""
    difficulty: int = 1
    """synthetic_arithmetic / synthetic_chain: difficulty level (data.synthetic.LEVELS / data.chained_arithmetic
    .CHAIN_LEVELS)."""
    seed: int = 0
    """synthetic_arithmetic / synthetic_chain: generator seed (use different seeds for train and held-out sets)."""
    problem_field: str = "problem"
    """jsonl / parquet: field holding the problem text."""
    answer_field: str = "answer"
    """jsonl / parquet: field holding the gold answer."""
    skip_malformed: bool = False
    """Skip (and count) malformed rows instead of stopping with file and line."""
    limit: int | None = None
    """Use only the first N problems (after loading)."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight={self.weight} must be > 0.")
        if self.kind in ("jsonl", "parquet", "deepmind") and not self.path:
            raise ValueError(f"kind={self.kind!r} needs path=<file or folder>.")
        if self.kind == "hub" and not self.name:
            raise ValueError("kind='hub' needs name=<dataset name> (see docs/data.md for the supported names).")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1 or null.")

    @property
    def mixture_name(self) -> str:
        return self.name or (self.kind if self.kind != "synthetic_arithmetic" else f"arith_l{self.difficulty}")


@dataclass(frozen=True)
class DataConfig:
    train: tuple[DataSourceConfig, ...] = (DataSourceConfig(),)
    """Training mixture sources."""
    heldout: DataSourceConfig | None = None
    """Held-out set scored every ``eval.every_steps`` steps (accuracy of ``eval.n`` samples per problem)."""
    template: Literal["dapo", "qwen3_boxed", "raw"] = "dapo"
    """Prompt template (paper Fig. 9 DAPO for training)."""
    answer_format: Literal["auto", "dapo", "boxed", "gsm8k"] = "dapo"
    """How answers are extracted from responses."""
    use_chat_template: bool = True
    """Render prompts through the tokenizer's chat template when it has one."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped (and counted), never truncated."""
    seed: int = 0
    """Mixture shuffling seed."""


@dataclass(frozen=True)
class ModelConfig:
    hf_path: str = ""
    """HF checkpoint folder (config.json + safetensors + tokenizer) the run starts from."""
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Training parameter dtype (bfloat16 on GPUs, float32 on CPU)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """Transformer Engine FP8 format (needs TE and a GPU)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe_routing_replay: MoeRoutingReplay = "none"
    """MoE rollout routing replay (R3, arXiv 2510.11370). ``rollout``: the trainer's pi_old and update forwards use
    the experts the engine routed each token to (turns on ``rollout.capture_routed_experts``); ``none``: the trainer
    routes itself."""

    def __post_init__(self) -> None:
        RoutingReplayConfig(self.moe_routing_replay)  # validates the value


@dataclass(frozen=True)
class AlgorithmConfig:
    preset: str = "dispo"
    """Loss preset (paper configurations and ablations): see algorithms.presets."""
    loss_overrides: dict[str, float | str] = field(default_factory=dict)
    """Fields replacing the preset's, e.g. {eps_high_pos: 5.0, condition_on: correctness}."""
    group_size: int = 16
    """G, responses per prompt."""
    scale_advantages_by_std: bool = True
    """Eq. 3 with std scaling (GRPO/DISPO); false gives Dr. GRPO."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong_penalty: bool = True
    """DAPO soft overlong punishment on the reward."""
    overlong: OverlongConfig | None = None
    """Overlong window; null derives it from rollout.max_new_tokens with DAPO's ratio (L_max = max_new_tokens,
    L_cache = L_max / 5, as 20480 / 4096)."""
    tis_cap: float | None = None
    """Truncated importance sampling against train/rollout mismatch: weight min(pi_old / pi_rollout, cap) per token."""
    regime_control: RegimeControlConfig = field(default_factory=RegimeControlConfig)
    """Adaptive DISPO (issue 25): moves the loss's clip bounds between steps to keep entropy in a band and to guard
    against repetition / length collapse; off by default. See docs/algorithms.md, "Regime control"."""

    def __post_init__(self) -> None:
        if self.preset not in preset_names():
            raise ValueError(f"preset={self.preset!r} is not a loss preset; use one of {preset_names()}.")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2: group-relative advantages need 2+ samples.")
        if self.tis_cap is not None and not self.tis_cap >= 1.0:
            raise ValueError(f"tis_cap={self.tis_cap} must be >= 1 (or null to disable truncated IS).")
        check_regime_control(self.regime_control, self.loss)  # also validates the overrides now, not at step 1

    @property
    def loss(self) -> PolicyLossConfig:
        try:
            return get_preset(self.preset, **self.loss_overrides)
        except TypeError as exc:
            valid = [f.name for f in dataclasses.fields(PolicyLossConfig)]
            raise ValueError(
                f"loss_overrides {dict(self.loss_overrides)} has an unknown field; valid: {valid}."
            ) from exc


@dataclass(frozen=True)
class TrainerConfig:
    run_dir: str = "runs/default"
    """Everything of the run goes here: metrics.jsonl, tensorboard/, checkpoints/, plots/."""
    max_steps: int = 100
    """Number of RL steps (rollout batch + K updates + refit each)."""
    prompts_per_step: int = 512
    """Prompts per rollout batch (paper: 512)."""
    num_minibatches: int = 16
    """K optimizer updates per rollout batch (paper: 16 of 32 prompts)."""
    max_tokens_per_microbatch: int = 16384
    """Padded-token budget of one micro-batch (memory)."""
    share_prompt_prefix: bool = True
    """pi_old forward: run each distinct prompt once and share its keys/values with its G responses
    (models/prefix_sharing.py). Used where the model supports it (Megatron's local attention, no sequence or context
    parallelism); elsewhere the full padded forward runs."""
    seed: int = 1234
    """Seed of model-parallel RNGs, sampling and data order."""
    resume: bool = False
    """Continue from the newest complete checkpoint in run_dir."""
    checkpoint_every: int = 50
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    plot_every: int = 10
    """Rewrite the PNG plots every N steps (0: only at the end)."""
    max_staleness: int = 0
    """With ``rollout.placement=dedicated``: batch s is generated by policy version s-1-k (k = this), so the rollout
    rank generates up to k batches ahead while the trainer updates; 0 is synchronous (today's samples)."""
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    """pi_old of the loss: the trainer's forward before the step's updates, or the engine's behaviour log-probs."""
    bridge_timeout_s: float = 1800.0
    """Dedicated placement: longest wait on the other side (a batch, a weight version); a dead side fails at once."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "prompts_per_step", "num_minibatches", "max_tokens_per_microbatch", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness} must be >= 0 (0: synchronous).")
        if self.old_logprobs not in ("recompute", "engine"):
            raise ValueError(f"old_logprobs={self.old_logprobs!r} must be 'recompute' or 'engine'.")
        if not self.bridge_timeout_s > 0:
            raise ValueError(f"bridge_timeout_s={self.bridge_timeout_s} must be positive.")
        if self.prompts_per_step % self.num_minibatches:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by num_minibatches "
                f"({self.num_minibatches}); each mini-batch takes whole prompt groups."
            )


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 10
    """Score the held-out set every N steps (0: never; always at step 0 and at the end when heldout is set)."""
    n: int = 4
    """Samples per held-out problem (Avg@n)."""
    temperature: float = 1.0
    top_p: float = 0.7
    """Paper Appendix B: temperature 1.0, top-p 0.7."""
    max_problems: int | None = None
    """Cap on held-out problems per evaluation."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.model.moe_routing_replay == "rollout" and not self.rollout.capture_routed_experts:
            # one switch for the user: replay needs the engine's routing, so the engine records it
            object.__setattr__(self, "rollout", dataclasses.replace(self.rollout, capture_routed_experts=True))
        if self.trainer.max_staleness > 0 and self.rollout.placement != "dedicated":
            raise ValueError(
                f"trainer.max_staleness={self.trainer.max_staleness} needs rollout.placement=dedicated (a colocated "
                "engine cannot generate while its rank trains)."
            )
        if self.rollout.partial and (self.rollout.placement != "dedicated" or self.trainer.max_staleness < 1):
            raise ValueError(
                f"rollout.partial=true (placement={self.rollout.placement!r}, trainer.max_staleness="
                f"{self.trainer.max_staleness}) continues responses across batches, so a batch holds tokens one "
                "version older than the newest: set rollout.placement=dedicated and trainer.max_staleness >= 1."
            )
        if not self.model.hf_path:
            raise ValueError("model.hf_path is empty; set it to an HF checkpoint folder (config.json + safetensors).")
        needed = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.rollout.max_model_len < needed:
            raise ValueError(
                f"rollout.max_model_len ({self.rollout.max_model_len}) < data.max_prompt_tokens "
                f"({self.data.max_prompt_tokens}) + rollout.max_new_tokens ({self.rollout.max_new_tokens}); raise "
                "max_model_len or lower one of the two."
            )
        if self.algorithm.overlong_penalty and self.overlong.max_length > self.rollout.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong.max_length ({self.overlong.max_length}) exceeds rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}): the penalty could never reach -1. Set them equal (DAPO: 20480), "
                "or leave algorithm.overlong unset to derive it."
            )

    @property
    def overlong(self) -> OverlongConfig:
        """The overlong window in force (derived defaults are filled here and nowhere else)."""
        if self.algorithm.overlong is not None:
            return self.algorithm.overlong
        max_length = self.rollout.max_new_tokens
        return OverlongConfig(max_length=max_length, cache_length=max(1, max_length // 5))

    def training_world(self, job_world: int) -> int:
        """Processes that train in a job of ``job_world``: all, or all but the dedicated rollout ranks."""
        if self.rollout.placement != "dedicated":
            return job_world
        if job_world <= self.rollout.num_ranks:
            raise ConfigError(
                f"rollout.placement=dedicated with rollout.num_ranks={self.rollout.num_ranks} needs a job of more than "
                f"{self.rollout.num_ranks} processes (got {job_world}); launch with torchrun --nproc_per_node="
                f"{self.rollout.num_ranks + 1} or more."
            )
        return job_world - self.rollout.num_ranks

    def validate_for_world(self, world_size: int, *, hf_config: object | None = None) -> None:
        """Checks that need the number of processes or the model: parallel layout, checkpoint, batch split over DP.

        Raises ConfigError (one line naming the fields and the fix; the CLI prints it as ``config error: ...``).
        ``hf_config`` (see :meth:`load_hf_config`) adds the checks against the model: heads, KV heads and experts
        against TP/EP, layers against PP.
        """
        parallel = self.model.parallel
        try:
            parallel.validate(
                world_size,
                num_attention_heads=getattr(hf_config, "num_attention_heads", None),
                num_query_groups=getattr(hf_config, "num_key_value_heads", None),
                num_experts=getattr(hf_config, "num_experts", None),
                num_layers=getattr(hf_config, "num_hidden_layers", None),
            )
        except ValueError as exc:
            raise ConfigError(f"model.parallel (world size {world_size}): {exc}") from exc
        has_experts = bool(int(getattr(hf_config, "num_experts", 0) or 0))
        if hf_config is not None and self.rollout.capture_routed_experts and not has_experts:
            field_name = (
                "model.moe_routing_replay"
                if self.model.moe_routing_replay != "none"
                else "rollout.capture_routed_experts"
            )
            raise ConfigError(
                f"{field_name} needs a MoE model but {self.model.hf_path} "
                f"(model_type={getattr(hf_config, 'model_type', '?')!r}) has no experts; switch it off."
            )
        model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
        dp_size = world_size // model_parallel
        per_minibatch = self.trainer.prompts_per_step // self.trainer.num_minibatches
        if per_minibatch % dp_size:
            raise ConfigError(
                f"each mini-batch has {per_minibatch} prompts (trainer.prompts_per_step / trainer.num_minibatches), "
                f"which does not split over {dp_size} data-parallel ranks (world {world_size} / TP x PP "
                f"{model_parallel}); make it a multiple of {dp_size}."
            )

    def load_hf_config(self) -> object:
        """The HF config of ``model.hf_path``; ConfigError when the folder or its config.json is missing or broken."""
        return _read_hf_config(self.model.hf_path)


def _read_hf_config(hf_path: str) -> object:
    from transformers import AutoConfig

    folder = Path(hf_path)
    if not folder.is_dir():
        raise ConfigError(
            f"model.hf_path={hf_path!r} does not exist; point it at an HF checkpoint folder (config.json + "
            "safetensors + tokenizer), e.g. the output of `megatron-dispo demo` or a downloaded model."
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.hf_path={hf_path!r} has no config.json; point it at an HF checkpoint folder.")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.hf_path={hf_path!r}: its config.json cannot be read ({exc}).") from exc


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """YAML + dotted overrides -> validated Config (ConfigError names the field on any mistake)."""
    return load_config(Config, path, overrides)
