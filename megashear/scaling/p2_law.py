"""The P² law of post-training after pruning (Chen et al., arXiv 2411.10272, ACL 2025):

    L(N0, D, ρ, L0) = L0 + (1/ρ)^γ · (1/N0)^δ · (N_C / N0^α + D_C / D^β + E)

- ``N0``: parameters before pruning, in billions; ``D``: post-training tokens, in billions;
- ``ρ = 1 − n/n0``: the pruning rate, the fraction of parameters removed (the issue's
  convention; the sign of γ is left to the fit: a gap that grows with ρ gives γ < 0, see
  docs/p2_law.md for the "fraction kept" reading);
- ``L0``: the source's loss before pruning.

The constants are fitted Chinchilla style (:func:`fit_p2`): a Huber loss on the residuals of
log-loss, ``log L_pred − log L_obs`` (or, with ``target="log_gap"``, of ``log(L − L0)``), is
minimised by L-BFGS-B from the best points of a grid. The grid runs over the exponents
(γ, δ, α, β); for each, the linear constants are solved by bounded least squares on
``L − L0`` (N_C, D_C ≥ 0), so that every start is consistent with the data. N_C and D_C are
optimised as logarithms (positive); E is signed (a negative E puts the law's asymptote below
L0, which a pruned model post-trained on a corpus its source never saw can reach). Confidence
intervals are the Gauss-Newton ones: the covariance ``s² (JᵀJ)⁻¹`` of the residual Jacobian at
the optimum, ``s²`` the residual variance, with Student-t quantiles (N_C, D_C: on their
logarithms, so their intervals stay positive).

Constants the data cannot identify are held fixed (:func:`unidentifiable`), each with the
reason: with one N0, δ, α and N_C (``N0^−δ·(N_C/N0^α + E)`` is one constant, fitted as E); with
two N0, α and N_C; with one pruning rate, γ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from megashear.scaling.p2_points import Points

logger = logging.getLogger(__name__)

PARAMS = ("gamma", "delta", "n_c", "alpha", "d_c", "beta", "e")
"""The law's constants, in the order of the formula."""
LINEAR = ("n_c", "d_c", "e")
"""The constants that multiply a term (a fixed 0 removes the term)."""
LOG = ("n_c", "d_c")
"""The constants fitted as logarithms (positive); E is signed: an asymptote below L0 is allowed
(a pruned model post-trained on a corpus its source never saw can end below the source's loss
on it)."""
SYMBOLS = {
    "gamma": "γ",
    "delta": "δ",
    "n_c": "N_C",
    "alpha": "α",
    "d_c": "D_C",
    "beta": "β",
    "e": "E",
}
BILLION = 1e9
"""N0 and D enter the law in billions (parameters, tokens): the fit is then well scaled."""
FORMULA = "L = L0 + (1/rho)^gamma * (1/N0)^delta * (N_C / N0^alpha + D_C / D^beta + E)"
UNITS = "N0 in billions of parameters, D in billions of tokens, rho = 1 - n/n0 (fraction removed)"
TARGETS = ("log_loss", "log_gap")

# bounds of the internal parameters (exponents as such, linear constants as logarithms)
_BOUNDS = {
    "gamma": (-5.0, 5.0),
    "delta": (-2.0, 3.0),
    "n_c": (-40.0, 40.0),
    "alpha": (0.0, 3.0),
    "d_c": (-40.0, 40.0),
    "beta": (1e-3, 3.0),
    "e": (-1e4, 1e4),
}
_GRID = {
    "gamma": (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0),
    "delta": (0.0, 0.3, 0.6, 1.0),
    "alpha": (0.0, 0.3, 0.6, 1.0),
    "beta": (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5),
}


