#!/usr/bin/env python3
"""``megashear convert`` under the Megatron-style flags it always had: a thin alias.

    python tools/convert_checkpoint.py hf-to-megatron --load HF_DIR --save MEGATRON_DIR \\
        [--parallel.tp N --parallel.pp M] [--dtype fp32|bf16|fp16] [--overwrite]
    python tools/convert_checkpoint.py megatron-to-hf --load MEGATRON_DIR --save HF_DIR \\
        [--tokenizer tokenizer.model|tokenizer.json|HF_DIR] [--dtype ...] [--overwrite]
    python tools/convert_checkpoint.py meta-to-megatron --load META_DIR --save MEGATRON_DIR \\
        [--parallel.tp N --parallel.pp M]
    python tools/convert_checkpoint.py reshard --load MEGATRON_DIR --save OUT \\
        [--parallel.tp N --parallel.pp M]

is ``megashear convert hf-to-megatron --load=HF_DIR --save=MEGATRON_DIR --parallel.tp=N
--overwrite=true`` (short ``--tp/--pp`` as well), the same function
(:func:`megashear.jobs.convert.run`, which documents the conversion) under the same rules: bad
input is one ``error:`` line, exit code 2, and no partial output; the result is one JSON line.
"""

from __future__ import annotations

import sys

from megashear.jobs.convert import DIRECTIONS, DTYPES, ConvertConfig, ConvertLayout


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser, run_tool
    from megashear.config_io import add_field_option
    from megashear.jobs.convert import run

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    for name in DIRECTIONS:
        p = sub.add_parser(name)
        p.add_argument("--load", required=True)
        p.add_argument("--save", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--dtype", choices=sorted(DTYPES))
        if name != "megatron-to-hf":
            add_field_option(p, ConvertConfig, "parallel.tp", "--tp")
            add_field_option(p, ConvertConfig, "parallel.pp", "--pp")
        else:
            p.add_argument(
                "--tokenizer",
                default="",
                help="tokenizer to ship: a sentencepiece .model, a tokenizer.json or an HF "
                "directory holding one; its vocabulary must equal the model's",
            )
    args = parser.parse_args(argv)
    cfg = ConvertConfig(
        direction=args.direction,
        load=args.load,
        save=args.save,
        overwrite=args.overwrite,
        dtype=args.dtype,
        tokenizer=getattr(args, "tokenizer", ""),
        parallel=ConvertLayout(tp=getattr(args, "tp", 1), pp=getattr(args, "pp", 1)),
    )
    return run_tool(lambda: run(cfg))


if __name__ == "__main__":
    sys.exit(main())
