#!/usr/bin/env python3
"""The P² law sweep (issue 29): prune one source to three pruning rates, continue each with a
validation-loss curve, fit the law on two rates and the first half of each curve, and measure
how well it predicts the held-out rate's curve and the second halves.

    python tools/p2_sweep.py --out runs/p2_sweep                       # SmolLM2-135M; hours
    python tools/p2_sweep.py --rates 0.3,0.5,0.67 --held-out 0.67 --continue-steps 400 ...

Per rate ρ (the fraction of parameters removed): a target shape with ``(1 − ρ)·N0`` parameters
(every dimension scaled by one factor: layers, hidden size, query groups with the source's
heads per group, FFN; :func:`target_for_rate`), cut from the source by activation importance
(``megashear importance`` once, then ``megashear one-shot --method=importance``; the P² paper
prunes one-shot too) or, with ``--prune=learned``, ``megashear prune`` toward it for ``P`` steps
and ``megashear finalize``; then ``C`` steps of ``megashear train`` whose dynamic-batch-loading
updates evaluate the validation loss ``--evals`` times (the curve: the unweighted mean over the
domains at ``step x batch x seq`` tokens, read by ``megashear fit-p2``'s run reader). L0 is the
source's mean validation loss. A finished rate is cached in ``OUT/rates/rho_XX.json`` and
skipped on a rerun with the same settings (resumable; a rate cut off mid-way is redone).

Writes ``OUT/p2_sweep.json`` (settings, source, the rates' curves, the law fitted on the split
and on everything, the extrapolation errors in nats and relative to L − L0), ``OUT/p2_sweep.md``
and ``OUT/p2_sweep.png``. ``--source-hf`` takes any LLaMA HF directory with a tokenizer (a
miniature check uses a tiny random one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shear_stages import (  # noqa: E402
    SMOLLM2_EOS,
    ShearStages,
    load_fetcher,
    manifest_with_weights,
    write_text_atomic,
)
from stage_runner import StageRunner  # noqa: E402

from megashear.cli import report_error  # noqa: E402
from megashear.paths import corpus_dir  # noqa: E402

# what a cached rate must share with the current run to be reused
RUN_SETTINGS = (
    "source_hf",
    "corpus",
    "bytes_per_domain",
    "seq_length",
    "eval_sequences",
    "batch",
    "micro_batch",
    "prune_steps",
    "prune_lr",
    "prune_updates",
    "continue_steps",
    "continue_lr",
    "evals",
    "rule",
    "prune_pp",
    "prune",
    "importance_samples",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/p2_sweep")
    p.add_argument("--corpus", default=str(corpus_dir()), help="default: $MEGASHEAR_CORPUS")
    p.add_argument("--source-hf", default=None, help="HF source dir (default: SmolLM2-135M)")
    p.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default: fetch_smollm2's)")
    p.add_argument("--eos-token", default=None, help=f"default: {SMOLLM2_EOS} for SmolLM2")
    p.add_argument("--rates", default="0.3,0.5,0.67", help="fractions of parameters removed")
    p.add_argument("--held-out", type=float, default=None, help="rate left out (default: max)")
    p.add_argument("--bytes-per-domain", type=int, default=2_000_000)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=16, help="validation windows/domain")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--prune-steps", type=int, default=60)
    p.add_argument("--prune-lr", type=float, default=1e-4)
    p.add_argument("--prune-updates", type=int, default=3)
    p.add_argument("--continue-steps", type=int, default=400)
    p.add_argument("--continue-lr", type=float, default=1e-3)
    p.add_argument("--evals", type=int, default=8, help="validation points per curve")
    p.add_argument("--rule", default="paper", choices=("paper", "constant"))
    p.add_argument("--prune-pp", type=int, default=2, choices=(1, 2))
    p.add_argument(
        "--prune",
        default="importance",
        choices=("importance", "learned"),
        help="importance: the one-shot activation-importance cut (no pruning steps; the P² "
        "paper prunes one-shot too); learned: --prune-steps of learned masks (paper init)",
    )
    p.add_argument("--importance-samples", type=int, default=64, help="calibration windows")
    args = p.parse_args(argv)
    args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    return args


def target_for_rate(source, rate: float, pp: int = 1) -> dict:
    """Target fields with about ``(1 − rate)`` of the source's parameters: every dimension
    scaled by one factor (layers in multiples of ``pp``, hidden and FFN in multiples of 8,
    query groups with the source's heads per group), the factor whose shape comes closest."""
    from megashear.pruning.targets import make_target, validate_target

    goal = (1.0 - rate) * source.num_parameters()
    ratio = source.num_attention_heads // source.num_query_groups
    best = None
    for k in range(1, 1001):
        f = k / 1000
        groups = max(1, round(source.num_query_groups * f))
        fields = {
            "num_layers": max(pp, round(source.num_layers * f / pp) * pp),
            "hidden_size": max(8, round(source.hidden_size * f / 8) * 8),
            "num_attention_heads": groups * ratio,
            "num_query_groups": groups,
            "ffn_hidden_size": max(8, round(source.ffn_hidden_size * f / 8) * 8),
        }
        try:
            target = make_target(source, **fields)
            validate_target(source, target, pp_sizes=(pp,))
        except ValueError:
            continue
        miss = abs(target.num_parameters() - goal)
        if best is None or miss < best[0]:
            best = (miss, fields)
    if best is None:
        raise SystemExit(f"error: no target shape for rate {rate} fits the source")
    return best[1]


def curve_errors(law, points) -> dict:
    """Absolute errors in nats and relative errors of L − L0 of ``law`` on ``points``."""
    pred = law.loss(points.n0, points.n, points.tokens, points.l0)
    nats = abs(pred - points.loss)
    gap = points.loss - points.l0
    rel = abs((pred - points.l0) - gap) / abs(gap)
    return {
        "points": len(points),
        "nats_mean": float(nats.mean()),
        "nats_max": float(nats.max()),
        "gap_rel_mean": float(rel.mean()),
        "gap_rel_max": float(rel.max()),
        "predicted": pred.tolist(),
    }


def split(points, held_out_n: float):
    """Masks: the fit (first half of each curve not at the held-out size), the second halves,
    the held-out rate's curve."""
    import numpy as np

    fit = np.zeros(len(points), bool)
    second = np.zeros(len(points), bool)
    held = points.n == held_out_n
    for idx in points.curves():
        if held[idx[0]]:
            continue
        half = len(idx) // 2
        fit[idx[:half]] = True
        second[idx[half:]] = True
    return fit, second, held


def markdown(results: dict) -> str:
    s = results["source"]
    lines = [
        f"Source: {s['parameters']:,} parameters, mean validation loss L0 = {s['l0']:.4f}.",
        "",
        "| rate (nominal) | ρ = 1 − n/n0 | parameters | target (layers, hidden, heads, groups, "
        "FFN) | loss after the cut | loss at the end |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rates"].values():
        t = r["target"]
        shape = ", ".join(str(t[k]) for k in t)
        end = r["curve"][-1]["loss"] if r["curve"] else float("nan")
        lines.append(
            f"| {r['rate']:.2f} | {r['rho']:.3f} | {r['parameters']:,} | {shape} | "
            f"{r['after_cut_mean']:.4f} | {end:.4f} |"
        )
    lines += ["", "Law fitted on two rates, first half of each curve:", "", "```"]
    lines += [results["fit_split_summary"], "```", ""]
    lines += [
        "| predicted | points | mean error (nats) | max (nats) | mean rel. error of L − L0 "
        "| max rel. |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in results["errors"].items():
        lines.append(
            f"| {name} | {e['points']} | {e['nats_mean']:.4f} | {e['nats_max']:.4f} | "
            f"{e['gap_rel_mean']:.3f} | {e['gap_rel_max']:.3f} |"
        )
    lines += ["", "Law fitted on everything:", "", "```", results["fit_all_summary"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates = args.rate_list
    if len(rates) < 3 or len(set(rates)) != len(rates) or not all(0 < r < 1 for r in rates):
        return report_error(ValueError("--rates needs three or more distinct rates in (0, 1)"))
    held_rate = max(rates) if args.held_out is None else args.held_out
    if held_rate not in rates:
        return report_error(ValueError(f"--held-out {held_rate} is not one of --rates {rates}"))
    if args.batch % args.micro_batch or args.evals < 4:
        return report_error(ValueError("--batch must be a multiple of --micro-batch, --evals >= 4"))
    t_start = time.time()
    out = Path(args.out).resolve()
    (out / "rates").mkdir(parents=True, exist_ok=True)
    runner = StageRunner(out, threads=2)
    stages = ShearStages(runner, args.seq_length, args.eval_sequences, out / "index_cache")
    ckpt = out / "ckpt"
    if args.source_hf:
        hf_src = Path(args.source_hf)
        if not (hf_src / "config.json").is_file():
            return report_error(ValueError(f"--source-hf {hf_src} has no config.json"))
        eos = args.eos_token
    else:
        hf_src = load_fetcher().ensure_smollm2(args.cache_dir)
        eos = args.eos_token or SMOLLM2_EOS
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings["source_hf"] = str(hf_src)

    source_file = out / "source.json"
    source = json.loads(source_file.read_text()) if source_file.is_file() else None
    if source is None or source["settings"] != settings:
        converted, manifest = stages.prepare(
            hf_src, Path(args.corpus), ckpt / "source", out / "data", args.bytes_per_domain, eos
        )
        reference = stages.evaluate("source", ckpt / "source", manifest, write_reference=True)
        source = {
            "settings": settings,
            "model": converted["model"],
            "manifest": str(manifest),
            "reference": reference,
        }
        write_text_atomic(source_file, json.dumps(source, indent=1))
    manifest = Path(source["manifest"])
    if args.prune == "importance" and not (ckpt / "source" / "importance.pt").is_file():
        stages.importance("importance", ckpt / "source", manifest, args.importance_samples)

    from megashear.jobs.fit_p2 import run_points
    from megashear.model_config import ModelConfig

    source_cfg = ModelConfig.from_dict(source["model"])
    n0 = source_cfg.num_parameters()
    l0 = statistics.fmean(source["reference"].values())
    P, C, B = args.prune_steps, args.continue_steps, args.batch
    common = dict(batch=B, micro_batch=args.micro_batch)

    def run_rate(rate: float) -> dict:
        stage = f"rho_{round(rate * 100):02d}"
        cache = out / "rates" / f"{stage}.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached["settings"] == settings:
                print(f"[p2-sweep] rate {rate}: cached ({cache})", flush=True)
                return cached
        for stale in (out / stage, *ckpt.glob(f"{stage}*")):  # a rate cut off mid-way
            shutil.rmtree(stale, ignore_errors=True)
        t = time.time()
        target = target_for_rate(source_cfg, rate, args.prune_pp)
        if args.prune == "importance":
            final = stages.one_shot(
                f"{stage}-oneshot", ckpt / "source", target, ckpt / f"{stage}-final", "importance"
            )
        else:
            stages.prune(
                f"{stage}-prune",
                ckpt / "source",
                manifest,
                target,
                ckpt / f"{stage}-prune",
                out / stage / "prune",
                P,
                lr=args.prune_lr,
                updates=args.prune_updates,
                rule=args.rule,
                pp=args.prune_pp,
                **common,
            )
            final = stages.finalize(
                f"{stage}-finalize", ckpt / f"{stage}-prune", ckpt / f"{stage}-final"
            )
        after_cut = stages.evaluate(f"{stage}-cut", ckpt / f"{stage}-final", manifest)
        start = (
            manifest_with_weights(manifest, out / stage / "prune", out / stage / "manifest.yaml")
            if args.rule != "constant" and args.prune == "learned"
            else manifest
        )
        stages.train(
            f"{stage}-continue",
            start,
            ckpt / stage,
            out / stage / "continue",
            C,
            lr=args.continue_lr,
            updates=args.evals,
            rule=args.rule,
            load=ckpt / f"{stage}-final",
            **common,
        )
        curve = run_points(str(out / stage / "continue"), n0, l0)
        result = {
            "settings": settings,
            "rate": rate,
            "target": target,
            "parameters": final["parameters"],
            "rho": 1 - final["parameters"] / n0,
            "after_cut": after_cut,
            "after_cut_mean": statistics.fmean(after_cut.values()),
            "curve": curve,
            "seconds": time.time() - t,
        }
        write_text_atomic(cache, json.dumps(result, indent=1))
        print(f"[p2-sweep] rate {rate}: done in {result['seconds']:.0f} s", flush=True)
        return result

    results = {"settings": {**settings, "rates": rates, "held_out": held_rate}, "rates": {}}
    results["source"] = {"parameters": n0, "l0": l0, "reference": source["reference"]}
    for rate in rates:
        results["rates"][str(rate)] = run_rate(rate)

    from megashear.scaling.p2_law import fit_p2
    from megashear.scaling.p2_plot import plot_p2
    from megashear.scaling.p2_points import points_from_rows

    rows = [row for r in results["rates"].values() for row in r["curve"]]
    points = points_from_rows(rows, "sweep")
    held_n = results["rates"][str(held_rate)]["parameters"]
    fit_mask, second_mask, held_mask = split(points, held_n)
    fit_split = fit_p2(points.subset(fit_mask))
    fit_all = fit_p2(points)
    results["fit_split"] = fit_split.to_dict()
    results["fit_split_summary"] = fit_split.summary()
    results["fit_all"] = fit_all.to_dict()
    results["fit_all_summary"] = fit_all.summary()
    results["errors"] = {
        f"held-out rate {held_rate}": curve_errors(fit_split.law, points.subset(held_mask)),
        "second halves of the fitted rates": curve_errors(
            fit_split.law, points.subset(second_mask)
        ),
        "fitted points (first halves)": curve_errors(fit_split.law, points.subset(fit_mask)),
    }
    held_out = points.subset(second_mask | held_mask)
    results["plot"] = plot_p2(
        str(out / "p2_sweep.png"),
        fit_split.law,
        points.subset(fit_mask),
        held_out=held_out,
        title="P² sweep",
    )
    results["seconds"] = time.time() - t_start
    write_text_atomic(out / "p2_sweep.json", json.dumps(results, indent=1))
    write_text_atomic(out / "p2_sweep.md", markdown(results))
    print()
    print(markdown(results))
    print(f"total {results['seconds']:.0f} s; {out / 'p2_sweep.md'}, {out / 'p2_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
