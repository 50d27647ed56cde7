"""Benchmark: chunked log-prob + entropy vs the naive full-logits computation (plain script, not a test).

    .venv/bin/python benchmarks/bench_logprobs.py [--tokens 8192] [--vocab 151936] [--dtype bf16] [--max-naive-gb 14]

Both variants compute, for ``tokens`` positions over a ``vocab`` vocabulary (TP=1), the target log-prob and the
entropy, then backpropagate ``sum(w1 * logprob + w2 * entropy)`` to the logits:
  * naive: ``megatron_dispo.models.logprobs.naive_logprobs_entropy`` (fp32 log-softmax of the full logits, autograd);
  * chunked: ``vocab_parallel_logprobs_entropy`` (default chunk size).

Memory method: each variant runs in a fresh child process. After a 4-token warm-up run (so one-off lazy
initialisation is not counted) and once the inputs (logits, targets, weights) exist, the child records VmRSS, resets
the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs forward+backward and reads VmHWM.
"peak increase" = VmHWM - VmRSS before: everything the computation allocated, including the gradient of the logits
(the same size as the logits in both variants). Large tensors are mmap-allocated by glibc, so freed memory leaves RSS
immediately and the counter sees the true peak. Time is the wall time of that forward+backward.

The naive variant needs ~5 fp32 [tokens x vocab] buffers at its peak (~25 GB at 8k x 151936). When that exceeds
``--max-naive-gb``, both variants are also measured at the largest token count that fits (halving), the memory ratio
is reported at that equal size, and the chunked variant alone is measured at the full size.
Results are compared per token (log-probs, entropies), on 32 full gradient rows, and against fp64 on those rows.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAIVE_FP32_BUFFERS = 5
"""Peak number of fp32 [tokens x vocab] buffers of the naive variant (log-softmax, exp, product / grads)."""


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}; this benchmark needs Linux.")
    return int(found.group(1)) * 1024


def _mem_available_bytes() -> int:
    found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), flags=re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def _make_inputs(
    tokens: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ~ N(0, 2^2) built in row blocks (no full-size fp32 temporary), targets, loss weights."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.empty(tokens, vocab, dtype=dtype)
    for start in range(0, tokens, 256):
        stop = min(start + 256, tokens)
        logits[start:stop] = torch.randn(stop - start, vocab, generator=generator) * 2.0
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    weight_lp = torch.randn(tokens, generator=generator)
    weight_h = torch.randn(tokens, generator=generator)
    return logits.unsqueeze(0), target.unsqueeze(0), weight_lp.unsqueeze(0), weight_h.unsqueeze(0)


def child(variant: str, tokens: int, vocab: int, dtype_name: str, seed: int, out: Path) -> None:
    """Run one variant once and save its results and measurements to ``out``."""
    from megatron_dispo.models.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy

    def run(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if variant == "naive":
            return naive_logprobs_entropy(logits, target)
        logprobs, entropy = vocab_parallel_logprobs_entropy(logits, target, tp_group=None)
        assert entropy is not None
        return logprobs, entropy

    # Warm-up on 4 tokens: one-off lazy initialisation (kernels, thread pools) stays out of the measurement.
    warm_logits = torch.randn(1, 4, vocab, dtype=DTYPES[dtype_name], requires_grad=True)
    sum(run(warm_logits, torch.zeros(1, 4, dtype=torch.long))).sum().backward()
    del warm_logits
    logits, target, weight_lp, weight_h = _make_inputs(tokens, vocab, DTYPES[dtype_name], seed)
    logits.requires_grad_()
    rss_before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    logprobs, entropy = run(logits, target)
    (logprobs * weight_lp + entropy * weight_h).sum().backward()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - rss_before
    grad = logits.grad[0]
    rows = torch.linspace(0, tokens - 1, 32).long()
    # fp64 reference on the sampled rows: which variant is closer to the exact values.
    ref_lp, ref_h = naive_logprobs_entropy(logits.detach()[0, rows].double(), target[0, rows])
    torch.save(
        {
            "peak_bytes": peak,
            "seconds": seconds,
            "logprobs": logprobs.detach()[0],
            "entropy": entropy.detach()[0],
            "fp64_error": max(
                (logprobs.detach()[0, rows].double() - ref_lp).abs().max().item(),
                (entropy.detach()[0, rows].double() - ref_h).abs().max().item(),
            ),
            "grad_rows": grad[rows].float(),
        },
        out,
    )


def run_child(variant: str, tokens: int, vocab: int, dtype_name: str, seed: int, workdir: Path) -> dict:
    out = workdir / f"{variant}_{tokens}.pt"
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(vocab)]
    cmd += ["--dtype", dtype_name, "--seed", str(seed), "--out", str(out)]
    print(f"  running {variant:7s} at {tokens} tokens x {vocab} vocab ({dtype_name}) ...", flush=True)
    subprocess.run(cmd, check=True)
    result = torch.load(out)
    print(f"    peak increase {result['peak_bytes'] / 2**30:7.3f} GiB, fwd+bwd {result['seconds']:7.2f} s", flush=True)
    return result


def compare(naive: dict, chunked: dict) -> dict[str, float]:
    return {
        "logprobs": (naive["logprobs"] - chunked["logprobs"]).abs().max().item(),
        "entropy": (naive["entropy"] - chunked["entropy"]).abs().max().item(),
        "grad_rows": (naive["grad_rows"] - chunked["grad_rows"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-naive-gb", type=float, default=None, help="cap for the naive run (default: 70%% of MemAvailable)"
    )
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens, args.vocab, args.dtype, args.seed, args.out)
        return

    cap = (args.max_naive_gb * 2**30) if args.max_naive_gb else 0.7 * _mem_available_bytes()
    input_bytes = args.tokens * args.vocab * DTYPES[args.dtype].itemsize
    naive_tokens = args.tokens
    while (
        naive_tokens > 1
        and (2 * input_bytes * naive_tokens / args.tokens) + naive_tokens * args.vocab * 4 * (NAIVE_FP32_BUFFERS) > cap
    ):
        naive_tokens //= 2
    print(
        f"bench_logprobs: vocab {args.vocab}, logits {args.dtype}, target {args.tokens} tokens; naive cap "
        f"{cap / 2**30:.1f} GiB -> equal-size comparison at {naive_tokens} tokens",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        naive = run_child("naive", naive_tokens, args.vocab, args.dtype, args.seed, workdir)
        chunked = run_child("chunked", naive_tokens, args.vocab, args.dtype, args.seed, workdir)
        full = None
        if naive_tokens != args.tokens:
            full = run_child("chunked", args.tokens, args.vocab, args.dtype, args.seed, workdir)
    diffs = compare(naive, chunked)
    grad_bytes = naive_tokens * args.vocab * DTYPES[args.dtype].itemsize
    print(f"\nequal-size comparison at {naive_tokens} tokens x {args.vocab} (forward + backward):")
    print(f"  {'variant':8s} {'peak increase GiB':>18s} {'of which grad GiB':>18s} {'time s':>8s}")
    for label, result in (("naive", naive), ("chunked", chunked)):
        print(f"  {label:8s} {result['peak_bytes'] / 2**30:18.3f} {grad_bytes / 2**30:18.3f} {result['seconds']:8.2f}")
    print(
        f"  memory ratio chunked/naive: {chunked['peak_bytes'] / naive['peak_bytes']:.3f}x (target <= 0.25x); "
        f"time ratio: {chunked['seconds'] / naive['seconds']:.2f}x"
    )
    print(
        f"  extra memory beyond the logits gradient: naive {(naive['peak_bytes'] - grad_bytes) / 2**30:.3f} GiB, "
        f"chunked {(chunked['peak_bytes'] - grad_bytes) / 2**30:.3f} GiB"
    )
    print("  max abs differences naive vs chunked: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print(
        f"  max abs error vs fp64 on 32 rows (log-prob, entropy): naive {naive['fp64_error']:.2e}, "
        f"chunked {chunked['fp64_error']:.2e}"
    )
    if full is not None:
        full_grad = args.tokens * args.vocab * DTYPES[args.dtype].itemsize
        naive_estimate = naive["peak_bytes"] * args.tokens / naive_tokens
        print(
            f"\nchunked at {args.tokens} tokens: peak increase {full['peak_bytes'] / 2**30:.3f} GiB (grad "
            f"{full_grad / 2**30:.3f} GiB), {full['seconds']:.2f} s; naive at {args.tokens} tokens not run (needs "
            f"~{naive_estimate / 2**30:.1f} GiB by linear scaling of the measured peak) -> ratio vs that estimate "
            f"{full['peak_bytes'] / naive_estimate:.3f}x"
        )


if __name__ == "__main__":
    main()
