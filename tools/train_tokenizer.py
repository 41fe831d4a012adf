#!/usr/bin/env python3
"""Train a LLaMA-style sentencepiece BPE tokenizer on a sample of every domain.

    python tools/train_tokenizer.py --input DIR_OR_FILES --vocab-size 8000 \\
        --sample-bytes-per-domain 1000000 --output-prefix data/tokenizer

BPE with byte fallback and split digits; unk=0, bos=1, eos=2, no pad (as LLaMA).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser, report_error

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--sample-bytes-per-domain", type=int, default=1_000_000)
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    for flag, value in (("--vocab-size", args.vocab_size),
                        ("--sample-bytes-per-domain", args.sample_bytes_per_domain)):  # fmt: skip
        if value < 1:
            return report_error(ValueError(f"{flag} must be at least 1, got {value}"))
    from megashear.data.preprocess import expand_inputs

    try:
        files = expand_inputs(args.input)
    except ValueError as exc:
        return report_error(exc)
    import sentencepiece as spm

    from megashear.data.preprocess import open_text

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    # the model is trained in a scratch folder and moved into place only when it is complete
    work = tempfile.mkdtemp(prefix="megashear-tokenizer-")
    try:
        sample = os.path.join(work, "sample.txt")
        lines = 0
        with open(sample, "w", encoding="utf-8", errors="surrogateescape") as tmp:
            for path in files:
                size = 0
                with open_text(path) as f:
                    for line in f:
                        try:
                            text = json.loads(line).get("text")
                        except (json.JSONDecodeError, AttributeError):
                            continue
                        if isinstance(text, str) and text.strip():
                            tmp.write(
                                text.replace("\n", " ")[: args.sample_bytes_per_domain] + "\n"
                            )
                            size += len(text)
                            lines += 1
                        if size >= args.sample_bytes_per_domain:
                            break
        if not lines:
            print(
                f"error: no text to train on in {', '.join(files)} (no line is a JSON object "
                "with a non-empty string 'text')",
                file=sys.stderr,
            )
            return 2
        model = os.path.join(work, "tok")
        try:
            spm.SentencePieceTrainer.train(
                input=sample,
                model_prefix=model,
                vocab_size=args.vocab_size,
                model_type="bpe",
                byte_fallback=True,
                split_digits=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                character_coverage=0.9995,
                num_threads=os.cpu_count() or 2,
                minloglevel=2,
                max_sentence_length=1 << 16,
                input_sentence_size=300_000,
                shuffle_input_sentence=True,
            )
        except RuntimeError as exc:  # e.g. a vocabulary smaller than the byte + character set
            return report_error(ValueError(f"sentencepiece: {exc}"))
        os.makedirs(out_dir, exist_ok=True)
        for ext in (".model", ".vocab"):
            # copied next to the output under a temporary name, then renamed (atomic)
            part = f"{args.output_prefix}{ext}.tmp{os.getpid()}"
            shutil.copyfile(model + ext, part)
            os.replace(part, args.output_prefix + ext)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(args.output_prefix + ".model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
