"""JSON Lines per domain -> megatron-core indexed datasets (train + validation) + a manifest.

Input: one file per domain (``NAME.jsonl``, ``.jsonl.gz`` or ``.jsonl.xz``) whose lines are JSON
objects with a string ``text``. Every document is tokenized (in worker processes, order kept) by
the ``encode_document`` of :func:`megashear.data.tokenizer.load_tokenizer` (a sentencepiece model
or an HF ``tokenizer.json``; EOS appended, BOS as the tokenizer's settings say). The first
``valid_tokens`` tokens of each domain's stream are held out for validation (a document
straddling the cut is split there), the rest is for training. Malformed lines (bad JSON, no
string ``text``) are counted per domain. Outputs are written under temporary names and renamed
at the end.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

_TOKENIZER = None


def open_text(path: str):
    """Open plain, .gz, .xz or .bz2 UTF-8 text. Invalid bytes do not stop the read: they come
    through as lone surrogates (``surrogateescape``), and :func:`_encode` counts such a line as
    malformed."""
    kw = {"encoding": "utf-8", "errors": "surrogateescape"}
    if path.endswith(".gz"):
        return gzip.open(path, "rt", **kw)
    if path.endswith(".xz"):
        return lzma.open(path, "rt", **kw)
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", **kw)
    return open(path, **kw)


INPUT_EXTENSIONS = ("jsonl", "jsonl.gz", "jsonl.xz", "jsonl.bz2")


def expand_inputs(items: list[str]) -> list[str]:
    """Files named, plus every ``*.jsonl[.gz|.xz|.bz2]`` in directories named.

    Raises:
        ValueError: an item does not exist, or nothing was found.
    """
    files = []
    for item in items:
        if os.path.isdir(item):
            files += sorted(
                os.path.join(item, n)
                for n in os.listdir(item)
                if any(n.endswith("." + ext) for ext in INPUT_EXTENSIONS)
            )
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError(f"no .jsonl[.gz|.xz|.bz2] files in {items}")
    return files


def domain_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".gz", ".xz", ".bz2", ".jsonl", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


@dataclass
class DomainStats:
    name: str
    documents: int = 0
    bad_lines: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0
    test_tokens: int = 0
    bytes: int = 0
    bad_examples: list[str] = field(default_factory=list)


def _init_worker(path: str, options: dict) -> None:
    global _TOKENIZER
    from megashear.data.tokenizer import load_tokenizer

    # the main process has loaded it already and reported any warning
    logging.getLogger("megashear.data.tokenizer").setLevel(logging.ERROR)
    _TOKENIZER = load_tokenizer(path, **options)


def _encode(line: str) -> tuple[list[int] | None, int]:
    try:
        line.encode("utf-8")  # invalid UTF-8 in the input (see open_text)
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeEncodeError):
        return None, len(line)
    text = doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        return None, len(line)
    return _TOKENIZER.encode_document(text), len(text.encode("utf-8"))


def _lines(path: str, max_bytes: int | None = None) -> Iterator[str]:
    """Non-empty lines; with ``max_bytes``, stop once that much line text has been read."""
    size = 0
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield line
                size += len(line)
                if max_bytes is not None and size >= max_bytes:
                    return


def preprocess_domain(
    path: str,
    out_prefix: str,
    tokenizer: str,
    valid_tokens: int,
    workers: int = 2,
    progress=None,
    max_bytes: int | None = None,
    tokenizer_options: dict | None = None,
    test_tokens: int = 0,
) -> DomainStats:
    """Tokenize one domain into ``{out_prefix}_train`` and ``{out_prefix}_valid`` datasets (and
    ``{out_prefix}_test`` when ``test_tokens`` > 0).

    Args:
        path: the domain's JSON Lines file.
        out_prefix: output prefix (``{out_prefix}_train.bin`` etc.).
        tokenizer: a tokenizer path as :func:`~megashear.data.tokenizer.load_tokenizer` takes.
        valid_tokens: tokens held out for validation at the start of the stream.
        workers: tokenizer worker processes.
        progress: a tqdm-like object updated with the bytes of text done.
        max_bytes: stop after that many bytes of input lines (samples of large domains).
        tokenizer_options: ``bos``/``eos``/``add_bos``/``add_eos`` overrides for
            ``load_tokenizer``.
        test_tokens: tokens held out for a test split right after the validation tokens: data
            that neither training nor dynamic batch loading (which reads the validation split)
            ever sees, for reporting.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stats = DomainStats(domain_name(path))
    splits = ("train", "valid", "test") if test_tokens > 0 else ("train", "valid")
    tmp = {split: f"{out_prefix}_{split}.tmp{os.getpid()}" for split in splits}
    builders = {
        split: IndexedDatasetBuilder(p + ".bin", dtype=np.int32) for split, p in tmp.items()
    }
    with mp.get_context("spawn").Pool(
        workers, _init_worker, (tokenizer, dict(tokenizer_options or {}))
    ) as pool:
        # The pool drains its whole input (no early break: terminating a pool whose feeder
        # thread is still reading can hang), so the input itself stops at max_bytes.
        lines = _lines(path, max_bytes)
        encoded = pool.imap(_encode, _lines(path, max_bytes), chunksize=16)
        for line, (ids, size) in zip(lines, encoded):
            if ids is None:
                stats.bad_lines += 1
                if len(stats.bad_examples) < 3:
                    stats.bad_examples.append(
                        line[:80].encode("utf-8", "backslashreplace").decode("utf-8")
                    )
                continue
            # The first ``valid_tokens`` tokens of the domain's stream are held out, then
            # ``test_tokens``; a document that straddles a cut is split there (its head to the
            # earlier split, its tail to the next).
            room = max(0, valid_tokens - stats.valid_tokens)
            head, tail = ids[:room], ids[room:]
            if head:
                builders["valid"].add_document(torch.tensor(head, dtype=torch.int32), [len(head)])
                stats.valid_tokens += len(head)
            room = max(0, test_tokens - stats.test_tokens)
            head, tail = tail[:room], tail[room:]
            if head:
                builders["test"].add_document(torch.tensor(head, dtype=torch.int32), [len(head)])
                stats.test_tokens += len(head)
            if tail:
                builders["train"].add_document(torch.tensor(tail, dtype=torch.int32), [len(tail)])
                stats.train_tokens += len(tail)
            stats.documents += 1
            stats.bytes += size
            if progress is not None:
                progress.update(size)
    for split, p in tmp.items():
        builders[split].finalize(p + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(p + ext, f"{out_prefix}_{split}{ext}")
    return stats
