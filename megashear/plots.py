"""Plots of a run from its ``events.jsonl`` (see :mod:`megashear.training.run_log`).

Each ``plot_*`` function returns a matplotlib ``Figure`` (so tests can read its series back) or
``None`` when the run has no events of that kind. :func:`write_plots` saves them as PNGs:

- ``domain_weights.png``: domain weights over training, stacked (the paper's Figure 7);
- ``excess_loss.png``: per-domain validation loss minus reference loss (Figure 6);
- ``sparsity.png``: expected sparsity per mask kind with its target, and λ, over pruning steps;
- ``loss.png``: training (and evaluation) loss.

Events used: ``train`` / ``prune`` (``loss``, ``expected_sparsity/<kind>``,
``target_sparsity/<kind>``, ``lambda/<name>``), ``eval`` (``loss``) and ``domain_update``
(``weights``, ``losses``, ``reference`` mappings by domain).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megashear.atomic_file import atomic_path  # noqa: E402
from megashear.training.run_log import read_events  # noqa: E402


def _series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(e["step"], e[key]) for e in events if key in e]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_domain_weights(events: list[dict]):
    updates = [e for e in events if e["kind"] == "domain_update"]
    if not updates:
        return None
    domains = list(updates[0]["weights"])
    steps = [e["step"] for e in updates]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot(steps, [[e["weights"][d] for e in updates] for d in domains], labels=domains)
    ax.set(xlabel="step", ylabel="domain weight", ylim=(0, 1), title="Domain weights")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_excess_loss(events: list[dict]):
    updates = [e for e in events if e["kind"] == "domain_update" and e.get("reference")]
    if not updates:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e["step"] for e in updates]
    for d in updates[0]["losses"]:
        ax.plot(steps, [e["losses"][d] - e["reference"][d] for e in updates], label=d)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="step", ylabel="validation loss - reference", title="Loss against reference")
    ax.legend(fontsize=8)
    return fig


def plot_sparsity(events: list[dict]):
    steps_events = [e for e in events if e["kind"] == "prune"]
    kinds = sorted(
        {k.split("/", 1)[1] for e in steps_events for k in e if k.startswith("expected_sparsity/")}
    )
    if not kinds:
        return None
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for kind in kinds:
        (line,) = ax.plot(*_series(steps_events, f"expected_sparsity/{kind}"), label=kind)
        ax.plot(
            *_series(steps_events, f"target_sparsity/{kind}"),
            linestyle="--",
            color=line.get_color(),
            label=f"{kind} target",
        )
    ax.set(ylabel="expected sparsity", title="Expected sparsity and targets")
    ax.legend(fontsize=8)
    lambdas = sorted({k for e in steps_events for k in e if k.startswith("lambda/")})
    for key in lambdas:
        bx.plot(*_series(steps_events, key), label=key.split("/", 1)[1])
    bx.set(xlabel="step", ylabel="λ")
    if lambdas:
        bx.legend(fontsize=8)
    return fig


def plot_loss(events: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for kind in ("prune", "train", "eval"):
        xs, ys = _series([e for e in events if e["kind"] == kind], "loss")
        if xs:
            ax.plot(xs, ys, label=kind, marker="o" if kind == "eval" else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="LM loss", title="Loss")
    ax.legend()
    return fig


PLOTS = {
    "domain_weights.png": plot_domain_weights,
    "excess_loss.png": plot_excess_loss,
    "sparsity.png": plot_sparsity,
    "loss.png": plot_loss,
}


def write_plots(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write every plot the run has data for; returns the PNG paths."""
    events = read_events(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fn in PLOTS.items():
        fig = fn(events)
        if fig is None:
            continue
        path = os.path.join(out_dir, name)
        try:
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=100, bbox_inches="tight")
        finally:
            plt.close(fig)
        written.append(path)
    return written
