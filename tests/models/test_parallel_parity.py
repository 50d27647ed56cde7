"""TP / EP / TP x EP / SP / distributed-optimizer parity of the Megatron-Core policy against one process (gloo, CPU).

Reference: the same tiny Qwen3 (dense) and Qwen3-MoE model at TP=1, EP=1 in a world of one. Every layout must give
the same logits (<= 1e-5), the same full gradients (relative <= 1e-5, gathered over TP and numbered globally over EP),
the same grad norm and the same full weights after one AdamW step (within 1% of the step size lr). The MoE aux loss
is off here: it is computed per DP rank's micro-batch, so it legitimately differs between a DP=2 layout and one
process.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.distributed import free_port, run_workers

pytestmark = pytest.mark.mcore

VOCAB = 256
BATCH, SEQ = 4, 16
LR = 1e-3


def run_layout(
    moe: bool,
    tp: int = 1,
    ep: int = 1,
    sp: bool = False,
    dist_opt: bool = False,
    dispatcher: str = "alltoall",
) -> dict:
    """One forward/backward/AdamW step of the tiny model at this layout; this rank's view of the results."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_dispo.models.builder import build_model, model_forward_logits
    from megatron_dispo.models.optimizer import (
        OptimizerSettings,
        build_optimizer,
        finalize_and_step,
        wrap_ddp,
        zero_grads,
    )
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.tiny import tiny_qwen3_config
    from tests.models.distributed import full_named_tensors, gather_vocab_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # keep the process group, re-split it for the next layout
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        use_distributed_optimizer=dist_opt,
    )
    initialize_parallel(parallel, seed=7)
    overrides = {"moe_aux_loss_coeff": 0.0, "moe_token_dispatcher_type": dispatcher} if moe else {}
    model = build_model(tiny_qwen3_config(moe=moe, vocab_size=VOCAB), parallel, **overrides)
    initial = full_named_tensors(model)
    # eps 1e-6, not the paper's 1e-15: Adam's first step is lr * g / (|g| + eps), which for eps -> 0 turns float
    # reduction-order noise in near-zero gradient coordinates into full +-lr differences between layouts.
    settings = OptimizerSettings(lr=LR, adam_eps=1e-6)
    ddp = wrap_ddp(model, parallel, settings)
    optimizer = build_optimizer([ddp], parallel, settings)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    local = tokens.chunk(dp_size, dim=0)[dp_rank]
    inputs, targets = local[:, :-1], local[:, 1:]

    zero_grads([ddp], optimizer)
    logits = model_forward_logits(ddp, inputs)
    token_losses = vocab_parallel_cross_entropy(logits.clone(), targets)  # it overwrites its input in place
    # DDP averages over DP; scale so the reduced gradient is that of the mean over all BATCH * SEQ tokens.
    loss = token_losses.sum() / (BATCH * SEQ) * dp_size
    loss.backward()
    grads: dict = {}
    if dist_opt:  # reduce-scattered grads live in shards: check the step through the public helper instead
        grad_norm = finalize_and_step([ddp], optimizer).grad_norm
    else:
        finalize_model_grads([ddp])
        grads = full_named_tensors(ddp, grads=True)
        _, grad_norm, _ = optimizer.step()
    return {
        "dp_rank": dp_rank,
        "logits": gather_vocab_parallel(logits),
        "grads": grads,
        "grad_norm": float(grad_norm),
        "weights": full_named_tensors(model),
        "initial": initial,
    }


def pipeline_weights(pp: int) -> dict[str, dict]:
    """Full weights of 4-layer dense and MoE models built at PP=pp (this rank's stage, global layer names)."""
    from megatron.core import parallel_state

    from megatron_dispo.models.builder import build_model
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.tiny import tiny_qwen3_config
    from tests.models.distributed import full_named_tensors

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel = ParallelConfig(pipeline_model_parallel_size=pp)
    initialize_parallel(parallel, seed=7)
    return {
        kind: full_named_tensors(
            build_model(tiny_qwen3_config(moe=moe, vocab_size=VOCAB, num_hidden_layers=4), parallel)
        )
        for kind, moe in (("dense", False), ("moe", True))
    }


