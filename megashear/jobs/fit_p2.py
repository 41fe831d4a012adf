"""``megashear fit-p2``: fit the P² law to loss curves of pruned models and predict.

The points come from a table (``--points``, see :mod:`megashear.scaling.p2_points`) and/or from
``megashear train`` run directories (``--runs``, :func:`run_points`). The result, printed by the
CLI as one JSON line, holds the fitted constants with 95% intervals, R², the average slope
difference, the query's ``predictions`` (``{"n0", "n", "tokens", "l0", "loss"}`` per row, in
order) and a ``plan`` per query row (tokens to reach a loss or come within x of L0, marginal
gain per extra billion tokens). A summary goes to the log (stderr); ``--plot`` writes a PNG and
``--out`` the JSON (both atomically). :func:`train_predictor` is what ``megashear train`` uses
to log the law's prediction beside its validation loss (``logging.p2_law``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics

import numpy as np

from megashear.atomic_file import write_json_atomic
from megashear.scaling.p2_config import FitP2Config
from megashear.scaling.p2_law import P2Law, fit_p2
from megashear.scaling.p2_points import Points, points_from_rows, read_points

logger = logging.getLogger(__name__)


def _reduce(losses: dict, domain: str, where: str) -> float:
    """One validation loss from a per-domain dict: ``domain``'s, or the unweighted mean."""
    if not isinstance(losses, dict) or not losses:
        raise ValueError(f"{where}: no per-domain losses")
    if domain:
        if domain not in losses:
            raise ValueError(f"{where}: no domain {domain!r}; it has {', '.join(sorted(losses))}")
        return float(losses[domain])
    return statistics.fmean(float(v) for v in losses.values())


def run_points(run_dir: str, n0: int | None, l0: float | None, domain: str = "") -> list[dict]:
    """The fit rows of one ``megashear train`` run directory (``logging.dir``).

    - ``tokens``: each ``domain_update`` event's step x ``train.global_batch_size`` x
      ``model.seq_length`` of the run's ``config.yaml`` (tokens of this run, from its start);
    - ``loss``: the event's validation losses, one domain's or their unweighted mean;
    - ``n``: the parameters of the run's model (its checkpoint's ``megashear.json`` under
      ``checkpoint.save``, else the model of ``config.yaml``);
    - ``l0``: given, else the event's ``reference`` losses reduced the same way;
    - ``n0``: given (a checkpoint records no source).
    """
    from megashear import config_io
    from megashear.training.run_log import read_events

    if n0 is None:
        raise ValueError("runs need n0, the parameter count of their source model (--n0=...)")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(os.path.join(run_dir, "events.jsonl")):
        raise ValueError(f"{run_dir} is not a megashear run directory (no events.jsonl)")
    if not os.path.isfile(config_path):
        raise ValueError(f"{run_dir} has no config.yaml (the resolved config of its run)")
    cfg = config_io.load_yaml(config_path)
    try:
        batch = int(cfg["train"]["global_batch_size"])
        seq = int(cfg["model"]["seq_length"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{config_path} lacks train.global_batch_size or model.seq_length"
        ) from None
    model = _run_model(cfg, config_path)
    try:
        updates = read_events(run_dir, "domain_update")
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{run_dir}/events.jsonl is not a megashear event log ({exc})") from None
    rows = []
    for e in updates:
        if not e.get("step"):
            continue  # no post-training tokens yet: outside the law (D > 0)
        where = f"{run_dir} step {e['step']}"
        ref = l0
        if ref is None:
            if not e.get("reference"):
                raise ValueError(
                    f"{where}: no reference losses logged; give the source's loss (--l0=...)"
                )
            ref = _reduce(e["reference"], domain, where)
        rows.append(
            {
                "n0": n0,
                "n": model.num_parameters(),
                "tokens": int(e["step"]) * batch * seq,
                "l0": ref,
                "loss": _reduce(e.get("losses"), domain, where),
            }
        )
    if not rows:
        raise ValueError(f"{run_dir} logged no validation losses (domain_update events)")
    return rows


def _run_model(cfg: dict, config_path: str):
    from megashear.checkpoint.format import read_meta, resolve
    from megashear.model_config import ModelConfig

    save = (cfg.get("checkpoint") or {}).get("save")
    if save and os.path.isdir(save):
        try:
            return ModelConfig.from_dict(read_meta(resolve(save))["model"])
        except (ValueError, OSError):
            pass  # no checkpoint saved yet: the config's model is the same shape
    try:
        return ModelConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} does not describe the run's model ({exc})") from None


