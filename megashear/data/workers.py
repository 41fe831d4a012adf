"""Fetch chosen samples in ``torch.utils.data.DataLoader`` worker processes.

The workers only *fetch*: the caller decides which (domain, sample) pairs a global batch holds
(:class:`~megashear.data.sampler.Picks`, made in the main process) and hands them over with
:meth:`WorkerFetch.submit`; the workers read the GPTDataset samples asynchronously while the
caller does other work, and :meth:`WorkerFetch.collect` returns the batch in pick order. A new
``submit`` before ``collect`` discards the earlier submission (its results are drained and
dropped). The DataLoader keeps its workers between batches (``persistent_workers``); each
submission is one short "epoch" of ``num_workers`` chunks of the picks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megashear.data.domain_dataset import fetch_samples
from megashear.data.sampler import Picks


class _PickDataset(Dataset):
    """Map-style dataset whose "index" is a whole chunk of picks; returns stacked tensors."""

    def __init__(self, datasets: list) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, chunk: Picks) -> dict[str, torch.Tensor]:
        return fetch_samples(self.datasets, chunk.domain, chunk.index)

    def __getitems__(self, chunk: Picks) -> dict[str, torch.Tensor]:
        return self[chunk]


class _Chunks:
    """The DataLoader's batch sampler: the chunks of the current submission, once."""

    def __init__(self) -> None:
        self.chunks: list[Picks] = []

    def __iter__(self):
        return iter(list(self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)


def _as_is(batch):
    return batch


class WorkerFetch:
    """Args: the per-domain datasets, and the number of worker processes (>= 1)."""

    def __init__(self, datasets: list, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"WorkerFetch needs num_workers >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._chunks = _Chunks()
        self._loader = DataLoader(
            _PickDataset(datasets),
            batch_sampler=self._chunks,
            num_workers=num_workers,
            collate_fn=_as_is,
            persistent_workers=True,
            prefetch_factor=1,
        )
        self._iter = None
        self._pending = 0

    def submit(self, picks: Picks) -> None:
        """Start fetching ``picks`` (``[B]`` each) in the workers; returns at once."""
        splits = np.array_split(np.arange(len(picks.domain)), self.num_workers)
        self._chunks.chunks = [
            Picks(picks.domain[rows], picks.index[rows]) for rows in splits if len(rows)
        ]
        self._iter = iter(self._loader)  # drains any earlier submission, then dispatches
        self._pending = len(self._chunks.chunks)

    def collect(self) -> dict[str, torch.Tensor]:
        """The submitted batch: ``tokens``/``labels``/``loss_mask`` ``[B, s]``, ``domain_id [B]``."""
        if self._iter is None or self._pending == 0:
            raise RuntimeError("WorkerFetch.collect() without a pending submit()")
        parts = [next(self._iter) for _ in range(self._pending)]
        self._pending = 0
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Stop the worker processes."""
        self._iter = None
        self._loader = None
