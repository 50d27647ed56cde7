"""`megatron-dispo plan` (megatron_dispo.plan / plan_cli): recipes fit their sbatch size, memory maths, error lines.

CPU only; nothing is started. Expected numbers are written out by hand, never recomputed with the code under test.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from megatron_dispo.cli import main
from megatron_dispo.config import load_run_config
from megatron_dispo.models.presets import PRESETS, count_parameters
from megatron_dispo.plan import GIB, ModelArch, make_plan

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "examples" / "configs"
SLURM_DIR = REPO_ROOT / "examples" / "slurm"
RECIPES = sorted(CONFIG_DIR.glob("qwen3_*.yaml"))


def sbatch_size(script: Path) -> tuple[int, int | None, str]:
    """(nodes, GPUs per node or None without a GPU request, default DISPO_CONFIG) of an sbatch script."""
    text = script.read_text()
    nodes = re.search(r"^#SBATCH\s+(?:--nodes[= ]|-N\s*)(\d+)\s*$", text, re.M)
    gpus = re.search(r"^#SBATCH\s+--gpus-per-node[= ](\d+)\s*$", text, re.M) or re.search(
        r"^#SBATCH\s+--gres[= ]gpu:(?:\w+:)?(\d+)\s*$", text, re.M
    )
    config = re.search(r'^: "\$\{DISPO_CONFIG:=([^}]+)\}"', text, re.M)
    assert nodes and config, f"{script.name}: no #SBATCH --nodes or no DISPO_CONFIG default"
    return int(nodes.group(1)), int(gpus.group(1)) if gpus else None, Path(config.group(1)).name


def recipe_cluster(recipe: Path) -> tuple[int, int, str]:
    """The sbatch size of a recipe: its own GPU script, else (baselines like qwen3_14b_grpo) its base recipe's."""
    scripts = {}
    for script in SLURM_DIR.glob("*.sbatch"):
        nodes, gpus, config = sbatch_size(script)
        if gpus is not None:
            scripts[config] = (nodes, gpus, script.name)
    name = recipe.name
    while name not in scripts:
        base = yaml.safe_load((CONFIG_DIR / name).read_text()).get("base")
        assert base, f"{recipe.name} has no sbatch script and no base recipe with one"
        name = Path(base).name
    return scripts[name]


def test_every_gpu_sbatch_script_names_an_existing_qwen3_recipe():
    gpu_scripts = sorted(SLURM_DIR.glob("qwen3_*.sbatch"))
    assert [s.stem for s in gpu_scripts] == ["qwen3_14b_dispo", "qwen3_30b_a3b_dispo", "qwen3_8b_dispo"]
    for script in gpu_scripts:
        nodes, gpus, config = sbatch_size(script)
        assert config == f"{script.stem}.yaml" and (CONFIG_DIR / config).is_file(), script.name
        assert nodes >= 1 and gpus is not None and gpus >= 1, script.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_the_cluster_its_sbatch_script_requests(recipe):
    nodes, gpus, script = recipe_cluster(recipe)
    plan = make_plan(load_run_config(recipe), nodes=nodes, gpus_per_node=gpus)  # 80 GiB GPUs, engine TP 1
    assert plan.layout.world == nodes * gpus, script
    assert plan.memory.peak <= 80 * GIB and plan.memory.kv_sequences >= 1


def test_presets_match_published_sizes_and_count_parameters():
    """Qwen model cards: 8.2B, 14.8B, 30.5B total / 3.3B active; the planner's count agrees with presets'."""
    published = {"qwen3-8b": (8.2e9, None), "qwen3-14b": (14.8e9, None), "qwen3-30b-a3b": (30.5e9, 3.3e9)}
    for name, (total, active) in published.items():
        preset = PRESETS[name]
        arch = ModelArch.from_hf_fields(name, preset.hf_fields, moe=preset.moe)
        mine = arch.count()
        as_hf = SimpleNamespace(**preset.hf_fields, model_type="qwen3_moe" if preset.moe else "qwen3")
        assert mine == count_parameters(as_hf), name
        assert abs(mine[0] - total) / total < 0.01, (name, mine)
        if active is not None:
            assert abs(mine[1] - active) / active < 0.03, (name, mine)


