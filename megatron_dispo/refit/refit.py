"""The refit orchestrator: trainer export stream -> (FP8) -> buckets -> transport -> engine, timed and self-checked.

One :class:`Refitter` lives as long as the engine. Each :meth:`Refitter.refit` call consumes the Megatron export
generator (``megatron_dispo.models.convert.export_hf_weights``) lazily, checks every name and shape against the engine's
expected set, moves the tensors with the chosen transport, logs time / bytes / GB/s, and every ``check_every``-th
refit scores the probe batch in the engine and compares with the trainer's log-probs (:mod:`.probe`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from megatron_dispo.hf_checkpoint import checkpoint_shapes
from megatron_dispo.refit.buckets import iter_buckets
from megatron_dispo.refit.config import EngineDtype, RefitConfig
from megatron_dispo.refit.fp8 import quantize_named_tensors
from megatron_dispo.refit.probe import (
    ProbeBatch,
    ProbeReport,
    RefitCheckError,
    TensorChecksum,
    compare_logprobs,
    describe_localisation,
    localize_mismatch,
    tensor_checksum,
)
from megatron_dispo.refit.transports import (
    ColocatedTransport,
    CudaIpcTransport,
    NcclBroadcastTransport,
    TransferCounters,
    resolve_transport,
)

__all__ = [
    "RefitMismatchError",
    "RefitStats",
    "Refitter",
    "expected_shapes_from_checkpoint",
    "fused_group_key",
    "send_weights",
]

logger = logging.getLogger(__name__)

TrainerLogprobs = Sequence[Tensor] | Callable[[ProbeBatch], Sequence[Tensor]]


class RefitMismatchError(ValueError):
    """Trainer and engine disagree on tensor names or shapes; the message lists every offending tensor."""


@dataclass(frozen=True)
class RefitStats:
    """What one refit did; logged every time, and the trainer's ``refit/*`` metrics."""

    refit_index: int
    seconds: float
    """Wall time of the whole refit (export gathers included, self-check excluded)."""
    export_seconds: float
    """Part of ``seconds`` spent waiting on the trainer's export generator (TP/EP gathers, HF conversion)."""
    payload_bytes: int
    num_buckets: int
    num_tensors: int
    transport: str
    fp8: bool
    probe: ProbeReport | None = None
    check_seconds: float = 0.0
    engine_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        """Payload bytes / 1e9 over the refit wall time."""
        return self.payload_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        """Flat metric dict (``refit/...``) for the trainer's logger."""
        out = {
            "refit/time_s": self.seconds,
            "refit/export_time_s": self.export_seconds,
            "refit/bytes": float(self.payload_bytes),
            "refit/gb_per_s": self.gb_per_s,
            "refit/num_buckets": float(self.num_buckets),
            "refit/num_tensors": float(self.num_tensors),
        }
        if self.probe is not None:
            out |= {
                "refit/probe/max_abs_delta_logprob": self.probe.max_abs,
                "refit/probe/mean_abs_delta_logprob": self.probe.mean_abs,
                "refit/probe/time_s": self.check_seconds,
            }
        return out

    def describe(self) -> str:
        """One log line."""
        line = (
            f"refit #{self.refit_index} [{self.transport}{', fp8' if self.fp8 else ''}]: {self.num_tensors} tensors, "
            f"{self.payload_bytes / 1e6:.1f} MB in {self.num_buckets} buckets, {self.seconds:.3f} s "
            f"({self.gb_per_s:.3f} GB/s; export {self.export_seconds:.3f} s)"
        )
        if self.probe is not None:
            line += f"; probe {self.probe.describe()}"
        return line


