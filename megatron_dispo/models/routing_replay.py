"""MoE rollout routing replay (R3, arXiv:2510.11370): train with the experts the rollout engine routed each token to.

The engine's router and the trainer's router see slightly different hidden states (bf16 vs fp32, other kernels), so
for some tokens they pick different top-k experts and the trainer's log-prob of a sampled token is then that of a
different network. R3 records the engine's top-k per token and layer during rollout
(``rollout/routing_capture.py``) and makes the trainer's forward use exactly those experts; the gate weights are
still the trainer's softmax over the replayed experts' logits, so the router keeps receiving gradients.

Megatron-Core 0.16.1 ships the hook this needs: ``TopKRouter.router_replay`` (``moe/router_replay.py``), consulted by
``topk_routing_with_score_function`` for the top-k indices. Its ``RouterReplay`` replays whole layers only and lives in
a process-global list; here each router gets a private replay object for the duration of a ``with`` block, which
routes tokens without a record (sentinel ``NO_ROUTE``) normally, so prompts served from the engine's prefix cache or
padding need no special case.

Tensor layout: ``routed_experts`` is ``[b, s, num_moe_layers, top_k]`` integer expert ids aligned to the micro-batch's
``input_ids`` ``[b, s]``: entry ``[i, j]`` holds the experts input token ``j`` is routed to, i.e. the routing of the
forward position whose logits score target token ``j + 1`` (the same column as the trainer's target-aligned
``[b, s - 1]`` tensors). MoE layers are counted in model order on this pipeline stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_dispo.models.config import MoeRoutingReplay, RoutingReplayConfig

NO_ROUTE = -1
"""Expert id marking a token/layer without a recorded choice: that token is routed by the trainer's own router."""

__all__ = [
    "NO_ROUTE",
    "MoeRoutingReplay",
    "RoutingAgreement",
    "RoutingCounts",
    "RoutingObservation",
    "RoutingReplayConfig",
    "align_routed_experts",
    "moe_routers",
    "observe_routing",
    "record_routing",
    "replay_routing",
    "routing_agreement",
]


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """This rank's Megatron ``TopKRouter`` modules in layer order (one per MoE layer on this pipeline stage)."""
    from megatron.core.transformer.moe.router import TopKRouter

    inner = model
    while hasattr(inner, "module"):  # DDP / Float16Module wrappers
        inner = inner.module
    return [module for module in inner.modules() if isinstance(module, TopKRouter)]


class _TokenReplay:
    """Duck-typed stand-in for Megatron's ``RouterReplay`` on one router: with ``force``, rows of ``target`` use the
    target experts and rows marked ``NO_ROUTE`` (all k entries) keep the default top-k. It records the router's own
    top-k (``own``) and the indices actually used (``used``) of every forward."""

    def __init__(self, target: torch.Tensor | None, force: bool = True) -> None:
        self.target = target
        self.force = force
        self.own: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if default_compute_topk is None:
            raise ValueError("Megatron's router did not pass its default top-k function; unsupported version.")
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.own.append(indices.detach())
        if self.target is not None:
            if self.target.shape != indices.shape:
                raise ValueError(
                    f"replayed experts have shape {tuple(self.target.shape)} but the router routes "
                    f"{tuple(indices.shape)} (tokens x top_k) here; check the micro-batch alignment and SP slicing."
                )
            if self.force:
                target = self.target.to(device=indices.device, dtype=indices.dtype)
                forced = (target >= 0).all(dim=-1, keepdim=True)
                indices = torch.where(forced, target, indices)
                probs = scores.gather(1, indices)  # gradient flows into the router logits of the replayed experts
        self.used.append(indices.detach())
        return probs, indices


def _router_rows(routed: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[b, s, k] per-layer ids -> the router's token order: [s, b] flattened (s-major), SP-sharded over TP."""
    rows = routed.transpose(0, 1)  # [s, b, k]
    if sequence_parallel:
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            if rows.shape[0] % tp:
                raise ValueError(f"sequence length {rows.shape[0]} is not a multiple of TP size {tp} under SP.")
            rows = rows.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]
    return rows.reshape(-1, rows.shape[-1])


