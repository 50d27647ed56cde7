"""Chained arithmetic with a written chain of thought: the longer-response CPU task of issue 25.

A problem chains 3-5 operations on integers ("Start with 47. Add 18, then multiply by 3, then subtract 25, then
divide by 5. What is the final number?"); its reference response works through one line per operation and ends with
the answer in ``\\boxed{}``:

    Step 1: add 18: 47 + 18 = 65.
    Step 2: multiply by 3: 65 * 3 = 195.
    ...
    So the final number is \\boxed{34}.

About 80-130 tokens with the tiny tokenizer (one token per digit), against 10-15 for `synthetic.py`'s one-line
answers. DISPO's Regime 3 and 4 failures (repetition, vanishing lengths; Sec. 4) need responses long enough to repeat
themselves or shrink, which a 14-token answer is not. Every value is a non-negative integer: subtraction never goes
below 0, division uses exact divisors only, multiplication stays under `max_value`. Same seed, same problems.

The statement is a pure function of the chain and `parse_chain` is its inverse, so the reference response of any
`Problem` of this source can be rebuilt from the problem alone (`chain_of_thought`, used by the SFT warm-up).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from megatron_dispo.data.problem import Problem, ProblemSet

CHAIN_SOURCE = "synthetic/chained_arithmetic"
"""`Problem.source` of this task's problems."""

ChainOperation = Literal["+", "-", "*", "/"]
_PHRASES: dict[str, str] = {"+": "add", "-": "subtract", "*": "multiply by", "/": "divide by"}
_OPERATION_OF_PHRASE: dict[str, ChainOperation] = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}
_STATEMENT = re.compile(r"Start with (\d+)\. (.+)\. What is the final number\?")
_STEP = re.compile(r"(add|subtract|multiply by|divide by) (\d+)")


@dataclass(frozen=True)
class ChainStep:
    """One operation of the chain: the running value `operation` `operand`."""

    operation: ChainOperation
    operand: int


