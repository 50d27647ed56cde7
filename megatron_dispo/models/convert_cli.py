"""``megatron-dispo convert``: HF checkpoints to Megatron distributed checkpoints and back (stable interface).

    megatron-dispo convert hf-to-mcore --hf DIR --out DIR [--tp N] [--ep N] [--etp N] [--dtype auto|fp32|bf16|fp16]
    megatron-dispo convert mcore-to-hf --ckpt DIR --out DIR [--max-shard-gb G]

``hf-to-mcore`` builds the model sharded over TP x EP ranks, loads the HF safetensors with the sliced loader (each
rank reads only its slices) and writes a ``torch_dist`` checkpoint with :func:`megatron_dispo.models.checkpoint.
save_checkpoint` as ``--out/iter_0000000`` (+ ``latest``); the HF ``config.json`` and tokenizer files are kept in
``--out/hf/`` so the checkpoint is self-describing. Run it plainly and it launches its own ``lcm(TP, EP x ETP)`` local
processes (gloo on CPU, NCCL on GPU); under ``torchrun`` it uses the launched world instead.

``mcore-to-hf`` loads a checkpoint (a root with ``latest`` or an ``iter_*`` folder) at TP=1 on one process (or the
torchrun world: add ``--tp``/``--ep``), streams the weights through :func:`export_hf_weights` and writes
``model.safetensors`` (sharded with an index above ``--max-shard-gb``), ``config.json`` and the tokenizer files, a
folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

HF_SUBDIR = "hf"
"""Folder inside a converted Megatron checkpoint root that keeps the HF config and tokenizer files."""

_DTYPES = ("auto", "fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf", type=Path, required=True, help="HF checkpoint folder (config.json + safetensors)")
    to_mcore.add_argument("--out", type=Path, required=True, help="output checkpoint root")
    _add_layout(to_mcore)
    to_mcore.add_argument(
        "--dtype", choices=_DTYPES, default="auto", help="parameter dtype (auto: the HF config's dtype)"
    )
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("--ckpt", type=Path, required=True, help="checkpoint root (with 'latest') or iter_* folder")
    to_hf.add_argument("--out", type=Path, required=True, help="output HF folder")
    to_hf.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size limit")
    _add_layout(to_hf)


def _add_layout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")


def run(args: argparse.Namespace) -> int:
    for name in ("tp", "ep"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1.")
    if args.etp is not None and args.etp < 1:
        raise ValueError(f"--etp={args.etp} must be >= 1.")
    if args.direction == "hf-to-mcore":
        if not (args.hf / "config.json").is_file():
            raise ValueError(f"--hf {args.hf} has no config.json; pass an HF checkpoint folder.")
        job = (_hf_to_mcore, (str(args.hf), str(args.out), args.tp, args.ep, args.etp, args.dtype))
    else:
        job = (_mcore_to_hf, (str(args.ckpt), str(args.out), args.tp, args.ep, args.etp, args.max_shard_gb))
    world_size = math.lcm(args.tp, args.ep * (args.etp or args.tp))
    _run_distributed(job[0], job[1], world_size)
    print(f"convert {args.direction}: wrote {args.out}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------ launch


def _run_distributed(fn: Any, fn_args: tuple, world_size: int) -> None:
    """Under torchrun: run ``fn`` in this process. Otherwise start ``world_size`` local ranks (one: in-process)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        launched = int(os.environ["WORLD_SIZE"])
        if launched % world_size:
            raise ValueError(f"torchrun started {launched} ranks; the layout needs a multiple of {world_size}.")
        fn(*fn_args)
        return
    from megatron_dispo.models.parallel import free_port

    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "LAUNCHER_PID": str(os.getpid()),
    }
    if world_size == 1:
        os.environ.update(env | {"RANK": "0", "LOCAL_RANK": "0"})
        fn(*fn_args)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(fn, fn_args, env, rank)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    failed: list[int] = []
    while procs and not failed:
        for rank, proc in enumerate(procs):
            proc.join(timeout=0.5)
            if proc.exitcode not in (None, 0):
                failed.append(rank)
        if all(proc.exitcode == 0 for proc in procs):
            break
    if failed:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        codes = {rank: procs[rank].exitcode for rank in failed}
        raise RuntimeError(f"convert: ranks {failed} failed (exit codes {codes}); see their tracebacks above.")


