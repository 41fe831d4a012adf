#!/usr/bin/env python3
"""Cut a megashear checkpoint to a target shape without learned masks (one-shot baseline).

    python tools/one_shot_prune.py --load CKPT --save OUT \\
        [--target-num-layers L] [--target-hidden-size H] [--target-num-attention-heads A] \\
        [--target-num-query-groups G] [--target-ffn-hidden-size F] \\
        [--parallel.tp N --parallel.pp M] [--dtype fp32|bf16|fp16] [--overwrite]

Every layer keeps its first G key/value groups with their first A/G query heads, the model its
first H hidden channels, every layer its first F FFN units, and the first L layers are kept
(``megashear.pruning.one_shot.leading_masks``); ``megashear.pruning.finalize.finalize`` slices
the weights (the survivors' masks are exactly 1, so nothing is rescaled; a tied model stays tied).
Unset target fields keep the source's size; the head dim, vocabulary and RoPE are the source's.

The source is read one layer at a time (``CheckpointReader``; layers that are cut are never
read) and the result is written through ``write_checkpoint`` under a temporary name renamed at the
end, chunked for ``--parallel.tp/--parallel.pp`` (short: ``--tp/--pp``; any layout loads it). It
is a plain model checkpoint: ``megashear train --checkpoint.load=OUT`` continues it. Bad input gives a one-line error, exit
code 2, and no output; an existing ``--save`` needs ``--overwrite``. Prints one JSON line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from megashear.pruning.targets import TARGET_FIELDS

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class LazyCanonical(Mapping):
    """Canonical weights of a checkpoint, each cut from the reader's tensors when asked for."""

    def __init__(self, reader, cfg) -> None:
        from megashear.layout import canonical_order

        self.reader, self.cfg = reader, cfg
        self.keys_ = canonical_order(cfg)

    def __getitem__(self, key: str):
        from megashear.conversion.megatron_layout import canonical_tensor

        if key not in self.keys_:
            raise KeyError(key)
        return canonical_tensor(key, self.reader, self.cfg)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def one_shot(args) -> dict:
    import torch

    from megashear.checkpoint.publish import check_output_path
    from megashear.config import ParallelConfig
    from megashear.conversion.dist_stream import CheckpointReader, write_checkpoint
    from megashear.conversion.megatron_layout import megatron_tensor
    from megashear.models.llama import validate_layout
    from megashear.parallel import init_distributed
    from megashear.pruning.one_shot import one_shot_prune
    from megashear.pruning.targets import make_target, validate_target

    check_output_path(args.load, args.save, args.overwrite)
    init_distributed()
    dtype = None if args.dtype is None else getattr(torch, DTYPES[args.dtype])
    reader = CheckpointReader(args.load, dtype)
    source = reader.cfg
    target = make_target(source, **{f: getattr(args, f"target_{f}") for f in TARGET_FIELDS})
    validate_target(source, target)
    validate_layout(target, ParallelConfig(tp=args.tp, pp=args.pp), args.tp * args.pp)
    weights, cfg = one_shot_prune(LazyCanonical(reader, source), source, target)
    write_checkpoint(
        args.save,
        cfg,
        lambda name: megatron_tensor(name, weights.__getitem__, cfg),
        reader.dtype,
        tp=args.tp,
        pp=args.pp,
        overwrite=args.overwrite,
        extra_meta={"one_shot": {"source": str(reader.dir), "source_model": source.to_dict()}},
        progress=False,
    )
    return {
        "saved": args.save,
        "model": cfg.to_dict(),
        "parameters": cfg.num_parameters(),
        "source_parameters": source.num_parameters(),
        "dtype": str(reader.dtype).replace("torch.", ""),
    }


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser
    from megashear.config import RunConfig
    from megashear.config_io import add_field_option

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="a megashear model checkpoint")
    parser.add_argument("--save", required=True)
    for field in TARGET_FIELDS:
        parser.add_argument(f"--target-{field.replace('_', '-')}", type=int, default=None)
    add_field_option(parser, RunConfig, "parallel.tp", "--tp")
    add_field_option(parser, RunConfig, "parallel.pp", "--pp")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.exists(args.load):
        print(f"error: --load {args.load} does not exist", file=sys.stderr)
        return 2
    from megashear.cli import run_tool

    return run_tool(lambda: one_shot(args))


if __name__ == "__main__":
    sys.exit(main())
