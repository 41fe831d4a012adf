"""The dynamic domain sampler: which domain, and which sample of it, each global sample is.

Global sample ``i`` (counted over the whole run) takes its domain from the weights in force,
with a uniform draw keyed on (seed, i) (:func:`keyed_uniform`, a counter-based hash, so a batch
of draws is a few vectorised numpy operations); it then takes the next position of that domain's
cursor. Each domain walks a permutation of its samples keyed on (seed, domain, epoch) and starts
a new shuffled epoch when it runs out (no one-pass limit). Every data-parallel rank computes the
same global batch and keeps its slice, so ranks never exchange data. The state (weights,
cursors, consumed samples, weight history) makes a resume exact.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_SEED_SALT = 0x5DEECE66D1F0C3A7


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (arithmetic wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, start: int, count: int) -> np.ndarray:
    """``count`` float64 uniforms in [0, 1); the i-th is a pure function of (seed, start + i).

    Counter-based: element ``i`` is splitmix64 of ``key(seed) + (i + 1) * golden`` (53 high bits),
    so any range of indices can be drawn alone, in any order, with the same values.
    """
    if count < 0 or start < 0:
        raise ValueError(f"keyed_uniform needs start, count >= 0, got {start}, {count}")
    key = _mix64(np.array([(seed ^ _SEED_SALT) & _MASK64], dtype=np.uint64))
    i = np.arange(start, start + count, dtype=np.uint64)
    bits = _mix64(key + (i + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Picks(NamedTuple):
    """One global batch's choices: ``domain [B]`` and ``index [B]`` (sample within the domain),
    both int64, in global-batch order."""

    domain: np.ndarray
    index: np.ndarray

    def tolist(self) -> list[tuple[int, int]]:
        return list(zip(self.domain.tolist(), self.index.tolist()))


class DynamicDomainSampler:
    """Args: per-domain sample counts, initial weights, seed."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError(f"every domain needs at least one sample, got sizes {sizes}")
        self.sizes = [int(n) for n in sizes]
        self.seed = seed
        self.cursors = [0] * len(sizes)
        self.consumed = 0
        self.weights = self._check(weights)
        self.history: list[tuple[int, list[float]]] = [(0, self.weights.tolist())]
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _check(self, weights) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.sizes),):
            raise ValueError(f"expected {len(self.sizes)} weights, got {w.shape}")
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"domain weights must be finite, >= 0 and not all 0: {w.tolist()}")
        return w / w.sum()

    def set_weights(self, weights) -> None:
        """New weights for every sample drawn from now on."""
        self.weights = self._check(weights)
        self.history.append((self.consumed, self.weights.tolist()))

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.sizes):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, 1_000_003, domain, epoch])
            self._perm_cache[key] = rng.permutation(self.sizes[domain])
        return self._perm_cache[key]

    def draw_domains(self, start: int, count: int) -> np.ndarray:
        """Domains ``[count]`` of global samples ``start ..`` under the current weights."""
        cdf = np.cumsum(self.weights)
        cdf /= cdf[-1]  # the last domain with weight > 0 ends at exactly 1.0
        u = keyed_uniform(self.seed, start, count)
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(self.sizes) - 1)

    def next_global_batch(self, size: int) -> Picks:
        """The (domain, sample index in domain) picks ``[size]`` of the next global batch."""
        domains = self.draw_domains(self.consumed, size).astype(np.int64)
        index = np.empty(size, dtype=np.int64)
        for d in np.unique(domains).tolist():
            rows = np.flatnonzero(domains == d)
            epoch, pos = np.divmod(self.cursors[d] + np.arange(len(rows)), self.sizes[d])
            for e in np.unique(epoch).tolist():
                here = epoch == e
                index[rows[here]] = self._permutation(d, e)[pos[here]]
            self.cursors[d] += len(rows)
        self.consumed += size
        return Picks(domains, index)

    def epochs(self) -> list[int]:
        return [c // n for c, n in zip(self.cursors, self.sizes)]

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.tolist(),
            "cursors": list(self.cursors),
            "consumed": self.consumed,
            "history": [[c, list(w)] for c, w in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        cursors = [int(c) for c in state["cursors"]]
        if len(cursors) != len(self.sizes):
            raise ValueError(
                f"sampler state has {len(cursors)} domains, this run has {len(self.sizes)}"
            )
        self.weights = self._check(state["weights"])
        self.cursors = cursors
        self.consumed = int(state["consumed"])
        self.history = [(int(c), list(w)) for c, w in state["history"]]
