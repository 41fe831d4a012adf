#!/usr/bin/env python3
"""``make demo``: the whole megashear pipeline on CPU, on the six-domain corpus in ../shared/corpus.

Stages (each a real command, each timed):

1. tokenizer   ``tools/train_tokenizer.py``: LLaMA-style sentencepiece BPE on a sample;
2. preprocess  ``tools/preprocess_data.py``: per-domain indexed datasets + validation splits;
3. source      ``megashear train``: a tiny LLaMA trained from scratch, so pruning has something
               to keep; then ``megashear evaluate`` writes its per-domain losses into the
               manifest as the reference losses (the paper's "source reference" mode);
4. prune       ``megashear prune`` under torchrun at TP2 (two processes), with dynamic batch
               loading;
5. finalize    ``megashear finalize``: the dense model of exactly the target shape;
6. continue    ``megashear train`` from the finalised model, dynamic batch loading starting
               from the final pruning weights;
7. export      ``tools/convert_checkpoint.py megatron-to-hf``; transformers loads the export
               and generates a sample;
8. plots       ``tools/plot_run.py`` for every run.

It ends with a summary: parameters before and after, per-domain validation loss after each
stage, the final domain weights and the time of every stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_runner import ROOT, StageRunner, flags, last_json  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"
DOMAINS = ("web", "github", "wikipedia", "books", "arxiv", "stackexchange")

SOURCE = {
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 4,
    "ffn_hidden_size": 352,
    "seq_length": 128,
}
TARGET = {
    "num_layers": 2,
    "hidden_size": 96,
    "num_attention_heads": 2,
    "num_query_groups": 2,
    "ffn_hidden_size": 192,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--bytes-per-domain", type=int, default=600_000)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--source-steps", type=int, default=400)
    parser.add_argument("--prune-steps", type=int, default=160)
    parser.add_argument("--continue-steps", type=int, default=200)
    args = parser.parse_args()
    corpus = Path(args.corpus)
    missing = [d for d in DOMAINS if not (corpus / f"{d}.jsonl.xz").is_file()]
    if missing:
        print(f"error: corpus {corpus} lacks domains {missing}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = StageRunner(out, threads=2)
    py = sys.executable
    data = out / "data"
    files = [str(corpus / f"{d}.jsonl.xz") for d in DOMAINS]

    demo.run(
        "tokenizer",
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            *files,
            "--vocab-size",
            str(args.vocab_size),
            "--sample-bytes-per-domain",
            "300000",
            "--output-prefix",
            str(data / "tokenizer"),
        ],
    )
    demo.run(
        "preprocess",
        [
            py,
            "tools/preprocess_data.py",
            "--input",
            *files,
            "--tokenizer",
            str(data / "tokenizer.model"),
            "--output-dir",
            str(data),
            "--valid-tokens-per-domain",
            "16384",
            "--workers",
            "2",
            "--max-bytes-per-domain",
            str(args.bytes_per_domain),
        ],
    )
    manifest = data / "manifest.yaml"
    common = [
        f"--data.manifest={manifest}",
        "--data.eval_sequences_per_domain=16",
        "--train.micro_batch_size=8",
        "--train.global_batch_size=16",
    ]
    model = flags("model", {**SOURCE, "vocab_size": args.vocab_size})

    # 3. source model, then its per-domain losses as the reference
    demo.megashear(
        "source",
        "train",
        *model,
        *common,
        "--data.update_rule=constant",
        f"--train.train_iters={args.source_steps}",
        "--train.lr=3e-3",
        "--train.min_lr=3e-4",
        "--train.lr_warmup_iters=20",
        f"--logging.dir={out / 'source'}",
        f"--checkpoint.save={out / 'ckpt/source'}",
    )
    losses = {
        "source": last_json(
            demo.megashear(
                "source",
                "evaluate",
                *common,
                f"--checkpoint.load={out / 'ckpt/source'}",
                "--data.write_reference=true",
            )
        )
    }

    # 4. pruning at TP2 with dynamic batch loading
    demo.megashear(
        "prune",
        "prune",
        *common,
        f"--checkpoint.load={out / 'ckpt/source'}",
        *flags("pruning", {f"target_{k}": v for k, v in TARGET.items()}),
        "--parallel.tp=2",
        f"--train.train_iters={args.prune_steps}",
        "--train.lr=1e-3",
        "--train.min_lr=1e-3",
        "--train.lr_warmup_iters=0",
        "--pruning.lagrangian_warmup_steps=40",
        "--pruning.lr_log_alpha=0.5",
        "--pruning.lr_lambda=0.5",
        f"--data.update_interval={max(2, args.prune_steps // 8)}",
        f"--logging.dir={out / 'prune'}",
        f"--checkpoint.save={out / 'ckpt/prune'}",
        nproc=2,
    )
    losses["pruned (masked)"] = last_json(
        demo.megashear("prune", "evaluate", *common, f"--checkpoint.load={out / 'ckpt/prune'}")
    )

    # 5. finalize
    final = last_json(
        demo.megashear(
            "finalize",
            "finalize",
            f"--checkpoint.load={out / 'ckpt/prune'}",
            f"--checkpoint.save={out / 'ckpt/final'}",
        )
    )
    losses["finalized"] = last_json(
        demo.megashear("finalize", "evaluate", *common, f"--checkpoint.load={out / 'ckpt/final'}")
    )

    # 6. continued pre-training from the final pruning weights
    from megashear.data.manifest import load_manifest, save_manifest
    from megashear.training.run_log import read_events

    updates = read_events(str(out / "prune"), "domain_update")
    cont_manifest = load_manifest(str(manifest))
    for d in cont_manifest.domains:
        d.weight = updates[-1]["weights"][d.name] if updates else d.weight
    save_manifest(cont_manifest, str(data / "manifest_continue.yaml"))
    cont_common = [c.replace(str(manifest), str(data / "manifest_continue.yaml")) for c in common]
    demo.megashear(
        "continue",
        "train",
        *cont_common,
        f"--checkpoint.load={out / 'ckpt/final'}",
        f"--train.train_iters={args.continue_steps}",
        "--train.lr=2e-3",
        "--train.min_lr=2e-4",
        "--train.lr_warmup_iters=10",
        f"--data.update_interval={max(2, args.continue_steps // 8)}",
        f"--logging.dir={out / 'continue'}",
        f"--checkpoint.save={out / 'ckpt/continue'}",
    )
    losses["continued"] = last_json(
        demo.megashear(
            "continue", "evaluate", *cont_common, f"--checkpoint.load={out / 'ckpt/continue'}"
        )
    )

    # 7. export to Hugging Face and generate with transformers
    hf_dir = out / "hf"
    demo.run(
        "export",
        [
            py,
            "tools/convert_checkpoint.py",
            "megatron-to-hf",
            "--load",
            str(out / "ckpt/continue"),
            "--save",
            str(hf_dir),
            "--tokenizer",
            str(data / "tokenizer.model"),
            "--overwrite",
        ],
    )
    sample = demo.run("export", [py, "-c", GENERATE, str(hf_dir)]).strip()

    # 8. plots
    for run in ("source", "prune", "continue"):
        demo.run("plots", [py, "tools/plot_run.py", str(out / run)])

    cont_updates = read_events(str(out / "continue"), "domain_update")
    final_weights = cont_updates[-1]["weights"] if cont_updates else {}
    from megashear.model_config import ModelConfig

    src_cfg = ModelConfig(**{**SOURCE, "vocab_size": args.vocab_size})
    print("\n================ megashear demo ================")
    print(
        f"parameters: source {src_cfg.num_parameters():,} -> finalized "
        f"{final['parameters']:,} (target {TARGET})"
    )
    names = list(losses["source"])
    print("\nper-domain validation loss")
    print(f"{'stage':<18}" + "".join(f"{n[:12]:>13}" for n in names) + f"{'mean':>9}")
    for stage, row in losses.items():
        mean = sum(row.values()) / len(row)
        print(f"{stage:<18}" + "".join(f"{row[n]:>13.3f}" for n in names) + f"{mean:>9.3f}")
    print("\nfinal domain weights: " + ", ".join(f"{k} {v:.3f}" for k, v in final_weights.items()))
    print(
        "\nstage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in demo.times.items())
        + f"; total {sum(demo.times.values()):.0f}"
    )
    print(f"\ntransformers sample: {sample}")
    print(f"plots: {out}/*/plots/*.png")
    better = all(losses["continued"][n] < losses["finalized"][n] for n in names)
    print(f"continued pre-training lowered every domain's loss: {better}")
    return 0


GENERATE = """
import sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
path = sys.argv[1]
model = LlamaForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
ids = tok("The history of", return_tensors="pt").input_ids
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=20, do_sample=False)
print(repr(tok.decode(out[0], skip_special_tokens=True)))
"""


if __name__ == "__main__":
    sys.exit(main())
