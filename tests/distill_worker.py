"""Runs distillation jobs under torchrun; the tests compare what rank 0 writes.

Usage: ``torchrun --standalone --nproc_per_node N tests/distill_worker.py PLAN.pt OUT.pt``

PLAN is a list of jobs, run one after the other in the same process group::

    {"name": str, "mode": "save_model" | "train" | "kd_unit",
     "model": ModelConfig dict, "tp": int, "pp": int, "vpp": int|null, "steps": int,
     "teacher": dir|null, "alpha": float, "temperature": float, "top_k": int|null,
     "init": dir|null, "save_dir": dir (save_model), "sharpen": float (save_model),
     "grads": dir|null (the first step's gradients, saved as a model checkpoint),
     "save": dir|null, "save_at": int|null, "load": dir|null}

OUT maps each job name to its result (per-step stats, or an error message).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megashear.checkpoint import model_state as checkpointing
from megashear.config import CheckpointConfig, DistillConfig, ParallelConfig, TrainConfig
from megashear.model_config import ModelConfig
from megashear.training.batches import SyntheticBatches
from megashear.training.trainer import Trainer


def _train_config(steps: int) -> TrainConfig:
    return TrainConfig(
        micro_batch_size=2, global_batch_size=8, train_iters=steps, lr=1e-3, lr_warmup_iters=1
    )


def _trainer(job: dict) -> Trainer:
    cfg = ModelConfig.from_dict(job["model"])
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1), vpp=job.get("vpp"))
    distill = None
    if job.get("teacher"):
        distill = DistillConfig(
            teacher=job["teacher"],
            alpha=job.get("alpha", 1.0),
            temperature=job.get("temperature", 1.0),
            top_k=job.get("top_k"),
        )
    ckpt = CheckpointConfig(save=job.get("save"), load=job.get("load"), keep_last=3)
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7)
    return Trainer(cfg, par, _train_config(job.get("steps", 1)), batches, ckpt, distill=distill)


def save_model(job: dict) -> dict:
    """Random weights at any layout, the output layer scaled by ``sharpen`` (peaked logits)."""
    trainer = _trainer(job)
    with torch.no_grad():
        for chunk in trainer.model:
            for name, p in chunk.module.named_parameters():
                if name.endswith("output_layer.weight") or (
                    trainer.model_cfg.tie_word_embeddings and "word_embeddings" in name
                ):
                    p.mul_(job.get("sharpen", 1.0))
    checkpointing.save_model_checkpoint(trainer.model, trainer.model_cfg, job["save_dir"])
    return {}


def _save_grads(trainer: Trainer, directory: str) -> None:
    """The step's reduced gradients (``main_grad``) as a layout-independent model checkpoint."""
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    kept = [p.data.clone() for p in params]
    for p in params:
        p.data.copy_(p.main_grad)
    checkpointing.save_model_checkpoint(trainer.model, trainer.model_cfg, directory)
    for p, data in zip(params, kept):
        p.data.copy_(data)


def train(job: dict) -> dict:
    trainer = _trainer(job)
    if job.get("init"):
        checkpointing.load_model_weights(trainer.model, trainer.model_cfg, job["init"])
    if job.get("grads"):
        plain_after_backward = trainer.after_backward

        def after_backward():
            if trainer.iteration == 0:
                _save_grads(trainer, job["grads"])
            return plain_after_backward()

        trainer.after_backward = after_backward
    steps = []
    while trainer.iteration < job["steps"]:
        stats = trainer.train_step()
        steps.append(
            {k: stats[k] for k in ("loss", "lm_loss", "kd_loss", "grad_norm") if k in stats}
        )
        if job.get("save_at") == trainer.iteration:
            trainer.save()
    return {"steps": steps, "meta_distill": trainer.extra_meta().get("distill")}


