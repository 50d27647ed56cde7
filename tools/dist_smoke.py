"""Multi-node connectivity check: a few data-parallel SGD steps of a tiny linear model, launched like the trainer.

Run it where `megatron-dispo train` would run (same torchrun line, same CONFIG and overrides) before spending GPU
hours: it proves that the rendezvous (MASTER_ADDR/MASTER_PORT) works, that every node started the expected number of
ranks, that each rank reads the same config bytes and overrides, that chosen environment variables reached every
rank, and that gradient all-reduce gives the right numbers. Every rank checks the all-reduced gradient against the
full-batch gradient it recomputes from every rank's (seeded) data shard, so a broken collective fails loudly.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr $ADDR --master-port 29500 \\
        tools/dist_smoke.py examples/configs/qwen3_8b_dispo.yaml trainer.steps=3 --expect-env HF_HOME

Each rank prints `step N rank R world W loss L grad_err E`; rank 0 ends with `dist_smoke: OK ...`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

TORCHRUN_ENV: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
GRAD_TOLERANCE = 1e-5
"""Max |all-reduced grad - full-batch grad|; fp32 sums over a few ranks differ only by rounding (~1e-7)."""


@dataclass(frozen=True)
class RankInfo:
    """What one rank sees; gathered on every rank so that any mismatch between ranks is reported by all of them."""

    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    hostname: str
    config_sha256: str
    overrides: tuple[str, ...]
    expected_env: tuple[tuple[str, str | None], ...]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, help="YAML config every rank must read identically")
    parser.add_argument("overrides", nargs="*", help="dotted overrides (key=value), checked identical on every rank")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps (each is one gradient all-reduce)")
    parser.add_argument("--features", type=int, default=8, help="input size of the linear model")
    parser.add_argument("--batch-per-rank", type=int, default=16, help="samples in each rank's data shard")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto", help="auto: nccl if CUDA")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="collective/rendezvous timeout")
    parser.add_argument(
        "--expect-env", action="append", default=[], metavar="VAR", help="env var that must be set, same on all ranks"
    )
    args = parser.parse_intermixed_args(argv)
    for name in ("steps", "features", "batch_per_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for override in args.overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not key=value (e.g. trainer.steps=3)")
    return args


def torchrun_env() -> dict[str, str]:
    """The variables torchrun sets; a clear error when the script was started without it."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"{missing} not set: start this script with torchrun (see the module docstring)")
    return {name: os.environ[name] for name in TORCHRUN_ENV}


def config_digest(config: Path | None) -> str:
    """sha256 of the config bytes ('none' without a config); a missing file names the node that lacks it."""
    if config is None:
        return "none"
    if not config.is_file():
        raise FileNotFoundError(f"config {config} not found on host {socket.gethostname()} (cwd {Path.cwd()})")
    return hashlib.sha256(config.read_bytes()).hexdigest()


