"""Activation recomputation (``parallel.recompute_*``) changes nothing but memory.

With selective (core attention) and full (uniform and block) recomputation, the losses and every
gradient (the weights' ``main_grad`` and, when pruning, the log α's, Lagrangian included) equal
the run without it to 1e-6, over two optimizer steps, training and pruning with all six mask
kinds, at TP1, TP2 and PP2, and (TP1) distilling from a teacher. The masks are sampled once per micro-batch before the forward and held as tensors, so
the recomputed forward reads the same ``z``; the control run shows the comparison would catch a
recomputation that saw other noise than the first forward (the test fails then).

This file is also the torchrun worker (``python -m torch.distributed.run ... THIS PLAN OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODEL = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=160,
    vocab_size=256,
    seq_length=32,
)
TARGET = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=80)
ALL_KINDS = ("hidden", "head", "head_layer", "intermediate", "mlp", "layer")
STEPS = 2
TOL = 1e-6
RECOMPUTE = {
    "selective": ("selective", None, None),
    "full_uniform": ("full", "uniform", 1),
    "full_uniform_2": ("full", "uniform", 2),
    "full_block": ("full", "block", 1),
}


# ---------------------------------------------------------------------------- worker side


def _redraw_in_the_recomputation() -> None:
    """The control: masks read during the backward (the recomputation of a checkpointed
    region) come from other noise than the masks the forward read."""
    import torch

    from megashear.models import masked

    sample = masked.MaskBank.sample
    value = masked.MaskBank.value

    def sample_twice(self, iteration: int, microbatch: int) -> None:
        sample(self, iteration, microbatch + 1000)
        other = self.z
        sample(self, iteration, microbatch)
        self.__dict__["_other_z"] = other

    def value_by_pass(self, kind, local_layer=None):
        in_backward = torch._C._current_graph_task_id() != -1
        if not in_backward or self.__dict__.get("_other_z") is None:
            return value(self, kind, local_layer)
        z = self.z
        self.z = self.__dict__["_other_z"]
        try:
            return value(self, kind, local_layer)
        finally:
            self.z = z

    masked.MaskBank.sample = sample_twice
    masked.MaskBank.value = value_by_pass


def run_job(job: dict) -> dict:
    import dataclasses

    from megashear.config import ParallelConfig, PruningConfig, TrainConfig
    from megashear.model_config import ModelConfig
    from megashear.training.batches import SyntheticBatches

    if job.get("control"):
        _redraw_in_the_recomputation()
    gran, method, n = RECOMPUTE.get(job["recompute"], ("none", None, None))
    cfg = ModelConfig(**MODEL)
    par = ParallelConfig(
        tp=job.get("tp", 1),
        pp=job.get("pp", 1),
        recompute_granularity=gran,
        recompute_method=method,
        recompute_num_layers=n,
    )
    train = TrainConfig(
        micro_batch_size=2, global_batch_size=4, train_iters=STEPS, lr=1e-3, lr_warmup_iters=0
    )
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7)
    if job["job"] == "prune":
        from megashear.training.pruning_trainer import PruningTrainer

        pcfg = PruningConfig(kinds=ALL_KINDS, lagrangian_warmup_steps=1, lr_log_alpha=0.1)
        target = dataclasses.replace(cfg, **TARGET)
        trainer = PruningTrainer(cfg, target, pcfg, par, train, batches)
    elif job["job"] in ("kd", "save_teacher"):
        from megashear.config import DistillConfig
        from megashear.training.trainer import Trainer

        if job["job"] == "save_teacher":
            from megashear.checkpoint.model_state import save_model_checkpoint

            trainer = Trainer(cfg, ParallelConfig(), train, batches)
            save_model_checkpoint(trainer.model, cfg, job["dir"])
            return {}
        student = dataclasses.replace(cfg, **TARGET, kv_channels=cfg.head_dim)
        distill = DistillConfig(teacher=job["teacher"], alpha=0.5, temperature=2.0)
        trainer = Trainer(student, par, train, batches, distill=distill)
    else:
        from megashear.training.trainer import Trainer

        trainer = Trainer(cfg, par, train, batches)
    assert (trainer.tconfig.recompute_granularity or "none") == gran
    if job.get("no_restore"):  # the control: recompute with whatever masks are current
        from megashear.training import trainer as trainer_module

        trainer_module._RECOMPUTE_STATES.clear()
    grads: list[dict] = []
    after_backward = trainer.after_backward

    def record_then_continue():
        out = after_backward()  # the pruning run adds the Lagrangian's gradient here
        grads.append(
            {
                name: p.main_grad.detach().clone()
                for chunk in trainer.model
                for name, p in chunk.module.named_parameters()
            }
        )
        return out

    trainer.after_backward = record_then_continue
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    return {"losses": losses, "grads": grads, "checkpointed": _checkpoint_calls(trainer)}


def _checkpoint_calls(trainer) -> bool:
    """Whether megatron's ``tensor_parallel.checkpoint`` is really in use (its layers or its
    core attention say so)."""
    layers = [layer for chunk in trainer.model for layer in chunk.module.decoder.layers]
    attn = [layer.self_attention for layer in layers]
    selective = any(getattr(a, "checkpoint_core_attention", False) for a in attn)
    return selective or trainer.tconfig.recompute_granularity == "full"


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from tests.launch import torchrun

    plan = [
        {"name": f"{job}_{rc}", "job": job, "recompute": rc}
        for job in ("train", "prune")
        for rc in ("none", *RECOMPUTE)
    ]
    plan.append({"name": "prune_control", "job": "prune", "recompute": "full_uniform",
                 "control": True})  # fmt: skip
    root = tmp_path_factory.mktemp("recompute")
    teacher = str(root / "teacher")
    plan.append({"name": "teacher", "job": "save_teacher", "recompute": "none", "dir": teacher})
    plan += [
        {"name": f"kd_{rc}", "job": "kd", "recompute": rc, "teacher": teacher}
        for rc in ("none", "full_uniform", "selective")
    ]
    out = torchrun(1, plan, root, worker=Path(__file__), timeout=600)
    parallel = [
        {"name": f"{job}_{name}_{rc}", "job": job, "recompute": rc, **layout}
        for job in ("train", "prune")
        for name, layout in (("tp2", {"tp": 2}), ("pp2", {"pp": 2}))
        for rc in ("none", "full_uniform", "selective")
    ]
    parallel.append({"name": "prune_pp2_no_restore", "job": "prune", "pp": 2,
                     "recompute": "full_uniform", "no_restore": True})  # fmt: skip
    out.update(torchrun(2, parallel, root / "two", worker=Path(__file__), timeout=600))
    return out


def _differences(got: dict, want: dict) -> list[str]:
    bad = [
        f"loss {i}: {a} != {b}"
        for i, (a, b) in enumerate(zip(got["losses"], want["losses"]))
        if abs(a - b) > TOL
    ]
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert g.keys() == w.keys()
        for name in w:
            diff = float((g[name] - w[name]).abs().max())
            if diff > TOL:
                bad.append(f"step {step} {name}: {diff:.3g}")
    return bad


@pytest.mark.parametrize("job", ["train", "prune"])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_recomputation_changes_no_loss_and_no_gradient(runs, job, recompute):
    got, want = runs[f"{job}_{recompute}"], runs[f"{job}_none"]
    assert got["checkpointed"] and not want["checkpointed"]
    assert len(got["grads"]) == STEPS
    if job == "prune":
        assert any(k.endswith("log_alpha") for k in got["grads"][0])
    assert not _differences(got, want)


@pytest.mark.parametrize("recompute", ["full_uniform", "selective"])
def test_recomputation_changes_nothing_under_distillation(runs, recompute):
    got, want = runs[f"kd_{recompute}"], runs["kd_none"]
    assert got["checkpointed"] and not want["checkpointed"]
    assert not _differences(got, want)


@pytest.mark.parametrize("job", ["train", "prune"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("recompute", ["full_uniform", "selective"])
def test_recomputation_changes_nothing_under_tp_and_pp(runs, job, layout, recompute):
    """Rank 0's gradients (TP rank 0; the first pipeline stage) and the losses."""
    got, want = runs[f"{job}_{layout}_{recompute}"], runs[f"{job}_{layout}_none"]
    assert got["checkpointed"] and not want["checkpointed"]
    assert not _differences(got, want)


