#!/usr/bin/env python3
"""Distillation-step time: a KD step against a plain step and a teacher forward, in one run.

One process, TP1PP1, fp32 on CPU. One distillation trainer; its plain step runs the student's
schedule alone (no teacher), its KD step runs teacher and student together, and the teacher
forward is the teacher's chunks over the same micro-batches without gradients. The three
alternate step by step so that machine noise hits them alike. Prints the medians and

- KD / plain: what distillation costs;
- KD / (teacher forward + plain): the goal is <= 1.0 (nothing beyond running both);

and the peak resident memory of a plain and a KD run, each measured in its own subprocess.

    python tools/bench_distill_step.py                # SmolLM2-135M -> the demo's 16 x 384 target
    python tools/bench_distill_step.py --seq 256 --batch 8 --micro-batch 2 --steps 5

Random weights: the timing does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STUDENT = dict(
    num_layers=16, hidden_size=384, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=1024
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-preset", default="smollm2-135m")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top-k", type=int, default=None, help="top-k KL instead of the full one")
    p.add_argument("--profile", action="store_true", help="top self-CPU ops of one KD step")
    p.add_argument("--memory-mode", choices=("plain", "kd"), help=argparse.SUPPRESS)
    p.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shapes(args):
    from megashear.model_config import get_preset

    teacher = dataclasses.replace(get_preset(args.teacher_preset), seq_length=args.seq)
    return dataclasses.replace(teacher, **STUDENT), teacher


def save_random_teacher(teacher_cfg, directory: str) -> None:
    from megashear.checkpoint.model_state import save_model_checkpoint
    from megashear.config import ParallelConfig
    from megashear.models.llama import build_model, build_transformer_config
    from megashear.parallel import init_model_parallel

    par = ParallelConfig()
    init_model_parallel(teacher_cfg, par)
    chunks = build_model(teacher_cfg, build_transformer_config(teacher_cfg, par))
    save_model_checkpoint(chunks, teacher_cfg, directory)


def make_trainer(args, student_cfg, teacher_dir: str | None):
    from megashear.config import DistillConfig, ParallelConfig, TrainConfig
    from megashear.training.batches import SyntheticBatches
    from megashear.training.trainer import Trainer

    train = TrainConfig(
        micro_batch_size=args.micro_batch,
        global_batch_size=args.batch,
        train_iters=10**6,
        lr_warmup_iters=0,
    )
    distill = DistillConfig(teacher=teacher_dir, top_k=args.top_k) if teacher_dir else None
    batches = SyntheticBatches(student_cfg.vocab_size, args.seq)
    return Trainer(student_cfg, ParallelConfig(), train, batches, distill=distill)


@contextlib.contextmanager
def student_alone(trainer):
    """The trainer's plain step: the student's schedule, no teacher."""
    saved = trainer.teacher, trainer.schedule_model, trainer.loss_key
    trainer.teacher, trainer.schedule_model, trainer.loss_key = None, trainer.model, "lm loss"
    try:
        yield
    finally:
        trainer.teacher, trainer.schedule_model, trainer.loss_key = saved


def teacher_forward(trainer, batch) -> None:
    """The teacher over this rank's micro-batches of ``batch``, no gradients (TP1PP1)."""
    from megashear.training.batches import split_for_rank

    (chunk,) = trainer.teacher.chunks
    with torch.no_grad():
        for mb in split_for_rank(batch, 0, 1, trainer.cfg.micro_batch_size):
            tokens = mb["tokens"]
            chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def peak_rss_mb(args, mode: str, teacher_dir: str) -> float:
    """Peak resident memory of two steps of ``mode`` in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-mode", mode, "--teacher-dir", teacher_dir]
    for flag in ("teacher_preset", "seq", "batch", "micro_batch", "top_k"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    # the child sets up its own process group: none of this one's rendezvous settings
    launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} memory run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def memory_run(args) -> None:
    student_cfg, _ = shapes(args)
    trainer = make_trainer(
        args, student_cfg, args.teacher_dir if args.memory_mode == "kd" else None
    )
    for _ in range(2):
        trainer.train_step()
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.memory_mode:
        memory_run(args)
        return
    from megashear.training.batches import SyntheticBatches

    student_cfg, teacher_cfg = shapes(args)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = str(Path(tmp) / "teacher")
        save_random_teacher(teacher_cfg, teacher_dir)
        trainer = make_trainer(args, student_cfg, teacher_dir)
        batch = SyntheticBatches(student_cfg.vocab_size, args.seq, seed=1).next_global_batch(
            args.batch
        )

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def plain() -> None:
            with student_alone(trainer):
                trainer.train_step()

        steps = {
            "kd": trainer.train_step,
            "plain": plain,
            "teacher": lambda: teacher_forward(trainer, batch),
        }
        for fn in steps.values():  # warm-up
            fn()
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, fn in steps.items():
                times[name].append(timed(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        memory = {mode: peak_rss_mb(args, mode, teacher_dir) for mode in ("plain", "kd")}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train_step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    kl = f"top-{args.top_k}" if args.top_k else "full-vocabulary"
    print(
        f"student {student_cfg.num_parameters() / 1e6:.1f}M ({student_cfg.num_layers} x "
        f"{student_cfg.hidden_size}), teacher {args.teacher_preset} "
        f"{teacher_cfg.num_parameters() / 1e6:.1f}M ({teacher_cfg.num_layers} x "
        f"{teacher_cfg.hidden_size}), vocab {student_cfg.vocab_size}, batch {args.batch} x "
        f"{args.seq} tokens (micro {args.micro_batch}), {kl} KL, fp32, "
        f"{torch.get_num_threads()} threads, median of {args.steps}"
    )
    print(f"plain step             : {med['plain']:.3f} s")
    print(f"teacher forward        : {med['teacher']:.3f} s")
    print(f"KD step                : {med['kd']:.3f} s")
    print(f"KD / plain             : {med['kd'] / med['plain']:.3f}")
    both = med["teacher"] + med["plain"]
    print(f"KD / (teacher + plain) : {med['kd'] / both:.3f}  (goal <= 1.0)")
    print(
        f"peak RSS               : plain {memory['plain']:.0f} MB, KD {memory['kd']:.0f} MB "
        f"(+{memory['kd'] - memory['plain']:.0f} MB)"
    )
    if args.profile:
        print("\nprofile of one KD step (self CPU time):\n" + table)


if __name__ == "__main__":
    main()
