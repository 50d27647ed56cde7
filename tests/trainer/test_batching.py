"""Batching: whole-group mini-batches, DP shards, token-budget packing, target-aligned masks."""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.models.microbatch import build_microbatch
from megatron_dispo.trainer.batching import (
    pack_microbatches,
    response_token_count,
    shard_for_data_parallel,
    split_minibatches,
)


def test_minibatches_are_whole_groups():
    assert split_minibatches(8, 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_minibatches(6, 3, 1) == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(
    ("args", "message"),
    [((7, 2, 1), "must be a positive multiple of group_size=2"), ((6, 2, 2), "do not split into num_minibatches=2")],
)
def test_minibatch_errors(args, message):
    with pytest.raises(ValueError, match=message):
        split_minibatches(*args)


def test_data_parallel_shards():
    minibatch = [4, 5, 6, 7, 8, 9, 10, 11]
    assert shard_for_data_parallel(minibatch, 2, 0, 2) == [4, 5, 6, 7]
    assert shard_for_data_parallel(minibatch, 2, 1, 2) == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="cannot be shared equally by 3 data-parallel ranks"):
        shard_for_data_parallel(minibatch, 2, 0, 3)


def test_packing_respects_padded_budget():
    lengths = [3, 5, 2, 8, 1]
    # [0,1]: 2 x 5 = 10 <= 10; adding 2 -> 3 x 5 = 15 > 10; [2]: then 8 -> 2 x 8 = 16 > 10; [3]; [4]
    assert pack_microbatches(range(5), lengths, 10) == [[0, 1], [2], [3], [4]]
    assert pack_microbatches(range(5), lengths, 100) == [[0, 1, 2, 3, 4]]
    assert pack_microbatches([3], lengths, 4) == [[3]]  # longer than the budget: alone, not an error


def test_microbatch_tensors_are_target_aligned():
    prompts = [[10, 11], [12]]
    responses = [[20, 21, 22], [23]]
    old = [torch.tensor([-0.1, -0.2, -0.3]), torch.tensor([-0.4])]
    mb = build_microbatch(
        [0, 1], prompts, responses, pad_token_id=0, old_logprobs=old, advantages=torch.tensor([1.0, -1.0])
    )
    assert mb.input_ids.tolist() == [[10, 11, 20, 21, 22], [12, 23, 0, 0, 0]]
    # row 0: targets are tokens 1..4 = [11, 20, 21, 22]; response targets are columns 1..3
    assert mb.response_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    torch.testing.assert_close(mb.old_logprobs, torch.tensor([[0, -0.1, -0.2, -0.3], [-0.4, 0, 0, 0]]))
    assert mb.advantages.tolist() == [1.0, -1.0]
    assert mb.num_tokens == 4 == response_token_count([0, 1], responses)


def test_microbatch_validation():
    with pytest.raises(ValueError, match="has 1 values for 2 response tokens"):
        build_microbatch([0], [[1]], [[2, 3]], pad_token_id=0, old_logprobs=[torch.tensor([0.0])])
    with pytest.raises(ValueError, match="empty prompt"):
        build_microbatch([0], [[]], [[2]], pad_token_id=0)