def prune(job: dict) -> dict:
    """Pruning with distillation toward ``job["target"]`` (ModelConfig overrides); with
    ``finalize``, the saved pruning checkpoint finalised into that directory afterwards."""
    import dataclasses

    from megashear.config import PruningConfig
    from megashear.jobs.finalize import finalize_checkpoint
    from megashear.training.pruning_trainer import PruningTrainer

    cfg = ModelConfig.from_dict(job["model"])
    target = dataclasses.replace(cfg, **job["target"])
    pcfg = PruningConfig(lagrangian_warmup_steps=2, lr_log_alpha=0.1)
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1))
    distill = DistillConfig(teacher=job["teacher"], alpha=job["alpha"])
    ckpt = CheckpointConfig(save=job.get("save"))
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 3)
    train = _train_config(job["steps"])
    trainer = PruningTrainer(cfg, target, pcfg, par, train, batches, ckpt, distill=distill)
    checkpointing.load_model_weights(trainer.model, cfg, job["init"])
    steps = []
    while trainer.iteration < job["steps"]:
        stats = trainer.train_step()
        steps.append({k: stats[k] for k in ("loss", "lm_loss", "kd_loss", "grad_norm")})
    out = {"steps": steps}
    if job.get("save"):
        trainer.save()
    if job.get("finalize"):
        final = finalize_checkpoint(job["save"], job["finalize"])
        out["final"] = final.to_dict()
    return out


def kd_unit(job: dict) -> dict:
    """Properties of the KD loss on random TP-sharded logits ``[s, b, v/tp]``."""
    from megatron.core import parallel_state as ps

    from megashear.parallel import init_model_parallel
    from megashear.training.kd_loss import vocab_parallel_kd_loss

    cfg = ModelConfig.from_dict(job["model"])
    init_model_parallel(cfg, ParallelConfig(tp=job["tp"]))
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    vocab = job["vocab"]
    gen = torch.Generator().manual_seed(3)
    student_full = torch.randn(5, 2, vocab, generator=gen) * 3  # [s, b, v]
    teacher_full = torch.randn(5, 2, vocab, generator=gen) * 3
    width = vocab // tp
    out = {}

    def run(student_src, teacher_src, top_k, temperature=1.0, vocab_size=None):
        student = student_src[..., rank * width : (rank + 1) * width].clone().requires_grad_()
        teacher = teacher_src[..., rank * width : (rank + 1) * width]
        loss = vocab_parallel_kd_loss(student, teacher, temperature, top_k, vocab_size)  # [s, b]
        loss.sum().backward()
        grads = [torch.empty_like(student.grad) for _ in range(tp)]
        dist.all_gather(grads, student.grad, group=ps.get_tensor_model_parallel_group())
        return loss.detach(), torch.cat(grads, dim=-1)

    out["self"] = run(student_full, student_full, None)
    out["full"] = run(student_full, teacher_full, None, job.get("temperature", 1.0))
    out["top_vocab"] = run(student_full, teacher_full, vocab, job.get("temperature", 1.0))
    out["top_k"] = run(student_full, teacher_full, job["top_k"])
    # the last rows padded (-inf in both models, as the output layer's hook writes them)
    real = job["padded_vocab"]
    pad = torch.full((5, 2, vocab - real), float("-inf"))
    padded = [torch.cat([x[..., :real], pad], -1) for x in (student_full, teacher_full)]
    out["padded"] = run(*padded, None, 1.0, real)
    out["padded_top_k"] = run(*padded, job["top_k"], 1.0, real)
    out["inputs"] = (student_full, teacher_full)
    return out


def main() -> None:
    plan_path, out_path = sys.argv[1], sys.argv[2]
    plan = torch.load(plan_path, weights_only=False)
    results = {}
    modes = {"save_model": save_model, "train": train, "prune": prune, "kd_unit": kd_unit}
    for job in plan:
        try:
            results[job["name"]] = modes[job.get("mode", "train")](job)
        except Exception as exc:  # reported to the test, which decides
            results[job["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            if not job.get("expect_error"):
                raise
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
