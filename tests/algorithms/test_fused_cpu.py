"""The one-pass CPU kernel of dispo / cispo (algorithms/fused_cpu.py) against the eager torch path: loss, gradient
and every telemetry value; its build cache; what happens without a compiler; and that bad inputs still get the eager
path's precise errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_dispo.algorithms import compute_policy_loss, fused_cpu, get_preset
from megatron_dispo.algorithms.loss_config import PolicyLossConfig


class CountingKernel:
    """Wraps the real kernel and counts calls, to prove a result came from the kernel."""

    def __init__(self, inner: fused_cpu.ClippedWeightKernel) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args: object) -> list[float]:
        self.calls += 1
        return self.inner(*args)  # type: ignore[arg-type]


@pytest.fixture
def counting_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingKernel]:
    real = fused_cpu.kernel()
    assert real is not None, "the fused CPU loss kernel did not build on this machine"
    spy = CountingKernel(real)
    monkeypatch.setattr(fused_cpu, "kernel", lambda: spy)
    yield spy


def make_batch(rows: int, seq: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Ratios spread over every regime and past every bound (|log r| up to ~6), ragged masks, some A == 0 rows."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, seq, generator=generator, dtype=dtype) * 4
    old = logprobs + 2.0 * torch.randn(rows, seq, generator=generator, dtype=dtype)
    lengths = torch.randint(0, seq + 1, (rows,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    advantages = torch.randn(rows, generator=generator, dtype=dtype)
    advantages[::5] = 0.0
    correct = torch.rand(rows, generator=generator) < 0.5
    return {"logprobs": logprobs, "old": old, "mask": mask, "advantages": advantages, "correct": correct}


def run(
    data: dict[str, torch.Tensor], config: PolicyLossConfig, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    logprobs = data["logprobs"].clone().requires_grad_()
    loss, metrics = compute_policy_loss(logprobs, data["old"], data["advantages"], data["mask"], config, **kwargs)
    loss.backward()
    return loss.detach(), logprobs.grad, metrics


def assert_same(fused: tuple, eager: tuple, dtype: torch.dtype) -> None:
    rtol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused[0], eager[0], rtol=rtol, atol=1e-30)
    torch.testing.assert_close(fused[1], eager[1], rtol=rtol, atol=1e-30)
    assert fused[2].keys() == eager[2].keys()
    for key, value in eager[2].items():
        assert fused[2][key] == pytest.approx(value, rel=rtol, abs=1e-12), key


CASES = [
    pytest.param("dispo", {}, id="dispo"),
    pytest.param("cispo", {}, id="cispo"),
    pytest.param("dispo", {"correct": True}, id="dispo-disagreement"),
    pytest.param("dispo", {"correct": True, "condition_on": "correctness"}, id="dispo-by-correctness"),
    pytest.param("dispo", {"num_global_tokens": True}, id="dispo-global-count"),
    pytest.param("dispo", {"bool_mask": True}, id="dispo-bool-mask"),
    pytest.param("dispo_no_regime4", {}, id="eps-low-neg-0"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq", [1, 15, 16, 33, 300])
@pytest.mark.parametrize(("preset", "options"), CASES)
def test_kernel_matches_eager(
    preset: str,
    options: dict,
    seq: int,
    dtype: torch.dtype,
    counting_kernel: CountingKernel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_batch(12, seq, seed=seq, dtype=dtype)
    if data["mask"].sum() == 0:
        data["mask"][0, 0] = 1.0
    config = get_preset(preset, condition_on=options.get("condition_on", "advantage_sign"))
    kwargs: dict[str, object] = {}
    if options.get("correct"):
        kwargs["correct"] = data["correct"]
    if options.get("num_global_tokens"):
        kwargs["num_global_tokens"] = float(data["mask"].sum()) + 7  # other micro-batches hold 7 more tokens
    if options.get("bool_mask"):
        data["mask"] = data["mask"].bool()
    fused = run(data, config, **kwargs)
    assert counting_kernel.calls == 1
    monkeypatch.setattr(fused_cpu, "ENABLED", False)
    eager = run(data, config, **kwargs)
    assert_same(fused, eager, dtype)


def test_non_contiguous_inputs_match_eager(counting_kernel: CountingKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_batch(40, 24, seed=1, dtype=torch.float32)
    transposed = {key: value.T.contiguous().T if value.dim() == 2 else value for key, value in data.items()}
    assert not transposed["logprobs"].is_contiguous()
    fused = run(transposed, get_preset("dispo"))
    assert counting_kernel.calls == 1
    monkeypatch.setattr(fused_cpu, "ENABLED", False)
    assert_same(fused, run(data, get_preset("dispo")), torch.float32)


@pytest.mark.parametrize("isa", sorted(fused_cpu.ISA_FLAGS))
def test_every_instruction_set_variant_matches_eager(isa: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX-512, AVX2 and portable builds; a variant needs a CPU that has its instructions (this CI machine has
    AVX-512, so all three run here)."""
    order = ["generic", "avx2", "avx512"]
    if order.index(isa) > order.index(fused_cpu.native_isa()):
        pytest.skip(f"this CPU cannot run {isa} code")
    variant = fused_cpu.ClippedWeightKernel(fused_cpu.build(tmp_path, isa=isa))
    spy = CountingKernel(variant)
    for dtype in (torch.float32, torch.float64):
        data = make_batch(9, 77, seed=5, dtype=dtype)
        data["old"][0, :10] = data["logprobs"][0, :10] + 200.0  # r = e^-200: underflows (eps_low_neg = 1: no bound)
        monkeypatch.setattr(fused_cpu, "kernel", lambda spy=spy: spy)
        fused = run(data, get_preset("cispo"), correct=data["correct"])
        monkeypatch.setattr(fused_cpu, "kernel", lambda: None)
        eager = run(data, get_preset("cispo"), correct=data["correct"])
        assert_same(fused, eager, dtype)
    assert spy.calls == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan_logprob", r"logprobs has 1 non-finite value"),
        ("inf_old_in_padding", r"old_logprobs has 1 non-finite value"),
        ("nan_advantage", r"advantages has 1 non-finite value"),
        ("half_mask", r"response_mask must hold only 0 and 1"),
        ("empty_mask", r"response_mask is all zero"),
        ("small_global_count", r"num_global_tokens=3 is smaller than this micro-batch's own"),
    ],
)
def test_inputs_the_kernel_rejects_get_the_eager_error(
    change: str, message: str, counting_kernel: CountingKernel
) -> None:
    data = make_batch(4, 20, seed=2, dtype=torch.float32)
    data["mask"][:, :5] = 1.0
    data["mask"][:, -2:] = 0.0
    kwargs: dict[str, object] = {}
    if change == "nan_logprob":
        data["logprobs"][1, 3] = float("nan")
    elif change == "inf_old_in_padding":
        data["old"][2, -1] = float("inf")
    elif change == "nan_advantage":
        data["advantages"][3] = float("nan")
    elif change == "half_mask":
        data["mask"][0, 1] = 0.5
    elif change == "empty_mask":
        data["mask"].zero_()
    else:
        kwargs["num_global_tokens"] = 3
    with pytest.raises(ValueError, match=message):
        run(data, get_preset("dispo"), **kwargs)
    assert counting_kernel.calls == 1  # the kernel saw the batch, its probes sent it to the eager checks


