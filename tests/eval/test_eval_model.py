"""`megatron-dispo eval --model` end to end on a tiny random Qwen3 through the vLLM rollout engine.

Greedy decoding (temperature 0) makes the responses checkable against an independent reference: HF transformers'
greedy `generate` on the same rendered prompt. Runs the CLI in a subprocess (vLLM keeps process-global state)
under a hard timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dispo.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_NEW_TOKENS = 12


def _eval_command(checkpoint: Path, out_dir: Path, shared_eval_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    samples = "--num-samples" if nproc > 1 else "--n"  # torchrun's own parser would take --n for one of its options
    return [
        sys.executable,
        *launcher,
        "-m",
        "megatron_dispo.cli",
        "eval",
        "--model",
        str(checkpoint),
        "--benchmarks",
        "amc23,math500",
        "--limit",
        "2",
        samples,
        "2",
        "--temperature",
        "0",
        "--top-p",
        "1.0",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-model-len",
        "1024",
        "--kv-cache-gib",
        "0.25",
        "--dtype",
        "float32",
        "--eval-data-dir",
        str(shared_eval_dir),
        "--output-dir",
        str(out_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def model_eval(tmp_path_factory: pytest.TempPathFactory, shared_eval_dir: Path) -> tuple[Path, Path]:
    pytest.importorskip("vllm")
    from megatron_dispo.models.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)
    out_dir = tmp_path_factory.mktemp("eval_model")
    command = _eval_command(checkpoint, out_dir, shared_eval_dir)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=400, env=None)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return checkpoint, out_dir


def test_two_engine_replicas_give_the_one_engine_responses(
    model_eval: tuple[Path, Path], shared_eval_dir: Path, tmp_path: Path
) -> None:
    """Under torchrun with 2 ranks the problems are dealt to 2 engine replicas; rank 0 writes what one engine wrote."""
    checkpoint, one_engine = model_eval
    command = _eval_command(checkpoint, tmp_path, shared_eval_dir, nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "responses.jsonl").read_text() == (one_engine / "responses.jsonl").read_text()
    assert "engine replicas: 2" in completed.stdout


def test_report_and_saved_responses(model_eval: tuple[Path, Path]) -> None:
    _, out_dir = model_eval
    report = json.loads((out_dir / "eval_results.json").read_text())["benchmarks"]
    rows = [json.loads(line) for line in (out_dir / "responses.jsonl").read_text().splitlines()]
    assert [(row["benchmark"], row["id"]) for row in rows] == [
        ("amc23", "amc23-00"),
        ("amc23", "amc23-01"),
        ("math500", "test/precalculus/807.json"),
        ("math500", "test/intermediate_algebra/1994.json"),
    ]
    for name in ("amc23", "math500"):
        result = report[name]
        assert (result["n"], result["num_problems"], result["length_unit"]) == (2, 2, "tokens")
        assert sum(result["outcomes"].values()) == 4
    for row in rows:
        assert len(row["responses"]) == 2 and row["responses"][0] == row["responses"][1]  # greedy
        assert all(0 < length <= MAX_NEW_TOKENS for length in row["lengths"])
        assert set(row["finish_reasons"]) <= {"stop", "length"}


def test_greedy_responses_match_hf_transformers(model_eval: tuple[Path, Path], shared_eval_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_dispo.data import encode_prompt, load_competition

    checkpoint, out_dir = model_eval
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (out_dir / "responses.jsonl").read_text().splitlines()]
    problem = load_competition("amc23", shared_eval_dir)[0]
    prompt = encode_prompt(problem.problem, "dapo", tokenizer)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )[0, len(prompt) :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
    assert rows[0]["lengths"][0] == len(generated)
    assert rows[0]["responses"][0] == tokenizer.decode(generated, skip_special_tokens=True)


def test_rescoring_saved_responses_reproduces_the_report(model_eval: tuple[Path, Path], shared_eval_dir: Path) -> None:
    _, out_dir = model_eval
    rescored_dir = out_dir / "rescored"
    args = ["eval", "--responses", str(out_dir / "responses.jsonl"), "--benchmarks", "amc23,math500"]
    assert main([*args, "--eval-data-dir", str(shared_eval_dir), "--output-dir", str(rescored_dir)]) == 0
    original = json.loads((out_dir / "eval_results.json").read_text())["benchmarks"]
    rescored = json.loads((rescored_dir / "eval_results.json").read_text())["benchmarks"]
    for name in ("amc23", "math500"):
        for key in ("avg_at_n", "pass_at_k", "maj_at_k", "outcomes", "mean_response_length", "per_problem_correct"):
            assert rescored[name][key] == original[name][key], (name, key)
