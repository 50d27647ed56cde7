"""MetricsLogger: JSONL with a step key, TensorBoard events, resume truncation, non-finite values, offline W&B."""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from megatron_dispo.trainer.metrics import LoggingConfig, MetricsLogger, read_metrics, wandb_run_id


def _logger(tmp_path, **kwargs):
    console = Console(file=io.StringIO(), width=200)
    return MetricsLogger(tmp_path, LoggingConfig(), console=console, **kwargs), console


def test_jsonl_tensorboard_and_console_line(tmp_path):
    logger, console = _logger(tmp_path)
    logger.log(1, {"rollout/accuracy": 0.25, "train/loss": -0.5, "train/nan_metric": math.nan})
    logger.log(2, {"rollout/accuracy": 0.5, "train/loss": -0.25})
    logger.close()
    records = read_metrics(tmp_path)
    assert records == [
        {"step": 1, "rollout/accuracy": 0.25, "train/loss": -0.5, "train/nan_metric": None},
        {"step": 2, "rollout/accuracy": 0.5, "train/loss": -0.25},
    ]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    out = console.file.getvalue()
    assert "step     1 | accuracy=0.25 | loss=-0.5" in out


def test_resume_truncates_steps_at_and_after_the_checkpoint(tmp_path):
    logger, _ = _logger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    logger, _ = _logger(tmp_path, resume_from_step=4)
    logger.log(4, {"train/loss": 40.0})
    logger.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_new_run_starts_a_fresh_file(tmp_path):
    logger, _ = _logger(tmp_path)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    logger, _ = _logger(tmp_path)
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}]


# ---------------------------------------------------------------------------------------------------------------- W&B
# The offline run's transaction log (run-<id>.wandb) is read back byte by byte: a 7-byte file header (":W&B", magic
# 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type byte + payload, payload
# length, type FULL/FIRST/MIDDLE/LAST); the payloads are wandb's own protobuf `Record` messages.
_WANDB_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list[Any]:
    """Every `Record` in an offline transaction log, checking the file header and each chunk's CRC."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, pos = [], b"", 7
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # block trailer too small for a header: zero padding
            pos += left_in_block
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        payload = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        assert len(payload) == length, "truncated chunk"
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        pos += _CHUNK_HEADER.size + length
        if kind in (_FULL, _FIRST):
            pending = payload
        elif kind in (_MIDDLE, _LAST):
            pending += payload
        else:
            raise AssertionError(f"unknown chunk type {kind} at byte {pos}")
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items: Any) -> dict[str, Any]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent W&B whose cache/config/data dirs live in tmp_path; W&B's process-wide state is reset after."""
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.parametrize("wandb_dir_env", [True, False], ids=["WANDB_DIR", "run_dir"])
def test_wandb_offline_run_holds_the_logged_steps(tmp_path, monkeypatch, wandb_env, wandb_dir_env):
    run_dir = tmp_path / "dispo run:7"  # ':' and ' ' are not allowed in W&B run ids
    wandb_root = tmp_path / "wandb_root" if wandb_dir_env else run_dir
    if wandb_dir_env:
        monkeypatch.setenv("WANDB_DIR", str(wandb_root))
    else:
        monkeypatch.delenv("WANDB_DIR", raising=False)
    config = LoggingConfig(tensorboard=False, wandb=True, wandb_project="dispo-test", wandb_mode="offline")
    steps = {
        1: {"train/loss": -0.5, "rollout/accuracy": 0.25, "train/nan_metric": math.nan},
        2: {"train/loss": -0.25, "rollout/accuracy": 0.5, "train/nan_metric": 3.0},
        5: {"train/loss": 0.125, "perf/time/step_s": 1.5},
    }
    logger = MetricsLogger(
        run_dir,
        config,
        run_config={"algorithm": {"name": "dispo", "eps": 0.2}},
        console=Console(file=io.StringIO(), width=200),
    )
    for step, metrics in steps.items():
        logger.log(step, metrics)
    logger.close()

    run_id = wandb_run_id("dispo run:7")
    assert run_id == "dispo-run-7"
    offline_dirs = list((wandb_root / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_dirs) == 1, list(tmp_path.rglob("offline-run-*"))
    if wandb_dir_env:
        assert not (run_dir / "wandb").exists()
    # wandb's service process writes the log; under load its last chunks can land just after finish() returns
    deadline = time.monotonic() + 30
    while True:
        records = _wandb_records(offline_dirs[0] / f"run-{run_id}.wandb")
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert kinds[0] == "header" and "exit" in kinds  # finish() on close wrote the exit record

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.project) == (run_id, "dispo run:7", "dispo-test")
    assert _items(run.config.update)["algorithm"] == {"name": "dispo", "eps": 0.2}

    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in history] == list(steps)
    for h, (step, metrics) in zip(history, steps.items(), strict=True):
        items = _items(h.item)
        assert items["_step"] == step
        logged = {k: v for k, v in items.items() if not k.startswith("_")}
        assert logged == {k: v for k, v in metrics.items() if math.isfinite(v)}  # NaN left out, as in TensorBoard
