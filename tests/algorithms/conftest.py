"""`loss_path`: run a loss test once through the one-pass CPU kernel (fused_cpu.py) and once through eager torch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megatron_dispo.algorithms import fused_cpu


@pytest.fixture(params=["fused", "eager"])
def loss_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """dispo / cispo on CPU go through the kernel by default; 'eager' turns it off for the test. The 'fused' run fails
    when the kernel cannot be built here, so it never silently tests the eager path twice."""
    if request.param == "fused":
        assert fused_cpu.kernel() is not None, "the fused CPU loss kernel did not build; see the logged warning"
    else:
        monkeypatch.setattr(fused_cpu, "ENABLED", False)
    yield request.param
