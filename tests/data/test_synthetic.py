"""Synthetic arithmetic: exact answers (checked by an independent evaluator), difficulty, determinism."""

from __future__ import annotations

import ast
import operator

import pytest

from megatron_dispo.data import LEVELS, ArithmeticDifficulty, generate_arithmetic

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    """Evaluate +, -, *, / over integers; / must be exact (a Fraction check would also do)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div):
            assert right != 0 and left % right == 0, f"inexact division {left} / {right}"
            return left // right
        return _OPS[type(node.op)](left, right)
    raise AssertionError(f"unexpected node {ast.dump(node)}")


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_are_exact(level: int) -> None:
    for problem in generate_arithmetic(200, level, seed=3):
        expression = problem.problem.removeprefix("What is ").removesuffix("?")
        assert int(problem.answer) == _evaluate(ast.parse(expression, mode="eval").body), problem


def test_level_one_is_one_digit_addition() -> None:
    problems = generate_arithmetic(300, 1, seed=0)
    for problem in problems:
        left, right = problem.problem.removeprefix("What is ").removesuffix("?").split(" + ")
        assert 0 <= int(left) <= 9 and 0 <= int(right) <= 9
        assert 0 <= int(problem.answer) <= 18


def test_non_negative_unless_allowed_and_steps_control_length() -> None:
    for level in (2, 3, 4, 5, 6):
        assert all(int(p.answer) >= 0 for p in generate_arithmetic(200, level, seed=1))
    three_steps = generate_arithmetic(20, ArithmeticDifficulty(digits=1, operations=("+",), steps=3), seed=0)
    assert all(p.problem.count("+") == 3 for p in three_steps)


def test_same_seed_same_problems_and_ids_are_unique() -> None:
    first, again, other = (generate_arithmetic(50, 5, seed=s) for s in (7, 7, 8))
    assert first.problems == again.problems
    assert first.problems != other.problems
    assert len(first.by_id()) == 50


def test_difficulty_validation() -> None:
    with pytest.raises(ValueError, match="operations=\\('%',\\)"):
        ArithmeticDifficulty(operations=("%",))
    with pytest.raises(ValueError, match="digits=0"):
        ArithmeticDifficulty(digits=0)
    with pytest.raises(ValueError, match="difficulty level 99"):
        generate_arithmetic(1, 99)
