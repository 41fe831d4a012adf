#!/usr/bin/env python3
"""``megashear fit-reference`` under its old flags: a thin alias.

    python tools/fit_reference_loss.py FILE.json --target-params N
    python tools/fit_reference_loss.py FILE.json --target-preset sheared-llama-1.3b \\
        [--source-preset llama2-7b] [--write-manifest data/manifest.yaml]

is ``megashear fit-reference --points=FILE.json --target_params=N`` (``--target_preset``,
``--source_preset``, ``--write_manifest``), the same function
(:func:`megashear.jobs.fit_reference.run`): it prints the per-domain reference losses as JSON.
FILE.json is ``{"domain": [[params, loss], ...], ...}`` (three or more points per domain).
"""

from __future__ import annotations

import json
import sys


def _old_flag(name: str) -> str:
    return "points" if name == "points" else "--" + name.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser, report_error
    from megashear.jobs.fit_reference import FitReferenceConfig, run

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--target-params", type=float)
    group.add_argument("--target-preset", help="a pruning target preset, e.g. sheared-llama-1.3b")
    parser.add_argument(
        "--source-preset",
        default="llama2-7b",
        help="source shape the target preset inherits vocab and head dim from",
    )
    parser.add_argument("--write-manifest", help="store the losses as reference_loss there")
    args = parser.parse_args(argv)
    cfg = FitReferenceConfig(
        points=args.points,
        target_params=args.target_params,
        target_preset=args.target_preset or "",
        source_preset=args.source_preset,
        write_manifest=args.write_manifest or "",
    )
    try:
        losses = run(cfg, flag=_old_flag)
    except (ValueError, OSError) as exc:
        return report_error(exc)
    print(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
