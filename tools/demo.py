#!/usr/bin/env python3
"""``make demo``: shear the real pretrained SmolLM2-135M end to end on CPU into a small model
that is worth having, and show how good it is.

The job is the recipe ``examples/smollm2_demo/recipe.yaml`` run by ``megashear shear``
(:mod:`megashear.pipeline`): convert -> preprocess (the six-domain corpus with the model's own
tokenizer) -> reference (the source's per-domain losses) -> importance -> the importance cut
(``--target``), or with ``--prune-steps N`` learned masks from importance at PP2 and finalize
-> continued pre-training distilled from the source (``--kd-alpha``; 0 is the LM loss alone) ->
Hugging Face export; each stage's progress line names it once, and a rerun skips the finished
stages. This script adds what is the demo's alone:

- the model: ``tools/fetch_smollm2.py``'s cached HF directory of SmolLM2-135M-Instruct (30
  layers x 576, 9 heads in 3 KV groups, FFN 1536, vocab 49152, tied embeddings);
- plots of the runs;
- downstream: lm-eval on a 4-way continuation task built from held-out corpus text (documents
  past everything the runs read, ``megashear.evaluation``) for the source and the sheared
  model; greedy text from each with transformers alone: a sample, and how much the
  continuations of held-out passages loop (seq-rep-4, ``megashear.evaluation.greedy_text``);
- the summary: per-domain validation loss after each stage, parameters, the recipe, the
  downstream scores, the samples and the stage times.

Options left unset keep the recipe's values; they let a test run the demo at micro scale.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shear_stages import corpus_files, load_fetcher  # noqa: E402
from stage_runner import ROOT, StageRunner  # noqa: E402
from target_sizes import TARGETS  # noqa: E402

from megashear.atomic_file import write_json_atomic  # noqa: E402
from megashear.cli import report_error  # noqa: E402
from megashear.paths import corpus_dir  # noqa: E402

RECIPE = ROOT / "examples" / "smollm2_demo" / "recipe.yaml"

# demo option -> the recipe field it sets (None: keep the recipe's)
FIELDS = {
    "bytes_per_domain": "data.max_bytes_per_domain",
    "seq_length": "data.seq_length",
    "eval_sequences": "data.eval_sequences",
    "importance_samples": "pruning.importance_samples",
    "prune_batch": "pruning.batch",
    "prune_micro_batch": "pruning.micro_batch",
    "prune_lr": "pruning.lr",
    "prune_updates": "pruning.domain_updates",
    "pin_hidden": "pruning.pin_hidden",
    "mask_lr": "pruning.mask_lr",
    "continue_steps": "continuation.steps",
    "continue_batch": "continuation.batch",
    "continue_micro_batch": "continuation.micro_batch",
    "continue_lr": "continuation.lr",
    "continue_updates": "continuation.domain_updates",
    "kd_alpha": "distill.alpha",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--recipe", default=str(RECIPE), help="default: %(default)s")
    p.add_argument(
        "--corpus", default=str(corpus_dir()), help="default: $MEGASHEAR_CORPUS or ../shared/corpus"
    )
    p.add_argument("--cache-dir", default=None, help="model cache (default: fetch_smollm2's)")
    p.add_argument(
        "--target",
        default=None,
        choices=sorted(TARGETS),
        help="the target shape (default: the recipe's, 92m: the smallest that kept half of the "
        "source's downstream accuracy above chance in tools/target_sizes.py)",
    )
    recipe = "default: the recipe's"
    p.add_argument("--bytes-per-domain", type=int, help=f"text read per domain ({recipe})")
    p.add_argument("--seq-length", type=int, help=recipe)
    p.add_argument("--eval-sequences", type=int, help=f"validation windows per domain ({recipe})")
    p.add_argument("--importance-samples", type=int, help=f"calibration windows ({recipe})")
    p.add_argument(
        "--prune-steps", type=int, default=0, help="learned-mask steps (0: the importance cut)"
    )
    p.add_argument("--prune-batch", type=int, help=f"global batch, sequences ({recipe})")
    p.add_argument("--prune-micro-batch", type=int, help=recipe)
    p.add_argument("--prune-lr", type=float, help=f"model weights while pruning ({recipe})")
    p.add_argument("--prune-updates", type=int, help=f"domain-weight updates ({recipe})")
    p.add_argument("--pin-hidden", type=float, help=f"pruning.pin_hidden ({recipe})")
    p.add_argument("--mask-lr", type=float, help=f"log alpha and lambda LR ({recipe})")
    p.add_argument("--continue-steps", type=int, help=recipe)
    p.add_argument("--continue-batch", type=int, help=f"global batch, sequences ({recipe})")
    p.add_argument("--continue-micro-batch", type=int, help=recipe)
    p.add_argument("--continue-lr", type=float, help=recipe)
    p.add_argument("--continue-updates", type=int, help=f"domain-weight updates ({recipe})")
    p.add_argument("--continue-tp", type=int, default=1, choices=(1, 2))
    p.add_argument("--kd-alpha", type=float, help=f"KD weight, 0: the LM loss alone ({recipe})")
    p.add_argument("--no-downstream", action="store_true", help="skip the lm-eval scores")
    p.add_argument("--downstream-limit", type=int, default=None, help="score the first N items")
    p.add_argument("--task-items", type=int, default=20, help="held-out items per domain")
    p.add_argument("--new-tokens", type=int, default=20, help="new tokens of the shown sample")
    p.add_argument(
        "--greedy-prompts", type=int, default=2, help="held-out passages per domain for seq-rep-4"
    )
    p.add_argument("--greedy-tokens", type=int, default=48, help="greedy tokens per passage")
    return p.parse_args(argv)


def shear_command(args: argparse.Namespace, hf_src: Path, out: Path) -> list[str]:
    """``megashear shear RECIPE`` with the demo's options as recipe flags."""
    cmd = [sys.executable, "-m", "megashear.cli", "shear", args.recipe]
    cmd += [f"--source={hf_src}", f"--output={out}"]
    cmd.append("--data.inputs=[" + ", ".join(corpus_files(Path(args.corpus))) + "]")
    if args.target:
        cmd += [f"--target.{k}={v}" for k, v in TARGETS[args.target].items()]
    if args.prune_steps > 0:
        cmd += ["--pruning.method=prune", f"--pruning.steps={args.prune_steps}"]
    if args.continue_tp > 1:
        cmd.append(f"--continuation.layout={{tp: {args.continue_tp}}}")
    for option, key in FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            cmd.append(f"--{key}={value}")
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megashear import config_io
    from megashear.evaluation.greedy_text import check_options

    try:
        check_options(args.greedy_prompts, args.greedy_tokens)
    except ValueError as exc:
        return report_error(exc)
    from megashear.pipeline.recipe import Recipe

    recipe = config_io.from_dict(Recipe, config_io.load_yaml(args.recipe))
    kd_alpha = recipe.distill.alpha if args.kd_alpha is None else args.kd_alpha
    target = TARGETS[args.target] if args.target else recipe.target_fields()
    groups = target["num_query_groups"]
    if args.continue_tp > 1 and (kd_alpha > 0 or groups % args.continue_tp):
        # the teacher runs at the student's layout: SmolLM2's 3 KV groups do not split over TP2
        return report_error(ValueError(
            f"--continue-tp {args.continue_tp} needs --kd-alpha 0 and a target whose KV groups "
            f"it divides (SmolLM2 has 3; the target has {groups})"))  # fmt: skip
    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = StageRunner(out, threads=2)
    py = sys.executable

    # the model (cached by fetch_smollm2), then the whole job from the recipe
    t = time.time()
    hf_src = load_fetcher().ensure_smollm2(args.cache_dir)
    fetch_s = time.time() - t
    cmd = shear_command(args, hf_src, out)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        return code
    from megashear.pipeline.shear import read_job

    job = read_job(out)

    # plots of the runs (they only read event logs)
    runs = [r for r in ("prune", "continue") if (out / "runs" / r / "events.jsonl").is_file()]
    for r in runs:
        demo.run(f"plots-{r}", [py, "tools/plot_run.py", str(out / "runs" / r)])

    # downstream: lm-eval on held-out text, and greedy samples with transformers alone
    hf_dir = Path(job.hf)
    downstream = {}
    if not args.no_downstream:
        from megashear.evaluation.downstream_task import TaskSpec, build_task
        from megashear.evaluation.lm_eval_score import score

        task = out / "task"
        t = time.time()
        if not task.is_dir():
            build_task(args.corpus, task, TaskSpec(items_per_domain=args.task_items))
        for name, path in (("source", hf_src), ("sheared", hf_dir)):
            downstream[name] = score(path, task, threads=2, limit=args.downstream_limit)
        demo.times["downstream"] = time.time() - t
        print(f"[{out.name}] downstream  done in {time.time() - t:6.1f} s", flush=True)
    from megashear.evaluation.greedy_text import report as greedy_report

    t = time.time()
    heldout = None if args.no_downstream else out / "task"
    options = dict(per_domain=args.greedy_prompts, new_tokens=args.greedy_tokens,
                   sample_tokens=args.new_tokens, threads=2)  # fmt: skip
    generated = {
        name: greedy_report(path, heldout, **options)
        for name, path in (("source", hf_src), ("sheared", hf_dir))
    }
    write_json_atomic(out / "greedy.json", generated)
    demo.times["generate"] = time.time() - t
    print(f"[{out.name}] generate    done in {time.time() - t:6.1f} s", flush=True)
    wall = time.time() - t_start
    print_summary(args, out, job, recipe, target, kd_alpha, downstream, generated)
    times = {"fetch": fetch_s, **job.seconds, **demo.times}
    print(
        "\nstage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; total {wall:.0f} (wall; convert || preprocess overlap)"
    )
    print(f"\ntransformers, greedy, {args.new_tokens} new tokens:")
    print(f"  source:  {generated['source']['sample']!r}")
    print(f"  sheared: {generated['sheared']['sample']!r}")
    if "seq_rep_4" in generated["sheared"]:
        src, shr = generated["source"], generated["sheared"]
        print(
            f"greedy text on {len(shr['continuations'])} held-out passages, {shr['new_tokens']} "
            f"new tokens each: repeated 4-grams (seq-rep-4, 0 = no loop) source "
            f"{src['seq_rep_4']:.3f}, sheared {shr['seq_rep_4']:.3f} ({out / 'greedy.json'})"
        )
    print(f"plots: {out}/runs/*/plots/*.png")
    return 0


