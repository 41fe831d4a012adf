#!/usr/bin/env python3
"""Finalisation benchmark: a LLaMA2-7B-shaped random pruning checkpoint (bf16 weights, fp32 log
α of every paper kind) finalised to the Sheared-LLaMA-1.3B shape by ``megashear finalize``,
against a plain copy of the same checkpoint, in one run.

Prints the wall time of the finalize command (process start to exit), its peak RSS and the
ratio to the copy time (goals: peak RSS <= 2 GB, time <= 2x the copy), and checks the output's
shape and parameter count against the target. The copy is timed before and after the finalize
command, each from a page-cached source (read through first), and the faster copy is the
baseline; finalize also starts from a page-cached source. The random checkpoint is generated under
``--workdir`` (never committed) and reused by later runs; the copy and the finalised output are
removed at the end unless ``--keep``.

    python tools/bench_finalize.py [--source llama2-7b] [--target sheared-llama-1.3b]
        [--num-layers N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from bench_convert import dir_bytes, run_measured  # tools/ is this script's sys.path[0]

RSS_GOAL_GB = 2.0
TIME_GOAL = 2.0


def generate(path: str, source, target) -> float:
    """A random pruning checkpoint of ``source`` (target ``target``) at ``path``; returns
    seconds (0 when a checkpoint of the same shapes is there already)."""
    import torch

    from megashear.checkpoint.dist_stream import full_shapes, write_checkpoint
    from megashear.checkpoint.model_state import LOG_ALPHA_SUFFIX, MASK_PREFIX
    from megashear.checkpoint.pruning_record import PruningRecord
    from megashear.pruning import hard_concrete as hc

    stamp = os.path.join(path, "bench-config.json")
    wanted = {"source": source.to_dict(), "target": target.to_dict()}
    if os.path.isfile(stamp) and json.load(open(stamp)) == wanted:
        return 0.0
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    shapes = full_shapes(source)

    def random_tensor(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name], dtype=torch.bfloat16)
        return t.normal_(0.0, 0.02, generator=gen)

    s = source
    shapes_of = hc.log_alpha_shapes(
        s.hidden_size, s.num_attention_heads, s.ffn_hidden_size, s.num_layers
    )
    log_alpha = {
        f"{MASK_PREFIX}{kind}{LOG_ALPHA_SUFFIX}": torch.randn(shapes_of[kind], generator=gen)
        for kind in hc.PAPER_KINDS
    }
    meta = PruningRecord(source, target, tuple(hc.PAPER_KINDS)).to_meta()
    write_checkpoint(
        path,
        source,
        random_tensor,
        torch.bfloat16,
        extra_meta=meta,
        extra_tensors=log_alpha,
        progress=False,
    )
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return time.perf_counter() - start


def read_through(path: str) -> None:
    """Read every file under ``path`` once, so that it is in the page cache."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.read(1 << 23):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llama2-7b", help="source model preset")
    parser.add_argument("--target", default="sheared-llama-1.3b", help="target shape preset")
    parser.add_argument("--num-layers", type=int, help="fewer source layers (quick runs)")
    parser.add_argument("--workdir", default="/tmp/megashear-bench-finalize")
    parser.add_argument("--keep", action="store_true", help="keep the copy and the output")
    args = parser.parse_args()

    from megashear.checkpoint.dist_stream import CheckpointReader
    from megashear.model_config import get_preset
    from megashear.pruning.targets import make_target

    source = get_preset(args.source)
    if args.num_layers:
        source = dataclasses.replace(source, num_layers=args.num_layers)
    target = make_target(source, args.target)
    if args.num_layers:
        target = dataclasses.replace(target, num_layers=max(1, args.num_layers * 3 // 4))
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "pruning")
    copy, out = os.path.join(args.workdir, "copy"), os.path.join(args.workdir, "final")
    for d in (copy, out):
        shutil.rmtree(d, ignore_errors=True)
    gen_s = generate(src, source, target)

    def timed_copy() -> float:
        read_through(src)
        start = time.perf_counter()
        shutil.copytree(src, copy)
        seconds = time.perf_counter() - start
        shutil.rmtree(copy)  # its dirty pages go with it
        os.sync()
        return seconds

    # copy, finalize, copy: each starts from a page-cached source (read through just before),
    # and the faster copy is the baseline (the one less in finalize's favour)
    copies = [timed_copy()]
    read_through(src)
    cmd = [sys.executable, "-m", "megashear.cli", "finalize"]
    wall, rss = run_measured(cmd + [f"--checkpoint.load={src}", f"--checkpoint.save={out}"])
    copies.append(timed_copy())
    copy_s = min(copies)
    final = CheckpointReader(out)
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups")
    fields += ("ffn_hidden_size", "head_dim", "vocab_size")
    shape_ok = all(getattr(final.cfg, f) == getattr(target, f) for f in fields)
    result = {
        "source": args.source + (f" ({source.num_layers} layers)" if args.num_layers else ""),
        "target": args.target,
        "source_params": source.num_parameters(),
        "target_params": target.num_parameters(),
        "checkpoint_gib": round(dir_bytes(src) / 1024**3, 2),
        "generate_s": round(gen_s, 1),
        "copy_s": round(copy_s, 2),
        "copies_s": [round(c, 2) for c in copies],
        "finalize_s": round(wall, 2),
        "finalize_ratio": round(wall / copy_s, 2),
        "finalize_peak_rss_gb": round(rss * 1024**3 / 1e9, 2),
        "finalized_gib": round(dir_bytes(out) / 1024**3, 2),
        "finalized_dtype": str(final.stored_dtype).replace("torch.", ""),
        "shape_is_target": shape_ok,
        "goals_met": wall <= TIME_GOAL * copy_s and rss * 1024**3 / 1e9 <= RSS_GOAL_GB,
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if not shape_ok:
        sys.exit("error: the finalised model does not have the target's shape")


if __name__ == "__main__":
    main()
