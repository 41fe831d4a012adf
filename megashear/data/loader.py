"""Per-domain GPTDatasets and the global-batch source of dynamic batch loading.

Each domain's training data is a megatron-core ``GPTDataset`` over its own indexed dataset
(:mod:`megashear.data.domain_dataset`): one epoch, windows of ``s + 1`` tokens, each sample
``tokens``/``labels``/``loss_mask`` of ``[s]``. :class:`DomainBatches` draws global batches
``[B, s]`` through a :class:`~megashear.data.sampler.DynamicDomainSampler` (which starts a new
shuffled pass over a domain's samples when it runs out) and adds ``domain_id [B]``.

Validation: per domain, the first ``n`` samples of a GPTDataset over its validation prefix with a
fixed seed (:data:`VALID_SEED`, not the run's seed), so the set depends only on the data,
``seq_length`` and ``n`` and is the same for train, prune and evaluate. megatron's GPTDataset
always shuffles (documents, then samples), so these are a seeded random choice of validation
windows rather than the first windows of the stream.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from megashear.data.domain_dataset import build_domain_dataset, fetch_samples, stack_samples
from megashear.data.manifest import Manifest, load_manifest
from megashear.data.sampler import DynamicDomainSampler, Picks

logger = logging.getLogger(__name__)

VALID_SEED = 1234


def token_stream(prefix: str) -> np.ndarray:
    """The whole token stream of an indexed dataset ``[n_tokens]``, memory-mapped (no copy)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megashear.data.domain_dataset import check_indexed

    check_indexed(prefix)
    ds = IndexedDataset(prefix)
    return np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")


@dataclass
class _Ahead:
    """A global batch picked ahead and being fetched: valid only while the sampler's state is
    still ``before`` (then the sampler moves to ``after``)."""

    size: int
    before: dict
    after: dict
    picks: Picks


class DomainBatches:
    """A :class:`~megashear.training.batches.BatchSource` over several domains.

    Args:
        manifest: the domains (train prefixes and initial weights).
        seq_length: ``s``.
        seed: the sampler's seed and the GPTDatasets' shuffle seed.
        cache_dir: where the GPTDataset index files are cached (default: a temp folder).
        num_workers: DataLoader worker processes that fetch samples (0: fetch in this process).
        datasets: prebuilt per-domain datasets in manifest order (e.g. GPTDatasets with
            ``num_samples``); default: one-epoch GPTDatasets over the manifest's train prefixes.

    With ``num_workers > 0``, the picks (which domain, which sample) are still made here, in the
    main process, and the workers only read samples. One global batch is fetched ahead: right
    after batch ``t`` is returned, batch ``t + 1`` is picked provisionally from the sampler's
    state at that moment and handed to the workers, and the sampler is put back. When batch
    ``t + 1`` is requested, the provisional picks are used only if the sampler's state is still
    the one they were made from; after ``sampler.set_weights`` (a dynamic-loading update) or
    ``load_state_dict`` they are dropped and batch ``t + 1`` is picked again under the new state.
    So at most one batch is ever in flight and no batch drawn under stale weights reaches
    training; the batches, and ``state_dict()`` (always the state after the last *returned*
    batch), are exactly those of ``num_workers=0``.
    """

    def __init__(
        self,
        manifest: Manifest,
        seq_length: int,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        datasets: list | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if datasets is not None and len(datasets) != len(manifest.domains):
            raise ValueError(f"{len(datasets)} datasets for {len(manifest.domains)} domains")
        self.manifest = manifest
        self.names = manifest.names
        if datasets is None:
            datasets = [
                build_domain_dataset(
                    d.train_prefix,
                    seq_length,
                    seed,
                    "train",
                    cache_dir,
                    vocab_size=manifest.vocab_size,
                    name=d.name,
                )
                for d in manifest.domains
            ]
        self.domains = datasets
        self.sampler = DynamicDomainSampler(
            [len(d) for d in self.domains], manifest.weights(), seed
        )
        self.num_workers = num_workers
        self._workers = None
        self._ahead: _Ahead | None = None
        self.lookahead = {"used": 0, "dropped": 0}  # provisional batches used / picked again

    def next_global_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """``tokens``/``labels``/``loss_mask`` ``[B, s]`` and ``domain_id [B]``."""
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be >= 1, got {global_batch_size}")
        if self.num_workers == 0:
            picks = self.sampler.next_global_batch(global_batch_size)
            return fetch_samples(self.domains, picks.domain, picks.index)
        if self._workers is None:
            from megashear.data.workers import WorkerFetch

            self._workers = WorkerFetch(self.domains, self.num_workers)
        ahead, self._ahead = self._ahead, None
        if (
            ahead is not None
            and ahead.size == global_batch_size
            and ahead.before == self.sampler.state_dict()
        ):
            self.sampler.load_state_dict(ahead.after)
            self.lookahead["used"] += 1
        else:
            self.lookahead["dropped"] += int(ahead is not None)
            self._workers.submit(self.sampler.next_global_batch(global_batch_size))
        batch = self._workers.collect()
        before = self.sampler.state_dict()
        picks = self.sampler.next_global_batch(global_batch_size)
        self._ahead = _Ahead(global_batch_size, before, self.sampler.state_dict(), picks)
        self.sampler.load_state_dict(before)
        self._workers.submit(picks)
        return batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        """Stop the DataLoader workers (if any)."""
        if self._workers is not None:
            self._workers.close()
        self._workers, self._ahead = None, None


def validation_batches(
    manifest: Manifest,
    seq_length: int,
    sequences: int,
    cache_dir: str | None = None,
    split: str = "valid",
) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain, a fixed batch of its first ``sequences`` samples ``[n, s]`` of ``split``
    (``valid``, or the held-out ``test``; fewer if the domain has fewer)."""
    if split not in ("valid", "test"):
        raise ValueError(f"unknown evaluation split {split!r}; allowed: valid, test")
    out = {}
    for d in manifest.domains:
        prefix = d.valid_prefix if split == "valid" else d.test_prefix
        if not prefix:
            raise ValueError(
                f"domain {d.name} of {manifest.path or 'the manifest'} has no test split "
                "(preprocess with --test-tokens-per-domain)"
            )
        ds = build_domain_dataset(
            prefix,
            seq_length,
            VALID_SEED,
            split,
            cache_dir,
            vocab_size=manifest.vocab_size,
            name=d.name,
        )
        n = min(sequences, len(ds))
        out[d.name] = stack_samples([ds[j] for j in range(n)])
    return out


def check_vocab(manifest: Manifest, vocab_size: int) -> None:
    """The tokenizer that made the data must be the model's (one-line error otherwise)."""
    if manifest.vocab_size is not None and manifest.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer/model mismatch: the data was tokenized with a vocabulary of "
            f"{manifest.vocab_size}, the model has vocab_size {vocab_size}"
        )


def data_cache_dir(cfg) -> str:
    """``data.cache_dir``, or ``{logging.dir}/index_cache`` when empty."""
    return cfg.data.cache_dir or os.path.join(cfg.logging.dir, "index_cache")


def manifest_batches(cfg) -> DomainBatches:
    """The training source of a RunConfig with ``data.manifest``."""
    manifest = load_manifest(cfg.data.manifest)
    check_vocab(manifest, cfg.model.vocab_size)
    return DomainBatches(
        manifest,
        cfg.model.seq_length,
        cfg.data.seed,
        cache_dir=data_cache_dir(cfg),
        num_workers=cfg.data.num_workers,
    )
