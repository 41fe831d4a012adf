"""megatron-core's distributed optimizer (ZeRO-1 over DP) for train and prune, on CPU with gloo.

- Its loss and gradient-norm histories equal the plain optimizer's to 1e-5 at DP2, TP2 x DP2
  and PP2 x DP2, for training and for pruning, and at DP2 for KD (KD and LM losses too) (there also λ, the Lagrangian, the expected sparsities and the final
  log α, which has its own LR and no weight decay).
- A checkpoint saved at DP2 with the distributed optimizer continues at DP1 with the plain one,
  and a DP1 plain checkpoint continues at DP2 with the distributed one, with the losses of the
  uninterrupted run; resumed as it was saved, the run is bit-exact. With bf16 weights (on CPU:
  megatron's bf16 optimizer, whose own checkpoint save fails with fp32 parameters such as the CPU
  norms' or log α, see ``_float16_sharded_state_dict``) checkpoints move between the two
  optimizers too.

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
KINDS = ("head", "intermediate", "layer", "hidden")
STEPS, SAVE_AT = 4, 2
LR_LOG_ALPHA = 0.05
TOL = 1e-5


# ---------------------------------------------------------------------------- worker side


def make_trainer(job: dict):
    import dataclasses

    from megashear.config import CheckpointConfig, ParallelConfig, PruningConfig, TrainConfig
    from megashear.model_config import ModelConfig
    from megashear.training.batches import SyntheticBatches

    cfg = ModelConfig(**MODEL)
    par = ParallelConfig(
        tp=job.get("tp", 1), pp=job.get("pp", 1), use_distributed_optimizer=job["distopt"]
    )
    train = TrainConfig(
        micro_batch_size=2,
        global_batch_size=8,
        train_iters=STEPS,
        lr=1e-3,
        lr_warmup_iters=1,
        weight_decay=0.1,
        bf16=job.get("bf16", False),
    )
    ckpt = CheckpointConfig(save=job.get("save"), load=job.get("load"), keep_last=0)
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7)
    if job["job"] == "kd":  # the target-shaped student distils from the source's weights
        from megashear.config import DistillConfig
        from megashear.training.trainer import Trainer

        student = dataclasses.replace(cfg, **TARGET, kv_channels=cfg.head_dim)
        distill = DistillConfig(teacher=job["teacher"], alpha=0.5, temperature=2.0)
        return Trainer(student, par, train, batches, ckpt, distill=distill)
    if job["job"] == "prune":
        from megashear.training.pruning_trainer import PruningTrainer

        pcfg = PruningConfig(kinds=KINDS, lagrangian_warmup_steps=2, lr_log_alpha=LR_LOG_ALPHA)
        target = dataclasses.replace(cfg, **TARGET)
        return PruningTrainer(cfg, target, pcfg, par, train, batches, ckpt)
    from megashear.training.trainer import Trainer

    return Trainer(cfg, par, train, batches, ckpt)


def log_alpha_groups(trainer) -> list[dict]:
    """(lr, weight decay) of the optimizer groups that hold log α, from megatron's own map of
    model parameters to groups (the distributed optimizer's groups hold shards)."""
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    mask_ids = {id(p) for p in params if hasattr(p, "mask_kind")}
    out = []
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        index_map = getattr(opt, "model_param_group_index_map", None)
        for gi, group in enumerate(opt.param_groups):
            if index_map is not None:
                holds = any(id(p) in mask_ids and g == gi for p, (g, _) in index_map.items())
            else:
                holds = any(id(p) in mask_ids for p in group["params"])
            if holds:
                out.append({"lr": group["lr"], "weight_decay": group["weight_decay"]})
    return out


def run_job(job: dict) -> dict:
    if job["job"] == "save_teacher":
        from megashear.checkpoint.model_state import save_model_checkpoint

        trainer = make_trainer({**job, "job": "train"})
        save_model_checkpoint(trainer.model, trainer.model_cfg, job["dir"])
        return {}
    trainer = make_trainer(job)
    history = []
    while trainer.iteration < job.get("steps", STEPS):
        stats = trainer.train_step()
        entry = {
            "iteration": trainer.iteration,
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
        }
        for key, value in stats.items():
            if key.startswith(("lagrangian", "expected_sparsity/", "lambda/", "kd_", "lm_")):
                entry[key] = value
        if job["job"] == "prune":
            entry["log_alpha_groups"] = log_alpha_groups(trainer)
        history.append(entry)
        if job.get("save_at") == trainer.iteration:
            trainer.save()
    out = {"history": history}
    if job["job"] == "prune":
        out["log_alpha"] = {k: v.clone() for k, v in trainer.gather_log_alpha().items()}
    return out


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every job of the module, in three launches: DP2 (plain, distributed, saves), DP1
    (resumes the distributed save with the plain optimizer; saves), DP2 (resumes the DP1
    save with the distributed optimizer, and the DP2 save as it was saved)."""
    from tests.launch import torchrun

    root = tmp_path_factory.mktemp("distopt")
    me = Path(__file__)
    first, second, third = [], [], []
    for job in ("train", "prune"):
        first += [
            {"name": f"{job}_plain", "job": job, "distopt": False},
            {
                "name": f"{job}_dist",
                "job": job,
                "distopt": True,
                "save": str(root / f"{job}_dist"),
                "save_at": SAVE_AT,
            },
        ]
        second += [
            {"name": f"{job}_dist_to_plain", "job": job, "distopt": False,
             "load": str(root / f"{job}_dist")},
            {"name": f"{job}_plain_dp1", "job": job, "distopt": False,
             "save": str(root / f"{job}_dp1"), "save_at": SAVE_AT},
            {"name": f"{job}_dist_to_dist_dp1", "job": job, "distopt": True,
             "load": str(root / f"{job}_dist")},
        ]  # fmt: skip
        third += [
            {"name": f"{job}_plain_to_dist", "job": job, "distopt": True,
             "load": str(root / f"{job}_dp1")},
            {"name": f"{job}_dist_resumed", "job": job, "distopt": True,
             "load": str(root / f"{job}_dist")},
        ]  # fmt: skip
    # bf16 weights: fp32 masters, and fp32 weights besides (the torch norms' on CPU)
    for job in ("train",):
        for kind in ("plain", "dist"):
            first.append({"name": f"{job}_bf16_{kind}", "job": job, "bf16": True,
                          "distopt": kind == "dist", "save": str(root / f"{job}_bf16_{kind}"),
                          "save_at": SAVE_AT})  # fmt: skip
            other = "plain" if kind == "dist" else "dist"
            third.append({"name": f"{job}_bf16_{kind}_to_{other}", "job": job, "bf16": True,
                          "distopt": other == "dist", "load": str(root / f"{job}_bf16_{kind}")})  # fmt: skip
    teacher = str(root / "teacher")
    first += [
        {"name": "teacher", "job": "save_teacher", "distopt": False, "dir": teacher},
        {"name": "kd_plain", "job": "kd", "distopt": False, "teacher": teacher},
        {"name": "kd_dist", "job": "kd", "distopt": True, "teacher": teacher},
    ]
    out = torchrun(2, first, root / "first", worker=me, timeout=600)
    out.update(torchrun(1, second, root / "second", worker=me, timeout=600))
    out.update(torchrun(2, third, root / "third", worker=me, timeout=600))
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    """TP2 x DP2 and PP2 x DP2, plain and distributed, train and prune: one launch."""
    from tests.launch import torchrun

    plan = [
        {"name": f"{job}_{name}_{kind}", "job": job, "distopt": kind == "dist", **layout}
        for job in ("train", "prune")
        for name, layout in (("tp2", {"tp": 2}), ("pp2", {"pp": 2}))
        for kind in ("plain", "dist")
    ]
    root = tmp_path_factory.mktemp("distopt4")
    return torchrun(4, plan, root, worker=Path(__file__), timeout=600)


def _assert_histories_equal(got: list[dict], want: list[dict], keys=None) -> None:
    assert [e["iteration"] for e in got] == [e["iteration"] for e in want]
    for a, b in zip(got, want):
        for key in keys or [k for k in b if k not in ("iteration", "log_alpha_groups")]:
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), (key, a, b)


@pytest.mark.parametrize("job", ["train", "prune", "kd"])
def test_distributed_optimizer_matches_the_plain_one_at_dp2(runs, job):
    plain, dist = runs[f"{job}_plain"]["history"], runs[f"{job}_dist"]["history"]
    assert len(dist) == STEPS
    _assert_histories_equal(dist, plain)
    losses = [e["loss"] for e in dist]
    assert losses[-1] != losses[0]  # it trains
    if job == "kd":
        assert all(e["kd_loss"] > 0 and e["lm_loss"] > 0 for e in dist)
    if job == "prune":
        assert {k for k in dist[0] if k.startswith("expected_sparsity/")} == {
            f"expected_sparsity/{k}" for k in KINDS
        }
        assert any(abs(v) > 0 for k, v in dist[-1].items() if k.startswith("lambda/"))
        for kind, value in runs["prune_dist"]["log_alpha"].items():
            ref = runs["prune_plain"]["log_alpha"][kind]
            assert (value - ref).abs().max() <= TOL, kind


@pytest.mark.parametrize("job", ["train", "prune"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_distributed_optimizer_matches_the_plain_one_with_model_parallelism(
    four_ranks, job, layout
):
    plain = four_ranks[f"{job}_{layout}_plain"]
    dist = four_ranks[f"{job}_{layout}_dist"]
    _assert_histories_equal(dist["history"], plain["history"])
    for kind, value in dist.get("log_alpha", {}).items():
        assert (value - plain["log_alpha"][kind]).abs().max() <= TOL, kind


def test_log_alpha_keeps_its_own_lr_and_no_weight_decay_under_the_distributed_optimizer(runs):
    for name in ("prune_plain", "prune_dist"):
        for entry in runs[name]["history"]:
            groups = entry["log_alpha_groups"]
            assert groups, name
            assert all(g["weight_decay"] == 0.0 for g in groups), (name, groups)
        # warm-up of one step, then the log α group's LR peaks at lr_log_alpha
        lrs = [g["lr"] for g in runs[name]["history"][0]["log_alpha_groups"]]
        assert all(lr == pytest.approx(LR_LOG_ALPHA) for lr in lrs), (name, lrs)
    assert [e["log_alpha_groups"] for e in runs["prune_dist"]["history"]] == [
        e["log_alpha_groups"] for e in runs["prune_plain"]["history"]
    ]


@pytest.mark.parametrize("job", ["train", "prune"])
def test_checkpoint_moves_between_distributed_dp2_and_plain_dp1(runs, job):
    uninterrupted = runs[f"{job}_dist"]["history"]
    resumed = runs[f"{job}_dist_to_plain"]["history"]
    assert [e["iteration"] for e in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    _assert_histories_equal(resumed, uninterrupted[SAVE_AT:], keys=["loss", "grad_norm"])
    uninterrupted = runs[f"{job}_plain_dp1"]["history"]
    resumed = runs[f"{job}_plain_to_dist"]["history"]
    assert [e["iteration"] for e in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    _assert_histories_equal(resumed, uninterrupted[SAVE_AT:], keys=["loss", "grad_norm"])


@pytest.mark.parametrize("job", ["train"])
def test_bf16_checkpoints_move_between_the_optimizers(runs, job):
    """bf16 weights with some fp32 ones (megatron's torch norms on CPU; log α when pruning on
    a GPU): the plain optimizer keeps fp32 masters of the 16-bit weights only, the distributed
    one of every weight. (Pruning in bf16 does not run on CPU: a mask times a bf16 input.)"""
    plain, dist = runs[f"{job}_bf16_plain"]["history"], runs[f"{job}_bf16_dist"]["history"]
    _assert_histories_equal(dist, plain)
    for kind, other, uninterrupted in (("plain", "dist", dist), ("dist", "plain", plain)):
        resumed = runs[f"{job}_bf16_{kind}_to_{other}"]["history"]
        assert [e["iteration"] for e in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
        _assert_histories_equal(resumed, uninterrupted[SAVE_AT:], ["loss", "grad_norm"])


@pytest.mark.parametrize("job", ["train", "prune"])
def test_distributed_optimizer_checkpoint_moves_from_dp2_to_dp1(runs, job):
    resumed = runs[f"{job}_dist_to_dist_dp1"]["history"]
    assert [e["iteration"] for e in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    _assert_histories_equal(
        resumed, runs[f"{job}_dist"]["history"][SAVE_AT:], ["loss", "grad_norm"]
    )


@pytest.mark.parametrize("job", ["train", "prune"])
def test_distributed_optimizer_resumes_bit_exact(runs, job):
    uninterrupted = runs[f"{job}_dist"]["history"][SAVE_AT:]
    resumed = runs[f"{job}_dist_resumed"]["history"]
    assert [(e["loss"], e["grad_norm"]) for e in resumed] == [
        (e["loss"], e["grad_norm"]) for e in uninterrupted
    ]


if __name__ == "__main__":  # a torchrun worker: tests/ is sys.path[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.launch import serve_plan

    serve_plan(run_job)
