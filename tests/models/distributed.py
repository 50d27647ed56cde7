"""Launch a function on N local processes with a torchrun-style environment (gloo on CPU), for multi-rank tests.

Each worker gets MASTER_ADDR/MASTER_PORT (a free port), RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and
OMP_NUM_THREADS=1, exactly the variables torchrun sets, so the code under test initialises torch.distributed the same
way it does in production. The parent collects each rank's return value; any failure or a timeout kills every worker
and raises with the failing rank's traceback (a hung collective must never hang the test suite).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerError", "free_port", "run_workers"]


class WorkerError(RuntimeError):
    """A worker raised, died or timed out; the message holds its rank and traceback."""


def free_port() -> int:
    """A TCP port that is free right now on localhost (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_main(
    target: Callable[..., Any], rank: int, env: dict[str, str], args: tuple, results: mp.Queue
) -> None:  # pragma: no cover - runs in the child
    from megatron_dispo.lifetime import die_with_parent

    # a killed test run leaves no worker (nor its resource tracker) behind; hand-built launches pass no launcher pid
    die_with_parent(int(env.get("_LAUNCHER_PID", os.getppid())))
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        value = target(*args)
        # plain pickle: torch's queue reducer would pass tensors as shared-memory fds that vanish with the child
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # teardown must never mask the real result
            pass


def run_workers(
    target: Callable[..., Any],
    world_size: int,
    *,
    timeout_s: float = 180.0,
    args: tuple = (),
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``target(*args)`` on ``world_size`` spawned processes; return the per-rank results in rank order.

    ``target`` must be a module-level (picklable) function. Raises :class:`WorkerError` with the first failing rank's
    traceback if any rank raises, exits without a result, or the whole run exceeds ``timeout_s`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1.")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive.")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    base_env |= env or {}
    base_env["_LAUNCHER_PID"] = str(os.getpid())
    procs = [
        ctx.Process(target=_worker_main, args=(target, rank, base_env, args, results), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise WorkerError(f"timeout after {timeout_s:.0f} s: ranks {missing} did not finish")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # a dying rank may still be flushing its traceback into the queue
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise WorkerError(f"ranks {dead} exited without a result (exit codes {codes})") from None
                continue
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=10.0 if len(outputs) == world_size else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
    return [outputs[rank] for rank in range(world_size)]


# --- helpers used inside workers (need megatron_dispo.models and an initialised parallel state) ----------------------


def gather_vocab_parallel(logits: Any) -> Any:
    """Full-vocabulary logits [b, s, V] from this rank's [b, s, V/TP] slice (all-gather over the TP group)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return logits.detach().clone()
    shards = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(shards, logits.detach().contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def full_named_tensors(model: Any, *, grads: bool = False) -> dict[str, Any]:
    """Layout-independent {global name: full tensor} of this rank's params (or DDP main_grads), gathered over TP.

    Expert tensors carry global expert numbers, so merging the dicts of all EP ranks gives the whole model.
    """
    from megatron_dispo.models.parallel import gather_full, global_param_name, pipeline_layer_offset

    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    num_experts, layer_offset = inner.config.num_moe_experts, pipeline_layer_offset(inner.config)
    out = {}
    for name, param in model.named_parameters():
        local = param.main_grad if grads else param
        out[global_param_name(name, num_experts, layer_offset)] = gather_full(name, param, local).float().cpu()
    return out
