#!/usr/bin/env python3
"""The Sheared-LLaMA comparison at CPU scale, with honest baselines: several ways to get the same
small model from SmolLM2-135M, at equal training tokens, from the same data, over several seeds,
scored on held-out test windows and on a held-out downstream task with lm-eval.

    python tools/shear_experiment.py --out runs/experiment          # every arm, seeds 1 and 2
    python tools/shear_experiment.py --out runs/experiment --arms importance-oneshot --seeds 3

Arms (every one ends at the target shape, default 16 layers x 384, 6 heads in 2 KV groups,
FFN 1024), each for ``P + C`` steps of training tokens:

- ``sheared-paper``: learned masks from the paper's N(5, 0.01) (Lagrangian, dynamic batch
  loading) for ``P`` steps, finalisation, ``C`` steps of continued pre-training with dynamic
  batch loading from the final pruning weights (the paper's method);
- ``sheared-importance``: the same with the masks initialised from activation importance
  (``pruning.init=importance``, ``pruning.pin_hidden`` at ``--pin-hidden``, log α and λ at
  ``--importance-mask-lr``, 0.1: the masks start at the target and are refined);
- ``importance-oneshot``: the Minitron importance cut (``megashear one-shot``), then ``P + C``
  steps of continued pre-training with dynamic batch loading;
- ``leading-oneshot``: the leading units cut (a floor that uses no information), likewise;
- ``scratch``: the target shape from random weights, ``P + C`` steps;
- ``importance-oneshot-kd``, ``sheared-importance-kd``: the KD variants, the continued
  pre-training distilled from the source (``distill.alpha``, default 1: KD alone, Minitron);
- not run by default: ``static``, ``sheared-paper`` with the initial domain weights kept;
  ``sheared-importance-nopin``, ``sheared-importance`` without pinned channels (what pinning
  does to the pruning loss).

A seed sets the data order, the mask noise and (scratch) the initial weights. The KD variant of
a pruned arm continues the same pruning run (pruned once per seed). Dynamic batch loading reads
the validation split (reference: the source's validation losses); the results are measured on
the test split, which no arm reads while training or adapting, and on a 4-way continuation task
built from documents past the text any run reads (``megashear.evaluation``). Nothing is tuned
on either.

**Resumable by arm and seed.** Shared work (conversion, tokenisation, the source's losses and
downstream score, importance scores, one-shot cuts) is done once and reused. Each finished
``(arm, seed)`` is cached in ``OUT/results/ARM/seedN.json`` and skipped when the tool runs again;
an interrupted one starts over. Its checkpoints are removed when it is done
(``--keep-checkpoints`` keeps them). ``OUT/results.json``, ``OUT/results.md`` (mean and spread
over seeds) and the plots cover every cached result of the arms asked for.
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
    cached,
    load_fetcher,
    manifest_with_weights,
    write_json_atomic,
    write_text_atomic,
)
from stage_runner import StageRunner  # noqa: E402

from megashear.cli import report_error  # noqa: E402
from megashear.paths import corpus_dir  # noqa: E402
from megashear.pruning.targets import TARGET_FIELDS  # noqa: E402

# arm -> how it is made: kind (prune / oneshot / scratch), mask init or cut method, KD, rule
ARMS: dict[str, dict] = {
    "sheared-paper": {"kind": "prune", "init": "paper"},
    "sheared-importance": {"kind": "prune", "init": "importance"},
    "importance-oneshot": {"kind": "oneshot", "method": "importance"},
    "leading-oneshot": {"kind": "oneshot", "method": "leading"},
    "scratch": {"kind": "scratch"},
    "importance-oneshot-kd": {"kind": "oneshot", "method": "importance", "kd": True},
    "sheared-importance-kd": {"kind": "prune", "init": "importance", "kd": True},
    "static": {"kind": "prune", "init": "paper", "rule": "constant"},
    "sheared-importance-nopin": {"kind": "prune", "init": "importance", "pin": 0.0},
}
DEFAULT_ARMS = tuple(a for a in ARMS if a not in ("static", "sheared-importance-nopin"))
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
        "--arms", default=",".join(DEFAULT_ARMS), help="comma-separated: " + ",".join(ARMS)
    )
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds, each arm once per seed")
    for name, default in zip(TARGET_FIELDS, DEFAULT_TARGET):
        p.add_argument(f"--target-{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--bytes-per-domain", type=int, default=2_000_000, help="text read per domain")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--test-sequences", type=int, default=32, help="test windows per domain")
    p.add_argument("--eval-sequences", type=int, default=16, help="validation windows per domain")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), every stage")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--prune-steps", type=int, default=30, help="P")
    p.add_argument("--prune-lr", type=float, default=1e-4)
    p.add_argument("--prune-updates", type=int, default=2, help="domain-weight updates in P")
    p.add_argument("--continue-steps", type=int, default=120, help="C")
    p.add_argument("--continue-lr", type=float, default=1e-3)
    p.add_argument("--continue-updates", type=int, default=4, help="domain-weight updates in C")
    p.add_argument("--prune-pp", type=int, default=2, choices=(1, 2))
    p.add_argument("--kd-alpha", type=float, default=1.0, help="KD arms: KD weight vs LM")
    p.add_argument("--importance-samples", type=int, default=64, help="calibration windows")
    p.add_argument(
        "--pin-hidden",
        type=float,
        default=5.0,
        help="importance-initialised arms: pruning.pin_hidden (SmolLM2: 6 channels at 5)",
    )
    p.add_argument(
        "--importance-mask-lr",
        type=float,
        default=0.1,
        help="importance-initialised arms: log alpha and lambda LR (paper init: 1.0)",
    )
    p.add_argument(
        "--downstream-task",
        default=None,
        help="an lm-eval task directory (tools/downstream_eval.py build); default: built in OUT",
    )
    p.add_argument("--no-downstream", action="store_true", help="skip the lm-eval scores")
    p.add_argument("--downstream-limit", type=int, default=None, help="score the first N items")
    p.add_argument("--task-items", type=int, default=20, help="held-out items per domain")
    p.add_argument("--keep-checkpoints", action="store_true")
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


def loss_jumps(run_dir: Path, kind: str = "prune") -> dict:
    """The largest step-to-step rise of a run's training loss and how many steps rose by more
    than 1 nat (the massive-activation symptom, docs/method.md §8)."""
    from megashear.training.run_log import read_events

    losses = [e.get("lm_loss", e["loss"]) for e in read_events(str(run_dir), kind)]
    rises = [b - a for a, b in zip(losses, losses[1:])]
    return {
        "largest_jump": max(rises, default=0.0),
        "jumps_over_1_nat": sum(r > 1.0 for r in rises),
        "steps": len(losses),
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation and range of ``values`` (one per seed)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def aggregate(per_seed: dict[int, dict]) -> dict:
    """One arm over its seeds: test loss, excess, after-cut loss, downstream acc, time."""
    runs = list(per_seed.values())
    out = {
        "seeds": sorted(per_seed),
        "mean": spread([r["mean"] for r in runs]),
        "excess_mean": spread([r["excess_mean"] for r in runs]),
        "test": {d: statistics.fmean(r["test"][d] for r in runs) for d in runs[0]["test"]},
        "seconds": spread([r["seconds"] for r in runs]),
    }
    cut = [r["after_cut_mean"] for r in runs if r.get("after_cut_mean") is not None]
    out["after_cut_mean"] = spread(cut) if cut else None
    acc = [r["downstream"]["acc"] for r in runs if r.get("downstream")]
    out["acc"] = spread(acc) if acc else None
    acc_norm = [r["downstream"]["acc_norm"] for r in runs if r.get("downstream")]
    out["acc_norm"] = spread(acc_norm) if acc_norm else None
    jumps = [r["pruning_loss"] for r in runs if r.get("pruning_loss")]
    if jumps:
        out["pruning_loss"] = {
            "largest_jump": max(j["largest_jump"] for j in jumps),
            "jumps_over_1_nat": sum(j["jumps_over_1_nat"] for j in jumps),
            "steps": sum(j["steps"] for j in jumps),
        }
    return out


def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, (arm, seeds) in enumerate(results["runs"].items()):
        color = f"C{i % 10}"
        for j, (_, r) in enumerate(sorted(seeds.items())):
            c = r["curve"]
            k = max(1, len(c["loss"]) // 40)  # moving average over ~1/40 of the run
            smooth = [
                statistics.fmean(c["loss"][max(0, t - k + 1) : t + 1])
                for t in range(len(c["loss"]))
            ]
            label = arm if j == 0 else None
            ax.plot(c["tokens"], smooth, color=color, alpha=0.8, label=label)
            bx.plot(c["valid_tokens"], c["valid_mean"], marker="o", color=color, label=label)
    ax.set(
        ylabel="training LM loss (moving avg)", title="Loss against training tokens (every seed)"
    )
    bx.axhline(
        statistics.fmean(results["reference_valid"].values()), color="black", lw=0.8, label="source"
    )
    bx.set(xlabel="training tokens", ylabel="mean validation loss")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    paths = [out / "loss_vs_tokens.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    domains = list(results["reference"])
    arms = list(results["arms"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        test = results["arms"][arm]["test"]
        ex = [test[d] - results["reference"][d] for d in domains]
        ax.bar([j + i * width for j in range(len(domains))], ex, width, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(ylabel="test loss - source test loss", title="Per-domain loss (mean over seeds)")
    ax.legend(fontsize=7)
    paths.append(out / "excess_by_domain.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _pm(s: dict | None, digits: int = 3) -> str:
    if not s:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def markdown(results: dict) -> str:
    domains = list(results["reference"])
    head = (
        "| arm | seeds | "
        + " | ".join(domains)
        + " | mean test loss | after the cut | lm-eval acc | acc_norm |"
    )
    rows = [head, "|---" * (len(domains) + 6) + "|"]
    ref = results["reference"]
    src = results.get("source_downstream") or {}
    rows.append(
        "| source | | "
        + " | ".join(f"{ref[d]:.3f}" for d in domains)
        + f" | {statistics.fmean(ref.values()):.3f} | | {src.get('acc', float('nan')):.3f} "
        f"| {src.get('acc_norm', float('nan')):.3f} |"
    )
    for arm, r in sorted(results["arms"].items(), key=lambda kv: kv[1]["mean"]["mean"]):
        rows.append(
            f"| {arm} | {','.join(map(str, r['seeds']))} | "
            + " | ".join(f"{r['test'][d]:.3f}" for d in domains)
            + f" | {_pm(r['mean'])} | {_pm(r['after_cut_mean'])} | {_pm(r['acc'])} "
            f"| {_pm(r['acc_norm'])} |"
        )
    s = results["settings"]
    lines = [
        "\n".join(rows),
        "",
        f"Test loss per domain (mean over seeds; {s['test_sequences']} windows x "
        f"{s['seq_length']} tokens per domain, held out from training and from dynamic batch "
        f"loading); mean ± sample std [min, max] over seeds. Every arm trained on "
        f"{s['tokens_per_arm']:,} tokens (P = {s['prune_steps']}, C = {s['continue_steps']} "
        f"steps x {s['batch']} x {s['seq_length']}). Target {s['target_parameters']:,} "
        f"parameters, source {s['source_parameters']:,}. lm-eval: "
        f"{results.get('task', {}).get('items', '?')} items of a 4-way held-out continuation task "
        "(chance 0.25).",
    ]
    jumps = [
        f"{arm}: largest rise {r['pruning_loss']['largest_jump']:.2f} nats, "
        f"{r['pruning_loss']['jumps_over_1_nat']} of {r['pruning_loss']['steps']} steps rose > 1 nat"
        for arm, r in results["arms"].items()
        if r.get("pruning_loss")
    ]
    if jumps:
        lines.append("Pruning loss, step to step (all seeds): " + "; ".join(jumps) + ".")
    lines.append(
        "Seconds per arm and seed: "
        + ", ".join(f"{arm} {r['seconds']['mean']:.0f}" for arm, r in results["arms"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


def fail(message: str) -> int:
    return report_error(ValueError(message))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        return fail(f"--arms {args.arms!r}: unknown {unknown}; choose from {list(ARMS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        return fail(f"--seeds {args.seeds!r} is not a comma-separated list of integers")
    if not seeds:
        return fail("--seeds names no seed")
    if args.batch % args.micro_batch:
        return fail("--batch must be a multiple of --micro-batch")
    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(out, threads=2)
    stages = ShearStages(runner, args.seq_length, args.eval_sequences, out / "index_cache")
    ckpt = out / "ckpt"
    if args.source_hf:
        hf_src = Path(args.source_hf)
        if not (hf_src / "config.json").is_file():
            return fail(f"--source-hf {hf_src} has no config.json")
        eos = args.eos_token
    else:
        hf_src = load_fetcher().ensure_smollm2(args.cache_dir)
        eos = args.eos_token or SMOLLM2_EOS

    # ---- shared work, done once
    manifest = out / "data" / "manifest.yaml"

    def prepare() -> dict:
        test_tokens = 2 * args.test_sequences * (args.seq_length + 1)
        converted, _ = stages.prepare(hf_src, Path(args.corpus), ckpt / "source", out / "data",
                                      args.bytes_per_domain, eos_token=eos,
                                      test_tokens=test_tokens)  # fmt: skip
        return converted

    converted = cached(out / "shared" / "prepare.json", prepare)

    def test_loss(stage: str, load: Path) -> dict[str, float]:
        return stages.evaluate(stage, load, manifest, split="test", sequences=args.test_sequences)

    reference_valid = cached(
        out / "shared" / "source_valid.json",
        lambda: stages.evaluate("source", ckpt / "source", manifest, write_reference=True),
    )
    reference = cached(out / "shared" / "source_test.json",
                       lambda: test_loss("source-test", ckpt / "source"))  # fmt: skip

    from megashear.model_config import ModelConfig
    from megashear.pruning.targets import make_target, validate_target

    source_cfg = ModelConfig.from_dict(converted["model"])
    target_values = {f: getattr(args, f"target_{f}") for f in TARGET_FIELDS}
    try:
        target_cfg = make_target(source_cfg, **target_values)
        validate_target(source_cfg, target_cfg, pp_sizes=(args.prune_pp,))
    except ValueError as exc:
        return fail(str(exc))
    needs_scores = any(
        ARMS[a].get("method") == "importance" or ARMS[a].get("init") == "importance" for a in arms
    )
    if needs_scores:
        cached(out / "shared" / "importance.json", lambda: stages.importance(
            "importance", ckpt / "source", manifest, args.importance_samples))  # fmt: skip

    task_dir = None
    source_downstream = None
    if not args.no_downstream:
        from megashear.evaluation.lm_eval_score import score

        task_dir = Path(args.downstream_task) if args.downstream_task else out / "task"
        if not args.downstream_task and not (out / "task").is_dir():
            from megashear.evaluation.downstream_task import TaskSpec, build_task

            build_task(args.corpus, out / "task", TaskSpec(items_per_domain=args.task_items))

        def downstream(stage: str, hf_dir: Path) -> dict:
            t = time.time()
            result = score(hf_dir, task_dir, limit=args.downstream_limit, threads=2)
            runner.times[stage] = time.time() - t
            print(f"[{out.name}] {stage:<11} acc {result['acc']:.3f} in {time.time() - t:.0f} s")
            return result

        source_downstream = cached(out / "shared" / "source_downstream.json",
                                   lambda: downstream("source-lm-eval", hf_src))  # fmt: skip

    P, C, B, s = args.prune_steps, args.continue_steps, args.batch, args.seq_length
    common = dict(batch=B, micro_batch=args.micro_batch)

    def seed_flags(seed: int) -> tuple[str, ...]:
        return (f"--data.seed={seed}", f"--train.seed={seed}")

    def pruned(init: str, rule: str, seed: int, pin: float) -> dict:
        """Prune and finalise once per (init, rule, pin, seed): the final checkpoint, its test
        loss right after the cut, the manifest continued training starts from, the loss jumps."""
        name = f"prune-{init}-{rule}" + (f"-pin{pin:g}" if pin > 0 else "") + f"-s{seed}"

        def make() -> dict:
            extra = [*seed_flags(seed), f"--pruning.seed={seed}", f"--pruning.init={init}"]
            if pin > 0:
                extra.append(f"--pruning.pin_hidden={pin}")
            lr_masks = args.importance_mask_lr if init == "importance" else 1.0
            run_dir = out / "runs" / name
            stages.prune(name, ckpt / "source", manifest, target_values, ckpt / name, run_dir, P,
                         lr=args.prune_lr, updates=args.prune_updates, rule=rule,
                         pp=args.prune_pp, lr_masks=lr_masks, extra=tuple(extra),
                         **common)  # fmt: skip
            stages.finalize(f"{name}-finalize", ckpt / name, ckpt / f"{name}-final")
            if not args.keep_checkpoints:
                shutil.rmtree(ckpt / name, ignore_errors=True)
            after_cut = test_loss(f"{name}-cut", ckpt / f"{name}-final")
            start = manifest
            if rule != "constant":
                start = manifest_with_weights(manifest, run_dir, run_dir / "manifest.yaml")
            return {
                "final": str(ckpt / f"{name}-final"),
                "after_cut": after_cut,
                "start": str(start),
                "run_dir": str(run_dir),
                "pruning_loss": loss_jumps(run_dir),
            }

        return cached(out / "shared" / f"{name}.json", make)

    def one_shot_cut(method: str) -> dict:
        name = f"cut-{method}"

        def make() -> dict:
            stages.one_shot(name, ckpt / "source", target_values, ckpt / name, method=method)
            return {"final": str(ckpt / name), "after_cut": test_loss(f"{name}-eval", ckpt / name)}

        return cached(out / "shared" / f"{name}.json", make)

    def run_arm(arm: str, seed: int) -> dict:
        spec = ARMS[arm]
        tag = f"{arm}-s{seed}"
        save, run_dir = ckpt / tag, out / "runs" / tag
        shutil.rmtree(save, ignore_errors=True)  # an interrupted try starts over
        shutil.rmtree(run_dir, ignore_errors=True)
        teacher = ckpt / "source" if spec.get("kd") else None
        kd = dict(teacher=teacher, kd_alpha=args.kd_alpha)
        t = time.time()
        result: dict = {"arm": arm, "seed": seed}
        if spec["kind"] == "prune":
            rule = spec.get("rule", "paper")
            pin = spec.get("pin", args.pin_hidden) if spec["init"] == "importance" else 0.0
            p = pruned(spec["init"], rule, seed, pin)
            stages.train(tag, Path(p["start"]), save, run_dir, C, lr=args.continue_lr,
                         updates=args.continue_updates, rule=rule, load=Path(p["final"]),
                         extra=seed_flags(seed), **kd, **common)  # fmt: skip
            run_dirs = [Path(p["run_dir"]), run_dir]
            result.update(after_cut=p["after_cut"], pruning_loss=p["pruning_loss"])
        elif spec["kind"] == "oneshot":
            cut = one_shot_cut(spec["method"])
            stages.train(tag, manifest, save, run_dir, P + C, lr=args.continue_lr,
                         updates=args.prune_updates + args.continue_updates,
                         load=Path(cut["final"]), extra=seed_flags(seed), **kd,
                         **common)  # fmt: skip
            run_dirs = [run_dir]
            result["after_cut"] = cut["after_cut"]
        else:
            stages.train(tag, manifest, save, run_dir, P + C, lr=args.continue_lr,
                         updates=args.prune_updates + args.continue_updates,
                         model=target_cfg.to_dict(), extra=seed_flags(seed), **common)  # fmt: skip
            run_dirs = [run_dir]
            result["after_cut"] = None
        losses = test_loss(f"{tag}-test", save)
        result.update(
            test=losses,
            mean=statistics.fmean(losses.values()),
            **excess_stats(losses, reference),
            after_cut_mean=(
                statistics.fmean(result["after_cut"].values()) if result["after_cut"] else None
            ),
            curve=loss_curve(run_dirs, B * s),
        )
        if task_dir is not None:
            hf_dir = out / "hf" / tag
            stages.export(f"{tag}-export", save, hf_dir, hf_src)
            result["downstream"] = downstream(f"{tag}-lm-eval", hf_dir)
            if not args.keep_checkpoints:
                shutil.rmtree(hf_dir, ignore_errors=True)
        if not args.keep_checkpoints:
            shutil.rmtree(save, ignore_errors=True)
        result["seconds"] = time.time() - t
        return result

    runs: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            path = out / "results" / arm / f"seed{seed}.json"
            if path.is_file():
                print(f"[experiment] {arm} seed {seed}: cached ({path})", flush=True)
            else:
                write_json_atomic(path, run_arm(arm, seed))
            r = json.loads(path.read_text())
            runs.setdefault(arm, {})[seed] = r
            acc = r.get("downstream", {}).get("acc")
            print(f"[experiment] {arm} seed {seed}: mean test loss {r['mean']:.3f}"
                  + (f", lm-eval acc {acc:.3f}" if acc is not None else "")
                  + f" ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
        # every cached seed of the arm counts, not only the ones asked for this time
        for path in sorted((out / "results" / arm).glob("seed*.json")):
            seed = int(path.stem[len("seed") :])
            runs[arm].setdefault(seed, json.loads(path.read_text()))
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
        "source_downstream": source_downstream,
        "task": {"items": source_downstream["items"]} if source_downstream else {},
        "arms": {arm: aggregate(per_seed) for arm, per_seed in runs.items()},
        "runs": runs,
        "seconds": time.time() - t_start,
    }
    write_plots(results, out / "plots")
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", markdown(results))
    print()
    print(markdown(results))
    print(f"total {results['seconds']:.0f} s; {out / 'results.md'}, {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
