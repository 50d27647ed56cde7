"""Run under torchrun by test_bridge.py: two training ranks with Megatron groups + one rollout rank on a gloo bridge."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dispo.comm.channel import BridgeError, StoreBridge
from megatron_dispo.trainer.bridge import init_training_world, job_layout, job_store


def main(mode: str, out_dir: str) -> None:
    layout = job_layout(num_rollout_ranks=1)
    timeout = timedelta(seconds=20)
    store = job_store(layout, timeout)
    result: dict[str, object] = {"rollout": layout.is_rollout_rank, "file": __import__("megatron_dispo").__file__}
    if not layout.is_rollout_rank:
        from megatron_dispo.models.config import ParallelConfig
        from megatron_dispo.models.parallel import initialize_parallel

        init_training_world(layout, store, timeout)
        initialize_parallel(ParallelConfig(), seed=1)
        from megatron.core import parallel_state

        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        result |= {
            "world": dist.get_world_size(),
            "sum": total.item(),
            "dp": parallel_state.get_data_parallel_world_size(),
        }
    bridge = None
    if layout.bridge_rank is not None:
        bridge = StoreBridge(store, layout.bridge_rank, layout.bridge_size, timeout, name="bridge")
    if bridge is not None and mode == "ok":
        if bridge.rank == 0:
            bridge.send_object({"version": 3}, dst=1)
            result["reply"] = bridge.recv_object(src=1)
            result["bcast"] = bridge.broadcast(torch.arange(5.0), src=0).tolist()
        else:
            msg = bridge.recv_object(src=0)
            bridge.send_object({"got": msg["version"]}, dst=0)
            result["bcast"] = bridge.broadcast(torch.zeros(5), src=0).tolist()
    if bridge is not None and mode == "dead":
        if bridge.rank == 1:
            os._exit(0)  # the rollout rank dies without a word
        started = time.perf_counter()
        try:
            bridge.recv_object(src=1)
            result["error"] = None
        except BridgeError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, f"rank{layout.global_rank}.json"), "w") as handle:
        json.dump(result, handle)
    if not layout.is_rollout_rank:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