def _layouts_worker(layouts: list[dict], reference_port: int | None = None, pipeline: bool = False) -> dict:
    """Run each layout in turn in this (already launched) world; return per-layout results of this rank.

    With ``reference_port``, rank 0 first computes the one-process references (dense and MoE at TP=1) in a private
    world of one on that port, before joining the launched world: this saves starting a separate world for them.
    """
    out: dict = {"reference": None}
    if reference_port is not None and os.environ["RANK"] == "0":
        from megatron_dispo.models.parallel import destroy_parallel

        launched = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        os.environ |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(reference_port)}
        try:
            out["reference"] = [run_layout(moe=False), run_layout(moe=True)]
            out["reference_pipeline"] = pipeline_weights(1) if pipeline else None
        finally:
            destroy_parallel()
            os.environ |= launched
    out["layouts"] = [run_layout(**layout) for layout in layouts]
    out["pipeline"] = pipeline_weights(int(os.environ["WORLD_SIZE"])) if pipeline else None
    return out


def _assemble(per_rank: list[list[dict]], index: int) -> dict:
    """Merge one layout's per-rank results into full logits (batch order), full grads and full weights."""
    results = [rank_results[index] for rank_results in per_rank]
    chunks = {r["dp_rank"]: r["logits"] for r in results if r["logits"] is not None}
    logits = torch.cat([chunks[k] for k in sorted(chunks)], dim=0)
    merged: dict = {"logits": logits, "grad_norm": results[0]["grad_norm"], "grads": {}, "weights": {}}
    for key in ("grads", "weights"):
        for r in results:
            for name, tensor in r[key].items():
                if name in merged[key]:
                    same = torch.equal(tensor, merged[key][name])
                    assert same, f"ranks disagree on {name}"
                merged[key][name] = tensor
    return merged


