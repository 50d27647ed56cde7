#!/usr/bin/env python
"""MoE routing replay (R3): bytes of routing moved per step per rank, before (f861f95) and after (issue 24, finding 7).

    python benchmarks/bench_routing_bytes.py                                   # the 30B-A3B recipe, computed
    python benchmarks/bench_routing_bytes.py --measure --trees /path/to/f861f95 .   # + the CPU MoE layouts, traced

**Computed** from the recipe's layout (``megatron-dispo plan``: ranks, TP, DP, engine replicas) and the two
schemes' rules, per step, with every sequence ``--prompt-tokens + --response-tokens`` long (default: the recipe's
``max_prompt_tokens`` + ``max_new_tokens``, the upper bound) and every group kept:

- before: every engine rank (replica leaders and TP followers) sends its replica's routing as int64, padded to the
  largest payload, gathered to rank 0; rank 0 then broadcasts the whole batch's routing (int16) to every rank;
- after: replica leaders only send their replica's routing as 1-byte codes (2 with >= 256 experts) to rank 0, which
  sends each rank only the sequences its data-parallel rank trains on (``trainer/step_batch.deliver_routing``).

"Bytes through a rank" = what it sends plus what it receives.

**Measured** (``--measure``): each tree's real CLI for one step on the tiny Qwen3-MoE (4 experts, top-2) in the
CPU layouts the tests use (TP=2 + SP and EP=2, world 2, two engine replicas), with every collective the project
issues recorded (``tests/trainer/collective_trace.py``: tensor bytes handed to each call, per rank). Routing bytes
= the traced bytes of a run with ``model.moe_routing_replay=rollout`` minus those of the same run without it (step
1 samples the same tokens in both: same weights, same seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from megatron_dispo.config import load_run_config  # noqa: E402
from megatron_dispo.plan import make_plan  # noqa: E402
from megatron_dispo.trainer.batching import shard_for_data_parallel, split_minibatches  # noqa: E402

RECIPE = REPO / "examples" / "configs" / "qwen3_30b_a3b_dispo.yaml"
TINY = REPO / "examples" / "configs" / "tiny_cpu_dispo.yaml"
TRACER = REPO / "tests" / "trainer" / "collective_trace.py"
ONE_STEP = [
    "trainer.max_steps=1", "trainer.prompts_per_step=4", "trainer.num_minibatches=2", "algorithm.group_size=4",
    "rollout.max_new_tokens=16", "eval.every_steps=0", "data.heldout=null", "trainer.plot_every=0",
    "trainer.checkpoint_every=0",
    "data.train=[{kind: synthetic_arithmetic, difficulty: 1, num_problems: 2000, seed: 1}]",
]  # fmt: skip
LAYOUTS = {
    "MoE TP=2+SP": ["model.parallel.tensor_model_parallel_size=2", "model.parallel.sequence_parallel=true"],
    "MoE EP=2": ["model.parallel.expert_model_parallel_size=2"],
}
REPLAY = "model.moe_routing_replay=rollout"


# --- computed from the recipe's layout --------------------------------------------------------------------------------
def computed_bytes(config_path: Path, nodes: int, gpus_per_node: int, prompt: int | None, response: int | None):
    """Per rank: (before, after) routing bytes through the rank in one step of the recipe."""
    config = load_run_config(config_path, [])
    plan = make_plan(config, nodes=nodes, gpus_per_node=gpus_per_node)
    arch, lay = plan.arch, plan.layout
    group = config.algorithm.group_size
    sequences = config.trainer.prompts_per_step * group
    tokens = (prompt or config.data.max_prompt_tokens) + (response or config.rollout.max_new_tokens)
    entries = sum(arch.moe_layers) * arch.experts_per_token  # routed expert ids per token
    code = 1 if arch.num_experts < 256 else 2
    replicas, world = lay.engine_replicas, lay.world
    replica_share = sequences // replicas  # deal_groups balances tokens: equal lengths, equal shares

    def dp_rank(rank: int) -> int:  # Megatron's tp-cp-ep-dp-pp order
        return (rank // (lay.tp * lay.cp)) % lay.dp

    minibatches = split_minibatches(sequences, group, config.trainer.num_minibatches)
    trained = [sum(len(shard_for_data_parallel(mb, group, d, lay.dp)) for mb in minibatches) for d in range(lay.dp)]

    # before: int64 gather of every engine rank's padded payload, then an int16 broadcast of the whole batch
    payload_old = replica_share * (tokens - 1) * entries * 8
    broadcast_old = sequences * tokens * entries * 2
    before = [(world - 1) * payload_old + broadcast_old] + [payload_old + broadcast_old] * (world - 1)
    # after: leaders' 1-byte codes to rank 0, then each rank's data-parallel share from rank 0
    leader_payload = replica_share * (tokens - 1) * entries * code + 8
    delivered = [trained[dp_rank(r)] * tokens * entries * code for r in range(world)]
    leaders = {replica * lay.engine_tp for replica in range(replicas)}
    after = [(replicas - 1) * leader_payload + sum(delivered[1:])]
    after += [delivered[r] + (leader_payload if r in leaders else 0) for r in range(1, world)]
    shape = (
        f"{world} ranks (TP {lay.tp}, DP {lay.dp}, {replicas} engine replicas x TP {lay.engine_tp}); {sequences} "
        f"sequences x {tokens} tokens x {entries} routed ids ({sum(arch.moe_layers)} MoE layers x top-"
        f"{arch.experts_per_token}, {arch.num_experts} experts: {code}-byte codes after)"
    )
    return before, after, leaders, shape


# --- measured on the CPU MoE layouts ----------------------------------------------------------------------------------
def traced_bytes(tree: Path, model: Path, run_dir: Path, layout: list[str], replay: bool) -> dict[int, int]:
    """Per rank: tensor bytes the project's collectives moved in a 1-step world-2 run of ``tree``'s CLI."""
    trace = run_dir / "trace"
    launcher = run_dir / "traced_cli.py"
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher.write_text(
        "import importlib.util, os, runpy\n"
        f"spec = importlib.util.spec_from_file_location('collective_trace', {str(TRACER)!r})\n"
        "tracer = importlib.util.module_from_spec(spec); spec.loader.exec_module(tracer)\n"
        "tracer.install(os.environ['COLLECTIVE_TRACE_DIR'])\n"
        "runpy.run_module('megatron_dispo', run_name='__main__', alter_sys=True)\n"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
        "train", str(TINY), f"model.hf_path={model}", f"trainer.run_dir={run_dir / 'run'}", *ONE_STEP, *layout,
        *([REPLAY] if replay else []),
    ]  # fmt: skip
    env = {
        **os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
        "COLLECTIVE_TRACE_DIR": str(trace),
    }  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"error: {tree} {' '.join(layout)} failed:\n{proc.stderr[-3000:]}")
    per_rank: dict[int, int] = defaultdict(int)
    for path in trace.glob("trace-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["payload"] == "host":
                per_rank[entry["rank"]] += entry["bytes"]
    return dict(per_rank)


def warm_moe(work: Path) -> Path:
    """The tests' tiny Qwen3-MoE with the same short SFT warm-up (so step 1 keeps groups and trains)."""
    from megatron_dispo.data.synthetic import generate_arithmetic
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.trainer.warmup import WarmupConfig, sft_warmup

    if (work / "warm" / "config.json").is_file():
        return work / "warm"
    base = make_tiny_checkpoint(work / "base", moe=True, seed=0, init_std=0.02)
    return sft_warmup(base, work / "warm", generate_arithmetic(2000, 1, seed=1), WarmupConfig(steps=100, batch_size=16))


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: data.max_prompt_tokens")
    parser.add_argument("--response-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    parser.add_argument("--measure", action="store_true", help="also trace the CPU MoE layouts")
    parser.add_argument("--trees", nargs="+", default=[str(REPO)], help="source trees to measure (old first)")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    console = Console(highlight=False)

    before, after, leaders, shape = computed_bytes(
        Path(args.config), args.nodes, args.gpus_per_node, args.prompt_tokens, args.response_tokens
    )
    console.print(f"[bold]{Path(args.config).name}[/]: {shape}")
    table = Table("ranks", "before (f861f95)", "after", "before / after")
    classes = {"rank 0": [0], "other replica leaders": sorted(leaders - {0}), "TP followers": None}
    classes["TP followers"] = [r for r in range(1, len(before)) if r not in leaders]
    for name, ranks in classes.items():
        old, new = max(before[r] for r in ranks), max(after[r] for r in ranks)
        table.add_row(f"{name} ({len(ranks)})", _gb(old), _gb(new), f"{old / new:.1f}x")
    table.add_row("all ranks, sum", _gb(sum(before)), _gb(sum(after)), f"{sum(before) / sum(after):.1f}x")
    console.print(table)

    if args.measure:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_routing_bytes_"))
        model = warm_moe(work / "model")
        table = Table("tree", "layout", "rank", "traced bytes, R3 off", "R3 on", "routing bytes (on - off)")
        for index, tree in enumerate(Path(t).resolve() for t in args.trees):
            for name, layout in LAYOUTS.items():
                key = f"{index}_{name.replace(' ', '_').replace('=', '').replace('+', '_')}"
                off = traced_bytes(tree, model, work / f"{key}_off", layout, replay=False)
                on = traced_bytes(tree, model, work / f"{key}_on", layout, replay=True)
                for rank in sorted(on):
                    routing = on[rank] - off.get(rank, 0)
                    table.add_row(tree.name, name, str(rank), f"{off.get(rank, 0):,}", f"{on[rank]:,}", f"{routing:,}")
                console.print(f"{tree.name} {name}: done")
        console.print(table)
        console.print(f"runs kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
