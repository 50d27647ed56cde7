"""Each CPU compatibility patch (megatron_dispo.models.cpu_compat) is still needed by Megatron-Core, and fixes its call.

Per patch: with every other patch installed, run the Megatron call the patch exists for and assert the documented
failure; then run it with the patch and check the result against an independent value. When a Megatron upgrade fixes a
failure upstream, the "still needed" half fails and names the patch to drop (see docs/megatron.md).
All probes share one world of 2 gloo ranks (TP=2 for most, then EP=2), because launching worlds is what costs time.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.models import cpu_compat
from tests.models.distributed import run_workers

pytestmark = pytest.mark.mcore


def _outcome(call) -> tuple[str, str]:
    """('ok', repr(result)) or (exception type name, message) of ``call()``."""
    try:
        return "ok", repr(call())
    except Exception as error:  # the probes record any failure; the test asserts which one
        return type(error).__name__, str(error)


def _without(name: str, call) -> tuple[str, str]:
    with cpu_compat.cpu_compat(disable=(name,)):
        return _outcome(call)


def _tiny(moe: bool, **overrides):
    from megatron_dispo.models.tiny import tiny_qwen3_config

    return tiny_qwen3_config(moe=moe, vocab_size=256, **overrides)


def _probe_worker() -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils

    from megatron_dispo.models.builder import build_model, model_forward_logits, transformer_config_from_hf
    from megatron_dispo.models.optimizer import build_optimizer, wrap_ddp
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel

    out: dict = {}
    tp2 = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, use_distributed_optimizer=True)
    initialize_parallel(tp2, seed=3)
    out["active"] = sorted(cpu_compat.active_patches())
    rank = torch.distributed.get_rank()

    # 1. torch.cuda.current_device()
    def rotary():
        return RotaryEmbedding(kv_channels=32, rotary_percent=1.0, use_cpu_initialization=False).inv_freq.device.type

    out["current_device"] = (_without("current_device", rotary), _outcome(rotary))

    # 2. CUDA RNG tracker
    def seed_tracker():
        tensor_parallel.model_parallel_cuda_manual_seed(5, force_reset_rng=True)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        return inside.tolist()

    out["rng_tracker"] = (_without("rng_tracker", seed_tracker), _outcome(seed_tracker))
    tp_seed_draw = torch.Generator().manual_seed(5 + 2718 + parallel_state.get_tensor_model_parallel_rank())
    out["rng_expected"] = torch.rand(3, generator=tp_seed_draw).tolist()

    # 3. device='cuda' factories
    def scaler():
        return ConstantGradScaler(4.0).scale.tolist()

    out["cuda_factories"] = (_without("cuda_factories", scaler), _outcome(scaler))

    # 4. param.type() checks: clipping, and the distributed optimizer's param groups
    def clip():
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = torch.full((4,), 3.0)
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
        return param.grad.tolist()

    def distributed_optimizer():
        model = build_model(_tiny(False), tp2)
        return type(build_optimizer([wrap_ddp(model, tp2)], tp2)).__name__

    out["param_type"] = (_without("param_type", clip), _outcome(clip))
    out["param_type_dist_opt"] = (_without("param_type", distributed_optimizer), _outcome(distributed_optimizer))

    # 6. te_general_gemm NameError in the router's gating linear
    inp, weight = torch.randn(5, 8), torch.randn(4, 8)

    def gating():
        return moe_utils.router_gating_linear(inp, weight, None, torch.float32)

    out["te_general_gemm"] = (_without("te_general_gemm", gating), _outcome(gating))
    with cpu_compat.cpu_compat():
        out["gating_error"] = (gating() - inp @ weight.t()).abs().max().item()

    # 8. sequence-parallel torch norm
    norm_config = transformer_config_from_hf(_tiny(True), tp2)

    def sp_norm():
        norm = torch_norm.WrappedTorchNorm(norm_config, hidden_size=128, eps=1e-6)
        return [getattr(p, "sequence_parallel", False) for p in norm.parameters()]

    out["sp_norm"] = (_without("sp_norm", sp_norm), _outcome(sp_norm))

    # 9. uneven all_gather over gloo: rank r contributes r + 1 rows filled with r
    local = torch.full((rank + 1, 2), float(rank))

    def uneven_gather():
        group = parallel_state.get_tensor_model_parallel_group()
        return mappings._gather_along_first_dim(local, group, output_split_sizes=[1, 2]).tolist()

    out["gloo_uneven_all_gather"] = (_without("gloo_uneven_all_gather", uneven_gather), _outcome(uneven_gather))

    # 5 and 7 need expert parallelism: EP=2 on the same ranks
    parallel_state.destroy_model_parallel()
    ep2 = ParallelConfig(expert_model_parallel_size=2)
    initialize_parallel(ep2, seed=3)
    moe_config = _tiny(True)

    def build_moe():
        return type(build_model(moe_config, ep2).decoder.layers[0].mlp.token_dispatcher).__name__

    out["cuda_stream"] = (_without("cuda_stream", build_moe), _outcome(build_moe))

    model = build_model(moe_config, ep2)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))

    def moe_forward():
        with torch.no_grad():
            return tuple(model_forward_logits(model, tokens).shape)

    out["split_sizes"] = (_without("split_sizes", moe_forward), _outcome(moe_forward))
    return out


def test_activate_is_scoped_and_reversible() -> None:
    """activate() replaces only Megatron's view of torch; deactivate() restores every attribute."""
    from megatron.core.transformer.moe import moe_utils

    assert not torch.cuda.is_available()
    before_torch, before_move = moe_utils.torch, moe_utils.maybe_move_tensor_to_cpu
    with cpu_compat.cpu_compat() as installed:
        assert installed == frozenset(cpu_compat.PATCH_NAMES)
        assert isinstance(moe_utils.torch, cpu_compat.MegatronTorchView)
        assert torch.cuda.current_device is not moe_utils.torch.cuda.current_device  # torch itself untouched
        assert moe_utils.te_general_gemm is None
    assert moe_utils.torch is before_torch and moe_utils.maybe_move_tensor_to_cpu is before_move
    assert not hasattr(moe_utils, "te_general_gemm")
    with pytest.raises(ValueError, match="names no compat patch"):
        cpu_compat.activate(disable=("no_such_patch",))


