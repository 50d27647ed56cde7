"""Fixtures for the data tests: the real Qwen tokenizer, built once per session from dashscope's qwen.tiktoken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("qwen_tokenizer")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "build_qwen_tokenizer.py"), "--out", str(out_dir)],
        check=True,
        timeout=180,
        capture_output=True,
    )
    return out_dir


@pytest.fixture(scope="session")
def qwen_hf_tokenizer(qwen_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
