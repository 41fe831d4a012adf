"""Global-batch sources for the training loop, and the DP / micro-batch split.

A batch source yields *global* batches: every rank computes the same global batch
deterministically (from a seed and its own consumed-sample counter) and keeps its data-parallel
slice, so ranks never exchange data. A global batch is a dict of ``[B, s]`` tensors: ``tokens``
(int64), ``labels`` (int64, tokens shifted by one), ``loss_mask`` (float32) and optionally
``domain_id`` (``[B]`` int64). Sources expose ``state_dict()``/``load_state_dict()`` so that a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """What the training loop needs from a data pipeline."""

    def next_global_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def pack_windows(samples: np.ndarray) -> dict[str, torch.Tensor]:
    """``[B, s + 1]`` token windows -> tokens / labels / loss_mask, each ``[B, s]``."""
    t = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64))
    return {
        "tokens": t[:, :-1].contiguous(),
        "labels": t[:, 1:].contiguous(),
        "loss_mask": torch.ones(t.shape[0], t.shape[1] - 1, dtype=torch.float32),
    }


class CountedSource:
    """A source whose sample ``i`` is a pure function of ``i``; its state is the count."""

    def __init__(self) -> None:
        self.consumed = 0

    def sample(self, index: int) -> np.ndarray:
        """Global sample ``index`` as a ``[s + 1]`` token window."""
        raise NotImplementedError

    def next_global_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        rows = [self.sample(self.consumed + i) for i in range(global_batch_size)]
        self.consumed += global_batch_size
        return pack_windows(np.stack(rows))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


class SyntheticBatches(CountedSource):
    """Learnable synthetic sequences keyed on (seed, sample index), for tests and benchmarks.

    Sample ``i`` is an arithmetic progression ``(start + stride * t) % vocab`` with ``start`` and
    ``stride`` (1 to 3) drawn from ``np.random.default_rng([seed, i])``: a model that attends to
    the previous tokens can predict it, so the loss falls quickly.
    """

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 4)
        return (start + stride * np.arange(self.seq_length + 1)) % self.vocab_size


class TokenWindowBatches(CountedSource):
    """Fixed-length windows over one token array, visited in a seeded order, epoch after epoch."""

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int = 0) -> None:
        super().__init__()
        self.tokens, self.seq_length, self.seed = tokens, seq_length, seed
        self.num_windows = (len(tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(
                f"{len(tokens)} tokens are too few for one window of seq_length={seq_length}"
            )
        self._order: tuple[int, np.ndarray] | None = None

    def sample(self, index: int) -> np.ndarray:
        epoch, pos = divmod(index, self.num_windows)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.num_windows),
            )
        start = int(self._order[1][pos]) * self.seq_length
        return self.tokens[start : start + self.seq_length + 1]


def split_for_rank(
    batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's contiguous slice of a global batch, cut into micro-batches of ``[b, s]``."""
    total = batch["tokens"].shape[0]
    if total % (dp_size * micro_batch_size):
        raise ValueError(
            f"global batch {total} is not divisible by dp={dp_size} x "
            f"micro_batch_size={micro_batch_size}"
        )
    per_rank = total // dp_size
    lo = dp_rank * per_rank
    return [
        {k: v[lo + i : lo + i + micro_batch_size] for k, v in batch.items()}
        for i in range(0, per_rank, micro_batch_size)
    ]
