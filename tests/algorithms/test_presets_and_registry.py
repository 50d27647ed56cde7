"""Presets reproduce the paper's configurations (Table 1 / Appendix D, written out by hand); the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dispo.algorithms import PolicyLossConfig, get_preset, preset_names, register_policy_loss
from megatron_dispo.algorithms.registry import POLICY_LOSSES, get_policy_loss

NUM_GPUS = 0
ROOT = Path(__file__).resolve().parents[2]

# name: (loss_type, eps_low_pos, eps_high_pos, eps_low_neg, eps_high_neg, eps_low, eps_high)
# "-" fields the loss ignores keep the PolicyLossConfig defaults (0.2, 10, 1, 100 | 0.2, 0.28).
EXPECTED = {
    "dispo": ("dispo", 0.2, 10.0, 1.0, 100.0, 0.2, 0.28),
    "dispo_no_regime3": ("dispo", 0.2, 10.0, 1.0, 0.0, 0.2, 0.28),
    "dispo_no_regime4": ("dispo", 0.2, 10.0, 0.0, 100.0, 0.2, 0.28),
    "online_sft": ("online_sft", 0.0, 0.0, 1.0, 100.0, 0.2, 0.28),
    "regime1_eps0.28": ("online_sft", 0.0, 0.28, 1.0, 100.0, 0.2, 0.28),
    "regime1_eps10": ("online_sft", 0.0, 10.0, 1.0, 100.0, 0.2, 0.28),
    "regime2_eps0.2": ("online_sft", 0.2, 0.0, 1.0, 100.0, 0.2, 0.28),
    "regime2_eps1": ("online_sft", 1.0, 0.0, 1.0, 100.0, 0.2, 0.28),
    "regime12": ("online_sft", 0.2, 10.0, 1.0, 100.0, 0.2, 0.28),
    "cispo": ("cispo", 0.2, 10.0, 1.0, 100.0, 1.0, 100.0),
    "dapo": ("dapo", 0.2, 10.0, 1.0, 100.0, 0.2, 0.28),
    "grpo": ("grpo", 0.2, 10.0, 1.0, 100.0, 0.2, 0.2),
    "reinforce": ("reinforce", 0.2, 10.0, 1.0, 100.0, 0.2, 0.28),
    "gspo": ("gspo", 0.2, 10.0, 1.0, 100.0, 3e-4, 4e-4),
    "sspo": ("sspo", 0.2, 10.0, 1.0, 100.0, 0.2, 0.28),
}


def test_presets_reproduce_the_paper_table_exactly() -> None:
    assert preset_names() == list(EXPECTED)
    for name, (loss_type, *eps) in EXPECTED.items():
        config = get_preset(name)
        got = (
            config.eps_low_pos,
            config.eps_high_pos,
            config.eps_low_neg,
            config.eps_high_neg,
            config.eps_low,
            config.eps_high,
        )
        assert config.loss_type == loss_type, name
        assert got == tuple(eps), name
        assert config.condition_on == "advantage_sign" and config.aggregation == "default", name


def test_default_config_is_the_paper_dispo() -> None:
    assert PolicyLossConfig() == get_preset("dispo")


def test_get_preset_overrides_and_unknown_names() -> None:
    assert get_preset("dispo", eps_high_neg=5.0).eps_high_neg == 5.0
    with pytest.raises(ValueError, match=r"unknown loss preset 'dipso'; use one of \['dispo', 'dispo_no_regime3'"):
        get_preset("dipso")
    with pytest.raises(ValueError, match="eps_low_neg=-1"):
        get_preset("dispo", eps_low_neg=-1.0)


def test_registry_rejects_duplicates_and_lists_names_for_unknown() -> None:
    assert set(POLICY_LOSSES) >= {"dispo", "cispo", "dapo", "grpo", "reinforce", "online_sft", "gspo", "sspo"}
    with pytest.raises(ValueError, match="policy loss 'dispo' is already registered by"):
        register_policy_loss("dispo", aggregation="token_mean")(lambda inputs, config: None)
    with pytest.raises(ValueError, match=r"loss_type='ppo' is not a registered policy loss; use one of \['cispo'"):
        get_policy_loss("ppo")
    with pytest.raises(ValueError, match=r"loss_type='ppo' is not a registered policy loss"):
        PolicyLossConfig(loss_type="ppo")


def test_a_registered_loss_is_selectable_by_name() -> None:
    name = "test_plain_pg"

    @register_policy_loss(name, aggregation="token_mean")
    def plain_policy_gradient(inputs, config):  # l = -A * logprobs: the on-policy REINFORCE estimator
        from megatron_dispo.algorithms.loss_contract import LossTerms

        weight = torch.ones_like(inputs.logprobs)
        clipped = torch.zeros_like(weight, dtype=torch.bool)
        return LossTerms(-inputs.advantages * inputs.logprobs, weight, clipped, inputs.log_ratio.detach())

    try:
        from megatron_dispo.algorithms import compute_policy_loss

        logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        loss, _ = compute_policy_loss(
            logprobs, torch.zeros(1, 2), torch.tensor([0.5]), torch.ones(1, 2), PolicyLossConfig(loss_type=name)
        )
        assert loss.item() == pytest.approx(-0.5 * (-3.0) / 2)  # -(A * sum lp) / N
    finally:
        del POLICY_LOSSES[name]


def test_a_fresh_import_of_the_config_module_sees_the_builtin_losses() -> None:
    """The registry imports no loss module (imports point one way); the package __init__ registers the built-ins, so
    importing only `loss_config` in a new interpreter still validates every built-in name."""
    probe = (
        "from megatron_dispo.algorithms.loss_config import PolicyLossConfig\n"
        "from megatron_dispo.algorithms.registry import registered_loss_names\n"
        "PolicyLossConfig(loss_type='sspo')\n"
        "print(' '.join(registered_loss_names()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cispo", "dapo", "dispo", "grpo", "gspo", "online_sft", "reinforce", "sspo"]
