"""Prompt templates of the paper and their rendering through a tokenizer's chat template.

- DAPO (paper Fig. 9, from DAPO-Math-17k): training and AIME/AMC evaluation; answer on a last ``Answer:`` line.
- Qwen3 boxed (paper Fig. 10): MATH-500 and Minerva evaluation; answer in ``\\boxed{}``.
"""

from __future__ import annotations

from typing import Any, Literal

TemplateName = Literal["dapo", "qwen3_boxed", "raw"]

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
QWEN3_BOXED_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
RAW_TEMPLATE = "{problem}"

TEMPLATES: dict[str, str] = {"dapo": DAPO_TEMPLATE, "qwen3_boxed": QWEN3_BOXED_TEMPLATE, "raw": RAW_TEMPLATE}
TEMPLATE_ANSWER_FORMAT: dict[str, str] = {"dapo": "dapo", "qwen3_boxed": "boxed", "raw": "auto"}
"""Where a response to each template states its answer (the `answer_format` of `rewards.verify_batch`)."""
BENCHMARK_TEMPLATES: dict[str, str] = {
    "aime24": "dapo",
    "aime25": "dapo",
    "amc23": "dapo",
    "math500": "qwen3_boxed",
    "minerva": "qwen3_boxed",
    "gsm8k": "dapo",
}
"""Template per evaluation benchmark (paper Appendix B)."""


def apply_template(problem: str, template: str = "dapo") -> str:
    """The user message: the template with the problem statement substituted (no chat formatting)."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is unknown; use one of {sorted(TEMPLATES)}.")
    # str.replace, not str.format: problem statements are full of LaTeX braces.
    return TEMPLATES[template].replace("{problem}", problem.strip())


def render_prompt(problem: str, template: str = "dapo", tokenizer: Any | None = None, **chat_kwargs: Any) -> str:
    """Prompt text for generation: through ``tokenizer.apply_chat_template`` when the tokenizer has a chat
    template (one user turn, ``add_generation_prompt=True``), else the raw user message.

    `chat_kwargs` go to the chat template (e.g. ``enable_thinking=False`` for Qwen3).
    """
    message = apply_template(problem, template)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True, **chat_kwargs
    )


def encode_prompt(problem: str, template: str, tokenizer: Any, **chat_kwargs: Any) -> list[int]:
    """Token ids of `render_prompt`; special tokens in the rendered chat text map to their ids."""
    text = render_prompt(problem, template, tokenizer, **chat_kwargs)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer.encode(text, add_special_tokens=not has_chat_template))
