"""Rollout engine benchmark: vLLM engine vs HF ``generate`` throughput, and repetition truncation's effect.

Sections (each prints a ratio against a baseline measured in the same run):
  1. throughput: tokens/s of ``RolloutEngine.generate`` vs HF ``generate`` (sampling, temperature 1) on the same
     prompts, for the tiny Qwen3 (~0.5M params) and a ~25M-parameter Qwen3;
  2. repetition truncation on a looping workload (``make_tiny_checkpoint(loop_period=8)``): decode tokens and time
     with vs without truncation;
  3. detector overhead on a non-looping workload (tiny dense, sampling): time with vs without the detector;
  4. weight update cost: in-place reload (dense) vs engine rebuild (MoE on CPU);
  5. engine replicas (``--replicas R``): tokens/s of R TP=1 replicas (``ReplicatedEngine``, one process and one thread
     each) vs one replica (one process, one thread) on the same batch; the two setups stay up side by side and their
     measurements alternate, so machine load drifts hit both.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_rollout.py [--prompts 32 --group 4 --new-tokens 64]``
Replicas: ``.venv/bin/python benchmarks/bench_rollout.py --replicas 2`` (runs section 5 only)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from megatron_dispo.algorithms.repetition import RepetitionConfig
from megatron_dispo.models.tiny import make_tiny_checkpoint
from megatron_dispo.rollout import RolloutConfig, RolloutEngine

MODEL_25M = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
             "head_dim": 64, "intermediate_size": 1536}  # fmt: skip


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (int(length),), generator=generator).tolist() for length in
            torch.randint(8, 33, (count,), generator=generator)]  # fmt: skip


def hf_generate_tokens_per_s(path: Path, prompts: list[list[int]], group: int, new_tokens: int) -> float:
    """HF transformers ``generate`` (sampling, KV cache, left-padded batch of all prompts x group)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=new_tokens, num_return_sequences=group,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
    seconds = time.perf_counter() - started
    tokens = out.shape[0] * (out.shape[1] - width)  # no EOS: every row generates new_tokens
    return tokens / seconds


def engine_tokens_per_s(engine: RolloutEngine, prompts: list[list[int]], group: int, new_tokens: int) -> float:
    engine.generate(prompts[:2], n=1, max_new_tokens=4, repetition=RepetitionConfig(enabled=False))  # warm-up
    batch = engine.generate(prompts, n=group, max_new_tokens=new_tokens, repetition=RepetitionConfig(enabled=False))
    return batch.stats["rollout/tokens_per_s"]


def section_throughput(root: Path, args: argparse.Namespace, config: RolloutConfig) -> None:
    prompts = make_prompts(args.prompts)
    for label, overrides in (("tiny (0.5M)", {}), ("25M", MODEL_25M)):
        path = make_tiny_checkpoint(root / label.split()[0], seed=0, **overrides)
        params = sum(t.numel() for t in load_file(path / "model.safetensors").values())
        print(f"[throughput] {label}: {params / 1e6:.1f}M params, {args.prompts} prompts x {args.group} x "
              f"{args.new_tokens} tokens", flush=True)  # fmt: skip
        with RolloutEngine(path, config) as engine:
            vllm_rate = engine_tokens_per_s(engine, prompts, args.group, args.new_tokens)
        print(f"  vLLM engine : {vllm_rate:9.0f} tok/s", flush=True)
        hf_rate = hf_generate_tokens_per_s(path, prompts, args.group, args.new_tokens)
        print(f"  HF generate : {hf_rate:9.0f} tok/s", flush=True)
        print(f"  ratio engine/HF = {vllm_rate / hf_rate:.2f}x", flush=True)