def _assert_matches(result: dict, reference: dict, label: str) -> None:
    diff = (result["logits"] - reference["logits"]).abs().max().item()
    assert diff <= 1e-5, f"{label}: logits differ from TP=1 by {diff:.3e}"
    assert set(result["weights"]) == set(reference["weights"]), f"{label}: parameter sets differ"
    if result["grads"]:
        assert set(result["grads"]) == set(reference["grads"]), f"{label}: gradient sets differ"
        for name, grad in reference["grads"].items():
            rel = (result["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-30)
            assert rel <= 1e-5, f"{label}: grad of {name} differs (relative {rel:.3e})"
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), f"{label}: grad norm"
    for name, weight in reference["weights"].items():
        diff = (result["weights"][name] - weight).abs().max().item()
        assert diff <= 1e-2 * LR, f"{label}: weight {name} after one step differs by {diff:.3e} (> 1% of lr)"
    # the step must have moved the weights, otherwise equal weights prove nothing
    moved = max((w - reference["initial"][n]).abs().max().item() for n, w in reference["weights"].items())
    assert moved > 1e-4, f"{label}: the optimizer step did not change the weights"


TWO_RANK_LAYOUTS = [
    {"moe": False, "tp": 2},
    {"moe": True, "tp": 2, "sp": True},
    {"moe": True, "ep": 2},
    {"moe": True, "ep": 2, "dispatcher": "allgather"},
]


def _references_from(reference: list[dict]) -> dict[str, dict]:
    out = {}
    for i, key in enumerate(("dense", "moe")):
        merged = _assemble([reference], i)
        merged["initial"] = reference[i]["initial"]
        out[key] = merged
    return out


@pytest.mark.timeout(300)
def test_two_rank_layouts_match_one_process() -> None:
    """TP=2 dense, TP=2+SP MoE, EP=2 MoE (DP=2 for the dense part, alltoall), EP=2 MoE with allgather dispatcher;
    and PP=2 builds the same (seeded) weights as PP=1."""
    per_rank_output = run_workers(_layouts_worker, 2, args=(TWO_RANK_LAYOUTS, free_port(), True), timeout_s=280)
    check_layouts_against_reference(per_rank_output, TWO_RANK_LAYOUTS)
    # PP=2 stages hold exactly the PP=1 model's tensors (global layer numbers, same seeded init)
    for kind, reference in per_rank_output[0]["reference_pipeline"].items():
        stages = [rank["pipeline"][kind] for rank in per_rank_output]
        assert not set(stages[0]) & {name for name in stages[1] if name.startswith("decoder.layers.")}
        merged = stages[0] | stages[1]
        assert set(merged) == set(reference), f"PP=2 {kind}: {sorted(set(merged) ^ set(reference))}"
        for name, tensor in reference.items():
            assert torch.equal(merged[name], tensor), f"PP=2 {kind}: {name} differs from PP=1"


FOUR_RANK_LAYOUTS = [
    {"moe": True, "tp": 2, "ep": 2, "sp": True},
    {"moe": True, "tp": 2, "ep": 2, "sp": True, "dist_opt": True},
    {"moe": False, "tp": 2, "dist_opt": True},
]
"""Run in the 4-rank world of tests/models/test_optimizer_checkpoint.py (one world for both saves ~30 s)."""


def check_layouts_against_reference(per_rank_output: list[dict], layouts: list[dict]) -> None:
    """Assert every layout of a ``_layouts_worker`` run (with its rank-0 reference) matches the one-process run."""
    references = _references_from(per_rank_output[0]["reference"])
    per_rank = [rank["layouts"] for rank in per_rank_output]
    for index, layout in enumerate(layouts):
        ref = references["moe" if layout["moe"] else "dense"]
        _assert_matches(_assemble(per_rank, index), ref, label=str(layout))


# --- layouts that cannot work fail early, naming the field and the fix (no processes needed) ----------------------


def _config(moe: bool, **overrides: object):
    from megatron_dispo.models.tiny import tiny_qwen3_config

    return tiny_qwen3_config(moe=moe, **({"vocab_size": VOCAB} | overrides))


@pytest.mark.parametrize(
    ("layout", "world_size", "model", "message"),
    [
        (
            {"tensor_model_parallel_size": 2},
            3,
            {},
            r"world_size \(3\) must be a multiple of tensor_model_parallel_size",
        ),
        ({"tensor_model_parallel_size": 8}, 8, {}, r"num_attention_heads \(4\) must be a multiple"),
        ({"tensor_model_parallel_size": 4}, 4, {}, r"num_query_groups \(2\) must be a multiple"),
        ({"expert_model_parallel_size": 8}, 8, {"num_experts": 4}, r"num_experts \(4\) must be a multiple"),
        ({"expert_model_parallel_size": 2}, 2, {"num_experts": 0}, "needs a MoE model"),
        ({"expert_model_parallel_size": 4}, 2, {}, r"multiple of expert_model_parallel_size \(4\)"),
        ({"tensor_model_parallel_size": 2}, 2, {"num_experts": 4}, "needs sequence_parallel=True"),
        ({"pipeline_model_parallel_size": 4}, 4, {"num_layers": 2}, r"num_layers \(2\) must be a multiple"),
        ({"sequence_parallel": True}, 1, {}, "sequence_parallel=True needs tensor_model_parallel_size > 1"),
    ],
)
def test_impossible_layouts_are_rejected_with_the_fix(layout: dict, world_size: int, model: dict, message: str) -> None:
    from megatron_dispo.models.parallel import ParallelConfig

    defaults = {"num_attention_heads": 4, "num_query_groups": 2}
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**layout).validate(world_size, **(defaults | model))


def test_parallel_config_rejects_non_positive_sizes() -> None:
    from megatron_dispo.models.parallel import ParallelConfig

    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=0 must be an integer >= 1"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=0"):
        ParallelConfig(expert_tensor_parallel_size=0)


