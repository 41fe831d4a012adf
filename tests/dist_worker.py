"""Runs a list of training jobs under torchrun; the tests compare what rank 0 writes.

Usage: ``torchrun --standalone --nproc_per_node N tests/dist_worker.py PLAN.pt OUT.pt``

PLAN is a list of jobs, run one after the other in the same process group::

    {"name": str, "model": preset, "tp": int, "pp": int, "vpp": int|null, "steps": int,
     "init": dir|null (model-only checkpoint to start from), "load": dir|null (full resume),
     "save": dir|null, "save_at": int|null, "save_init": dir|null (save the initial weights),
     "crash_in_save": bool}

OUT maps each job name to its per-step losses (or its error message).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megashear.checkpoint import model_state as checkpointing
from megashear.config import CheckpointConfig, ParallelConfig, TrainConfig
from megashear.model_config import get_preset
from megashear.training.batches import SyntheticBatches
from megashear.training.trainer import Trainer


def run_dynamic_loading(job: dict) -> dict:
    """Train with dynamic batch loading; every rank's weights after each update, gathered."""
    import dataclasses

    from megashear.data.loader import DomainBatches, validation_batches
    from megashear.data.manifest import load_manifest
    from megashear.training.dynamic_loading import DynamicBatchLoading

    manifest = load_manifest(job["manifest"])
    cfg = dataclasses.replace(get_preset(job["model"]), vocab_size=manifest.vocab_size)
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1))
    train = TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=job["steps"])
    cache = job["manifest"] + ".index_cache"  # every rank races to publish it: must be safe
    batches = DomainBatches(manifest, cfg.seq_length, seed=5, cache_dir=cache)
    trainer = Trainer(cfg, par, train, batches)
    if job.get("save_init"):
        checkpointing.save_model_checkpoint(trainer.model, cfg, job["save_init"])
    if job.get("init"):
        checkpointing.load_model_weights(trainer.model, cfg, job["init"])
    valid = validation_batches(manifest, cfg.seq_length, 4, cache)
    dbl = DynamicBatchLoading(batches, valid, job["reference"], "paper", interval=2)
    updates = []
    while trainer.iteration < job["steps"]:
        stats = trainer.train_step()
        if trainer.iteration % 2 == 0:
            record = dbl.update(trainer)
            mine = torch.tensor(batches.sampler.weights)
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            updates.append(
                {
                    "losses": record["losses"],
                    "weights": torch.stack(every),
                    "train_loss": stats["loss"],
                }
            )
    return {"updates": updates}


def run_job(job: dict):
    if job.get("mode") == "dynamic_loading":
        return run_dynamic_loading(job)
    cfg = get_preset(job["model"])
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1), vpp=job.get("vpp"))
    train = TrainConfig(
        micro_batch_size=2,
        global_batch_size=8,
        train_iters=job["steps"],
        lr=1e-3,
        lr_warmup_iters=1,
    )
    ckpt = CheckpointConfig(save=job.get("save"), load=job.get("load"), keep_last=3)
    trainer = Trainer(cfg, par, train, SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7), ckpt)
    if job.get("save_init"):
        checkpointing.save_model_checkpoint(trainer.model, cfg, job["save_init"])
    if job.get("init"):
        checkpointing.load_model_weights(trainer.model, cfg, job["init"])
    losses = []
    while trainer.iteration < job["steps"]:
        losses.append(trainer.train_step()["loss"])
        if job.get("save_at") == trainer.iteration:
            trainer.save()
    if job.get("crash_in_save"):
        from megatron.core import dist_checkpointing

        def broken_save(state, directory, *args, **kwargs):
            with open(f"{directory}/partial.distcp", "w") as f:
                f.write("half")
            raise OSError("simulated crash inside the save")

        real = dist_checkpointing.save
        dist_checkpointing.save = broken_save
        try:
            trainer.save()
        except OSError:
            pass
        finally:
            dist_checkpointing.save = real
    return losses


def main() -> None:
    plan_path, out_path = sys.argv[1], sys.argv[2]
    plan = torch.load(plan_path, weights_only=False)
    results = {}
    for job in plan:
        try:
            results[job["name"]] = run_job(job)
        except Exception as exc:  # reported to the test, which decides
            results[job["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            if job.get("expect_error") is None:
                raise
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