def test_build_is_cached_by_source_and_instruction_set(tmp_path: Path) -> None:
    first = fused_cpu.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    second = fused_cpu.build(tmp_path)
    assert second == first and second.stat().st_mtime_ns == stamp  # not rebuilt
    assert fused_cpu.native_isa() in first.name
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    with pytest.raises(ValueError, match="isa='sse9' is unknown"):
        fused_cpu.build(tmp_path, isa="sse9")


def test_without_a_compiler_the_eager_path_runs_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MEGATRON_DISPO_KERNEL_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fused_cpu, "_kernel", None)
    monkeypatch.setattr(fused_cpu, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="megatron_dispo.algorithms.fused_cpu"):
        assert fused_cpu.kernel() is None
        assert fused_cpu.kernel() is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "eager path" in warnings[0]
    data = make_batch(6, 10, seed=3, dtype=torch.float64)
    data["mask"][:, 0] = 1.0
    _, grad, _ = run(data, get_preset("dispo"))
    ratio = torch.exp(data["logprobs"] - data["old"])
    positive = (data["advantages"] > 0).unsqueeze(1)
    weight = torch.where(positive, ratio.clamp(0.8, 11.0), ratio.clamp(0.0, 101.0))
    expected = -weight * data["advantages"].unsqueeze(1) * data["mask"] / data["mask"].sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_environment_switch_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fused_cpu.kernel() is not None
    monkeypatch.setenv("MEGATRON_DISPO_FUSED_LOSS", "0")
    assert fused_cpu.kernel() is None
