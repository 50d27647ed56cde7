"""`megatron-dispo plan CONFIG [overrides] --nodes N --gpus-per-node G`: check a layout and memory, start nothing.

Prints the training layout, the engine placement and the per-GPU memory table of :func:`megatron_dispo.plan.make_plan`.
A layout that cannot work prints one line ``megatron-dispo plan: error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from megatron_dispo.config_loader import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. examples/configs/qwen3_8b_dispo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_tokens_per_microbatch=16384")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the allocation (sbatch --nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument(
        "--reserve-gib", type=float, default=2.0, help="CUDA context, NCCL buffers, fragmentation per GPU (default 2)"
    )
    parser.add_argument(
        "--engine-tp",
        type=int,
        default=None,
        help="GPUs per vLLM engine replica (default rollout.tensor_parallel_size, else 1)",
    )
    parser.add_argument(
        "--model-preset", default=None, help="architecture preset (default: model.hf_path/config.json, else its name)"
    )
    parser.add_argument(
        "--recompute",
        choices=("none", "selective", "full"),
        default=None,
        help="activation recompute (default: config, else none)",
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def run(args: argparse.Namespace) -> int:
    from megatron_dispo.config import load_run_config
    from megatron_dispo.plan import PlanError, make_plan

    try:
        config = load_run_config(args.config, args.overrides)
        plan = make_plan(
            config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_memory_gib=args.gpu_memory_gib,
            reserve_gib=args.reserve_gib,
            engine_tp=args.engine_tp,
            model_preset=args.model_preset,
            recompute=args.recompute,
        )
    except (ConfigError, PlanError) as exc:
        print(f"megatron-dispo plan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    console = Console(highlight=False, width=max(Console().width, 110))
    lay, mem, arch = plan.layout, plan.memory, plan.arch
    total, active = arch.count()
    console.print(
        f"[bold]{args.config}[/bold]: {lay.nodes} x {lay.gpus_per_node} GPUs = world {lay.world}; {arch.name}, "
        f"{total / 1e9:.2f}B params ({active / 1e9:.2f}B active), {arch.num_layers} layers"
    )
    layout = Table(title="training layout (model.parallel)")
    for column in ("TP", "PP", "EP", "ETP", "CP", "DP", "expert DP", "SP", "dist. optimizer"):
        layout.add_column(column, justify="right")
    etp, expert_dp = (lay.etp, lay.expert_dp) if arch.is_moe else ("-", "-")
    row = (lay.tp, lay.pp, lay.ep, etp, lay.cp, lay.dp, expert_dp, lay.sp, lay.distributed_optimizer)
    layout.add_row(*map(str, row))
    console.print(layout)
    last = lay.engine_replica_ranks(lay.engine_replicas - 1)
    console.print(
        f"engine: {lay.engine_replicas} vLLM replicas x engine TP {lay.engine_tp}, consecutive ranks in one node "
        f"(replica 0: ranks {list(lay.engine_replica_ranks(0))}, replica {lay.engine_replicas - 1}: {list(last)})"
    )
    table = Table(title=f"per-GPU memory, GiB (most loaded pipeline stage; GPU {_gib(mem.gpu)} GiB)")
    table.add_column("item")
    table.add_column("training", justify="right")
    table.add_column("rollout", justify="right")
    table.add_column("how")
    fp8_cast = " + 1 B/linear (fp8 cast)" if config.model.fp8 else ""
    grad_dtype = "fp32" if config.optim.grad_reduce_in_fp32 else "param dtype"
    sharded = ""
    if lay.distributed_optimizer:
        sharded = f" / DP x CP {lay.dp * lay.cp}" + (f", experts / expert DP {lay.expert_dp}" if arch.is_moe else "")
    state = [
        (
            "model weights",
            mem.weights,
            f"{mem.local_params / 1e9:.3f}B local params, {config.model.params_dtype}{fp8_cast}",
        ),
        ("gradients", mem.gradients, f"DDP grad buffer, {grad_dtype}"),
        ("optimizer", mem.optimizer, f"Adam master + 2 moments{sharded}"),
    ]
    for name, value, how in state:
        table.add_row(name, _gib(value), _gib(value), how)
    budget = config.trainer.max_tokens_per_microbatch
    split = ", / TP (SP)" if lay.sp else ""
    how = f"{plan.tokens_per_microbatch} tokens/micro-batch (budget {budget}), recompute {plan.recompute}{split}"
    table.add_row("activations", _gib(mem.activations), "-", how)
    fp8_engine = ", fp8 linears" if config.rollout.quantization == "fp8" else ""
    table.add_row(
        "engine weights", "-", _gib(mem.engine_weights), f"full model / engine TP {lay.engine_tp}{fp8_engine}"
    )
    util, max_len = config.rollout.gpu_memory_utilization, config.rollout.max_model_len
    how = f"gpu_memory_utilization {util} x GPU - engine weights; {mem.kv_sequences} x {max_len}-token sequences"
    table.add_row("KV cache", "-", _gib(mem.kv_cache), how)
    table.add_row("reserve", _gib(mem.reserve), _gib(mem.reserve), "CUDA context, NCCL, fragmentation")
    peak = f"peak {_gib(mem.peak)} of {_gib(mem.gpu)} GiB ({mem.peak / mem.gpu:.0%})"
    table.add_row("[bold]total[/bold]", _gib(mem.training_phase), _gib(mem.rollout_phase), peak)
    console.print(table)
    console.print(f"plan: OK, peak {_gib(mem.peak)} GiB of {_gib(mem.gpu)} GiB per GPU")
    return 0