@dataclass
class P2Law:
    """The law's constants (N0 and D in billions); every method takes arrays or scalars of
    raw counts (parameters, tokens) and returns floats or arrays alike."""

    gamma: float
    delta: float
    n_c: float
    alpha: float
    d_c: float
    beta: float
    e: float

    def _factor(self, n0, n) -> np.ndarray:
        rho = 1.0 - np.asarray(n, float) / np.asarray(n0, float)
        return rho ** (-self.gamma) * (np.asarray(n0, float) / BILLION) ** (-self.delta)

    def gap(self, n0, n, tokens) -> np.ndarray:
        """``L − L0``: the loss the pruned model has above its source after ``tokens``."""
        n0b = np.asarray(n0, float) / BILLION
        d = np.asarray(tokens, float) / BILLION
        inner = self.n_c * n0b ** (-self.alpha) + self.d_c * d ** (-self.beta) + self.e
        return self._factor(n0, n) * inner

    def loss(self, n0, n, tokens, l0) -> np.ndarray:
        """The predicted loss after ``tokens`` tokens of post-training."""
        return np.asarray(l0, float) + self.gap(n0, n, tokens)

    def floor(self, n0, n) -> np.ndarray:
        """``L − L0`` after unlimited tokens (the law's asymptote)."""
        n0b = np.asarray(n0, float) / BILLION
        return self._factor(n0, n) * (self.n_c * n0b ** (-self.alpha) + self.e)

    def tokens_for_gap(self, n0, n, gap) -> np.ndarray:
        """Tokens after which ``L − L0`` has come down to ``gap``; ``inf`` where the law's
        asymptote is at or above ``gap`` (never reached)."""
        factor = self._factor(n0, n)
        n0b = np.asarray(n0, float) / BILLION
        rest = np.asarray(gap, float) / factor - self.n_c * n0b ** (-self.alpha) - self.e
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(
                (rest > 0) & (self.d_c > 0), (self.d_c / rest) ** (1.0 / self.beta), np.inf
            )
        return d * BILLION

    def tokens_to_reach(self, n0, n, l0, loss) -> np.ndarray:
        """Tokens needed to bring the loss down to ``loss`` (``inf``: never, by the law)."""
        return self.tokens_for_gap(n0, n, np.asarray(loss, float) - np.asarray(l0, float))

    def gain_per_billion(self, n0, n, tokens) -> np.ndarray:
        """The marginal gain, ``−dL/dD`` per billion tokens, at ``tokens`` (nats)."""
        d = np.asarray(tokens, float) / BILLION
        return self._factor(n0, n) * self.beta * self.d_c * d ** (-self.beta - 1.0)

    def to_dict(self) -> dict[str, float]:
        return {p: float(getattr(self, p)) for p in PARAMS}

    @classmethod
    def from_dict(cls, values: dict) -> P2Law:
        """From ``{"gamma": ..., ...}`` or a fit's JSON (``{"parameters": {name: {"value"...``)."""
        params = values.get("parameters", values)
        missing = [p for p in PARAMS if p not in params]
        if missing:
            raise ValueError(f"P² law constants lack {', '.join(missing)}")
        out = {}
        for p in PARAMS:
            v = params[p]
            v = v["value"] if isinstance(v, dict) else v
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"P² law constant {p} is not a finite number ({v!r})")
            out[p] = float(v)
        return cls(**out)


