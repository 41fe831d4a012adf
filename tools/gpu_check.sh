#!/usr/bin/env bash
# The GPU check (issue 28, item 6): on one CUDA GPU without network, in at most 8 minutes, a
# training step, a pruning step, a KD step and finalisation at TP1 in bf16 on a
# Llama-3.2-1B-shaped model with random weights; tokens/s, MFU and peak GPU memory next to
# `megashear plan`'s prediction (tools/gpu_check.py prints one JSON line per phase).
#
# The GPU machine has python3 with torch (CUDA), transformers, safetensors, sentencepiece and
# tokenizers. What else megashear needs travels in the working tree as wheels under
# build/gpu_wheels (ignored by git, a few MiB):
#
#   tools/gpu_check.sh --prepare     # here, with the package registry: fetch / build the wheels
#   tools/gpu_check.sh               # on the GPU machine: install them offline, run the check
#
# Environment: MEGASHEAR_WHEELS (the wheel folder), GPU_CHECK_SECONDS (the check's time limit,
# default 450), MEGASHEAR_PEAK_TFLOPS (the GPU's dense bf16 peak, when its name is not known).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${MEGASHEAR_WHEELS:-$ROOT/build/gpu_wheels}"
VENV="$ROOT/build/gpu_venv"

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    # megatron-core ships compiled helpers: one wheel per CPython the GPU machine may have
    for py in 3.10 3.11 3.12 3.13; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
            --python-version "$py" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            "megatron-core==0.16.1" || echo "no megatron-core wheel for python $py" >&2
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "psutil>=5.9"
    python3 -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" "$ROOT"
    du -sh "$WHEELS"
    ls -1 "$WHEELS"
    exit 0
fi

cd "$ROOT"
if [[ ! -d "$WHEELS" ]]; then
    echo "error: no wheels in $WHEELS (run tools/gpu_check.sh --prepare where pip can reach" \
        "the registry, and carry build/gpu_wheels along)" >&2
    exit 2
fi
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device")'

# A venv over the machine's own packages (torch, transformers, ...), plus the wheels, offline.
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps \
    megatron-core psutil megashear
"$VENV/bin/python" -c 'import megatron.core, megashear, yaml, numpy, tqdm' \
    || { echo "error: a dependency is missing on this machine" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
# the planner alone first (no GPU memory): what it predicts for the three steps
"$VENV/bin/megashear" plan --source=llama3.2-1b --job=train --gpus=1 --seq_length=2048 \
    --global_batch_size=8 --layout.tp=1 --layout.pp=1 --top=1 | tail -n 1
timeout "${GPU_CHECK_SECONDS:-450}" "$VENV/bin/python" tools/gpu_check.py \
    --seq-length 2048 --global-batch-size 8 --steps 3 --workdir "$ROOT/build/gpu_check_run" "$@"
echo "gpu_check: done in $(( $(date +%s) - start )) s"
