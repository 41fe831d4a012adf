"""``megashear preprocess``: JSON Lines per domain -> megatron-core indexed datasets + manifest.

One domain per input file (``NAME.jsonl[.gz|.xz]``; a directory means all such files in it).
The tokenizer is a sentencepiece ``.model``, an HF ``tokenizer.json``, or an HF model directory
(:mod:`megashear.data.tokenizer`). Every document ends with EOS (unless ``add_eos=false``); it
starts with BOS only if the tokenizer's settings (or ``add_bos``) say so. Writes
``OUT/NAME_train.{bin,idx}``, ``OUT/NAME_valid.{bin,idx}`` (the first validation tokens of each
domain's stream), with ``test_tokens_per_domain`` ``OUT/NAME_test.{bin,idx}`` (the next ones: a
split for reporting that training and dynamic batch loading never read), and
``OUT/manifest.yaml`` (the tokenizer's kind, vocabulary, BOS/EOS ids and whether they were
added). More than ``max_bad_fraction`` malformed lines in a domain, or a domain left without
training tokens, is an error. A failed run leaves the output directory as it was: everything is
written into a staging folder beside it and moved in (the manifest last) only when every domain
succeeded.

``tools/preprocess_data.py`` is the same function under its old flags (``--output-dir``,
``--weights web=0.67,github=0.045``, ``--no-add-bos``); error messages name the flags the way
the caller spelled them (:func:`run`'s ``flag``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from megashear.jobs.common import UsageError

logger = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """``megashear preprocess``: tokenize JSON Lines per domain into indexed datasets."""

    input: tuple[str, ...] = ()
    """JSON Lines files, one domain each (NAME.jsonl, .jsonl.gz or .jsonl.xz), or directories
    holding them; a list, e.g. [web.jsonl, code.jsonl]. Required."""
    tokenizer: str = ""
    """A sentencepiece .model, an HF tokenizer.json, or a directory holding either. Required."""
    output_dir: str = ""
    """Where the datasets and manifest.yaml go (created if needed). Required."""
    valid_tokens_per_domain: int = 2_000_000
    """Tokens at the start of each domain's stream held out as its validation split."""
    test_tokens_per_domain: int = 0
    """Tokens after the validation ones held out as a test split that neither training nor
    dynamic batch loading reads (megashear evaluate --data.eval_split=test); 0: none."""
    workers: int | None = None
    """Tokenizer processes; null: one per CPU."""
    weights: dict[str, float] = field(default_factory=dict)
    """Initial domain weights of the manifest, {domain: weight}, e.g. {web: 0.67, github:
    0.045}; a domain not named weighs 1 (the weights are normalised when read)."""
    max_bad_fraction: float = 0.01
    """Malformed lines (not JSON, no text, not UTF-8) a domain may hold, as a fraction of its
    lines; more is an error."""
    max_bytes_per_domain: int | None = None
    """Stop each domain after this many bytes of text; null: all of it."""
    bos_token: str | None = None
    """BOS token; null: the tokenizer's."""
    eos_token: str | None = None
    """EOS token; null: the tokenizer's."""
    add_bos: bool | None = None
    """Prepend BOS to every document; null: as the tokenizer's settings say."""
    add_eos: bool | None = None
    """Append EOS to every document; null: yes, when the tokenizer has an EOS."""


class PreprocessError(ValueError):
    """The data failed (too many malformed lines, no training tokens); ``report`` holds the
    per-domain report lines of the run."""

    def __init__(self, message: str, report: list[str]) -> None:
        super().__init__(message)
        self.report = report


def command_flag(name: str) -> str:
    """A config field as ``megashear preprocess`` spells it: ``--output_dir``."""
    return f"--{name}"


