#!/usr/bin/env python3
"""Fit per-domain scaling laws and print reference losses at a target size, as JSON.

    python tools/fit_reference_loss.py FILE.json --target-params N
    python tools/fit_reference_loss.py FILE.json --target-preset sheared-llama-1.3b \\
        [--source-preset llama2-7b] [--write-manifest data/manifest.yaml]

FILE.json is ``{"domain": [[params, loss], ...], ...}`` (three or more points per domain).
The target's parameter count includes embeddings, LM head and norms.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser

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
    if not os.path.isfile(args.points):
        print(f"error: {args.points} does not exist", file=sys.stderr)
        return 2
    from megashear.data.reference_loss import reference_losses

    try:
        try:
            with open(args.points, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{args.points} is not valid JSON ({exc})") from None
        if args.target_preset:
            from megashear.model_config import get_preset
            from megashear.pruning.targets import make_target

            n = make_target(get_preset(args.source_preset), args.target_preset).num_parameters()
        else:
            n = args.target_params
            if not (n > 0 and n != float("inf")):
                raise ValueError(f"--target-params must be a positive parameter count, got {n:g}")
        losses = reference_losses(data, n)
        if args.write_manifest:
            from megashear.data.manifest import load_manifest, save_manifest

            manifest = load_manifest(args.write_manifest, check_files=False)
            manifest.set_reference_losses(losses)
            save_manifest(manifest, args.write_manifest)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
