"""NeMo-Run experiments for the DISPO recipes: one task (torchrun over the cluster) per run, on a chosen executor.

    python examples/nemo_run/dispo.py --recipe qwen3_8b --executor slurm --account ACC --partition batch \\
        --ssh-host login.cluster --remote-job-dir /lustre/me/nemo_run --container-image nvcr.io#me/megatron-dispo:0.1
    python examples/nemo_run/dispo.py --recipe tiny_cpu --executor local
    python examples/nemo_run/dispo.py --recipe qwen3_14b --executor docker --container-image megatron-dispo:latest
    python examples/nemo_run/dispo.py --recipe qwen3_30b_a3b --executor slurm --account ACC --dryrun  # print sbatch

Trailing arguments are dotted config overrides passed to the trainer (`... -- trainer.max_steps=10`).
The command each rank runs is `$DISPO_ENTRYPOINT CONFIG OVERRIDES`, default `megatron-dispo train` (the same
variable and default as examples/slurm/common.sh); `--entrypoint "python tools/dist_smoke.py"` runs the
connectivity check instead. Needs the `launch` extra: `pip install -e .[launch]` (nemo-run 0.11.1, leptonai 0.27.3).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# leptonai (imported by nemo_run) imports a deprecated starlette module; the warning is noise for launcher users.
warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
import nemo_run as run  # noqa: E402
from torchx.specs import AppState  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ENTRYPOINT = "megatron-dispo train"
EXECUTORS = ("local", "slurm", "docker")

GPU_ENV: dict[str, str] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_NVLS_ENABLE": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
"""Same defaults as examples/slurm/common.sh (a test keeps the two in step); see there for why each is set."""


@dataclass(frozen=True)
class Recipe:
    """Resources of one paper recipe; model, parallel layout and batch sizes live in its YAML config."""

    config: str
    """YAML config, relative to the repository root."""
    nodes: int
    """Default node count (Slurm); local and docker runs use one node."""
    procs_per_node: int
    """torchrun ranks per node: GPUs per node on GPU recipes."""
    gpus_per_node: int
    """GPUs requested per node (0: CPU recipe)."""
    time: str
    """Slurm time limit."""


RECIPES: dict[str, Recipe] = {
    "qwen3_8b": Recipe("examples/configs/qwen3_8b_dispo.yaml", nodes=2, procs_per_node=8, gpus_per_node=8,
                       time="48:00:00"),
    "qwen3_14b": Recipe("examples/configs/qwen3_14b_dispo.yaml", nodes=4, procs_per_node=8, gpus_per_node=8,
                        time="72:00:00"),
    "qwen3_30b_a3b": Recipe("examples/configs/qwen3_30b_a3b_dispo.yaml", nodes=4, procs_per_node=8, gpus_per_node=8,
                            time="72:00:00"),
    "tiny_cpu": Recipe("examples/configs/tiny_cpu_dispo.yaml", nodes=2, procs_per_node=1, gpus_per_node=0,
                       time="00:30:00"),
}  # fmt: skip


def build_task(entrypoint: str, config: Path, overrides: Sequence[str]) -> run.Script:
    """The command torchrun starts on every rank: `entrypoint config overrides...` as a NeMo-Run Script.

    `python SCRIPT args` and `python -m MODULE args` run under torchrun's Python; anything else (the default
    `megatron-dispo train`) is an executable started with `torchrun --no-python`. Relative script paths are
    made absolute against the repository root, which every executor mounts or shares at the same path.
    """
    tokens = shlex.split(entrypoint)
    if not tokens:
        raise ValueError("entrypoint is empty; use the default 'megatron-dispo train' or 'python tools/dist_smoke.py'")
    tail = [str(config), *overrides]
    if tokens[0] in ("python", "python3"):
        if len(tokens) < 2:
            raise ValueError(f"entrypoint={entrypoint!r} names no script; e.g. 'python tools/dist_smoke.py'")
        if tokens[1] == "-m":
            if len(tokens) < 3:
                raise ValueError(f"entrypoint={entrypoint!r} has -m without a module")
            return run.Script(path=tokens[2], args=[*tokens[3:], *tail], entrypoint="python", m=True)
        script = Path(tokens[1])
        script = script if script.is_absolute() else REPO_ROOT / script
        return run.Script(path=str(script), args=[*tokens[2:], *tail], entrypoint="python")
    # entrypoint != "python" makes NeMo-Run add torchrun --no-python; the executable is looked up on PATH.
    return run.Script(path=tokens[0], args=[*tokens[1:], *tail], entrypoint=tokens[0])


def build_executor(kind: str, recipe: Recipe, args: argparse.Namespace) -> run.Executor:
    """LocalExecutor (one node), SlurmExecutor (with optional pyxis container) or DockerExecutor."""
    nodes = args.nodes or (recipe.nodes if kind == "slurm" else 1)
    if args.procs_per_node:
        procs = args.procs_per_node
    elif kind == "local" and not recipe.gpus_per_node:
        procs = recipe.nodes * recipe.procs_per_node  # CPU recipe: the multi-node world as ranks on this machine
    else:
        procs = recipe.procs_per_node
    env = dict(GPU_ENV) if recipe.gpus_per_node else {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # This interpreter's venv first on PATH (its torchrun and python), for processes started on this machine only.
    host_env = env | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    launcher = run.Torchrun(rdzv_port=args.rdzv_port)
    if kind == "local":
        if nodes != 1:
            raise ValueError(f"--nodes={nodes} with --executor local: a LocalExecutor runs on this machine only (1)")
        return run.LocalExecutor(ntasks_per_node=procs, launcher=launcher, env_vars=host_env)
    mounts = [f"{REPO_ROOT}:{REPO_ROOT}", *args.container_mounts]
    if kind == "slurm":
        if not args.account:
            raise ValueError("--account is required with --executor slurm (the Slurm account to charge)")
        tunnel = (
            run.SSHTunnel(host=args.ssh_host, user=args.ssh_user or os.environ.get("USER", ""),
                          job_dir=args.remote_job_dir)
            if args.ssh_host
            else run.LocalTunnel(job_dir=args.remote_job_dir or "")
        )  # fmt: skip
        if args.ssh_host and not args.remote_job_dir:
            raise ValueError("--ssh-host needs --remote-job-dir (a directory on the cluster's shared filesystem)")
        executor = run.SlurmExecutor(
            account=args.account,
            partition=args.partition,
            nodes=nodes,
            ntasks_per_node=1,  # one torchrun per node; it starts `procs` ranks
            torchrun_nproc_per_node=procs,
            gpus_per_node=recipe.gpus_per_node or None,
            exclusive=bool(recipe.gpus_per_node) or None,
            time=args.time or recipe.time,
            container_image=args.container_image,
            container_mounts=mounts if args.container_image else [],
            tunnel=tunnel,
            packager=run.Packager(),  # code is already on the shared filesystem (or in the image)
            launcher=launcher,
            env_vars=host_env if not (args.ssh_host or args.container_image) else env,
        )
        if args.container_image:  # NeMo-Run sets /nemo_run/code (empty with Packager()); srun keeps the last one
            executor.srun_args = [f"--container-workdir={REPO_ROOT}"]
        return executor
    if kind == "docker":
        if not args.container_image:
            raise ValueError("--container-image is required with --executor docker (build it from docker/Dockerfile)")
        return run.DockerExecutor(
            container_image=args.container_image,
            num_gpus=-1 if recipe.gpus_per_node else None,
            runtime="nvidia" if recipe.gpus_per_node else None,
            ipc_mode="host",
            shm_size="16g",
            ulimits=["memlock:-1", "stack:67108864"],
            volumes=mounts,
            ntasks_per_node=procs,
            packager=run.Packager(),
            launcher=launcher,
            env_vars=env,
        )
    raise ValueError(f"executor={kind!r} is not one of {EXECUTORS}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--executor", choices=EXECUTORS, required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for the trainer (key=value)")
    parser.add_argument("--config", type=Path, help="YAML config (default: the recipe's)")
    parser.add_argument(
        "--entrypoint",
        default=os.environ.get("DISPO_ENTRYPOINT", DEFAULT_ENTRYPOINT),
        help="command each rank runs before CONFIG (env DISPO_ENTRYPOINT; default %(default)r)",
    )
    parser.add_argument("--name", help="experiment name (default: dispo-<recipe>)")
    parser.add_argument("--nodes", type=int, help="node count (default: the recipe's on Slurm, 1 elsewhere)")
    parser.add_argument("--procs-per-node", type=int, help="torchrun ranks per node (default: the recipe's)")
    parser.add_argument("--rdzv-port", type=int, default=29500, help="torchrun rendezvous port on the first node")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", help="Slurm time limit (default: the recipe's)")
    parser.add_argument("--container-image", help="pyxis image (slurm) or docker image (docker)")
    parser.add_argument("--container-mounts", nargs="*", default=[], help="extra SRC:DST mounts (repo is mounted)")
    parser.add_argument("--ssh-host", help="Slurm login node; without it sbatch runs on this machine")
    parser.add_argument("--ssh-user", help="user on the login node (default $USER)")
    parser.add_argument("--remote-job-dir", help="experiment folder on the cluster (needed with --ssh-host)")
    parser.add_argument("--nemorun-home", type=Path, help="NeMo-Run's experiment store (default $NEMORUN_HOME)")
    parser.add_argument("--dryrun", action="store_true", help="print what would be submitted; submit nothing")
    parser.add_argument("--detach", action="store_true", help="return after submission (slurm only)")
    parser.add_argument(
        "--tail-logs", action=argparse.BooleanOptionalAction, default=True, help="stream the job's output here"
    )
    args = parser.parse_intermixed_args(argv)
    for override in args.overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not key=value (e.g. trainer.max_steps=10)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = RECIPES[args.recipe]
    config = args.config or Path(recipe.config)
    config = config if config.is_absolute() else REPO_ROOT / config
    if not args.dryrun and not config.is_file():
        raise FileNotFoundError(f"config {config} not found; pass --config PATH")
    if args.nemorun_home:
        run.config.set_nemorun_home(str(args.nemorun_home))
    task = build_task(args.entrypoint, config, args.overrides)
    executor = build_executor(args.executor, recipe, args)
    name = args.name or f"dispo-{args.recipe.replace('_', '-')}"
    with run.Experiment(name, executor=executor, log_level="INFO") as exp:
        exp.add(task, executor=executor, name=name, tail_logs=args.tail_logs and not args.dryrun)
        if args.dryrun:
            exp.dryrun(delete_exp_dir=False)
            for script in sorted(Path(exp.jobs[0].executor.experiment_dir).glob("*_sbatch.sh")):
                print(f"dispo nemo_run: dryrun sbatch script {script}:\n{script.read_text()}")
            return 0
        exp.run(sequential=True, detach=args.detach)
    if args.detach:
        return 0
    states = {job.id: job.state for job in exp.jobs}  # set while the `with` exit waits for the jobs
    print(f"dispo nemo_run: {name} finished: { {k: str(v) for k, v in states.items()} }")
    return 0 if all(state == AppState.SUCCEEDED for state in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
