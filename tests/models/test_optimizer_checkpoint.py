"""Optimizer settings and dist_checkpointing round trips of the Megatron-Core policy across layouts (gloo, CPU).

The reference for "resume" is the uninterrupted run: save after step 1, load into a freshly built model (different
init seed, so only the checkpoint can make them agree), take step 2 with the same data, and compare the full weights
with those of the run that never stopped. Weights saved at TP=2 x EP=2 must give the TP=1 model identical logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_dispo.models.optimizer import OptimizerSettings
from tests.models.distributed import free_port, run_workers

pytestmark = pytest.mark.mcore

VOCAB = 256
BATCH, SEQ = 4, 16
LR = 1e-3


def test_optimizer_settings_default_to_the_paper_values() -> None:
    settings = OptimizerSettings()
    assert (settings.lr, settings.adam_beta1, settings.adam_beta2) == (1e-6, 0.9, 0.95)
    assert (settings.adam_eps, settings.weight_decay, settings.clip_grad) == (1e-15, 0.1, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "lr=0.0 must be a positive"),
        ("adam_beta2", 1.0, "adam_beta2=1.0 must be in"),
        ("adam_eps", -1e-8, "adam_eps=-1e-08 must be positive"),
        ("weight_decay", -0.1, "weight_decay=-0.1 must be >= 0"),
        ("clip_grad", -1.0, "clip_grad=-1.0 must be >= 0"),
    ],
)
def test_optimizer_settings_reject_bad_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**{field: value})


def _setup(layout: dict, *, init_seed: int):
    from megatron.core import parallel_state

    from megatron_dispo.models.builder import build_model
    from megatron_dispo.models.optimizer import build_optimizer, wrap_ddp
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.tiny import tiny_qwen3_config

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel = ParallelConfig(**layout)
    initialize_parallel(parallel, seed=init_seed)
    model = build_model(tiny_qwen3_config(moe=True, vocab_size=VOCAB), parallel, moe_aux_loss_coeff=0.0)
    settings = OptimizerSettings(lr=LR, adam_eps=1e-6)  # see test_parallel_parity for why not 1e-15 here
    ddp = wrap_ddp(model, parallel, settings)
    return parallel, ddp, build_optimizer([ddp], parallel, settings)


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def _train_step(ddp, optimizer, step: int) -> float:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_dispo.models.builder import model_forward_logits
    from megatron_dispo.models.optimizer import finalize_and_step, zero_grads

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    local = _tokens(step).chunk(dp_size, dim=0)[dp_rank]
    zero_grads([ddp], optimizer)
    logits = model_forward_logits(ddp, local[:, :-1])
    loss = vocab_parallel_cross_entropy(logits.clone(), local[:, 1:]).sum() / (BATCH * SEQ) * dp_size
    loss.backward()
    return finalize_and_step([ddp], optimizer).grad_norm


def _probe_logits(ddp) -> torch.Tensor:
    from megatron_dispo.models.builder import model_forward_logits
    from tests.models.distributed import gather_vocab_parallel

    with torch.no_grad():
        return gather_vocab_parallel(model_forward_logits(ddp, _tokens(99)[:, :-1]))


def _checkpoint_worker(root: str) -> dict:
    """All checkpoint scenarios in one world of 4 ranks (launching worlds is the expensive part on 2 cores)."""
    from megatron.core import dist_checkpointing

    from megatron_dispo.models import checkpoint
    from tests.models.distributed import full_named_tensors

    tp2ep2 = {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "sequence_parallel": True}
    tp1 = {}
    out: dict = {}

    # 1. plain optimizer at TP2 x EP2: step, save, step (the uninterrupted run)
    parallel, ddp, optimizer = _setup(tp2ep2, init_seed=7)
    _train_step(ddp, optimizer, step=1)
    ckpt_plain = checkpoint.save_checkpoint(Path(root) / "plain", ddp, optimizer, iteration=1, parallel=parallel)
    out["saved_logits"] = _probe_logits(ddp)
    out["no_wd_norms"] = all(
        group["wd_mult"] == 0.0
        for group in optimizer.param_groups
        if any(param.dim() == 1 for param in group["params"])
    )
    _train_step(ddp, optimizer, step=2)
    out["continued"] = full_named_tensors(ddp)

    # 2. load it at TP1 (DP4) with a different init: identical logits, and step 2 resumes exactly (optimizer reshards)
    parallel, ddp, optimizer = _setup(tp1, init_seed=11)
    out["fresh_logits_tp1"] = _probe_logits(ddp)
    checkpoint.load_checkpoint(ckpt_plain, ddp, optimizer, parallel=parallel)
    out["loaded_logits_tp1"] = _probe_logits(ddp)
    _train_step(ddp, optimizer, step=2)
    out["resumed_tp1"] = full_named_tensors(ddp)

    # 3. distributed optimizer (dp_reshardable) at TP2 x EP2: same-layout resume, weights-only load at TP1
    parallel, ddp, optimizer = _setup(tp2ep2 | {"use_distributed_optimizer": True}, init_seed=7)
    _train_step(ddp, optimizer, step=1)
    root_dist = Path(root) / "dist"
    ckpt_dist = checkpoint.save_checkpoint(root_dist, ddp, optimizer, iteration=1, parallel=parallel)
    parallel, ddp, optimizer = _setup(tp2ep2 | {"use_distributed_optimizer": True}, init_seed=11)
    checkpoint.load_checkpoint(ckpt_dist, ddp, optimizer, parallel=parallel)
    _train_step(ddp, optimizer, step=2)
    out["resumed_dist"] = full_named_tensors(ddp)
    parallel, ddp, optimizer = _setup({"use_distributed_optimizer": True}, init_seed=11)
    try:
        checkpoint.load_checkpoint(ckpt_dist, ddp, optimizer, parallel=parallel)
        out["reshard_error"] = None
    except ValueError as error:
        out["reshard_error"] = str(error)
    checkpoint.load_checkpoint(ckpt_dist, ddp, None, parallel=parallel)
    out["dist_weights_logits_tp1"] = _probe_logits(ddp)

    # 4. a crash inside the save leaves `latest` on the previous checkpoint and no iter_ folder
    real_save = dist_checkpointing.save

    def crashing_save(state: dict, directory: str, *args: object, **kwargs: object) -> None:
        real_save(state, directory, *args, **kwargs)
        raise RuntimeError("simulated crash after the shards were written")

    dist_checkpointing.save = crashing_save
    try:
        checkpoint.save_checkpoint(root_dist, ddp, optimizer, iteration=2, parallel=parallel)
        out["crash_raised"] = False
    except RuntimeError:
        out["crash_raised"] = True
    finally:
        dist_checkpointing.save = real_save
    torch.distributed.barrier()
    out["latest_after_crash"] = str(checkpoint.latest_checkpoint(root_dist))
    out["iter2_exists_after_crash"] = (root_dist / "iter_0000002").exists()
    checkpoint.save_checkpoint(root_dist, ddp, optimizer, iteration=2, parallel=parallel)
    out["latest_after_retry"] = str(checkpoint.latest_checkpoint(root_dist))
    out["tmp_left_after_retry"] = sorted(p.name for p in root_dist.iterdir() if p.name.startswith(".tmp"))
    return out


def _four_rank_worker(root: str, reference_port: int) -> dict:
    """The 4-rank world: layout parity (tests/models/test_parallel_parity.py) first, then the checkpoint scenarios."""
    from tests.models.test_parallel_parity import FOUR_RANK_LAYOUTS, _layouts_worker

    parity = _layouts_worker(FOUR_RANK_LAYOUTS, reference_port)
    return {"parity": parity, "checkpoint": _checkpoint_worker(root)}


@pytest.fixture(scope="module")
def four_rank_world(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("checkpoints")
    return run_workers(_four_rank_worker, 4, args=(str(root), free_port()), timeout_s=400)


@pytest.mark.timeout(450)
def test_four_rank_layouts_match_one_process(four_rank_world: list[dict]) -> None:
    """TP=2 x EP=2 MoE with SP (expert TP=2, uneven gathers), with and without the distributed optimizer, and dense
    TP=2 x DP=2 with the distributed optimizer, against one process (assertions in test_parallel_parity)."""
    from tests.models.test_parallel_parity import FOUR_RANK_LAYOUTS, check_layouts_against_reference

    check_layouts_against_reference([rank["parity"] for rank in four_rank_world], FOUR_RANK_LAYOUTS)


@pytest.mark.timeout(450)
def test_checkpoints_reshard_resume_and_save_atomically(four_rank_world: list[dict]) -> None:
    results = [rank["checkpoint"] for rank in four_rank_world]
    rank0 = results[0]
    continued = {}
    for r in results:
        continued |= r["continued"]

    # weights saved at TP2 x EP2 give the TP1 model the same logits (and the fresh TP1 model did not have them)
    diff = (rank0["loaded_logits_tp1"] - rank0["saved_logits"]).abs().max().item()
    assert diff <= 1e-5, f"TP1 logits after loading the TP2xEP2 checkpoint differ by {diff:.3e}"
    assert (rank0["fresh_logits_tp1"] - rank0["saved_logits"]).abs().max().item() > 1e-2
    assert rank0["no_wd_norms"], "norm weights / 1-D params must have no weight decay"

    for label in ("resumed_tp1", "resumed_dist"):
        resumed = {}
        for r in results:
            resumed |= r[label]
        assert set(resumed) == set(continued)
        for name, weight in continued.items():
            gap = (resumed[name] - weight).abs().max().item()
            assert gap <= 1e-2 * LR, f"{label}: {name} differs from the uninterrupted run by {gap:.3e}"

    assert rank0["reshard_error"] is not None and "can only be resharded over DP" in rank0["reshard_error"]
    # the distributed-optimizer run starts from the same seed and data as the plain one, so its step-1 weights, loaded
    # weights-only at TP1, must reproduce the plain run's logits
    diff = (rank0["dist_weights_logits_tp1"] - rank0["saved_logits"]).abs().max().item()
    assert diff <= 1e-5, f"TP1 logits from the distributed-optimizer checkpoint differ by {diff:.3e}"

    assert rank0["crash_raised"]
    assert rank0["latest_after_crash"].endswith("iter_0000001")
    assert not rank0["iter2_exists_after_crash"]
    assert rank0["latest_after_retry"].endswith("iter_0000002")
    assert rank0["tmp_left_after_retry"] == []