@dataclass
class FitResult:
    """A fitted law with its uncertainty and quality.

    Attributes:
        law: the fitted constants.
        ci95: constant -> 95% confidence interval (None where fixed or not estimable).
        fixed: constant -> why it was held fixed (given, or not identifiable).
        r2: coefficient of determination of the loss; r2_gap: of ``L − L0``.
        asd: average slope difference (nats per decade of tokens, see :func:`average_slope_diff`).
        objective: the Huber objective at the optimum; points: observations used.
        messages: what the fit had to say (held constants, poorly determined ones).
    """

    law: P2Law
    ci95: dict[str, list[float] | None]
    fixed: dict[str, str]
    r2: float
    r2_gap: float
    asd: float
    objective: float
    points: int
    target: str
    huber_delta: float
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON form: formula, units, every constant with its interval, quality."""
        return {
            "law": FORMULA,
            "units": UNITS,
            "parameters": {
                p: {
                    "value": getattr(self.law, p),
                    "ci95": self.ci95.get(p),
                    "fixed": p in self.fixed,
                }
                for p in PARAMS
            },
            "fixed": dict(self.fixed),
            "r2": self.r2,
            "r2_gap": self.r2_gap,
            "asd": self.asd,
            "objective": self.objective,
            "points": self.points,
            "target": self.target,
            "huber_delta": self.huber_delta,
            "messages": list(self.messages),
        }

    def summary(self) -> str:
        """A few human-readable lines: the constants with intervals, R², ASD, messages."""
        lines = [
            f"P² law fitted on {self.points} points ({self.target}, Huber δ "
            f"{self.huber_delta:g}): {FORMULA}",
            f"  ({UNITS})",
        ]
        for p in PARAMS:
            v = getattr(self.law, p)
            if p in self.fixed:
                why = "given" if self.fixed[p] == "given" else "not identifiable, see note"
                lines.append(f"  {SYMBOLS[p]:>3} = {v:.6g}  (fixed: {why})")
                continue
            ci = self.ci95.get(p)
            shown = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "not estimable"
            lines.append(f"  {SYMBOLS[p]:>3} = {v:.6g}  95% CI {shown}")
        lines.append(
            f"  R² {self.r2:.5f} (of L − L0: {self.r2_gap:.5f}), "
            f"average slope difference {self.asd:.4g} nats/decade"
        )
        lines.extend(f"  note: {m}" for m in self.messages)
        return "\n".join(lines)


def unidentifiable(points: Points, given: dict[str, float]) -> dict[str, tuple[float, str]]:
    """The constants these points cannot determine, each with the value it is held at and why
    (constants in ``given`` are the caller's and are left out)."""
    out: dict[str, tuple[float, str]] = {}
    n0s = np.unique(points.n0)
    rhos = np.unique(np.round(points.rho, 12))
    if len(n0s) == 1:
        why = (
            f"every point has the same N0 ({n0s[0]:.4g}): N0^-delta * (N_C / N0^alpha + E) is "
            "one constant, fitted as E"
        )
        for p, v in (("delta", 0.0), ("alpha", 0.0), ("n_c", 0.0)):
            out[p] = (v, why)
    elif len(n0s) == 2:
        why = "only two distinct N0: N_C / N0^alpha cannot be told from E; its constant is in E"
        for p, v in (("alpha", 0.0), ("n_c", 0.0)):
            out[p] = (v, why)
    if len(rhos) == 1:
        out["gamma"] = (
            0.0,
            f"every point has the same pruning rate ({rhos[0]:.4g}): (1/rho)^gamma is one "
            "constant factor",
        )
    return {p: v for p, v in out.items() if p not in given}


class _Model:
    """The law as a function of the free internal parameters, with its Jacobian."""

    def __init__(self, points: Points, fixed: dict[str, float]) -> None:
        self.u = np.log(points.rho)
        self.v = np.log(points.n0 / BILLION)
        self.w = np.log(points.tokens / BILLION)
        self.l0 = points.l0
        self.fixed = fixed
        self.free = [p for p in PARAMS if p not in fixed]

    def full(self, theta: np.ndarray) -> dict[str, float]:
        """Internal values of every constant (linear ones as logs; a fixed 0 is -inf)."""
        values = dict(zip(self.free, theta.tolist()))
        for p, v in self.fixed.items():
            values[p] = (math.log(v) if v > 0 else -math.inf) if p in LOG else v
        return values

    def law(self, theta: np.ndarray) -> P2Law:
        values = self.full(theta)
        return P2Law(**{p: math.exp(values[p]) if p in LOG else values[p] for p in PARAMS})

    def terms(self, values: dict[str, float]) -> tuple[np.ndarray, ...]:
        factor = np.exp(-values["gamma"] * self.u - values["delta"] * self.v)
        a = np.exp(values["n_c"] - values["alpha"] * self.v)
        b = np.exp(values["d_c"] - values["beta"] * self.w)
        c = np.full_like(self.u, values["e"])
        return factor, a, b, c

    def gap_and_jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``L − L0`` at every point and its derivatives by the free internal parameters."""
        factor, a, b, c = self.terms(self.full(theta))
        gap = factor * (a + b + c)
        columns = {
            "gamma": -self.u * gap,
            "delta": -self.v * gap,
            "n_c": factor * a,
            "alpha": -self.v * factor * a,
            "d_c": factor * b,
            "beta": -self.w * factor * b,
            "e": factor,
        }
        return gap, np.stack([columns[p] for p in self.free], axis=1)


def _huber(r: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """The Huber loss of residuals ``r`` summed, and its derivative by each residual."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    return float(value), np.where(small, r, delta * np.sign(r))


def _residuals(model: _Model, theta, loss, target) -> tuple[np.ndarray, np.ndarray]:
    gap, jac = model.gap_and_jacobian(theta)
    if target == "log_gap":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(gap) - np.log(loss - model.l0), jac / gap[:, None]
    pred = model.l0 + gap
    with np.errstate(invalid="ignore"):
        return np.log(pred) - np.log(loss), jac / pred[:, None]


def _starts(model: _Model, loss: np.ndarray, target: str, delta: float, count: int) -> list:
    """The ``count`` best grid points: the exponents from a grid, the linear constants from
    least squares on ``L − L0`` at each (N_C, D_C >= 0)."""
    y = loss - model.l0
    weight = 1.0 / (y if target == "log_gap" else loss)  # the residual's first-order scale
    grids = [_GRID[p] if p not in model.fixed else (model.fixed[p],) for p in _GRID]
    linear_free = [p for p in LINEAR if p not in model.fixed]
    scored = []
    for gamma in grids[0]:
        for delta_ in grids[1]:
            for alpha in grids[2]:
                for beta in grids[3]:
                    values = {"gamma": gamma, "delta": delta_, "alpha": alpha, "beta": beta}
                    values.update(n_c=0.0, d_c=0.0, e=1.0)
                    factor, a, b, c = model.terms(values)  # unit constants
                    basis = {"n_c": factor * a, "d_c": factor * b, "e": factor * c}
                    rhs = y.copy()
                    for p in LINEAR:
                        if p in model.fixed:
                            rhs -= model.fixed[p] * basis[p]
                    if linear_free:
                        # E is signed: non-negative least squares on E+ and E- (E = E+ - E-)
                        cols = [basis[p] for p in linear_free]
                        if "e" in linear_free:
                            cols.append(-basis["e"])
                        matrix = np.stack(cols, axis=1)
                        coef, _ = optimize.nnls(matrix * weight[:, None], rhs * weight)
                        if "e" in linear_free:
                            coef = (
                                coef[:-1] - np.eye(len(coef) - 1)[linear_free.index("e")] * coef[-1]
                            )
                    else:
                        coef = np.zeros(0)
                    scale = max(float(np.abs(y).mean()), 1e-12)
                    for p, k in zip(linear_free, coef):
                        values[p] = math.log(max(k, 1e-9 * scale)) if p in LOG else float(k)
                    theta = np.array([values[p] for p in model.free])
                    theta = np.clip(theta, *zip(*(_BOUNDS[p] for p in model.free)))
                    r, _ = _residuals(model, theta, loss, target)
                    if np.all(np.isfinite(r)):
                        scored.append((_huber(r, delta)[0], theta))
    scored.sort(key=lambda s: s[0])
    return [theta for _, theta in scored[:count]]


def fit_p2(
    points: Points,
    fixed: dict[str, float] | None = None,
    target: str = "log_loss",
    huber_delta: float = 1e-3,
    starts: int = 8,
) -> FitResult:
    """Fit the P² law to ``points`` (which must carry losses).

    Args:
        fixed: constants held at given values (N_C, D_C ≥ 0; a 0 removes its term); those
            the points cannot identify are added with a message (:func:`unidentifiable`).
        target: ``"log_loss"``: Huber on ``log L_pred − log L_obs`` (the issue's and
            Chinchilla's choice; defined whatever the sign of ``L − L0``); ``"log_gap"``: on
            ``log(L − L0)`` residuals (every loss must then exceed its ``l0``), which weighs
            the small gaps of long runs as much as the large early ones.
        huber_delta: the Huber threshold on the log residuals (Chinchilla: 1e-3).
        starts: L-BFGS-B runs, from the best grid points.

    Raises:
        ValueError: an unknown or out-of-range fixed constant, a wrong target, fewer points
            than free constants, or too few distinct token counts.
    """
    if points.loss is None:
        raise ValueError("the fit needs points with a loss column")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta:g}")
    given = dict(fixed or {})
    for p, v in given.items():
        if p not in PARAMS:
            raise ValueError(f"cannot fix {p!r}: the constants are {', '.join(PARAMS)}")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"fixed {p} must be a finite number, got {v!r}")
        if p in LOG and v < 0:
            raise ValueError(f"fixed {p} must be >= 0 (it multiplies a term), got {v:g}")
    loss = points.loss
    if target == "log_gap" and np.any(loss <= points.l0):
        i = int(np.argmax(loss <= points.l0))
        raise ValueError(
            f"target log_gap needs every loss above its l0; row {i + 1} has loss "
            f"{loss[i]:g} <= l0 {points.l0[i]:g} (use target log_loss)"
        )
    held = {p: float(v) for p, v in given.items()}
    reasons = {p: "given" for p in given}
    messages = []
    for p, (value, why) in unidentifiable(points, given).items():
        held[p], reasons[p] = value, why
    for why in dict.fromkeys(r for r in reasons.values() if r != "given"):
        names = ", ".join(SYMBOLS[p] for p in PARAMS if reasons.get(p) == why)
        messages.append(f"held {names} fixed: {why}")
    for m in messages:
        logger.info("%s", m)
    model = _Model(points, held)
    n_free = len(model.free)
    if len(points) < n_free:
        raise ValueError(
            f"{len(points)} points are fewer than the {n_free} free constants "
            f"({', '.join(model.free)}); add points or fix constants"
        )
    if "beta" in model.free and len(np.unique(points.tokens)) < 2:
        raise ValueError("every point has the same token count: the fit needs a loss curve")

    with _one_blas_thread():
        return _fit(points, model, reasons, messages, loss, target, huber_delta, starts)