def test_30b_a3b_local_params_by_hand():
    """Qwen3-30B-A3B at TP 4, EP 32, ETP 1 (the recipe): per layer attention (2048 x (4096 + 2 x 512) + 4096 x 2048
    = 18,874,368) / 4 = 4,718,592, norms 2 x 2048 + 2 x 128 = 4,352, router 128 x 2048 = 262,144 -> 4,985,088 x 48 =
    239,284,224; embedding and output 151936 x 2048 / 4 = 77,791,232 each; final norm 2,048; 4 experts of
    3 x 2048 x 768 = 4,718,592 in 48 layers = 905,969,664. Sum 1,300,838,400."""
    plan = make_plan(load_run_config(CONFIG_DIR / "qwen3_30b_a3b_dispo.yaml"), nodes=4, gpus_per_node=8)
    assert plan.memory.local_params == 1_300_838_400
    assert (plan.layout.dp, plan.layout.expert_dp, plan.layout.engine_replicas) == (
        8,
        1,
        16,
    )  # engine TP 2 (the recipe): 16 replicas


TINY_HF = {
    "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "tie_word_embeddings": False,
}  # fmt: skip
TINY_MOE_HF = TINY_HF | {
    "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
}  # fmt: skip


def tiny_config(tmp_path: Path, hf: dict, parallel: dict) -> Path:
    """A run config whose model.hf_path is a folder holding only config.json (the planner reads nothing else)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf))
    run = {
        "model": {"hf_path": str(model_dir), "params_dtype": "bfloat16", "parallel": parallel},
        "data": {"max_prompt_tokens": 64},
        "rollout": {"max_new_tokens": 192, "max_model_len": 512, "dtype": "bfloat16", "gpu_memory_utilization": 0.5},
        "trainer": {"prompts_per_step": 8, "num_minibatches": 2, "max_tokens_per_microbatch": 1024},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


TP2_SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True, "use_distributed_optimizer": True}


def test_tiny_dense_memory_by_hand(tmp_path):
    """2 nodes x 2 GPUs, TP 2 + SP, distributed optimizer, bf16: DP 2. Model h 64, f 128, 2 layers, 4 heads / 2 KV
    of 16, vocab 256: q 64, kv 32.

    params: attention 64 x (64 + 64) + 64 x 64 = 12,288; norms 2 x 64 + 2 x 16 = 160; MLP 3 x 64 x 128 = 24,576;
      embedding / output 256 x 64 = 16,384 each; total 2 x (12,288 + 160 + 24,576) + 2 x 16,384 + 64 = 106,880.
    local (TP 2): 2 x (12,288 + 24,576) / 2 + 2 x 160 + 2 x 16,384 / 2 + 64 = 53,632.
    weights 2 B x 53,632 = 107,264; grads 4 B x 53,632 = 214,528; Adam 12 B x 53,632 / DP 2 = 321,792.
    activations per token and layer: split 2 x ((64 + 32) + (64 + 64) + 64) + 2 x 3 x 128 = 1,344, whole 2 x 4 x 64
      = 512, with SP (1,344 + 512) / 2 = 928; x 2 layers + logits 2 x 256 / 2 = 2,112 B; x 1,024 tokens (the budget;
      the longest sequence is 64 + 192) = 2,162,688.
    engine: 2 B x 106,880 = 213,760; GPU 1/128 GiB = 8,388,608, x 0.5 = 4,194,304, KV 3,980,544; KV per token
      2 x 2 layers x 2 heads x 16 x 2 B = 256, x 512 = 131,072 per sequence -> 30 sequences.
    """
    config = load_run_config(tiny_config(tmp_path, TINY_HF, TP2_SP))
    plan = make_plan(config, nodes=2, gpus_per_node=2, gpu_memory_gib=1 / 128, reserve_gib=0)
    assert plan.arch.count() == (106_880, 106_880)
    mem = plan.memory
    assert (plan.layout.dp, mem.local_params) == (2, 53_632)
    assert (mem.weights, mem.gradients, mem.optimizer, mem.activations) == (107_264, 214_528, 321_792, 2_162_688)
    assert (mem.engine_weights, mem.engine_budget, mem.kv_cache) == (213_760, 4_194_304, 3_980_544)
    assert (mem.kv_bytes_per_token, mem.kv_sequences) == (256, 30)
    assert mem.training_phase == 107_264 + 214_528 + 321_792 + 2_162_688
    assert mem.rollout_phase == 107_264 + 214_528 + 321_792 + 4_194_304


def test_tiny_dense_without_sp_keeps_norm_activations_whole_and_full_recompute(tmp_path):
    """TP 2 without SP: per token and layer 1,344 / 2 + 512 = 1,184; x 2 + 256 = 2,624 B x 1,024 = 2,686,976.
    Full recompute keeps each layer's input (2 x 64 = 128 B, whole without SP) + one layer's 1,184 B:
    2 x 128 + 1,184 + 256 = 1,696 B x 1,024 = 1,736,704."""
    parallel = TP2_SP | {"sequence_parallel": False}
    config = load_run_config(tiny_config(tmp_path, TINY_HF, parallel))
    kwargs = {"nodes": 2, "gpus_per_node": 2, "gpu_memory_gib": 1 / 128, "reserve_gib": 0}
    assert make_plan(config, **kwargs).memory.activations == 2_686_976
    assert make_plan(config, recompute="full", **kwargs).memory.activations == 1_736_704


def test_tiny_pipeline_stages_by_hand(tmp_path):
    """PP 2 on 2 GPUs (TP 1): stage 0 holds layer 0 + embedding = 12,288 + 24,576 + 160 + 16,384 = 53,408 params and
    2 micro-batches in flight (1F1B) of 1 layer x (1,344 + 512) B = 3,712 B per token; stage 1 holds layer 1 + final
    norm + output = 53,472 params and 1,856 + 512 (logits) = 2,368 B per token. Stage 0 is the most loaded:
    53,408 x (2 + 4 + 12) + 3,712 x 1,024 = 961,344 + 3,801,088 > 53,472 x 18 + 2,368 x 1,024 = 3,387,328."""
    parallel = {"pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}
    config = load_run_config(tiny_config(tmp_path, TINY_HF, parallel))
    plan = make_plan(config, nodes=1, gpus_per_node=2, gpu_memory_gib=1 / 128, reserve_gib=0)
    assert (plan.layout.dp, plan.memory.local_params, plan.memory.activations) == (1, 53_408, 3_801_088)


def test_tiny_moe_expert_shards_and_activations_by_hand(tmp_path):
    """MoE h 64, 4 experts top-2 of width 32, 1 node x 4 GPUs, TP 2 + SP, EP 4, ETP 1: DP 2, expert DP 1.
    local: attention 12,288 / 2 x 2 = 12,288; norms 2 x 160; router 4 x 64 x 2 = 512; one expert 3 x 64 x 32 = 6,144
      x 2 layers = 12,288; embedding + output 2 x 8,192; final norm 64 -> 41,856 (dense 29,568, experts 12,288).
    Adam: 12 x (29,568 / 2 + 12,288 / 1) = 324,864.
    activations per token and layer: attention 2 x 288 = 576, router 2 x 4 x 4 = 32, 2 routed copies x 2 B x
      (2 x 64 + 3 x 32) = 896, norms 512 -> (576 + 32 + 896 + 512) / 2 = 1,008; x 2 + 256 = 2,272 x 1,024 = 2,326,528.
    """
    parallel = TP2_SP | {"expert_model_parallel_size": 4, "expert_tensor_parallel_size": 1}
    config = load_run_config(tiny_config(tmp_path, TINY_MOE_HF, parallel))
    plan = make_plan(config, nodes=1, gpus_per_node=4, gpu_memory_gib=1 / 128, reserve_gib=0)
    assert (plan.layout.dp, plan.layout.expert_dp) == (2, 1)
    assert plan.memory.local_params == 41_856
    assert plan.memory.optimizer == 324_864
    assert plan.memory.activations == 2_326_528


def run_plan_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


ERROR_CASES = [
    # (hf config, parallel, nodes, gpus, extra CLI args, text the one error line must contain)
    (TINY_HF, TP2_SP, 1, 3, [], "tensor_model_parallel_size (2)"),
    (TINY_HF, TP2_SP | {"tensor_model_parallel_size": 3}, 1, 3, [], "num_attention_heads (4)"),
    (TINY_HF, TP2_SP | {"tensor_model_parallel_size": 4}, 1, 4, [], "num_key_value_heads (2)"),
    (TINY_HF, {"pipeline_model_parallel_size": 3}, 1, 3, [], "num_hidden_layers (2)"),
    (TINY_MOE_HF, {"expert_model_parallel_size": 3}, 1, 3, [], "num_experts (4)"),
    (TINY_HF, {"sequence_parallel": True}, 1, 2, [], "sequence_parallel=true needs"),
    (TINY_MOE_HF, {"tensor_model_parallel_size": 2}, 1, 2, [], "needs model.parallel.sequence_parallel=true"),
    (TINY_HF, TP2_SP, 1, 4, ["--engine-tp", "3"], "does not divide --gpus-per-node 4"),
    # memory, GPU of a few MiB (see test_tiny_dense_memory_by_hand for the byte counts at world 2: state 965,376,
    # activations 2,112 B per token, engine weights 213,760, 131,072 B of KV per sequence)
    (
        TINY_HF,
        TP2_SP,
        1,
        2,
        ["rollout.gpu_memory_utilization=0.02", "--gpu-memory-gib", "0.0078125"],
        "holds no rollout.max_model_len=512 sequence",
    ),  # 0.02 x 8,388,608 = 167,772 < engine weights
    (TINY_HF, TP2_SP, 1, 2, ["--gpu-memory-gib", "0.002"], "training phase needs"),  # 965,376 + 2,162,688 > 2.1 M
    (
        TINY_HF,
        TP2_SP,
        1,
        2,
        ["trainer.max_tokens_per_microbatch=256", "--gpu-memory-gib", "0.0016"],
        "lower rollout.gpu_memory_utilization",
    ),  # training 1,506,048 fits 1,717,986; rollout 965,376 + 858,993 does not
]


@pytest.mark.parametrize(("hf", "parallel", "nodes", "gpus", "extra", "message"), ERROR_CASES,
                         ids=[f"{i}-{case[-1].split()[0]}" for i, case in enumerate(ERROR_CASES)])  # fmt: skip
def test_impossible_layouts_exit_2_with_one_line_naming_the_field(
    tmp_path, capsys, hf, parallel, nodes, gpus, extra, message
):
    path = tiny_config(tmp_path, hf, parallel)
    code, out, err = run_plan_cli(
        capsys, str(path), *extra, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--reserve-gib", "0"
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("megatron-dispo plan: error: ") and "Traceback" not in err
    assert message in err, err


def test_over_budget_recipe_names_the_fix(capsys):
    """The 30B-A3B recipe at its old layout (EP 8, 32768-token micro-batches) does not fit an 80 GiB GPU."""
    recipe = str(CONFIG_DIR / "qwen3_30b_a3b_dispo.yaml")
    code, _, err = run_plan_cli(
        capsys, recipe, "model.parallel.expert_model_parallel_size=8", "trainer.max_tokens_per_microbatch=32768",
        "--nodes", "4",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "training phase needs 95.0 GiB" in err and "lower trainer.max_tokens_per_microbatch" in err


def test_config_error_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_plan_cli(capsys, str(CONFIG_DIR / "qwen3_8b_dispo.yaml"), "trainer.max_step=3", "--nodes", "2")
    assert code == 2 and err.count("\n") == 1 and "trainer.max_step" in err


def test_unreadable_config_json_is_one_line(tmp_path, capsys):
    path = tiny_config(tmp_path, {"model_type": "qwen3", "hidden_size": 64}, TP2_SP)
    code, _, err = run_plan_cli(capsys, str(path), "--nodes", "1", "--gpus-per-node", "2")
    assert code == 2 and err.count("\n") == 1 and "num_hidden_layers" in err and "config.json" in err


def test_unknown_model_needs_a_preset(tmp_path, capsys):
    recipe = str(CONFIG_DIR / "qwen3_8b_dispo.yaml")
    code, _, err = run_plan_cli(capsys, recipe, "model.hf_path=/nowhere/My-Model", "--nodes", "2")
    assert code == 2 and "--model-preset" in err and "model.hf_path='/nowhere/My-Model'" in err
    code, out, _ = run_plan_cli(
        capsys, recipe, "model.hf_path=/nowhere/My-Model", "--nodes", "2", "--model-preset", "qwen3-8b"
    )
    assert code == 0 and "preset qwen3-8b" in out


def test_cli_subprocess_is_fast_prints_the_layout_and_imports_no_engine():
    """A fresh interpreter: the plan prints and exits 0 in well under 10 s, and never imports Megatron or vLLM nor
    initialises torch.distributed. Time is the child's CPU time (user + sys): the 2-core test machine is shared, so
    wall time measures the neighbours; most of it is importing torch (through megatron_dispo.config)."""
    probe = (
        "import sys\n"
        "from megatron_dispo.cli import main\n"
        "code = main(['plan', 'examples/configs/qwen3_14b_dispo.yaml', '--nodes', '4', '--gpus-per-node', '8'])\n"
        "import torch.distributed as dist\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'vllm'))\n"
        "print('LOADED', bad, dist.is_initialized())\n"
        "sys.exit(code)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    assert cpu_s < 10, f"plan took {cpu_s:.1f} s of CPU"
    assert "LOADED [] False" in proc.stdout
    assert "world 32" in proc.stdout and "16 vLLM replicas x engine TP 2, consecutive ranks in one node" in proc.stdout
    assert re.search(r"│\s+8 │\s+1 │\s+1 │\s+- │\s+1 │\s+4 │", proc.stdout)  # TP PP EP ETP CP DP
    assert "plan: OK" in proc.stdout
