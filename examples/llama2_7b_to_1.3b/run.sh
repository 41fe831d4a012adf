#!/usr/bin/env bash
# LLaMA2-7B -> Sheared-LLaMA-1.3B, end to end, in Megatron's style.
#   bash examples/llama2_7b_to_1.3b/run.sh [convert|preprocess|prune|finalize|continue|export|all]
#   bash examples/llama2_7b_to_1.3b/run.sh continue-distill   # recovery by KD from the 7B instead
# GPUs: pruning 8 (TP2 x DP4), continued pre-training 16 (DP16 over 2 nodes).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (or RDZV_ENDPOINT); see ../common/launch.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common/launch.sh"
STAGE=${1:-all}

HF_DIR=${HF_DIR:-/models/Llama-2-7b-hf}          # a local Hugging Face checkpoint
RAW_DATA=${RAW_DATA:-/data/redpajama}              # one JSONL(.gz/.xz) file per domain
TOKENIZER=${TOKENIZER:-$HF_DIR/tokenizer.model}

CONVERT_ARGS=(--load "$HF_DIR" --save ckpt/llama2-7b-megatron --tp 2 --pp 1)
DATA_ARGS=(--input "$RAW_DATA" --tokenizer "$TOKENIZER" --output-dir data/redpajama
           --valid-tokens-per-domain 2000000 --workers 32)

stage() { [[ "$STAGE" == all || "$STAGE" == "$1" ]]; }

if stage convert; then python tools/convert_checkpoint.py hf-to-megatron "${CONVERT_ARGS[@]}"; fi
if stage preprocess; then python tools/preprocess_data.py "${DATA_ARGS[@]}"; fi
if stage prune; then megashear_run prune --config "$HERE/prune.yaml"; fi
if stage finalize; then
  python -m megashear.cli finalize --config "$HERE/prune.yaml" \
    --checkpoint.load=ckpt/prune-1.3b --checkpoint.save=ckpt/sheared-1.3b
fi
if stage continue; then megashear_run train --config "$HERE/continue.yaml"; fi
# not part of "all": the alternative to "continue" (docs/method.md §7)
if [[ "$STAGE" == continue-distill ]]; then
  megashear_run train --config "$HERE/continue_distill.yaml"
fi
if stage export; then
  python tools/convert_checkpoint.py megatron-to-hf --load ckpt/continue-1.3b \
    --save hf/Sheared-LLaMA-1.3B --tokenizer "$TOKENIZER"
fi
