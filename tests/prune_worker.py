"""Runs masked-model jobs under torchrun; the pruning tests compare what rank 0 writes.

Usage: ``torchrun --standalone --nproc_per_node N tests/prune_worker.py PLAN.json OUT.pt``

Job fields: ``name``, ``model`` (preset name, or a ``ModelConfig.to_dict()`` dict), ``target``
(dict of target ModelConfig overrides), ``kinds``, ``tp``, ``pp``, ``init`` (model-only checkpoint
to load), ``save_init``, ``seq_length`` (length of the synthetic batches; default the model's),
``tokens`` (a ``[B, s]`` int64 batch for ``logits``; default the synthetic batch),
``init_log_alpha`` (full log α per kind) and ``pinned_hidden`` (PruningTrainer's), ``mode``:

- ``grads``: one training step's sampled masks and log α gradients (gathered, full);
- ``ones``: LM loss with every mask forced to 1, and the plain model's loss on the same batch;
- ``logits``: logits ``[B, s, v]`` under deterministic masks at the target sizes, and the masks;
- ``plain_logits``: logits of a plain checkpoint ``load_model`` on the ``logits`` batch;
- ``token_losses``: a plain checkpoint ``load_model`` at its own shape: per-window mean losses of
  ``tokens``/``labels`` through the training loss path, and (``return_logits``) their logits;
- ``train``: ``steps`` pruning steps; the expected-sparsity history;
- ``save``/``reload``: save the masked checkpoint / load it and report the gathered log α.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megashear.checkpoint import model_state as checkpointing
from megashear.checkpoint.format import read_meta, resolve
from megashear.config import CheckpointConfig, ParallelConfig, PruningConfig, TrainConfig
from megashear.model_config import ModelConfig, get_preset
from megashear.training.batches import SyntheticBatches
from megashear.training.pruning_trainer import PruningTrainer
from megashear.training.trainer import Trainer


def make_trainer(job: dict) -> PruningTrainer:
    import dataclasses

    if isinstance(job["model"], dict):
        cfg = ModelConfig.from_dict(job["model"])
    else:
        cfg = get_preset(job["model"])
    target = dataclasses.replace(cfg, **job["target"])
    pcfg = PruningConfig(
        kinds=tuple(job.get("kinds", ("head", "intermediate", "layer", "hidden"))),
        lagrangian_warmup_steps=job.get("warmup", 4),
        lr_log_alpha=job.get("lr_log_alpha", 0.1),
        lr_lambda=job.get("lr_lambda", 1.0),
        log_alpha_init_mean=job.get("init_mean", 5.0),
    )
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1))
    train = TrainConfig(
        micro_batch_size=2,
        global_batch_size=8,
        train_iters=job.get("steps", 1),
        lr=job.get("lr", 1e-3),
        lr_warmup_iters=0,
        clip_grad=job.get("clip_grad", 1e9),
    )
    ckpt = CheckpointConfig(save=job.get("save"), load=job.get("load"))
    seq = job.get("seq_length", cfg.seq_length)
    trainer = PruningTrainer(
        cfg,
        target,
        pcfg,
        par,
        train,
        SyntheticBatches(cfg.vocab_size, seq, 3),
        ckpt,
        init_log_alpha=job.get("init_log_alpha"),
        pinned_hidden=job.get("pinned_hidden", ()),
    )
    if job.get("init"):
        checkpointing.load_model_weights(trainer.model, cfg, job["init"])
    return trainer


@torch.no_grad()
def set_random_log_alpha(t: PruningTrainer, seed: int) -> None:
    """The same full log α ~ N(1, 2²) on every layout, each rank taking its slice."""
    g = torch.Generator().manual_seed(seed)
    full = {k: torch.randn(v.shape, generator=g) * 2 + 1 for k, v in t.gather_log_alpha().items()}
    for bank in t.banks:
        for kind, value in bank.local_slices(full).items():
            bank.log_alpha(kind).copy_(value)


def plain_logits(job: dict) -> dict:
    """Logits of a plain (finalised) checkpoint on the ``logits`` mode's batch."""
    meta = read_meta(resolve(job["load_model"]))
    cfg = ModelConfig.from_dict(meta["model"])
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1))
    train = TrainConfig(micro_batch_size=2, global_batch_size=8)
    t = Trainer(cfg, par, train, SyntheticBatches(cfg.vocab_size, cfg.seq_length, 3))
    checkpointing.load_model_weights(t.model, cfg, job["load_model"])
    batch = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 5).next_global_batch(4)
    return {"logits": t.gather_logits(batch), "model": cfg.to_dict()}


