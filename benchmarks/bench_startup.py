#!/usr/bin/env python
"""Policy start-up: building the Megatron model and loading the HF weights, with and without a random init first.

    python benchmarks/bench_startup.py [--hidden 512 --layers 8 --repeats 3]

Before issue 14 every rank drew a full random init (Megatron's init methods, then ``initialize_weights``, which draws
each *full* tensor and slices it) and then overwrote all of it with the HF weights. The policy now builds with
``build_model(initialize=False)``: Megatron's init methods are no-ops that only tag the TP-split parameters. Both are
timed in this process on the same checkpoint (alternating, best of ``--repeats``), the ratio is printed, and the two
models' logits are compared (they must be identical: the HF load writes every parameter).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dispo.models.builder import build_model, model_forward_logits  # noqa: E402
from megatron_dispo.models.convert import load_hf_weights  # noqa: E402
from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel  # noqa: E402
from megatron_dispo.models.tiny import make_tiny_checkpoint  # noqa: E402


def build_and_load(hf_dir: Path, hf_config: object, *, initialize: bool) -> tuple[float, torch.nn.Module]:
    started = time.perf_counter()
    model = build_model(hf_config, ParallelConfig(), initialize=initialize)
    load_hf_weights(model, hf_dir, hf_config)
    return time.perf_counter() - started, model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoConfig

    hf_dir = make_tiny_checkpoint(
        Path(tempfile.mkdtemp(prefix="bench_startup_")) / "model", hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        intermediate_size=4 * args.hidden,
    )  # fmt: skip
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    initialize_parallel(ParallelConfig())
    params = None
    times: dict[bool, list[float]] = {True: [], False: []}
    models = {}
    for _ in range(args.repeats):
        for initialize in (True, False):
            seconds, models[initialize] = build_and_load(hf_dir, hf_config, initialize=initialize)
            times[initialize].append(seconds)
    params = sum(p.numel() for p in models[False].parameters())
    tokens = torch.randint(0, hf_config.vocab_size, (2, 16))
    with torch.no_grad():
        same = torch.equal(model_forward_logits(models[True], tokens), model_forward_logits(models[False], tokens))
    before, after = min(times[True]), min(times[False])
    print(f"model: {params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}")
    print(f"build + load with random init first (before): {before:.3f} s")
    print(f"build + load without (initialize=False, now):  {after:.3f} s")
    print(f"ratio before / now = {before / after:.2f}x; logits identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
