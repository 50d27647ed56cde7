"""Every shipped config loads and validates; layout and batch mistakes fail at start-up with the field named."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_dispo.config import load_run_config
from megatron_dispo.config_loader import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
SHIPPED = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "paper_base.yaml")
# Qwen3-30B-A3B's real architecture numbers (HF config.json): 32 heads, 4 KV heads, 128 experts
QWEN3_30B_A3B = SimpleNamespace(num_attention_heads=32, num_key_value_heads=4, num_experts=128)


def test_all_recipes_and_ablations_are_shipped():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED}
    assert {"qwen3_8b_dispo.yaml", "qwen3_14b_dispo.yaml", "qwen3_30b_a3b_dispo.yaml", "tiny_cpu_dispo.yaml"} <= names
    assert {"qwen3_14b_cispo.yaml", "qwen3_14b_dapo.yaml"} <= names
    ablations = {
        "online_sft", "regime1_eps0.28", "regime1_eps10", "regime2_eps0.2", "regime2_eps1", "regime12",
        "dispo_no_regime3", "dispo_no_regime4",
    }  # fmt: skip
    assert {f"ablations/{a}.yaml" for a in ablations} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_shipped_config_loads(path):
    config = load_run_config(path)
    assert config.trainer.prompts_per_step % config.trainer.num_minibatches == 0
    if path.parent.name == "ablations":
        assert config.algorithm.preset == path.stem  # each ablation file selects the preset it is named after
        assert config.algorithm.group_size == 16 and config.trainer.prompts_per_step == 512  # the paper's batch


def test_paper_batch_and_bounds():
    config = load_run_config(CONFIG_DIR / "qwen3_14b_dispo.yaml")
    loss = config.algorithm.loss
    assert (loss.eps_low_pos, loss.eps_high_pos, loss.eps_low_neg, loss.eps_high_neg) == (0.2, 10.0, 1.0, 100.0)
    assert (config.trainer.prompts_per_step, config.algorithm.group_size, config.trainer.num_minibatches) == (
        512,
        16,
        16,
    )
    assert (config.overlong.max_length, config.overlong.cache_length) == (20480, 4096)
    assert config.optim.lr == 1e-6 and config.optim.adam_eps == 1e-15


def test_30b_layout_fits_32_gpus_and_not_12():
    config = load_run_config(CONFIG_DIR / "qwen3_30b_a3b_dispo.yaml")
    config.validate_for_world(32, hf_config=QWEN3_30B_A3B)  # TP4 x EP32: 4 nodes of 8 GPUs
    with pytest.raises(ValueError, match=r"world_size \(12\) must be a multiple of expert_model_parallel_size \(32\)"):
        config.validate_for_world(12, hf_config=QWEN3_30B_A3B)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.group_size=1"], "group_size=1 must be >= 2"),
        (["trainer.prompts_per_step=30"], r"prompts_per_step \(30\) must be divisible by num_minibatches \(4\)"),
        (["algorithm.preset=dispo_v2"], "preset='dispo_v2' is not a loss preset"),
        (["algorithm.loss_overrides={eps_high_neg: -1}"], "eps_high_neg=-1.0"),
        (["rollout.max_new_tokens=200"], r"rollout.max_model_len \(256\) < data.max_prompt_tokens \(160\)"),
        (["trainer.max_step=3"], "unknown config field 'trainer.max_step' in TrainerConfig. Did you mean 'max_steps'?"),
        (["model.hf_path="], "model.hf_path is empty"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(CONFIG_DIR / "tiny_cpu_dispo.yaml", overrides)


def test_minibatch_must_split_over_data_parallel_ranks():
    config = load_run_config(
        CONFIG_DIR / "tiny_cpu_dispo.yaml", ["trainer.prompts_per_step=12", "trainer.num_minibatches=4"]
    )
    with pytest.raises(
        ConfigError, match=r"each mini-batch has 3 prompts .* does not split over 2 data-parallel ranks"
    ):
        config.validate_for_world(2)
