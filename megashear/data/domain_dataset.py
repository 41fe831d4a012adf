"""One domain as a megatron-core ``GPTDataset`` over its indexed dataset (``PREFIX.bin/.idx``).

The GPTDataset is built directly over the existing ``IndexedDataset`` (no
``BlendedMegatronDatasetBuilder``, no ``torch.distributed``): one epoch of all documents, shuffled
in document order and in sample order with ``seed`` (megatron's own shuffles), windows of
``seq_length + 1`` tokens. Sample ``j`` is ``tokens``/``labels``/``loss_mask``, each ``[s]``;
``labels`` is ``tokens`` shifted by one and ``loss_mask`` is all ones (no EOD masking, no
position reset, no attention mask: the model builds its own causal mask).

Its index files (document, sample and shuffle index) are cached under ``cache_root`` in a folder
keyed on the data files' identity (path, sizes, mtime), the window length, seed, split and
megatron-core version. A cache miss builds in memory and publishes the folder with one atomic
rename, so concurrent processes (ranks, DataLoader users) never read a half-written cache; a
non-zero rank of an initialised process group builds in memory only (megatron's GPTDataset only
writes its cache on rank 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("tokens", "labels", "loss_mask")


@dataclass
class TokenIds:
    """What megatron-core's GPTDatasetConfig needs of a tokenizer (the data are pre-tokenized).

    ``eod`` is unused (no EOD masking or position reset) and left None so that megatron's pad
    id (-1, never a token) collides with no special token; ``vocab_size`` may be None.
    """

    vocab_size: int | None = None
    eod: int | None = None
    unique_identifiers: dict = field(default_factory=lambda: {"class": "megashear.TokenIds"})


def default_cache_root() -> str:
    """``$TMPDIR/megashear-index-cache``: where index files go when no cache dir is given."""
    return os.path.join(tempfile.gettempdir(), "megashear-index-cache")


def _cache_key(prefix: str, seq_length: int, seed: int, split: str, num_samples) -> str:
    import megatron.core

    files = {}
    for ext in (".bin", ".idx"):
        st = os.stat(prefix + ext)
        files[ext] = [st.st_size, st.st_mtime_ns]
    desc = json.dumps(
        {
            "prefix": os.path.abspath(prefix),
            "files": files,
            "seq_length": seq_length,
            "seed": seed,
            "split": split,
            "num_samples": num_samples,
            "megatron_core": getattr(megatron.core, "__version__", "?"),
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(desc.encode()).hexdigest()[:16]
    return f"{os.path.basename(prefix)}-{split}-s{seq_length}-{digest}"


def _gpt_config(seq_length: int, seed: int, path_to_cache: str, vocab_size: int | None, prefix):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=path_to_cache,  # "" = build in memory, write nothing
        tokenizer=TokenIds(vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _nonzero_rank() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() != 0
    )


_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                 7: np.float32, 8: np.uint16}  # fmt: skip


def check_indexed(prefix: str, name: str = "") -> None:
    """Raise a one-line ``ValueError`` naming the file unless ``prefix.idx`` is a complete
    megatron-core index (header, version, dtype, sizes) and ``prefix.bin`` holds every token it
    points to.

    megatron-core's ``IndexedDataset`` would fail on such files with an assertion, a numpy
    buffer error or not at all (a short ``.bin`` fails only when a sample is read).
    """
    import struct

    where = f"domain {name}: " if name else ""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise ValueError(f"{where}{path} does not exist")

    def bad(why: str) -> ValueError:
        return ValueError(f"{where}{idx} is not a megatron-core index file ({why})")

    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34:
        raise bad(f"{size} bytes, shorter than its header")
    if head[:9] != _INDEX_HEADER:
        raise bad("bad header")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in _INDEX_DTYPES:
        raise bad(f"version {version}, dtype code {code}")
    expected = 34 + 12 * sequences + 8 * documents
    if size != expected:
        raise bad(f"{size} bytes where its counts need {expected}: truncated or overwritten")
    if sequences == 0:
        return
    index = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, np.int32, sequences, 34)
    pointers = np.frombuffer(index, np.int64, sequences, 34 + 4 * sequences)
    docs = np.frombuffer(index, np.int64, documents, 34 + 12 * sequences)
    if documents < 1 or int(docs[-1]) != sequences or int(lengths.min()) < 0:
        raise bad("inconsistent document and sequence tables")
    itemsize = np.dtype(_INDEX_DTYPES[code]).itemsize
    need = int(pointers[-1]) + int(lengths[-1]) * itemsize
    have = os.path.getsize(bin_)
    if have < need:
        raise ValueError(f"{where}{bin_} is truncated ({have} bytes; its index {idx} needs {need})")


def check_token_range(prefix: str, dtype, vocab_size: int, name: str = "") -> None:
    """Every token id of ``prefix.bin`` lies in ``[0, vocab_size)``; else a one-line
    ``ValueError`` (data tokenised for another model would otherwise fail mid-forward).
    Reads the file once, in chunks of 64M tokens."""
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    chunk = 1 << 26
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        lo, hi = int(part.min()), int(part.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(
                f"domain {name or prefix}: {prefix}.bin holds token id {bad}, outside the "
                f"model's vocabulary of {vocab_size} (tokenised for another model?)"
            )


def build_domain_dataset(
    prefix: str,
    seq_length: int,
    seed: int,
    split: str = "train",
    cache_root: str | None = None,
    num_samples: int | None = None,
    vocab_size: int | None = None,
    name: str = "",
) -> GPTDataset:
    """A megatron-core ``GPTDataset`` over ``prefix`` (one epoch unless ``num_samples``).

    Args:
        split: ``train``, ``valid`` or ``test`` (megatron's Split; all drop a last partial window).
        cache_root: folder for the cached index files (default :func:`default_cache_root`).
        num_samples: at least this many samples (megatron repeats epochs to get them).
        name: the domain name for error messages.

    Raises:
        ValueError: the files are damaged (:func:`check_indexed`), or the data have fewer
            than ``seq_length + 1`` tokens.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    check_indexed(prefix, name)
    indexed = IndexedDataset(prefix)
    tokens = int(indexed.sequence_lengths.sum(dtype=np.int64))
    if tokens < seq_length + 1:
        what = {"train": "training", "valid": "validation"}.get(split, split)
        raise ValueError(
            f"domain {name or prefix} has {tokens} {what} tokens, fewer than "
            f"seq_length + 1 = {seq_length + 1}"
        )
    docs = np.arange(len(indexed), dtype=np.int32)
    root = cache_root or default_cache_root()
    final = os.path.join(root, _cache_key(prefix, seq_length, seed, split, num_samples))

    def make(path_to_cache: str):
        cfg = _gpt_config(seq_length, seed, path_to_cache, vocab_size, prefix)
        return GPTDataset(indexed, prefix, docs, num_samples, Split[split], cfg)

    if os.path.isdir(final):
        return make(final)
    if _nonzero_rank():
        return make("")
    if vocab_size is not None:  # once, when the indices are built (then cached)
        check_token_range(prefix, indexed.index.dtype, vocab_size, name)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        ds = make(tmp)  # built in memory, saved under tmp
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same indices first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built GPTDataset indices for %s (%d samples) in %s", prefix, len(ds), final)
    return ds


def stack_samples(items: list[dict]) -> dict[str, torch.Tensor]:
    """GPTDataset samples (each ``tokens``/``labels``/``loss_mask`` ``[s]``) stacked into
    ``[B, s]`` each."""
    return {k: torch.stack([it[k] for it in items]) for k in SAMPLE_KEYS}


def fetch_samples(datasets: list, domain: np.ndarray, index: np.ndarray) -> dict[str, torch.Tensor]:
    """Samples ``datasets[domain[b]][index[b]]`` stacked into ``tokens``/``labels``/``loss_mask``
    ``[B, s]`` plus ``domain_id [B]`` (int64)."""
    items = [datasets[d][j] for d, j in zip(domain.tolist(), index.tolist())]
    batch = stack_samples(items)
    batch["domain_id"] = torch.as_tensor(np.asarray(domain, dtype=np.int64))
    return batch
