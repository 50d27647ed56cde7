"""`megatron-dispo eval --responses`: a fixed responses file scored end to end, against a hand count.

fixtures/responses_n16.jsonl (16 responses per problem):
- aime24-00 (gold 204): 10 correct (6 "Answer: 204", 2 "Answer: $204$", 2 boxed), 3 x "205", 1 x "42", 2 no answer
- aime24-01 (gold 113): 3 correct, 7 x "112", 6 x "13"
- aime24-02 (gold 371): 16 correct (boxed)
- amc23-00 (gold 27): 16 x "28"
- amc23-01 (gold 36): "36", "6" alternating, 8 each
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_dispo.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "responses_n16.jsonl"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, shared_eval_dir: Path) -> tuple[dict, str]:
    out_dir = tmp_path_factory.mktemp("eval")
    code = main(
        [
            "eval",
            "--responses",
            str(FIXTURE),
            "--benchmarks",
            "aime24,amc23",
            "--eval-data-dir",
            str(shared_eval_dir),
            "--output-dir",
            str(out_dir),
            "--timeout-s",
            "30",  # the hand count is about verdicts; a loaded CI machine must not turn slow answers into timeouts
        ]
    )
    assert code == 0
    return json.loads((out_dir / "eval_results.json").read_text()), (out_dir / "eval_results.md").read_text()


def test_avg_at_16_matches_the_hand_count(report: tuple[dict, str]) -> None:
    aime, amc = report[0]["benchmarks"]["aime24"], report[0]["benchmarks"]["amc23"]
    assert aime["n"] == 16 and aime["num_problems"] == 3 and aime["num_problems_total"] == 30
    assert aime["per_problem_correct"] == {"aime24-00": 10, "aime24-01": 3, "aime24-02": 16}
    assert aime["avg_at_n"] == pytest.approx(29 / 48)
    assert amc["avg_at_n"] == pytest.approx(8 / 32)
    assert aime["outcomes"] == {"correct": 29, "incorrect": 17, "no_answer": 2, "timeout": 0, "error": 0}


def test_pass_and_maj_at_k_match_hand_values(report: tuple[dict, str]) -> None:
    aime, amc = report[0]["benchmarks"]["aime24"], report[0]["benchmarks"]["amc23"]
    assert list(aime["pass_at_k"]) == ["1", "2", "4", "8", "16"]
    assert aime["pass_at_k"]["1"] == pytest.approx(29 / 48)
    # 1 - C(6,2)/C(16,2) = 0.875; 1 - C(13,2)/C(16,2) = 0.35; 1
    assert aime["pass_at_k"]["2"] == pytest.approx((0.875 + 0.35 + 1.0) / 3)
    assert aime["pass_at_k"]["16"] == pytest.approx(1.0)
    assert amc["pass_at_k"]["2"] == pytest.approx((0.0 + 1 - 28 / 120) / 2)  # 1 - C(8,2)/C(16,2)
    assert aime["maj_at_k"]["16"] == pytest.approx(2 / 3)  # 204 wins 10:3, 112 beats 113 7:3, 371 unanimous
    assert aime["maj_at_k"]["1"] == pytest.approx(29 / 48)
    assert amc["maj_at_k"]["2"] == pytest.approx(0.5)  # amc23-01 blocks (36, 6): ties go to 36, seen first
    assert aime["mean_response_length"] == pytest.approx(75.0) and aime["length_unit"] == "tokens"
    assert amc["length_unit"] == "chars" and amc["mean_response_length"] == pytest.approx(
        (16 * 10 + 8 * 10 + 8 * 9) / 32
    )


def test_markdown_table_has_one_row_per_benchmark(report: tuple[dict, str]) -> None:
    markdown = report[1]
    assert "| aime24 | 3/30 | 16 | 60.42 |" in markdown
    assert "| amc23 | 2/40 | 16 | 25.00 |" in markdown
    assert "29 / 17 / 2 / 0 / 0" in markdown


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--responses", str(FIXTURE), "--benchmarks", "gpqa"]) == 2
    assert "unknown ['gpqa']" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"benchmark": "math500", "id": "nope", "responses": ["\\\\boxed{1}"]}\n')
    assert main(["eval", "--responses", str(bad), "--benchmarks", "math500", "--output-dir", str(tmp_path)]) == 2
    assert "['nope'] are not problems of this benchmark" in capsys.readouterr().err
    assert main(["eval", "--responses", str(FIXTURE), "--benchmarks", "math500", "--output-dir", str(tmp_path)]) == 2
    assert "has no responses for ['math500']" in capsys.readouterr().err


def test_model_without_vllm_is_a_clear_error(
    tmp_path: Path, shared_eval_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from megatron_dispo.models.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM: `import vllm` fails
    args = ["eval", "--model", str(checkpoint), "--benchmarks", "amc23", "--limit", "1", "--n", "1"]
    args += ["--max-new-tokens", "8", "--max-model-len", "512", "--kv-cache-gib", "0.1", "--dtype", "float32"]
    assert main([*args, "--eval-data-dir", str(shared_eval_dir), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "needs vLLM to generate" in error and "--responses FILE" in error
