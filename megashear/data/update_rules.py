"""Domain-weight update rules for dynamic batch loading (docs/method.md §5), as pure functions.

Every rule maps (weights ``w [k]``, per-domain losses ``ℓ [k]``, reference losses
``ℓ_ref [k]``) to new weights that sum to 1:

- ``paper``: Δ = max(ℓ − ℓ_ref, 0); w ← normalise(w · exp(η·Δ)) (= softmax(log w + ηΔ));
- ``reference_code``: the authors' code: Δ = ℓ − ℓ_ref (no clamp); w ← normalise(w · exp(η·Δ));
  then w ← (1 − c)·w + c/k;
- ``constant``: w unchanged (the static baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _normalised_exp(weights: np.ndarray, delta: np.ndarray, eta: float) -> np.ndarray:
    logits = np.log(np.clip(weights, 1e-300, None)) + eta * delta
    logits -= logits.max()
    w = np.exp(logits)
    return w / w.sum()


def paper_rule(weights, losses, reference, eta: float = 1.0, smoothing: float = 0.0):
    delta = np.maximum(np.asarray(losses, float) - np.asarray(reference, float), 0.0)
    return _normalised_exp(np.asarray(weights, float), delta, eta)


def reference_code_rule(weights, losses, reference, eta: float = 1.0, smoothing: float = 1e-4):
    delta = np.asarray(losses, float) - np.asarray(reference, float)
    w = _normalised_exp(np.asarray(weights, float), delta, eta)
    return (1 - smoothing) * w + smoothing / len(w)


def constant_rule(weights, losses, reference, eta: float = 1.0, smoothing: float = 0.0):
    w = np.asarray(weights, float)
    return w / w.sum()


RULES: dict[str, Callable[..., np.ndarray]] = {
    "paper": paper_rule,
    "reference_code": reference_code_rule,
    "constant": constant_rule,
}


def get_rule(name: str) -> Callable[..., np.ndarray]:
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; allowed: {sorted(RULES)}")
    return RULES[name]
