#!/usr/bin/env python3
"""Training-step time: megashear (megatron-core, TP1PP1) against transformers + torch AdamW.

Both train the same LLaMA shape on the same batch in one process, fp32 on CPU; steps alternate
between the two so that machine noise hits both alike. Prints the median step times, their
ratio (goal: megashear / transformers <= 1.0), the spread of the ratio within each pair of
neighbouring steps, and the achieved FLOP/s of each against this machine's fp32 matmul peak
measured in the same run.

    python tools/bench_train_step.py [--layers 8 --hidden 512 --seq 256 --batch 4 --steps 5]
    python tools/bench_train_step.py --preset smollm2-135m [--profile]

``--preset`` takes a shape from ``megashear.model_config.PRESETS`` (``smollm2-135m``: GQA 9/3,
tied embeddings, vocab 49152) instead of the MHA ``--layers/--hidden/...`` flags (default: the
33.5M shape). ``--profile`` adds the ops with the most wall time in one step of each side.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 FLOP/s of a square matmul, best of ``reps``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(cfg, tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward)."""
    h, s, layers = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    dense = cfg.num_parameters() - cfg.vocab_size * h  # the input embedding is a lookup
    attention = 2 * 2 * layers * s * h  # QK^T and PV per token, causal not discounted
    return 3 * tokens * (2 * dense + attention)


def profile_summary(step, rows: int = 10) -> str:
    """The ``rows`` aten ops with the most wall time in one call of ``step``, each op timed
    around its dispatch (a ``TorchDispatchMode``), with the step's wall time and the part of it
    spent outside ops (Python, autograd, hooks). ``torch.profiler`` is not used: on this CPU its
    per-op bookkeeping inflated the many small ops of a step several-fold (its ``cat`` and
    ``fill_`` came out 2.7x and 4.7x these)."""
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            entry = totals[func.overloadpacket.__name__]
            entry[0] += time.perf_counter() - t
            entry[1] += 1
            return out

    start = time.perf_counter()
    with OpTimer():
        step()
    wall = time.perf_counter() - start
    in_ops = sum(t for t, _ in totals.values())
    lines = [f"{'op':<44}{'time s':>9}{'calls':>8}"]
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{name[:43]:<44}{t:>9.3f}{n:>8}")
    lines.append(f"{'all ops':<44}{in_ops:>9.3f}{sum(n for _, n in totals.values()):>8}")
    lines.append(f"{'outside ops (Python, autograd, the timer)':<44}{wall - in_ops:>9.3f}")
    lines.append(f"{'step, timed':<44}{wall:>9.3f}")
    return "\n".join(lines)


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The step benchmarks' options: the model shape (the ``megashear`` command's
    ``model.*`` names, with this script's short aliases), batch, steps, preset, profile."""
    from megashear.config import RunConfig
    from megashear.config_io import add_field_option

    parser = argparse.ArgumentParser(description=description)
    for key, alias, default in (
        ("model.num_layers", "--layers", 8),
        ("model.hidden_size", "--hidden", 512),
        ("model.num_attention_heads", "--heads", 8),
        ("model.ffn_hidden_size", "--ffn", 1376),
        ("model.vocab_size", "--vocab", 8000),
        ("model.seq_length", "--seq", 256),
    ):
        add_field_option(parser, RunConfig, key, alias, default=default)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--preset", default=None, help="a model preset instead of the shape flags")
    parser.add_argument("--profile", action="store_true", help="per-op summary of one step each")
    return parser


def model_config(args: argparse.Namespace):
    """The benchmarked shape: ``--preset`` at ``--seq``, else the MHA shape of the flags."""
    import dataclasses

    from megashear.model_config import ModelConfig, get_preset

    if args.preset:
        return dataclasses.replace(get_preset(args.preset), seq_length=args.seq_length)
    return ModelConfig(
        args.num_layers,
        args.hidden_size,
        args.num_attention_heads,
        args.num_attention_heads,
        args.ffn_hidden_size,
        args.vocab_size,
        seq_length=args.seq_length,
    )


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import LlamaConfig, LlamaForCausalLM

    from megashear.config import ParallelConfig, TrainConfig
    from megashear.training.batches import SyntheticBatches
    from megashear.training.trainer import Trainer

    cfg = model_config(args)
    train = TrainConfig(
        micro_batch_size=args.batch,
        global_batch_size=args.batch,
        train_iters=10**6,
        lr_warmup_iters=0,
        clip_grad=1.0,
    )
    trainer = Trainer(
        cfg, ParallelConfig(), train, SyntheticBatches(cfg.vocab_size, args.seq_length)
    )

    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
            max_position_embeddings=args.seq_length,
            rms_norm_eps=cfg.norm_epsilon,
            rope_theta=cfg.rotary_base,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attn_implementation="sdpa",
        )
    )
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batch = SyntheticBatches(cfg.vocab_size, args.seq_length, seed=1).next_global_batch(args.batch)

    def hf_step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=batch["tokens"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t

    def ms_step() -> float:
        t = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t

    for _ in range(2):
        hf_step(), ms_step()
    ms_times, hf_times = [], []
    for _ in range(args.steps):
        ms_times.append(ms_step())
        hf_times.append(hf_step())
    ms, hft = statistics.median(ms_times), statistics.median(hf_times)
    peak = matmul_peak()
    flops = step_flops(cfg, args.batch * args.seq_length)
    print(
        f"shape: {args.preset or 'custom'}, {cfg.num_parameters() / 1e6:.1f}M params, "
        f"{cfg.num_layers} layers x {cfg.hidden_size} hidden, {cfg.num_attention_heads} heads / "
        f"{cfg.num_query_groups} groups, vocab {cfg.vocab_size}"
        f"{' (tied)' if cfg.tie_word_embeddings else ''}, batch {args.batch} x {args.seq_length} tokens, "
        f"fp32, {torch.get_num_threads()} threads"
    )
    print(f"megashear TP1PP1 step      : {ms:.3f} s  ({flops / ms / 1e9:.1f} GFLOP/s)")
    print(f"transformers + AdamW step  : {hft:.3f} s  ({flops / hft / 1e9:.1f} GFLOP/s)")
    print(f"ratio megashear/transformers: {ms / hft:.3f}  (goal <= 1.0)")
    paired = [m / h for m, h in zip(ms_times, hf_times)]
    print(
        f"ratio of each step pair     : median {statistics.median(paired):.3f}, "
        f"{min(paired):.3f}-{max(paired):.3f} over {len(paired)} pairs"
    )
    print(
        f"fp32 matmul peak            : {peak / 1e9:.1f} GFLOP/s; megashear reaches "
        f"{100 * flops / ms / peak:.0f}% of it, transformers {100 * flops / hft / peak:.0f}%"
    )
    if args.profile:
        for name, fn in (("megashear", ms_step), ("transformers", hf_step)):
            print(f"\nops of one {name} step (wall time around each op):")
            print(profile_summary(fn))


if __name__ == "__main__":
    main()
