"""Colocated placement: an engine replica on every group of ``rollout.tensor_parallel_size`` training ranks.

Rank 0 hosts the :class:`~megatron_dispo.trainer.collector.RolloutCollector` and drives every replica; the batch
reaches every rank over the host group. On GPU the engines sleep from the end of rollout until the refit, and wake in
the order that never holds two copies of anything: weights, then the refit into them, then the KV cache (which wakes
at the next ``generate``). Every rank refits its own engine from the full HF tensors and checks it with the probe.
"""

from __future__ import annotations

from typing import Any

from megatron_dispo.comm.channel import GroupChannel
from megatron_dispo.config import Config
from megatron_dispo.refit import ProbeBatch, RefitCheckError, RefitMismatchError, RefitStats, send_weights
from megatron_dispo.trainer.learner import Learner
from megatron_dispo.trainer.phases import PhaseTimer
from megatron_dispo.trainer.step_batch import StepBatch, broadcast_step_batch
from megatron_dispo.trainer.step_metrics import gather_refit_metrics

DRIVER = 0
"""Rank that hosts the collector and drives every replica."""


class ColocatedRollout:
    """Engines on the training ranks: rollout, sleep while learning, refit in place."""

    def __init__(self, config: Config, learner: Learner, tokenizer: Any, host: GroupChannel) -> None:
        from megatron_dispo.refit import Refitter
        from megatron_dispo.rollout.replicas import ReplicatedEngine
        from megatron_dispo.trainer.collector import RolloutCollector

        self.config = config
        self.learner = learner
        self.host = host
        self.engine = ReplicatedEngine(config.model.hf_path, config.rollout)
        self.collector: RolloutCollector | None = None
        probe: ProbeBatch | None = None
        if host.rank == DRIVER:
            self.collector = RolloutCollector(config, self.engine, tokenizer)
            sequences, prompt_lens = self.collector.probe_sequences()
            probe = ProbeBatch(tuple(sequences), tuple(prompt_lens))
        self.probe: ProbeBatch = host.broadcast_object(probe, DRIVER)
        self.refitter = Refitter(self.engine.local_engine, config.refit, probe=self.probe)
        self.refit_count = 0

    def begin(self, start_step: int, state: dict[str, Any] | None) -> None:
        if state is not None and self.collector is not None:
            self.collector.load_state_dict(state["collector"])

    def initial_evaluation(self) -> dict[str, float] | None:
        return self._evaluate()

    def next_batch(self, step: int, timer: PhaseTimer) -> tuple[StepBatch, dict[str, float]]:
        """Rank 0 samples and verifies this step's groups with every replica; every rank receives them; the engines
        sleep if there is something to learn."""
        metrics: dict[str, float] = {}
        with timer.phase("rollout"):
            self.engine.wake_up()
            granularity = self.config.trainer.num_minibatches * self.learner.policy.dp_size
            collected = self.engine.serving_phase(lambda: self._collector().collect(step, granularity=granularity))
            local = None
            if collected is not None:
                groups, metrics = collected
                local = self._collector().to_step_batch(groups, step)
            batch = broadcast_step_batch(local, src=DRIVER, channel=self.host)
        # the rollout phase's time is the engine's: verification is reported on its own (perf/time/reward_s)
        timer.metrics["perf/time/rollout_s"] -= metrics.get("perf/time/reward_s", 0.0)
        metrics["rollout/dynamic_sampling/empty_batch"] = float(batch.num_sequences == 0)
        if batch.num_sequences:
            with timer.phase("sleep"):
                self.engine.sleep()
        return batch, metrics

    def batch_metrics(self, step: int, batch: StepBatch) -> dict[str, float]:
        return {}

    def publish_weights(self, version: int, *, learned: bool, evaluate: bool, force: bool = False) -> dict[str, float]:
        timer = PhaseTimer()
        metrics: dict[str, float] = {}
        if learned or force:
            with timer.phase("wake"):
                self.engine.wake_up(("weights",))  # the KV cache wakes after the refit (engine.score / generate)
            with timer.phase("refit"):
                metrics.update(self._refit())
        metrics.update(timer.metrics)
        if evaluate:
            with timer.phase("eval"):
                metrics.update(self._evaluate())
            metrics["perf/time/eval_s"] = timer.metrics["perf/time/eval_s"]
        return metrics

    def reports(self) -> dict[int, dict[str, float]]:
        return {}

    def awaiting(self, version: int) -> bool:
        return False

    def checkpoint_state(self, step: int) -> dict[str, Any] | None:
        if self.collector is None:
            return None
        return {"next_step": step + 1, "policy_version": step, "collector": self.collector.state_dict()}

    def close(self, *, failed: bool = False) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------ internals
    def _collector(self) -> Any:
        assert self.collector is not None, "only the driver rank collects"
        return self.collector

    def _evaluate(self) -> dict[str, float]:
        """Held-out accuracy, generated by every replica (rank 0 drives, the others serve)."""
        self.engine.wake_up()
        return self.engine.serving_phase(lambda: self._collector().evaluate()) or {}

    def _refit(self) -> dict[str, float]:
        """Every replica receives the full HF tensors and checks itself; a failing replica is named on every rank."""
        self.refit_count += 1
        check_due = self.config.refit.check_due(self.refit_count)
        probe_logprobs = self.learner.probe_logprobs(self.probe) if check_due else None
        stream = self.learner.policy.export_weights("all")
        stats, failure = None, ""
        try:
            stats = send_weights(stream, self.refitter, trainer_logprobs=probe_logprobs)
        except (RefitCheckError, RefitMismatchError) as error:
            failure = f"{type(error).__name__}: {error}"
        return self._gather_refit_metrics(stats, failure)

    def _gather_refit_metrics(self, stats: RefitStats | None, failure: str) -> dict[str, float]:
        """Gathers every rank's refit time, bytes and outcome; raises on every rank if any replica failed."""
        placement = self.engine.placement
        seconds, payload = (stats.seconds, stats.payload_bytes) if stats else (0.0, 0)
        replicas, failed = gather_refit_metrics(
            self.host, seconds, payload, placement.tensor_parallel_size, failed=bool(failure)
        )
        if failed:
            detail = f": {failure}" if failure else f" (see rank {failed[0]}'s log for the details)"
            raise RefitCheckError(
                f"refit #{self.refit_count} failed on the engine replica(s) of rank(s) {failed} (this rank "
                f"{self.host.rank}, replica {placement.replica_index}){detail}"
            )
        assert stats is not None
        return {f"refit/{k.split('/', 1)[-1]}": v for k, v in stats.metrics().items()} | replicas
