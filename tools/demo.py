#!/usr/bin/env python3
"""``make demo``: shear the real pretrained SmolLM2-135M end to end on CPU into a small model
that is worth having, and show how good it is.

Stages (each a real command, each timed; its progress line names it once):

1. convert     ``tools/fetch_smollm2.py``'s cached HF directory of SmolLM2-135M-Instruct
               (30 layers x 576, 9 heads in 3 KV groups, FFN 1536, vocab 49152, tied
               embeddings) -> a megatron-core checkpoint;
2. preprocess  the six-domain corpus with the model's own tokenizer (run beside 1);
3. source      ``megashear evaluate --data.write_reference=true``: the source's per-domain
               losses become the reference losses of dynamic batch loading;
4. importance  ``megashear importance``: Minitron activation importance of every head, FFN
               unit, hidden channel and layer on training windows;
5. cut         ``megashear one-shot --method=importance`` to the target (``--target``; GQA-aware)
               or, with ``--prune-steps N``, ``megashear prune`` from the importance-initialised
               masks (``pruning.init=importance``, pinned massive-activation channels) for N
               steps at PP2, then ``megashear finalize``;
6. continue    ``megashear train`` from the cut model with dynamic batch loading, distilled from
               the source (``--kd-alpha``; 0 is the LM loss alone);
7. export      ``tools/convert_checkpoint.py megatron-to-hf`` with the tokenizer (plots of
               every run meanwhile);
8. downstream  lm-eval on a 4-way continuation task built from held-out corpus text (documents
               past everything the runs read, ``megashear.evaluation``): the source and the
               sheared model, and a greedy sample of each with transformers alone.

The summary: per-domain validation loss after each stage, parameters, the recipe, the
downstream scores, the samples and the stage times. The options let a test run it at micro
scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shear_stages import ShearStages, load_fetcher, manifest_with_weights  # noqa: E402
from stage_runner import StageRunner, last_json  # noqa: E402
from target_sizes import TARGETS  # noqa: E402

from megashear.paths import corpus_dir  # noqa: E402

PROMPT = "The history of the Roman Empire"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--corpus", default=str(corpus_dir()), help="default: $MEGASHEAR_CORPUS or ../shared/corpus"
    )
    p.add_argument("--cache-dir", default=None, help="model cache (default: fetch_smollm2's)")
    p.add_argument(
        "--target",
        default="92m",
        choices=sorted(TARGETS),
        help="the target shape (92m: the smallest that kept half of the source's downstream "
        "accuracy above chance in tools/target_sizes.py)",
    )
    p.add_argument("--bytes-per-domain", type=int, default=500_000, help="text read per domain")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=16, help="validation windows per domain")
    p.add_argument("--importance-samples", type=int, default=64, help="calibration windows")
    p.add_argument(
        "--prune-steps", type=int, default=0, help="learned-mask steps (0: the importance cut)"
    )
    p.add_argument("--prune-batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--prune-micro-batch", type=int, default=2)
    p.add_argument("--prune-lr", type=float, default=1e-4, help="model weights while pruning")
    p.add_argument("--prune-updates", type=int, default=2, help="domain-weight updates")
    p.add_argument("--pin-hidden", type=float, default=5.0, help="pruning.pin_hidden")
    p.add_argument("--mask-lr", type=float, default=0.1, help="log alpha and lambda LR")
    p.add_argument("--continue-steps", type=int, default=40)
    p.add_argument("--continue-batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--continue-micro-batch", type=int, default=4)
    p.add_argument("--continue-lr", type=float, default=3e-4)
    p.add_argument("--continue-updates", type=int, default=2, help="domain-weight updates")
    p.add_argument("--continue-tp", type=int, default=1, choices=(1, 2))
    p.add_argument("--kd-alpha", type=float, default=1.0, help="KD weight (0: the LM loss alone)")
    p.add_argument("--no-downstream", action="store_true", help="skip the lm-eval scores")
    p.add_argument("--downstream-limit", type=int, default=None, help="score the first N items")
    p.add_argument("--task-items", type=int, default=20, help="held-out items per domain")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens generated by transformers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = TARGETS[args.target]["num_query_groups"]
    if args.continue_tp > 1 and (args.kd_alpha > 0 or groups % args.continue_tp):
        # the teacher runs at the student's layout: SmolLM2's 3 KV groups do not split over TP2
        print(f"error: --continue-tp {args.continue_tp} needs --kd-alpha 0 and a target whose "
              f"KV groups it divides (SmolLM2 has 3; --target {args.target} has {groups})",
              file=sys.stderr)  # fmt: skip
        return 2
    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = StageRunner(out, threads=2)
    stages = ShearStages(demo, args.seq_length, args.eval_sequences, out / "index_cache")
    py = sys.executable
    ckpt = out / "ckpt"
    target = TARGETS[args.target]

    # 1-2. the model (cached by fetch_smollm2), converted while the corpus is tokenised
    t = time.time()
    hf_src = load_fetcher().ensure_smollm2(args.cache_dir)
    demo.times["fetch"] = time.time() - t
    converted, manifest = stages.prepare(
        hf_src, Path(args.corpus), ckpt / "source", out / "data", args.bytes_per_domain
    )

    # 3. the source's per-domain losses, written into the manifest as the reference
    losses = {"source": stages.evaluate("source", ckpt / "source", manifest, write_reference=True)}

    # 4. activation importance of the source, written beside it
    stages.importance("importance", ckpt / "source", manifest, args.importance_samples)

    # 5. the cut: by importance alone, or learned masks that start from it
    start = manifest
    if args.prune_steps > 0:
        stages.prune(
            "prune",
            ckpt / "source",
            manifest,
            target,
            ckpt / "prune",
            out / "prune",
            args.prune_steps,
            args.prune_batch,
            args.prune_micro_batch,
            args.prune_lr,
            args.prune_updates,
            lr_masks=args.mask_lr,
            extra=("--pruning.init=importance", f"--pruning.pin_hidden={args.pin_hidden}"),
        )
        losses["pruned (masked)"] = stages.evaluate("prune-eval", ckpt / "prune", manifest)
        final = stages.finalize("finalize", ckpt / "prune", ckpt / "cut")
        start = manifest_with_weights(
            manifest, out / "prune", manifest.with_name("manifest_continue.yaml")
        )
    else:
        final = stages.one_shot("cut", ckpt / "source", target, ckpt / "cut", method="importance")
    losses["cut"] = stages.evaluate("cut-eval", ckpt / "cut", manifest)

    # 6. continued pre-training from the cut, distilled from the source
    teacher = ckpt / "source" if args.kd_alpha > 0 else None
    stages.train(
        "continue",
        start,
        ckpt / "continue",
        out / "continue",
        args.continue_steps,
        args.continue_batch,
        args.continue_micro_batch,
        args.continue_lr,
        args.continue_updates,
        tp=args.continue_tp,
        load=ckpt / "cut",
        teacher=teacher,
        kd_alpha=args.kd_alpha,
    )
    losses["sheared"] = stages.evaluate("continue-eval", ckpt / "continue", start)

    # 7. export to Hugging Face with the tokenizer (plots meanwhile: they only read event logs)
    hf_dir = out / "hf"
    runs = [r for r in ("prune", "continue") if (out / r / "events.jsonl").is_file()]
    with ThreadPoolExecutor(1) as pool:
        plots = pool.submit(
            lambda: [demo.run(f"plots-{r}", [py, "tools/plot_run.py", str(out / r)]) for r in runs]
        )
        stages.export("export", ckpt / "continue", hf_dir, hf_src)
        plots.result()

    # 8. downstream: lm-eval on held-out text, and greedy samples with transformers alone
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
    generated = last_json(
        demo.run("generate", [py, "-c", GENERATE, str(args.new_tokens), str(hf_dir), str(hf_src)])
    )
    wall = time.time() - t_start

    from megashear.model_config import ModelConfig
    from megashear.training.run_log import read_events

    cont_updates = read_events(str(out / "continue"), "domain_update")
    final_weights = cont_updates[-1]["weights"] if cont_updates else {}
    src_params = ModelConfig.from_dict(converted["model"]).num_parameters()
    shape = (
        f"{target['num_layers']} layers x {target['hidden_size']}, "
        f"{target['num_attention_heads']} heads in {target['num_query_groups']} KV groups, "
        f"FFN {target['ffn_hidden_size']}"
    )
    print("\n================ megashear demo: shear SmolLM2-135M ================")
    print(
        f"parameters (tie counted once): source {src_params:,} -> sheared "
        f"{final['parameters']:,} ({shape}); HF export {generated['parameters']:,}"
    )
    cut = (
        f"{args.prune_steps} steps of learned masks from importance (pin_hidden "
        f"{args.pin_hidden:g}), finalised"
        if args.prune_steps > 0
        else "the importance cut (Minitron, no training)"
    )
    kd = f"KD from the source (alpha {args.kd_alpha:g})" if args.kd_alpha > 0 else "the LM loss"
    tokens = args.continue_steps * args.continue_batch * args.seq_length
    print(
        f"recipe: importance on {args.importance_samples} x {args.seq_length} tokens; {cut}; "
        f"{args.continue_steps} steps ({tokens:,} tokens) of continued pre-training with {kd} "
        f"and dynamic batch loading"
    )
    if args.prune_steps > 0:
        last_prune = read_events(str(out / "prune"), "prune")[-1]
        sparsity = ", ".join(
            f"{k} {last_prune[f'expected_sparsity/{k}']:.2f}/"
            f"{last_prune[f'target_sparsity/{k}']:.2f}"
            for k in ("layer", "hidden", "head", "intermediate")
            if f"expected_sparsity/{k}" in last_prune
        )
        print(f"expected / target sparsity after {last_prune['step']} pruning steps: {sparsity}")
    names = list(losses["source"])
    print(
        f"\nper-domain validation loss ({args.eval_sequences} x {args.seq_length} tokens per domain)"
    )
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
    print("\nfinal domain weights: " + ", ".join(f"{k} {v:.3f}" for k, v in final_weights.items()))
    print(
        "\nstage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in demo.times.items())
        + f"; total {wall:.0f} (wall; convert || preprocess and plots || export overlap)"
    )
    print(f"\ntransformers, greedy, {args.new_tokens} new tokens:")
    print(f"  source:  {generated['source']!r}")
    print(f"  sheared: {generated['sheared']!r}")
    print(f"plots: {out}/*/plots/*.png")
    return 0


# transformers alone: greedy samples from the export and the source, and the export's size
GENERATE = f"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
new_tokens, sheared, source = int(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {{}}
for name, path in (("sheared", sheared), ("source", source)):
    model = LlamaForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok({PROMPT!r}, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    out[name] = tok.decode(gen[0], skip_special_tokens=True)
    if name == "sheared":
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
print(json.dumps(out))
"""


if __name__ == "__main__":
    sys.exit(main())
