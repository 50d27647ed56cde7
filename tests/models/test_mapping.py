"""Pure tests of the HF <-> Megatron tables and transforms (megatron_dispo.models.mapping): no processes, no Megatron.

Hand-written layouts pin the formats (QKV interleaved per query group, [gate; up], per-rank [gate_r; up_r]); the
round trips prove HF -> Megatron shards -> HF is bit-exact for every tensor at TP 1/2 x EP 1/2, and that reading only
a rank's slices (what the sharded loader does) builds the same shard as merging then sharding.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.models.mapping import (
    QWEN3_DENSE,
    QWEN3_MOE,
    FuseGateUp,
    FuseQKV,
    ModelDims,
    Rename,
    global_expert_index,
    padded_vocab_size,
    resolve_names,
    shard_tensor,
    table_for,
    unshard_tensors,
)
from megatron_dispo.models.tiny import random_tiny_state_dict, tiny_qwen3_config

NUM_GPUS = 0


def test_wildcard_count_mismatch_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="Wildcard count mismatch"):
        Rename("decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="tp_split"):
        Rename("a.weight", "b.weight", "diagonal")  # type: ignore[arg-type]


def test_qkv_is_interleaved_per_query_group() -> None:
    # 4 query heads in 2 groups, head_dim 1, hidden 1: Megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    dims = ModelDims(num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=8, padded_vocab_size=8)
    mapping = FuseQKV("qkv", q="q", k="k", v="v")
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = mapping.merge([q, k, v], dims)
    assert fused.flatten().tolist() == [10.0, 11.0, 20.0, 30.0, 12.0, 13.0, 21.0, 31.0]
    # TP=2 splits the fused tensor in contiguous chunks: each rank gets one whole group.
    assert shard_tensor(fused, "column", 1, 2).flatten().tolist() == [12.0, 13.0, 21.0, 31.0]
    assert all(torch.equal(a, b) for a, b in zip(mapping.split(fused, dims), (q, k, v), strict=True))


def test_gate_up_fusion_and_its_tensor_parallel_shards() -> None:
    mapping = FuseGateUp("fc1", gate="g", up="u")
    dims = ModelDims(num_attention_heads=1, num_query_groups=1, head_dim=1, vocab_size=1, padded_vocab_size=1)
    gate = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    up = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
    fused = mapping.merge([gate, up], dims)
    assert fused.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    # Rank r of 2 holds [gate_r; up_r] (Megatron's SwiGLU fc1 applies silu to the first half of its own shard).
    assert shard_tensor(fused, "gated_column", 0, 2).flatten().tolist() == [1.0, 2.0, 5.0, 6.0]
    assert shard_tensor(fused, "gated_column", 1, 2).flatten().tolist() == [3.0, 4.0, 7.0, 8.0]
    shards = [shard_tensor(fused, "gated_column", r, 2) for r in range(2)]
    assert torch.equal(unshard_tensors(shards, "gated_column"), fused)


def test_vocab_padding_and_expert_numbering() -> None:
    assert padded_vocab_size(151936, tp_size=2) == 152064  # 151936 / 256 = 593.5 -> 594 * 256
    assert padded_vocab_size(1024, tp_size=2) == 1024
    assert [global_expert_index(i, 1, 4) for i in range(4)] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="local_expert"):
        global_expert_index(4, 0, 4)
    with pytest.raises(ValueError, match="model_type"):
        table_for(type("Cfg", (), {"model_type": "llama"})())


def test_resolve_lists_unknown_names_and_renumbers_experts() -> None:
    names = [
        "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight",
        "decoder.layers.0.mlp.experts.linear_fc2.weight1",  # TE grouped-GEMM layout
        "decoder.layers.0.self_attention.mystery.weight",
        "decoder.layers.0.mlp.bogus",
    ]
    with pytest.raises(ValueError) as info:
        resolve_names(QWEN3_MOE, names, num_local_experts=2)
    assert "decoder.layers.0.self_attention.mystery.weight" in str(info.value)
    assert "decoder.layers.0.mlp.bogus" in str(info.value)
    resolved = resolve_names(QWEN3_MOE, names[:2], ep_rank=1, num_local_experts=2)
    assert resolved[0].hf_names == (
        "model.layers.3.mlp.experts.3.gate_proj.weight",
        "model.layers.3.mlp.experts.3.up_proj.weight",
    )
    assert resolved[1].hf_names == ("model.layers.0.mlp.experts.3.down_proj.weight",)


def _local_megatron_names(num_layers: int, num_local_experts: int | None, grouped: bool) -> list[str]:
    """The parameter names of Megatron's local-spec GPTModel (or TE grouped experts), written out independently."""
    names = ["embedding.word_embeddings.weight"]
    for layer in range(num_layers):
        p = f"decoder.layers.{layer}"
        names += [
            f"{p}.input_layernorm.weight",
            f"{p}.self_attention.linear_proj.weight",
            f"{p}.self_attention.linear_qkv.weight",
            f"{p}.self_attention.q_layernorm.weight",
            f"{p}.self_attention.k_layernorm.weight",
            f"{p}.pre_mlp_layernorm.weight",
        ]
        if num_local_experts is None:
            names += [f"{p}.mlp.linear_fc1.weight", f"{p}.mlp.linear_fc2.weight"]
            continue
        names.append(f"{p}.mlp.router.weight")
        for i in range(num_local_experts):
            if grouped:
                names += [f"{p}.mlp.experts.linear_fc1.weight{i}", f"{p}.mlp.experts.linear_fc2.weight{i}"]
            else:
                names += [
                    f"{p}.mlp.experts.local_experts.{i}.linear_fc1.weight",
                    f"{p}.mlp.experts.local_experts.{i}.linear_fc2.weight",
                ]
    return [*names, "decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.mark.parametrize(
    ("moe", "grouped", "padded_vocab"),
    [(False, False, 1024), (False, False, 1088), (True, False, 1024), (True, True, 1088)],
    ids=["dense", "dense-padded-vocab", "moe-sequential", "moe-grouped-padded-vocab"],
)
def test_round_trip_hf_to_sharded_megatron_to_hf_is_bit_exact(moe: bool, grouped: bool, padded_vocab: int) -> None:
    config = tiny_qwen3_config(moe=moe, vocab_size=1000)
    hf_state = random_tiny_state_dict(config, seed=3)
    dims = ModelDims.from_hf_config(config, padded_vocab_size=padded_vocab)
    table = QWEN3_MOE if moe else QWEN3_DENSE
    num_experts = config.num_experts if moe else 0
    for tp in (1, 2):
        for ep in (1, 2) if moe else (1,):
            num_local = num_experts // ep if moe else None
            names = _local_megatron_names(config.num_hidden_layers, num_local, grouped)
            # Load: each (ep, tp) rank builds its shard twice (merge-then-shard, and from its slices only).
            shards: dict[tuple[str, int, int], torch.Tensor] = {}
            for ep_rank in range(ep):
                for entry in resolve_names(table, names, ep_rank=ep_rank, num_local_experts=num_local or 1):
                    sources = [hf_state[name] for name in entry.hf_names]
                    full = entry.mapping.merge(sources, dims)
                    for tp_rank in range(tp):
                        shard = shard_tensor(full, entry.mapping.tp_split, tp_rank, tp)
                        specs = entry.mapping.source_slices([s.shape for s in sources], dims, tp_rank, tp)
                        pieces = [spec.apply(s) for spec, s in zip(specs, sources, strict=True)]
                        from_slices = entry.mapping.merge_shard(pieces, dims, tp_rank, tp)
                        assert torch.equal(shard, from_slices), (entry.megatron_name, tp_rank, tp)
                        shards[(entry.megatron_name, ep_rank, tp_rank)] = shard.clone()
            # Export: unshard over TP, renumber experts over EP, split back into HF tensors.
            exported: dict[str, torch.Tensor] = {}
            for ep_rank in range(ep):
                for entry in resolve_names(table, names, ep_rank=ep_rank, num_local_experts=num_local or 1):
                    if entry.expert is None and ep_rank > 0:
                        continue  # non-expert params are replicated over EP
                    parts = [shards[(entry.megatron_name, ep_rank, r)] for r in range(tp)]
                    full = unshard_tensors(parts, entry.mapping.tp_split)
                    for name, tensor in zip(entry.hf_names, entry.mapping.split(full, dims), strict=True):
                        assert name not in exported, name
                        exported[name] = tensor
            assert set(exported) == set(hf_state), (tp, ep)
            for name, tensor in hf_state.items():
                assert torch.equal(exported[name], tensor), (name, tp, ep)
            if padded_vocab > config.vocab_size:  # padding rows are zero in the shards, gone after export
                last = shards[("output_layer.weight", 0, tp - 1)]
                assert torch.count_nonzero(last[-(padded_vocab - config.vocab_size) :]) == 0
