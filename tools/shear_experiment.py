#!/usr/bin/env python3
"""The Sheared-LLaMA comparison at CPU scale: four ways to get the same small model, at equal
training tokens, from the same data, scored on the same held-out windows.

    python tools/shear_experiment.py --out runs/experiment        # ~1 h on 2 cores
    python tools/shear_experiment.py --prune-steps 400 --continue-steps 4000 ...  # scale up

Arms (every one ends at the target shape, default 16 layers x 384, 6 heads in 2 KV groups,
FFN 1024, cut from SmolLM2-135M):

- ``sheared``: targeted structured pruning (learned hard-concrete masks, Lagrangian) with dynamic
  batch loading for ``P`` steps, finalisation, then continued pre-training for ``C`` steps with
  dynamic batch loading from the final pruning weights (the paper's method);
- ``static``: the same with the initial domain weights kept fixed throughout
  (``data.update_rule=constant``): what dynamic batch loading buys;
- ``one-shot``: the target cut from the source keeping the leading heads, channels, FFN units and
  layers (``tools/one_shot_prune.py``, no learned masks), then ``P + C`` steps of continued
  pre-training with dynamic batch loading: what mask learning buys over the source weights alone;
- ``scratch``: the target shape from random initialisation, ``P + C`` steps with dynamic batch
  loading: what the source weights buy;
- ``distill``: the ``sheared`` arm's pruned model (the same pruning run, shared), its ``C`` steps
  of continued pre-training distilled from the source (``distill.alpha``, default 1.0: the KD
  loss alone, as Minitron) instead of the LM loss: what KD buys at equal tokens.

Every arm sees ``(P + C) x batch x seq`` training tokens. The corpus is tokenised once with the
source's tokenizer into train / validation / test splits per domain. Dynamic batch loading reads
the validation split (its reference losses are the source's own validation losses, the paper's
"source reference"); the results are measured on the test split, which no arm ever reads while
training. Nothing is tuned on it: the settings are the defaults below, fixed before any run.

Writes ``OUT/results.json``, ``OUT/results.md`` (per-domain test loss of every arm, its mean, and
the mean / spread of its per-domain excess loss over the source's test loss), and
``OUT/plots/loss_vs_tokens.png`` and ``OUT/plots/excess_by_domain.png``; prints the table.
``--source-hf`` takes any LLaMA HF directory with a tokenizer instead of SmolLM2 (the miniature
test uses a tiny random one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shear_stages import SMOLLM2_EOS, ShearStages, load_fetcher, manifest_with_weights  # noqa: E402
from stage_runner import StageRunner  # noqa: E402

from megashear.paths import corpus_dir  # noqa: E402
from megashear.pruning.targets import TARGET_FIELDS  # noqa: E402

ARMS = ("sheared", "static", "one-shot", "scratch", "distill")
DEFAULT_TARGET = (16, 384, 6, 2, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/experiment")
    p.add_argument(
        "--corpus", default=str(corpus_dir()), help="default: $MEGASHEAR_CORPUS or ../shared/corpus"
    )
    p.add_argument("--source-hf", default=None, help="HF source dir (default: SmolLM2-135M)")
    p.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default: fetch_smollm2's)")
    p.add_argument(
        "--eos-token",
        default=None,
        help=f"document separator (default: {SMOLLM2_EOS} for SmolLM2, else the tokenizer's)",
    )
    p.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS)
    )
    for name, default in zip(TARGET_FIELDS, DEFAULT_TARGET):
        p.add_argument(f"--target-{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--bytes-per-domain", type=int, default=2_000_000, help="text read per domain")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--test-sequences", type=int, default=32, help="test windows per domain")
    p.add_argument("--eval-sequences", type=int, default=16, help="validation windows per domain")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), every stage")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--prune-steps", type=int, default=60, help="P")
    p.add_argument("--prune-lr", type=float, default=1e-4)
    p.add_argument("--prune-updates", type=int, default=3, help="domain-weight updates in P")
    p.add_argument("--continue-steps", type=int, default=200, help="C")
    p.add_argument("--continue-lr", type=float, default=1e-3)
    p.add_argument("--continue-updates", type=int, default=5, help="domain-weight updates in C")
    p.add_argument("--prune-pp", type=int, default=2, choices=(1, 2))
    p.add_argument("--kd-alpha", type=float, default=1.0, help="distill arm: KD weight vs LM")
    return p.parse_args(argv)


def excess_stats(losses: dict[str, float], reference: dict[str, float]) -> dict:
    """Per-domain excess loss over the reference, its mean, population std and range."""
    excess = {d: losses[d] - reference[d] for d in reference}
    values = list(excess.values())
    return {
        "excess": excess,
        "excess_mean": statistics.fmean(values),
        "excess_std": statistics.pstdev(values),
        "excess_range": max(values) - min(values),
    }


def loss_curve(run_dirs: list[Path], tokens_per_step: int) -> dict[str, list[float]]:
    """Training LM loss and mean validation loss against training tokens, over consecutive runs
    (pruning, then continued pre-training)."""
    from megashear.training.run_log import read_events

    curve = {"tokens": [], "loss": [], "valid_tokens": [], "valid_mean": []}
    offset = 0
    for run in run_dirs:
        events = read_events(str(run))
        steps = [e for e in events if e["kind"] in ("train", "prune")]
        for e in steps:
            curve["tokens"].append((offset + e["step"]) * tokens_per_step)
            curve["loss"].append(e.get("lm_loss", e["loss"]))  # a distilled run's LM loss
        for e in events:
            if e["kind"] == "domain_update":
                curve["valid_tokens"].append((offset + e["step"]) * tokens_per_step)
                curve["valid_mean"].append(statistics.fmean(e["losses"].values()))
        offset += max((e["step"] for e in steps), default=0)
    return curve


def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for arm, r in results["arms"].items():
        c = r["curve"]
        k = max(1, len(c["loss"]) // 40)  # moving average over ~1/40 of the run
        smooth = [
            statistics.fmean(c["loss"][max(0, i - k + 1) : i + 1]) for i in range(len(c["loss"]))
        ]
        ax.plot(c["tokens"], smooth, label=arm)
        bx.plot(c["valid_tokens"], c["valid_mean"], marker="o", label=arm)
    ax.set(ylabel="training LM loss (moving avg)", title="Loss against training tokens")
    bx.axhline(
        statistics.fmean(results["reference_valid"].values()), color="black", lw=0.8, label="source"
    )
    bx.set(xlabel="training tokens", ylabel="mean validation loss")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    paths = [out / "loss_vs_tokens.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    domains = list(results["reference"])
    arms = list(results["arms"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        ex = results["arms"][arm]["excess"]
        ax.bar(
            [j + i * width for j in range(len(domains))], [ex[d] for d in domains], width, label=arm
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(ylabel="test loss - source test loss", title="Per-domain loss against the reference")
    ax.legend(fontsize=8)
    paths.append(out / "excess_by_domain.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def markdown(results: dict) -> str:
    domains = list(results["reference"])
    head = "| arm | " + " | ".join(domains) + " | mean | excess mean | excess std | excess range |"
    rule = "|---" * (len(domains) + 5) + "|"
    rows = [head, rule]
    ref = results["reference"]
    rows.append(
        "| source (reference) | "
        + " | ".join(f"{ref[d]:.3f}" for d in domains)
        + f" | {statistics.fmean(ref.values()):.3f} | | | |"
    )
    for arm, r in results["arms"].items():
        rows.append(
            f"| {arm} | "
            + " | ".join(f"{r['test'][d]:.3f}" for d in domains)
            + f" | {r['mean']:.3f} | {r['excess_mean']:+.3f} | {r['excess_std']:.3f} "
            f"| {r['excess_range']:.3f} |"
        )
    cut = [
        f"{arm} {r['after_cut_mean']:.3f}"
        for arm, r in results["arms"].items()
        if r.get("after_cut_mean") is not None
    ]
    s = results["settings"]
    lines = [
        "\n".join(rows),
        "",
        f"Test loss per domain ({s['test_sequences']} windows x {s['seq_length']} tokens per "
        f"domain, held out from training and from dynamic batch loading). Every arm trained on "
        f"{s['tokens_per_arm']:,} tokens (P = {s['prune_steps']}, C = {s['continue_steps']} "
        f"steps x {s['batch']} x {s['seq_length']}). Target {s['target_parameters']:,} "
        f"parameters, source {s['source_parameters']:,}.",
    ]
    if cut:
        lines.append(f"Mean test loss right after the cut, before training on: {', '.join(cut)}.")
    lines.append(
        "Arm times (s): "
        + ", ".join(f"{arm} {r['seconds']:.0f}" for arm, r in results["arms"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        print(
            f"error: --arms {args.arms!r}: unknown {unknown}; choose from {ARMS}", file=sys.stderr
        )
        return 2
    if args.batch % args.micro_batch:
        print("error: --batch must be a multiple of --micro-batch", file=sys.stderr)
        return 2
    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(out, threads=2)
    stages = ShearStages(runner, args.seq_length, args.eval_sequences, out / "index_cache")
    ckpt = out / "ckpt"
    if args.source_hf:
        hf_src = Path(args.source_hf)
        if not (hf_src / "config.json").is_file():
            print(f"error: --source-hf {hf_src} has no config.json", file=sys.stderr)
            return 2
        eos = args.eos_token
    else:
        hf_src = load_fetcher().ensure_smollm2(args.cache_dir)
        eos = args.eos_token or SMOLLM2_EOS
    test_tokens = 2 * args.test_sequences * (args.seq_length + 1)
    converted, manifest = stages.prepare(
        hf_src,
        Path(args.corpus),
        ckpt / "source",
        out / "data",
        args.bytes_per_domain,
        eos_token=eos,
        test_tokens=test_tokens,
    )

    def test_loss(stage: str, load: Path) -> dict[str, float]:
        return stages.evaluate(stage, load, manifest, split="test", sequences=args.test_sequences)

    reference_valid = stages.evaluate("source", ckpt / "source", manifest, write_reference=True)
    reference = test_loss("source-test", ckpt / "source")

    from megashear.model_config import ModelConfig
    from megashear.pruning.targets import make_target, validate_target

    source_cfg = ModelConfig.from_dict(converted["model"])
    target_values = {f: getattr(args, f"target_{f}") for f in TARGET_FIELDS}
    target_cfg = make_target(source_cfg, **target_values)
    try:
        validate_target(source_cfg, target_cfg, pp_sizes=(args.prune_pp,))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    P, C, B, s = args.prune_steps, args.continue_steps, args.batch, args.seq_length
    common = dict(batch=B, micro_batch=args.micro_batch)

    pruned: dict[str, tuple[dict, Path]] = {}

    def prune_and_cut(arm: str, rule: str) -> tuple[dict, Path]:
        """Prune and finalise once per arm name; (test losses after the cut, start manifest)."""
        if arm in pruned:
            return pruned[arm]
        stages.prune(
            f"{arm}-prune",
            ckpt / "source",
            manifest,
            target_values,
            ckpt / f"{arm}-prune",
            out / arm / "prune",
            P,
            lr=args.prune_lr,
            updates=args.prune_updates,
            rule=rule,
            pp=args.prune_pp,
            **common,
        )
        stages.finalize(f"{arm}-finalize", ckpt / f"{arm}-prune", ckpt / f"{arm}-final")
        after_cut = test_loss(f"{arm}-cut", ckpt / f"{arm}-final")
        start = (
            manifest_with_weights(manifest, out / arm / "prune", out / arm / "manifest.yaml")
            if rule != "constant"
            else manifest
        )
        pruned[arm] = after_cut, start
        return pruned[arm]

    def pruned_arm(
        arm: str, rule: str, pruning: str | None = None, teacher: Path | None = None
    ) -> tuple[list[Path], Path, dict]:
        pruning = pruning or arm
        after_cut, start = prune_and_cut(pruning, rule)
        stages.train(
            f"{arm}-continue",
            start,
            ckpt / arm,
            out / arm / "continue",
            C,
            lr=args.continue_lr,
            updates=args.continue_updates,
            rule=rule,
            load=ckpt / f"{pruning}-final",
            teacher=teacher,
            kd_alpha=args.kd_alpha,
            **common,
        )
        return [out / pruning / "prune", out / arm / "continue"], ckpt / arm, after_cut

    def one_shot_arm() -> tuple[list[Path], Path, dict]:
        stages.one_shot("one-shot-cut", ckpt / "source", target_values, ckpt / "one-shot-cut")
        after_cut = test_loss("one-shot-cut-eval", ckpt / "one-shot-cut")
        stages.train(
            "one-shot-train",
            manifest,
            ckpt / "one-shot",
            out / "one-shot" / "train",
            P + C,
            lr=args.continue_lr,
            updates=args.prune_updates + args.continue_updates,
            load=ckpt / "one-shot-cut",
            **common,
        )
        return [out / "one-shot" / "train"], ckpt / "one-shot", after_cut

    def scratch_arm() -> tuple[list[Path], Path, dict | None]:
        stages.train(
            "scratch-train",
            manifest,
            ckpt / "scratch",
            out / "scratch" / "train",
            P + C,
            lr=args.continue_lr,
            updates=args.prune_updates + args.continue_updates,
            model=target_cfg.to_dict(),
            **common,
        )
        return [out / "scratch" / "train"], ckpt / "scratch", None

    runs = {
        "sheared": lambda: pruned_arm("sheared", "paper"),
        "static": lambda: pruned_arm("static", "constant"),
        "one-shot": one_shot_arm,
        "scratch": scratch_arm,
        "distill": lambda: pruned_arm("distill", "paper", "sheared", ckpt / "source"),
    }
    results = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out",)},
            "tokens_per_arm": (P + C) * B * s,
            "target": target_cfg.to_dict(),
            "target_parameters": target_cfg.num_parameters(),
            "source_parameters": source_cfg.num_parameters(),
            "source_hf": str(hf_src),
        },
        "reference": reference,
        "reference_valid": reference_valid,
        "arms": {},
    }
    for arm in arms:
        t = time.time()
        run_dirs, final, after_cut = runs[arm]()
        losses = test_loss(f"{arm}-test", final)
        results["arms"][arm] = {
            "test": losses,
            "mean": statistics.fmean(losses.values()),
            **excess_stats(losses, reference),
            "after_cut": after_cut,
            "after_cut_mean": statistics.fmean(after_cut.values()) if after_cut else None,
            "seconds": time.time() - t,
            "curve": loss_curve(run_dirs, B * s),
        }
        print(
            f"[experiment] {arm:<9} mean test loss {results['arms'][arm]['mean']:.3f} "
            f"(source {statistics.fmean(reference.values()):.3f}) in "
            f"{results['arms'][arm]['seconds']:.0f} s",
            flush=True,
        )
    results["seconds"] = time.time() - t_start
    write_plots(results, out / "plots")
    for name, text in (
        ("results.json", json.dumps(results, indent=1)),
        ("results.md", markdown(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print()
    print(markdown(results))
    ranked = sorted(results["arms"], key=lambda a: results["arms"][a]["mean"])
    print("ranking by mean test loss: " + " < ".join(ranked))
    print(f"total {results['seconds']:.0f} s; {out / 'results.md'}, {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
