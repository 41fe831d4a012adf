#!/usr/bin/env python3
"""Conversion benchmark: a LLaMA2-7B-shaped random HF checkpoint (bf16 safetensors) converted
HF -> megatron (TP2PP2) and back, against a plain copy of the same bytes, in one run.

Prints, for each direction, wall time, peak RSS of the converting process, and the ratio to
the copy time (goals: peak RSS <= 3 GB, time <= 3x the copy), and checks that the round trip is
bit-identical. The random checkpoint is generated locally under ``--workdir`` (never committed)
and reused by later runs; outputs are removed at the end unless ``--keep``.

    python tools/bench_convert.py [--preset llama2-7b] [--num-layers N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in GiB) of that process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(cmd[1:3])} failed: {err.strip().splitlines()[-1:]}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def generate(path: str, cfg) -> float:
    """A random bf16 HF checkpoint of shape ``cfg`` at ``path``; returns seconds (0 if cached)."""
    import torch

    from megashear.conversion.hf import write_hf_stream

    stamp = os.path.join(path, "bench-config.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == cfg.to_dict():
        return 0.0
    from megashear.layout import canonical_shapes

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    shapes = canonical_shapes(cfg)

    def random_tensor(key: str) -> torch.Tensor:
        return (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)

    write_hf_stream(
        random_tensor, cfg, path, torch.bfloat16, overwrite=True, max_shard_bytes=5 * 1024**3
    )
    with open(stamp, "w") as f:
        json.dump(cfg.to_dict(), f)
    return time.perf_counter() - start


def same_tensors(a_dir: str, b_dir: str) -> bool:
    """Every tensor of two HF directories bit-identical (read one tensor at a time)."""
    import torch

    from megashear.conversion.safetensors_io import read_header, read_tensor

    def headers(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(read_header(os.path.join(d, f)))
        return out

    a, b = headers(a_dir), headers(b_dir)
    return a.keys() == b.keys() and all(
        torch.equal(read_tensor(a[k]), read_tensor(b[k])) for k in a
    )


def main() -> None:
    from megashear.config import RunConfig
    from megashear.config_io import add_field_option

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--num-layers", type=int, help="fewer layers (quick runs)")
    add_field_option(parser, RunConfig, "parallel.tp", "--tp", default=2)
    add_field_option(parser, RunConfig, "parallel.pp", "--pp", default=2)
    parser.add_argument("--workdir", default="/tmp/megashear-bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = parser.parse_args()

    from megashear.layout import canonical_shapes
    from megashear.model_config import get_preset

    cfg = get_preset(args.preset)
    if args.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "hf")
    copy, mg, back = (os.path.join(args.workdir, n) for n in ("copy", "megatron", "hf_back"))
    for d in (copy, mg, back):
        shutil.rmtree(d, ignore_errors=True)
    gen_s = generate(src, cfg)
    size = dir_bytes(src)

    start = time.perf_counter()
    shutil.copytree(src, copy)
    copy_s = time.perf_counter() - start
    shutil.rmtree(copy)

    py = sys.executable
    to_mg_s, to_mg_rss = run_measured(
        [py, TOOL, "hf-to-megatron", "--load", src, "--save", mg]
        + ["--tp", str(args.tp), "--pp", str(args.pp)]
    )
    to_hf_s, to_hf_rss = run_measured([py, TOOL, "megatron-to-hf", "--load", mg, "--save", back])
    identical = same_tensors(src, back)
    result = {
        "model": args.preset + (f" ({cfg.num_layers} layers)" if args.num_layers else ""),
        "params": sum(math.prod(s) for s in canonical_shapes(cfg).values()),
        "checkpoint_gib": round(size / 1024**3, 2),
        "generate_s": round(gen_s, 1),
        "copy_s": round(copy_s, 2),
        "hf_to_megatron_s": round(to_mg_s, 2),
        "hf_to_megatron_ratio": round(to_mg_s / copy_s, 2),
        "hf_to_megatron_peak_rss_gib": round(to_mg_rss, 2),
        "megatron_to_hf_s": round(to_hf_s, 2),
        "megatron_to_hf_ratio": round(to_hf_s / copy_s, 2),
        "megatron_to_hf_peak_rss_gib": round(to_hf_rss, 2),
        "megatron_gib": round(dir_bytes(mg) / 1024**3, 2),
        "round_trip_bit_identical": identical,
    }
    if not args.keep:
        shutil.rmtree(mg, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if not identical:
        sys.exit("error: the round trip changed a tensor")


if __name__ == "__main__":
    main()
