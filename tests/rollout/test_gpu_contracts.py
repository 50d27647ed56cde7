"""What the rollout engine asks of vLLM and CUDA on a GPU machine, checked on CPU by recording the calls.

No GPU has run this project yet (docs/gpu.md). Each test pins one audited GPU-path defect (issue 24) by what the code
hands vLLM or torch.cuda: the launcher world and device of a TP = 1 engine, the pinned model runner and its
processor, the wake order, the sleep level, the CUDA-graph default, the reload calls of one refit. The engine is built
without ``__init__`` (no checkpoint, no vLLM start) and given a recorder in place of ``vllm.LLM``: the recorder does
what vLLM does with the arguments that matter here (``external_launcher`` joins an ``env://`` world) and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.engine import RolloutEngine
from megatron_dispo.rollout.process_group import DefaultGroupGuard

NUM_GPUS = 0


class _RecordingLLM:
    """Stands where ``vllm.LLM`` is: records its arguments, the start-up environment and every later call."""

    instances: ClassVar[list[_RecordingLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.env = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        self.env["VLLM_USE_V2_MODEL_RUNNER"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
        self.calls: list[tuple[Any, ...]] = []
        if kwargs.get("distributed_executor_backend") == "external_launcher":  # vLLM: env:// from RANK, WORLD_SIZE
            dist.init_process_group("gloo", init_method="env://")
        _RecordingLLM.instances.append(self)

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags or ())))

    def collective_rpc(self, method: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list:
        self.calls.append(("rpc", getattr(method, "__name__", method), len(args[0]) if args else None))
        return [None]

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))


def _bare_engine(tmp_path: Path, config: RolloutConfig, *, device: str = "cuda", llm: Any = None) -> RolloutEngine:
    """A RolloutEngine with the state its start-up, memory and reload methods read, and no vLLM behind it."""
    engine = RolloutEngine.__new__(RolloutEngine)
    engine.model_path, engine.config, engine.replica, engine.device = tmp_path, config, None, device
    engine.is_moe, engine._hf_config = False, {"vocab_size": 100}
    engine._repetition_hits, engine._num_rebuilds, engine._call_index = {}, 0, 0
    engine._group_guard, engine._routing_capture, engine._replica_world = DefaultGroupGuard(), None, None
    engine._asleep, engine._weights_discarded = set(), False
    engine._llm = llm
    return engine


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """torch.cuda as a GPU machine's trainer rank sees it (current device 5); records set_device / empty_cache."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", None)))
    return calls


def _start_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: RolloutConfig) -> _RecordingLLM:
    import vllm

    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    _RecordingLLM.instances.clear()
    assert not dist.is_initialized()
    engine = _bare_engine(tmp_path, config)
    engine._start_llm(tmp_path)
    if engine._replica_world is not None:
        dist.destroy_process_group(engine._replica_world)
    return _RecordingLLM.instances[-1]


