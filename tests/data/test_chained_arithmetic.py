"""Chained arithmetic (issue 25's longer-response task): exact answers checked line by line by an independent
evaluator, 50-150-token chains of thought that math-verify reads, determinism, and the SFT warm-up's target."""

from __future__ import annotations

import operator
import re

import pytest
from math_verify import parse, verify

from megatron_dispo.config import DataSourceConfig
from megatron_dispo.data import (
    CHAIN_LEVELS,
    CHAIN_SOURCE,
    ChainDifficulty,
    Problem,
    chain_of_thought,
    generate_arithmetic,
    generate_chained_arithmetic,
)
from megatron_dispo.data.chained_arithmetic import ArithmeticChain, ChainStep, parse_chain
from megatron_dispo.models.tiny import build_tiny_tokenizer
from megatron_dispo.rewards import extract_answer
from megatron_dispo.trainer.data_setup import load_source
from megatron_dispo.trainer.warmup import worked_answer

NUM_GPUS = 0

_LINE = re.compile(r"Step (\d+): (?:add|subtract|multiply by|divide by) (\d+): (\d+) ([-+*/]) (\d+) = (\d+)\.")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def check_worked_lines(problem: Problem, text: str, max_value: int) -> int:
    """Recompute every line of the chain of thought; return the number of steps."""
    *lines, last = text.split("\n")
    start = int(re.match(r"Start with (\d+)\.", problem.problem).group(1))
    value = start
    for index, line in enumerate(lines, start=1):
        match = _LINE.fullmatch(line)
        assert match is not None, line
        number, phrase_operand, left, symbol, right, result = match.groups()
        assert (int(number), int(left), phrase_operand) == (index, value, right)
        if symbol == "/":
            assert int(left) % int(right) == 0, f"inexact division in {line!r}"
            expected = int(left) // int(right)
        else:
            expected = _APPLY[symbol](int(left), int(right))
        assert int(result) == expected and 0 <= expected <= max_value, line
        value = expected
    assert last == f"So the final number is \\boxed{{{value}}}."
    assert problem.answer == str(value)
    return len(lines)


@pytest.mark.parametrize("level", sorted(CHAIN_LEVELS))
def test_every_line_of_every_chain_is_exact_and_in_range(level: int) -> None:
    difficulty = CHAIN_LEVELS[level]
    problems = generate_chained_arithmetic(300, level, seed=3)
    steps = [check_worked_lines(p, chain_of_thought(p), difficulty.max_value) for p in problems]
    assert set(steps) == {3, 4, 5}
    operations = {step.operation for p in problems for step in parse_chain(p.problem).steps}
    assert operations == {"+", "-", "*", "/"}
    assert all(p.source == CHAIN_SOURCE for p in problems)
    assert len({p.id for p in problems}) == 300


def test_statement_and_chain_of_thought_by_hand() -> None:
    chain = ArithmeticChain(47, (ChainStep("+", 18), ChainStep("*", 3), ChainStep("-", 25), ChainStep("/", 5)))
    assert chain.values() == [47, 65, 195, 170, 34]
    statement = (
        "Start with 47. Add 18, then multiply by 3, then subtract 25, then divide by 5. What is the final number?"
    )
    assert chain.statement() == statement
    assert parse_chain(statement) == chain
    assert chain.chain_of_thought() == (
        "Step 1: add 18: 47 + 18 = 65.\n"
        "Step 2: multiply by 3: 65 * 3 = 195.\n"
        "Step 3: subtract 25: 195 - 25 = 170.\n"
        "Step 4: divide by 5: 170 / 5 = 34.\n"
        "So the final number is \\boxed{34}."
    )


def test_chains_of_thought_are_50_to_150_tiny_tokens_and_math_verify_reads_the_answer() -> None:
    tokenizer = build_tiny_tokenizer()
    for level in sorted(CHAIN_LEVELS):
        problems = generate_chained_arithmetic(200, level, seed=5)
        lengths = [len(tokenizer.encode(chain_of_thought(p), add_special_tokens=False)) for p in problems]
        assert min(lengths) >= 50 and max(lengths) <= 150, (level, min(lengths), max(lengths))
    for problem in problems[:20]:
        response = chain_of_thought(problem)
        assert extract_answer(response, "boxed") == problem.answer
        assert verify(parse(problem.answer), parse(response))


def test_same_seed_same_problems_other_seed_other_problems() -> None:
    first, again, other = (generate_chained_arithmetic(50, 2, seed=s) for s in (7, 7, 8))
    assert [p.problem for p in first] == [p.problem for p in again]
    assert [p.problem for p in first] != [p.problem for p in other]
    custom = ChainDifficulty(min_steps=4, max_steps=4, max_operand=9, max_value=99)
    assert {len(parse_chain(p.problem).steps) for p in generate_chained_arithmetic(30, custom, seed=0)} == {4}


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="is not a chained-arithmetic problem"):
        parse_chain("What is 3 + 4?")
    with pytest.raises(ValueError, match=r"step 2 of .* \('square it'\)"):
        parse_chain("Start with 3. Add 4, then square it. What is the final number?")
    wrong = Problem("x", "Start with 3. Add 4, then add 5. What is the final number?", "13", CHAIN_SOURCE)
    with pytest.raises(ValueError, match="problem 'x': its statement evaluates to 12 but its answer is '13'"):
        chain_of_thought(wrong)
    with pytest.raises(ValueError, match="level 9 is not defined"):
        generate_chained_arithmetic(1, 9)
    with pytest.raises(ValueError, match="min_steps=5, max_steps=3"):
        ChainDifficulty(min_steps=5, max_steps=3)


def test_config_source_and_warmup_target() -> None:
    problems = load_source(DataSourceConfig(kind="synthetic_chain", num_problems=5, difficulty=1, seed=4))
    assert [p.problem for p in problems] == [p.problem for p in generate_chained_arithmetic(5, 1, seed=4)]
    assert worked_answer(problems[0]) == chain_of_thought(problems[0])
    one_line = generate_arithmetic(1, 1, seed=0)[0]  # the other synthetic source keeps its one-line target
    assert worked_answer(one_line).endswith(f"Answer: {one_line.answer}")