def shard(rank: int, batch: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s data: x ~ N(0, 1), y = x @ w_true + 0.1 * noise, with w_true = 1..features / features."""
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    w_true = torch.arange(1, features + 1, dtype=torch.float64) / features
    y = x @ w_true + 0.1 * torch.randn(batch, generator=gen, dtype=torch.float64)
    return x.float(), y.float()


def full_batch_grad(weight: torch.Tensor, world: int, batch: int) -> torch.Tensor:
    """Reference gradient of the mean squared error over ALL ranks' shards, recomputed locally (no communication)."""
    xs, ys = zip(*(shard(r, batch, weight.numel()) for r in range(world)), strict=True)
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    residual = x @ weight.detach().double().cpu() - y
    return (2.0 / x.shape[0]) * (x.T @ residual)


def check_ranks_agree(infos: list[RankInfo], expected_env: list[str]) -> list[str]:
    """Problems found across ranks (empty list = consistent); every rank computes the same list."""
    problems = []
    if sorted(i.rank for i in infos) != list(range(len(infos))):
        problems.append(f"ranks are not 0..{len(infos) - 1}: {sorted(i.rank for i in infos)}")
    for field_name in ("config_sha256", "overrides"):
        values = {getattr(i, field_name) for i in infos}
        if len(values) > 1:
            problems.append(f"{field_name} differs across ranks: {sorted(map(str, values))}")
    per_node: dict[int, list[RankInfo]] = {}
    for info in infos:
        per_node.setdefault(info.node_rank, []).append(info)
    for node_rank, members in sorted(per_node.items()):
        if len(members) != members[0].local_world_size:
            problems.append(
                f"node {node_rank} runs {len(members)} ranks but LOCAL_WORLD_SIZE={members[0].local_world_size}"
            )
    for position, name in enumerate(expected_env):
        values = {i.expected_env[position][1] for i in infos}
        if None in values or len(values) > 1:
            problems.append(f"env {name} not identical on all ranks: {sorted(map(str, values))}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = torchrun_env()
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(env["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.monotonic()
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(
        f"rank {rank} world {world} host {socket.gethostname()} node_rank {os.environ.get('GROUP_RANK', '?')} "
        f"local_rank {local_rank} backend {backend} master {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
        f"rendezvous_s {time.monotonic() - started:.2f}",
        flush=True,
    )

    info = RankInfo(
        rank=rank,
        local_rank=local_rank,
        local_world_size=int(env["LOCAL_WORLD_SIZE"]),
        node_rank=int(os.environ.get("GROUP_RANK", "0")),
        hostname=socket.gethostname(),
        config_sha256=config_digest(args.config),
        overrides=tuple(args.overrides),
        expected_env=tuple((name, os.environ.get(name)) for name in args.expect_env),
    )
    infos: list[RankInfo] = [info] * world
    dist.all_gather_object(infos, info)
    problems = check_ranks_agree(infos, args.expect_env)
    if problems:
        raise RuntimeError(f"rank {rank}: launch is inconsistent: " + "; ".join(problems))
    if rank == 0:
        nodes = sorted({(i.node_rank, i.hostname) for i in infos})
        print(f"nodes {len(nodes)} {nodes} config_sha256 {info.config_sha256[:16]} overrides {list(args.overrides)}")
        for name, value in info.expected_env:
            print(f"env {name}={value}", flush=True)

    x, y = shard(rank, args.batch_per_rank, args.features)
    x, y = x.to(device), y.to(device)
    weight = torch.zeros(args.features, device=device, requires_grad=True)  # identical start on every rank
    for step in range(1, args.steps + 1):
        step_start = time.monotonic()
        loss = torch.mean((x @ weight - y) ** 2)
        (grad,) = torch.autograd.grad(loss, weight)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # DDP: equal shard sizes, so mean of grads = full-batch grad
        grad /= world
        reference = full_batch_grad(weight, world, args.batch_per_rank)
        grad_err = (grad.double().cpu() - reference).abs().max().item()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.SUM)
        global_loss /= world
        print(
            f"step {step} rank {rank} world {world} loss {global_loss.item():.6f} grad_err {grad_err:.2e} "
            f"step_s {time.monotonic() - step_start:.3f}",
            flush=True,
        )
        if grad_err > GRAD_TOLERANCE:
            raise RuntimeError(f"rank {rank} step {step}: all-reduced grad differs from full-batch grad by {grad_err}")
        with torch.no_grad():
            weight -= args.lr * grad

    checksum = weight.detach().double().sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if any(float(c) != float(checksum) for c in gathered):
        raise RuntimeError(f"rank {rank}: weights diverged across ranks: {[float(c) for c in gathered]}")
    dist.barrier()
    if rank == 0:
        nodes = len({i.node_rank for i in infos})
        print(f"dist_smoke: OK world={world} nodes={nodes} steps={args.steps} total_s={time.monotonic() - started:.2f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