@contextmanager
def _installed(
    model: torch.nn.Module, targets: Sequence[torch.Tensor | None], force: bool = True
) -> Iterator[list[_TokenReplay]]:
    routers = moe_routers(model)
    if len(targets) != len(routers):
        raise ValueError(f"got routing for {len(targets)} MoE layers but the model has {len(routers)} routers here.")
    for router in routers:
        if getattr(router.config, "moe_router_fusion", False):
            raise ValueError("routing replay needs moe_router_fusion=False (the fused TE top-k bypasses the replay).")
        if getattr(router, "routing_type", "") == "sinkhorn":
            raise ValueError("routing replay supports top-k routers only, not sinkhorn load balancing.")
    replays = [_TokenReplay(target, force) for target in targets]
    saved = [router.router_replay for router in routers]
    try:
        for router, replay in zip(routers, replays, strict=True):
            router.router_replay = replay
        yield replays
    finally:
        for router, previous in zip(routers, saved, strict=True):
            router.router_replay = previous


def _stage_layers(routers: Sequence[torch.nn.Module], num_layers: int) -> list[int]:
    """Which entries of the engine's layer axis this pipeline stage's routers are: all of them when the stage holds
    every MoE layer, else each router's global layer number (every decoder layer of Qwen3-MoE is a MoE layer)."""
    if len(routers) == num_layers:
        return list(range(num_layers))
    layers = [int(router.layer_number) - 1 for router in routers]
    if any(layer < 0 or layer >= num_layers for layer in layers):
        raise ValueError(f"routing of {num_layers} MoE layers does not cover this stage's layers {layers}.")
    return layers