def _alternating_runs(
    engine: RolloutEngine, prompts: list[list[int]], args: argparse.Namespace, new_tokens: int, label: str
) -> dict[str, list[dict[str, float]]]:
    """Detector off/on, alternating which goes first each repeat (machine load drifts), full-size warm-up first."""
    settings = {"off": RepetitionConfig(enabled=False), "on": RepetitionConfig()}
    engine.generate(prompts, n=args.group, max_new_tokens=8, seed=99)  # warm-up at the measured batch size
    stats: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for repeat in range(args.repeats):
        for name in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            batch = engine.generate(prompts, n=args.group, max_new_tokens=new_tokens, repetition=settings[name],
                                    seed=repeat)  # fmt: skip
            stats[name].append(batch.stats)
        off, on = stats["off"][-1], stats["on"][-1]
        print(f"[repetition] {label}, repeat {repeat + 1}/{args.repeats}: detector off {off['rollout/tokens']:.0f} "
              f"tokens in {off['rollout/seconds']:.2f} s; on {on['rollout/tokens']:.0f} tokens in "
              f"{on['rollout/seconds']:.2f} s, truncated {on['rollout/finish/repetition']:.0f}/"
              f"{args.prompts * args.group}", flush=True)  # fmt: skip
    return stats


def _total(runs: list[dict[str, float]], key: str) -> float:
    return sum(run[key] for run in runs)


def section_repetition(root: Path, args: argparse.Namespace, config: RolloutConfig) -> None:
    prompts = make_prompts(args.prompts, seed=1)
    loop = make_tiny_checkpoint(root / "loop", seed=0, loop_period=8)
    with RolloutEngine(loop, config) as engine:
        stats = _alternating_runs(engine, prompts, args, args.loop_tokens, "looping workload (temperature 1)")
    saved = _total(stats["off"], "rollout/tokens") / _total(stats["on"], "rollout/tokens")
    speed = _total(stats["off"], "rollout/seconds") / _total(stats["on"], "rollout/seconds")
    print(f"  decode tokens without/with truncation = {saved:.2f}x, wall time without/with = {speed:.2f}x", flush=True)

    dense = make_tiny_checkpoint(root / "tiny", seed=0)
    with RolloutEngine(dense, config) as engine:
        stats = _alternating_runs(engine, prompts, args, args.new_tokens, "non-looping workload")
    overhead = _total(stats["on"], "rollout/seconds") / _total(stats["off"], "rollout/seconds")
    hits = _total(stats["on"], "rollout/finish/repetition")
    print(f"  detector overhead (time with/without) = {overhead:.3f}x ({hits:.0f} responses truncated)", flush=True)


def section_weight_update(root: Path, config: RolloutConfig) -> None:
    for label, moe in (("dense", False), ("moe", True)):
        base = make_tiny_checkpoint(root / f"{label}0", moe=moe, seed=0)
        new = load_file(make_tiny_checkpoint(root / f"{label}1", moe=moe, seed=1) / "model.safetensors")
        started = time.perf_counter()
        with RolloutEngine(base, config) as engine:
            start_seconds = time.perf_counter() - started
            times = [engine.update_weights(new.items())["refit/seconds"] for _ in range(3)]
        path = "engine rebuild" if moe else "in-place reload_weights"
        print(f"[update_weights] {label}: {path}: median {sorted(times)[1] * 1e3:.0f} ms "
              f"(engine start {start_seconds:.1f} s)", flush=True)  # fmt: skip


def _replica_worker(rank: int, world: int, port: int, path: str, args: argparse.Namespace, commands: Any,
                    results: Any) -> None:  # fmt: skip
    """One rank of a spawned gloo world: its ReplicatedEngine; rank 0 generates each time the parent asks."""
    import torch.distributed as dist

    from megatron_dispo.rollout.replicas import ReplicatedEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    config = RolloutConfig(max_new_tokens=args.new_tokens, max_model_len=512, kv_cache_gib=0.5, seed=0,
                           replica_timeout_s=3600)  # fmt: skip
    engine = ReplicatedEngine(path, config, gpus_per_node=world)
    off = RepetitionConfig(enabled=False)
    if engine.is_driver:
        prompts = make_prompts(args.prompts)
        engine.generate(prompts, n=args.group, max_new_tokens=8, seed=99, repetition=off)  # warm-up, full batch
        results.put(None)
        while (repeat := commands.get()) is not None:
            batch = engine.generate(prompts, n=args.group, seed=repeat, repetition=off)
            results.put(batch.stats)
        engine.release()
    else:
        engine.serve()
    engine.shutdown()
    dist.destroy_process_group()


