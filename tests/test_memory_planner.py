"""The memory planner (``megashear plan``) against measurement, Megatron-LM's formula and bad input.

Measurement (under torchrun with gloo, fp32 on CPU, megatron-core's local spec, as the planner's
``dtype=fp32, backend=local`` workload): on every rank,

- the static part is counted from the real objects: the model's parameters, megatron-core's DDP
  grad buffers, the optimizer states after one step (megatron's optimizer and λ's AdamW);
- the activations are what autograd saves during a whole training step (the real schedule:
  1F1B under PP), counted by ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's
  storage counts once (deduplicated by storage) while any saved reference to it is alive,
  parameters excluded; the peak of that live sum is the step's activation memory.

This file is also the torchrun worker (``python -m torch.distributed.run ... THIS PLAN OUT``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import weakref
from pathlib import Path

import pytest

from megashear.model_config import ModelConfig, get_preset
from megashear.planning import memory as mem

# A small GQA shape whose vocabulary needs padding (250 -> 256 rows), two layers per PP stage.
SHAPE = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=160,
    vocab_size=250,
    seq_length=32,
)
TARGET = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=80)
KINDS = ("head", "intermediate", "layer", "hidden")
MICRO, GLOBAL = 2, 8
TOLERANCE = 0.10


# ---------------------------------------------------------------------------- worker side


class SavedTensorMeter:
    """Peak bytes of the storages autograd holds for backward (parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return tensor
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor) -> None:
        self.tensor = tensor


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(job: dict) -> dict:
    """Build the job's trainer, run one step under the meter; this rank's bytes by part."""
    import torch
    from megatron.core import parallel_state as ps

    from megashear.config import ParallelConfig, PruningConfig, TrainConfig
    from megashear.training.batches import SyntheticBatches

    cfg = ModelConfig(**SHAPE)
    par = ParallelConfig(
        tp=job["tp"], pp=job["pp"], use_distributed_optimizer=job.get("distopt", False)
    )
    train = TrainConfig(micro_batch_size=MICRO, global_batch_size=GLOBAL, train_iters=2)
    batches = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 7)
    if job["job"] == "prune":
        from megashear.training.pruning_trainer import PruningTrainer

        target = dataclasses.replace(cfg, **TARGET)
        trainer = PruningTrainer(cfg, target, PruningConfig(kinds=KINDS), par, train, batches)
    else:
        from megashear.training.trainer import Trainer

        trainer = Trainer(cfg, par, train, batches)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    masks = [p for p in params if hasattr(p, "mask_kind")]
    weights = [p for p in params if not hasattr(p, "mask_kind")]
    trainer.train_step()  # Adam's state exists after the first step
    meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in params})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        trainer.train_step()
    grads = [b.grad_data for chunk in trainer.model for b in chunk.buffers]
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    state = [
        v
        for opt in optimizers
        for s in opt.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.numel() > 1
    ]
    # fp32 master copies (16-bit weights only) live in the optimizer's groups
    for opt in optimizers:
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            state += [p for group in getattr(opt, name, []) for p in group]
    lam = getattr(trainer, "lagrangian", None)
    lam_bytes = 0
    if lam is not None:
        lam_params = list(lam.parameters())
        lam_state = [
            v
            for s in trainer.lambda_optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        ]
        lam_bytes = sum(t.numel() * t.element_size() for t in lam_params + lam_state) * 2
    return {
        "stage": ps.get_pipeline_model_parallel_rank(),
        "weights": sum(p.numel() * p.element_size() for p in weights),
        "mask_params": sum(p.numel() * p.element_size() for p in masks),
        "gradients": _storage_bytes(grads),
        "optimizer": _storage_bytes(state) if state else 0,
        "lambda": lam_bytes,
        "activations": meter.peak,
    }


def worker_main() -> None:
    import torch
    import torch.distributed as dist

    plan = torch.load(sys.argv[1], weights_only=False)
    results = {}
    for job in plan:
        mine = measure(job)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        results[job["name"]] = every
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- test side


def workload(job: str, dtype: str = "fp32", backend: str = "local") -> mem.Workload:
    cfg = ModelConfig(**SHAPE)
    return mem.Workload(
        model=cfg,
        job=job,
        kinds=KINDS if job == "prune" else (),
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO,
        global_batch_size=GLOBAL,
        dtype=dtype,
        backend=backend,
    )


