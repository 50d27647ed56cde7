"""tools/build_qwen_tokenizer.py reproduces published Qwen2/Qwen3 token ids.

References: ids published with the Qwen tokenizer (hand-copied constants below) and tiktoken's own Rust BPE run
on the same qwen.tiktoken ranks (an independent implementation of the same encoding).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

from megatron_dispo.data import load_math500

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

KNOWN_IDS = {
    "Hello, world!": [9707, 11, 1879, 0],
    "user": [872],
    "assistant": [77091],
    "\n": [198],
    "hi": [6023],
}
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<think>": 151667,
    "</think>": 151668,
}


def _tiktoken_reference():
    tiktoken = pytest.importorskip("tiktoken")
    spec = importlib.util.find_spec("dashscope")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="qwen-reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_known_ids_and_special_tokens(qwen_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text).ids == ids, text
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.token_to_id(token) == token_id
    assert tokenizer.get_vocab_size() == 151669
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids == [151644, 872, 198, 6023, 151645]


def test_matches_tiktoken_on_math_text(qwen_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    reference = _tiktoken_reference()
    texts = [
        *[problem.problem for problem in load_math500()][:200],
        "  leading spaces and trailing   ",
        "Tabs\tand\nnew\n\nlines\r\n",
        "数学题：计算 12345 + 678。",
        "emoji 🙂 and accents: café naïve",
        "x^2 + 2x + 1 = (x+1)^2, \\frac{1}{2} \\boxed{42}",
        "I'm, you're, they'LL, it's",
    ]
    for text in texts:
        ours = tokenizer.encode(text).ids
        assert ours == reference.encode_ordinary(text), text[:80]
        assert tokenizer.decode(ours) == text


def test_transformers_loads_it_with_the_qwen3_chat_template(qwen_hf_tokenizer) -> None:
    tokenizer = qwen_hf_tokenizer
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
