"""Shared fixtures. Tests are CPU-only unless marked `gpu` (then skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs on the GPU test machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_eval_dir() -> Path:
    """AIME24/25 and AMC23 JSONL files kept beside the repo (no package ships them)."""
    path = SHARED_DIR / "data" / "eval"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: tests expect the shared/ folder next to the repository")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Rollout (vLLM) fixtures. vLLM keeps its parallel state in process globals, so one RolloutEngine is alive at a time;
# the pool below keeps the current one and swaps only when a test asks for another checkpoint, and frees it at the end
# of each test module. `import vllm` and the sampler's compiled kernels are paid once per test run.
@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny HF checkpoints: dense/MoE at seeds 0 and 1, and a dense model whose greedy decoding loops (period 8)."""
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {
        "dense": make_tiny_checkpoint(root / "dense", seed=0),
        "dense_seed1": make_tiny_checkpoint(root / "dense_seed1", seed=1),
        "moe": make_tiny_checkpoint(root / "moe", moe=True, seed=0),
        "moe_seed1": make_tiny_checkpoint(root / "moe_seed1", moe=True, seed=1),
        "loop": make_tiny_checkpoint(root / "loop", seed=0, loop_period=8),
    }


class RolloutEnginePool:
    """Hands out one live RolloutEngine per checkpoint name, shutting down the previous one when the name changes."""

    def __init__(self, checkpoints: dict[str, Path]) -> None:
        self.checkpoints = checkpoints
        self.name: str | None = None
        self.engine = None

    def get(self, name: str):  # -> RolloutEngine (vllm imported lazily)
        from megatron_dispo.rollout import RolloutConfig, RolloutEngine

        if name != self.name:
            self.close()
            config = RolloutConfig(max_new_tokens=64, max_model_len=512, kv_cache_gib=0.0625, seed=0)
            self.engine, self.name = RolloutEngine(self.checkpoints[name], config), name
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.engine, self.name = None, None


@pytest.fixture(scope="session")
def _rollout_engine_pool(tiny_checkpoints: dict[str, Path]):
    pool = RolloutEnginePool(tiny_checkpoints)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def rollout_engines(_rollout_engine_pool: RolloutEnginePool):
    """The session's engine pool; the live engine is shut down when the module ends, so that other test modules
    can start their own RolloutEngine in this process (vLLM allows one at a time)."""
    yield _rollout_engine_pool
    _rollout_engine_pool.close()
