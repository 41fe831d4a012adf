#!/usr/bin/env python3
"""Checkpoint conversion between Hugging Face LLaMA and megatron-core distributed checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --load HF_DIR --save MEGATRON_DIR \\
        [--parallel.tp N --parallel.pp M] [--dtype fp32|bf16|fp16] [--overwrite]
    python tools/convert_checkpoint.py megatron-to-hf --load MEGATRON_DIR --save HF_DIR \\
        [--tokenizer tokenizer.model|tokenizer.json|HF_DIR] [--dtype ...] [--overwrite]
    python tools/convert_checkpoint.py meta-to-megatron --load META_DIR --save MEGATRON_DIR \\
        [--parallel.tp N --parallel.pp M]
    python tools/convert_checkpoint.py reshard --load MEGATRON_DIR --save OUT \\
        [--parallel.tp N --parallel.pp M]

Conversion streams: no model is built and memory holds about one layer (plus one tensor being
written), whatever the model size. Reading HF checks every key and shape before any output is
written; megatron checkpoints are read one layer at a time through megatron-core's
dist_checkpointing and written through PyTorch DCP with each chunk produced on demand.

megashear's checkpoints store every tensor by its global shape (megatron-core
dist_checkpointing), so one checkpoint loads at any TP/PP layout. ``--parallel.tp/--parallel.pp``
(the ``megashear`` command's names; short ``--tp/--pp``) are checked against the model (heads, groups, FFN and vocab divisible by TP; layers by PP), the chunks on
disk are cut the way those TP ranks hold them, and the layout is recorded; ``reshard`` rewrites
a checkpoint for another layout. The stored dtype is the source's unless ``--dtype`` is given.
Hugging Face configs are read strictly (tied embeddings, ``rope_theta`` or ``rope_parameters``,
llama3 rope scaling; any key that would change the model and is not understood is refused).
Bad input gives a one-line error, exit code 2, and no partial output (outputs are written under
a temporary name and renamed at the end).
"""

from __future__ import annotations

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


def _check_output(args) -> None:
    from megashear.checkpoint.publish import check_output_path

    check_output_path(args.load, args.save, args.overwrite)


def _write_megatron(args, cfg, get_canonical, dtype) -> dict:
    """Stream canonical tensors into a megatron checkpoint cut for ``--tp/--pp``."""
    from megashear.conversion.dist_stream import write_checkpoint
    from megashear.conversion.megatron_layout import megatron_tensor

    _check_output(args)
    _check_layout(cfg, args.tp, args.pp)
    write_checkpoint(
        args.save,
        cfg,
        lambda name: megatron_tensor(name, get_canonical, cfg),
        dtype,
        tp=args.tp,
        pp=args.pp,
        overwrite=args.overwrite,
    )
    return {
        "saved": args.save,
        "model": cfg.to_dict(),
        "tp": args.tp,
        "pp": args.pp,
        "dtype": str(dtype).replace("torch.", ""),
    }


def hf_to_megatron(args) -> dict:
    from megashear.conversion.hf import HFReader

    _check_output(args)

    reader = HFReader(args.load, _dtype(args.dtype))
    return _write_megatron(args, reader.cfg, reader, reader.dtype)


def meta_to_megatron(args) -> dict:
    from megashear.conversion.meta import MetaReader

    _check_output(args)

    reader = MetaReader(args.load, _dtype(args.dtype))
    return _write_megatron(args, reader.cfg, reader, reader.dtype)


def megatron_to_hf(args) -> dict:
    from megashear.conversion.dist_stream import CheckpointReader
    from megashear.conversion.hf import write_hf_stream
    from megashear.conversion.megatron_layout import canonical_tensor
    from megashear.parallel import init_distributed

    _check_output(args)
    init_distributed()
    reader = CheckpointReader(args.load, _dtype(args.dtype))
    cfg = reader.cfg
    write_hf_stream(
        lambda key: canonical_tensor(key, reader, cfg),
        cfg,
        args.save,
        reader.dtype,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        progress=True,
    )
    return {"saved": args.save, "model": cfg.to_dict()}


def reshard(args) -> dict:
    from megashear.conversion.dist_stream import CheckpointReader, write_checkpoint
    from megashear.parallel import init_distributed

    _check_output(args)
    init_distributed()
    reader = CheckpointReader(args.load, _dtype(args.dtype))
    _check_layout(reader.cfg, args.tp, args.pp)
    write_checkpoint(
        args.save,
        reader.cfg,
        reader,
        reader.dtype,
        tp=args.tp,
        pp=args.pp,
        overwrite=args.overwrite,
    )
    return {"saved": args.save, "tp": args.tp, "pp": args.pp}


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser
    from megashear.config import RunConfig
    from megashear.config_io import add_field_option

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf-to-megatron", "meta-to-megatron", "megatron-to-hf", "reshard"):
        p = sub.add_parser(name)
        p.add_argument("--load", required=True)
        p.add_argument("--save", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--dtype", choices=sorted(DTYPES))
        if name != "megatron-to-hf":
            add_field_option(p, RunConfig, "parallel.tp", "--tp")
            add_field_option(p, RunConfig, "parallel.pp", "--pp")
        else:
            p.add_argument(
                "--tokenizer",
                help="tokenizer to ship: a sentencepiece .model, a tokenizer.json or an HF "
                "directory holding one; its vocabulary must equal the model's",
            )
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
    from megashear.cli import run_tool

    return run_tool(lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
