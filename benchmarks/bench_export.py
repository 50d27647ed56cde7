#!/usr/bin/env python
"""Refit export at TP=2 x DP=2 (4 ranks): this tree against a baseline commit, measured in one invocation.

    python benchmarks/bench_export.py [--baseline-ref c2b4c87] [--hidden 512 --layers 8 --repeats 3]

The export streams every HF tensor to global rank 0 (``export_hf_weights(destination="rank0")``). Before issue 14
every data-parallel replica's TP leader gathered every parameter over its TP group and dropped the result; now only
the replica that sends to rank 0 gathers. Both trees run the same 4-rank launch on the same checkpoint; each prints
the slowest rank's export time (best of ``--repeats``), and the ratio baseline / this tree is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, torch, torch.distributed as dist
from transformers import AutoConfig
from megatron_dispo.models.builder import build_model
from megatron_dispo.models.convert import export_hf_weights, load_hf_weights
from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel

hf_dir, repeats = sys.argv[1], int(sys.argv[2])
parallel = ParallelConfig(tensor_model_parallel_size=2)
initialize_parallel(parallel)
hf_config = AutoConfig.from_pretrained(hf_dir)
model = build_model(hf_config, parallel)
load_hf_weights(model, hf_dir, hf_config)
best = float("inf")
for _ in range(repeats):
    dist.barrier()
    started = time.perf_counter()
    received = sum(t.numel() * t.element_size() for _, t in export_hf_weights(model, hf_config, destination="rank0"))
    slowest = torch.tensor([time.perf_counter() - started])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    best = min(best, float(slowest))
if dist.get_rank() == 0:
    print(f"EXPORT {best:.4f} {received}", flush=True)
dist.destroy_process_group()
"""


def export_seconds(repo: Path, hf_dir: Path, repeats: int) -> tuple[float, int]:
    script = Path(tempfile.mkdtemp(prefix="bench_export_")) / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script),
               str(hf_dir), str(repeats)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, env=env, capture_output=True, text=True, cwd=repo, timeout=900).stdout
    line = next(line for line in out.splitlines() if line.startswith("EXPORT"))
    _, seconds, received = line.split()
    return float(seconds), int(received)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="c2b4c87")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    hf_dir = make_tiny_checkpoint(
        work / "model", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, intermediate_size=4 * args.hidden,
    )  # fmt: skip
    now, received = export_seconds(REPO, hf_dir, args.repeats)
    baseline_repo = work / "baseline_src"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline_repo), args.baseline_ref],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        before, received_before = export_seconds(baseline_repo, hf_dir, args.repeats)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline_repo)], check=True)
    print(f"export to rank 0 at TP=2 x DP=2, {received / 1e6:.1f} MB received by rank 0 (baseline: "
          f"{received_before / 1e6:.1f} MB)")  # fmt: skip
    print(f"baseline {args.baseline_ref}: {before:.3f} s   this tree: {now:.3f} s   ratio {before / now:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
