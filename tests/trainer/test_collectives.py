"""Host data on host groups, model tensors on device groups: every collective of two multi-rank runs, checked as it
would run with the model on CUDA (where the default group and Megatron's groups are NCCL, which moves no CPU tensor).

The recorder (``collective_trace``) is test code that wraps ``torch.distributed`` and the bridges around the real
CLI; it classifies groups by how they were created, not by the product's own names for them. Runs: the world-2 dense
PP=2 layout with two engine replicas, and the world-3 dedicated placement (1 training rank + 2 rollout ranks).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.trainer.collective_trace import read_traces, violations
from tests.trainer.conftest import TracedRun

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]


def _check(run: TracedRun) -> Counter:
    records = read_traces(run.trace_dir)
    kinds = Counter((r["payload"], r["channel"]) for r in records)
    print(f"{run.trace_dir.parent.name}: {len(records)} collectives, (payload, channel) counts {dict(kinds)}")
    assert not violations(records), "\n".join(violations(records))
    return kinds


def test_world2_pp2_layout_keeps_host_data_off_device_groups(dense_pp2_run: TracedRun) -> None:
    kinds = _check(dense_pp2_run)
    assert kinds[("host", "host")] > 0 and kinds[("model", "device")] > 0  # batch / metrics, and the model's own


def test_world3_dedicated_run_keeps_host_data_off_device_groups(dedicated_k0_run: TracedRun) -> None:
    kinds = _check(dedicated_k0_run)
    assert kinds[("weights", "device")] > 0  # the weights crossed on the device bridge, through the refit transport
    assert kinds[("host", "host")] > 0
