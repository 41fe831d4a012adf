#!/usr/bin/env python3
"""The one-shot cut under its old flags: a thin alias of ``megashear one-shot``.

    python tools/one_shot_prune.py --load CKPT --save OUT [--method leading|importance] \\
        [--target-num-layers L] [--target-hidden-size H] [--target-num-attention-heads A] \\
        [--target-num-query-groups G] [--target-ffn-hidden-size F] [--tp N] [--pp M] \\
        [--overwrite]

runs ``megashear one-shot --checkpoint.load=CKPT --checkpoint.save=OUT
--pruning.target_num_layers=L ... --parallel.tp=N --overwrite=true``. The method defaults to
``leading`` here, as this script always cut (``megashear one-shot`` defaults to
``importance``). Any other flag is passed on unchanged, so the command's own spelling works too.
"""

from __future__ import annotations

import os
import sys

from megashear.pruning.targets import TARGET_FIELDS

ALIASES = {
    "--load": "--checkpoint.load",
    "--save": "--checkpoint.save",
    "--tp": "--parallel.tp",
    "--pp": "--parallel.pp",
    **{f"--target-{f.replace('_', '-')}": f"--pruning.target_{f}" for f in TARGET_FIELDS},
}


def translate(argv: list[str]) -> list[str]:
    """The old flags in the command's spelling (``--flag value`` and ``--flag=value`` alike)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name == "--overwrite" and not eq:
            out.append("--overwrite=true")
        elif name == "--dtype":
            raise ValueError("--dtype is gone: the cut keeps the source's stored dtype")
        elif name in ALIASES:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            out.append(f"{ALIASES[name]}={value}")
        else:
            out.append(arg)
        i += 1
    if not any(a.startswith("--method") for a in out):
        out.insert(0, "--method=leading")
    return ["one-shot", *out]


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import main as megashear
    from megashear.cli import report_error

    try:
        args = translate(sys.argv[1:] if argv is None else argv)
        load = next((a.split("=", 1)[1] for a in args if a.startswith("--checkpoint.load=")), None)
        if load is not None and not os.path.exists(load):
            raise ValueError(f"--load {load} does not exist")
    except ValueError as exc:
        return report_error(exc)
    return megashear(args)


if __name__ == "__main__":
    sys.exit(main())
