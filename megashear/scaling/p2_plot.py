"""The P² law as a picture: each curve's observed losses, the fitted law over them and its
extrapolation beyond them, one colour per curve (rows sharing ``n0, n, l0``)."""

from __future__ import annotations

import numpy as np

from megashear.atomic_file import atomic_path
from megashear.scaling.p2_law import P2Law
from megashear.scaling.p2_points import Points


def plot_p2(
    path: str,
    law: P2Law,
    fit: Points,
    held_out: Points | None = None,
    queries: Points | None = None,
    extrapolate: float = 10.0,
    title: str = "P² law",
) -> str:
    """Write a PNG to ``path`` (atomically) and return ``path``.

    Args:
        fit: the points the law was fitted on (filled markers).
        held_out: observed points left out of the fit (open markers), if any.
        queries: predicted points (crosses), if any.
        extrapolate: the law is drawn up to this many times the largest token count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [p for p in (fit, held_out, queries) if p is not None and len(p)]
    all_tokens = np.concatenate([p.tokens for p in groups])
    lo, hi = all_tokens.min() / 1.5, all_tokens.max() * extrapolate
    keys: list[tuple[float, float, float]] = []
    for p in groups:
        for key in zip(p.n0.tolist(), p.n.tolist(), p.l0.tolist()):
            if key not in keys:
                keys.append(key)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 5))
    observed_max = max(p.tokens.max() for p in (fit, held_out) if p is not None and len(p))
    for k, (n0, n, l0) in enumerate(keys):
        colour = colours[k % len(colours)]
        xs = np.geomspace(lo, hi, 200)
        ys = law.loss(n0, n, xs, l0)
        inside = xs <= observed_max
        label = f"N0 {n0 / 1e6:.0f}M, rho {1 - n / n0:.2f}, L0 {l0:.3f}"
        ax.plot(xs[inside], ys[inside], color=colour, lw=1.5, label=label)
        ax.plot(xs[~inside], ys[~inside], color=colour, lw=1.5, ls="--")
        ax.axhline(l0, color=colour, lw=0.6, ls=":")
        for p, style in ((fit, "o"), (held_out, "s"), (queries, "x")):
            if p is None or not len(p):
                continue
            mine = (p.n0 == n0) & (p.n == n) & (p.l0 == l0)
            if not mine.any():
                continue
            ys_p = p.loss[mine] if p.loss is not None else law.loss(n0, n, p.tokens[mine], l0)
            if style == "x":
                ax.scatter(p.tokens[mine], ys_p, marker="x", color=colour, zorder=3)
                continue
            face = colour if style == "o" else "none"
            ax.scatter(
                p.tokens[mine], ys_p, marker=style, facecolors=face, edgecolors=colour, zorder=3
            )
    ax.set_xscale("log")
    ax.set(
        xlabel="post-training tokens",
        ylabel="loss",
        title=f"{title}: observed (dots: fit, squares: held out, crosses: queries), law "
        "(solid), extrapolation (dashed), L0 (dotted)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
