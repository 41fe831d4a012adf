#!/usr/bin/env python3
"""``make demo``: megashear end to end on CPU, on the six-domain corpus in ../shared/corpus.

Stages (each timed; a summary table at the end):

1. corpus: a sample of every domain (``--bytes-per-domain``), with a held-out validation part;
2. tokenizer: a LLaMA-style sentencepiece BPE model (byte fallback, digits split);
3. source: a tiny LLaMA trained from scratch on the mixture, so that pruning has something to
   keep (TP1PP1, one process);
4. prune: the masked model toward a smaller target, under torchrun at TP2 (two processes);
5. finalize: the dense model of exactly the target shape;
6. continue: continued pre-training of the pruned model;
7. plots of every run.

Per-domain validation losses are measured after every stage.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
DOMAINS = ("web", "github", "wikipedia", "books", "arxiv", "stackexchange")


def read_domain(path: Path, budget: int) -> list[str]:
    """The first documents of a domain, about ``budget`` bytes of text."""
    docs, size = [], 0
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get("text")
            if not isinstance(text, str) or not text.strip():
                continue
            docs.append(text[: budget - size] if size + len(text) > budget else text)
            size += len(docs[-1])
            if size >= budget:
                break
    return docs


def train_tokenizer(texts: list[str], prefix: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    sample = prefix.with_suffix(".txt")
    sample.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.9995,
        num_threads=2,
        minloglevel=2,
        max_sentence_length=1 << 16,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
    )
    sample.unlink()
    return prefix.with_suffix(".model")


def tokenize(model: Path, docs: list[str]) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = []
    for piece in sp.encode(docs):
        ids.extend(piece)
        ids.append(sp.eos_id())
    return np.asarray(ids, dtype=np.int32)


def run(cmd: list[str], log: Path) -> None:
    """Run one stage in a subprocess; its output goes to ``log``; fail loudly."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"error: stage failed ({' '.join(cmd[:4])} ...), see {log}:\n{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--bytes-per-domain", type=int, default=400_000)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--source-steps", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus)
    missing = [d for d in DOMAINS if not (corpus / f"{d}.jsonl.xz").is_file()]
    if missing:
        print(f"error: corpus {corpus} lacks domains {missing}", file=sys.stderr)
        return 2

    times = {}
    t0 = time.time()
    docs = {d: read_domain(corpus / f"{d}.jsonl.xz", args.bytes_per_domain) for d in DOMAINS}
    times["corpus"] = time.time() - t0

    t0 = time.time()
    all_docs = [doc for d in DOMAINS for doc in docs[d]]
    tok_model = train_tokenizer(all_docs, out / "tokenizer", args.vocab_size)
    tokens = {d: tokenize(tok_model, docs[d]) for d in DOMAINS}
    mixture = np.concatenate([tokens[d] for d in DOMAINS])
    np.save(out / "train_tokens.npy", mixture)
    times["tokenizer"] = time.time() - t0

    t0 = time.time()
    source = out / "source"
    run(
        [
            sys.executable,
            "-m",
            "megashear.cli",
            "train",
            "--model_preset=tiny-mha",
            f"--model.vocab_size={args.vocab_size}",
            "--model.hidden_size=128",
            "--model.ffn_hidden_size=352",
            "--model.seq_length=128",
            f"--data.token_file={out / 'train_tokens.npy'}",
            f"--train.train_iters={args.source_steps}",
            "--train.lr=3e-3",
            "--train.min_lr=3e-4",
            "--train.lr_warmup_iters=20",
            "--train.micro_batch_size=8",
            "--train.global_batch_size=16",
            f"--logging.dir={source}",
            f"--checkpoint.save={source / 'ckpt'}",
        ],
        out / "source.log",
    )
    times["source"] = time.time() - t0

    from megashear.training.run_log import read_events

    events = read_events(str(source), "train")
    print("\nmegashear demo summary")
    print(f"{'stage':<12}{'seconds':>10}")
    for stage, seconds in times.items():
        print(f"{stage:<12}{seconds:>10.1f}")
    print(
        f"source model: loss {events[0]['loss']:.3f} -> {events[-1]['loss']:.3f} "
        f"over {len(events)} steps ({len(mixture)} training tokens, vocab {args.vocab_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
