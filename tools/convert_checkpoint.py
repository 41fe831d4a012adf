#!/usr/bin/env python3
"""Checkpoint conversion between Hugging Face LLaMA and megatron-core distributed checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --load HF_DIR --save MEGATRON_DIR \\
        [--tp N --pp M] [--dtype fp32|bf16|fp16] [--overwrite]
    python tools/convert_checkpoint.py megatron-to-hf --load MEGATRON_DIR --save HF_DIR \\
        [--tokenizer tokenizer.model] [--dtype ...] [--overwrite]
    python tools/convert_checkpoint.py meta-to-megatron --load META_DIR --save MEGATRON_DIR \\
        [--tp N --pp M]
    python tools/convert_checkpoint.py reshard --load MEGATRON_DIR --save OUT [--tp N --pp M]

megashear's checkpoints store every tensor by its global shape (megatron-core
dist_checkpointing), so one checkpoint loads at any TP/PP layout: ``--tp/--pp`` are checked
against the model (heads, groups, FFN and vocab divisible by TP; layers by PP) and recorded, and
``reshard`` rewrites a checkpoint after that check. Bad input gives a one-line error, exit code 2,
and no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _check_layout(cfg, tp: int, pp: int) -> None:
    from megashear.config import ParallelConfig
    from megashear.models.llama import validate_layout

    validate_layout(cfg, ParallelConfig(tp=tp, pp=pp), tp * pp)


def hf_to_megatron(args) -> dict:
    from tqdm import tqdm

    from megashear.conversion.hf import read_hf
    from megashear.conversion.megatron_layout import canonical_to_megatron
    from megashear.training.checkpointing import save_megatron_checkpoint

    if os.path.exists(args.save) and not args.overwrite:
        raise ValueError(f"output {args.save} exists (pass --overwrite to replace it)")
    with tqdm(total=3, desc="hf-to-megatron") as bar:
        weights, cfg = read_hf(args.load, _dtype(args.dtype))
        _check_layout(cfg, args.tp, args.pp)
        bar.update()
        state = canonical_to_megatron(weights, cfg)
        bar.update()
        save_megatron_checkpoint(state, cfg, args.save, overwrite=args.overwrite)
        bar.update()
    return {"saved": args.save, "model": cfg.to_dict(), "tp": args.tp, "pp": args.pp}


def meta_to_megatron(args) -> dict:
    from megashear.conversion.megatron_layout import canonical_to_megatron
    from megashear.conversion.meta import read_meta
    from megashear.training.checkpointing import save_megatron_checkpoint

    if os.path.exists(args.save) and not args.overwrite:
        raise ValueError(f"output {args.save} exists (pass --overwrite to replace it)")
    weights, cfg = read_meta(args.load)
    if args.dtype:
        weights = {k: v.to(_dtype(args.dtype)) for k, v in weights.items()}
    _check_layout(cfg, args.tp, args.pp)
    save_megatron_checkpoint(canonical_to_megatron(weights, cfg), cfg, args.save, args.overwrite)
    return {"saved": args.save, "model": cfg.to_dict(), "tp": args.tp, "pp": args.pp}


def megatron_to_hf(args) -> dict:
    from tqdm import tqdm

    from megashear.conversion.hf import write_hf
    from megashear.conversion.megatron_layout import megatron_to_canonical
    from megashear.training.checkpointing import load_megatron_checkpoint

    if os.path.exists(args.save) and not args.overwrite:
        raise ValueError(f"output {args.save} exists (pass --overwrite to replace it)")
    with tqdm(total=2, desc="megatron-to-hf") as bar:
        state, cfg = load_megatron_checkpoint(args.load)
        bar.update()
        write_hf(
            megatron_to_canonical(state, cfg),
            cfg,
            args.save,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
            dtype=_dtype(args.dtype),
        )
        bar.update()
    return {"saved": args.save, "model": cfg.to_dict()}


def reshard(args) -> dict:
    from megashear.training.checkpointing import (
        load_megatron_checkpoint,
        save_megatron_checkpoint,
    )

    if os.path.exists(args.save) and not args.overwrite:
        raise ValueError(f"output {args.save} exists (pass --overwrite to replace it)")
    state, cfg = load_megatron_checkpoint(args.load)
    _check_layout(cfg, args.tp, args.pp)
    save_megatron_checkpoint(state, cfg, args.save, overwrite=args.overwrite)
    return {"saved": args.save, "tp": args.tp, "pp": args.pp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf-to-megatron", "meta-to-megatron", "megatron-to-hf", "reshard"):
        p = sub.add_parser(name)
        p.add_argument("--load", required=True)
        p.add_argument("--save", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--dtype", choices=sorted(DTYPES))
        if name != "megatron-to-hf":
            p.add_argument("--tp", type=int, default=1)
            p.add_argument("--pp", type=int, default=1)
        else:
            p.add_argument("--tokenizer", help="sentencepiece tokenizer.model to ship")
    args = parser.parse_args(argv)
    if not os.path.exists(args.load):
        print(f"error: --load {args.load} does not exist", file=sys.stderr)
        return 2
    commands = {
        "hf-to-megatron": hf_to_megatron,
        "meta-to-megatron": meta_to_megatron,
        "megatron-to-hf": megatron_to_hf,
        "reshard": reshard,
    }
    try:
        result = commands[args.command](args)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from megashear.parallel import destroy

        destroy()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
