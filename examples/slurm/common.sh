# shellcheck shell=bash
# Shared launch logic for every examples/slurm/*.sbatch recipe: sourced inside the batch job, never run directly.
#
# One torchrun per node (srun --ntasks-per-node=1), static rendezvous on the first node of the allocation:
#   MASTER_ADDR = NodeAddr of the first host of `scontrol show hostnames $SLURM_JOB_NODELIST` (what Slurm itself uses
#   to reach that node, so it works even where node names are not in DNS), MASTER_PORT derived from the job id,
#   node rank = SLURM_NODEID.
#
# Settings (environment; a recipe sets its defaults before sourcing, the user's exported values win):
#   DISPO_CONFIG          YAML config passed to the entrypoint (required).
#   DISPO_ENTRYPOINT      command torchrun starts on every rank, before "$DISPO_CONFIG overrides...".
#                         Default "megatron-dispo train". Connectivity check: "python tools/dist_smoke.py".
#   GPUS_PER_NODE         ranks per node (torchrun --nproc-per-node). Default: SLURM_GPUS_ON_NODE, else 8.
#   DISPO_ROOT            repository checkout on a shared filesystem. Default: SLURM_SUBMIT_DIR.
#   DISPO_LOG_DIR         parent of the per-job log folder. Default: $DISPO_ROOT/logs/slurm.
#   DISPO_MASTER_PORT     rendezvous port. Default: 20000 + SLURM_JOB_ID % 20000.
#   DISPO_VENV            virtualenv to activate on every node (host runs; unused inside a container).
#   DISPO_CONTAINER_IMAGE pyxis/enroot image (e.g. the docker/Dockerfile image). Ignored, with a notice, when srun
#   DISPO_CONTAINER_MOUNTS  has no --container-image (no pyxis). Mounts default to "$DISPO_ROOT:$DISPO_ROOT".
# Overrides for the trainer are the sbatch script's arguments: sbatch qwen3_8b_dispo.sbatch trainer.max_steps=10

set -euo pipefail

dispo_die() {
	echo "dispo: error: $*" >&2
	exit 1
}

[[ -n "${SLURM_JOB_ID:-}" ]] || dispo_die "SLURM_JOB_ID is unset: submit with sbatch (common.sh runs inside a job)"
[[ -n "${DISPO_CONFIG:-}" ]] || dispo_die "DISPO_CONFIG is unset: the recipe script must set the YAML config"

DISPO_ROOT="${DISPO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$DISPO_ROOT" || dispo_die "DISPO_ROOT=$DISPO_ROOT is not a directory on $(hostname)"
[[ -f "$DISPO_CONFIG" ]] || dispo_die "config $DISPO_CONFIG not found under $DISPO_ROOT; set DISPO_CONFIG"

: "${DISPO_ENTRYPOINT:=megatron-dispo train}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
: "${DISPO_LOG_DIR:=$DISPO_ROOT/logs/slurm}"
: "${DISPO_MASTER_PORT:=$((20000 + SLURM_JOB_ID % 20000))}"

# --- rendezvous from the first node of the allocation ---------------------------------------------------------
mapfile -t DISPO_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#DISPO_NODES[@]} -gt 0 ]] || dispo_die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no nodes"
DISPO_MASTER_NODE="${DISPO_NODES[0]}"
DISPO_MASTER_ADDR="$(scontrol show node "$DISPO_MASTER_NODE" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')"
DISPO_MASTER_ADDR="${DISPO_MASTER_ADDR:-$DISPO_MASTER_NODE}"
DISPO_NNODES="${SLURM_JOB_NUM_NODES:-${#DISPO_NODES[@]}}"
export MASTER_ADDR="$DISPO_MASTER_ADDR" MASTER_PORT="$DISPO_MASTER_PORT"

