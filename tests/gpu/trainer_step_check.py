"""One trainer-side step at world size 1, run by ``tests/gpu/device_check.sh`` (NCCL on a GPU; gloo on a CPU machine).

Phases, each timed, with torch's GPU memory after it: start torch.distributed + Megatron, build the bf16 policy from a
tiny Qwen3 checkpoint, a StepBatch's tensors through the backend's collectives (broadcast and all-reduce on the
device), pi_old (no-grad forward), one DISPO update, the refit export streamed into host buckets through the
Refitter's real path (name/shape guard, bucketing, colocated transport), and ``torch.cuda.empty_cache()`` as the engine
wake does. Prints one table; ``--out FILE`` also writes the rows as JSON. Exit status 1 if any phase failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30


class HostBuckets:
    """A refit receiver that keeps every bucket in host memory: what the colocated transport hands an engine."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.buckets: list[list[tuple[str, torch.Tensor]]] = []

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        return self.load_weight_buckets([list(named_tensors)])

    def load_weight_buckets(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> dict[str, float]:
        for bucket in buckets:
            self.buckets.append([(name, tensor.detach().to("cpu", copy=True)) for name, tensor in bucket])
        return {}


def _memory() -> tuple[float, float]:
    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB


def _phase(rows: list[dict[str, Any]], name: str, run: Callable[[], str]) -> bool:
    started = time.perf_counter()
    try:
        detail, ok = run(), True
    except Exception as error:  # a failed phase is a row of the table, not a crash of the check
        detail, ok = f"{type(error).__name__}: {error}", False
        traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    allocated, reserved = _memory()
    rows.append(
        {
            "phase": name,
            "ok": ok,
            "seconds": round(time.perf_counter() - started, 3),
            "allocated_gib": round(allocated, 3),
            "reserved_gib": round(reserved, 3),
            "detail": detail,
        }
    )
    return ok


def run_checks(work_dir: Path) -> list[dict[str, Any]]:
    """Every phase in order; a phase is skipped (not run) once an earlier one failed."""
    import torch.distributed as dist

    from megatron_dispo.algorithms import get_preset
    from megatron_dispo.models.microbatch import build_microbatch
    from megatron_dispo.models.optimizer import OptimizerSettings
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.refit import RefitConfig, Refitter
    from megatron_dispo.trainer.step_batch import StepBatch, broadcast_step_batch

    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (int(n),), generator=generator).tolist() for n in (5, 7, 4, 6)]
    responses = [torch.randint(3, 200, (int(n),), generator=generator).tolist() for n in (6, 3, 8, 5)]

    def start() -> str:
        initialize_parallel(ParallelConfig())
        state["device"] = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return f"backend {dist.get_backend()}, world {dist.get_world_size()}"

    def build() -> str:
        from megatron_dispo.models.policy import MegatronPolicy

        hf_dir = make_tiny_checkpoint(work_dir / "tiny", seed=0, dtype=torch.bfloat16)
        state["hf_dir"] = hf_dir
        settings = OptimizerSettings(lr=1e-3, weight_decay=0.0)
        state["policy"] = policy = MegatronPolicy(hf_dir, ParallelConfig(), settings, params_dtype="bfloat16")
        return f"params on {policy.device}, {sum(p.numel() for p in policy.model.parameters()):,} parameters"

    def collectives() -> str:
        logprobs = [[-0.5] * len(r) for r in responses]
        batch = StepBatch.from_sequences(prompts, responses, logprobs, [True, False, True, False], ["stop"] * 4)
        from megatron_dispo.comm import GroupChannel, init_host_world

        host = GroupChannel(init_host_world(), "host", "host-world")  # the batch is host data: a gloo group
        batch = broadcast_step_batch(batch, src=0, channel=host)
        device = state["device"] or torch.device("cpu")
        checked = []
        for name, tensor in (("tokens", batch.tokens), ("logprobs", batch.rollout_logprobs)):
            on_device = tensor.to(device)
            dist.broadcast(on_device, src=0)
            if not torch.equal(on_device.cpu(), tensor):
                raise RuntimeError(f"broadcast changed {name}")
            checked.append(f"{name} {tensor.dtype}")
        routing = torch.randint(-1, 128, (batch.tokens.numel(), 3, 2), dtype=torch.int16)
        as_bytes = routing.view(torch.uint8).to(device)  # NCCL and gloo have no int16: routing travels as bytes
        dist.broadcast(as_bytes, src=0)
        if not torch.equal(as_bytes.cpu().view(torch.int16), routing):
            raise RuntimeError("broadcast changed the routing bytes")
        total = torch.tensor([float(batch.num_sequences)], device=device)
        dist.all_reduce(total)
        state["batch"] = batch
        return f"broadcast {', '.join(checked)}, int16 routing as bytes; all_reduce sum {total.item():g}"

    def pi_old() -> str:
        micro = build_microbatch(range(4), prompts, responses, pad_token_id=0)
        state["old"] = old = state["policy"].response_logprobs([micro])
        values = torch.cat([torch.as_tensor(old[i]) for i in range(4)])
        if not torch.isfinite(values).all():
            raise RuntimeError("pi_old has non-finite values")
        return f"{values.numel()} response tokens, mean log-prob {values.mean().item():.3f}"

    def update() -> str:
        policy = state["policy"]
        before = [p.detach().clone() for p in policy.model.parameters()]
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        old = {i: torch.as_tensor(v).tolist() for i, v in state["old"].items()}
        correct = torch.tensor([True, False, True, False])
        lags = [[i % 2] * len(r) for i, r in enumerate(responses)]  # two version lags: the per-lag telemetry on device
        micro = build_microbatch(
            range(4), prompts, responses, pad_token_id=0, old_logprobs=old, advantages=advantages, correct=correct,
            token_lags=lags,
        )  # fmt: skip
        num_tokens = sum(len(r) for r in responses)
        metrics = policy.train_minibatch(
            [micro], get_preset("dispo"), num_global_tokens=num_tokens, num_global_sequences=4, num_lags=2
        ).metrics
        moved = max(float((a.detach() - b).abs().max()) for a, b in zip(policy.model.parameters(), before, strict=True))
        if not moved > 0 or not all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values()):
            raise RuntimeError(f"update did not move the weights finitely (max change {moved}, metrics {metrics})")
        if abs(metrics["lag0/token_frac"] + metrics["lag1/token_frac"] - 1.0) > 1e-9:
            raise RuntimeError(f"the per-lag token shares do not add up to 1: {metrics}")
        return f"max weight change {moved:.2e}, {len(metrics)} finite metrics"

    def refit_export() -> str:
        receiver = HostBuckets(state["hf_dir"])
        refitter = Refitter(receiver, RefitConfig(check_every=0, bucket_size_mb=0.05))
        stats = refitter.refit(state["policy"].export_weights("all"))
        on_host = all(tensor.device.type == "cpu" for bucket in receiver.buckets for _, tensor in bucket)
        if not on_host or stats.num_tensors == 0:
            raise RuntimeError("the export did not land in host buckets")
        return f"{stats.num_tensors} tensors, {stats.payload_bytes / 1e6:.2f} MB in {stats.num_buckets} host buckets"

    def release() -> str:
        before = _memory()[1]
        del state["policy"]
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        after = _memory()[1]
        return f"reserved {before:.3f} -> {after:.3f} GiB after dropping the policy and empty_cache (the wake order)"

    phases = [
        ("distributed start", start),
        ("policy build (bf16)", build),
        ("StepBatch collectives", collectives),
        ("pi_old forward", pi_old),
        ("one update", update),
        ("refit export -> host", refit_export),
        ("memory release", release),
    ]
    for name, run in phases:
        if rows and not rows[-1]["ok"]:
            rows.append({"phase": name, "ok": False, "seconds": 0.0, "allocated_gib": 0.0, "reserved_gib": 0.0,
                         "detail": "skipped: an earlier phase failed"})  # fmt: skip
            continue
        _phase(rows, name, run)
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'phase':<24} {'ok':<4} {'s':>7} {'alloc GiB':>9} {'resv GiB':>9}  detail"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['phase']:<24} {'yes' if row['ok'] else 'NO':<4} {row['seconds']:>7.2f} "
            f"{row['allocated_gib']:>9.3f} {row['reserved_gib']:>9.3f}  {row['detail']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dispo_trainer_step_") as work:
        rows = run_checks(Path(work))
    print(format_table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