def expected_shapes_from_checkpoint(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the HF checkpoint the engine was built from (safetensors headers only, no data read).

    FP8 scale tensors (``*_scale_inv``) are left out: the check runs on the trainer's unquantised names.
    """
    return {name: shape for name, shape in checkpoint_shapes(model_dir).items() if not name.endswith("_scale_inv")}


class _GuardedStream:
    """Pass tensors through while checking names, shapes and dtypes and timing the source.

    This is the refit's one check of the weights: the colocated engine loads what passes without checking it again
    (``load_checked_weights``); ``iter_buckets`` adds the checks on duplicates and fused groups.

    A bad tensor is never forwarded; the source is still drained to the end, because on the other ranks the same
    generator is issuing collectives that must complete.
    """

    def __init__(
        self,
        source: Iterable[tuple[str, Tensor]],
        expected: Mapping[str, tuple[int, ...]] | None,
    ) -> None:
        self.source = source
        self.expected = expected
        self.seen: dict[str, tuple[int, ...]] = {}
        self.unexpected: list[str] = []
        self.wrong_shape: list[str] = []
        self.not_float: list[str] = []
        self.source_seconds = 0.0

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        iterator = iter(self.source)
        while True:
            start = time.perf_counter()
            try:
                name, tensor = next(iterator)
            except StopIteration:
                self.source_seconds += time.perf_counter() - start
                return
            self.source_seconds += time.perf_counter() - start
            shape = tuple(tensor.shape)
            self.seen[name] = shape
            if self.expected is not None:
                if name not in self.expected:
                    self.unexpected.append(f"{name} {list(shape)}")
                    continue
                if self.expected[name] != shape:
                    self.wrong_shape.append(f"{name}: trainer {list(shape)} vs engine {list(self.expected[name])}")
                    continue
                if not tensor.is_floating_point():
                    self.not_float.append(f"{name}: {tensor.dtype}")
                    continue
            if self.unexpected or self.wrong_shape or self.not_float:
                continue  # stop feeding the engine after the first error, keep draining the source
            yield name, tensor

    def missing(self) -> list[str]:
        if self.expected is None:
            return []
        return sorted(set(self.expected) - set(self.seen))

    def error(self) -> RefitMismatchError | None:
        missing = self.missing()
        if not (self.unexpected or self.wrong_shape or self.not_float or missing):
            return None
        parts = ["trainer and engine disagree on the weights (the engine may hold a partial update; rebuild it):"]
        for title, items in (
            ("shape mismatch", self.wrong_shape),
            ("not floating point", self.not_float),
            ("not in the engine", self.unexpected),
            ("missing from the trainer's export", missing),
        ):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        parts.append("  fix: check the HF<->Megatron mapping table and that engine and trainer use the same config.")
        return RefitMismatchError("\n".join(parts))


class Refitter:
    """Pushes the trainer's weights into one rollout engine and checks the result.

    Args:
        engine: the rollout engine (``update_weights``, ``score``); ``None`` on ranks that only send (nccl).
        config: bucket size, transport, FP8, check cadence and thresholds.
        probe: fixed sequences scored after each checked refit; ``None`` disables the self-check.
        expected_shapes: the engine's tensor names and shapes; default: read from ``engine.model_path``'s checkpoint,
            or learned from the first refit.
        rpc: the engine's worker RPC (vLLM ``LLM.collective_rpc``) for cuda_ipc and localisation; default: found on
            the engine (``engine.collective_rpc`` or ``engine.llm.collective_rpc``).
        group, src: process group and source rank of the nccl transport.
    """

    def __init__(
        self,
        engine: Any,
        config: RefitConfig | None = None,
        *,
        probe: ProbeBatch | None = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        rpc: Callable[..., list[Any]] | None = None,
        group: dist.ProcessGroup | None = None,
        src: int = 0,
    ) -> None:
        self.engine = engine
        self.config = config or RefitConfig()
        self.probe = probe
        self.rpc = rpc if rpc is not None else _find_rpc(engine)
        self.refit_index = 0
        self.expected_shapes = dict(expected_shapes) if expected_shapes is not None else None
        if self.expected_shapes is None and self.config.validate_names:
            model_path = getattr(engine, "model_path", None)
            if model_path is not None and Path(model_path).is_dir():
                self.expected_shapes = expected_shapes_from_checkpoint(model_path)
        engine_config = getattr(engine, "config", None)
        self.engine_dtype = _engine_dtype(engine_config, self.config.fp8)
        self.probe_max_abs, self.probe_mean_abs = self.config.probe_thresholds(self.engine_dtype)
        has_engine = engine is not None and callable(getattr(engine, "update_weights", None))
        self.transport_name = resolve_transport(
            self.config.transport, has_engine=has_engine, has_rpc=self.rpc is not None, has_group=group is not None
        )
        if self.transport_name == "colocated":
            # the guard below checks every name and shape once per refit, so the engine need not check them again
            names_checked = self.config.validate_names and self.expected_shapes is not None
            self.transport: Any = ColocatedTransport(engine, names_checked=names_checked)
        elif self.transport_name == "cuda_ipc":
            assert self.rpc is not None  # resolve_transport checked it
            self.transport = CudaIpcTransport(self.rpc, _find_reset_prefix_cache(engine))
        else:
            self.transport = NcclBroadcastTransport(group, src)

    def _group_sizes(self) -> dict[str, int]:
        """Members per vLLM fused group (FP8: each quantised weight also brings its scale)."""
        from megatron_dispo.refit.fp8 import is_fp8_quantized_weight

        sizes: dict[str, int] = {}
        for name, shape in (self.expected_shapes or {}).items():
            members = 2 if self.config.fp8 and is_fp8_quantized_weight(name, _ShapeOnly(shape)) else 1
            key = fused_group_key(name)
            sizes[key] = sizes.get(key, 0) + members
        return sizes

    def _check_due(self) -> bool:
        return self.probe is not None and self.config.check_due(self.refit_index)

    def refit(
        self, named_tensors: Iterable[tuple[str, Tensor]], *, trainer_logprobs: TrainerLogprobs | None = None
    ) -> RefitStats:
        """Move every tensor of ``named_tensors`` into the engine; self-check if due; return (and log) the stats.

        ``trainer_logprobs``: the trainer's per-token log-probs of the probe batch (or a callable computing them);
        required when a check is due. Raises :class:`RefitMismatchError` on name/shape mismatches and
        :class:`~megatron_dispo.refit.probe.RefitCheckError` when the probe exceeds the thresholds.
        """
        self.refit_index += 1
        check_due = self._check_due()
        if check_due and trainer_logprobs is None:
            raise ValueError(
                f"refit #{self.refit_index} is a self-check refit (check_every={self.config.check_every}) but no "
                "trainer_logprobs were given; pass the trainer's log-probs of the probe batch."
            )
        expected = self.expected_shapes if self.config.validate_names else None
        record = check_due and self.config.localize_on_failure and self.rpc is not None
        guard = _GuardedStream(named_tensors, expected)
        stream: Iterable[tuple[str, Tensor]] = guard
        if self.config.fp8:
            stream = quantize_named_tensors(stream)
        checksums: dict[str, TensorChecksum] = {}
        if record:
            stream = _recording(stream, checksums)
        start = time.perf_counter()
        buckets = iter_buckets(
            stream, self.config.bucket_bytes, group_of=fused_group_key, group_sizes=self._group_sizes()
        )
        counters: TransferCounters = self.transport.transfer(buckets)
        seconds = time.perf_counter() - start
        error = guard.error()
        if error is not None:
            raise error
        if self.expected_shapes is None and self.config.validate_names:
            self.expected_shapes = dict(guard.seen)  # the first complete refit defines the set from now on
        stats = RefitStats(
            refit_index=self.refit_index,
            seconds=seconds,
            export_seconds=guard.source_seconds,
            payload_bytes=counters.payload_bytes,
            num_buckets=counters.num_buckets,
            num_tensors=counters.num_tensors,
            transport=self.transport_name,
            fp8=self.config.fp8,
            engine_metrics=counters.engine_metrics,
        )
        if check_due:
            assert trainer_logprobs is not None and self.probe is not None
            check_start = time.perf_counter()
            report = self.check(trainer_logprobs, checksums if record else None)
            stats = _with_probe(stats, report, time.perf_counter() - check_start)
        logger.info(stats.describe())
        return stats

    def check(
        self, trainer_logprobs: TrainerLogprobs, sent_checksums: Mapping[str, TensorChecksum] | None = None
    ) -> ProbeReport:
        """Score the probe batch in the engine, compare with the trainer, raise :class:`RefitCheckError` if too far."""
        if self.probe is None:
            raise ValueError("Refitter.check needs a probe batch; pass probe=ProbeBatch(...) to the Refitter.")
        sequences = [list(seq) for seq in self.probe.sequences]
        prompt_lens = list(self.probe.prompt_lens) if self.probe.prompt_lens is not None else None
        engine_logprobs = self.engine.score(sequences, prompt_lens=prompt_lens)
        reference = trainer_logprobs(self.probe) if callable(trainer_logprobs) else trainer_logprobs
        report = compare_logprobs(engine_logprobs, reference)
        mean_limit = self.probe_mean_abs
        too_far = report.max_abs > self.probe_max_abs or (mean_limit is not None and report.mean_abs > mean_limit)
        if not too_far:
            return report
        message = (
            f"refit self-check failed after refit #{self.refit_index}: {report.describe()}; thresholds: max "
            f"{self.probe_max_abs:g}"
            + (f", mean {mean_limit:g}" if mean_limit is not None else "")
            + f" nats ({self.engine_dtype} engine)."
        )
        if sent_checksums and self.rpc is not None:
            from megatron_dispo.refit import vllm_worker

            def read_back() -> Mapping[str, tuple[float, float, int]]:
                per_worker = self.rpc(vllm_worker.parameter_fingerprints)
                if len(per_worker) != 1:
                    raise RefitCheckError(
                        message + f" (localisation supports one engine worker, got {len(per_worker)})"
                    )
                return per_worker[0]

            mismatches = localize_mismatch(sent_checksums, read_back, rtol=self.config.checksum_rtol)
            groups = {name for name in map(_engine_name, sent_checksums)}
            message += "\n" + describe_localisation(mismatches, len(groups))
        elif self.config.localize_on_failure:
            message += "\nlocalisation unavailable: the engine exposes no worker RPC to read its weights back."
        raise RefitCheckError(message)


class _ShapeOnly:
    """Stands in for a tensor where only ``dim()`` and ``is_floating_point()`` are asked (expected-shape tables)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return True


def fused_group_key(name: str) -> str:
    """The engine's fused-parameter group of a tensor name (an FP8 scale joins its weight's group)."""
    from megatron_dispo.rollout.weights import fused_group

    return fused_group(name.removesuffix("_scale_inv"))


def _engine_name(hf_name: str) -> str:
    from megatron_dispo.refit.probe import engine_param_name

    return engine_param_name(hf_name)


def _recording(stream: Iterable[tuple[str, Tensor]], out: dict[str, TensorChecksum]) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in stream:
        out[name] = tensor_checksum(name, tensor)
        yield name, tensor


def _with_probe(stats: RefitStats, report: ProbeReport, check_seconds: float) -> RefitStats:
    from dataclasses import replace

    return replace(stats, probe=report, check_seconds=check_seconds)


def _find_rpc(engine: Any) -> Callable[..., list[Any]] | None:
    """The engine's worker RPC: ``engine.collective_rpc`` or ``engine.llm.collective_rpc`` (vLLM ``LLM``).

    ``engine.llm`` is looked up at every call: an engine that rebuilds itself (Qwen3-MoE on CPU) has a new ``LLM``.
    """
    if engine is None:
        return None
    if callable(getattr(engine, "collective_rpc", None)):
        return lambda fn, *args: engine.collective_rpc(fn, args=args)
    if callable(getattr(getattr(engine, "llm", None), "collective_rpc", None)):
        return lambda fn, *args: engine.llm.collective_rpc(fn, args=args)
    return None


def _engine_dtype(engine_config: Any, fp8_refit: bool) -> EngineDtype:
    """What the engine computes in, from its ``RolloutConfig`` (fp32 for an engine without one); the FP8 refit and the
    FP8 engine must come together: codes and scales fit only an engine built from an FP8 checkpoint."""
    quantization = getattr(engine_config, "quantization", "none")
    if engine_config is not None and fp8_refit != (quantization == "fp8"):
        raise ValueError(
            f"refit.fp8={fp8_refit} but rollout.quantization={quantization!r}: an FP8 refit needs an FP8 engine and an "
            "FP8 engine an FP8 refit; set both (refit.fp8=true, rollout.quantization=fp8) or neither."
        )
    if fp8_refit:
        return "fp8"
    return getattr(engine_config, "dtype", "float32")


def _find_reset_prefix_cache(engine: Any) -> Callable[[], object] | None:
    """The engine's ``reset_prefix_cache`` (``engine.reset_prefix_cache`` or vLLM ``engine.llm.reset_prefix_cache``),
    looked up at every call like :func:`_find_rpc`."""
    if engine is None:
        return None
    if callable(getattr(engine, "reset_prefix_cache", None)):
        return lambda: engine.reset_prefix_cache()
    if callable(getattr(getattr(engine, "llm", None), "reset_prefix_cache", None)):
        return lambda: engine.llm.reset_prefix_cache()
    return None


def send_weights(
    named_tensors: Iterable[tuple[str, Tensor]],
    refitter: Refitter | None,
    *,
    trainer_logprobs: TrainerLogprobs | None = None,
) -> RefitStats | None:
    """Every rank's part of a refit: the rank with the engine's ``refitter`` loads the stream into the engine; the
    others (``refitter=None``) run the stream to its end, taking part in the gathers that produce its tensors."""
    if refitter is not None:
        return refitter.refit(named_tensors, trainer_logprobs=trainer_logprobs)
    for _ in named_tensors:
        pass
    return None