# --- communication / inference environment (override by exporting before sbatch) ------------------------------
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"          # Megatron: keeps TP/SP communication kernels ordered with compute
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"      # a dead rank aborts the job instead of hanging until the time limit
: "${NCCL_DEBUG:=WARN}"
: "${NCCL_IB_TIMEOUT:=22}"
: "${NCCL_NVLS_ENABLE:=0}"                     # NVLS buffers compete with vLLM's KV cache for memory
: "${VLLM_ENABLE_V1_MULTIPROCESSING:=0}"       # vLLM engine runs in the training process (colocated ranks)
: "${VLLM_WORKER_MULTIPROC_METHOD:=spawn}"
: "${TOKENIZERS_PARALLELISM:=false}"
: "${PYTHONUNBUFFERED:=1}"
export OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG NCCL_IB_TIMEOUT \
	NCCL_NVLS_ENABLE VLLM_ENABLE_V1_MULTIPROCESSING VLLM_WORKER_MULTIPROC_METHOD TOKENIZERS_PARALLELISM PYTHONUNBUFFERED
# NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME, HF_HOME, ... pass through when exported: srun --export=ALL.

# --- logs: one folder per job, one torchrun log folder per node ------------------------------------------------
DISPO_JOB_LOG_DIR="$DISPO_LOG_DIR/${SLURM_JOB_NAME:-dispo}-$SLURM_JOB_ID"
mkdir -p "$DISPO_JOB_LOG_DIR"
export DISPO_JOB_LOG_DIR

# --- optional pyxis container ----------------------------------------------------------------------------------
DISPO_CONTAINER_FLAGS=()
if [[ -n "${DISPO_CONTAINER_IMAGE:-}" ]]; then
	if srun --help 2>&1 | grep -q -- '--container-image'; then
		DISPO_CONTAINER_FLAGS=(
			"--container-image=$DISPO_CONTAINER_IMAGE"
			"--container-mounts=${DISPO_CONTAINER_MOUNTS:-$DISPO_ROOT:$DISPO_ROOT}"
			"--container-workdir=$DISPO_ROOT"
		)
	else
		echo "dispo: pyxis not available (srun has no --container-image): ignoring DISPO_CONTAINER_IMAGE," \
			"running on the host environment"
	fi
fi
if [[ -n "${DISPO_VENV:-}" && ${#DISPO_CONTAINER_FLAGS[@]} -eq 0 ]]; then
	# shellcheck source=/dev/null
	source "$DISPO_VENV/bin/activate" || dispo_die "cannot activate DISPO_VENV=$DISPO_VENV"
fi

# dispo_launch [overrides...]: run DISPO_ENTRYPOINT under torchrun on every node of the allocation.
dispo_launch() {
	local -a entrypoint
	read -r -a entrypoint <<<"$DISPO_ENTRYPOINT"
	local -a srun_flags=(--nodes="$DISPO_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL --label)
	if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
		srun_flags+=(--cpus-per-task="$SLURM_CPUS_PER_TASK") # Slurm 22.05 srun no longer inherits it from sbatch
	fi
	echo "dispo: job $SLURM_JOB_ID nodes=${DISPO_NODES[*]} nnodes=$DISPO_NNODES ranks_per_node=$GPUS_PER_NODE" \
		"master=$MASTER_ADDR:$MASTER_PORT config=$DISPO_CONFIG logs=$DISPO_JOB_LOG_DIR"
	echo "dispo: command: torchrun ... ${entrypoint[*]} $DISPO_CONFIG $*"
	local rc=0
	# Single quotes on purpose: SLURM_NODEID and the per-node log folder are expanded on each node, not here.
	# shellcheck disable=SC2016
	srun "${srun_flags[@]}" "${DISPO_CONTAINER_FLAGS[@]}" bash -c '
		exec torchrun \
			--nnodes="$0" --node-rank="$SLURM_NODEID" --nproc-per-node="$1" \
			--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
			--log-dir="$DISPO_JOB_LOG_DIR/node$SLURM_NODEID" --tee=3 \
			--no-python "${@:2}"
	' "$DISPO_NNODES" "$GPUS_PER_NODE" "${entrypoint[@]}" "$DISPO_CONFIG" "$@" || rc=$?
	echo "dispo: job $SLURM_JOB_ID finished rc=$rc (per-rank logs under $DISPO_JOB_LOG_DIR)"
	return "$rc"
}
