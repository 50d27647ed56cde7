"""Dedicated placement, rollout side: the program of the last ``rollout.num_ranks`` ranks of the job.

Each rollout rank holds an engine replica and a refitter; the first (the driver) also hosts the collector and talks
to training rank 0 (``trainer/messages.py`` gives the order). It generates batch s with version
``generation_version(s, k)`` on every replica; every rollout rank receives every weight version through the refit
broadcast transport and refits and checks its own engine; the others serve the driver's generate calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_dispo.comm.channel import GroupChannel, StoreBridge
from megatron_dispo.config import Config
from megatron_dispo.refit import ProbeBatch
from megatron_dispo.refit.transports import receive_broadcast_buckets
from megatron_dispo.trainer.bridge import JobLayout, init_rollout_world, open_bridges
from megatron_dispo.trainer.dedicated import TRAINER, batches_ahead, generation_version
from megatron_dispo.trainer.messages import (
    BatchReady,
    Hello,
    Reports,
    RolloutFailed,
    Start,
    VersionReports,
    WeightsHeader,
)
from megatron_dispo.trainer.step_batch import StepBatch, send_step_batch
from megatron_dispo.trainer.step_metrics import gather_refit_metrics


class RolloutRank:
    """One rollout rank: engine replica + refitter (+ collector and trainer link on the driver)."""

    def __init__(self, config: Config, layout: JobLayout, store: Any) -> None:
        from transformers import AutoTokenizer

        from megatron_dispo.refit import Refitter
        from megatron_dispo.rollout.replicas import ReplicatedEngine
        from megatron_dispo.trainer.collector import RolloutCollector
        from megatron_dispo.trainer.partial_rollout import PartialRollouts

        self.config = config
        self.train_world = layout.train_world
        timeout = timedelta(seconds=config.trainer.bridge_timeout_s)
        self.bridge: StoreBridge
        self.bridge, self.weights = open_bridges(layout, store, timeout)
        init_rollout_world(layout, store, timeout)
        self.world = GroupChannel(dist.group.WORLD, "host", "rollout-world") if dist.is_initialized() else None
        self.engine = ReplicatedEngine(config.model.hf_path, config.rollout)
        self.is_driver = self.engine.is_driver
        self.collector: Any = None
        shared: tuple[ProbeBatch, bool] | None = None
        if self.is_driver:
            self.collector = RolloutCollector(config, self.engine, AutoTokenizer.from_pretrained(config.model.hf_path))
            if config.rollout.partial:
                self.collector = PartialRollouts(self.collector, config, lambda: self.version)
            sequences, prompt_lens = self.collector.probe_sequences()
            shared = (ProbeBatch(tuple(sequences), tuple(prompt_lens)), bool(self.collector.heldout))
        probe, self.has_heldout = self.world.broadcast_object(shared, 0) if self.world else shared
        self.refitter = Refitter(self.engine.local_engine, config.refit, probe=probe)
        if self.is_driver:
            self.bridge.send_object(Hello(probe), TRAINER)
        self.version = 0
        self.reports: Reports = {}

    def run(self) -> int:
        """Generate batches start..N, then serve the last versions (evaluations) until the trainer says stop."""
        cfg = self.config.trainer
        start = self._control()
        if not isinstance(start, Start):
            return 0
        if start.collector_state is not None and self.collector is not None:
            self.collector.load_state_dict(start.collector_state)
        if start.start_step > 1:  # resumed: the checkpoint's weights come next
            header = self._control()
            if not isinstance(header, WeightsHeader):
                return 0
            self._load(header)
            self.reports.pop(self.version, None)
        elif self.has_heldout:  # as the colocated trainer: the initial weights are always evaluated
            self.reports[0] = self._evaluate()
        granularity = cfg.num_minibatches * self._dp_size()
        collected = time.perf_counter()  # when the last batch was collected: idle = sending it + waiting + loading
        for step in range(start.start_step, cfg.max_steps + 1):
            waited = time.perf_counter()
            while self.version < generation_version(step, batches_ahead(self.config)):
                header = self._control()
                if not isinstance(header, WeightsHeader):
                    return 0
                self._load(header)
            waited = time.perf_counter() - waited
            started = time.perf_counter()
            batch, metrics = self._generate(step, granularity)
            if batch is None:  # a serving rank: the driver reports the batch
                self.reports = {}
                continue
            metrics["perf/time/rollout_s"] = time.perf_counter() - started - metrics.get("perf/time/reward_s", 0.0)
            metrics["perf/time/wait_for_weights_s"] = waited
            metrics["perf/time/rollout_idle_s"] = started - collected
            collected = time.perf_counter()
            self.bridge.send_object(BatchReady(step, metrics, self.collector.state_dict(), self.reports), TRAINER)
            if batch.token_version is None:  # every sequence: this version's sample
                batch = dataclasses.replace(batch, policy_version=torch.full((batch.num_sequences,), self.version))
            send_step_batch(batch, TRAINER, self.bridge)
            self.reports = {}
        while True:  # versions the trainer sends after the last batch: evaluations, then stop
            header = self._control()
            if not isinstance(header, WeightsHeader):
                return 0
            self._load(header)
            if self.is_driver and header.reply_now:
                self.bridge.send_object(VersionReports(self.reports), TRAINER)
            self.reports = {}

    def fail(self, error: BaseException) -> None:
        """Tell the trainer why (the driver); a failed serving rank fails the driver's next collective instead."""
        if self.is_driver:
            self.bridge.send_object(RolloutFailed(f"{type(error).__name__}: {error}"), TRAINER)

    def close(self) -> None:
        self.bridge.close()
        if self.weights is not self.bridge:
            self.weights.close()
        self.engine.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ internals
    def _control(self) -> Any:
        return self.bridge.broadcast_object(None, TRAINER)

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """One weight version's (name, tensor) stream, bucket by bucket as the engine loads."""
        for bucket in receive_broadcast_buckets(meta=self.bridge, data=self.weights, src=TRAINER):
            yield from bucket

    def _load(self, header: WeightsHeader) -> None:
        """Load one weight version as it streams in (generation is paused only for this), check it, evaluate it."""
        stats = self.refitter.refit(self._tensors(), trainer_logprobs=header.probe_logprobs)
        self.version = header.version
        report = {f"refit/{k.split('/', 1)[-1]}": v for k, v in stats.metrics().items()}
        tp = self.engine.placement.tensor_parallel_size
        report |= gather_refit_metrics(self.world, stats.seconds, stats.payload_bytes, tp)[0]
        report["refit/policy_version"] = float(self.version)
        if header.evaluate:
            started = time.perf_counter()
            report.update(self._evaluate())
            report["perf/time/eval_s"] = time.perf_counter() - started
        self.reports[self.version] = report

    def _evaluate(self) -> dict[str, float]:
        """Held-out accuracy on every replica: the driver evaluates, the other rollout ranks serve it."""
        return self.engine.serving_phase(lambda: self.collector.evaluate()) or {}

    def _generate(self, step: int, granularity: int) -> tuple[StepBatch | None, dict[str, float]]:
        """This step's batch (driver; every replica generates its share) or None (the ranks that serve)."""
        collected = self.engine.serving_phase(lambda: self.collector.collect(step, granularity=granularity))
        if collected is None:
            return None, {}
        groups, metrics = collected
        return self.collector.to_step_batch(groups, step), metrics

    def _dp_size(self) -> int:
        """Data-parallel ranks of the training world (its batches must split over them)."""
        parallel = self.config.model.parallel
        return self.train_world // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)
