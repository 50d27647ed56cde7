"""Engine replicas on every group of ranks, behind the single engine's ``generate`` / ``score``.

Every rank of the trainer's world holds one :class:`RolloutEngine`: with engine TP = 1 each rank is its own replica
(a private 1-rank vLLM world); with TP > 1, ``tensor_parallel_size`` consecutive ranks of a node form a replica that
runs vLLM's ``external_launcher`` in a world of its own (``rollout/replica_world.py``). A :class:`ReplicatedEngine`
on every rank turns them into one engine for the driver (global rank 0):

* the driver calls ``generate`` / ``score`` exactly as on a ``RolloutEngine``; every other rank sits in ``serve()``
  until the driver calls ``release()``, which ends the serving phase (training follows);
* each call is a collective on a gloo group of its own: the driver broadcasts the request (a small int64 header,
  sampling overrides as a small object, prompts as packed int64 tensors); every rank deals the prompt groups to the
  replicas the same way (whole groups, balanced by expected tokens, ``placement.deal_groups``); each replica
  generates its share (all ranks of a TP > 1 replica, as ``external_launcher`` requires); a fixed-size report from
  every rank (error flag + message, sizes, seconds) is all-gathered before any result moves; then each leader, and
  only the leader (TP followers hold copies), sends its outputs to the driver point to point at their exact sizes
  (lengths, finish codes, packed ids, packed float32 log-probs, captured routing as 1- or 2-byte expert codes,
  ``routing_payload.py``), and they are put back in the request's order;
* sampling does not depend on the layout: request seeds derive from each prompt's index in the whole request, so one
  engine and N replicas draw the same tokens;
* failures never hang: every collective has ``rollout.replica_timeout_s`` as its bound, and an exception on any rank
  becomes a :class:`ReplicaError` naming the replica and the phase on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from megatron_dispo.rollout.batch import FINISH_REASONS, FinishReason, RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.engine import SAMPLING_OVERRIDES, RolloutEngine
from megatron_dispo.rollout.placement import deal_groups, place_replicas
from megatron_dispo.rollout.replica_world import free_port
from megatron_dispo.rollout.routing_payload import decode_routing, encode_routing

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

DRIVER_RANK = 0
"""The global rank that issues requests and receives results (the trainer's rank 0)."""

STARTUP_TIMEOUT = timedelta(minutes=30)
"""Bound on the start-up exchange (torch's default for gloo): every rank waits for the slowest vLLM start."""

_OP_RELEASE, _OP_GENERATE, _OP_SCORE = 0, 1, 2
_HEADER_SIZE = 6  # op, number of sequences, n, driver's call index, sum of sequence lengths, has prompt_lens
_MESSAGE_BYTES = 1024
# report slots: failed flag, int payload size, float payload size, seconds (ns), three generate counters, routing
# payload bytes, message size
_REPORT_SLOTS = 9
_REPETITION_STATS = ("rollout/repetition/ngram", "rollout/repetition/confident_run")
_DROPPED_STAT = "rollout/repetition/forced_tokens_dropped"


class _Payload(NamedTuple):
    """One replica leader's results: int64 (lengths, finish codes, ids), float32 log-probs, routing bytes."""

    ints: torch.Tensor
    floats: torch.Tensor
    routing: torch.Tensor


class ReplicaError(RuntimeError):
    """An engine replica failed (raised, died or stalled); raised on every rank of the world."""


def _pack(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.int64)
    flat = [int(token) for seq in sequences for token in seq]
    return lengths, torch.tensor(flat, dtype=torch.int64)


def _unpack(lengths: torch.Tensor, flat: torch.Tensor) -> list[list[int]]:
    return [chunk.tolist() for chunk in torch.split(flat, lengths.tolist())]


@dataclasses.dataclass
class _Report:
    """What one rank tells every other rank after its share of a request: the error flag comes before any result."""

    error: str | None = None
    ints: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    floats: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.float32))
    routing: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    """Captured routing bytes (``routing_payload.encode_routing``); a replica leader's only."""
    seconds: float = 0.0
    counters: tuple[int, int, int] = (0, 0, 0)  # repetition ngram, confident_run, forced tokens dropped

    def encode(self) -> torch.Tensor:
        message = (self.error or "").encode()[:_MESSAGE_BYTES]
        slots = [int(self.error is not None), self.ints.numel(), self.floats.numel(), int(self.seconds * 1e9)]
        slots += [*self.counters, self.routing.numel(), len(message)]
        row = torch.zeros(_REPORT_SLOTS + _MESSAGE_BYTES, dtype=torch.int64)
        row[:_REPORT_SLOTS] = torch.tensor(slots, dtype=torch.int64)
        row[_REPORT_SLOTS : _REPORT_SLOTS + len(message)] = torch.tensor(list(message), dtype=torch.int64)
        return row


