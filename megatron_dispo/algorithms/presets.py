"""Every loss configuration of the DISPO paper (arXiv 2602.00983), selectable by name from configs.

How the Table 1 / Appendix D ablation rows map to the four bounds. Online SFT learns only from correct responses
with IS weight 1, i.e. loss `online_sft` with eps_low_pos = eps_high_pos = 0 (eps = 0 clips the weight to exactly 1
on that side, which switches the regime off). "+Regime 1" lets the weight of correct tokens rise above 1 up to
1 + eps_high_pos; "+Regime 2" lets it fall below 1 down to 1 - eps_low_pos; "Regimes 1+2" opens both, with DISPO's
values (0.2, 10). Incorrect responses are still dropped in these rows: regimes 3 and 4 only exist in the full loss.
"DISPO w/o Regime 3" is DISPO with eps_high_neg = 0, "w/o Regime 4" DISPO with eps_low_neg = 0.
The values were taken from the issue text (the paper's Table 1 body could not be retrieved here).

    name                 loss        eps_low_pos eps_high_pos eps_low_neg eps_high_neg eps_low eps_high
    dispo                dispo       0.2         10           1           100          -       -
    dispo_no_regime3     dispo       0.2         10           1           0            -       -
    dispo_no_regime4     dispo       0.2         10           0           100          -       -
    online_sft           online_sft  0           0            -           -            -       -
    regime1_eps0.28      online_sft  0           0.28         -           -            -       -
    regime1_eps10        online_sft  0           10           -           -            -       -
    regime2_eps0.2       online_sft  0.2         0            -           -            -       -
    regime2_eps1         online_sft  1           0            -           -            -       -
    regime12             online_sft  0.2         10           -           -            -       -
    cispo                cispo       -           -            -           -            1       100
    dapo                 dapo        -           -            -           -            0.2     0.28
    grpo                 grpo        -           -            -           -            0.2     0.2
    reinforce            reinforce   -           -            -           -            -       -
    gspo                 gspo        -           -            -           -            3e-4    4e-4
    sspo                 sspo        -           -            -           -            0.2     0.28

("-": the loss ignores the field; it keeps its PolicyLossConfig default.)
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from megatron_dispo.algorithms.loss_config import PolicyLossConfig


def _dispo(**bounds: float) -> PolicyLossConfig:
    base = {"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 1.0, "eps_high_neg": 100.0}
    return PolicyLossConfig(loss_type="dispo", **{**base, **bounds})


def _online_sft(eps_low_pos: float, eps_high_pos: float) -> PolicyLossConfig:
    return PolicyLossConfig(loss_type="online_sft", eps_low_pos=eps_low_pos, eps_high_pos=eps_high_pos)


def _shared_pair(loss_type: str, eps_low: float, eps_high: float) -> PolicyLossConfig:
    return PolicyLossConfig(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high)


PRESETS: MappingProxyType[str, PolicyLossConfig] = MappingProxyType(
    {
        # DISPO (Eqs. 8-9) and its regime-removal ablations
        "dispo": _dispo(),
        "dispo_no_regime3": _dispo(eps_high_neg=0.0),
        "dispo_no_regime4": _dispo(eps_low_neg=0.0),
        # online SFT and the +Regime 1 / +Regime 2 ablations (correct responses only)
        "online_sft": _online_sft(0.0, 0.0),
        "regime1_eps0.28": _online_sft(0.0, 0.28),
        "regime1_eps10": _online_sft(0.0, 10.0),
        "regime2_eps0.2": _online_sft(0.2, 0.0),
        "regime2_eps1": _online_sft(1.0, 0.0),
        "regime12": _online_sft(0.2, 10.0),
        # baselines
        "cispo": _shared_pair("cispo", 1.0, 100.0),
        "dapo": _shared_pair("dapo", 0.2, 0.28),
        "grpo": _shared_pair("grpo", 0.2, 0.2),
        "reinforce": PolicyLossConfig(loss_type="reinforce"),
        "gspo": _shared_pair("gspo", 3e-4, 4e-4),
        "sspo": _shared_pair("sspo", 0.2, 0.28),
    }
)
"""Preset name -> config (read-only)."""


def preset_names() -> list[str]:
    """All preset names, in table order."""
    return list(PRESETS)


def get_preset(name: str, **overrides: object) -> PolicyLossConfig:
    """The named preset, optionally with fields overridden (validated again), e.g. get_preset('dispo',
    condition_on='correctness')."""
    if name not in PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; use one of {preset_names()}.")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
