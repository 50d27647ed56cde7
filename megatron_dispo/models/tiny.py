"""Deterministic tiny Qwen3 / Qwen3-MoE checkpoints and a small BPE tokenizer, for tests, benchmarks and the CPU demo.

Everything here is built offline and seeded, so two calls with the same arguments give byte-identical files. The
checkpoints are written in the Hugging Face hub format (per-expert MoE tensors, ``model.safetensors``), so they load
in transformers, vLLM and the project's Megatron bridge alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
TOKENIZER_VOCAB_SIZE = 1024
"""Total vocabulary of the tiny tokenizer, special tokens included."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen-style chat template: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""

_TOKENIZER_FORMAT_VERSION = 1
"""Bump when the trainer settings change; corpus changes are caught by the cache key's hash."""

_WORDS_TEXT = (
    "what is the value of find compute solve for if and then a an of in to by with from sum product difference "
    "quotient total each how many much more less than twice half number numbers integer integers positive negative "
    "remainder when divided let be equal equals answer final step think reason so therefore thus we have get "
    "first second third next last add subtract multiply divide apples books students cost dollars cents hours minutes "
    "days years area perimeter circle square triangle radius length width height probability ratio percent "
    "smallest largest prime factor even odd real root roots equation expression simplify evaluate put your within "
    "please the final is are was were has had there their it this that these those which who whose where why "
    "problem question user assistant system you helpful math expert function functions polynomial coefficient "
    "variable variables constant term terms degree sequence series arithmetic geometric digit digits divisor "
    "multiple multiples common greatest least fraction fractions decimal decimals point points line lines slope "
    "intercept angle angles degrees side sides vertex vertices edge edges face faces volume surface cube sphere "
    "cylinder cone rectangle pentagon hexagon polygon diagonal parallel perpendicular distance speed rate time "
    "train car walks runs buys sells pays earns saves spends gives takes shares splits friends class school "
    "teacher garden farmer eggs cookies marbles coins boxes bags pages week month day money price discount tax "
    "interest profit loss average mean median mode range set sets subset element elements count counting ways "
    "choose arrange order random chosen selected probability expected value maximum minimum possible impossible "
    "true false condition conditions satisfies satisfy given consider suppose assume note since because hence "
    "check verify result results correct wrong zero one two three four five six seven eight nine ten hundred "
    "thousand million solution solutions system systems matrix vector inequality inequalities absolute modulo "
    "base logarithm exponent power powers sqrt frac cdot times pi theta alpha beta"
)
_LATEX = ("\\frac{1}{2}", "\\sqrt{2}", "x^2", "\\cdot", "\\times", "\\pi", "$x$", "\\left(", "\\right)", "\\dfrac")


def _tokenizer_corpus(seed: int = 1234) -> Iterator[str]:
    """Synthetic math text (prompts, arithmetic, LaTeX, ``Answer:``, ``\\boxed{}``) that fixes the BPE merges."""
    rng = random.Random(seed)
    operators = ["+", "-", "*", "/"]
    vocabulary = _WORDS_TEXT.split()
    for _ in range(4000):
        a, b = rng.randint(0, 999), rng.randint(1, 999)
        op = rng.choice(operators)
        words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 14)))
        words = words[0].upper() + words[1:]
        latex = rng.choice(_LATEX)
        yield f"{words}? What is ({a} {op} {b})?\n"
        answer = rng.randint(-999, 9999)
        yield f"We have {a} {op} {b} = x, so x = ({a}{op}{b}) and {latex}.\nAnswer: \\boxed{{{answer}}}\n"
        yield f"{IM_START}user\nSolve {a}*x + {b} = {a + b}. Put the final answer within \\boxed{{}}.{IM_END}\n"
        yield f"{IM_START}assistant\nThe answer is \\boxed{{{rng.randint(0, 99)}}}.{IM_END}\n{ENDOFTEXT}"


def _default_cache_root() -> Path:
    base = os.environ.get("MEGATRON_DISPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_dispo")
    return Path(base)


