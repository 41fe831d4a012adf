#!/usr/bin/env bash
# Shared torchrun launcher for the examples, in Megatron's style.
#
# One node:      NPROC_PER_NODE=8 bash <example>/run.sh
# Several nodes: run on every node with the same MASTER_ADDR and its own NODE_RANK:
#                NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash <example>/run.sh
# Rendezvous:    RDZV_ENDPOINT=node0:29500 NNODES=2 bash <example>/run.sh   (no NODE_RANK needed)
# Slurm:         sbatch examples/common/slurm.sbatch <example>/run.sh
set -euo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  DISTRIBUTED_ARGS=(
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES"
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-megashear}"
  )
else
  DISTRIBUTED_ARGS=(
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  )
fi

# megashear_run SUBCOMMAND ARGS...: the megashear command under torchrun.
megashear_run() {
  torchrun "${DISTRIBUTED_ARGS[@]}" -m megashear.cli "$@"
}

# megashear_run_restarting SUBCOMMAND ARGS...: megashear_run, relaunched after a failure for as
# long as each attempt moved the checkpoint forward (at most MAX_RESTARTS relaunches, default
# 3). Give it checkpoint.load = checkpoint.save: the first launch starts fresh, every relaunch
# resumes from the last checkpoint. Each attempt is a fresh torchrun (on the next port without a
# rendezvous endpoint): torch's in-place restart (torchrun --max-restarts) often fails to rebuild
# gloo's connections, or hangs, after one rank is killed with kill -9.
megashear_run_restarting() {
  local save="" arg attempt=0 rc before after
  for arg in "$@"; do
    [[ "$arg" == --checkpoint.save=* ]] && save="${arg#--checkpoint.save=}"
  done
  local tracker="$save/latest_checkpointed_iteration.txt"
  while true; do
    before=$(cat "$tracker" 2>/dev/null || echo none)
    rc=0
    megashear_run "$@" || rc=$?
    [[ $rc -eq 0 ]] && return 0
    after=$(cat "$tracker" 2>/dev/null || echo none)
    if [[ -z "$save" || "$after" == "$before" || $attempt -ge ${MAX_RESTARTS:-3} ]]; then
      echo "megashear_run_restarting: attempt $((attempt + 1)) failed (exit $rc) at checkpoint" \
        "$after; not relaunching" >&2
      return "$rc"
    fi
    attempt=$((attempt + 1))
    echo "megashear_run_restarting: exit $rc; relaunch $attempt from checkpoint $after" >&2
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
      DISTRIBUTED_ARGS=("${DISTRIBUTED_ARGS[@]/#$MASTER_PORT/$((MASTER_PORT + 1))}")
      MASTER_PORT=$((MASTER_PORT + 1))
    fi
  done
}
