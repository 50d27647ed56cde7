"""Local JSONL/Parquet files with configurable fields, malformed rows, and DeepMind Mathematics text files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_dispo.data import MalformedRowError, load_deepmind_mathematics, load_problem_file


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_custom_field_names_and_generated_ids(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"q": "1+1?", "a": 2}, {"q": "2+2?", "a": "4", "key": "k2"}])
    problems = load_problem_file(path, problem_field="q", answer_field="a", id_field="key")
    assert [(p.id, p.problem, p.answer, p.source) for p in problems] == [
        ("mine-0", "1+1?", "2", "mine"),
        ("k2", "2+2?", "4", "mine"),
    ]


def test_malformed_rows_raise_with_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "ok", "answer": "1"}, "{not json", {"problem": "no answer"}, {"problem": "x", "answer": ""}],
    )
    with pytest.raises(MalformedRowError, match=r"bad\.jsonl:2: invalid JSON") as error:
        load_problem_file(path)
    assert error.value.line == 2 and "skip_malformed=True" in str(error.value)

    problems = load_problem_file(path, skip_malformed=True)
    assert len(problems) == 1 and problems.skipped == 3
    assert problems.skipped_rows[1].endswith("bad.jsonl:3: missing field 'answer' (row has ['problem'])")
    assert problems.skipped_rows[2].endswith("bad.jsonl:4: field 'answer' is empty")


def test_unsupported_suffix_missing_file_and_parquet_without_pyarrow(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_problem_file(tmp_path / "absent.jsonl")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.csv'"):
        load_problem_file(csv)
    parquet_file = tmp_path / "x.parquet"
    parquet_file.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pyarrow"):
            load_problem_file(parquet_file)


def test_deepmind_mathematics_line_pairs(tmp_path: Path) -> None:
    split = tmp_path / "train-easy"
    split.mkdir()
    (split / "arithmetic__add_or_sub.txt").write_text("What is 2 + 3?\n5\nCalculate 7 - 10.\n-3\n")
    (split / "numbers__gcd.txt").write_text("Find the gcd of 12 and 18.\n6\n")
    problems = load_deepmind_mathematics(tmp_path)
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("arithmetic__add_or_sub-0", "What is 2 + 3?", "5"),
        ("arithmetic__add_or_sub-1", "Calculate 7 - 10.", "-3"),
        ("numbers__gcd-0", "Find the gcd of 12 and 18.", "6"),
    ]
    assert problems.source == "deepmind_math/train-easy"
    assert len(load_deepmind_mathematics(tmp_path, modules=["numbers__gcd"])) == 1
    with pytest.raises(ValueError, match="modules \\['algebra__linear_1d'\\] not found"):
        load_deepmind_mathematics(tmp_path, modules=["algebra__linear_1d"])


def test_deepmind_odd_line_count_is_malformed(tmp_path: Path) -> None:
    split = tmp_path / "train-easy"
    split.mkdir()
    (split / "m.txt").write_text("Q1\n1\nQ2\n")
    with pytest.raises(MalformedRowError, match=r"m\.txt:3: odd number of lines"):
        load_deepmind_mathematics(tmp_path)
    problems = load_deepmind_mathematics(tmp_path, skip_malformed=True)
    assert len(problems) == 1 and problems.skipped == 1
    with pytest.raises(FileNotFoundError, match=r"mathematics_dataset-v1\.0"):
        load_deepmind_mathematics(tmp_path, split="interpolate")