def test_gpu_contract_engine_device_comes_from_local_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cuda: list[tuple[str, Any]]
) -> None:
    """A TP = 1 engine on local rank 3 runs vLLM's external_launcher in a 1-rank world with LOCAL_RANK=3 (vLLM's
    device index), not the uniproc executor (always cuda:0); the trainer's current device (5) is put back after."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # a plain process (an earlier test may have left a launcher's)
    monkeypatch.setenv("LOCAL_RANK", "3")
    llm = _start_recorded(tmp_path, monkeypatch, RolloutConfig(dtype="bfloat16"))
    backend = llm.kwargs.get("distributed_executor_backend")
    assert backend == "external_launcher", f"distributed_executor_backend={backend!r}: the uniproc executor uses cuda:0"
    assert llm.env["LOCAL_RANK"] == "3" and llm.env["RANK"] == "0" and llm.env["WORLD_SIZE"] == "1"
    assert fake_cuda[-1] == ("set_device", 5)
    assert os.environ["LOCAL_RANK"] == "3" and "RANK" not in os.environ  # the launcher's variables are restored


def test_gpu_contract_gpu_engine_pins_runner_v2_with_its_processor_and_routed_experts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cuda: list[tuple[str, Any]]
) -> None:
    """vLLM's V2 runner (GPU default) loads only V2 processors and returns routed experts: the engine pins it and
    hands it the V2 repetition processor, with enable_return_routed_experts kept."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    config = RolloutConfig(dtype="bfloat16", capture_routed_experts=True)
    llm = _start_recorded(tmp_path, monkeypatch, config)
    (processor,) = llm.kwargs["logits_processors"]
    assert issubclass(processor, V2LogitsProcessor), processor.__mro__
    assert llm.env["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert llm.kwargs["enable_return_routed_experts"] is True
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_gpu_contract_cuda_graphs_on_gpu_unless_eager_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cuda: list[tuple[str, Any]]
) -> None:
    assert _start_recorded(tmp_path, monkeypatch, RolloutConfig(dtype="bfloat16")).kwargs["enforce_eager"] is False
    eager = RolloutConfig(dtype="bfloat16", enforce_eager=True)
    assert _start_recorded(tmp_path, monkeypatch, eager).kwargs["enforce_eager"] is True


def test_gpu_contract_wake_releases_torch_cache_before_vllm_maps_memory(
    tmp_path: Path, fake_cuda: list[tuple[str, Any]]
) -> None:
    """vLLM's sleep-mode allocator maps memory outside torch's cache: the cache is emptied before each wake."""
    llm = _RecordingLLM.__new__(_RecordingLLM)
    llm.calls = fake_cuda  # one timeline for torch.cuda and vLLM
    engine = _bare_engine(tmp_path, RolloutConfig(dtype="bfloat16"), llm=llm)
    engine._asleep = {"weights", "kv_cache"}
    engine.wake_up(("weights",))
    engine.wake_up()
    assert fake_cuda == [
        ("empty_cache", None),
        ("wake_up", ("weights",)),
        ("empty_cache", None),
        ("wake_up", ("kv_cache",)),
    ]


def test_gpu_contract_sleep_level_2_when_a_refit_follows(tmp_path: Path, fake_cuda: list[tuple[str, Any]]) -> None:
    """The refit overwrites the weights: sleep discards them (level 2) instead of a host round trip (level 1); until
    the refit the engine refuses to generate on them."""
    llm = _RecordingLLM.__new__(_RecordingLLM)
    llm.calls = []
    engine = _bare_engine(tmp_path, RolloutConfig(dtype="bfloat16"), llm=llm)
    engine.sleep()
    assert llm.calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="refit the engine first"):
        engine.generate([[1, 2]], n=1)
    engine.load_weight_buckets([[("model.norm.weight", torch.ones(4))]])
    assert not engine._weights_discarded
    engine.sleep(refit_follows=False)
    assert llm.calls[-1] == ("sleep", 1)


def test_gpu_contract_one_reload_session_per_refit(tmp_path: Path) -> None:
    """Three buckets reach vLLM as one reload session (vLLM's reload_weights re-processes the whole model per call)
    and one prefix-cache reset."""
    from megatron_dispo.refit.transports import ColocatedTransport

    llm = _RecordingLLM.__new__(_RecordingLLM)
    llm.calls = []
    engine = _bare_engine(tmp_path, RolloutConfig(dtype="bfloat16"), llm=llm)
    buckets = [[(f"model.layers.{i}.input_layernorm.weight", torch.ones(4))] for i in range(3)]
    counters = ColocatedTransport(engine, names_checked=True).transfer(iter(buckets))
    assert counters.num_buckets == 3 and counters.num_tensors == 3
    assert llm.calls == [
        ("rpc", "begin_reload", None),
        ("rpc", "load_tensors", 1),
        ("rpc", "load_tensors", 1),
        ("rpc", "load_tensors", 1),
        ("rpc", "finish_reload", None),
        ("reset_prefix_cache",),
    ]
