"""Sequence parallelism (``parallel.sequence_parallel``) on CPU: the numbers of TP1PP1.

At TP2 and TP2 × PP2 with sequence parallelism, training, pruning with all six mask kinds and
KD (a target-shaped student, alpha 0.5, T 2) give TP1PP1's losses over two optimizer steps and
its first step's gradients (every weight's, every log α's, made whole through a
layout-independent checkpoint) to 1e-5. Those gradients are only whole if the parameters that
act on the sequence-split ``[s/tp, b, h]`` activations (norm weights, the ``hidden``,
``head_layer``, ``mlp`` and ``layer`` log α) are summed over TP; a control run without the log
α's marks shows the comparison catches it. The importance pass gives TP1PP1's scores too.
TP1PP1 runs in one plain process, both layouts in one 4-rank torchrun launch (TP2 at DP2).

This file is also the torchrun worker (``python -m torch.distributed.run ... THIS PLAN OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the worker runs with tests/ as sys.path[0]
    sys.path.insert(0, str(ROOT))

from tests.test_recompute import ALL_KINDS, MODEL, TARGET  # noqa: E402

STEPS = 2
TOL = 1e-5
LAYOUTS = {"tp2": dict(tp=2), "tp2pp2": dict(tp=2, pp=2)}
JOBS = ("train", "prune", "kd")


# ---------------------------------------------------------------------------- worker side


def run_job(job: dict) -> dict:
    import dataclasses

    from megashear.checkpoint.model_state import save_model_checkpoint
    from megashear.config import (
        CheckpointConfig,
        DistillConfig,
        ParallelConfig,
        PruningConfig,
        TrainConfig,
    )
    from megashear.model_config import ModelConfig
    from megashear.training.batches import SyntheticBatches
    from megashear.training.pruning_trainer import PruningTrainer
    from megashear.training.trainer import Trainer
    from tests.distill_worker import _save_grads

    cfg = ModelConfig(**MODEL)
    student = dataclasses.replace(cfg, **TARGET, kv_channels=cfg.head_dim)
    sp = job.get("tp", 1) > 1
    par = ParallelConfig(tp=job.get("tp", 1), pp=job.get("pp", 1), sequence_parallel=sp)
    train = TrainConfig(
        micro_batch_size=2, global_batch_size=4, train_iters=STEPS, lr=1e-3, lr_warmup_iters=0
    )
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7)
    # initial weights from TP1PP1 (random init differs between pipeline layouts)
    init = CheckpointConfig(init=job["init"].format(model="student" if job["job"] == "kd" else
                                                    "source"))  # fmt: skip
    out: dict = {}
    if job["job"] == "init":  # the KD teacher is the source model's initial weights
        for name, shape in (("source", cfg), ("student", student)):
            trainer = Trainer(shape, par, train, batches)
            save_model_checkpoint(trainer.model, shape, job["init"].format(model=name))
        return out
    if job["job"] in ("prune", "prune_unmarked"):
        from tests.prune_worker import set_random_log_alpha

        pcfg = PruningConfig(kinds=ALL_KINDS, lagrangian_warmup_steps=1, lr_log_alpha=0.1)
        target = dataclasses.replace(cfg, **TARGET)
        trainer = PruningTrainer(cfg, target, pcfg, par, train, batches, init)
        set_random_log_alpha(trainer, 5)  # log α ~ N(1, 2²), the same on every layout
        if job["job"] == "prune_unmarked":  # the control: no TP sum of the log α gradients
            for p in trainer.banks[0].parameters():
                p.__dict__.pop("sequence_parallel", None)
    elif job["job"] == "kd":
        teacher = job["init"].format(model="source")
        distill = DistillConfig(teacher=teacher, alpha=0.5, temperature=2.0)
        trainer = Trainer(student, par, train, batches, init, distill=distill)
    else:
        from megashear.training.importance_pass import calibrate

        trainer = Trainer(cfg, par, train, batches, init)
        calibration = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 11).next_global_batch(4)
        out["importance"] = calibrate(trainer, calibration)
    assert trainer.tconfig.sequence_parallel == sp
    after_backward = trainer.after_backward

    def record_then_continue():
        stats = after_backward()  # the pruning run adds the Lagrangian's gradient here
        if trainer.iteration == 0:
            _save_grads(trainer, job["grads"])
        return stats

    trainer.after_backward = record_then_continue
    keys = ("loss", "grad_norm", "lagrangian", "lm_loss", "kd_loss")
    import time

    start = time.perf_counter()
    out["steps"] = [
        {k: v for k, v in trainer.train_step().items() if k in keys} for _ in range(STEPS)
    ]
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from tests.launch import torchrun

    root = tmp_path_factory.mktemp("sequence_parallel")
    init = str(root / "init_{model}")

    def plan(layout: str, fields: dict) -> list[dict]:
        return [
            {"name": f"{job}_{layout}", "job": job, "init": init,
             "grads": str(root / f"grads_{job}_{layout}"), **fields}
            for job in JOBS
        ]  # fmt: skip

    one = [{"name": "init", "job": "init", "init": init}, *plan("tp1pp1", {})]
    out = torchrun(1, one, root, worker=Path(__file__), timeout=300, launcher=False)
    # one launch for both layouts: TP2 (× DP2) and TP2 × PP2
    four = [job for layout, fields in LAYOUTS.items() for job in plan(layout, fields)]
    four.append({"name": "prune_unmarked", "job": "prune_unmarked", "init": init,
                 "grads": str(root / "grads_prune_unmarked"), **LAYOUTS["tp2"]})  # fmt: skip
    out.update(torchrun(4, four, root, worker=Path(__file__), timeout=400))
    out["_dir"] = root
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("job", JOBS)
def test_sequence_parallel_matches_tp1pp1(runs, job, layout):
    from tests.test_distill import _grads

    got, want = runs[f"{job}_{layout}"]["steps"], runs[f"{job}_tp1pp1"]["steps"]
    assert got[0].keys() == want[0].keys()
    for key in want[0]:
        np.testing.assert_allclose(
            [s[key] for s in got], [s[key] for s in want], rtol=TOL, atol=TOL, err_msg=key
        )
    d = runs["_dir"]
    have, ref = _grads(d / f"grads_{job}_{layout}"), _grads(d / f"grads_{job}_tp1pp1")
    assert set(have) == set(ref)
    if job == "prune":
        assert {k.rsplit(".", 1)[-1] for k in ref if "log_alpha" in k} == {
            f"{kind}_log_alpha" for kind in ALL_KINDS
        }
    for name, g in ref.items():
        assert g.abs().max() > 0, name
        scale = g.abs().max().item()
        torch.testing.assert_close(have[name], g, rtol=TOL, atol=TOL * scale, msg=name)


def test_the_comparison_catches_log_alpha_gradients_not_summed_over_tp(runs):
    from tests.test_distill import _grads

    d = runs["_dir"]
    have, ref = _grads(d / "grads_prune_unmarked"), _grads(d / "grads_prune_tp1pp1")
    wrong = set()
    for name, g in ref.items():
        if (have[name] - g).abs().max() > 1e-3 * g.abs().max():
            wrong.add(name.rsplit(".", 1)[-1])
    assert wrong == {f"{kind}_log_alpha" for kind in ("hidden", "head_layer", "mlp", "layer")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_importance_scores_under_sequence_parallelism(runs, layout):
    got, want = runs[f"train_{layout}"]["importance"], runs["train_tp1pp1"]["importance"]
    assert got.keys() == want.keys()
    for kind, value in want.items():
        torch.testing.assert_close(got[kind], value, rtol=TOL, atol=TOL, msg=kind)


if __name__ == "__main__":  # a torchrun worker: tests/ is sys.path[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.launch import serve_plan

    serve_plan(run_job)