def test_builder_rejects_what_it_cannot_build() -> None:
    from megatron_dispo.models.builder import has_transformer_engine, transformer_config_from_hf
    from megatron_dispo.models.parallel import ParallelConfig

    assert not has_transformer_engine()
    with pytest.raises(ValueError, match="fp8='e4m3' needs Transformer Engine"):
        transformer_config_from_hf(_config(False), ParallelConfig(), fp8="e4m3")
    with pytest.raises(ValueError, match="fp8='e5m2' is not a known FP8 format"):
        transformer_config_from_hf(_config(False), ParallelConfig(), fp8="e5m2")
    with pytest.raises(ValueError, match="tie_word_embeddings=True is not supported"):
        transformer_config_from_hf(_config(False, tie_word_embeddings=True), ParallelConfig())
    with pytest.raises(ValueError, match=r"vocab_size \(251\) must be a multiple of tensor_model_parallel_size"):
        transformer_config_from_hf(_config(False, vocab_size=251), ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match=r"overrides \['no_such_field'\] are not TransformerConfig fields"):
        transformer_config_from_hf(_config(False), ParallelConfig(), no_such_field=1)


def test_transformer_config_follows_the_hf_config() -> None:
    """Field-by-field mapping of Qwen3-MoE semantics onto Megatron (read against HF's Qwen3MoeSparseMoeBlock)."""
    from megatron_dispo.models.builder import transformer_config_from_hf
    from megatron_dispo.models.parallel import ParallelConfig

    hf = _config(True, mlp_only_layers=[0], rms_norm_eps=1e-5)
    config = transformer_config_from_hf(hf, ParallelConfig(), moe_token_dispatcher_type="allgather")
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_query_groups) == (
        2,
        128,
        4,
        2,
    )
    assert (config.kv_channels, config.layernorm_epsilon, config.normalization) == (32, 1e-5, "RMSNorm")
    assert config.qk_layernorm and config.gated_linear_unit and not config.add_bias_linear
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 64)
    assert config.moe_layer_freq == [0, 1]  # layer 0 is in mlp_only_layers
    assert config.moe_router_pre_softmax is False  # norm_topk_prob=True: softmax over the top-k only
    assert config.moe_aux_loss_coeff == pytest.approx(0.001)
    assert config.moe_token_dispatcher_type == "allgather"
    unnormalised = transformer_config_from_hf(_config(True, norm_topk_prob=False), ParallelConfig())
    assert unnormalised.moe_router_pre_softmax is True


def test_presets_match_the_published_parameter_counts() -> None:
    """Qwen's model cards: 8.2B, 14.8B, and 30.5B total / 3.3B activated for Qwen3-30B-A3B."""
    from megatron_dispo.models.builder import transformer_config_from_hf
    from megatron_dispo.models.presets import PRESETS, count_parameters, preset_hf_config

    expected = {"qwen3-8b": (8.2e9, 8.2e9), "qwen3-14b": (14.8e9, 14.8e9), "qwen3-30b-a3b": (30.5e9, 3.3e9)}
    for name, (total, active) in expected.items():
        counted = count_parameters(preset_hf_config(name))
        assert counted[0] == pytest.approx(total, rel=0.01) and counted[1] == pytest.approx(active, rel=0.02), name
    moe = preset_hf_config("qwen3-30b-a3b")
    assert (moe.num_hidden_layers, moe.hidden_size, moe.num_attention_heads, moe.num_key_value_heads) == (
        48,
        2048,
        32,
        4,
    )
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.vocab_size) == (
        128,
        8,
        768,
        151936,
    )
    for preset in PRESETS.values():  # every preset builds a valid Megatron config at its suggested layout
        transformer_config_from_hf(preset_hf_config(preset.name), preset.suggested_parallel)
    with pytest.raises(ValueError, match="model preset 'qwen3-9b' is unknown"):
        preset_hf_config("qwen3-9b")
