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
