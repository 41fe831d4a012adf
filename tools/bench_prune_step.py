#!/usr/bin/env python3
"""Pruning-stage step time against the plain training step, same shape and batch, one process.

Steps alternate between the plain trainer and the pruning trainer (masks on head,
intermediate, layer and hidden, toward half of every dimension) so that machine noise hits both
alike. Prints the median step times, their ratio (goal <= 1.05), the spread of the ratio within
each pair of neighbouring steps, and the mask overhead in memory
(log alpha, its gradient and Adam state, and one forward's sampled masks).

    python tools/bench_prune_step.py [--layers 8 --hidden 512 --seq 256 --batch 4 --steps 5]
    python tools/bench_prune_step.py --preset smollm2-135m

``--preset`` takes a shape from ``megashear.model_config.PRESETS`` instead of the MHA shape
flags; its target keeps half the layers and two thirds of the KV groups (with their heads) and
of the FFN (``smollm2-135m``: 15 layers x 384, 6 heads in 2 groups, FFN 1024).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time


def main() -> None:
    from bench_train_step import model_config, shape_parser  # tools/ is sys.path[0]

    parser = shape_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from megashear.config import ParallelConfig, PruningConfig, TrainConfig
    from megashear.training.batches import SyntheticBatches
    from megashear.training.pruning_trainer import PruningTrainer
    from megashear.training.trainer import Trainer

    cfg = model_config(args)
    if args.preset:
        groups = max(1, cfg.num_query_groups * 2 // 3)
        heads = groups * (cfg.num_attention_heads // cfg.num_query_groups)
        target = dataclasses.replace(
            cfg,
            num_layers=cfg.num_layers // 2,
            hidden_size=heads * cfg.head_dim,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=cfg.ffn_hidden_size * 2 // 3 // 64 * 64,
            kv_channels=cfg.head_dim,
        )
    else:
        target = dataclasses.replace(
            cfg,
            num_layers=cfg.num_layers // 2,
            hidden_size=cfg.hidden_size // 2,
            num_attention_heads=cfg.num_attention_heads // 2,
            num_query_groups=cfg.num_attention_heads // 2,
            ffn_hidden_size=cfg.ffn_hidden_size // 2,
            kv_channels=cfg.head_dim,
        )
    train = TrainConfig(
        micro_batch_size=args.batch,
        global_batch_size=args.batch,
        train_iters=10**6,
        lr_warmup_iters=0,
    )
    plain = Trainer(cfg, ParallelConfig(), train, SyntheticBatches(cfg.vocab_size, args.seq_length))
    pruning = PruningTrainer(
        cfg,
        target,
        PruningConfig(lagrangian_warmup_steps=10),
        ParallelConfig(),
        train,
        SyntheticBatches(cfg.vocab_size, args.seq_length),
    )

    def timed(trainer) -> float:
        t = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t

    for _ in range(2):
        timed(plain), timed(pruning)
    plain_times, prune_times = [], []
    for _ in range(args.steps):
        plain_times.append(timed(plain))
        prune_times.append(timed(pruning))
    p, q = statistics.median(plain_times), statistics.median(prune_times)
    bank = pruning.banks[0]
    mask_params = sum(bank.log_alpha(k).numel() for k in bank.kinds)
    # log alpha + main_grad + Adam exp_avg + exp_avg_sq (fp32) + one forward's sampled z
    mask_bytes = mask_params * 4 * 5
    model_params = cfg.num_parameters()
    print(
        f"shape: {args.preset or 'custom'}, {model_params / 1e6:.1f}M params, "
        f"{cfg.num_layers} layers x {cfg.hidden_size} hidden, "
        f"batch {args.batch} x {args.seq_length} tokens, fp32, TP1PP1"
    )
    print(f"plain training step   : {p:.3f} s")
    print(f"pruning step (masked) : {q:.3f} s")
    print(f"ratio pruning/plain   : {q / p:.3f}  (goal <= 1.05)")
    paired = [b / a for a, b in zip(plain_times, prune_times)]
    print(
        f"ratio of each pair    : median {statistics.median(paired):.3f}, "
        f"{min(paired):.3f}-{max(paired):.3f} over {len(paired)} pairs"
    )
    print(
        f"mask parameters       : {mask_params} ({100 * mask_params / model_params:.3f}% of the "
        f"model); memory {mask_bytes / 2**20:.2f} MiB "
        f"(log alpha, grad, Adam state, sampled z)"
    )
    if args.profile:
        from bench_train_step import profile_summary  # tools/ is this script's sys.path[0]

        for name, trainer in (("plain", plain), ("pruning", pruning)):
            print(f"\nops of one {name} step (wall time around each op):")
            print(profile_summary(lambda trainer=trainer: trainer.train_step(), rows=15))


if __name__ == "__main__":
    main()