def _decode_error(row: torch.Tensor) -> str | None:
    if not int(row[0]):
        return None
    size = int(row[_REPORT_SLOTS - 1])
    return bytes(row[_REPORT_SLOTS : _REPORT_SLOTS + size].tolist()).decode(errors="replace")


class ReplicatedEngine:
    """One rollout engine per replica of ranks, used through the single engine's interface on the driver rank.

    Construct it on every rank of the trainer's world (a collective). Then, per serving phase, the driver (global
    rank 0) calls ``generate`` / ``score`` any number of times and ``release()`` once, while every other rank calls
    ``serve()``, which returns at the release. Outside a serving phase the ranks are free for training. Each rank's
    own engine is ``local_engine`` (for weight updates: every rank of a replica loads the full HF tensors, vLLM
    slices them per engine rank). Without torch.distributed initialised, it is one replica in this process.
    """

    def __init__(self, model_path: str | Path, config: RolloutConfig, *, gpus_per_node: int | None = None) -> None:
        """``gpus_per_node``: ranks per node (default: torchrun's LOCAL_WORLD_SIZE, else the whole world)."""
        if not isinstance(config, RolloutConfig):
            raise TypeError(f"config must be a RolloutConfig, got {type(config).__name__}.")
        self.config = config
        self.model_path = Path(model_path)
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        self.placement = place_replicas(rank, world_size, config.tensor_parallel_size, per_node)
        self._broken: str | None = None
        # Engine start-up takes as long as the slowest rank's vLLM start (import, load, warm-up) and runs once, so its
        # exchange uses a gloo group with torch's default timeout; requests use the serving group, bounded by
        # replica_timeout_s. Both are made now, before vLLM creates groups of its own.
        serving: Any = None
        if world_size > 1:
            serving = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.replica_timeout_s))
            self._group: Any = dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT)
            self._bound = f"the start-up bound of {STARTUP_TIMEOUT.total_seconds():g} s"
        else:
            self._group, self._bound = None, "this process (no peers)"
        if config.tensor_parallel_size > 1:
            ports = self._all_gather(torch.tensor([free_port()], dtype=torch.int64), "start-up (port exchange)")
            leader_port = int(ports[self.placement.ranks[0]])
            self.placement = dataclasses.replace(self.placement, master_port=leader_port)
        engine: RolloutEngine | None = None
        report = _Report()
        try:
            engine = RolloutEngine(model_path, config, replica=self.placement)
        except Exception as error:
            report.error = f"{type(error).__name__}: {error}"
        try:
            self._exchange_reports(report, "start-up")
        except ReplicaError:
            if engine is not None:
                engine.shutdown()
            for group in (self._group, serving):
                if group is not None:
                    dist.destroy_process_group(group)
            raise
        assert engine is not None  # a failed start raised above
        self._local_engine: RolloutEngine | None = engine
        if serving is not None:
            dist.destroy_process_group(self._group)
            self._group, self._bound = serving, f"rollout.replica_timeout_s={config.replica_timeout_s:g}"
        logger.info(
            "rollout replica %d/%d up on ranks %s (engine TP %d)",
            self.placement.replica_index,
            self.placement.num_replicas,
            list(self.placement.ranks),
            self.placement.tensor_parallel_size,
        )

    # ------------------------------------------------------------------ properties
    @property
    def is_driver(self) -> bool:
        """True on the rank that calls ``generate`` / ``score`` / ``release`` (global rank 0)."""
        return self.placement.rank == DRIVER_RANK

    @property
    def num_replicas(self) -> int:
        return self.placement.num_replicas

    @property
    def local_engine(self) -> RolloutEngine:
        """This rank's own ``RolloutEngine`` (build a Refitter per rank on it; ``update_weights`` on every rank)."""
        if self._local_engine is None:
            raise RuntimeError("the ReplicatedEngine was shut down; create a new one.")
        return self._local_engine

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The checkpoint's HF tokenizer (the one vLLM uses)."""
        return self.local_engine.tokenizer

    # ------------------------------------------------------------------ driver side
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, **sampling_overrides: Any) -> RolloutBatch:
        """``RolloutEngine.generate`` over all replicas (driver only; the other ranks must be in ``serve()``).

        The samples equal those of one engine given the same arguments (same seeds, same tokens); ``stats`` adds
        ``rollout/replicas``, ``rollout/replica{i}/tokens``, ``rollout/replica{i}/seconds`` and
        ``rollout/replica_imbalance`` (slowest / mean replica seconds).
        """
        self._require_driver("generate")
        unknown = set(sampling_overrides) - SAMPLING_OVERRIDES
        if unknown:
            raise TypeError(
                f"generate() got unknown override(s) {sorted(unknown)}; allowed: {sorted(SAMPLING_OVERRIDES)}."
            )
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive int (responses per prompt).")
        config = dataclasses.replace(self.config, **sampling_overrides)  # checks values before any rank sees them
        local = self.local_engine
        prompts = local.check_sequences(prompt_token_ids, "prompt_token_ids", room=config.max_new_tokens)
        started = time.perf_counter()
        header = [_OP_GENERATE, len(prompts), n, local.call_index, sum(map(len, prompts)), 0]
        self._send_request(header, prompts, None, sampling_overrides)
        batch = self._run_generate(prompts, n, local.call_index, sampling_overrides, started)
        assert batch is not None  # the driver always assembles one
        return batch

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``RolloutEngine.score`` over all replicas (driver only; the other ranks must be in ``serve()``)."""
        self._require_driver("score")
        seqs = self.local_engine.check_sequences(sequences, "sequences", room=1)
        if prompt_lens is not None and len(prompt_lens) != len(seqs):
            raise ValueError(f"prompt_lens has {len(prompt_lens)} entries for {len(seqs)} sequences.")
        lens = None if prompt_lens is None else [int(length) for length in prompt_lens]
        header = [_OP_SCORE, len(seqs), 0, 0, sum(map(len, seqs)), int(lens is not None)]
        self._send_request(header, seqs, lens, None)
        return self._run_score(seqs, lens)

    def release(self) -> None:
        """End the serving phase: every rank's ``serve()`` returns (driver only)."""
        self._require_driver("release")
        if self._group is not None:
            self._broadcast(torch.tensor([_OP_RELEASE] + [0] * (_HEADER_SIZE - 1), dtype=torch.int64), "release")

    def serving_phase(self, drive: Callable[[], _T]) -> _T | None:
        """One serving phase, called on every rank: the driver runs ``drive`` (whose ``generate`` / ``score`` calls
        reach every replica) and then releases the others, which serve until that release. Returns ``drive``'s
        result on the driver, None on the serving ranks."""
        if not self.is_driver:
            self.serve()
            return None
        result = drive()
        self.release()
        return result

    # ------------------------------------------------------------------ serving side
    def serve(self) -> int:
        """Answer the driver's requests until it calls ``release()``; returns the number of requests served.

        Raises :class:`ReplicaError` if any replica fails a request or the driver stays silent for longer than
        ``rollout.replica_timeout_s``.
        """
        if self.is_driver:
            raise RuntimeError("serve() runs on the non-driver ranks; the driver calls generate/score/release.")
        served = 0
        while True:
            header = self._broadcast(torch.zeros(_HEADER_SIZE, dtype=torch.int64), "waiting for a request").tolist()
            op, count, n, call_index, _, has_prompt_lens = header
            if op == _OP_RELEASE:
                return served
            lengths = self._broadcast(torch.zeros(count, dtype=torch.int64), "request (lengths)")
            flat = self._broadcast(torch.zeros(header[4], dtype=torch.int64), "request (token ids)")
            sequences = _unpack(lengths, flat)
            if op == _OP_GENERATE:
                overrides = self._broadcast_object(None, "request (sampling overrides)")
                self._run_generate(sequences, n, call_index, overrides, time.perf_counter())
            else:
                lens = None
                if has_prompt_lens:
                    lens = self._broadcast(torch.zeros(count, dtype=torch.int64), "request (prompt_lens)").tolist()
                self._run_score(sequences, lens)
            served += 1

    # ------------------------------------------------------------------ one request, on every rank
    def _run_generate(
        self, prompts: list[list[int]], n: int, call_index: int, overrides: dict[str, Any], started: float
    ) -> RolloutBatch | None:
        max_new = int(overrides.get("max_new_tokens", self.config.max_new_tokens))
        shares = deal_groups([n * (len(prompt) + max_new) for prompt in prompts], self.num_replicas)
        mine = shares[self.placement.replica_index]
        report = _Report()
        try:
            local = self.local_engine
            if local.call_index != call_index:  # unseeded requests derive seeds from the call index
                raise RuntimeError(
                    f"this engine is at generate call {local.call_index} but the driver's is at {call_index}: "
                    "call local_engine.generate only on every rank alike (or through the ReplicatedEngine)."
                )
            # an empty share still counts as a call, so that call indices stay equal on every rank; every rank of a
            # TP > 1 replica generates (external_launcher), only its leader reports the results (followers hold copies)
            batch = local.generate([prompts[i] for i in mine], n, prompt_indices=mine, **overrides)
            if self.placement.is_leader:
                finish = [FINISH_REASONS.index(reason) for reason in batch.finish_reason]
                report.ints = torch.cat(
                    [
                        torch.tensor(batch.response_lengths, dtype=torch.int64),
                        torch.tensor(finish, dtype=torch.int64),
                        torch.tensor([t for ids in batch.response_ids for t in ids], dtype=torch.int64),
                    ]
                )
                report.floats = torch.tensor([v for lps in batch.response_logprobs for v in lps], dtype=torch.float32)
                if batch.routed_experts is not None:
                    report.routing = encode_routing(batch.routed_experts, local.num_experts)
            stats = batch.stats
            report.seconds = stats["rollout/seconds"]
            ngram, confident = (int(stats[key]) for key in _REPETITION_STATS)
            report.counters = (ngram, confident, int(stats[_DROPPED_STAT]))
        except Exception as error:
            report.error = f"{type(error).__name__}: {error}"
        rows = self._exchange_reports(report, "generate")
        payloads = self._gather_payloads(report, rows, "generate (results)")
        if not self.is_driver:
            return None  # only the driver assembles the batch
        return self._assemble(prompts, n, shares, rows, payloads, started)

    def _assemble(
        self,
        prompts: list[list[int]],
        n: int,
        shares: list[list[int]],
        rows: torch.Tensor,
        payloads: dict[int, _Payload],
        started: float,
    ) -> RolloutBatch:
        total = len(prompts) * n
        response_ids: list[list[int]] = [[] for _ in range(total)]
        response_logprobs: list[list[float]] = [[] for _ in range(total)]
        finish: list[FinishReason] = ["stop"] * total
        routed_experts: list[torch.Tensor] = [torch.zeros(0, 0, 0, dtype=torch.int16)] * total
        stats: dict[str, float] = {"rollout/replicas": float(self.num_replicas)}
        counters = [0, 0, 0]
        replica_seconds: list[float] = []
        for replica, share in enumerate(shares):
            leader = self.placement.leaders[replica]
            ints, floats, routing = payloads[leader]
            count = len(share) * n
            lengths = ints[:count].tolist()
            codes = ints[count : 2 * count].tolist()
            ids = torch.split(ints[2 * count : 2 * count + sum(lengths)], lengths)
            logprobs = torch.split(floats, lengths)
            slots = [group * n + sample for group in share for sample in range(n)]
            if self.config.capture_routed_experts:
                routed_rows = [
                    len(prompts[slot // n]) + length - 1 for slot, length in zip(slots, lengths, strict=True)
                ]
                decoded = decode_routing(routing, routed_rows, self.local_engine.num_experts)
                for slot, routed in zip(slots, decoded, strict=True):
                    routed_experts[slot] = routed
            for k, slot in enumerate(slots):
                response_ids[slot] = ids[k].tolist()
                response_logprobs[slot] = logprobs[k].tolist()
                finish[slot] = FINISH_REASONS[codes[k]]
            seconds = int(rows[leader, 3]) / 1e9
            replica_seconds.append(seconds)
            stats[f"rollout/replica{replica}/tokens"] = float(sum(lengths))
            stats[f"rollout/replica{replica}/seconds"] = seconds
            counters = [c + int(v) for c, v in zip(counters, rows[leader, 4:7].tolist(), strict=True)]
        seconds = time.perf_counter() - started
        num_tokens = sum(len(ids) for ids in response_ids)
        mean_seconds = sum(replica_seconds) / len(replica_seconds)
        stats |= {
            "rollout/tokens": float(num_tokens),
            "rollout/seconds": seconds,
            "rollout/tokens_per_s": num_tokens / seconds if seconds > 0 else 0.0,
            "rollout/responses": float(total),
            **{f"rollout/finish/{reason}": float(finish.count(reason)) for reason in FINISH_REASONS},
            _REPETITION_STATS[0]: float(counters[0]),
            _REPETITION_STATS[1]: float(counters[1]),
            _DROPPED_STAT: float(counters[2]),
            "rollout/replica_imbalance": max(replica_seconds) / mean_seconds if mean_seconds > 0 else 1.0,
        }
        return RolloutBatch(
            prompt_ids=prompts,
            response_ids=response_ids,
            response_logprobs=response_logprobs,
            finish_reason=finish,
            group_index=[index for index in range(len(prompts)) for _ in range(n)],
            group_size=n,
            texts=self.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            stats=stats,
            routed_experts=routed_experts if self.config.capture_routed_experts else None,
        )

    def _run_score(self, sequences: list[list[int]], prompt_lens: list[int] | None) -> list[torch.Tensor]:
        shares = deal_groups([len(seq) for seq in sequences], self.num_replicas)
        mine = shares[self.placement.replica_index]
        report = _Report()
        try:
            scores: list[torch.Tensor] = []
            if mine:
                lens = None if prompt_lens is None else [prompt_lens[i] for i in mine]
                scores = self.local_engine.score([sequences[i] for i in mine], prompt_lens=lens)
            if self.placement.is_leader:
                report.ints = torch.tensor([score.numel() for score in scores], dtype=torch.int64)
                report.floats = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32)
        except Exception as error:
            report.error = f"{type(error).__name__}: {error}"
        rows = self._exchange_reports(report, "score")
        payloads = self._gather_payloads(report, rows, "score (results)")
        if not self.is_driver:
            return []
        result: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
        for replica, share in enumerate(shares):
            ints, floats, _ = payloads[self.placement.leaders[replica]]
            for index, values in zip(share, torch.split(floats, ints.tolist()), strict=True):
                result[index] = values.clone()
        return result

    # ------------------------------------------------------------------ collectives (all bounded by the timeout)
    def _require_driver(self, what: str) -> None:
        if not self.is_driver:
            raise RuntimeError(f"{what}() is called on the driver (global rank {DRIVER_RANK}); other ranks serve().")
        if self._broken is not None:
            raise ReplicaError(f"the replicated engine is unusable after an earlier failure: {self._broken}")

    def _where(self) -> str:
        return f"rank {self.placement.rank} (replica {self.placement.replica_index})"

    def _collective(self, phase: str, call: Callable[[], Any]) -> Any:
        """Run one collective; a failure (a peer died, or nobody answered within the timeout) ends the engine."""
        if self._broken is not None:
            raise ReplicaError(f"the replicated engine is unusable after an earlier failure: {self._broken}")
        try:
            return call()
        except Exception as error:
            self._broken = (
                f"{self._where()}: {phase} failed: a peer rank died or did not answer within {self._bound}: "
                f"{type(error).__name__}: {error}"
            )
            raise ReplicaError(self._broken) from error

    def _broadcast(self, tensor: torch.Tensor, phase: str) -> torch.Tensor:
        self._collective(phase, lambda: dist.broadcast(tensor, DRIVER_RANK, group=self._group))
        return tensor

    def _broadcast_object(self, value: Any, phase: str) -> Any:
        holder = [value]
        self._collective(phase, lambda: dist.broadcast_object_list(holder, DRIVER_RANK, group=self._group))
        return holder[0]

    def _all_gather(self, tensor: torch.Tensor, phase: str) -> torch.Tensor:
        """Rows of every rank, stacked in rank order."""
        if self._group is None:
            return tensor[None]
        rows = [torch.empty_like(tensor) for _ in range(self.placement.num_replicas * len(self.placement.ranks))]
        self._collective(phase, lambda: dist.all_gather(rows, tensor, group=self._group))
        return torch.stack(rows)

    def _send_request(
        self,
        header: list[int],
        sequences: list[list[int]],
        prompt_lens: list[int] | None,
        overrides: dict[str, Any] | None,
    ) -> None:
        if self._group is None:
            return
        lengths, flat = _pack(sequences)
        self._broadcast(torch.tensor(header, dtype=torch.int64), "request (header)")
        self._broadcast(lengths, "request (lengths)")
        self._broadcast(flat, "request (token ids)")
        if overrides is not None:
            self._broadcast_object(overrides, "request (sampling overrides)")
        if prompt_lens is not None:
            self._broadcast(torch.tensor(prompt_lens, dtype=torch.int64), "request (prompt_lens)")

    def _exchange_reports(self, report: _Report, phase: str) -> torch.Tensor:
        """All-gather every rank's report; raise the same :class:`ReplicaError` on every rank if any failed."""
        rows = self._all_gather(report.encode(), f"{phase} (error report)")
        failures = []
        for rank, row in enumerate(rows):
            message = _decode_error(row)
            if message is not None:
                replica = rank // self.placement.tensor_parallel_size
                failures.append(f"replica {replica} (rank {rank}) failed during {phase}: {message}")
        if failures:
            raise ReplicaError("; ".join(failures))
        return rows

    def _gather_payloads(self, report: _Report, rows: torch.Tensor, phase: str) -> dict[int, _Payload]:
        """Every replica leader's (ints, floats, routing) on the driver, point to point at their exact sizes (the
        sizes came with the reports); TP followers send nothing. Other ranks get an empty dict."""
        mine = _Payload(report.ints, report.floats, report.routing)
        if self._group is None:
            return {self.placement.rank: mine}
        leaders = self.placement.leaders
        if not self.is_driver:
            if self.placement.is_leader:
                for tensor in mine:
                    if tensor.numel():
                        self._collective(phase, lambda t=tensor: dist.send(t, DRIVER_RANK, group=self._group))
            return {}
        payloads = {DRIVER_RANK: mine}
        for leader in leaders:
            if leader == DRIVER_RANK:
                continue
            sizes = (int(rows[leader, 1]), int(rows[leader, 2]), int(rows[leader, 7]))
            received = _Payload(
                torch.empty(sizes[0], dtype=torch.int64),
                torch.empty(sizes[1], dtype=torch.float32),
                torch.empty(sizes[2], dtype=torch.uint8),
            )
            for tensor in received:
                if tensor.numel():
                    self._collective(phase, lambda t=tensor, src=leader: dist.recv(t, src, group=self._group))
            payloads[leader] = received
        return payloads

    # ------------------------------------------------------------------ lifetime
    def sleep(self, *, refit_follows: bool = True) -> None:
        """This rank's engine: free GPU memory for training (no-op on CPU). Every rank calls it. ``refit_follows``:
        discard the weights (vLLM level 2), see :meth:`RolloutEngine.sleep`."""
        self.local_engine.sleep(refit_follows=refit_follows)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """This rank's engine: bring ``tags`` back (weights, then KV cache; no-op on CPU). Every rank calls it."""
        self.local_engine.wake_up(tags)

    def shutdown(self) -> None:
        """Stop this rank's engine and free the serving group. Every rank calls it (outside a serving phase)."""
        if self._local_engine is not None:
            self._local_engine.shutdown()
            self._local_engine = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def __enter__(self) -> ReplicatedEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
