"""Records every collective the project issues, and judges it as it would run with the model on CUDA.

Test code, independent of the product: it wraps ``torch.distributed``'s collectives and the bridge classes before
``megatron_dispo`` is imported (``python -m tests.trainer.traced_train ...`` instead of ``python -m megatron_dispo``)
and appends one JSON line per call to ``$COLLECTIVE_TRACE_DIR/trace-<pid>.jsonl``.

What it records, per call issued from the project's code (Megatron's and vLLM's own collectives are theirs):
- the channel kind: ``device`` for groups that are NCCL on a GPU job (the training ranks' default group and every
  group created without ``backend="gloo"``, a bridge declared ``device``), ``host`` for gloo groups (created with
  ``backend="gloo"``, the rollout ranks' world, a gloo bridge);
- the payload kind, from the code that issued it: ``weights`` (refit bucket buffers), ``model`` (tensors of the model
  layer, ``megatron_dispo/models/``), ``host`` (everything else: batches, metrics, objects, control);
- the tensors' devices, dtypes and bytes, and the issuing file:function.

The rule (:func:`violations`): model tensors and weights only on device channels; host data only on host channels
(NCCL has no CPU collectives; pickled objects on NCCL go through the GPU). Barriers carry nothing and are skipped.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

TENSOR_OPS = (
    "broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "gather", "scatter",
    "reduce", "send", "recv", "all_to_all_single", "all_to_all",
)  # fmt: skip
"""isend / irecv stay unwrapped: Megatron's P2POp checks their identity (the project never calls them)."""
OBJECT_OPS = (
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "send_object_list",
    "recv_object_list",
)  # fmt: skip
WEIGHT_FUNCTIONS = {
    ("refit/transports.py", "transfer"),
    ("refit/transports.py", "receive_broadcast_buckets"),
    ("trainer/async_loop.py", "_send_buckets"),
    ("trainer/async_loop.py", "_receive_tensors"),
}
"""(file, function) that move refit bucket buffers (the old code's bridge functions included)."""
PLUMBING = ("comm/", "trainer/bridge.py", "models/cpu_compat.py")
"""Project files that only carry a call on (channels, bridges, Megatron's CPU shims): the issuer is further up."""

_STATE = threading.local()
_KINDS: dict[int, str] = {}  # id(process group) -> "host" | "device"
_OUT: list[Any] = []


def install(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _OUT.append(open(Path(out_dir) / f"trace-{os.getpid()}.jsonl", "a", encoding="utf-8"))  # noqa: SIM115
    for module in (dist, c10d):
        for op in (*TENSOR_OPS, *OBJECT_OPS):
            if hasattr(module, op) and not getattr(getattr(module, op), "_traced", False):
                setattr(module, op, _traced(getattr(module, op), op, is_object=op in OBJECT_OPS))
        module.new_group = _tracking_new_group(module.new_group)
        module.init_process_group = _tracking_init(module.init_process_group)
    import importlib

    for module_name, name in (
        ("megatron_dispo.comm.channel", "StoreBridge"),
        ("megatron_dispo.trainer.bridge", "Bridge"),
    ):
        try:  # today's bridge, and the one at f861f95
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if cls is not None and not getattr(cls, "_traced", False):
            _trace_bridge(cls)


def _issuer() -> tuple[str, str] | None:
    """(path under megatron_dispo/, function) of the project code that issued the call; None if not the project's."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/torch/" in path or path.endswith("collective_trace.py"):
            frame = frame.f_back
            continue
        if "/megatron_dispo/" not in path:
            return None  # Megatron's, vLLM's, the test's own
        rel = path.rsplit("/megatron_dispo/", 1)[1]
        if rel.startswith(PLUMBING):
            frame = frame.f_back
            continue
        return rel, frame.f_code.co_name
    return None


def _payload(issuer: tuple[str, str], is_object: bool) -> str:
    if is_object:
        return "host"
    if issuer in WEIGHT_FUNCTIONS:
        return "weights"
    return "model" if issuer[0].startswith("models/") else "host"


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _record(op: str, channel: str, is_object: bool, args: tuple, kwargs: dict) -> None:
    if getattr(_STATE, "inside", False):
        return  # a collective inside a traced one (an object op's own tensor ops): the outer call is the record
    issuer = _issuer()
    if issuer is None:
        return
    tensors = _tensors(list(args) + list(kwargs.values())) if not is_object else []
    entry = {
        "op": op,
        "channel": channel,
        "payload": _payload(issuer, is_object),
        "issuer": f"{issuer[0]}:{issuer[1]}",
        "devices": sorted({str(t.device) for t in tensors}),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "rank": int(os.environ.get("RANK", "0")),
    }
    _OUT[0].write(json.dumps(entry) + "\n")
    _OUT[0].flush()


def _group_kind(group: Any) -> str:
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        return _KINDS.get(id(dist.group.WORLD), "device")
    return _KINDS.get(id(group), "unknown")


def _traced(fn: Any, op: str, *, is_object: bool) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        if group is None:  # positional group: broadcast(t, src, group), all_reduce(t, op, group), ...
            group = next((a for a in args[1:] if type(a).__name__ in ("ProcessGroup", "ProcessGroupGloo")), None)
        _record(op, _group_kind(group), is_object, args, kwargs)
        outer = getattr(_STATE, "inside", False)
        _STATE.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            _STATE.inside = outer

    wrapper._traced = True  # type: ignore[attr-defined]
    return wrapper


def _tracking_new_group(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        group = fn(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if group is not None:
            _KINDS[id(group)] = "host" if str(backend).lower() == "gloo" else "device"
        return group

    return wrapper


def _tracking_init(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        import torch.distributed as dist

        caller = sys._getframe(1).f_code.co_name
        # the training world's backend is NCCL on GPU; the rollout ranks' world is gloo everywhere
        _KINDS[id(dist.group.WORLD)] = "host" if caller == "init_rollout_world" else "device"
        return result

    return wrapper


def _trace_bridge(cls: Any) -> None:
    for op in ("broadcast", "send", "recv"):
        _wrap_bridge_op(cls, op, is_object=False)
    for op in ("broadcast_object", "send_object", "recv_object"):
        _wrap_bridge_op(cls, op, is_object=True)
    cls._traced = True


def _wrap_bridge_op(cls: Any, op: str, *, is_object: bool) -> None:
    fn = getattr(cls, op)

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _record(f"bridge.{op}", getattr(self, "purpose", "host"), is_object, args, kwargs)
        outer = getattr(_STATE, "inside", False)
        _STATE.inside = True
        try:
            return fn(self, *args, **kwargs)
        finally:
            _STATE.inside = outer

    setattr(cls, op, wrapper)


def read_traces(trace_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for path in sorted(trace_dir.glob("trace-*.jsonl")) for line in path.read_text().splitlines()
    ]


def violations(records: list[dict[str, Any]]) -> list[str]:
    """Each distinct (issuer, op, channel, payload) that breaks the rule, once."""
    bad = set()
    for r in records:
        wrong = (r["payload"] in ("weights", "model") and r["channel"] != "device") or (
            r["payload"] == "host" and r["channel"] != "host"
        )
        if wrong:
            bad.add(f"{r['issuer']} {r['op']}: {r['payload']} data on a {r['channel']} channel")
    return sorted(bad)