def _gather(cfg: FitP2Config) -> Points:
    rows: list[dict] = []
    if cfg.points:
        rows.extend(read_points(cfg.points).rows())
    for run in cfg.runs:
        rows.extend(run_points(run, cfg.n0, cfg.l0, cfg.domain))
    if not cfg.points and not cfg.runs:
        raise ValueError("nothing to fit: give --points=TABLE and/or --runs=[RUN_DIR,...]")
    return points_from_rows(rows, cfg.points or "runs")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def plan_rows(law: P2Law, query: Points, reach: float | None, within: float | None) -> list:
    """Per query row: the marginal gain per extra billion tokens at its token count, and the
    tokens to reach ``reach`` / to come within ``within`` of its l0 (null: never)."""
    out = []
    for i in range(len(query)):
        n0, n, t, l0 = query.n0[i], query.n[i], query.tokens[i], query.l0[i]
        row = {"gain_per_billion_tokens": float(law.gain_per_billion(n0, n, t))}
        if reach is not None:
            row["tokens_to_reach"] = _finite(law.tokens_to_reach(n0, n, l0, reach))
        if within is not None:
            row["tokens_within"] = _finite(law.tokens_for_gap(n0, n, within))
        out.append(row)
    return out


def run(cfg: FitP2Config) -> dict:
    """Fit, predict, plot and write as ``cfg`` says; the result as a dict (one JSON line)."""
    if cfg.within is not None and not cfg.within > 0:
        raise ValueError(f"within must be a positive loss difference, got {cfg.within:g}")
    if not cfg.extrapolate >= 1:
        raise ValueError(f"extrapolate must be >= 1, got {cfg.extrapolate:g}")
    points = _gather(cfg)
    query = read_points(cfg.predict, with_loss=False) if cfg.predict else None
    fixed = {}
    for name, value in cfg.fix.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"fix: {name} must be a number, got {value!r}")
        fixed[str(name)] = float(value)
    result = fit_p2(points, fixed, cfg.target, cfg.huber_delta, cfg.starts)
    logger.info("%s", result.summary())
    out = result.to_dict()
    n0s = np.unique(points.n0)
    if len(n0s) == 1:
        out["n0"] = int(n0s[0])  # the source of every point: what megashear train can assume
    out["data"] = {
        "curves": len(points.curves()),
        "tokens": [float(points.tokens.min()), float(points.tokens.max())],
        "rho": sorted({round(float(r), 6) for r in points.rho}),
    }
    if query is not None:
        loss = result.law.loss(query.n0, query.n, query.tokens, query.l0)
        out["predictions"] = [
            {**row, "loss": float(v)} for row, v in zip(query.rows(), np.atleast_1d(loss))
        ]
        out["plan"] = plan_rows(result.law, query, cfg.reach_loss, cfg.within)
        for row, plan in zip(out["predictions"], out["plan"]):
            logger.info(
                "predicted loss %.4f at %.3g tokens (n0 %.4g, n %.4g, l0 %.4f); %s",
                row["loss"],
                row["tokens"],
                row["n0"],
                row["n"],
                row["l0"],
                ", ".join(
                    f"{k} {v:.4g}" if v is not None else f"{k} never" for k, v in plan.items()
                ),
            )
    if cfg.plot:
        from megashear.scaling.p2_plot import plot_p2

        out["plot"] = plot_p2(
            cfg.plot, result.law, points, queries=query, extrapolate=cfg.extrapolate
        )
    if cfg.out:
        write_json_atomic(cfg.out, out)
        out["out"] = cfg.out
    return out


def train_predictor(path: str, n: int, tokens_per_step: int):
    """What ``megashear train`` logs with ``logging.p2_law=FIT.json``: a function of (step,
    the source's loss L0) giving the law's loss for this run's model of ``n`` parameters after
    ``step x tokens_per_step`` tokens. The source's parameter count is the fit's ``n0`` (a fit
    whose points all share one source records it)."""
    from megashear.checkpoint.format import read_json_object

    fit = read_json_object(path, ValueError)
    law = P2Law.from_dict(fit)
    n0 = fit.get("n0")
    if not isinstance(n0, (int, float)) or n0 <= 0:
        raise ValueError(
            f"logging.p2_law {path}: the fit records no single source size n0 (its points "
            "come from several sources); refit on one source's runs"
        )
    if not 0 < n < n0:
        raise ValueError(
            f"logging.p2_law {path}: this model has {n} parameters, not fewer than the fit's "
            f"source ({int(n0)}): the law predicts pruned models only"
        )

    def predict(step: int, l0: float) -> float | None:
        if step <= 0:
            return None
        return float(law.loss(n0, n, step * tokens_per_step, l0))

    return predict
