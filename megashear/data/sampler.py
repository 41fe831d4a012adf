"""The dynamic domain sampler: which domain, and which sample of it, each global sample is.

Global sample ``i`` (counted over the whole run) takes its domain from the weights in force,
with a uniform draw keyed on (seed, i); it then takes the next position of that domain's cursor.
Each domain walks a permutation of its samples keyed on (seed, domain, epoch) and starts a new
shuffled epoch when it runs out (no one-pass limit). Every data-parallel rank computes the same
global batch and keeps its slice, so ranks never exchange data. The state (weights, cursors,
consumed samples, weight history) makes a resume exact.
"""

from __future__ import annotations

import numpy as np


def keyed_uniform(seed: int, start: int, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1), the i-th keyed on (seed, start + i) alone."""
    return np.array([np.random.default_rng([seed, start + i]).random() for i in range(count)])


class DynamicDomainSampler:
    """Args: per-domain sample counts, initial weights, seed."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError(f"every domain needs at least one sample, got sizes {sizes}")
        self.sizes = list(sizes)
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

    def next_global_batch(self, size: int) -> list[tuple[int, int]]:
        """``size`` (domain, sample index in domain) pairs for the next global batch."""
        u = keyed_uniform(self.seed, self.consumed, size)
        domains = np.searchsorted(np.cumsum(self.weights), u, side="right")
        domains = np.minimum(domains, len(self.sizes) - 1)
        out = []
        for d in domains.tolist():
            epoch, pos = divmod(self.cursors[d], self.sizes[d])
            out.append((d, int(self._permutation(d, epoch)[pos])))
            self.cursors[d] += 1
        self.consumed += size
        return out

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
        self.weights = self._check(state["weights"])
        self.cursors = [int(c) for c in state["cursors"]]
        self.consumed = int(state["consumed"])
        self.history = [(int(c), list(w)) for c, w in state["history"]]
