#!/usr/bin/env python3
"""Data-loading throughput: megashear's dynamic sampler + fetch against megatron-core's static
BlendedDataset, over the same per-domain GPTDatasets with the same weights, in one run.

Builds (once, cached under --cache) a sentencepiece tokenizer and per-domain indexed datasets
from a sample of ../shared/corpus, timing the preprocessing. Then both sources produce global
batches ``[B, s]`` (tokens, labels, loss_mask, domain id) in the same pattern: megashear with
``DomainBatches.next_global_batch(B)`` (picks made per batch by the dynamic sampler, samples read
in this process), megatron with ``BlendedDataset[i]`` for sequential global indices ``i`` in
batches of B, stacked the same way. The two alternate for --repeats rounds; the best round of
each counts. Prints samples/s of both and the ratio time(megashear) / time(BlendedDataset)
(goal: <= 1.05); with --workers-fetch N also megashear with N DataLoader workers.

    python tools/bench_data.py [--bytes-per-domain 3000000 --seq-length 1024 --batch 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from megashear.cli import report_error
from megashear.data.domain_dataset import stack_samples

ROOT = Path(__file__).resolve().parents[1]

# docs/method.md §5's RedPajama proportions on the corpus's domains (web stands in for cc + c4).
WEIGHTS = {
    "web": 0.82,
    "github": 0.045,
    "books": 0.045,
    "stackexchange": 0.02,
    "wikipedia": 0.045,
    "arxiv": 0.025,
}


def prepare(args) -> tuple[str, dict]:
    """Tokenizer + per-domain indexed datasets under args.cache; returns (manifest, stats)."""
    from megashear.data.manifest import Domain, Manifest, save_manifest
    from megashear.data.preprocess import preprocess_domain

    out = Path(args.cache) / f"b{args.bytes_per_domain}-v{args.vocab_size}"
    manifest_path, stats_path = out / "manifest.yaml", out / "preprocess.json"
    if manifest_path.is_file() and stats_path.is_file():
        return str(manifest_path), {**json.loads(stats_path.read_text()), "cached": True}
    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokenizer"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/train_tokenizer.py"),
            "--input",
            args.corpus,
            "--vocab-size",
            str(args.vocab_size),
            "--sample-bytes-per-domain",
            str(min(args.bytes_per_domain, 500_000)),
            "--output-prefix",
            str(tok),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    domains, text_bytes, tokens = [], 0, 0
    start = time.perf_counter()
    for name, weight in WEIGHTS.items():
        path = os.path.join(args.corpus, f"{name}.jsonl.xz")
        st = preprocess_domain(
            path,
            str(out / name),
            str(tok) + ".model",
            args.valid_tokens,
            workers=args.workers,
            max_bytes=args.bytes_per_domain,
        )
        text_bytes += st.bytes
        tokens += st.train_tokens + st.valid_tokens
        domains.append(Domain(name, f"{name}_train", f"{name}_valid", weight))
    seconds = time.perf_counter() - start
    save_manifest(
        Manifest(domains, tokenizer=str(tok) + ".model", vocab_size=args.vocab_size),
        str(manifest_path),
    )
    stats = {"text_mb": text_bytes / 1e6, "tokens": tokens, "seconds": seconds}
    stats_path.write_text(json.dumps(stats))
    return str(manifest_path), stats


def stack(items: list[dict]):
    """BlendedDataset items as a batch like megashear's (``domain_id`` from ``dataset_id``)."""
    batch = stack_samples(items)
    batch["domain_id"] = torch.tensor([int(it["dataset_id"]) for it in items], dtype=torch.long)
    return batch


def time_blended(blended, samples: int, batch: int) -> float:
    t = time.perf_counter()
    for lo in range(0, samples, batch):
        stack([blended[i] for i in range(lo, lo + batch)])
    return time.perf_counter() - t


