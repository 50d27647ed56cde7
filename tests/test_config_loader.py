"""config_loader: YAML + dotted overrides into frozen dataclasses, with errors that name the dotted field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from megatron_dispo.config_loader import ConfigError, apply_overrides, from_dict, load_config, parse_override, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["token_mean", "seq_mean"] = "token_mean"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0; try 1e-6.")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = 10
    run_dir: Path | None = None
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()


def test_nested_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: demo\ninner:\n  lr: 1e-5\n  betas: [0.8, 0.9]\ntags: [a, b]\n")
    cfg = load_config(Outer, cfg_file, ["inner.mode=seq_mean", "steps=3", "run_dir=/tmp/x"])
    assert cfg == Outer(
        name="demo", steps=3, run_dir=Path("/tmp/x"), inner=Inner(1e-5, (0.8, 0.9), "seq_mean"), tags=("a", "b")
    )
    # YAML 1.1 reads 1e-5 without a dot as a string: it must still become the float 1e-5
    assert isinstance(cfg.inner.lr, float) and cfg.inner.lr == 1e-5
    assert to_dict(cfg)["inner"] == {"lr": 1e-5, "betas": [0.8, 0.9], "mode": "seq_mean"}


def test_round_trip_through_to_dict():
    cfg = Outer(name="x", inner=Inner(lr=3e-6))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.lrr=1"], "unknown config field 'inner.lrr' in Inner. Did you mean 'lr'?"),
        (["inner.mode=sum"], "inner.mode='sum' is not allowed; choose one of ['token_mean', 'seq_mean']"),
        (["steps=2.5"], "steps must be an integer, got 2.5"),
        (["steps=true"], "steps must be an integer, got True"),
        (["inner.betas=[0.9]"], "inner.betas must have 2 items, got 1"),
        (["inner.lr=-1"], "inner: lr=-1.0 must be > 0; try 1e-6."),
        (["name.sub=1"], "name must be a string, got dict {'sub': 1}"),
        (["steps"], "must look like section.field=value"),
    ],
)
def test_errors_name_the_dotted_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, overrides)
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping at top level, got list"):
        load_config(Outer, bad)


def test_override_values_are_parsed_as_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=x"]) == {"a": {"b": 1, "c": 2}, "d": {"e": "x"}}
    with pytest.raises(ConfigError, match=r"override 'a.b.c=1': a.b is a value, not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=1"])


def test_base_files_are_overlaid(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 5\ninner:\n  lr: 2e-6\n  mode: seq_mean\ntags: [x]\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ninner:\n  lr: 3e-6\ntags: [y, z]\n")
    cfg = load_config(Outer, tmp_path / "child.yaml")
    assert cfg == Outer(name="base", steps=5, inner=Inner(lr=3e-6, mode="seq_mean"), tags=("y", "z"))


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other in a cycle"):
        load_config(Outer, tmp_path / "a.yaml")