def _rank_main(fn: Any, fn_args: tuple, env: dict[str, str], rank: int) -> None:  # pragma: no cover - child
    from megatron_dispo.lifetime import die_with_parent

    die_with_parent(int(env["LAUNCHER_PID"]))  # a killed conversion leaves no rank behind
    os.environ.update(env | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fn(*fn_args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------- work


def _log(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[convert {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _parallel_config(hf_config: Any, tp: int, ep: int, etp: int | None) -> Any:
    from megatron_dispo.models.parallel import ParallelConfig

    is_moe = getattr(hf_config, "model_type", "") == "qwen3_moe"
    # Megatron's MoE layer needs sequence parallelism at TP > 1; it does not change any weight.
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=is_moe and tp > 1,
    )


def _torch_dtype(name: str, hf_config: Any) -> Any:
    import torch

    if name == "auto":
        configured = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        return getattr(torch, configured) if isinstance(configured, str) else configured
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _hf_to_mcore(hf_dir: str, out_dir: str, tp: int, ep: int, etp: int | None, dtype_name: str) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model
    from megatron_dispo.models.checkpoint import save_checkpoint
    from megatron_dispo.models.convert import TOKENIZER_FILES, load_hf_weights
    from megatron_dispo.models.parallel import initialize_parallel

    hf_config = AutoConfig.from_pretrained(hf_dir)
    parallel = _parallel_config(hf_config, tp, ep, etp)
    owns_world = not dist.is_initialized()
    initialize_parallel(parallel)
    dtype = _torch_dtype(dtype_name, hf_config)
    _log(f"building {hf_config.model_type} (TP={tp}, EP={ep}, world={dist.get_world_size()}, {dtype})")
    model = build_model(hf_config, parallel, params_dtype=dtype)
    _log(f"loading {hf_dir} (each rank reads only its slices)")
    load_hf_weights(model, hf_dir, hf_config)
    out = Path(out_dir)
    if dist.get_rank() == 0:
        hf_copy = out / HF_SUBDIR
        hf_copy.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(str(hf_copy))
        for name in TOKENIZER_FILES:
            if (Path(hf_dir) / name).is_file():
                shutil.copy2(Path(hf_dir) / name, hf_copy / name)
    _log(f"saving the distributed checkpoint to {out}")
    save_checkpoint(
        out,
        model,
        None,
        iteration=0,
        parallel=parallel,
        metadata={"converted_from": str(hf_dir), "hf_subdir": HF_SUBDIR, "dtype": str(dtype).removeprefix("torch.")},
    )
    _teardown(owns_world)


def _find_checkpoint(ckpt: Path) -> tuple[Path, Path]:
    """(iteration folder, folder with the HF config) for a root or an iter_* folder."""
    from megatron_dispo.models.checkpoint import latest_checkpoint

    iteration = latest_checkpoint(ckpt) or ckpt
    for candidate in (iteration / HF_SUBDIR, iteration.parent / HF_SUBDIR):
        if (candidate / "config.json").is_file():
            return iteration, candidate
    raise ValueError(
        f"--ckpt {ckpt}: no HF config found in {iteration / HF_SUBDIR} or {iteration.parent / HF_SUBDIR}; convert "
        "checkpoints written by `convert hf-to-mcore` (or put the model's config.json in <root>/hf/)."
    )


def _mcore_to_hf(ckpt_dir: str, out_dir: str, tp: int, ep: int, etp: int | None, max_shard_gb: float) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model
    from megatron_dispo.models.checkpoint import load_checkpoint, read_info
    from megatron_dispo.models.convert import export_hf_weights, save_hf_checkpoint
    from megatron_dispo.models.parallel import initialize_parallel

    iteration, hf_dir = _find_checkpoint(Path(ckpt_dir))
    info = read_info(iteration)
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    dtype = getattr(torch, info.get("metadata", {}).get("dtype", "float32"))
    parallel = _parallel_config(hf_config, tp, ep, etp)
    owns_world = not dist.is_initialized()
    initialize_parallel(parallel)
    _log(f"building {hf_config.model_type} (TP={tp}, EP={ep}, {dtype}) and loading {iteration}")
    model = build_model(hf_config, parallel, params_dtype=dtype)
    load_checkpoint(iteration, model, None, parallel=parallel)
    _log(f"streaming the weights to {out_dir}")
    weights = _progress(export_hf_weights(model, hf_config, destination="rank0"))
    if dist.get_rank() == 0:
        hf_config.dtype = dtype
        files = save_hf_checkpoint(
            weights, out_dir, hf_config, max_shard_bytes=int(max_shard_gb * 2**30), copy_files_from=hf_dir
        )
        _log(f"wrote {len(files)} safetensors file(s)")
    else:
        for _ in weights:  # take part in the gathers; nothing arrives here
            pass
    _teardown(owns_world)


def _teardown(owns_world: bool) -> None:
    """Drop Megatron's parallel state; end the process group only if this command started it (not under torchrun
    or inside a caller's world, which may go on)."""
    from megatron.core import parallel_state

    from megatron_dispo.models.parallel import destroy_parallel

    if owns_world:
        destroy_parallel()
    else:
        parallel_state.destroy_model_parallel()


def _progress(weights: Any) -> Any:
    """Pass the stream through, printing the running tensor count every 5 s and at the end (rank 0)."""
    count, last = 0, time.monotonic()
    for item in weights:
        count += 1
        if time.monotonic() - last > 5.0:
            _log(f"  {count} tensors exported")
            last = time.monotonic()
        yield item
    _log(f"  {count} tensors exported")