def print_summary(args, out, job, recipe, target, kd_alpha, downstream, generated) -> None:
    """Parameters, the recipe, per-domain losses, downstream scores and final weights."""
    from megashear.training.run_log import read_events

    seq = args.seq_length or recipe.data.seq_length
    samples = args.importance_samples or recipe.pruning.importance_samples
    steps = args.continue_steps or recipe.continuation.steps
    batch = args.continue_batch or recipe.continuation.batch
    pin = recipe.pruning.pin_hidden if args.pin_hidden is None else args.pin_hidden
    shape = (
        f"{target['num_layers']} layers x {target['hidden_size']}, "
        f"{target['num_attention_heads']} heads in {target['num_query_groups']} KV groups, "
        f"FFN {target['ffn_hidden_size']}"
    )
    print("\n================ megashear demo: shear SmolLM2-135M ================")
    print(
        f"parameters (tie counted once): source {job.source_parameters:,} -> sheared "
        f"{job.parameters:,} ({shape}); HF export {generated['sheared']['parameters']:,}"
    )
    cut = (
        f"{args.prune_steps} steps of learned masks from importance (pin_hidden {pin:g}), finalised"
        if args.prune_steps > 0
        else "the importance cut (Minitron, no training)"
    )
    kd = f"KD from the source (alpha {kd_alpha:g})" if kd_alpha > 0 else "the LM loss"
    print(
        f"recipe: importance on {samples} x {seq} tokens; {cut}; {steps} steps "
        f"({steps * batch * seq:,} tokens) of continued pre-training with {kd} and dynamic "
        "batch loading"
    )
    if args.prune_steps > 0:
        last_prune = read_events(str(out / "runs" / "prune"), "prune")[-1]
        sparsity = ", ".join(
            f"{k} {last_prune[f'expected_sparsity/{k}']:.2f}/"
            f"{last_prune[f'target_sparsity/{k}']:.2f}"
            for k in ("layer", "hidden", "head", "intermediate")
            if f"expected_sparsity/{k}" in last_prune
        )
        print(f"expected / target sparsity after {last_prune['step']} pruning steps: {sparsity}")
    rows = {"reference": "source", "prune": "pruned (masked)", "finalize": "cut", "cut": "cut",
            "continue": "sheared"}  # fmt: skip
    losses = {rows[stage]: row for stage, row in job.losses.items()}
    names = list(losses["source"])
    eval_sequences = args.eval_sequences or recipe.data.eval_sequences
    print(f"\nper-domain validation loss ({eval_sequences} x {seq} tokens per domain)")
    print(f"{'stage':<16}" + "".join(f"{n:>14}" for n in names) + f"{'mean':>9}")
    for stage, row in losses.items():
        mean = sum(row.values()) / len(row)
        print(f"{stage:<16}" + "".join(f"{row[n]:>14.3f}" for n in names) + f"{mean:>9.3f}")
    if downstream:
        d = downstream
        kept = (d["sheared"]["acc"] - 0.25) / max(1e-9, d["source"]["acc"] - 0.25)
        print(
            f"\ndownstream (lm-eval, {d['source']['items']} held-out 4-way continuations, chance "
            f"0.25): source acc {d['source']['acc']:.3f} ± {d['source']['acc_stderr']:.3f}, "
            f"sheared acc {d['sheared']['acc']:.3f} ± {d['sheared']['acc_stderr']:.3f} "
            f"({kept:.0%} of the source's accuracy above chance); acc_norm "
            f"{d['source']['acc_norm']:.3f} and {d['sheared']['acc_norm']:.3f}"
        )
    cont = out / "runs" / "continue"
    updates = read_events(str(cont), "domain_update") if cont.is_dir() else []
    weights = updates[-1]["weights"] if updates else {}
    print("\nfinal domain weights: " + ", ".join(f"{k} {v:.3f}" for k, v in weights.items()))


if __name__ == "__main__":
    sys.exit(main())