@contextmanager
def replay_routing(model: torch.nn.Module, routed_experts: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, every Megatron forward of ``model`` routes token ``[i, j]`` of layer ``l`` to
    ``routed_experts[i, j, l]`` (``[b, s, layers, k]``, aligned to the ``input_ids`` passed to the forward);
    ``NO_ROUTE`` rows route normally. ``None`` replays nothing (a no-op, so callers need no branch).

    Keep the backward inside the block when activation recompute is on (the recomputed forward must replay too).
    Context parallelism is not supported (the router would see a zig-zag shard of the sequence).
    """
    with observe_routing(model, routed_experts, replay=True):
        yield


class RoutingObservation:
    """What the routers of one forward did against the engine's routing (see :func:`observe_routing`)."""

    def __init__(self, replays: Sequence[_TokenReplay], batch: int) -> None:
        self._replays = replays
        self._batch = batch

    def token_flags(self) -> torch.Tensor:
        """int64 ``[3, b, s_local]`` per token of the last forward, in batch layout (``s_local``: this rank's sequence
        shard under SP): recorded (the engine reported every layer), agree (the router's own top-k set equals the
        engine's in every layer of this stage), exact (the experts used equal the engine's in every layer)."""
        if not self._replays or not self._replays[0].own:
            raise ValueError("no forward ran inside observe_routing.")
        recorded = agree = exact = None
        for replay in self._replays:
            assert replay.target is not None
            target = replay.target.to(replay.own[-1].device).sort(dim=-1).values
            layer_recorded = (target >= 0).all(dim=-1)
            layer_agree = (replay.own[-1].sort(dim=-1).values == target).all(dim=-1)
            layer_exact = (replay.used[-1].sort(dim=-1).values == target).all(dim=-1)
            recorded = layer_recorded if recorded is None else recorded & layer_recorded
            agree = layer_agree if agree is None else agree & layer_agree
            exact = layer_exact if exact is None else exact & layer_exact
        assert recorded is not None and agree is not None and exact is not None
        flags = torch.stack([recorded, agree, exact]).long()  # [3, s_local * b], router order (s-major)
        return flags.reshape(3, -1, self._batch).transpose(1, 2)


@contextmanager
def observe_routing(
    model: torch.nn.Module, routed_experts: torch.Tensor | None, *, replay: bool
) -> Iterator[RoutingObservation | None]:
    """Like :func:`replay_routing` with ``replay=True``; with ``replay=False`` the routers route by themselves and
    the engine's routing is only compared with theirs (the router-agreement metric). Yields None for ``None``."""
    if routed_experts is None:
        yield None
        return
    from megatron.core import parallel_state

    if routed_experts.dim() != 4:
        raise ValueError(f"routed_experts must be [batch, seq, moe_layers, top_k], got {tuple(routed_experts.shape)}.")
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("routing replay does not support context parallelism; set context_parallel_size=1.")
    routers = moe_routers(model)
    sequence_parallel = bool(routers and routers[0].config.sequence_parallel)
    if routers and routed_experts.shape[-1] != routers[0].topk:
        raise ValueError(f"routed_experts has top_k={routed_experts.shape[-1]} but the router's is {routers[0].topk}.")
    layers = _stage_layers(routers, routed_experts.shape[2])
    targets = [_router_rows(routed_experts[:, :, layer], sequence_parallel) for layer in layers]
    with _installed(model, targets, force=replay) as replays:
        yield RoutingObservation(replays, routed_experts.shape[0])


@contextmanager
def record_routing(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Record the top-k indices each router uses in the block: ``out[layer]`` lists one ``[tokens, k]`` tensor per
    forward, in the router's token order (s-major, SP-local). For the agreement metric and for checks."""
    routers = moe_routers(model)
    out: list[list[torch.Tensor]] = [[] for _ in routers]
    with _installed(model, [None] * len(routers)) as replays:
        yield out
        for layer, replay in enumerate(replays):
            out[layer].extend(replay.used)


def as_batch_layout(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Router-order rows ``[s * b, k]`` of one layer -> ``[b, s, k]`` (inverse of the router's flattening)."""
    return rows.reshape(-1, batch, rows.shape[-1]).transpose(0, 1)


def align_routed_experts(
    per_sequence: Sequence[torch.Tensor | None], seq_len: int, *, num_layers: int, top_k: int
) -> torch.Tensor:
    """Stack per-sequence engine routing (``[n_i, layers, k]``, row ``j`` = input token ``j``; e.g.
    ``RolloutBatch.routed_experts``) into a right-padded ``[b, seq_len, layers, k]`` int64 tensor, ``NO_ROUTE``
    elsewhere. Sequences must start at column 0 of the micro-batch (right padding, as ``trainer.batching`` packs)."""
    out = torch.full((len(per_sequence), seq_len, num_layers, top_k), NO_ROUTE, dtype=torch.long)
    for row, routed in enumerate(per_sequence):
        if routed is None:
            continue
        if routed.dim() != 3 or routed.shape[1:] != (num_layers, top_k):
            raise ValueError(
                f"sequence {row}: routed experts of shape {tuple(routed.shape)}, expected [tokens, {num_layers}, "
                f"{top_k}]."
            )
        if routed.shape[0] > seq_len:
            raise ValueError(f"sequence {row}: {routed.shape[0]} routed tokens do not fit seq_len={seq_len}.")
        out[row, : routed.shape[0]] = routed.long()
    return out


@dataclass(frozen=True)
class RoutingAgreement:
    """How often two routers chose the same top-k set (order ignored)."""

    all_layers: float
    """Share of tokens whose top-k set is equal in every MoE layer."""
    per_layer: tuple[float, ...]
    """Share of tokens with equal top-k sets, per MoE layer."""
    num_tokens: int


def routing_agreement(
    engine: torch.Tensor, trainer: torch.Tensor, valid: torch.Tensor | None = None
) -> RoutingAgreement:
    """Agreement of ``[..., layers, k]`` expert ids; tokens where either side has ``NO_ROUTE`` or ``valid`` is
    False are left out."""
    if engine.shape != trainer.shape or engine.dim() < 2:
        raise ValueError(f"engine {tuple(engine.shape)} and trainer {tuple(trainer.shape)} routing differ in shape.")
    layers, k = engine.shape[-2:]
    engine, trainer = engine.reshape(-1, layers, k), trainer.reshape(-1, layers, k)
    keep = (engine >= 0).all(dim=(1, 2)) & (trainer >= 0).all(dim=(1, 2))
    if valid is not None:
        keep &= valid.reshape(-1).bool()
    same = (engine[keep].sort(dim=-1).values == trainer[keep].sort(dim=-1).values).all(dim=-1)  # [tokens, layers]
    count = int(keep.sum())
    if count == 0:
        return RoutingAgreement(float("nan"), tuple(float("nan") for _ in range(layers)), 0)
    per_layer = tuple(float(value) for value in same.float().mean(dim=0))
    return RoutingAgreement(float(same.all(dim=1).float().mean()), per_layer, count)


@dataclass
class RoutingCounts:
    """Response tokens of a pass with engine routing, and how many of them the trainer's routers matched."""

    tokens: float = 0.0
    """Response tokens whose routing the engine reported for every layer."""
    agree: float = 0.0
    """Of those, tokens whose router's own top-k set equals the engine's in every layer."""
    replayed_exact: float = 0.0
    """Of those, tokens whose experts used in the forward equal the engine's in every layer (all of them under R3)."""

    def add(self, tokens: float, agree: float, replayed_exact: float) -> None:
        self.tokens += tokens
        self.agree += agree
        self.replayed_exact += replayed_exact

    def metrics(self) -> dict[str, float]:
        """``routing/agreement`` and ``routing/replayed_exact`` (shares of ``routing/tokens``); empty without tokens."""
        if self.tokens <= 0:
            return {}
        return {
            "routing/tokens": self.tokens,
            "routing/agreement": self.agree / self.tokens,
            "routing/replayed_exact": self.replayed_exact / self.tokens,
        }
