"""Distillation under every TP x PP x DP layout gives the single-process loss and gradients, with
a teacher deeper and wider than the student; the KD loss's defining properties; exact resume;
the one-line refusals."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from megashear.model_config import ModelConfig
from tests.launch import HERE, megashear_cli, torchrun

pytestmark = pytest.mark.dist
WORKER = HERE / "distill_worker.py"
SEQ = 32
# student: 4 layers, width 64; teacher: 8 layers, width 96 (so that under PP the concatenated
# hidden states [s, b, 64 + 96] and the teacher's own layer split are both exercised)
MODELS = {
    "mha": (ModelConfig(4, 64, 4, 4, 160, 256, seq_length=SEQ), ModelConfig(8, 96, 6, 6, 256, 256)),
    "gqa": (ModelConfig(4, 64, 4, 2, 160, 256, seq_length=SEQ), ModelConfig(8, 96, 6, 2, 256, 256)),
    # tied embeddings (under PP the last stage's copy, in both models) and a vocabulary padded
    # from 250 to 256 rows (-inf logits in the last TP rank's slice)
    "tied": (
        ModelConfig(4, 64, 4, 2, 160, 250, seq_length=SEQ, tie_word_embeddings=True),
        ModelConfig(8, 96, 6, 2, 256, 250, tie_word_embeddings=True),
    ),
}
KD = {
    "mha": {"alpha": 0.5, "temperature": 2.0},
    "gqa": {"alpha": 0.7, "temperature": 1.0},
    "tied": {"alpha": 1.0, "temperature": 1.0},
}
LAYOUTS = {  # name: (world, tp, pp, vpp)
    "tp1pp1": (1, 1, 1, None),
    "tp2pp1": (2, 2, 1, None),
    "tp1pp2": (2, 1, 2, None),
    "dp2": (2, 1, 1, None),
    "tp2pp2": (4, 2, 2, None),
    "tp1pp2vpp2": (2, 1, 2, 2),
}


def _kd_job(d, m: str, layout: str, **extra) -> dict:
    _, tp, pp, vpp = LAYOUTS[layout]
    return {
        "name": f"{m}_{layout}",
        "model": MODELS[m][0].to_dict(),
        "tp": tp,
        "pp": pp,
        "vpp": vpp,
        "steps": 2,
        "teacher": str(d / f"teacher_{m}"),
        "init": str(d / f"init_{m}"),
        "grads": str(d / f"grads_{m}_{layout}"),
        **KD[m],
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    student = MODELS["gqa"][0].to_dict()
    other_vocab = ModelConfig(2, 64, 4, 2, 160, 300, seq_length=SEQ).to_dict()
    one = []
    for m, (s, t) in MODELS.items():
        one.append(
            {
                "name": f"t_{m}",
                "mode": "save_model",
                "model": t.to_dict(),
                "sharpen": 30.0,
                "save_dir": str(d / f"teacher_{m}"),
            }
        )
        one.append(
            {
                "name": f"s_{m}",
                "mode": "save_model",
                "model": s.to_dict(),
                "save_dir": str(d / f"init_{m}"),
            }
        )
    one.append(
        {
            "name": "t_vocab",
            "mode": "save_model",
            "model": other_vocab,
            "save_dir": str(d / "teacher_vocab"),
        }
    )
    for m in MODELS:
        one.append(_kd_job(d, m, "tp1pp1"))
    one.append(_kd_job(d, "gqa", "tp1pp1", name="topk_tp1pp1", top_k=8, grads=None))
    base = {"model": student, "steps": 3, "init": str(d / "init_gqa")}
    one += [
        {**base, "name": "plain"},
        {**base, "name": "alpha0", "teacher": str(d / "teacher_gqa"), "alpha": 0.0},
        # the student as its own teacher: KD loss 0 and no KD gradient
        {
            **base,
            "name": "self",
            "steps": 1,
            "teacher": str(d / "init_gqa"),
            "grads": str(d / "grads_self"),
        },
        {
            **base,
            "name": "uninterrupted",
            "steps": 4,
            "teacher": str(d / "teacher_gqa"),
            "alpha": 0.5,
            "save": str(d / "ck"),
            "save_at": 2,
        },
        {
            **base,
            "name": "resumed",
            "steps": 4,
            "teacher": str(d / "teacher_gqa"),
            "alpha": 0.5,
            "load": str(d / "ck"),
            "init": None,
        },
        {
            **base,
            "name": "resumed_other_teacher",
            "steps": 4,
            "teacher": str(d / "teacher_mha"),
            "alpha": 0.5,
            "load": str(d / "ck"),
            "init": None,
            "expect_error": True,
        },
        {**base, "name": "other_vocab", "teacher": str(d / "teacher_vocab"), "expect_error": True},
    ]
    prune = {
        "mode": "prune",
        "model": student,
        "target": {"num_layers": 2, "hidden_size": 48, "ffn_hidden_size": 96, "kv_channels": 16},
        "teacher": str(d / "teacher_gqa"),
        "init": str(d / "init_gqa"),
        "alpha": 0.5,
        "steps": 2,
    }
    one.append(
        {**prune, "name": "prune_tp1pp1", "save": str(d / "prune"), "finalize": str(d / "final")}
    )
    out = torchrun(1, one, d, WORKER)
    two = [_kd_job(d, m, lay) for m in MODELS for lay in ("tp2pp1", "tp1pp2", "dp2")]
    two.append(_kd_job(d, "gqa", "tp1pp2vpp2"))
    two.append(_kd_job(d, "gqa", "tp2pp1", name="topk_tp2pp1", top_k=8, grads=None))
    two.append(
        {
            "name": "kd_unit",
            "mode": "kd_unit",
            "model": student,
            "tp": 2,
            "vocab": 256,
            "top_k": 5,
            "temperature": 1.5,
            "padded_vocab": 250,
        }
    )
    out.update(torchrun(2, two, d, WORKER))
    four = [_kd_job(d, m, "tp2pp2") for m in MODELS]
    four.append({**prune, "name": "prune_tp2pp2", "tp": 2, "pp": 2})
    out.update(torchrun(4, four, d, WORKER))
    out["_dir"] = d
    return out


def _grads(directory) -> dict[str, torch.Tensor]:
    """A saved gradient checkpoint as {global name: full tensor}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (ckpt,) = [p for p in glob.glob(str(directory / "iter_*")) if os.path.isdir(p)]
    out = f"{ckpt}.pt"
    if not os.path.exists(out):
        dcp_to_torch_save(ckpt, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def _losses(run: dict, key: str) -> np.ndarray:
    return np.array([s[key] for s in run["steps"]])


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2", "dp2", "tp2pp2"])
def test_loss_and_student_gradients_match_single_process(runs, model, layout):
    ref, got = runs[f"{model}_tp1pp1"], runs[f"{model}_{layout}"]
    for key in ("loss", "lm_loss", "kd_loss"):
        np.testing.assert_allclose(_losses(got, key), _losses(ref, key), rtol=1e-5)
    # the objective is the configured mix, and the KD term is alive
    kd, lm = _losses(ref, "kd_loss"), _losses(ref, "lm_loss")
    alpha = KD[model]["alpha"]
    np.testing.assert_allclose(_losses(ref, "loss"), alpha * kd + (1 - alpha) * lm, rtol=1e-6)
    assert kd.min() > 0.1
    d = runs["_dir"]
    want, have = _grads(d / f"grads_{model}_tp1pp1"), _grads(d / f"grads_{model}_{layout}")
    assert set(want) == set(have)
    for name, g in want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(have[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_interleaved_virtual_stages_match(runs):
    ref, got = runs["gqa_tp1pp1"], runs["gqa_tp1pp2vpp2"]
    np.testing.assert_allclose(_losses(got, "loss"), _losses(ref, "loss"), rtol=1e-5)
    d = runs["_dir"]
    want, have = _grads(d / "grads_gqa_tp1pp1"), _grads(d / "grads_gqa_tp1pp2vpp2")
    for name, g in want.items():
        torch.testing.assert_close(have[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_top_k_distillation_matches_across_tp(runs):
    ref, got = runs["topk_tp1pp1"], runs["topk_tp2pp1"]
    np.testing.assert_allclose(_losses(got, "loss"), _losses(ref, "loss"), rtol=1e-5)
    # only 8 of 256 target tokens: a different loss than the full KL
    assert abs(_losses(ref, "kd_loss")[0] - _losses(runs["gqa_tp1pp1"], "kd_loss")[0]) > 1e-3


def test_alpha_zero_equals_plain_training_bit_for_bit(runs):
    plain, alpha0 = runs["plain"]["steps"], runs["alpha0"]["steps"]
    assert [s["loss"] for s in alpha0] == [s["loss"] for s in plain]
    assert [s["grad_norm"] for s in alpha0] == [s["grad_norm"] for s in plain]
    assert all(s["kd_loss"] > 0.1 for s in alpha0)  # computed and logged, weighted 0


def test_student_as_its_own_teacher_has_zero_kd_loss_and_gradient(runs):
    (step,) = runs["self"]["steps"]
    assert abs(step["kd_loss"]) < 1e-6 and abs(step["loss"]) < 1e-6
    for name, g in _grads(runs["_dir"] / "grads_self").items():
        assert g.abs().max() < 1e-6, name


def test_kd_loss_unit_properties_under_tp2(runs):
    unit = runs["kd_unit"]
    loss, grad = unit["self"]
    assert loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6
    full, full_grad = unit["full"]
    top, top_grad = unit["top_vocab"]
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-5, atol=1e-6)
    # against a one-process formula on the full logits
    student, teacher = unit["inputs"]
    t = 1.5
    s = student.clone().requires_grad_()
    p_t, log_p_t = torch.softmax(teacher / t, -1), torch.log_softmax(teacher / t, -1)
    want = t**2 * (p_t * (log_p_t - torch.log_softmax(s / t, -1))).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(full, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full_grad, s.grad, rtol=1e-5, atol=1e-6)
    # a padded vocabulary: the padded rows take no part, and get no gradient
    real = 250
    s = student[..., :real].clone().requires_grad_()
    log_p_t = torch.log_softmax(teacher[..., :real], -1)
    want = (log_p_t.exp() * (log_p_t - torch.log_softmax(s, -1))).sum(-1)
    want.sum().backward()
    pad_loss, pad_grad = unit["padded"]
    torch.testing.assert_close(pad_loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pad_grad[..., :real], s.grad, rtol=1e-5, atol=1e-6)
    assert (pad_grad[..., real:] == 0).all()
    vals, idx = teacher[..., :real].topk(5, -1)
    q = torch.softmax(vals, -1)
    want = (q * (q.log() - torch.log_softmax(student[..., :real], -1).gather(-1, idx))).sum(-1)
    torch.testing.assert_close(unit["padded_top_k"][0], want, rtol=1e-5, atol=1e-6)
    # top-5: the teacher's five best tokens renormalised, against the student's full softmax
    k_loss, k_grad = unit["top_k"]
    vals, idx = teacher.topk(5, -1)
    q = torch.softmax(vals, -1)
    s = student.clone().requires_grad_()
    want = (q * (q.log() - torch.log_softmax(s, -1).gather(-1, idx))).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(k_loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, s.grad, rtol=1e-5, atol=1e-6)


def test_resume_is_exact_and_the_checkpoint_records_the_teacher(runs):
    assert runs["resumed"]["steps"] == runs["uninterrupted"]["steps"][2:]
    d = runs["_dir"]
    meta = json.loads((d / "ck" / "iter_0000002" / "megashear.json").read_text())
    assert meta["distill"]["teacher"] == os.path.abspath(d / "teacher_gqa")
    assert len(meta["distill"]["fingerprint"]) == 16
    # the teacher's weights are not in the student's checkpoint
    saved = sum(os.path.getsize(f) for f in glob.glob(str(d / "ck" / "iter_0000002" / "*")))
    teacher = sum(os.path.getsize(f) for f in glob.glob(str(d / "teacher_gqa" / "iter_*" / "*")))
    assert saved < 3 * teacher  # the student's weights and Adam moments alone
    assert "teacher" not in (d / "ck" / "iter_0000002" / "metadata.json").read_text()
    err = runs["resumed_other_teacher"]["error"]
    assert err.startswith("CheckpointError") and "is not the teacher this checkpoint" in err


def test_pruning_with_distillation_matches_across_layouts_and_finalizes(runs):
    ref, got = runs["prune_tp1pp1"], runs["prune_tp2pp2"]
    for key in ("loss", "lm_loss", "kd_loss", "grad_norm"):
        np.testing.assert_allclose(_losses(got, key), _losses(ref, key), rtol=1e-5)
    # finalisation ignores the distillation record: a dense model of the target shape
    final = ModelConfig.from_dict(ref["final"])
    assert (final.num_layers, final.hidden_size, final.ffn_hidden_size) == (2, 48, 96)
    d = runs["_dir"]
    pruned = json.loads(next((d / "prune").glob("iter_*/megashear.json")).read_text())
    assert pruned["distill"]["alpha"] == 0.5 and "pruning" in pruned
    assert "distill" not in json.loads(
        next((d / "final").glob("iter_*/megashear.json")).read_text()
    )


def test_teacher_with_another_vocabulary_is_refused(runs):
    err = runs["other_vocab"]["error"]
    assert "vocab_size 300, the student 256" in err and "share one tokenizer" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distill.temperature=0"], "config key 'distill.temperature': must be a finite"),
        (["--distill.teacher=/nonexistent/teacher"], "'distill.teacher': does not exist"),
        (["--distill.alpha=1.5"], "config key 'distill.alpha': must be between 0"),
    ],
)
def test_bad_distillation_settings_are_one_line_errors(runs, flags, message):
    proc = megashear_cli(
        "train",
        "--model_preset=tiny-gqa",
        "--data.synthetic=true",
        "--train.train_iters=1",
        f"--distill.teacher={runs['_dir'] / 'teacher_gqa'}",
        *flags,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