def token_losses(job: dict) -> dict:
    """A plain checkpoint at its own shape on the given token windows ``[B, s]``.

    ``window_loss`` ``[B]``: each window's mean token loss through the training loss path
    (megatron-core's vocab-parallel cross-entropy; every window is its own "domain" of the
    per-domain loss report); ``logits`` ``[B, s, v]`` with ``return_logits``.
    """
    import dataclasses

    from megashear.training.batches import split_for_rank

    tokens, labels = job["tokens"], job["labels"]
    b, s = tokens.shape
    meta = read_meta(resolve(job["load_model"]))
    cfg = dataclasses.replace(ModelConfig.from_dict(meta["model"]), seq_length=s)
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1))
    train = TrainConfig(micro_batch_size=2, global_batch_size=8)
    t = Trainer(cfg, par, train, SyntheticBatches(cfg.vocab_size, s, 3))
    checkpointing.load_model_weights(t.model, cfg, job["load_model"])
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "domain_id": torch.arange(b),
    }
    microbatches = split_for_rank(batch, t.dp_rank, t.dp_size, t.cfg.micro_batch_size)
    for mb in microbatches:
        mb["num_domains"] = b
    for chunk in t.model:
        chunk.eval()
    with torch.no_grad():
        reports = t.run_schedule(microbatches, forward_only=True)
    totals = t.reduce_sums(reports, "domain loss")
    out = {"window_loss": totals[:b] / totals[b:], "model": cfg.to_dict()}
    if job.get("return_logits"):
        out["logits"] = t.gather_logits({"tokens": tokens})
    return out


def run(job: dict) -> dict:
    if job["mode"] == "plain_logits":
        return plain_logits(job)
    if job["mode"] == "token_losses":
        return token_losses(job)
    t = make_trainer(job)
    mode = job["mode"]
    if job.get("log_alpha_seed") is not None:
        set_random_log_alpha(t, job["log_alpha_seed"])
    if job.get("save_init"):
        checkpointing.save_model_checkpoint(t.model, t.model_cfg, job["save_init"])
    if mode == "grads":
        captured = {}
        base = t.after_backward

        def capture():
            captured["z"] = t.gather_full(lambda bank, kind: bank.z[kind].detach())
            stats = base()
            captured["grad"] = t.gather_full(
                lambda bank, kind: bank.log_alpha(kind).main_grad.detach()
            )
            return stats

        t.after_backward = capture
        t.train_step()
        return captured
    if mode == "ones":
        batch = SyntheticBatches(
            t.model_cfg.vocab_size, t.model_cfg.seq_length, 5
        ).next_global_batch(8)
        ones = {k: torch.ones_like(v) for k, v in t.gather_log_alpha().items()}
        for bank in t.banks:
            bank.set_masks(bank.local_slices(ones))
        masked = t.reduce_loss(t.run_schedule_eval(batch))
        for bank in t.banks:
            bank.set_masks(None)
        plain = t.reduce_loss(t.run_schedule_eval(batch))
        return {"masked": masked, "plain": plain}
    if mode == "logits":
        if job.get("tokens") is not None:
            batch = {"tokens": job["tokens"]}
        else:
            batch = SyntheticBatches(
                t.model_cfg.vocab_size, t.model_cfg.seq_length, 5
            ).next_global_batch(4)
        if job.get("save_masked"):
            checkpointing.save_model_checkpoint(
                t.model, t.model_cfg, job["save_masked"], extra_meta=t.extra_meta()
            )
        masks = t.use_deterministic_masks(t.target_sizes())
        logits = t.gather_logits(batch)
        return {"logits": logits, "masks": masks, "log_alpha": t.gather_log_alpha()}
    if mode == "train":
        from megashear import platform

        history = [t.train_step() for _ in range(job["steps"])]
        return {"history": history, "cpu_patches": platform.applied_patches()}
    if mode == "save":
        t.train_step()
        path = t.save()
        return {
            "log_alpha": t.gather_log_alpha(),
            "path": path,
            "lambda": t.lagrangian.lambda_values(),
        }
    if mode == "reload":
        return {
            "log_alpha": t.gather_log_alpha(),
            "iteration": t.iteration,
            "lambda": t.lagrangian.lambda_values(),
        }
    if mode == "sharding":
        out = {}
        for chunk in t.model:
            sd = chunk.module.mask_bank.sharded_state_dict(prefix="mask_bank.")
            for key, st in sd.items():
                out[key] = {
                    "global_shape": tuple(st.global_shape),
                    "local_shape": tuple(st.local_shape),
                    "axis_fragmentations": tuple(st.axis_fragmentations),
                }
        return out
    raise ValueError(f"unknown mode {mode}")


def main() -> None:
    plan = torch.load(sys.argv[1], weights_only=False)
    results = {}
    for job in plan:
        results[job["name"]] = run(job)
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
