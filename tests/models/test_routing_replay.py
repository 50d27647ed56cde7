"""Trainer-side MoE routing replay (R3, arXiv:2510.11370) on the tiny Qwen3-MoE in Megatron-Core (gloo, CPU).

Forced expert choices must be the ones Megatron's routers output (observed with a forward hook on each
``TopKRouter``, independent of the replay code) for every token and layer, ``NO_ROUTE`` tokens must route exactly as
without replay, the router must still get gradients, and EP=2 / TP=2+SP must give the same routing and logits as one
process.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.models.routing_replay import (
    NO_ROUTE,
    RoutingReplayConfig,
    align_routed_experts,
    routing_agreement,
)
from tests.models.distributed import run_workers

pytestmark = pytest.mark.mcore
NUM_GPUS = 0
VOCAB = 256
BATCH, SEQ = 2, 12
NUM_EXPERTS, TOP_K, LAYERS = 4, 2, 2


def forced_experts(seed: int = 3) -> torch.Tensor:
    """Arbitrary distinct top-k experts per token and layer, [b, s, layers, k]; a few tokens left to the router."""
    generator = torch.Generator().manual_seed(seed)
    forced = torch.rand(BATCH, SEQ, LAYERS, NUM_EXPERTS, generator=generator).argsort(dim=-1)[..., :TOP_K]
    forced[0, -3:] = NO_ROUTE  # e.g. the last token / padding: routed by the trainer itself
    forced[1, 0, 1] = NO_ROUTE  # one layer of one token
    return forced


def _router_outputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Hook every TopKRouter: its output routing_map [tokens, E] per forward, in layer order."""
    from megatron_dispo.models.routing_replay import moe_routers

    maps: list[torch.Tensor] = []
    handles = [
        router.register_forward_hook(lambda _m, _i, out: maps.append(out[1].detach().clone()))
        for router in moe_routers(model)
    ]
    return maps, handles


def _as_sets(routing_map: torch.Tensor, batch: int) -> torch.Tensor:
    """[s_local * b, E] bool routing map -> [b, s_local, k] sorted expert ids."""
    ids = routing_map.nonzero()[:, 1].reshape(routing_map.shape[0], TOP_K)
    return ids.reshape(-1, batch, TOP_K).transpose(0, 1).sort(dim=-1).values


def run_layout(tp: int = 1, ep: int = 1, sp: bool = False) -> dict:
    """Forward with and without replay, plus one backward with replay; this rank's observations."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.routing_replay import moe_routers, replay_routing
    from megatron_dispo.models.tiny import tiny_qwen3_config
    from tests.models.distributed import gather_vocab_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=sp)
    initialize_parallel(parallel, seed=7)
    hf_config = tiny_qwen3_config(moe=True, vocab_size=VOCAB)
    model = build_model(hf_config, parallel, moe_aux_loss_coeff=0.0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    forced = forced_experts()

    def gather_tp_rows(sets: torch.Tensor) -> torch.Tensor:
        """SP-local [b, s/tp, k] -> [b, s, k]."""
        if not (sp and tp > 1):
            return sets
        shards = [torch.empty_like(sets) for _ in range(tp)]
        dist.all_gather(shards, sets.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(shards, dim=1)

    maps, handles = _router_outputs(model)
    with torch.no_grad():
        plain_logits = gather_vocab_parallel(model_forward_logits(model, tokens))
    plain = torch.stack([gather_tp_rows(_as_sets(m, BATCH)) for m in maps], dim=2)
    maps.clear()
    model.zero_grad(set_to_none=True)
    with replay_routing(model, forced):
        logits = model_forward_logits(model, tokens)
        logits.float().square().mean().backward()
    replayed = torch.stack([gather_tp_rows(_as_sets(m, BATCH)) for m in maps], dim=2)
    maps.clear()
    with torch.no_grad():  # the block restored normal routing
        after_logits = gather_vocab_parallel(model_forward_logits(model, tokens))
    for handle in handles:
        handle.remove()
    router_grads = [float(router.weight.grad.abs().sum()) for router in moe_routers(model)]
    return {
        "plain": plain,
        "replayed": replayed,
        "plain_logits": plain_logits,
        "replay_logits": gather_vocab_parallel(logits),
        "after_logits": after_logits,
        "router_grads": router_grads,
    }


def _layouts(layouts: list[dict]) -> list[dict]:
    return [run_layout(**layout) for layout in layouts]


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_workers(_layouts, 1, args=([{}],), timeout_s=240)[0][0]


def _expected(forced: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Forced sets where given, the router's own choice where NO_ROUTE."""
    keep = (forced >= 0).all(dim=-1, keepdim=True)
    return torch.where(keep, forced.sort(dim=-1).values, plain)


