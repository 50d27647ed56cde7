"""tools/dist_smoke.py: the all-reduced DDP step matches full-batch gradient descent computed here independently."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from .conftest import REPO_ROOT, VENV_BIN, free_port, launch_env, load_tool

NUM_GPUS = 0
STEP_LINE = re.compile(r"step (\d+) rank (\d+) world (\d+) loss ([0-9.]+) grad_err ([0-9.e+-]+)")


def reference_losses(dist_smoke, world: int, batch: int, features: int, lr: float, steps: int) -> list[float]:
    """Full-batch gradient descent on all ranks' data in float64 numpy: loss before each update."""
    shards = [dist_smoke.shard(rank, batch, features) for rank in range(world)]
    x = np.concatenate([s[0].numpy() for s in shards]).astype(np.float64)
    y = np.concatenate([s[1].numpy() for s in shards]).astype(np.float64)
    w = np.zeros(features)
    losses = []
    for _ in range(steps):
        residual = x @ w - y
        losses.append(float(np.mean(residual**2)))
        w = w - lr * (2.0 / len(y)) * (x.T @ residual)
    return losses


@pytest.mark.timeout(120)
def test_two_ranks_follow_full_batch_gradient_descent(tiny_config) -> None:
    dist_smoke = load_tool("dist_smoke")
    cmd = [
        str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
        "tools/dist_smoke.py", str(tiny_config), "trainer.max_steps=3", "--steps", "4", "--expect-env", "DISPO_TOKEN",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=REPO_ROOT, env=launch_env(DISPO_TOKEN="tok-42"), capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [m.groups() for m in STEP_LINE.finditer(result.stdout)]
    expected = reference_losses(dist_smoke, world=2, batch=16, features=8, lr=0.1, steps=4)
    for rank in ("0", "1"):
        losses = [float(loss) for step, r, world, loss, _ in steps if r == rank and world == "2"]
        np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=f"rank {rank}")
    assert max(float(err) for *_, err in steps) < 1e-5
    assert "env DISPO_TOKEN=tok-42" in result.stdout
    assert "overrides ['trainer.max_steps=3']" in result.stdout
    assert "dist_smoke: OK world=2 nodes=1 steps=4" in result.stdout


def test_rank_mismatches_are_reported() -> None:
    dist_smoke = load_tool("dist_smoke")

    def info(rank: int, node: int, sha: str, token: str | None) -> object:
        return dist_smoke.RankInfo(rank, rank % 2, 2, node, "host", sha, ("a=1",), (("TOKEN", token),))

    consistent = [info(0, 0, "abc", "t"), info(1, 0, "abc", "t")]
    assert dist_smoke.check_ranks_agree(consistent, ["TOKEN"]) == []
    problems = dist_smoke.check_ranks_agree([info(0, 0, "abc", "t"), info(1, 1, "def", None)], ["TOKEN"])
    assert any("config_sha256 differs" in p for p in problems)
    assert any("env TOKEN not identical" in p for p in problems)
    assert any("node 0 runs 1 ranks but LOCAL_WORLD_SIZE=2" in p for p in problems)


def test_refuses_to_run_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    dist_smoke = load_tool("dist_smoke")
    for name in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"\['RANK', .*'MASTER_ADDR'.*start this script with torchrun"):
        dist_smoke.torchrun_env()
    with pytest.raises(ValueError, match="override 'max_steps' is not key=value"):
        dist_smoke.parse_args(["cfg.yaml", "max_steps"])
