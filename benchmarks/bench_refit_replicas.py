"""Benchmark: the sending rank's peak memory during a refit into 2 engine replicas vs into a single engine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_refit_replicas.py [--layers 4 --bucket-mb 64 --refits 3]
    (add --mmap-threshold 131072 to see each refit's own transient, see below)

Issue #15 asks that refitting two engine replicas costs the sending rank no more memory than refitting one engine,
up to one bucket plus one tensor. This measures it on the trainer's own path, in two spawned gloo worlds run one
after the other:
  (a) world 1: one rank, one engine (the single-engine refit);
  (b) world 2: two ranks, TP=1 each, one engine replica per rank (``ReplicatedEngine``), every rank refitting its own
      replica from its own export, as ``Trainer._refit`` does.
Every rank builds a ``MegatronPolicy`` (TP=1, AdamW) from a ``make_tiny_checkpoint`` dense Qwen3, its
``ReplicatedEngine`` and a ``Refitter(engine.local_engine, RefitConfig(bucket_size_mb=B, check_every=0))``; each refit
is ``send_weights(policy.export_weights("all"), refitter)`` (the probe self-check is off: it scores, it moves no
weights). Per rank and refit it reports the time, the payload bytes, and the peak memory increase = VmHWM during the
refit minus VmRSS just before it. VmHWM is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``;
where that is refused, a background thread samples VmRSS every ~1 ms instead (the method used is printed).
The check printed at the end: ``peak(2 replicas, rank 0) <= peak(single) + bucket bytes + largest tensor bytes``,
each peak the largest over the refits of that rank.
With glibc's default (dynamic) mmap threshold, tensors freed during the first refit stay in the heap and later refits
reuse them, so the first refit's figure carries that one-time growth; ``--mmap-threshold 131072`` fixes the threshold
in the ranks, every freed tensor goes back to the OS, and every refit shows only its own transient.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``: cheap enough to sample every millisecond)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def _hwm_bytes() -> int:
    """The kernel's resident high-water mark of this process (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (then the sampler measures the peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _hwm_bytes() <= _rss_bytes() + (1 << 20)  # a kernel that ignores "5" leaves the old, higher mark


