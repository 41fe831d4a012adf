#!/usr/bin/env python3
"""``megashear preprocess`` under its old flags: a thin alias.

    python tools/preprocess_data.py --input DIR_OR_FILES --tokenizer tokenizer.model \\
        --output-dir data/ [--valid-tokens-per-domain 2000000] [--workers 4] \\
        [--weights web=0.67,github=0.045,...] [--eos-token T] [--bos-token T] \\
        [--add-bos|--no-add-bos] [--add-eos|--no-add-eos] [--test-tokens-per-domain N]

is ``megashear preprocess --input=[...] --tokenizer=... --output_dir=data/
--weights={web: 0.67, github: 0.045} --add_bos=false ...``, the same function
(:func:`megashear.jobs.preprocess.run`, which documents what is written). As this script always
did, it prints the tokenizer, one report line per domain and the input size to stdout, and the
manifest's path last; malformed data is exit code 1, other bad input exit code 2, each one
``error:`` line naming the flags as spelled here.
"""

from __future__ import annotations

import argparse
import sys


def _old_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _weights(text: str) -> dict[str, float]:
    """``name=w,...`` as a mapping; a weight that is not a finite number >= 0 is a
    ``ValueError`` quoting it as given."""
    weights = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = float("nan")
        if not (weights[name] >= 0 and weights[name] != float("inf")):
            raise ValueError(f"--weights {part!r}: a weight must be a finite number >= 0")
    return weights


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser, one_line, report_error
    from megashear.jobs.preprocess import (
        PreprocessConfig,
        PreprocessError,
        report_line,
        run,
        tokenizer_line,
    )

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="a sentencepiece .model, an HF tokenizer.json, or a directory holding either",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--valid-tokens-per-domain", type=int, default=2_000_000)
    parser.add_argument(
        "--test-tokens-per-domain",
        type=int,
        default=0,
        help="also hold out a test split after the validation tokens (default: none)",
    )
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--weights", default="", help="name=w,... (default: uniform)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    parser.add_argument(
        "--max-bytes-per-domain", type=int, default=None, help="stop each domain after this much"
    )
    parser.add_argument("--bos-token", default=None, help="BOS token (default: the tokenizer's)")
    parser.add_argument("--eos-token", default=None, help="EOS token (default: the tokenizer's)")
    parser.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend BOS to every document (default: as the tokenizer's settings say)",
    )
    parser.add_argument(
        "--add-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append EOS to every document (default: yes, when the tokenizer has an EOS)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = PreprocessConfig(
            input=tuple(args.input),
            tokenizer=args.tokenizer,
            output_dir=args.output_dir,
            valid_tokens_per_domain=args.valid_tokens_per_domain,
            test_tokens_per_domain=args.test_tokens_per_domain,
            workers=args.workers,
            weights=_weights(args.weights),
            max_bad_fraction=args.max_bad_fraction,
            max_bytes_per_domain=args.max_bytes_per_domain,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            add_bos=args.add_bos,
            add_eos=args.add_eos,
        )
        result = run(cfg, flag=_old_flag)
    except PreprocessError as exc:
        print("\n".join(exc.report))
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        return report_error(exc)
    test = args.test_tokens_per_domain > 0
    print(tokenizer_line(result["tokenizer"]))
    for name, stats in result["domains"].items():
        print(report_line(name, stats, test))
    print(f"{result['input_bytes'] / 1e6:.1f} MB of input in {result['seconds']:.1f} s")
    print(result["manifest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
