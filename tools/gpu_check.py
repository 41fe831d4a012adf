"""The GPU check: train, prune, KD steps and finalisation at TP1 in bf16 on one CUDA device.

A Llama-3.2-1B-shaped model with random weights (no download): for each of a training step, a
pruning step (toward a half-size target) and a KD step (the target-shaped student distilling from
the 1B teacher), it prints tokens/s, model FLOP utilisation (MFU) and the peak GPU memory next to
``megashear plan``'s prediction for the same setting; then it finalises the pruning run's masks
into the dense target and prints how long that took. One JSON line per phase on stdout.

Run it through ``tools/gpu_check.sh`` (which installs megatron-core and megashear offline);
``--tiny`` runs the same code on a tiny shape, on CPU too, to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time

import torch

from megashear.config import (
    CheckpointConfig,
    DistillConfig,
    ParallelConfig,
    PruningConfig,
    TrainConfig,
)
from megashear.model_config import ModelConfig, get_preset
from megashear.planning import memory as mem

logger = logging.getLogger("gpu_check")

# Dense bf16 peak FLOP/s by device name (no sparsity); MEGASHEAR_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
KINDS = ("head", "intermediate", "layer", "hidden")


def peak_flops() -> float | None:
    if os.environ.get("MEGASHEAR_PEAK_TFLOPS"):
        return float(os.environ["MEGASHEAR_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def train_flops_per_token(cfg: ModelConfig, seq: int, forward_only: bool = False) -> float:
    """Model FLOPs per token (PaLM's accounting): ``6 N + 12 L a hn s`` for forward and
    backward, a third of it forward only; ``N`` counts the matmul parameters, the output layer
    included, the input embedding not."""
    split, _ = mem.layer_parameters(cfg)
    n = cfg.num_layers * split + cfg.padded_vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq
    per_token = 6 * n + attn
    return per_token / 3 if forward_only else per_token


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / mem.GIB


def timed_steps(trainer, warmup: int, steps: int) -> tuple[float, dict]:
    """Seconds per step over ``steps`` after ``warmup`` steps, and the last step's stats."""
    for _ in range(warmup):
        trainer.train_step()
    device_sync()
    start = time.perf_counter()
    for _ in range(steps):
        stats = trainer.train_step()
    device_sync()
    return (time.perf_counter() - start) / steps, stats


def report(phase: str, work: mem.Workload, seconds: float, flops_per_token: float, **extra) -> dict:
    tokens = work.global_batch_size * work.seq_length
    peak = peak_flops()
    predicted = mem.estimate(work, mem.Layout()).total / mem.GIB
    measured = peak_gib()
    out = {
        "phase": phase,
        "tokens_per_s": round(tokens / seconds, 1),
        "step_s": round(seconds, 4),
        "mfu": None if peak is None else round(tokens / seconds * flops_per_token / peak, 4),
        "peak_memory_gib": None if measured is None else round(measured, 2),
        "planner_gib": round(predicted, 2),
        **extra,
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (checks the script)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    from megashear import platform
    from megashear.checkpoint.model_state import save_model_checkpoint
    from megashear.jobs.finalize import finalize_checkpoint
    from megashear.parallel import destroy
    from megashear.pruning.targets import make_target
    from megashear.training.batches import SyntheticBatches
    from megashear.training.pruning_trainer import PruningTrainer
    from megashear.training.trainer import Trainer

    cuda = platform.cuda_available()
    source = get_preset("tiny-gqa-8h" if args.tiny else "llama3.2-1b")
    seq = 64 if args.tiny else args.seq_length
    source = dataclasses.replace(source, seq_length=seq)
    # half the layers, width, heads and FFN: the pruning target and the KD student
    target = make_target(
        source,
        num_layers=source.num_layers // 2,
        hidden_size=source.hidden_size // 2,
        num_attention_heads=source.num_attention_heads // 2,
        ffn_hidden_size=source.ffn_hidden_size // 2,
    )
    gbs = args.global_batch_size
    train = TrainConfig(
        micro_batch_size=1, global_batch_size=gbs, train_iters=1000, lr=1e-4, min_lr=1e-5,
        lr_warmup_iters=1, bf16=cuda, log_interval=10**9,
    )  # fmt: skip
    par = ParallelConfig()
    dtype = "bf16" if cuda else "fp32"
    backend = "te" if cuda and _te() else "local"
    common = dict(seq_length=seq, micro_batch_size=1, global_batch_size=gbs, dtype=dtype)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                      "torch": torch.__version__, "source": "llama3.2-1b shape (random)",
                      "target": dataclasses.asdict(target), "seq_length": seq,
                      "global_batch_size": gbs, "dtype": dtype, "backend": backend}),
          flush=True)  # fmt: skip
    batches = SyntheticBatches(source.vocab_size, seq, 7)
    results = []

    # 1. training step (the source shape)
    fresh_memory()
    trainer = Trainer(source, par, train, batches)
    seconds, stats = timed_steps(trainer, warmup=2, steps=args.steps)
    work = mem.Workload(model=source, job="train", backend=backend, **common)
    results.append(report("train", work, seconds, train_flops_per_token(source, seq),
                          loss=stats["loss"]))  # fmt: skip
    teacher_dir = os.path.join(workdir, "teacher")
    save_model_checkpoint(trainer.model, source, teacher_dir)
    del trainer
    destroy()

    # 2. pruning step (masked source toward the target), then a model checkpoint to finalise
    fresh_memory()
    pcfg = PruningConfig(kinds=KINDS, lagrangian_warmup_steps=2)
    trainer = PruningTrainer(source, target, pcfg, par, train, batches)
    work = mem.Workload(model=source, job="prune", kinds=KINDS, backend=backend, **common)
    try:
        seconds, stats = timed_steps(trainer, warmup=2, steps=args.steps)
        results.append(report("prune", work, seconds, train_flops_per_token(source, seq),
                              loss=stats["loss"]))  # fmt: skip
    except RuntimeError as exc:  # reported; finalisation still runs on the untrained masks
        print(json.dumps({"phase": "prune", "error": " ".join(str(exc).split())[:300]}))
    pruned_dir = os.path.join(workdir, "pruned")
    save_model_checkpoint(
        trainer.model, source, pruned_dir, trainer.iteration, extra_meta=trainer.extra_meta()
    )
    del trainer
    destroy()

    # 3. KD step: the target-shaped student distils from the source (the teacher checkpoint)
    fresh_memory()
    distill = DistillConfig(teacher=teacher_dir)
    trainer = Trainer(target, par, train, batches, CheckpointConfig(), distill=distill)
    seconds, stats = timed_steps(trainer, warmup=2, steps=args.steps)
    work = mem.Workload(model=target, job="train", teacher=source, backend=backend, **common)
    flops = train_flops_per_token(target, seq) + train_flops_per_token(source, seq, True)
    results.append(report("kd", work, seconds, flops, loss=stats["loss"]))
    del trainer
    destroy()

    # 4. finalisation of the pruning checkpoint into the dense target
    start = time.perf_counter()
    out = finalize_checkpoint(pruned_dir, os.path.join(workdir, "final"))
    print(json.dumps({"phase": "finalize", "seconds": round(time.perf_counter() - start, 2),
                      "parameters": out.num_parameters(),
                      "matches_target": out.num_parameters() == target.num_parameters()}),
          flush=True)  # fmt: skip
    return 0


def _te() -> bool:
    from megashear.models.llama import te_available

    return te_available()


if __name__ == "__main__":
    sys.exit(main())
