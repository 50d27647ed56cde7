"""Fixtures for the rewards tests: the shared verifier pool is warmed once per session."""

from __future__ import annotations

import pytest

from megatron_dispo.rewards import VerifierPool, get_default_pool


@pytest.fixture(scope="session")
def shared_pool() -> VerifierPool:
    pool = get_default_pool()
    pool.wait_ready()
    return pool
