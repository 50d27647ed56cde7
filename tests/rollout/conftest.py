"""HF transformers reference log-probs for the rollout tests (the independent reference the engine must match)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch


@cache
def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_token_logprobs(path: Path | str, sequence: list[int], start: int = 1, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of HF transformers at each token ``sequence[t]``, t >= start."""
    model = _hf_model(str(path))
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    logprobs = (logits / temperature).log_softmax(-1)
    targets = torch.tensor(sequence[start:])
    return logprobs[start - 1 : len(sequence) - 1].gather(-1, targets[:, None])[:, 0]


@pytest.fixture(scope="session")
def hf_logprobs() -> Callable[..., torch.Tensor]:
    return hf_token_logprobs
