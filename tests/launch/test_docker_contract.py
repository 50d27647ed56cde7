"""The image cannot come out without Transformer Engine (issue 24): read from ``docker/Dockerfile`` (no Docker engine
here; hadolint checks the file's syntax in test_lint.py).

Without TE, Megatron silently builds its local layer spec (``models/builder.py: transformer_impl``) and FP8 training
cannot run; vLLM replaces NGC's torch, which can break NGC's own TE build. So TE must be installed after vLLM, at a
pinned version inside megatron-core 0.16.1's range, and the build must stop unless it imports at that version.
"""

from __future__ import annotations

import re
from pathlib import Path

NUM_GPUS = 0
DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "Dockerfile"


def _run_steps(text: str) -> list[str]:
    """Each RUN instruction with its continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [line for line in joined.splitlines() if line.startswith("RUN ")]


def test_gpu_contract_docker_build_requires_transformer_engine_at_a_pinned_version() -> None:
    text = DOCKERFILE.read_text()
    spec = re.search(r'^ARG TE_SPEC="transformer-engine\[pytorch\]==(\d+)\.(\d+)\.(\d+)"$', text, flags=re.M)
    version = re.search(r'^ARG TE_VERSION="([\d.]+)"$', text, flags=re.M)
    assert spec and version, "Transformer Engine must be pinned (ARG TE_SPEC / TE_VERSION)"
    assert version.group(1) == ".".join(spec.groups()) and (2, 9) <= (int(spec[1]), int(spec[2])) < (2, 12)
    steps = _run_steps(text)
    vllm = next(i for i, step in enumerate(steps) if "${VLLM_SPEC}" in step)
    te = next(i for i, step in enumerate(steps) if "${TE_SPEC}" in step)
    assert te > vllm, "TE must be built after vLLM replaced the base image's torch"
    assert "import transformer_engine" in steps[te] and "${TE_VERSION}" in steps[te] and "assert" in steps[te]
    assert any("has_transformer_engine" in step and "assert" in step for step in steps[te + 1 :])
