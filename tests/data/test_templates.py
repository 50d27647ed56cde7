"""Prompt templates (paper Figs. 9 and 10) and their rendering through a real chat template."""

from __future__ import annotations

import pytest

from megatron_dispo.data import (
    BENCHMARK_TEMPLATES,
    DAPO_TEMPLATE,
    QWEN3_BOXED_TEMPLATE,
    apply_template,
    encode_prompt,
    render_prompt,
)

PROBLEM = "Find $x$ if $\\{x\\} = \\frac{1}{2}$."


def test_dapo_template_text() -> None:
    expected = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "Find $x$ if $\\{x\\} = \\frac{1}{2}$.\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    assert apply_template(PROBLEM, "dapo") == expected
    assert DAPO_TEMPLATE.count("{problem}") == 1


def test_qwen3_boxed_template_text() -> None:
    expected = (
        "Find $x$ if $\\{x\\} = \\frac{1}{2}$.\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert apply_template(PROBLEM, "qwen3_boxed") == expected
    assert QWEN3_BOXED_TEMPLATE.endswith("within \\boxed{}.")


def test_benchmarks_use_the_paper_templates() -> None:
    assert {name: BENCHMARK_TEMPLATES[name] for name in ("aime24", "aime25", "amc23")} == dict.fromkeys(
        ("aime24", "aime25", "amc23"), "dapo"
    )
    assert BENCHMARK_TEMPLATES["math500"] == BENCHMARK_TEMPLATES["minerva"] == "qwen3_boxed"


def test_unknown_template_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="template='cot'"):
        apply_template(PROBLEM, "cot")


class _PlainTokenizer:
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_render_without_chat_template_is_the_raw_message() -> None:
    assert render_prompt(PROBLEM, "qwen3_boxed", _PlainTokenizer()) == apply_template(PROBLEM, "qwen3_boxed")
    assert render_prompt(PROBLEM, "dapo", None) == apply_template(PROBLEM, "dapo")


def test_render_and_encode_through_the_qwen3_chat_template(qwen_hf_tokenizer) -> None:
    message = apply_template("What is 2 + 3?", "dapo")
    text = render_prompt("What is 2 + 3?", "dapo", qwen_hf_tokenizer)
    assert text == f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt("What is 2 + 3?", "dapo", qwen_hf_tokenizer)
    assert ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n
    assert qwen_hf_tokenizer.decode(ids) == text
