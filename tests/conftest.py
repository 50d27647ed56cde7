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