def _check(cfg: PreprocessConfig, flag: Callable[[str], str]) -> None:
    """What is wrong with the settings and the output directory, if anything."""
    for name in ("input", "tokenizer", "output_dir"):
        if not getattr(cfg, name):
            raise UsageError(f"preprocess needs {flag(name)}")
    for name in ("valid_tokens_per_domain", "test_tokens_per_domain"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.workers is not None and cfg.workers < 1:
        raise UsageError(f"{flag('workers')} must be at least 1, got {cfg.workers}")
    if cfg.max_bytes_per_domain is not None and cfg.max_bytes_per_domain < 1:
        raise UsageError(
            f"{flag('max_bytes_per_domain')} must be at least 1, got {cfg.max_bytes_per_domain}"
        )
    if not (math.isfinite(cfg.max_bad_fraction) and 0 <= cfg.max_bad_fraction <= 1):
        raise UsageError(
            f"{flag('max_bad_fraction')} must be a fraction in [0, 1], got {cfg.max_bad_fraction}"
        )
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UsageError(f"{flag('output_dir')} {cfg.output_dir} exists and is not a directory")
    for name, weight in cfg.weights.items():
        if not (weight >= 0 and weight != float("inf")):
            raise UsageError(
                f"{flag('weights')} {f'{name}={weight:g}'!r}: a weight must be a finite number >= 0"
            )


def _publish(staging: str, out: str) -> None:
    """Move every file of ``staging`` into ``out`` (created if needed), then remove it."""
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


def report_line(name: str, stats: dict, test: bool) -> str:
    """One domain's line of the report: documents, tokens per split, malformed lines."""
    return (
        f"{name}: {stats['documents']} documents, {stats['train_tokens']} train / "
        f"{stats['valid_tokens']} valid"
        + (f" / {stats['test_tokens']} test" if test else "")
        + f" tokens, {stats['malformed_lines']} malformed lines"
    )


def tokenizer_line(info: dict) -> str:
    """The report's line about the tokenizer."""
    return (
        f"tokenizer: {info['kind']}, vocabulary {info['vocab_size']}, "
        f"BOS {info['bos_id']} {'added' if info['add_bos'] else 'not added'}, "
        f"EOS {info['eos_id']} {'added' if info['add_eos'] else 'not added'}"
    )


def run(cfg: PreprocessConfig, flag: Callable[[str], str] = command_flag) -> dict:
    """Preprocess every domain of ``cfg.input``; the result the CLI prints as one JSON line:
    ``manifest`` (its path), ``tokenizer`` (kind, vocabulary, BOS/EOS ids and whether they are
    added), ``domains`` ({name: documents, train/valid/test tokens, malformed lines}),
    ``input_bytes`` and ``seconds``.

    Args:
        flag: how error messages name a config field (the caller's spelling of its flag).
    """
    from megashear.data.preprocess import domain_name, expand_inputs
    from megashear.data.tokenizer import load_tokenizer

    _check(cfg, flag)
    files = expand_inputs(list(cfg.input))
    tokenizer_options = {
        "bos": cfg.bos_token,
        "eos": cfg.eos_token,
        "add_bos": cfg.add_bos,
        "add_eos": cfg.add_eos,
    }
    tokenizer = load_tokenizer(cfg.tokenizer, **tokenizer_options)
    names = [domain_name(f) for f in files]
    unknown = sorted(set(cfg.weights) - set(names))
    if unknown:
        raise UsageError(f"{flag('weights')} names unknown domains {unknown}; domains: {names}")
    info = {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "add_bos": tokenizer.add_bos,
        "eos_id": tokenizer.eos_id,
        "add_eos": tokenizer.add_eos,
    }
    logger.info("%s", tokenizer_line(info))
    # Everything is written into a staging folder beside the output and moved into it only when
    # every domain succeeded: a failed run leaves the output directory as it was.
    staging = f"{os.path.abspath(cfg.output_dir).rstrip(os.sep)}.tmp-preprocess-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    start = time.time()
    try:
        domains = _run(cfg, files, names, tokenizer, tokenizer_options, staging)
        _publish(staging, cfg.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = os.path.join(cfg.output_dir, "manifest.yaml")
    input_bytes = sum(os.path.getsize(f) for f in files)
    seconds = time.time() - start
    logger.info("%.1f MB of input in %.1f s; manifest %s", input_bytes / 1e6, seconds, manifest)
    return {
        "manifest": manifest,
        "tokenizer": info,
        "domains": domains,
        "input_bytes": input_bytes,
        "seconds": round(seconds, 3),
    }


def _run(cfg: PreprocessConfig, files, names, tokenizer, tokenizer_options, staging) -> dict:
    """Preprocess every domain into ``staging`` and write the manifest there; the per-domain
    statistics. :class:`PreprocessError` when the data fails."""
    from tqdm import tqdm

    from megashear.data.manifest import Domain, Manifest, save_manifest
    from megashear.data.preprocess import preprocess_domain

    workers = cfg.workers or max(1, os.cpu_count() or 2)
    test = cfg.test_tokens_per_domain > 0
    total = sum(os.path.getsize(f) for f in files)
    domains, stats_of, report, failed, empty = [], {}, [], [], []
    with tqdm(total=total, unit="B", unit_scale=True, desc="preprocess") as bar:
        for path, name in zip(files, names):
            before = bar.n
            stats = preprocess_domain(
                path,
                os.path.join(staging, name),
                cfg.tokenizer,
                cfg.valid_tokens_per_domain,
                workers,
                progress=bar,
                max_bytes=cfg.max_bytes_per_domain,
                tokenizer_options=tokenizer_options,
                test_tokens=cfg.test_tokens_per_domain,
            )
            bar.update(max(0, before + os.path.getsize(path) - bar.n))
            stats_of[name] = {
                "documents": stats.documents,
                "train_tokens": stats.train_tokens,
                "valid_tokens": stats.valid_tokens,
                "test_tokens": stats.test_tokens,
                "malformed_lines": stats.bad_lines,
            }
            report.append(report_line(name, stats_of[name], test))
            logger.info("%s", report[-1])
            lines = stats.documents + stats.bad_lines
            if stats.train_tokens == 0:
                empty.append(name)
            if lines and stats.bad_lines / lines > cfg.max_bad_fraction:
                failed.append(
                    f"{name} ({stats.bad_lines}/{lines} malformed, e.g. {stats.bad_examples[0]!r})"
                )
            domains.append(
                Domain(
                    name,
                    f"{name}_train",
                    f"{name}_valid",
                    cfg.weights.get(name, 1.0),
                    None,
                    f"{name}_test" if test else None,
                )
            )
    if failed:
        raise PreprocessError(f"too many malformed lines in {', '.join(failed)}", report)
    if empty:
        raise PreprocessError(
            f"no training tokens in {', '.join(empty)} (empty input, or all of it held out for "
            "validation/test); no manifest written",
            report,
        )
    manifest = Manifest(
        domains,
        tokenizer=os.path.abspath(cfg.tokenizer),
        vocab_size=tokenizer.vocab_size,
        tokenizer_kind=tokenizer.kind,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        add_bos=tokenizer.add_bos,
        add_eos=tokenizer.add_eos,
    )
    # written into the staging folder with the data; paths in it are relative, so it moves
    save_manifest(manifest, os.path.join(staging, "manifest.yaml"))
    return stats_of
