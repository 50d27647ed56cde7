"""The RL loop, one for every placement. A step reads top to bottom:

    batch = source.next_batch(step)           # rollouts: engines on these ranks, or dedicated rollout ranks
    learner.learn(batch)                      # rewards -> advantages -> pi_old -> K optimizer updates
    source.publish_weights(step)              # refit the engines (+ probe check, + held-out evaluation when due)
    checkpoint / log / plot                   # written once, here

One process per rank (``torchrun``); every training rank holds a Megatron shard of the policy. Where rollouts come
from is the :class:`~megatron_dispo.trainer.rollout_source.RolloutSource` (``rollout.placement``); the maths is in
``algorithms/`` (through the :class:`~megatron_dispo.trainer.learner.Learner`), the model in ``models/``. Host data
(batches, metrics, checkpoint state) travels on the host group, model tensors on the model's groups.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from megatron_dispo.comm.channel import GroupChannel
from megatron_dispo.comm.groups import host_world_group
from megatron_dispo.config import Config
from megatron_dispo.config_loader import to_dict
from megatron_dispo.trainer.checkpoint_manager import CheckpointManager, load_files
from megatron_dispo.trainer.dedicated import eval_due
from megatron_dispo.trainer.learner import Learner
from megatron_dispo.trainer.metrics import MetricsLogger
from megatron_dispo.trainer.phases import PhaseTimer
from megatron_dispo.trainer.rollout_source import RolloutSource

LEAD_RANK = 0
"""Training rank that writes logs and checkpoint state (and talks to the rollout side)."""


class Trainer:
    """Builds the policy, the learner and the rollout source from a validated Config; runs ``trainer.max_steps``."""

    def __init__(self, config: Config, *, console: Console | None = None, dedicated: Any = None) -> None:
        """``dedicated``: (job layout, store) of a ``rollout.placement=dedicated`` job's training rank, whose
        training world is already initialised (``trainer/cli.py: run_training_job``); None for colocated."""
        from transformers import AutoConfig, AutoTokenizer

        from megatron_dispo.models.parallel import initialize_parallel
        from megatron_dispo.models.policy import MegatronPolicy

        self.config = config
        self.console = console or Console(highlight=False)
        self.run_dir = Path(config.trainer.run_dir)
        hf_config = AutoConfig.from_pretrained(config.model.hf_path)
        config.validate_for_world(int(os.environ.get("WORLD_SIZE", "1")), hf_config=hf_config)
        initialize_parallel(config.model.parallel, seed=config.trainer.seed)
        self.host = GroupChannel(host_world_group(), "host", "host-world")
        self.rank = dist.get_rank()
        self.is_lead = self.rank == LEAD_RANK
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
        pad = self.tokenizer.pad_token_id
        self.policy = MegatronPolicy(
            config.model.hf_path,
            config.model.parallel,
            config.optim,
            params_dtype=config.model.params_dtype,
            temperature=config.rollout.temperature if config.rollout.temperature > 0 else 1.0,
            fp8=config.model.fp8,
            routing_replay=config.model.moe_routing_replay == "rollout",
        )
        pad_token_id = int(pad if pad is not None else 0)
        self.learner = Learner(
            config, self.policy, self.host, pad_token_id=pad_token_id, share_prompts=self._share_prompts()
        )
        barrier = lambda: dist.barrier(group=self.host.group)  # noqa: E731
        self.checkpoints = CheckpointManager(
            self.run_dir, keep_last=config.trainer.keep_last, rank=self.rank, barrier=barrier
        )
        self.source: RolloutSource = self._rollout_source(dedicated)
        self.start_step = 1
        self._reports: dict[int, dict[str, float]] = {}
        state = self._load_checkpoint() if config.trainer.resume else None
        if state is not None:
            self.start_step = int(state["next_step"])
            self.learner.load_state_dict(state.get("learner", {}))
        self.source.begin(self.start_step, state)
        if state is not None:  # the engines started from the initial weights: give them the checkpoint's
            self.source.publish_weights(self.start_step - 1, learned=True, evaluate=False, force=True)
            if self.is_lead:
                self.console.print(f"resumed from {self.run_dir} at step {self.start_step}")
        self.logger: MetricsLogger | None = None
        if self.is_lead:
            self.logger = MetricsLogger(
                self.run_dir,
                config.logging,
                resume_from_step=self.start_step if config.trainer.resume else None,
                run_config=to_dict(config),
                console=self.console,
            )

    def _rollout_source(self, dedicated: Any) -> RolloutSource:
        if dedicated is None:
            from megatron_dispo.trainer.colocated import ColocatedRollout

            return ColocatedRollout(self.config, self.learner, self.tokenizer, self.host)
        from megatron_dispo.trainer.dedicated import DedicatedRollout

        layout, store = dedicated
        return DedicatedRollout(self.config, self.learner, self.host, layout, store)

    def _share_prompts(self) -> bool:
        """pi_old over shared prompts when the model's attention takes it and no routing must be replayed."""
        cfg = self.config
        if not cfg.trainer.share_prompt_prefix:
            return False
        reason = ""
        if not self.policy.supports_prompt_sharing:
            reason = "this model's attention (Transformer Engine, or sequence/context/pipeline parallel) does not take "
            reason += "the shared-prompt KV cache; pi_old runs full padded forwards"
        elif cfg.rollout.capture_routed_experts:
            reason = "with the engine's routing captured (MoE routing replay), pi_old runs one forward per sequence "
            reason += "so every token's routing is replayed or compared"
        if reason and dist.get_rank() == LEAD_RANK:
            self.console.print(f"[yellow]trainer.share_prompt_prefix is off: {reason}")
        return not reason

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """Rollout -> learn -> publish the new weights (refit, probe, evaluation when due)."""
        timer = PhaseTimer()
        started = time.perf_counter()
        batch, metrics = self.source.next_batch(step, timer)
        if batch.num_sequences:
            learned = self.learner.learn(batch, timer, version=step - 1)
            metrics.update(learned)
            metrics.update(self.source.batch_metrics(step, batch))
        else:  # bounded rounds found no informative group: nothing to learn from this step, the policy is unchanged
            self._warn_empty_batch(step)
        metrics.update(
            self.source.publish_weights(step, learned=bool(batch.num_sequences), evaluate=eval_due(self.config, step))
        )
        metrics.update(timer.metrics)
        metrics["perf/time/step_s"] = time.perf_counter() - started
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        cfg = self.config.trainer
        history: list[dict[str, float]] = []
        pending: dict[int, dict[str, float]] = {}
        if self.start_step == 1:
            initial = self.source.initial_evaluation()
            if initial:
                pending[0] = initial
        with self._progress() as advance:
            for step in range(self.start_step, cfg.max_steps + 1):
                metrics = self.train_step(step)
                # one plain line per rank and step: multi-node launches show every rank is alive and in step
                loss = metrics.get("train/loss", float("nan"))
                print(f"step {step} rank {self.rank} world {dist.get_world_size()} loss {loss:.6f}", flush=True)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                    started = time.perf_counter()
                    self.save(step)
                    metrics["perf/time/checkpoint_s"] = time.perf_counter() - started
                pending[step] = metrics
                history += self._log_ready(pending)
                advance()
        history += self._log_ready(pending, final=True)
        return history

    def _log_ready(self, pending: dict[int, dict[str, float]], *, final: bool = False) -> list[dict[str, float]]:
        """Log, in step order, every step whose metrics are complete (a dedicated rollout side reports a version's
        refit and evaluation after the step that made it)."""
        self._reports.update(self.source.reports())
        initial = self._reports.pop(0, None)
        if initial and self.start_step == 1:
            pending.setdefault(0, {}).update(initial)
        out = []
        for step in sorted(pending):
            if step in self._reports:
                pending[step].update(self._reports.pop(step))
            elif step and self.source.awaiting(step) and not final:
                break
            metrics = pending.pop(step)
            if self.logger is not None:
                self.logger.log(step, metrics)
                if self._plot_due(step):
                    self.write_plots()
            out.append({"step": step, **metrics})
        return out

    def _plot_due(self, step: int) -> bool:
        every = self.config.trainer.plot_every
        return bool(every) and step > 0 and (step % every == 0 or step == self.config.trainer.max_steps)

    def _warn_empty_batch(self, step: int) -> None:
        if self.is_lead:
            self.console.print(
                f"[yellow]step {step}: no group with mixed correctness in "
                f"{self.config.algorithm.dynamic_sampling.max_rounds} sampling rounds; skipping the update. If this "
                "repeats, raise algorithm.dynamic_sampling.max_rounds / oversample_factor or change the data."
            )

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        from megatron_dispo.models.checkpoint import save_checkpoint
        from megatron_dispo.models.convert_cli import HF_SUBDIR

        state = self.source.checkpoint_state(step)
        files = state.pop("files", {}) if state is not None else {}  # rank 0's, written beside the state
        if state is not None:
            state["learner"] = self.learner.state_dict()
            state["file_names"] = sorted(files)
        state = self.host.broadcast_object(state, LEAD_RANK)

        def write_model(path: Path) -> None:
            save_checkpoint(
                path, self.policy.model, self.policy.optimizer, iteration=step, parallel=self.config.model.parallel
            )
            if self.is_lead:  # what `megatron-dispo convert mcore-to-hf --ckpt <path>` needs besides weights
                self.policy.hf_config.save_pretrained(str(path / HF_SUBDIR))
                self.tokenizer.save_pretrained(str(path / HF_SUBDIR))

        self.checkpoints.save(step, state, write_model, files=files)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """The model and optimizer of the latest complete checkpoint, and its run state (None: start fresh)."""
        from megatron_dispo.models.checkpoint import latest_checkpoint, load_checkpoint

        loaded = self.checkpoints.load_latest()
        if loaded is None:
            self.console.print(f"[yellow]trainer.resume=true but {self.run_dir} has no checkpoint: starting fresh")
            return None
        model_dir = latest_checkpoint(loaded.path / "model")
        if model_dir is None:
            raise FileNotFoundError(f"{loaded.path} is marked complete but holds no model checkpoint under model/.")
        load_checkpoint(model_dir, self.policy.model, self.policy.optimizer, parallel=self.config.model.parallel)
        state = dict(loaded.trainer_state)
        state["files"] = load_files(loaded.path, state.get("file_names", [])) if self.is_lead else {}
        return state

    # ------------------------------------------------------------------ output
    def write_plots(self) -> list[Path]:
        from megatron_dispo.trainer.plotting import plot_runs

        return plot_runs({self.run_dir.name: [self.run_dir]}, self.run_dir / "plots")

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Callable[[], None]]:
        cfg = self.config.trainer
        if not self.is_lead:
            yield lambda: None
            return
        progress = Progress(
            TextColumn("[bold]RL steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console
        )
        task = progress.add_task("train", total=cfg.max_steps, completed=self.start_step - 1)
        with progress:
            yield lambda: progress.advance(task)

    def close(self, *, failed: bool = False) -> None:
        from megatron_dispo.models.parallel import destroy_parallel

        if self.logger is not None:
            self.logger.close()
        self.source.close(failed=failed)
        destroy_parallel()
