"""The tensor data path of a step: `StepBatch` packs the kept rollouts, `broadcast_step_batch` delivers them to every
rank with a few collectives, and samples dropped by the verifier-failure policy lose their loss weight."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_dispo.trainer.batching import build_microbatch, exclude_dropped
from megatron_dispo.trainer.step_batch import FINISH_REASONS, StepBatch, broadcast_step_batch
from tests.models.distributed import run_workers

PROMPTS = [[5, 6, 7], [5, 6, 7], [9], [9]]
RESPONSES = [[1, 2], [3], [4, 4, 4], []]
LOGPROBS = [[-0.5, -0.25], [-1.0], [-0.125, -0.375, -0.75], []]  # exact in float32


def _routing() -> list[torch.Tensor]:
    """Engine routing of each sequence: [prompt + response - 1, 2 layers, top-2], distinct values everywhere."""
    sizes = [len(p) + len(r) - 1 for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    start = [sum(sizes[:i]) for i in range(len(sizes))]
    pairs = zip(start, sizes, strict=True)
    return [torch.arange(4 * a, 4 * (a + n), dtype=torch.int16).reshape(n, 2, 2) for a, n in pairs]


def _batch(valid: list[bool] | None = None, routed: list[torch.Tensor] | None = None) -> StepBatch:
    return StepBatch.from_sequences(
        PROMPTS, RESPONSES, LOGPROBS, [True, False, False, True], ["stop", "length", "repetition", "stop"], valid,
        routed_experts=routed,
    )  # fmt: skip


def test_routing_is_packed_row_aligned_with_the_tokens() -> None:
    routed = _routing()
    per_sequence = _batch(routed=routed).routed_experts_per_sequence()
    assert per_sequence is not None and _batch().routed_experts_per_sequence() is None
    for got, want, prompt, response in zip(per_sequence, routed, PROMPTS, RESPONSES, strict=True):
        assert got.shape == (len(prompt) + len(response), 2, 2)
        assert torch.equal(got[:-1], want) and (got[-1] == -1).all()  # the last token was never fed back
    micro = build_microbatch([2, 0], PROMPTS, RESPONSES, pad_token_id=0, routed_experts=per_sequence)
    assert micro.routed_experts is not None and micro.routed_experts.shape == (2, 5, 2, 2)
    assert torch.equal(micro.routed_experts[0, :4], per_sequence[2].long())
    assert (micro.routed_experts[1, 4:] == -1).all()  # right padding is not replayed
    with pytest.raises(ValueError, match=r"sequence 0: routed_experts \(3, 2, 2\), expected \[4, L, k\]"):
        _batch(routed=[routed[0][:3], *routed[1:]])


def test_packed_batch_gives_back_every_sequence() -> None:
    batch = _batch()
    assert batch.num_sequences == 4
    assert batch.tokens.tolist() == [5, 6, 7, 1, 2, 5, 6, 7, 3, 9, 4, 4, 4, 9]
    assert [p.tolist() for p in batch.prompts] == PROMPTS
    assert [r.tolist() for r in batch.responses] == RESPONSES
    assert [lp.tolist() for lp in batch.rollout_logprobs_per_sequence()] == LOGPROBS
    assert batch.finish_reasons() == ["stop", "length", "repetition", "stop"]
    assert batch.valid.tolist() == [True] * 4
    assert batch.prompts[0].data_ptr() == batch.tokens.data_ptr()  # views into the packed tensor, not copies


def test_mismatched_lengths_are_named() -> None:
    with pytest.raises(ValueError, match="sequence 1: 1 response tokens but 2 log-probs"):
        StepBatch.from_sequences(PROMPTS[:2], RESPONSES[:2], [[-0.5, -0.25], [-1.0, -2.0]], [True, False], ["stop"] * 2)
    with pytest.raises(ValueError, match="differ in length"):
        StepBatch.from_sequences(PROMPTS, RESPONSES, LOGPROBS, [True], ["stop"] * 4)


def test_partial_rollouts_record_a_version_per_token() -> None:
    """Partial rollouts: each response token keeps the version that sampled it; a sequence's policy_version is its
    first chunk's (its oldest token's)."""
    versions = [[3, 4], [4], [2, 3, 3], []]
    batch = StepBatch.from_sequences(
        PROMPTS, RESPONSES, LOGPROBS, [True] * 4, ["stop"] * 4, token_versions=versions, start_versions=[3, 4, 2, 4]
    )
    assert batch.token_version is not None and batch.token_version.tolist() == [3, 4, 4, 2, 3, 3]
    assert batch.policy_version is not None and batch.policy_version.tolist() == [3, 4, 2, 4]
    assert _batch().token_version is None  # one version per batch without them
    with pytest.raises(ValueError, match="sequence 2: 3 response tokens but 2 token versions"):
        StepBatch.from_sequences(
            PROMPTS, RESPONSES, LOGPROBS, [True] * 4, ["stop"] * 4, token_versions=[[3, 4], [4], [2, 3], []],
            start_versions=[3, 4, 2, 4],
        )  # fmt: skip
    with pytest.raises(ValueError, match="token_versions needs start_versions"):
        StepBatch.from_sequences(PROMPTS, RESPONSES, LOGPROBS, [True] * 4, ["stop"] * 4, token_versions=versions)


def test_dropped_samples_get_no_loss_weight() -> None:
    batch = _batch(valid=[True, False, True, True])
    micro = build_microbatch([0, 1, 2], batch.prompts, batch.responses, pad_token_id=0)
    before = micro.response_mask.clone()
    exclude_dropped(micro, batch.valid)
    assert micro.response_mask[1].sum() == 0 and before[1].sum() == 1
    assert torch.equal(micro.response_mask[[0, 2]], before[[0, 2]])


def _broadcast_worker() -> dict[str, Any]:  # pragma: no cover - runs in the workers
    import torch.distributed as dist

    from megatron_dispo.comm import GroupChannel, init_host_world

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    host = GroupChannel(init_host_world(), "host", "host-world")
    got = broadcast_step_batch(_batch(valid=[True, True, False, True]) if rank == 0 else None, src=0, channel=host)
    empty = StepBatch.from_sequences([], [], [], [], [])
    got_empty = broadcast_step_batch(empty if rank == 0 else None, src=0, channel=host)
    routed_batch = _batch(routed=_routing()) if rank == 0 else None
    routed = broadcast_step_batch(routed_batch, src=0, channel=host, without=()).routed_experts  # every column
    return {
        "prompts": [p.tolist() for p in got.prompts],
        "responses": [r.tolist() for r in got.responses],
        "logprobs": [lp.tolist() for lp in got.rollout_logprobs_per_sequence()],
        "correct": got.correct.tolist(),
        "valid": got.valid.tolist(),
        "finish": got.finish_reasons(),
        "dtypes": [str(t.dtype) for t in (got.tokens, got.rollout_logprobs, got.correct, got.valid, got.finish_codes)],
        "empty": got_empty.num_sequences,
        "plain_routing": got.routed_experts is None,
        "routing": None if routed is None else (str(routed.dtype), routed.tolist()),
    }


def test_broadcast_delivers_the_engine_ranks_batch_to_every_rank() -> None:
    sender, receiver = run_workers(_broadcast_worker, 2, timeout_s=120)
    assert receiver == sender
    assert receiver["prompts"] == PROMPTS and receiver["responses"] == RESPONSES and receiver["logprobs"] == LOGPROBS
    assert receiver["valid"] == [True, True, False, True] and receiver["correct"] == [True, False, False, True]
    assert receiver["finish"] == ["stop", "length", "repetition", "stop"]
    assert receiver["dtypes"] == ["torch.int64", "torch.float32", "torch.bool", "torch.bool", "torch.int8"]
    assert receiver["empty"] == 0
    assert receiver["plain_routing"] and receiver["routing"] is not None
    assert receiver["routing"] == ("torch.int16", _batch(routed=_routing()).routed_experts.tolist())
    assert FINISH_REASONS == ("stop", "length", "repetition")


def _routing_worker() -> dict[str, Any]:  # pragma: no cover - runs in the workers
    import torch.distributed as dist

    from megatron_dispo.comm import GroupChannel, init_host_world
    from megatron_dispo.trainer.step_batch import deliver_routing

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    host = GroupChannel(init_host_world(), "host", "host-world")
    out: dict[str, Any] = {}
    for name, routed, experts, shares in (
        ("int16", _routing(), 1000, [[0, 1, 2, 3], [1, 3]]),  # ids up to ~100: two-byte codes
        ("uint8", [r % 8 for r in _routing()], 8, [[0, 1, 2, 3], [0, 2]]),
    ):
        full = _batch(routed=routed)
        batch = broadcast_step_batch(full if rank == 0 else None, src=0, channel=host)
        got = deliver_routing(batch, host, 0, shares, experts)
        local = got.routed_experts_per_sequence()
        out[name] = {
            "broadcast_routing": batch.routed_experts is not None,
            "local": None if rank == 0 else {i: t.tolist() for i, t in local.items()},  # type: ignore[union-attr]
        }
    return out


def test_routing_reaches_each_rank_for_its_own_sequences_only() -> None:
    """The batch broadcast leaves the routing on rank 0; rank 1 receives its sequences' rows, exactly, as 2-byte
    codes (1000 experts) and 1-byte codes (8 experts), and nothing for the sequences it does not train on."""
    sender, receiver = run_workers(_routing_worker, 2, timeout_s=120)
    for name, modulo, mine in (("int16", None, [1, 3]), ("uint8", 8, [0, 2])):
        assert sender[name]["broadcast_routing"] and not receiver[name]["broadcast_routing"]
        full = _batch(routed=[r if modulo is None else r % modulo for r in _routing()]).routed_experts_per_sequence()
        assert full is not None
        assert receiver[name]["local"] == {i: full[i].tolist() for i in mine}  # NO_ROUTE (-1) rows restored too