MEASURED = [
    # (name, nproc, job, tp, pp, distributed optimizer)
    ("train_tp1", 1, "train", 1, 1, False),
    ("prune_tp1", 1, "prune", 1, 1, False),
    ("train_tp2", 2, "train", 2, 1, False),
    ("train_pp2", 2, "train", 1, 2, False),
    ("train_dp2", 2, "train", 1, 1, False),
    ("train_dp2_distopt", 2, "train", 1, 1, True),
    ("prune_dp2_distopt", 2, "prune", 1, 1, True),
    ("prune_tp2", 2, "prune", 2, 1, False),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from tests.launch import torchrun

    out: dict = {}
    for nproc in sorted({m[1] for m in MEASURED}):
        plan = [
            {"name": n, "job": j, "tp": tp, "pp": pp, "distopt": d}
            for n, p, j, tp, pp, d in MEASURED
            if p == nproc
        ]
        workdir = tmp_path_factory.mktemp(f"memory_{nproc}")
        out.update(torchrun(nproc, plan, workdir, worker=Path(__file__), timeout=600))
    return out


def _close(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("name, nproc, job, tp, pp, distopt", MEASURED)
def test_prediction_within_ten_percent_of_measurement(measured, name, nproc, job, tp, pp, distopt):
    work = workload(job)
    lay = mem.Layout(tp=tp, pp=pp, dp=nproc // (tp * pp), distributed_optimizer=distopt)
    for rank, got in enumerate(measured[name]):
        want = mem.stage_bytes(work, lay, got["stage"])
        where = f"{name} rank {rank} (stage {got['stage']})"
        # the parameters are counted exactly (log α apart, in 'masks')
        assert want["weights"] == got["weights"], where
        static = got["weights"] + got["mask_params"] + got["gradients"] + got["optimizer"]
        static += got["lambda"]
        predicted_static = sum(want[k] for k in ("weights", "gradients", "optimizer", "masks"))
        assert _close(predicted_static, static), (where, predicted_static, static)
        assert _close(want["optimizer"], got["optimizer"]) or job == "prune", where
        acts = want["activations"] + want["logits"]
        assert _close(acts, got["activations"]), (where, acts, got["activations"])


# ---------------------------------------------------------------------------- Megatron-LM


def megatron_weight_and_optimizer_bytes(cfg: ModelConfig, tp: int, pp: int, dp: int, dist: bool):
    """Megatron-LM's ``compute_weight_and_optimizer_memory`` (dense, RMSNorm, SwiGLU, GQA):
    the most loaded shard's parameters times 18 bytes, or ``6 + 12 / dp``."""
    h, a, g = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
    ratio = cfg.head_dim * a / h
    attn = 2 * h * h * ((1 + g / a) * ratio)
    layer = 2 * h * (cfg.ffn_hidden_size * 3 / 2 + 1) + attn
    emb = h * cfg.padded_vocab_size
    block = layer * cfg.num_layers + h
    shard = (block / pp + emb) / tp
    if not cfg.tie_word_embeddings and pp == 1:
        shard += emb / tp
    return shard * (18 if not dist else 6 + 12 / dp)


def megatron_activation_bytes(cfg: ModelConfig, s: int, b: int, tp: int) -> float:
    """Megatron-LM's ``compute_activation_memory`` (sequence parallel + selective recompute,
    Korthikanti et al. Table 2) at pp = 1."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    act = s * b * h * (18 + 4 * f / h) * cfg.num_layers
    act += 8 * s * b + s * b * h  # embedding input and dropout
    act += s * b * h * 4 * (1 + v / h)  # output layer input and cross-entropy
    return act / tp


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama3.1-8b", "llama2-70b"])
@pytest.mark.parametrize(
    "tp, pp, dp, dist", [(1, 1, 8, False), (1, 1, 8, True), (2, 4, 8, True), (8, 4, 2, False)]
)
def test_static_memory_is_megatrons_formula(preset, tp, pp, dp, dist):
    cfg = get_preset(preset)
    work = mem.Workload(model=cfg, job="train", dtype="bf16", seq_length=cfg.seq_length)
    lay = mem.Layout(tp=tp, pp=pp, dp=dp, distributed_optimizer=dist)
    ours = mem.static_bytes(work, lay, stage=0)
    total = ours["weights"] + ours["gradients"] + ours["optimizer"]
    theirs = megatron_weight_and_optimizer_bytes(cfg, tp, pp, dp, dist)
    if tp == 1 and pp == 1:
        assert total == pytest.approx(theirs, rel=1e-9)
    else:  # Megatron splits the norm weights over TP and spreads the final norm over stages
        assert total == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_activations_are_megatrons_formula_plus_llama_terms(preset, tp):
    """TE layers, bf16, sequence parallel and selective recomputation at pp = 1 (the case
    Megatron-LM's formula is for) on an MHA model: Megatron's figure plus exactly what LLaMA
    adds or drops (docs/memory_planner.md): RoPE's new q and k ``4sbh``, SwiGLU's gate
    ``2sbf``, the norms' fp32 ``1/rms`` ``8sb`` per layer; no dropout masks (``2sbh`` per
    layer, ``sbh`` at the embedding); the tokens and loss bookkeeping are not split over TP."""
    cfg = get_preset(preset)
    s, b = cfg.seq_length, 1
    work = mem.Workload(
        model=cfg, job="train", dtype="bf16", seq_length=s, micro_batch_size=b, global_batch_size=8
    )
    lay = mem.Layout(tp=tp, pp=1, dp=1, sequence_parallel=True, recompute="selective")
    got = mem.activation_bytes(work, lay, stage=0)
    ours = got["activations"] + got["logits"]
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    llama = L * s * b * (4 * h + 2 * f + 8 - 2 * h) / tp - s * b * h / tp
    llama += 8 * s * b * (1 - 1 / tp) + mem.LOSS_BYTES_PER_TOKEN * s * b
    llama += 2 * s * cfg.head_dim * 4  # RoPE's cos / sin
    assert ours == pytest.approx(megatron_activation_bytes(cfg, s, b, tp) + llama, rel=1e-6)
    # the raw figures: about a quarter more than Megatron's GPT formula (gate and RoPE)
    assert 1.0 < ours / megatron_activation_bytes(cfg, s, b, tp) < 1.3


# ---------------------------------------------------------------------------- the command


def test_recommendations_fit_and_come_fastest_first():
    from megashear.jobs.plan import run
    from megashear.planning import PlanConfig

    out = run(PlanConfig(source="llama2-7b", target="sheared-llama-1.3b", gpus=8))
    layouts = out["layouts"]
    assert layouts and all(e["fits"] for e in layouts)
    assert all(e["total_gib"] <= out["usable_gib"] for e in layouts)
    times = [e["relative_step_time"] for e in layouts]
    assert times == sorted(times)
    assert out["recommended"] == layouts[0]["layout"]
    # 7B at 18 bytes / parameter does not fit one 80 GB GPU without TP, PP or sharding
    assert not any(e["tp"] * e["pp"] == 1 and not e["distributed_optimizer"] for e in layouts)


def test_more_sharding_never_needs_more_memory():
    cfg = get_preset("llama2-70b")
    work = mem.Workload(model=cfg, job="prune", kinds=KINDS, seq_length=4096, global_batch_size=64)
    base = mem.estimate(work, mem.Layout(tp=8, pp=4, dp=2)).total
    for better in (
        mem.Layout(tp=8, pp=4, dp=2, distributed_optimizer=True),
        mem.Layout(tp=8, pp=4, dp=2, recompute="selective"),
        mem.Layout(tp=8, pp=4, dp=2, recompute="full", recompute_method="uniform",
                   recompute_num_layers=1),
        mem.Layout(tp=8, pp=8, dp=1),
    ):  # fmt: skip
        assert mem.estimate(work, better).total < base, better.describe()
    # the arithmetic: TP8 x PP4 without the distributed optimizer, ~18 bytes/parameter
    static = mem.static_bytes(work, mem.Layout(tp=8, pp=4, dp=2), stage=0)
    per_param = sum(static[k] for k in ("weights", "gradients", "optimizer"))
    assert 35e9 < per_param < 45e9


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus=1", "--gpu_memory_gib=16"], "no layout fits"),
        (["--layout.sequence_parallel=true", "--layout.tp=1"], "needs layout.tp >= 2"),
        (["--layout.recompute_method=block"], "recompute_granularity=full"),
        (
            ["--layout.recompute_granularity=selective", "--layout.recompute_num_layers=2"],
            "recompute_granularity=full",
        ),
        (["--source=llama9-1t"], "neither a model preset"),
        (["--gpus=6", "--layout.tp=3", "--layout.pp=1"], "not divisible by tp 3"),
    ],
)
def test_bad_input_is_one_line(flags, message):
    from tests.launch import megashear_cli

    proc = megashear_cli("plan", "--target=sheared-llama-1.3b", *flags, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_source_and_target_may_be_checkpoints(tmp_path):
    """Only the checkpoints' megashear.json is read: the plan equals the presets' plan."""
    from megashear.checkpoint.format import model_meta, write_meta
    from megashear.jobs.plan import run
    from megashear.planning import PlanConfig
    from megashear.pruning.targets import make_target

    source = get_preset("llama2-7b")
    target = make_target(source, "sheared-llama-1.3b")
    for name, cfg in (("source", source), ("target", target)):
        (tmp_path / name).mkdir()
        write_meta(str(tmp_path / name), model_meta(cfg, {"tp": 1, "pp": 1}, 0, ["model"]))
    by_dir = run(PlanConfig(source=str(tmp_path / "source"), target=str(tmp_path / "target")))
    by_name = run(PlanConfig(source="llama2-7b", target="sheared-llama-1.3b"))
    assert by_dir["layouts"] == by_name["layouts"] and by_dir["target"] == by_name["target"]


def test_plan_prints_one_json_line():
    import json

    from tests.launch import megashear_cli

    proc = megashear_cli(
        "plan",
        "--source=llama3.1-8b",
        "--target=llama3.2-3b",
        "--gpus=8",
        "--teacher=true",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["teacher"] and out["layouts"][0]["bytes"]["teacher"] > 0
    assert math.isclose(out["usable_gib"], 72.0)


if __name__ == "__main__":
    worker_main()