def _one_blas_thread():
    """BLAS on one thread: the fit's matrices are tiny, and a threaded BLAS on busy cores makes
    every L-BFGS-B step spin (40x slower on two shared cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the fit is the same, only slower on a busy machine
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _fit(points, model, reasons, messages, loss, target, huber_delta, starts) -> FitResult:
    n_free = len(model.free)
    bounds = [_BOUNDS[p] for p in model.free]

    def objective(theta):
        r, jac = _residuals(model, theta, loss, target)
        if not np.all(np.isfinite(r)):
            return 1e30, np.zeros_like(theta)
        value, psi = _huber(r, huber_delta)
        return value, jac.T @ psi

    initial = _starts(model, loss, target, huber_delta, max(1, starts))
    if not initial:
        raise ValueError("no grid point gives finite predictions for these points")
    best = None
    for theta0 in initial:
        if n_free == 0:
            best = (objective(theta0)[0], theta0)
            break
        res = optimize.minimize(
            objective,
            theta0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-16, "gtol": 1e-14},
        )
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x)
    value, theta = best
    law = model.law(theta)
    ci95, more = _intervals(model, theta, loss, target)
    messages.extend(more)
    pred = law.loss(points.n0, points.n, points.tokens, points.l0)
    return FitResult(
        law=law,
        ci95=ci95,
        fixed=reasons,
        r2=_r2(loss, pred),
        r2_gap=_r2(loss - points.l0, pred - points.l0),
        asd=average_slope_diff(points, pred),
        objective=value,
        points=len(points),
        target=target,
        huber_delta=huber_delta,
        messages=messages,
    )


def _intervals(model: _Model, theta, loss, target) -> tuple[dict, list[str]]:
    """Gauss-Newton 95% intervals of the free constants (linear ones through their logs)."""
    r, jac = _residuals(model, theta, loss, target)
    n, p = jac.shape
    out: dict[str, list[float] | None] = {q: None for q in PARAMS}
    messages = []
    if p == 0:
        return out, messages
    if n <= p:
        messages.append(f"{n} points for {p} free constants: no confidence intervals")
        return out, messages
    s2 = float(r @ r) / (n - p)
    sv = np.linalg.svd(jac, compute_uv=False)
    if sv[-1] <= 1e-10 * sv[0]:
        messages.append(
            "the constants are not all determined by these points (singular Jacobian): "
            "no confidence intervals; fix some constants"
        )
        return out, messages
    cov = s2 * np.linalg.inv(jac.T @ jac)
    t = float(stats.t.ppf(0.975, n - p))
    for i, q in enumerate(model.free):
        half = t * math.sqrt(max(cov[i, i], 0.0))
        lo, hi = theta[i] - half, theta[i] + half
        if q in LOG:
            lo, hi = math.exp(min(lo, 700.0)), math.exp(min(hi, 700.0))
        out[q] = [float(lo), float(hi)]
    return out, messages


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def average_slope_diff(points: Points, pred: np.ndarray) -> float:
    """The average slope difference: over every pair of consecutive token counts of every
    curve (rows sharing ``n0, n, l0``), ``|slope_pred − slope_obs|`` with slopes in nats per
    decade of tokens, averaged. NaN when no curve has two token counts."""
    diffs = []
    for idx in points.curves():
        x = np.log10(points.tokens[idx])
        dx = np.diff(x)
        ok = dx > 0
        if not ok.any():
            continue
        obs = np.diff(points.loss[idx])[ok] / dx[ok]
        fit = np.diff(pred[idx])[ok] / dx[ok]
        diffs.extend(np.abs(fit - obs).tolist())
    return float(np.mean(diffs)) if diffs else float("nan")
