#!/usr/bin/env python3
"""How small can the demo's sheared model be and still be worth having? The same recipe at
several target sizes, at the same budget, scored on held-out test windows and downstream.

    python tools/target_sizes.py --out runs/sizes            # four SmolLM2-135M targets

For each target (default: about 113M, 92M, 71M and 44M parameters, the tie counted once) the
recipe is the demo's: the Minitron importance cut of SmolLM2-135M (``megashear importance`` on
``--importance-samples`` training windows, ``megashear one-shot``), then ``--steps`` steps of
continued pre-training distilled from the source (``--kd-alpha``; 0 is the LM loss alone), with
dynamic batch loading; then the Hugging Face export, scored with lm-eval on the held-out 4-way
continuation task (``megashear.evaluation``), a greedy sample, and how much greedy continuations
of the task's held-out passages loop (seq-rep-4, ``megashear.evaluation.greedy_text``). Each
target's result is cached in ``OUT/results/TARGET.json`` (its greedy text in
``TARGET_greedy.json``) and skipped when the tool runs again. Writes ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shear_stages import SMOLLM2_EOS, ShearStages, cached, load_fetcher, write_text_atomic  # noqa: E402
from stage_runner import StageRunner  # noqa: E402

from megashear.cli import report_error  # noqa: E402
from megashear.paths import corpus_dir  # noqa: E402

# name -> target shape (SmolLM2-135M: 30 layers x 576, 9 heads in 3 groups, FFN 1536)
TARGETS = {
    "113m": dict(num_layers=24, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                 ffn_hidden_size=1536),
    "92m": dict(num_layers=24, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                ffn_hidden_size=1024),
    # the same size by width alone (Minitron found width pruning better than depth after
    # distillation, arXiv 2407.14679): all 30 layers, FFN 704
    "92m-w": dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                  ffn_hidden_size=704),
    "71m": dict(num_layers=24, hidden_size=480, num_attention_heads=6, num_query_groups=2,
                ffn_hidden_size=1024),
    "44m": dict(num_layers=16, hidden_size=384, num_attention_heads=6, num_query_groups=2,
                ffn_hidden_size=1024),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sizes")
    p.add_argument("--corpus", default=str(corpus_dir()))
    p.add_argument("--targets", default=",".join(TARGETS), help=",".join(TARGETS))
    p.add_argument("--bytes-per-domain", type=int, default=500_000)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--test-sequences", type=int, default=32)
    p.add_argument("--importance-samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--kd-alpha", type=float, default=1.0)
    p.add_argument("--task", default=None, help="lm-eval task dir (default: built in OUT/task)")
    p.add_argument("--task-items", type=int, default=20, help="items per domain of a built task")
    p.add_argument("--greedy-prompts", type=int, default=2, help="held-out passages per domain")
    p.add_argument("--greedy-tokens", type=int, default=48, help="greedy tokens per passage")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megashear.evaluation.greedy_text import check_options

    names = [t for t in args.targets.split(",") if t]
    if not names or set(names) - set(TARGETS):
        return report_error(ValueError(f"--targets {args.targets!r}: choose from {list(TARGETS)}"))
    try:
        check_options(args.greedy_prompts, args.greedy_tokens)
    except ValueError as exc:
        return report_error(exc)
    from megashear.evaluation.downstream_task import TaskSpec, build_task
    from megashear.evaluation.greedy_text import report as greedy_report
    from megashear.evaluation.lm_eval_score import score
    from megashear.model_config import ModelConfig
    from megashear.pruning.targets import make_target

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(out, threads=2)
    stages = ShearStages(runner, args.seq_length, args.eval_sequences, out / "index_cache")
    ckpt, hf_src = out / "ckpt", load_fetcher().ensure_smollm2(None)
    manifest = out / "data" / "manifest.yaml"
    test_tokens = 2 * args.test_sequences * (args.seq_length + 1)
    converted = cached(out / "shared" / "prepare.json", lambda: stages.prepare(
        hf_src, Path(args.corpus), ckpt / "source", out / "data", args.bytes_per_domain,
        eos_token=SMOLLM2_EOS, test_tokens=test_tokens)[0])  # fmt: skip

    def test_loss(stage: str, load: Path) -> dict:
        return stages.evaluate(stage, load, manifest, split="test", sequences=args.test_sequences)

    cached(out / "shared" / "source_valid.json",
           lambda: stages.evaluate("source", ckpt / "source", manifest, write_reference=True))  # fmt: skip
    source_test = cached(out / "shared" / "source_test.json",
                         lambda: test_loss("source-test", ckpt / "source"))  # fmt: skip
    cached(out / "shared" / "importance.json", lambda: stages.importance(
        "importance", ckpt / "source", manifest, args.importance_samples))  # fmt: skip
    task = Path(args.task) if args.task else out / "task"
    if not args.task and not task.is_dir():
        build_task(args.corpus, task, TaskSpec(items_per_domain=args.task_items))
    source_down = cached(out / "shared" / "source_downstream.json",
                         lambda: score(hf_src, task, threads=2))  # fmt: skip

    def greedy(name: str, hf: Path) -> dict:
        """The greedy sample and seq-rep-4 on the task's held-out passages (cached apart from
        the training results, so that a finished target gets them without training again)."""
        return cached(out / "results" / f"{name}_greedy.json",
                      lambda: greedy_report(hf, task, per_domain=args.greedy_prompts,
                                            new_tokens=args.greedy_tokens, threads=2))  # fmt: skip

    source_greedy = greedy("source", hf_src)
    source_cfg = ModelConfig.from_dict(converted["model"])
    rows = {}
    for name in names:

        def run(name=name) -> dict:
            t = time.time()
            shape = TARGETS[name]
            cut, final, hf = ckpt / f"cut-{name}", ckpt / f"sheared-{name}", out / "hf" / name
            stages.one_shot(f"cut-{name}", ckpt / "source", shape, cut, method="importance")
            after_cut = test_loss(f"cut-{name}-test", cut)
            teacher = ckpt / "source" if args.kd_alpha > 0 else None
            stages.train(f"continue-{name}", manifest, final, out / "runs" / name, args.steps,
                         args.batch, args.micro_batch, args.lr, args.updates, load=cut,
                         teacher=teacher, kd_alpha=args.kd_alpha)  # fmt: skip
            test = test_loss(f"sheared-{name}-test", final)
            stages.export(f"export-{name}", final, hf, hf_src)
            down = score(hf, task, threads=2)
            return {
                "target": shape,
                "parameters": make_target(source_cfg, **shape).num_parameters(),
                "after_cut": after_cut,
                "after_cut_mean": statistics.fmean(after_cut.values()),
                "test": test,
                "mean": statistics.fmean(test.values()),
                "downstream": down,
                "seconds": time.time() - t,
            }

        rows[name] = cached(out / "results" / f"{name}.json", run)
        r = rows[name]
        r["greedy"] = greedy(name, out / "hf" / name)
        print(f"[sizes] {name}: {r['parameters']:,} params, test {r['mean']:.3f} (cut "
              f"{r['after_cut_mean']:.3f}), acc {r['downstream']['acc']:.3f}", flush=True)  # fmt: skip
    src_acc = source_down["acc"]
    lines = [
        "| target | parameters | test loss after the cut | test loss after KD | lm-eval acc "
        "| acc_norm | kept share of the source's acc above chance | seq-rep-4 | greedy sample |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| source | {source_cfg.num_parameters():,} | | {statistics.fmean(source_test.values()):.3f}"
        f" | {src_acc:.3f} ± {source_down['acc_stderr']:.3f} | {source_down['acc_norm']:.3f} | 1 "
        f"| {source_greedy['seq_rep_4']:.3f} | {source_greedy['sample']!r} |",
    ]
    for name, r in rows.items():
        d = r["downstream"]
        kept = (d["acc"] - 0.25) / (src_acc - 0.25)
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['after_cut_mean']:.3f} | {r['mean']:.3f} | "
            f"{d['acc']:.3f} ± {d['acc_stderr']:.3f} | {d['acc_norm']:.3f} | {kept:.2f} | "
            f"{r['greedy']['seq_rep_4']:.3f} | {r['greedy']['sample']!r} |"
        )
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