def _train_tokenizer_json() -> str:
    """Train the byte-level BPE and return its ``tokenizer.json`` text (deterministic: fixed corpus, one order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Qwen splits digits one by one; byte-level keeps every string encodable (no unknown token).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_tokenizer_corpus()), trainer=trainer)
    return tokenizer.to_str()


def _wrap_tokenizer(tokenizer_file: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The project's tiny byte-level BPE tokenizer (1024 tokens) with a Qwen-style chat template.

    Trained once and cached under ``$MEGATRON_DISPO_CACHE`` (default ``~/.cache/megatron_dispo``); with ``out_dir``
    the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) are also saved there.
    """
    corpus_hash = hashlib.sha256("".join(_tokenizer_corpus()).encode()).hexdigest()[:12]
    cache_dir = _default_cache_root() / f"tiny_tokenizer_v{_TOKENIZER_FORMAT_VERSION}_{corpus_hash}"
    tokenizer_file = cache_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"tokenizer.json.tmp{os.getpid()}"
        tmp.write_text(_train_tokenizer_json(), encoding="utf-8")
        os.replace(tmp, tokenizer_file)  # atomic: parallel test workers never see half a file
    tokenizer = _wrap_tokenizer(tokenizer_file)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_qwen3_config(*, moe: bool = False, vocab_size: int, **overrides: object) -> Qwen3Config | Qwen3MoeConfig:
    """Config of the tiny Qwen3 (dense) or Qwen3-MoE model.

    Head dim 32 (accepted by vLLM's CPU attention), 2 KV heads (divisible by TP=2), 4 experts (divisible by EP=2).
    ``overrides`` replace any field, e.g. ``hidden_size=512, num_hidden_layers=8`` for a ~25M-parameter model.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive; pass len(build_tiny_tokenizer()).")
    fields: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "max_position_embeddings": 1024,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if moe:
        fields |= {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001,
        }
    fields |= overrides
    return Qwen3MoeConfig(**fields) if moe else Qwen3Config(**fields)


def checkpoint_tensor_shapes(config: Qwen3Config | Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    """HF hub-format tensor names and shapes of a Qwen3 / Qwen3-MoE model (per-expert MoE weights), in a fixed order."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    is_moe = config.model_type == "qwen3_moe"
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.self_attn.q_norm.weight": (head_dim,),
            f"{prefix}.self_attn.k_norm.weight": (head_dim,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
        sparse = (
            is_moe
            and layer not in config.mlp_only_layers
            and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0
        )
        if sparse:
            inter = config.moe_intermediate_size
            shapes[f"{prefix}.mlp.gate.weight"] = (config.num_experts, hidden)
            for expert in range(config.num_experts):
                shapes |= {
                    f"{prefix}.mlp.experts.{expert}.gate_proj.weight": (inter, hidden),
                    f"{prefix}.mlp.experts.{expert}.up_proj.weight": (inter, hidden),
                    f"{prefix}.mlp.experts.{expert}.down_proj.weight": (hidden, inter),
                }
        else:
            inter = config.intermediate_size
            shapes |= {
                f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
                f"{prefix}.mlp.up_proj.weight": (inter, hidden),
                f"{prefix}.mlp.down_proj.weight": (hidden, inter),
            }
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def random_tiny_state_dict(
    config: Qwen3Config | Qwen3MoeConfig,
    *,
    seed: int,
    init_std: float = 0.1,
    head_std: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Seeded random weights in HF hub format: norms at 1, matrices N(0, init_std^2), ``lm_head`` N(0, head_std^2).

    HF's 0.02 would give near-uniform next-token distributions at hidden size 128 (entropy ~ log V); with
    ``head_std=0.3`` the logits have std ~3.4, so distributions are peaked, greedy decoding is decisive and sampled
    log-probs are informative.
    """
    if init_std <= 0 or head_std <= 0:
        raise ValueError(f"init_std={init_std} and head_std={head_std} must be positive (defaults 0.1 and 0.3).")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            std = head_std if name == "lm_head.weight" else init_std
            tensor = torch.randn(shape, generator=generator) * std
        state[name] = tensor.to(dtype).contiguous()
    return state


def make_cycling(
    state: dict[str, torch.Tensor], config: Qwen3Config | Qwen3MoeConfig, *, period: int, seed: int
) -> dict[str, torch.Tensor]:
    """Rewrite random weights so the model's likeliest next token is ``cycle(current token)``: a model that loops.

    Tokens ``n_special..V-1`` are split into cycles of ``period`` tokens (seeded shuffle); ``lm_head`` row ``j`` is
    the (normalised) embedding of ``j``'s predecessor and the layers' output projections are scaled down 100x, so
    the residual stream stays close to the current token's embedding. Greedy decoding then repeats a ``period``-token
    cycle forever, which is what repetition truncation must catch. Special tokens (ids < 3) are never predicted.
    """
    if period < 1:
        raise ValueError(f"loop_period={period} must be >= 1 (the length of the repeated token cycle).")
    vocab = config.vocab_size
    n_special = len(SPECIAL_TOKENS)
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(vocab - n_special, generator=generator) + n_special
    successor = torch.arange(vocab)
    for begin in range(0, len(order), period):
        cycle = order[begin : begin + period]
        successor[cycle] = torch.roll(cycle, -1)
    successor[:n_special] = order[:n_special]
    dtype = state["model.embed_tokens.weight"].dtype
    embed = torch.randn(vocab, config.hidden_size, generator=generator)
    unit = embed / embed.norm(dim=-1, keepdim=True)
    head = torch.zeros_like(embed)
    head[successor] = unit  # logit_j = <h, unit[pred(j)]>: largest for j = successor(current)
    head[:n_special] = -unit[:n_special]
    state = dict(state)
    state["model.embed_tokens.weight"] = embed.to(dtype).contiguous()
    state["lm_head.weight"] = head.to(dtype).contiguous()
    for name, tensor in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = (tensor.float() * 0.01).to(dtype).contiguous()
    return state


def make_tiny_checkpoint(
    out_dir: Path,
    *,
    moe: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.1,
    loop_period: int | None = None,
    **config_overrides: object,
) -> Path:
    """Write a tiny Qwen3 (or Qwen3-MoE with ``moe=True``) checkpoint with the tiny tokenizer; return ``out_dir``.

    Files: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files. Same arguments
    give byte-identical files. ``config_overrides`` go to :func:`tiny_qwen3_config`. With ``loop_period`` the weights
    are rewritten by :func:`make_cycling` so that greedy decoding loops with that period.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    fields: dict[str, object] = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    config = tiny_qwen3_config(moe=moe, vocab_size=len(tokenizer), **(fields | config_overrides))
    config.dtype = dtype
    config.architectures = ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"]  # vLLM picks the model class by it
    config.to_json_file(str(out_dir / "config.json"), use_diff=False)
    state = random_tiny_state_dict(config, seed=seed, init_std=init_std, dtype=dtype)
    if loop_period is not None:
        state = make_cycling(state, config, period=loop_period, seed=seed)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": eos_id, "eos_token_id": [eos_id, im_end_id], "pad_token_id": eos_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return out_dir


def checkpoint_digest(path: Path) -> str:
    """SHA-256 over the checkpoint's weight and config files (to compare two checkpoints cheaply)."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()
