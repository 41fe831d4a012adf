"""Scaling-law reference losses (docs/method.md §5): fit ``L(N) = a·N^(-b) + c`` per domain.

The authors fit the validation losses of a family of source models (LLaMA2 7B/13B/70B) with
``scipy.optimize.curve_fit`` from ``p0 = (406.4, 0.336, 0.69)`` and evaluate the fit at the
target's total parameter count (embeddings, LM head and norms included).
"""

from __future__ import annotations

import warnings

import numpy as np

P0 = (406.4, 0.336, 0.69)


def scaling_law(n, a, b, c):
    return a * np.power(n, -b) + c


def fit_domain(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(a, b, c) for one domain from three or more (parameter count, loss) pairs."""
    from scipy.optimize import OptimizeWarning, curve_fit

    if len(points) < 3:
        raise ValueError(f"a scaling fit needs at least 3 (params, loss) points, got {len(points)}")
    n = np.array([p[0] for p in points], dtype=np.float64)
    loss = np.array([p[1] for p in points], dtype=np.float64)
    with warnings.catch_warnings():
        # three points for three parameters: an exact fit whose covariance is undefined
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(scaling_law, n, loss, p0=P0, maxfev=100_000)
    return tuple(float(x) for x in params)


def _points(domain: str, points) -> list[tuple[float, float]]:
    """``[[params, loss], ...]`` checked: pairs of finite numbers, parameter counts above 0."""
    if not isinstance(points, list):
        raise ValueError(
            f"domain {domain}: expected a list of [params, loss] pairs, got {points!r}"
        )
    out = []
    for p in points:
        ok = isinstance(p, (list, tuple)) and len(p) == 2
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
        if not ok or not all(np.isfinite(p)) or p[0] <= 0:
            raise ValueError(
                f"domain {domain}: {p!r} is not a [params, loss] pair of finite numbers "
                "(params > 0)"
            )
        out.append((float(p[0]), float(p[1])))
    return out


def reference_losses(data: dict[str, list], target_params: float) -> dict[str, float]:
    """Per-domain reference loss at ``target_params`` from ``{domain: [[params, loss], ...]}``.

    Raises:
        ValueError: ``data`` is not such a mapping, a point is not a pair of finite numbers, or a
            domain has fewer than three points.
    """
    if not isinstance(data, dict) or not data:
        raise ValueError("expected a JSON object {domain: [[params, loss], ...], ...}")
    out = {}
    for domain, points in data.items():
        pairs = _points(domain, points)
        try:
            a, b, c = fit_domain(pairs)
        except ValueError as exc:
            raise ValueError(f"domain {domain}: {exc}") from exc
        out[domain] = float(scaling_law(float(target_params), a, b, c))
    return out
