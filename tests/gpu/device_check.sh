#!/usr/bin/env bash
# One prepared check for a one-GPU device machine (issue 24): Python 3.12 + torch with CUDA, no internet, no vLLM,
# no Transformer Engine, no Megatron-Core. Run from the repository root with the megatron-core 0.16.1 wheel in wheels/
# (git-ignored; `pip download megatron-core==0.16.1 --no-deps --python-version 3.12 --only-binary=:all: -d wheels/`):
#
#   bash tests/gpu/device_check.sh        # device tool: run(command="bash tests/gpu/device_check.sh", carry=["wheels"])
#
# Steps, each under its own time limit (about 7 minutes in all): a venv that sees the system packages plus the wheel,
# `pytest tests/gpu`, and the trainer-side step at world size 1 with NCCL (tests/gpu/trainer_step_check.py). Logs go
# to $OUT (a temporary folder when unset); one summary table is printed at the end. Exit 1 if any step failed.
set -uo pipefail

OUT="${OUT:-$(mktemp -d)}"
VENV="${DISPO_DEVICE_VENV:-/tmp/dispo-device-venv}"
SUMMARY="$OUT/summary.tsv"
mkdir -p "$OUT"
printf 'step\tstatus\tseconds\tdetail\n' > "$SUMMARY"
failed=0

record() {  # step, exit status, seconds, detail
    local status="ok"
    if [ "$2" -ne 0 ]; then
        status="FAILED($2)"
        failed=1
    fi
    printf '%s\t%s\t%s\t%s\n' "$1" "$status" "$3" "$4" >> "$SUMMARY"
}

# 1. environment: the venv sees the image's torch/transformers/pytest and gets megatron-core from the wheel
started=$SECONDS
{
    python3 -m venv --system-site-packages "$VENV" \
        && "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile wheels/megatron_core-0.16.1-*.whl \
        && "$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "mcore", m.__version__)'
} > "$OUT/env.log" 2>&1
status=$?
record "venv + megatron-core wheel" "$status" "$((SECONDS - started))" "$(tail -n 1 "$OUT/env.log")"
PY="$VENV/bin/python"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1

# 2. the GPU tests (bf16 layouts vs fp32, throughput); layouts needing more GPUs skip themselves
started=$SECONDS
timeout 300 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
status=$?
record "pytest tests/gpu" "$status" "$((SECONDS - started))" "$(grep -E '(passed|failed|error|skipped)' "$OUT/pytest_gpu.log" | tail -n 1)"

# 3. one trainer-side step on cuda with NCCL at world size 1
started=$SECONDS
timeout 150 "$PY" tests/gpu/trainer_step_check.py --out "$OUT/trainer_step.json" > "$OUT/trainer_step.log" 2>&1
status=$?
record "trainer step (NCCL, world 1)" "$status" "$((SECONDS - started))" "see the phase table below"

echo "== device check (logs in $OUT)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
echo "== trainer step phases"
sed -n '/^phase /,$p' "$OUT/trainer_step.log"
exit "$failed"