def test_the_comparison_catches_noise_redrawn_in_the_recomputation(runs):
    bad = _differences(runs["prune_control"], runs["prune_none"])
    assert bad, "a recomputation with other noise went unnoticed"
    # under 1F1B the first stage runs the second micro-batch's forward (and samples its
    # masks) before the first one's backward: without restoring the forward's masks, the
    # recomputation reads the second micro-batch's
    bad = _differences(runs["prune_pp2_no_restore"], runs["prune_pp2_none"])
    assert bad, "a recomputation with the next micro-batch's masks went unnoticed"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(recompute_method="uniform"), "needs parallel.recompute_granularity=full"),
        (
            dict(recompute_granularity="selective", recompute_num_layers=2),
            "needs parallel.recompute_granularity=full",
        ),
        (dict(recompute_granularity="full"), "must be uniform or block"),
        (dict(recompute_granularity="full", recompute_method="block"), "must be at least 1"),
        (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=9),
            "exceeds the 4 layers",
        ),
    ],
)
def test_contradictory_recompute_settings_are_one_line(fields, message):
    from megashear.config import ParallelConfig, RunConfig
    from megashear.config_checks import check_run_config
    from megashear.config_io import ConfigError
    from megashear.model_config import ModelConfig

    cfg = RunConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(**fields))
    with pytest.raises(ConfigError) as err:
        check_run_config(cfg, "prune", cuda=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_recompute_flags_reach_the_command_line():
    from tests.launch import megashear_cli

    proc = megashear_cli(
        "train", "--model_preset=tiny-gqa", "--parallel.recompute_method=block", timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'parallel.recomp")


if __name__ == "__main__":  # a torchrun worker: tests/ is sys.path[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.launch import serve_plan

    serve_plan(run_job)