class _PeakMeter:
    """Peak RSS increase over a ``with`` block: the kernel's VmHWM after a reset, else a 1 ms RSS sampling thread.

    The kernel's mark sees every page touched, however brief; the sampler can miss a spike shorter than its period,
    which is why it is only the fallback.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMeter:
        gc.collect()
        if self.method == "auto":
            self.method = "vmhwm" if _reset_hwm() else "sampled"
        elif self.method == "vmhwm" and not _reset_hwm():
            raise RuntimeError("writing 5 to /proc/self/clear_refs is refused here; use --method sampled")
        self.before = _rss_bytes()
        self.peak = self.before
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes(), _hwm_bytes() if self.method == "vmhwm" else 0)

    @property
    def increase(self) -> int:
        return self.peak - self.before


class _LargestTensor:
    """Passes the export stream through, noting its largest tensor (the ``+ one tensor`` of the bound)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.name = ""

    def watch(self, stream: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes > self.nbytes:
                self.nbytes, self.name = nbytes, name
            yield name, tensor


def _refit_worker(rank: int, world: int, port: int, path: str, args: argparse.Namespace, results: Any) -> None:
    """One rank: policy, engine replica, refitter; ``args.refits`` measured refits; results to the parent."""
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    try:
        results.put(("ok", rank, _measure(rank, world, path, args)))
    except BaseException as error:  # the parent must hear of a failure instead of waiting for its timeout
        import traceback

        results.put(("error", rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        raise


def _measure(rank: int, world: int, path: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from megatron_dispo.models.config import OptimizerSettings, ParallelConfig
    from megatron_dispo.models.parallel import destroy_parallel, initialize_parallel
    from megatron_dispo.models.policy import MegatronPolicy
    from megatron_dispo.refit import RefitConfig, Refitter, send_weights
    from megatron_dispo.rollout.config import RolloutConfig
    from megatron_dispo.rollout.replicas import ReplicatedEngine

    torch.set_num_threads(1)
    tag = f"[world {world} rank {rank}]"
    started = time.perf_counter()
    initialize_parallel(ParallelConfig(), seed=0)
    policy = MegatronPolicy(path, ParallelConfig(), OptimizerSettings(lr=1e-3, weight_decay=0.0))
    print(f"{tag} policy up ({time.perf_counter() - started:.0f} s)", flush=True)
    rollout = RolloutConfig(kv_cache_gib=0.05, max_model_len=128, max_new_tokens=8, replica_timeout_s=3600)
    engine = ReplicatedEngine(path, rollout, gpus_per_node=world)
    config = RefitConfig(bucket_size_mb=args.bucket_mb, transport="colocated", check_every=0)
    refitter = Refitter(engine.local_engine, config)
    print(f"{tag} engine replica {engine.placement.replica_index}/{engine.num_replicas} up "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    refits = []
    largest = _LargestTensor()
    for index in range(args.refits):
        dist.barrier()  # the ranks of a world refit together, as in the trainer
        with _PeakMeter(args.method) as meter:
            stats = send_weights(largest.watch(policy.export_weights("all")), refitter)
        assert stats is not None
        refits.append(
            {
                "seconds": stats.seconds,
                "bytes": stats.payload_bytes,
                "buckets": stats.num_buckets,
                "rss_before": meter.before,
                "peak_increase": meter.increase,
                "method": meter.method,
            }
        )
        print(f"{tag} refit {index + 1}/{args.refits}: {stats.payload_bytes / 1e6:.1f} MB in {stats.num_buckets} "
              f"buckets, {stats.seconds:.2f} s; RSS before {meter.before / 2**20:.0f} MiB, peak increase "
              f"{meter.increase / 2**20:.1f} MiB ({meter.method})", flush=True)  # fmt: skip
    dist.barrier()
    engine.shutdown()
    destroy_parallel()
    return {"refits": refits, "bucket_bytes": config.bucket_bytes, "largest_bytes": largest.nbytes,
            "largest_name": largest.name, "replica": engine.placement.replica_index}  # fmt: skip


def _run_world(world: int, path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn a gloo world of ``world`` ranks and wait for every rank's measurements (any failure aborts)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_refit_worker, args=(rank, world, port, str(path), args, results))
             for rank in range(world)]  # fmt: skip
    for proc in procs:
        proc.start()
    out: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + args.timeout_s
    try:
        while len(out) < world:
            try:
                status, rank, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"world {world}: a rank died (exit codes {dead}) or timed out") from None
                continue
            if status != "ok":
                raise RuntimeError(f"world {world} rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return [out[rank] for rank in range(world)]


def _peak(rank_result: dict[str, Any]) -> int:
    return max(refit["peak_increase"] for refit in rank_result["refits"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the dense model (~50 MB fp32 each)")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="RefitConfig.bucket_size_mb")
    parser.add_argument("--refits", type=int, default=3, help="measured refits per rank")
    parser.add_argument("--method", choices=("auto", "vmhwm", "sampled"), default="auto",
                        help="peak measurement: reset VmHWM (auto falls back to sampling where refused)")  # fmt: skip
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="MALLOC_MMAP_THRESHOLD_ of the ranks in bytes: a fixed threshold turns off glibc's "
        "dynamic one, so freed tensors go back to the OS and each refit's own transient shows",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per world")
    args = parser.parse_args()
    # one thread per rank, unpinned (the cores are shared): set before the children import torch and vLLM
    os.environ |= {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "ERROR"}
    if args.mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # glibc reads it when a child starts
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_refit_replicas_") as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "dense", num_hidden_layers=args.layers, hidden_size=1024,
                                    intermediate_size=3072, num_attention_heads=16, num_key_value_heads=4,
                                    head_dim=64)  # fmt: skip
        size = (path / "model.safetensors").stat().st_size
        print(f"dense Qwen3, {args.layers} layers, {size / 1e6:.0f} MB fp32; bucket {args.bucket_mb:g} MiB; "
              f"{args.refits} refits per rank; {os.cpu_count()} cores; MALLOC_MMAP_THRESHOLD_="
              f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc dynamic)')}", flush=True)  # fmt: skip
        single = _run_world(1, path, args)
        print("world 1 done", flush=True)
        replicas = _run_world(2, path, args)
        print("world 2 done", flush=True)

    print("\n| setup | rank (replica) | refit s | payload MB | buckets | RSS before MiB | peak increase MiB |")
    print("|---|---|---|---|---|---|---|")
    for label, world in (("single engine", single), ("2 replicas", replicas)):
        for rank, result in enumerate(world):
            for refit in result["refits"]:
                print(f"| {label} | {rank} ({result['replica']}) | {refit['seconds']:.2f} | {refit['bytes'] / 1e6:.1f} "
                      f"| {refit['buckets']} | {refit['rss_before'] / 2**20:.0f} | "
                      f"{refit['peak_increase'] / 2**20:.1f} |")  # fmt: skip
    methods = sorted({refit["method"] for world in (single, replicas) for r in world for refit in r["refits"]})
    bucket, largest = single[0]["bucket_bytes"], single[0]["largest_bytes"]
    peak_single, peak_rank0 = _peak(single[0]), _peak(replicas[0])
    bound = peak_single + bucket + largest
    print(f"\nmethod: {', '.join(methods)}; bucket {bucket / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB "
          f"({single[0]['largest_name']})")  # fmt: skip
    for rank, result in enumerate(replicas):
        seconds = ", ".join(f"{r['seconds']:.2f}" for r in result["refits"])
        print(f"replica {result['replica']} (rank {rank}): refit time_s [{seconds}], bytes "
              f"{result['refits'][-1]['bytes']}, peak increase {_peak(result) / 2**20:.1f} MiB")  # fmt: skip
    verdict = "PASS" if peak_rank0 <= bound else "FAIL"
    print(
        f"{verdict}: peak_2replicas_rank0 {peak_rank0 / 2**20:.1f} MiB <= peak_single {peak_single / 2**20:.1f} "
        f"+ bucket {bucket / 2**20:.1f} + largest tensor {largest / 2**20:.1f} = {bound / 2**20:.1f} MiB"
    )
    ratio = peak_rank0 / peak_single if peak_single > 0 else float("inf")
    print(f"ratio peak_2replicas_rank0 / peak_single = {ratio:.3f}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