@pytest.fixture(scope="module")
def probes() -> list[dict]:
    return run_workers(_probe_worker, 2, timeout_s=200)


CUDA_MISSING = "Torch not compiled with CUDA enabled"


@pytest.mark.timeout(240)
def test_every_patch_is_installed_on_cpu(probes: list[dict]) -> None:
    assert probes[0]["active"] == sorted(cpu_compat.PATCH_NAMES)
    assert len(cpu_compat.PATCHES) == 9


def test_current_device_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["current_device"]
    assert CUDA_MISSING in without[1], without
    assert with_patch == ("ok", "'cpu'")


def test_rng_tracker_patch_is_needed(probes: list[dict]) -> None:
    for result in probes:
        without, with_patch = result["rng_tracker"]
        assert CUDA_MISSING in without[1], without
        # inside fork() the draws come from the TP-rank seed (seed + 2718 + tp_rank), as Megatron defines it
        assert with_patch == ("ok", repr(result["rng_expected"]))
    assert probes[0]["rng_expected"] != probes[1]["rng_expected"]


def test_cuda_factories_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["cuda_factories"]
    assert CUDA_MISSING in without[1], without
    assert with_patch == ("ok", "[4.0]")


def test_param_type_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["param_type"]
    assert without[0] == "AssertionError", without
    # grads scaled by max_norm / (total_norm + 1e-6) = 1 / 6.000001
    assert with_patch[0] == "ok" and eval(with_patch[1]) == pytest.approx([3.0 / 6.000001] * 4, rel=1e-6)
    without, with_patch = probes[0]["param_type_dist_opt"]
    assert without[0] == "TypeError" and "torch.cuda.FloatTensor" in without[1], without
    assert with_patch == ("ok", "'ChainedOptimizer'")


def test_cuda_stream_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["cuda_stream"]
    assert without[0] == "RuntimeError" and "torch.cuda.Stream requires CUDA" in without[1], without
    assert with_patch == ("ok", "'MoEAlltoAllTokenDispatcher'")


def test_te_general_gemm_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["te_general_gemm"]
    assert without[0] == "NameError" and "te_general_gemm" in without[1], without
    assert with_patch[0] == "ok"
    assert probes[0]["gating_error"] <= 1e-5


def test_split_sizes_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["split_sizes"]
    assert without[0] == "TypeError" and "all_to_all_single" in without[1], without
    assert with_patch == ("ok", "(2, 8, 256)")


def test_sp_norm_patch_is_needed(probes: list[dict]) -> None:
    without, with_patch = probes[0]["sp_norm"]
    assert without[0] == "AssertionError" and "sequence parallel not supported" in without[1], without
    assert with_patch == ("ok", "[True]")


def test_gloo_uneven_all_gather_patch_is_needed(probes: list[dict]) -> None:
    for result in probes:
        without, with_patch = result["gloo_uneven_all_gather"]
        assert without[0] == "RuntimeError" and "ProcessGroupGloo::allgather" in without[1], without
        assert with_patch == ("ok", repr([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