def time_megashear(make_source, samples: int, batch: int) -> float:
    src = make_source()
    t = time.perf_counter()
    for _ in range(samples // batch):
        src.next_global_batch(batch)
    elapsed = time.perf_counter() - t
    src.close()
    return elapsed


def time_sampler(make_source, samples: int, batch: int) -> float:
    """Seconds the dynamic sampler alone takes to pick ``samples`` (no fetch)."""
    sampler = make_source().sampler
    t = time.perf_counter()
    for _ in range(samples // batch):
        sampler.next_global_batch(batch)
    return time.perf_counter() - t


def stall_per_batch(make_source, batches: int, batch: int, step_seconds: float) -> float:
    """Mean seconds the caller waits in next_global_batch when a training step of
    ``step_seconds`` (simulated by sleeping) runs between batches."""
    src = make_source()
    src.next_global_batch(batch)
    waited = 0.0
    for _ in range(batches):
        time.sleep(step_seconds)
        t = time.perf_counter()
        src.next_global_batch(batch)
        waited += time.perf_counter() - t
    src.close()
    return waited / batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from megashear.paths import corpus_dir

    parser.add_argument(
        "--corpus", default=str(corpus_dir()), help="default: $MEGASHEAR_CORPUS or ../shared/corpus"
    )
    parser.add_argument("--cache", default="/tmp/megashear-bench-data")
    parser.add_argument("--bytes-per-domain", type=int, default=3_000_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--valid-tokens", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16384, help="per timed round")
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed rounds; the best counts (5 is too few on a noisy VM)",
    )
    parser.add_argument("--workers-fetch", type=int, default=2, help="0 skips the worker row")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if not os.path.isdir(args.corpus):
        return report_error(ValueError(f"corpus {args.corpus} does not exist"))
    samples = args.samples // args.batch * args.batch
    if samples < args.batch:
        return report_error(ValueError("--samples must be at least --batch"))

    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from megashear.data.domain_dataset import build_domain_dataset
    from megashear.data.loader import DomainBatches
    from megashear.data.manifest import load_manifest

    manifest_path, pre = prepare(args)
    manifest = load_manifest(manifest_path)
    weights = manifest.weights()
    # Both sources read the same GPTDatasets, sized so that BlendedDataset never oversamples
    # them (megatron's own rule: weight x size x (1 + surplus)); megashear never wraps an epoch.
    datasets = [
        build_domain_dataset(
            d.train_prefix,
            args.seq_length,
            args.seed,
            cache_root=os.path.join(args.cache, "index"),
            num_samples=math.ceil(w * samples * 1.01) + args.batch,
            vocab_size=manifest.vocab_size,
            name=d.name,
        )
        for d, w in zip(manifest.domains, weights)
    ]
    # path_to_cache "": megatron builds the blending indices in memory (caching them would need
    # torch.distributed); the build is not timed.
    config = dataclasses.replace(datasets[0].config, path_to_cache="")
    blended = BlendedDataset(datasets, weights, samples, config)

    def ours(workers: int):
        return lambda: DomainBatches(
            manifest, args.seq_length, args.seed, num_workers=workers, datasets=datasets
        )

    time_blended(blended, args.batch * 4, args.batch)  # warm the page cache and code paths
    time_megashear(ours(0), args.batch * 4, args.batch)
    best = {"blended": math.inf, "megashear": math.inf, "workers": math.inf, "picks": math.inf}
    for _ in range(args.repeats):
        best["blended"] = min(best["blended"], time_blended(blended, samples, args.batch))
        best["megashear"] = min(best["megashear"], time_megashear(ours(0), samples, args.batch))
        best["picks"] = min(best["picks"], time_sampler(ours(0), samples, args.batch))
        if args.workers_fetch:
            best["workers"] = min(
                best["workers"], time_megashear(ours(args.workers_fetch), samples, args.batch)
            )

    print(
        f"preprocessing: {pre['text_mb']:.1f} MB of text, {pre['tokens']} tokens in "
        f"{pre['seconds']:.1f} s = {pre['text_mb'] / pre['seconds']:.2f} MB/s "
        f"({args.workers} tokenizer processes"
        + ("; measured when the cached data were built)" if pre.get("cached") else ")")
    )
    print(
        f"{len(datasets)} domains, seq_length {args.seq_length}, batch {args.batch}, "
        f"{samples} samples per round, best of {args.repeats}"
    )
    rate = {k: samples / v for k, v in best.items() if v < math.inf and k != "picks"}
    print(f"megatron BlendedDataset (static weights): {rate['blended']:.0f} samples/s")
    print(f"megashear dynamic sampler + fetch:        {rate['megashear']:.0f} samples/s")
    if "workers" in rate:
        print(
            f"megashear, {args.workers_fetch} DataLoader workers:     "
            f"{rate['workers']:.0f} samples/s"
        )
    ratio = best["megashear"] / best["blended"]
    print(f"time(megashear) / time(BlendedDataset) = {ratio:.3f} (goal <= 1.05)")
    # Both read the same GPTDataset samples; what megashear adds is picking them. Its share is
    # a steadier figure than the ratio of two noisy timings.
    per_batch = samples // args.batch
    print(
        f"dynamic sampler alone: {best['picks'] / per_batch * 1e3:.2f} ms per batch = "
        f"{best['picks'] / best['blended']:.1%} of BlendedDataset's time"
    )
    if args.workers_fetch:
        step = 4 * best["megashear"] / (samples // args.batch)
        stalls = [
            stall_per_batch(ours(n), 10, args.batch, step) * 1e3 for n in (0, args.workers_fetch)
        ]
        print(
            f"trainer wait per batch with a {step * 1e3:.0f} ms step between batches: "
            f"{stalls[0]:.1f} ms in-process, {stalls[1]:.1f} ms with {args.workers_fetch} workers"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
