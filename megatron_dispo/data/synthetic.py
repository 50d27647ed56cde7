"""Synthetic arithmetic problems with exact integer answers and controllable difficulty.

Used by the CPU demo (a tiny model must be able to learn the easy levels: level 1 is one-digit addition) and by
tests. Every intermediate value is an integer: division only uses exact divisors, and subtraction never goes
below zero unless `allow_negative` is set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_dispo.data.problem import Problem, ProblemSet

OPERATIONS: tuple[str, ...] = ("+", "-", "*", "/")


@dataclass(frozen=True)
class ArithmeticDifficulty:
    """How hard the generated expressions are."""

    digits: int = 1
    """Maximum number of digits of each operand (operands are drawn uniformly from 0 .. 10**digits - 1)."""
    operations: tuple[str, ...] = ("+",)
    """Operations to draw from: any of "+", "-", "*", "/" (exact division)."""
    steps: int = 1
    """Binary operations chained left to right: 1 gives "a + b", 2 gives "(a + b) * c", ..."""
    allow_negative: bool = False
    """Allow subtraction to produce negative intermediate values."""

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits={self.digits} must be in 1..6 (answers should stay short integers).")
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(f"operations={self.operations} must be a non-empty subset of {OPERATIONS}.")
        if not 1 <= self.steps <= 8:
            raise ValueError(f"steps={self.steps} must be in 1..8.")


LEVELS: dict[int, ArithmeticDifficulty] = {
    1: ArithmeticDifficulty(digits=1, operations=("+",), steps=1),
    2: ArithmeticDifficulty(digits=1, operations=("+", "-"), steps=1),
    3: ArithmeticDifficulty(digits=2, operations=("+", "-"), steps=1),
    4: ArithmeticDifficulty(digits=1, operations=("+", "-", "*"), steps=2),
    5: ArithmeticDifficulty(digits=2, operations=("+", "-", "*"), steps=2),
    6: ArithmeticDifficulty(digits=2, operations=OPERATIONS, steps=3),
    7: ArithmeticDifficulty(digits=3, operations=OPERATIONS, steps=3, allow_negative=True),
}
"""Difficulty presets, easiest first; level 1 (one-digit addition) is learnable by a tiny model on CPU."""


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 10**digits - 1)


def arithmetic_expression(rng: random.Random, difficulty: ArithmeticDifficulty) -> tuple[str, int]:
    """One random expression and its exact value, chaining `difficulty.steps` operations left to right."""
    value = _operand(rng, difficulty.digits)
    text = str(value)
    for step in range(difficulty.steps):
        operation = rng.choice(difficulty.operations)
        operand = _operand(rng, difficulty.digits)
        if operation == "-" and not difficulty.allow_negative and operand > value:
            operand = rng.randint(0, value) if value > 0 else 0
        if operation == "/":
            limit = min(abs(value), 10**difficulty.digits - 1)
            divisors = [d for d in range(2, limit + 1) if value % d == 0] or [1]  # "/ 1" only for primes, 0, 1
            operand = rng.choice(divisors)
        if operation == "+":
            value += operand
        elif operation == "-":
            value -= operand
        elif operation == "*":
            value *= operand
        else:
            value //= operand  # exact: operand divides value
        left = f"({text})" if step > 0 else text
        text = f"{left} {operation} {operand}"
    return text, value


def generate_arithmetic(num_problems: int, difficulty: ArithmeticDifficulty | int = 1, *, seed: int = 0) -> ProblemSet:
    """`num_problems` problems "What is <expression>?" with integer answers; same seed, same problems."""
    if num_problems < 0:
        raise ValueError(f"num_problems={num_problems} must be >= 0.")
    if isinstance(difficulty, int):
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty level {difficulty} is not defined; use one of {sorted(LEVELS)}.")
        level_name = f"L{difficulty}"
        difficulty = LEVELS[difficulty]
    else:
        level_name = f"d{difficulty.digits}s{difficulty.steps}"
    rng = random.Random(f"synthetic-arithmetic:{seed}:{difficulty}")
    source = "synthetic/arithmetic"
    problems = []
    for index in range(num_problems):
        expression, value = arithmetic_expression(rng, difficulty)
        problems.append(
            Problem(
                id=f"arith-{level_name}-{seed}-{index}",
                problem=f"What is {expression}?",
                answer=str(value),
                source=source,
            )
        )
    return ProblemSet(problems=problems, source=source)
