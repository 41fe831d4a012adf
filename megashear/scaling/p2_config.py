"""The settings of ``megashear fit-p2`` (a dataclass; every field is a ``--field=value`` flag,
documented by the string after it). Imports nothing heavy: ``megashear --help`` stays light."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FitP2Config:
    """Fit the P² law L = L0 + (1/rho)^gamma (1/N0)^delta (N_C/N0^alpha + D_C/D^beta + E) to
    loss curves of pruned models, report its constants and predict (docs/p2_law.md)."""

    points: str = ""
    """Fit table, CSV (header row) or JSON (list of rows): columns n0, n, tokens, l0, loss; one
    row per observation; rho = 1 - n/n0 (fraction of parameters removed)."""
    runs: tuple[str, ...] = ()
    """megashear train run directories (logging.dir: events.jsonl and config.yaml) whose
    validation losses (domain_update events) join the fit; n = the run's model parameters,
    tokens = step x global batch x sequence length."""
    n0: int | None = None
    """Parameters of the source (unpruned) model of every run in runs (required with runs)."""
    l0: float | None = None
    """The source's validation loss for runs; null: the run's reference losses (the manifest's
    source reference, as logged with each domain_update), reduced as the run's losses."""
    domain: str = ""
    """With runs: the domain whose validation loss is fitted; "": the unweighted mean over
    domains."""
    predict: str = ""
    """Query table (CSV or JSON) with columns n0, n, tokens, l0: the predicted loss of each row
    goes to "predictions" in the printed JSON, in the query's order."""
    fix: dict[str, float] = field(default_factory=dict)
    """Constants held fixed, e.g. {delta: 0, alpha: 0}; names gamma, delta, n_c, alpha, d_c,
    beta, e. Those the points cannot identify are fixed anyway, with a message."""
    target: Literal["log_loss", "log_gap"] = "log_loss"
    """Huber residuals: log_loss (log of the predicted over the observed loss) or log_gap (of
    L - L0; every loss must exceed its l0)."""
    huber_delta: float = 1e-3
    """Huber threshold on the log residuals (Chinchilla's 1e-3)."""
    starts: int = 8
    """L-BFGS-B runs, each from one of the best points of the initial grid."""
    reach_loss: float | None = None
    """Also report, for each query row, the tokens needed to bring its loss down to this."""
    within: float | None = None
    """Also report, for each query row, the tokens needed to come within this of its l0."""
    plot: str = ""
    """PNG of the observed curves, the fitted law and its extrapolation ("": none)."""
    extrapolate: float = 10.0
    """The plot draws the law up to this many times the largest token count."""
    out: str = ""
    """Also write the fit's JSON here (what logging.p2_law of megashear train reads)."""
