"""CPU tests for the self-check maths (megatron_dispo.refit.probe) and RefitConfig validation; values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.refit.config import RefitConfig
from megatron_dispo.refit.probe import (
    ProbeBatch,
    TensorChecksum,
    compare_logprobs,
    engine_param_name,
    localize_mismatch,
    probe_vector,
    tensor_checksum,
)
from megatron_dispo.refit.refit import RefitStats

NUM_GPUS = 0


def test_compare_logprobs_closed_form() -> None:
    engine = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    trainer = [torch.tensor([-1.0, -2.5]), torch.tensor([-0.25])]
    report = compare_logprobs(engine, trainer)
    # |delta| = [0, 0.5, 0.25]: max 0.5 at sequence 0, position 1; mean 0.75 / 3 = 0.25
    assert (report.max_abs, report.mean_abs, report.num_tokens) == (0.5, 0.25, 3)
    assert (report.worst_sequence, report.worst_position, report.worst_engine, report.worst_trainer) == (
        0,
        1,
        -2.0,
        -2.5,
    )
    with pytest.raises(ValueError, match="engine gave 2 log-probs, trainer 3"):
        compare_logprobs([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="scored 1 probe sequences but the trainer returned 2"):
        compare_logprobs([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])


def test_nan_in_engine_logprobs_is_infinitely_far() -> None:
    report = compare_logprobs([torch.tensor([0.0, float("nan")])], [torch.tensor([0.0, -1.0])])
    assert report.max_abs == math.inf and report.worst_position == 1


def test_engine_param_names_follow_vllm_fusing() -> None:
    table = {
        "model.layers.3.self_attn.k_proj.weight": "model.layers.3.self_attn.qkv_proj.weight",
        "model.layers.3.mlp.up_proj.weight": "model.layers.3.mlp.gate_up_proj.weight",
        "model.layers.3.mlp.experts.7.gate_proj.weight": "model.layers.3.mlp.experts.w13_weight",
        "model.layers.3.mlp.experts.7.down_proj.weight": "model.layers.3.mlp.experts.w2_weight",
        "model.layers.3.mlp.down_proj.weight": "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.mlp.gate.weight": "model.layers.3.mlp.gate.weight",
        "lm_head.weight": "lm_head.weight",
    }
    assert {name: engine_param_name(name) for name in table} == table


def test_fingerprints_add_up_over_a_fused_parameter() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, 16, generator=generator) for rows in (8, 4, 4))
    fused = torch.cat([q, k, v])  # what vLLM's qkv_proj holds
    parts = [
        tensor_checksum(f"model.layers.0.self_attn.{n}_proj.weight", t) for n, t in zip("qkv", (q, k, v), strict=True)
    ]
    total = parts[0] + parts[1] + parts[2]
    y = fused.double() @ probe_vector(16).double()  # independent: the fused layer's W @ x
    assert total.numel == 16
    assert math.isclose(total.total, float(y.sum()), rel_tol=1e-12)
    assert math.isclose(total.sum_sq, float((y * y).sum()), rel_tol=1e-12)
    # expert weights are summed raw (the engine stacks them into a 3-D parameter)
    expert = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert tensor_checksum("model.layers.0.mlp.experts.2.down_proj.weight", expert) == TensorChecksum(2.5, 14.25, 4)


def test_localisation_names_the_changed_parameter_and_missing_ones() -> None:
    sent = {
        "model.layers.0.self_attn.q_proj.weight": TensorChecksum(1.0, 4.0, 8),
        "model.layers.0.self_attn.k_proj.weight": TensorChecksum(2.0, 6.0, 4),
        "model.layers.0.self_attn.v_proj.weight": TensorChecksum(0.0, 2.0, 4),
        "model.norm.weight": TensorChecksum(16.0, 16.0, 16),
        "lm_head.weight": TensorChecksum(-1.0, 9.0, 10),
    }
    held = {
        "model.layers.0.self_attn.qkv_proj.weight": (3.0, 12.0, 16),  # = q + k + v: matches
        "model.norm.weight": (16.0, 17.0, 16),  # sum of squares off by 1/16
        # lm_head absent
    }
    mismatches = localize_mismatch(sent, lambda: held, rtol=1e-4)
    assert [m.engine_name for m in mismatches] == ["lm_head.weight", "model.norm.weight"]
    assert mismatches[0].relative_error == math.inf
    assert mismatches[1].relative_error == pytest.approx(1 / 16)
    assert (
        localize_mismatch(
            sent,
            lambda: held | {"model.norm.weight": (16.0, 16.0, 16)} | {"lm_head.weight": (-1.0, 9.0, 10)},
            rtol=1e-4,
        )
        == []
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bucket_size_mb", 0, "bucket_size_mb=0 must be positive"),
        ("bucket_size_mb", float("nan"), "must be a finite number"),
        ("transport", "rdma", "transport='rdma' is not one of"),
        ("check_every", -1, "check_every=-1 must be an integer >= 0"),
        ("probe_max_abs_threshold", 0.0, "probe_max_abs_threshold=0.0 must be None"),
        ("probe_mean_abs_threshold", -1.0, "probe_mean_abs_threshold=-1.0 must be None or a positive"),
        ("checksum_rtol", 1.0, "checksum_rtol=1.0 must be in"),
    ],
)
def test_refit_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RefitConfig(**{field: value})


def test_refit_config_bucket_bytes_and_probe_batch_validation() -> None:
    assert RefitConfig(bucket_size_mb=64).bucket_bytes == 64 * 1024 * 1024
    with pytest.raises(ValueError, match="needs >= 2 to be scored"):
        ProbeBatch(((1,),))
    with pytest.raises(ValueError, match=r"prompt_lens\[0\]=3 must be in \[1, 2\]"):
        ProbeBatch(((1, 2, 3),), prompt_lens=(3,))


def test_refit_stats_metrics() -> None:
    stats = RefitStats(
        refit_index=3,
        seconds=0.5,
        export_seconds=0.1,
        payload_bytes=2_000_000_000,
        num_buckets=8,
        num_tensors=100,
        transport="colocated",
        fp8=False,
    )
    assert stats.gb_per_s == 4.0
    assert stats.metrics()["refit/gb_per_s"] == 4.0 and "refit/probe/max_abs_delta_logprob" not in stats.metrics()
    assert "refit #3 [colocated]: 100 tensors, 2000.0 MB in 8 buckets" in stats.describe()
