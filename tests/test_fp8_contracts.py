"""The FP8 path on a GPU machine, checked on CPU (issue 24): the engine is built as an FP8 model, the plan counts its
memory that way, and micro-batches are padded as Transformer Engine's FP8 GEMMs require.

The engine test starts a real ``RolloutEngine`` on a tiny checkpoint with ``vllm.LLM`` replaced by a recorder, so
what vLLM would load (the model folder and its ``config.json``) is read back; no GPU runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_dispo.config import load_run_config
from megatron_dispo.plan import PlanError, make_plan

NUM_GPUS = 0
CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "configs"


class _RecordingLLM:
    """Stands where ``vllm.LLM`` is; ``external_launcher`` joins the ``env://`` world as vLLM would."""

    last: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        type(self).last = kwargs
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            dist.init_process_group("gloo", init_method="env://")


def test_gpu_contract_fp8_engine_is_built_from_an_fp8_block_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM builds block-FP8 linears only from a checkpoint whose config carries an FP8 quantization_config; the
    engine hands it such a copy: e4m3 projections with 128x128 scales, routers and lm_head left out."""
    import vllm

    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.rollout.config import RolloutConfig
    from megatron_dispo.rollout.engine import RolloutEngine

    checkpoint = make_tiny_checkpoint(tmp_path / "moe", moe=True, seed=0, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # a plain process (an earlier test may have left a launcher's)
    config = RolloutConfig(dtype="bfloat16", quantization="fp8", device="cuda", max_model_len=256, max_new_tokens=8)
    engine = RolloutEngine(checkpoint, config)
    try:
        kwargs = _RecordingLLM.last
        model_dir = Path(kwargs["model"])
        assert model_dir != checkpoint and kwargs["quantization"] == "fp8"
        quant = json.loads((model_dir / "config.json").read_text())["quantization_config"]
        assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [128, 128]
        assert quant["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        weights = {}
        for file in model_dir.glob("*.safetensors"):
            weights |= load_file(str(file))
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        assert weights[q_proj].dtype == torch.float8_e4m3fn and weights[q_proj + "_scale_inv"].shape == (1, 1)
        assert weights["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    finally:
        if engine._replica_world is not None:
            dist.destroy_process_group(engine._replica_world)
        if engine._scratch is not None:
            engine._scratch.cleanup()
    assert "RANK" not in os.environ


def test_gpu_contract_plan_engine_memory_follows_the_fp8_engine() -> None:
    """Qwen3-30B-A3B, FP8 engine at engine TP 2, by hand: linear weights 48 x (18,874,368 + 128 x 4,718,592) =
    29,896,998,912 at 1 byte, their scales 29,896,998,912 / 16384 x 4 = 7,299,072 bytes, the other 635,123,712
    parameters (embedding, output, norms, routers) at 2 bytes: 31,174,545,408 / 2 = 15,587,272,704 bytes per GPU."""
    recipe = CONFIG_DIR / "qwen3_30b_a3b_dispo.yaml"
    plan = make_plan(load_run_config(recipe), nodes=4, gpus_per_node=8)
    assert plan.memory.engine_weights == 15_587_272_704
    with pytest.raises(PlanError, match=r"refit\.fp8=True but rollout\.quantization='none'"):
        make_plan(load_run_config(recipe, ["rollout.quantization=none"]), nodes=4, gpus_per_node=8)


@pytest.mark.parametrize(
    ("tp", "sp", "recipe", "expected"),
    [(4, True, "delayed", 64), (4, True, "mxfp8", 128), (2, False, "delayed", 16), (8, True, None, 8)],
)
def test_gpu_contract_fp8_microbatch_width_meets_transformer_engine(
    tp: int, sp: bool, recipe: str | None, expected: int
) -> None:
    """TE's FP8 GEMMs: a rank's token count aligned to 16 (32 for MXFP8), per TP rank under sequence parallelism."""
    from megatron_dispo.models.microbatch import width_multiple

    fp8 = None if recipe is None else "hybrid"
    multiple = width_multiple(tp, sp, fp8, recipe or "delayed")
    assert multiple == expected
    for rows in (1, 3, 5):
        tokens_per_rank = rows * multiple // (tp if sp else 1)
        assert fp8 is None or tokens_per_rank % (32 if recipe == "mxfp8" else 16) == 0
