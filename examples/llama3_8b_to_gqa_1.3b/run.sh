#!/usr/bin/env bash
# LLaMA3-8B (GQA) -> a 1.3B-shaped GQA model, end to end, in Megatron's style.
#   bash examples/llama3_8b_to_gqa_1.3b/run.sh [convert|preprocess|prune|finalize|continue|export|all]
# GPUs: pruning 16 (TP2 x PP2 x DP4), continued pre-training 16 (DP16 over 2 nodes).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (or RDZV_ENDPOINT); see ../common/launch.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common/launch.sh"
STAGE=${1:-all}

HF_DIR=${HF_DIR:-/models/Meta-Llama-3-8B}          # a local Hugging Face checkpoint
RAW_DATA=${RAW_DATA:-/data/redpajama}              # one JSONL(.gz/.xz) file per domain
# the HF directory: its tokenizer.json (LLaMA-3 ships no sentencepiece model; its original
# tokenizer.model is tiktoken format, which preprocess_data.py refuses with a one-line error)
TOKENIZER=${TOKENIZER:-$HF_DIR}

CONVERT_ARGS=(--load "$HF_DIR" --save ckpt/llama3-8b-megatron --tp 2 --pp 2)
DATA_ARGS=(--input "$RAW_DATA" --tokenizer "$TOKENIZER" --output-dir data/redpajama
           --valid-tokens-per-domain 2000000 --workers 32)

stage() { [[ "$STAGE" == all || "$STAGE" == "$1" ]]; }

if stage convert; then python tools/convert_checkpoint.py hf-to-megatron "${CONVERT_ARGS[@]}"; fi
if stage preprocess; then python tools/preprocess_data.py "${DATA_ARGS[@]}"; fi
if stage prune; then megashear_run prune --config "$HERE/prune.yaml"; fi
if stage finalize; then
  python -m megashear.cli finalize --config "$HERE/prune.yaml" \
    --checkpoint.load=ckpt/prune-llama3-gqa --checkpoint.save=ckpt/sheared-llama3-gqa
fi
if stage continue; then megashear_run train --config "$HERE/continue.yaml"; fi
if stage export; then
  python tools/convert_checkpoint.py megatron-to-hf --load ckpt/continue-llama3-gqa \
    --save hf/Sheared-LLaMA3-GQA-1.3B --tokenizer "$TOKENIZER"
fi
