#!/usr/bin/env python3
"""Tokenize JSON Lines per domain into megatron-core indexed datasets and a domain manifest.

    python tools/preprocess_data.py --input DIR_OR_FILES --tokenizer tokenizer.model \\
        --output-dir data/ [--valid-tokens-per-domain 2000000] [--workers 4] \\
        [--weights web=0.67,github=0.045,...] [--eos-token T] [--bos-token T] \\
        [--add-bos|--no-add-bos] [--add-eos|--no-add-eos] [--test-tokens-per-domain N]

One domain per input file (``NAME.jsonl[.gz|.xz]``; a directory means all such files in it).
The tokenizer is a sentencepiece ``.model``, an HF ``tokenizer.json``, or an HF model directory
(see ``megashear.data.tokenizer``). Every document ends with EOS (unless ``--no-add-eos``); it
starts with BOS only if the tokenizer's settings (or ``--add-bos``) say so.
Writes ``OUT/NAME_train.{bin,idx}``, ``OUT/NAME_valid.{bin,idx}`` (the first validation tokens
of each domain's stream), with ``--test-tokens-per-domain`` ``OUT/NAME_test.{bin,idx}`` (the next
ones: a split for reporting that training and dynamic batch loading never read), and
``OUT/manifest.yaml``
(which records the tokenizer's kind, vocabulary, BOS/EOS ids and whether they were added).
More than ``--max-bad-fraction`` malformed lines in a domain is an error. A failed run leaves
the output directory as it was: everything is written into a staging folder beside it and moved
in (the manifest last) only when every domain succeeded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def _check_args(args) -> str | None:
    """What is wrong with the numbers and the output directory, if anything."""
    import math

    for flag in ("valid_tokens_per_domain", "test_tokens_per_domain"):
        if getattr(args, flag) < 0:
            return f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}"
    if args.workers < 1:
        return f"--workers must be at least 1, got {args.workers}"
    if args.max_bytes_per_domain is not None and args.max_bytes_per_domain < 1:
        return f"--max-bytes-per-domain must be at least 1, got {args.max_bytes_per_domain}"
    if not (math.isfinite(args.max_bad_fraction) and 0 <= args.max_bad_fraction <= 1):
        return f"--max-bad-fraction must be a fraction in [0, 1], got {args.max_bad_fraction}"
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return f"--output-dir {args.output_dir} exists and is not a directory"
    return None


def _publish(staging: str, out: str) -> None:
    """Move every file of ``staging`` into ``out`` (created if needed), then remove it."""
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser

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
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--weights", default="", help="name=w,... (default: uniform)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    parser.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=None,
        help="stop each domain after this much text",
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
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from megashear.data.preprocess import expand_inputs

    try:
        files = expand_inputs(args.input)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megashear.data.tokenizer import load_tokenizer

    tokenizer_options = {
        "bos": args.bos_token,
        "eos": args.eos_token,
        "add_bos": args.add_bos,
        "add_eos": args.add_eos,
    }
    try:
        tokenizer = load_tokenizer(args.tokenizer, **tokenizer_options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megashear.data.preprocess import domain_name

    weights = {}
    for part in filter(None, args.weights.split(",")):
        name, _, value = part.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = float("nan")
        if not (weights[name] >= 0 and weights[name] != float("inf")):
            print(
                f"error: --weights {part!r}: a weight must be a finite number >= 0", file=sys.stderr
            )
            return 2
    names = [domain_name(f) for f in files]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        print(
            f"error: --weights names unknown domains {unknown}; domains: {names}", file=sys.stderr
        )
        return 2
    print(
        f"tokenizer: {tokenizer.kind}, vocabulary {tokenizer.vocab_size}, "
        f"BOS {tokenizer.bos_id} {'added' if tokenizer.add_bos else 'not added'}, "
        f"EOS {tokenizer.eos_id} {'added' if tokenizer.add_eos else 'not added'}"
    )
    # Everything is written into a staging folder beside the output and moved into it only when
    # every domain succeeded: a failed run leaves the output directory as it was.
    staging = f"{os.path.abspath(args.output_dir).rstrip(os.sep)}.tmp-preprocess-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        code = _run(args, files, names, weights, tokenizer, tokenizer_options, staging)
        if code == 0:
            _publish(staging, args.output_dir)
            print(os.path.join(args.output_dir, "manifest.yaml"))
        return code
    except (ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(args, files, names, weights, tokenizer, tokenizer_options, staging: str) -> int:
    """Preprocess every domain into ``staging``; the exit code (0: manifest written)."""
    from tqdm import tqdm

    from megashear.data.manifest import Domain, Manifest, save_manifest
    from megashear.data.preprocess import preprocess_domain

    total = sum(os.path.getsize(f) for f in files)
    start = time.time()
    domains, report, failed, empty = [], [], [], []
    with tqdm(total=total, unit="B", unit_scale=True, desc="preprocess") as bar:
        for path, name in zip(files, names):
            before = bar.n
            stats = preprocess_domain(
                path,
                os.path.join(staging, name),
                args.tokenizer,
                args.valid_tokens_per_domain,
                args.workers,
                progress=bar,
                max_bytes=args.max_bytes_per_domain,
                tokenizer_options=tokenizer_options,
                test_tokens=args.test_tokens_per_domain,
            )
            bar.update(max(0, before + os.path.getsize(path) - bar.n))
            lines = stats.documents + stats.bad_lines
            report.append(
                f"{name}: {stats.documents} documents, {stats.train_tokens} train / "
                f"{stats.valid_tokens} valid"
                + (f" / {stats.test_tokens} test" if args.test_tokens_per_domain else "")
                + f" tokens, {stats.bad_lines} malformed lines"
            )
            if stats.train_tokens == 0:
                empty.append(name)
            if lines and stats.bad_lines / lines > args.max_bad_fraction:
                failed.append(
                    f"{name} ({stats.bad_lines}/{lines} malformed, e.g. {stats.bad_examples[0]!r})"
                )
            test = f"{name}_test" if args.test_tokens_per_domain > 0 else None
            domains.append(
                Domain(name, f"{name}_train", f"{name}_valid", weights.get(name, 1.0), None, test)
            )
    for line in report:
        print(line)
    if failed:
        print(f"error: too many malformed lines in {', '.join(failed)}", file=sys.stderr)
        return 1
    if empty:
        print(
            f"error: no training tokens in {', '.join(empty)} (empty input, or all of it held "
            "out for validation/test); no manifest written",
            file=sys.stderr,
        )
        return 1
    text_mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"{text_mb:.1f} MB of input in {time.time() - start:.1f} s")
    manifest = Manifest(
        domains,
        tokenizer=os.path.abspath(args.tokenizer),
        vocab_size=tokenizer.vocab_size,
        tokenizer_kind=tokenizer.kind,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        add_bos=tokenizer.add_bos,
        add_eos=tokenizer.add_eos,
    )
    # written into the staging folder with the data; paths in it are relative, so it moves
    save_manifest(manifest, os.path.join(staging, "manifest.yaml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