def test_replay_forces_the_given_experts_and_router_still_learns(reference: dict) -> None:
    forced = forced_experts()
    plain, replayed = reference["plain"], reference["replayed"]
    assert plain.shape == replayed.shape == (BATCH, SEQ, LAYERS, TOP_K)
    torch.testing.assert_close(replayed, _expected(forced, plain), rtol=0, atol=0)
    # the forced choice differs from the router's on many tokens, so this is not trivially satisfied
    changed = routing_agreement(forced.masked_fill(forced < 0, 0), plain, valid=(forced >= 0).all(-1).all(-1))
    assert changed.all_layers < 0.5
    assert (reference["replay_logits"] - reference["plain_logits"]).abs().max() > 1e-3
    torch.testing.assert_close(reference["after_logits"], reference["plain_logits"], rtol=0, atol=0)
    assert all(grad > 0 for grad in reference["router_grads"]), reference["router_grads"]


def test_replay_of_the_routers_own_choice_is_the_identity() -> None:
    """Replaying the trainer's own top-k changes nothing (gates are the same renormalised softmax)."""
    result = run_workers(_identity_worker, 1, timeout_s=240)[0]
    torch.testing.assert_close(result["replayed"], result["plain"], rtol=0, atol=1e-6)


def _identity_worker() -> dict:
    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.routing_replay import as_batch_layout, record_routing, replay_routing
    from megatron_dispo.models.tiny import tiny_qwen3_config

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=7)
    model = build_model(tiny_qwen3_config(moe=True, vocab_size=VOCAB), parallel, moe_aux_loss_coeff=0.0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with record_routing(model) as used:
            plain = model_forward_logits(model, tokens)
        own = torch.stack([as_batch_layout(layer[0], BATCH) for layer in used], dim=2)
        with replay_routing(model, own):
            replayed = model_forward_logits(model, tokens)
    return {"plain": plain, "replayed": replayed}


def test_replay_under_ep2_and_tp2_sp_matches_one_process(reference: dict) -> None:
    ranks = run_workers(_layouts, 2, args=([{"ep": 2}, {"tp": 2, "sp": True}],), timeout_s=300)
    for rank in ranks:
        for name, result in zip(("ep2", "tp2_sp"), rank, strict=True):
            torch.testing.assert_close(result["replayed"], reference["replayed"], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(result["plain"], reference["plain"], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(result["replay_logits"], reference["replay_logits"], rtol=1e-5, atol=1e-5)
            assert all(grad > 0 for grad in result["router_grads"]), (name, result["router_grads"])


def test_align_routed_experts_pads_with_no_route() -> None:
    first = torch.tensor([[[0, 1]], [[2, 3]]], dtype=torch.int16)  # 2 tokens, 1 layer, k=2
    out = align_routed_experts([first, None], 3, num_layers=1, top_k=2)
    assert out.dtype == torch.long and out.shape == (2, 3, 1, 2)
    assert out[0, :2].tolist() == [[[0, 1]], [[2, 3]]]
    assert (out[0, 2] == NO_ROUTE).all() and (out[1] == NO_ROUTE).all()
    with pytest.raises(ValueError, match="routed tokens do not fit"):
        align_routed_experts([first], 1, num_layers=1, top_k=2)


def test_routing_agreement_counts_sets_and_skips_unrecorded_tokens() -> None:
    engine = torch.tensor([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[NO_ROUTE, NO_ROUTE], [0, 1]]])  # 3 tokens, 2 layers
    trainer = torch.tensor([[[1, 0], [2, 3]], [[1, 2], [0, 2]], [[0, 1], [0, 1]]])
    result = routing_agreement(engine, trainer)
    assert result.num_tokens == 2  # token 2 has no engine record in layer 0
    assert result.all_layers == 0.5  # token 0 agrees (order ignored) in both layers; token 1 differs in layer 1
    assert result.per_layer == (1.0, 0.5)


def test_config_rejects_dense_models_and_unknown_modes() -> None:
    from megatron_dispo.models.tiny import tiny_qwen3_config

    RoutingReplayConfig("rollout").check_model(tiny_qwen3_config(moe=True, vocab_size=VOCAB))
    RoutingReplayConfig("none").check_model(tiny_qwen3_config(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="needs a MoE model"):
        RoutingReplayConfig("rollout").check_model(tiny_qwen3_config(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="must be 'none' or 'rollout'"):
        RoutingReplayConfig("always")  # type: ignore[arg-type]
