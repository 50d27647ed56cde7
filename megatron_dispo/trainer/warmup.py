"""Supervised warm-up: a few hundred cross-entropy steps on (prompt, worked answer) pairs before RL.

RL from a random tiny model would see reward -1 on every response and learn nothing (every group is all-wrong and
dynamic sampling drops it). The warm-up brings accuracy well above 0 but far from 1, the regime where the paper's
RL dynamics show. It trains the HF model in plain PyTorch (it is a data-preparation step, not the product's training
path) and writes an HF checkpoint that the RL run then loads into Megatron.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dispo.data.chained_arithmetic import CHAIN_SOURCE, chain_of_thought
from megatron_dispo.data.problem import Problem
from megatron_dispo.data.templates import encode_prompt


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Problems per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine-decayed to 10%)."""
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0.")


def worked_answer(problem: Problem) -> str:
    """The supervised response: the expression with its value, then the DAPO answer line (paper Fig. 9 format);
    chained-arithmetic problems get their written chain of thought ending in \\boxed{} instead."""
    if problem.source == CHAIN_SOURCE:
        return chain_of_thought(problem)
    statement = problem.problem.strip()
    expression = statement.removeprefix("What is ").rstrip("?").strip()
    return f"{expression} = {problem.answer}\nAnswer: {problem.answer}"


def sft_warmup(
    model_dir: str | Path,
    out_dir: str | Path,
    problems: Sequence[Problem],
    config: WarmupConfig,
    *,
    template: str = "dapo",
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Fine-tune the HF checkpoint in ``model_dir`` on ``problems`` and save it (with its tokenizer) to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else []
    end_ids = end_ids or [tokenizer.eos_token_id]
    examples = []
    for problem in problems:
        prompt = encode_prompt(problem.problem, template, tokenizer)
        response = tokenizer.encode(worked_answer(problem), add_special_tokens=False) + end_ids
        examples.append((prompt, response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr * 0.1)
    rng = random.Random(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for step in range(1, config.steps + 1):
        batch = [examples[rng.randrange(len(examples))] for _ in range(config.batch_size)]
        width = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, response) in enumerate(batch):
            tokens = prompt + response
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, len(prompt) : len(tokens)] = torch.tensor(response)
            attention[row, : len(tokens)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():
        (out_dir / "generation_config.json").write_text(generation.read_text())
    return out_dir
