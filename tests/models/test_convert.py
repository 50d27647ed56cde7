"""HF checkpoint <-> sharded Megatron-Core model (megatron_dispo.models.convert), checked against HF transformers.

For tiny Qwen3 and Qwen3-MoE at TP=1, TP=2, EP=2 and TP=2 x EP=2 (expert TP 2 and 1), on gloo ranks:
  * every parameter is filled with NaN, then loaded from the HF safetensors by the sliced loader (so an unloaded
    parameter poisons the logits);
  * the gathered vocab-parallel logits equal ``AutoModelForCausalLM`` logits on the same checkpoint, and the chunked
    token log-probs equal HF's log-softmax (tolerance 1e-5 relative to the largest logit: the fp32 rounding floor
    between two implementations, measured ~1e-5 absolute at logits ~14);
  * the streaming export gives back every checkpoint tensor bit-exactly (HF -> Megatron -> HF), on every rank, and
    only on rank 0 with ``destination="rank0"``.
One launched world per world size keeps the cost at two process launches. The CLI test converts the MoE checkpoint
to a TP=2 x EP=2 Megatron checkpoint and back at TP=1, and loads the result in transformers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models.distributed import run_workers

NUM_GPUS = 0
pytestmark = pytest.mark.mcore

SEQ_LEN = 16
LOGIT_TOLERANCE = 1e-5
"""Relative to max |HF logit| (fp32)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny dense and MoE checkpoints, fixed input ids, and HF transformers' logits for them."""
    from transformers import AutoModelForCausalLM

    from megatron_dispo.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("hf")
    input_ids = torch.randint(0, 1000, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    out: dict[str, Any] = {"input_ids": input_ids, "paths": {}, "logits": {}}
    for kind, moe in (("dense", False), ("moe", True)):
        path = make_tiny_checkpoint(root / kind, moe=moe, seed=11)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        with torch.no_grad():
            out["logits"][kind] = model(input_ids).logits
        out["paths"][kind] = str(path)
    # Broken copies of the dense checkpoint: one tensor missing + one unknown; one tensor with a wrong shape.
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(str(Path(out["paths"]["dense"]) / "model.safetensors"))
    for name, edit in (("missing_unknown", "rename"), ("bad_shape", "reshape")):
        broken = root / name
        shutil.copytree(out["paths"]["dense"], broken)
        tensors = dict(state)
        if edit == "rename":
            tensors["model.layers.9.bogus.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
        else:
            tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 128)
        save_file(tensors, str(broken / "model.safetensors"))
        out["paths"][name] = str(broken)
    # The MoE checkpoint re-written by save_hf_checkpoint in ~0.5 MB shards (+ index): the sliced loader reads shards.
    from transformers import AutoConfig

    from megatron_dispo.models.convert import save_hf_checkpoint

    moe_dir = Path(out["paths"]["moe"])
    sharded = root / "moe_sharded"
    files = save_hf_checkpoint(
        load_file(str(moe_dir / "model.safetensors")).items(),
        sharded,
        AutoConfig.from_pretrained(str(moe_dir)),
        max_shard_bytes=512 * 1024,
        copy_files_from=moe_dir,
    )
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    out["paths"]["moe_sharded"] = str(sharded)
    out["logits"]["moe_sharded"] = out["logits"]["moe"]
    return out


def _load_all(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (one file or shards)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


def _run_case(
    label: str, kind: str, layout: dict[str, Any], destination: str, data: dict[str, Any]
) -> dict[str, float | bool | int]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.convert import export_hf_weights, load_hf_weights
    from megatron_dispo.models.logprobs import vocab_parallel_logprobs_entropy
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel = ParallelConfig(**layout)
    initialize_parallel(parallel)
    path = data["paths"][kind]
    hf_config = AutoConfig.from_pretrained(path)
    model = build_model(hf_config, parallel)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    load_hf_weights(model, path, hf_config)

    input_ids, hf_logits = data["input_ids"], data["logits"][kind]
    with torch.no_grad():
        local_logits = model_forward_logits(model, input_ids)
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local_logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local_logits.contiguous(), group=tp_group)
    logits = torch.cat(parts, dim=-1)
    targets = input_ids[:, 1:]
    logprobs, _ = vocab_parallel_logprobs_entropy(local_logits[:, :-1], targets, tp_group=tp_group, chunk_tokens=5)
    hf_logprobs = torch.log_softmax(hf_logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    reference = _load_all(path)
    exported: dict[str, torch.Tensor] = {}
    for name, tensor in export_hf_weights(model, hf_config, destination=destination):  # type: ignore[arg-type]
        assert name not in exported, f"{label}: {name} yielded twice"
        exported[name] = tensor.clone()
    receives = destination == "all" or dist.get_rank() == 0
    exact = set(exported) == set(reference) and all(torch.equal(exported[n], reference[n]) for n in reference)
    return {
        "logits": (logits - hf_logits).abs().max().item() / hf_logits.abs().max().item(),
        "logprobs": (logprobs - hf_logprobs).abs().max().item(),
        "export_exact": exact if receives else not exported,
        "exported": len(exported),
    }


def _layouts_worker(
    cases: list[tuple[str, str, dict[str, Any], str]], data: dict[str, Any], cli_argv: list[str] | None = None
) -> dict[str, Any]:
    """Run the cases one after another in this world (re-initialising the layout), then optionally a CLI command."""
    import time

    from megatron.core import parallel_state as ps

    from megatron_dispo.cli import main

    out: dict[str, Any] = {}
    for label, kind, layout, destination in cases:
        start = time.perf_counter()
        out[label] = _run_case(label, kind, layout, destination, data)
        out[label]["seconds"] = time.perf_counter() - start
    if cli_argv is None:
        out["errors"] = _load_errors(data)
    if cli_argv is not None:
        ps.destroy_model_parallel()
        if main(cli_argv) != 0:
            raise RuntimeError(f"CLI {cli_argv} failed")
    return out


def _load_errors(data: dict[str, Any]) -> dict[str, str]:
    """The loader's messages for the broken dense checkpoints, at TP=1."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_dispo.models.builder import build_model
    from megatron_dispo.models.convert import load_hf_weights
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel

    ps.destroy_model_parallel()
    initialize_parallel(ParallelConfig())
    messages: dict[str, str] = {}
    for name in ("missing_unknown", "bad_shape"):
        hf_config = AutoConfig.from_pretrained(data["paths"][name])
        model = build_model(hf_config, ParallelConfig())
        try:
            load_hf_weights(model, data["paths"][name], hf_config)
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _check(results: list[dict[str, Any]]) -> None:
    for rank, per_case in enumerate(results):
        per_case = {label: value for label, value in per_case.items() if label != "errors"}
        for label, value in per_case.items():
            assert value["logits"] <= LOGIT_TOLERANCE, f"rank {rank} {label}: logits rel diff {value['logits']}"
            assert value["logprobs"] <= LOGIT_TOLERANCE * 2, f"rank {rank} {label}: logprobs {value['logprobs']}"
            assert value["export_exact"], f"rank {rank} {label}: export differs from the checkpoint ({value})"


@pytest.mark.timeout(240)
def test_two_ranks_tp1_tp2_ep2_match_hf_and_round_trip(checkpoints: dict[str, Any]) -> None:
    cases = [
        ("dense_tp1", "dense", {}, "all"),
        ("dense_tp2", "dense", {"tensor_model_parallel_size": 2}, "all"),
        ("moe_tp1", "moe", {}, "all"),
        ("moe_tp2", "moe", {"tensor_model_parallel_size": 2, "sequence_parallel": True}, "all"),
        ("moe_ep2", "moe_sharded", {"expert_model_parallel_size": 2}, "rank0"),
    ]
    results = run_workers(_layouts_worker, 2, timeout_s=200, args=(cases, checkpoints))
    _check(results)
    assert results[1]["moe_ep2"]["exported"] == 0  # destination="rank0": other ranks receive nothing
    errors = results[0]["errors"]
    assert "model.layers.1.mlp.up_proj.weight" in errors["missing_unknown"]  # missing
    assert "model.layers.9.bogus.weight" in errors["missing_unknown"]  # unknown
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in errors["bad_shape"]
    assert "(32, 128)" in errors["bad_shape"] and "(64, 128)" in errors["bad_shape"]


@pytest.mark.timeout(400)
def test_four_ranks_tp2_x_ep2_and_cli_round_trip_loads_in_transformers(
    checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """TP2 x EP2 parity, then the CLI: hf-to-mcore at TP2 x EP2 inside the 4-rank world (the torchrun path),
    mcore-to-hf at TP2 in a subprocess that launches its own 2 ranks (resharding EP2 -> EP1) and writes shards,
    loaded by transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(checkpoints["paths"]["moe"])
    mcore, exported = tmp_path / "mcore", tmp_path / "hf"
    cases = [
        (
            "moe_tp2_ep2",
            "moe",
            {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "sequence_parallel": True},
            "all",
        ),
        (
            "moe_tp2_ep2_etp1",
            "moe",
            {
                "tensor_model_parallel_size": 2,
                "expert_model_parallel_size": 2,
                "expert_tensor_parallel_size": 1,
                "sequence_parallel": True,
            },
            "rank0",
        ),
    ]
    to_mcore = ["convert", "hf-to-mcore", "--hf", str(source), "--out", str(mcore), "--tp", "2", "--ep", "2"]
    results = run_workers(_layouts_worker, 4, timeout_s=300, args=(cases, checkpoints, to_mcore))
    _check(results)
    assert (mcore / "latest").is_file() and (mcore / "hf" / "tokenizer.json").is_file()

    cli = [sys.executable, "-m", "megatron_dispo.cli", "convert", "mcore-to-hf", "--ckpt", str(mcore)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # ~0.5 MB shards: transformers must load the sharded output through its index.
    subprocess.run(
        [*cli, "--out", str(exported), "--tp", "2", "--max-shard-gb", "0.0005"], check=True, timeout=300, env=env
    )
    assert (exported / "model.safetensors.index.json").is_file()
    original, result = load_file(str(source / "model.safetensors")), _load_all(exported)
    assert set(result) == set(original)
    for name, tensor in original.items():
        assert torch.equal(result[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    with torch.no_grad():
        logits = model(checkpoints["input_ids"]).logits
    assert torch.equal(logits, checkpoints["logits"]["moe"])
    text = "What is 2+2?"
    expected_ids = AutoTokenizer.from_pretrained(str(source))(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(exported))(text)["input_ids"] == expected_ids