def _start_world(world: int, path: Path, args: argparse.Namespace) -> tuple[list[Any], Any, Any]:
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_replica_worker, args=(rank, world, port, str(path), args, commands, results))
             for rank in range(world)]  # fmt: skip
    for proc in procs:
        proc.start()
    results.get(timeout=600)  # the driver's warm-up is done
    return procs, commands, results


def section_replicas(root: Path, args: argparse.Namespace) -> None:
    # one thread per replica, unpinned (the cores are shared): set before the children import torch and vLLM
    os.environ |= {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "ERROR"}
    overrides = MODEL_25M if args.replica_model == "25M" else {}
    path = make_tiny_checkpoint(root / f"replicas_{args.replica_model}", seed=0, **overrides)
    print(f"[replicas] {args.replica_model} model, {args.prompts} prompts x {args.group} x {args.new_tokens} tokens, "
          f"1 thread per replica, {os.cpu_count()} cores", flush=True)  # fmt: skip
    worlds = {1: _start_world(1, path, args), args.replicas: _start_world(args.replicas, path, args)}
    rates: dict[int, list[float]] = {1: [], args.replicas: []}
    try:
        for repeat in range(args.repeats):
            for world in (1, args.replicas) if repeat % 2 == 0 else (args.replicas, 1):
                _, commands, results = worlds[world]
                commands.put(repeat)
                stats = results.get(timeout=1800)
                rates[world].append(stats["rollout/tokens_per_s"])
                detail = ""
                if world > 1:
                    detail = f", imbalance {stats['rollout/replica_imbalance']:.2f}, per replica " + ", ".join(
                        f"{stats[f'rollout/replica{i}/tokens']:.0f} tok in {stats[f'rollout/replica{i}/seconds']:.2f} s"
                        for i in range(world)
                    )
                print(f"  repeat {repeat + 1}/{args.repeats}: {world} replica(s): {stats['rollout/tokens']:.0f} "
                      f"tokens in {stats['rollout/seconds']:.2f} s = {rates[world][-1]:.0f} tok/s{detail}",
                      flush=True)  # fmt: skip
    finally:
        for procs, commands, _ in worlds.values():
            commands.put(None)
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
    # other jobs on shared cores only ever slow a repeat down: the best repeat is the least disturbed one
    one, many = (sum(rates[w]) / len(rates[w]) for w in (1, args.replicas))
    best_one, best_many = max(rates[1]), max(rates[args.replicas])
    print(f"  1 replica : {one:9.0f} tok/s mean, {best_one:.0f} best of {args.repeats}", flush=True)
    print(f"  {args.replicas} replicas: {many:9.0f} tok/s mean, {best_many:.0f} best of {args.repeats}", flush=True)
    ratios = f"{many / one:.2f}x (means), {best_many / best_one:.2f}x (best)"
    print(f"  ratio {args.replicas} replicas / 1 replica = {ratios}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--loop-tokens", type=int, default=256, help="max_new_tokens of the looping workload")
    parser.add_argument("--repeats", type=int, default=4, help="off/on repeats of the repetition measurements")
    parser.add_argument("--sections", default=None, help="default: throughput,repetition,update (replicas with "
                        "--replicas)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=0, help="run the replicas section: R TP=1 replicas vs 1")
    parser.add_argument("--replica-model", choices=("tiny", "25M"), default="25M", help="model of the replicas section")
    args = parser.parse_args()
    config = RolloutConfig(max_new_tokens=args.new_tokens, max_model_len=512, kv_cache_gib=0.5, seed=0)
    if args.replicas == 1 or args.replicas < 0:
        parser.error(f"--replicas {args.replicas}: compare R >= 2 replicas against 1 (0 skips the section).")
    sections = set((args.sections or ("replicas" if args.replicas else "throughput,repetition,update")).split(","))
    if "replicas" in sections and not args.replicas:
        parser.error("the replicas section needs --replicas R (R >= 2).")
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        root = Path(tmp)
        if "throughput" in sections:
            section_throughput(root, args, config)
        if "repetition" in sections:
            section_repetition(root, args, config)
        if "update" in sections:
            section_weight_update(root, config)
        if "replicas" in sections:
            section_replicas(root, args)


if __name__ == "__main__":
    main()