@dataclass(frozen=True)
class ChainDifficulty:
    """How long the chains are and how large their numbers get."""

    min_steps: int = 3
    """Fewest operations per problem."""
    max_steps: int = 5
    """Most operations per problem (drawn uniformly in [min_steps, max_steps])."""
    max_operand: int = 99
    """Largest start value and add / subtract operand; multiply and divide use 2..9."""
    max_value: int = 9999
    """No running value exceeds this (a multiplication that would is not drawn)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= 8:
            raise ValueError(
                f"min_steps={self.min_steps}, max_steps={self.max_steps} must satisfy 1 <= min_steps <= max_steps "
                "<= 8 (8 steps already give ~200-token responses)."
            )
        if self.max_value < 10:
            raise ValueError(f"max_value={self.max_value} must be >= 10 (room for the operations), e.g. 999.")
        if not 2 <= self.max_operand <= self.max_value:
            raise ValueError(f"max_operand={self.max_operand} must be in 2..max_value ({self.max_value}).")


CHAIN_LEVELS: dict[int, ChainDifficulty] = {
    1: ChainDifficulty(min_steps=3, max_steps=5, max_operand=20, max_value=999),
    2: ChainDifficulty(min_steps=3, max_steps=5, max_operand=99, max_value=9999),
}
"""Difficulty presets, easiest first (`DataSourceConfig.difficulty` picks one)."""


@dataclass(frozen=True)
class ArithmeticChain:
    """A start value and the operations applied to it in order."""

    start: int
    steps: tuple[ChainStep, ...]

    def values(self) -> list[int]:
        """The running value before the first step and after each step (exact integer arithmetic)."""
        values = [self.start]
        for step in self.steps:
            value = values[-1]
            if step.operation == "+":
                values.append(value + step.operand)
            elif step.operation == "-":
                values.append(value - step.operand)
            elif step.operation == "*":
                values.append(value * step.operand)
            else:
                if step.operand == 0 or value % step.operand:
                    raise ValueError(f"{value} / {step.operand} is not an exact division; the chain is malformed.")
                values.append(value // step.operand)
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def statement(self) -> str:
        """The problem text; `parse_chain` inverts it."""
        phrases = [f"{_PHRASES[step.operation]} {step.operand}" for step in self.steps]
        operations = ", then ".join(phrases)
        return f"Start with {self.start}. {operations[0].upper()}{operations[1:]}. What is the final number?"

    def chain_of_thought(self) -> str:
        """The reference response: one line per operation, then the answer in \\boxed{} (math-verify reads it)."""
        values = self.values()
        lines = [
            f"Step {index}: {_PHRASES[step.operation]} {step.operand}: "
            f"{values[index - 1]} {step.operation} {step.operand} = {values[index]}."
            for index, step in enumerate(self.steps, start=1)
        ]
        return "\n".join([*lines, f"So the final number is \\boxed{{{values[-1]}}}."])


def parse_chain(statement: str) -> ArithmeticChain:
    """The chain a `statement()` text describes; ValueError for any other text."""
    match = _STATEMENT.fullmatch(statement.strip())
    if match is None:
        raise ValueError(f"{statement!r} is not a chained-arithmetic problem ('Start with N. Add a, then ...').")
    phrases = match.group(2).split(", then ")
    steps = []
    for index, phrase in enumerate(phrases):
        text = phrase[0].lower() + phrase[1:] if index == 0 else phrase
        step = _STEP.fullmatch(text)
        if step is None:
            raise ValueError(f"step {index + 1} of {statement!r} ({phrase!r}) is not 'add|subtract|... N'.")
        steps.append(ChainStep(_OPERATION_OF_PHRASE[step.group(1)], int(step.group(2))))
    return ArithmeticChain(int(match.group(1)), tuple(steps))


def random_chain(rng: random.Random, difficulty: ChainDifficulty) -> ArithmeticChain:
    """One chain whose every running value is a non-negative integer <= `difficulty.max_value`."""
    value = rng.randint(2, difficulty.max_operand)
    start = value
    steps = []
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        headroom = difficulty.max_value - value
        allowed: list[ChainOperation] = []
        if headroom >= 2:
            allowed.append("+")
        if value >= 2:
            allowed += ["-", "*"] if value * 2 <= difficulty.max_value else ["-"]
        divisors = [d for d in range(2, 10) if value % d == 0] if value > 0 else []
        if divisors:
            allowed.append("/")
        operation = rng.choice(allowed)  # never empty: value < 2 leaves headroom >= 8 (max_value >= 10)
        if operation == "+":
            operand = rng.randint(2, min(difficulty.max_operand, headroom))
        elif operation == "-":
            operand = rng.randint(1, min(difficulty.max_operand, value))
        elif operation == "*":
            operand = rng.randint(2, min(9, difficulty.max_value // value))
        else:
            operand = rng.choice(divisors)
        steps.append(ChainStep(operation, operand))
        value = ArithmeticChain(value, (steps[-1],)).answer
    return ArithmeticChain(start, tuple(steps))


def generate_chained_arithmetic(
    num_problems: int, difficulty: ChainDifficulty | int = 1, *, seed: int = 0
) -> ProblemSet:
    """`num_problems` chained-arithmetic problems with integer answers; same seed, same problems."""
    if num_problems < 0:
        raise ValueError(f"num_problems={num_problems} must be >= 0.")
    if isinstance(difficulty, int):
        if difficulty not in CHAIN_LEVELS:
            raise ValueError(
                f"chained-arithmetic level {difficulty} is not defined; use one of {sorted(CHAIN_LEVELS)}."
            )
        level_name = f"L{difficulty}"
        difficulty = CHAIN_LEVELS[difficulty]
    else:
        level_name = f"s{difficulty.min_steps}-{difficulty.max_steps}v{difficulty.max_value}"
    rng = random.Random(f"chained-arithmetic:{seed}:{difficulty}")
    problems = []
    for index in range(num_problems):
        chain = random_chain(rng, difficulty)
        problems.append(
            Problem(
                id=f"chain-{level_name}-{seed}-{index}",
                problem=chain.statement(),
                answer=str(chain.answer),
                source=CHAIN_SOURCE,
            )
        )
    return ProblemSet(problems=problems, source=CHAIN_SOURCE)


def chain_of_thought(problem: Problem) -> str:
    """The reference response of a problem of this source (the SFT warm-up's target); ValueError when the problem is
    not a chained-arithmetic problem or its answer does not match its statement."""
    chain = parse_chain(problem.problem)
    if str(chain.answer) != problem.answer.strip():
        raise ValueError(
            f"problem {problem.id!r}: its statement evaluates to {chain.answer} but its answer is {problem.answer!r}."
        )
    return chain.chain_of_thought()
