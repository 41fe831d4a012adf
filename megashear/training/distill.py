"""Knowledge distillation: a frozen teacher runs beside the student on the same TP x PP x DP ranks.

The teacher is a plain megashear checkpoint (typically the converted source model) built at the
student's layout: its layers are split over the same pipeline stages (and virtual stages), its
vocabulary over the same TP ranks. It runs in eval mode, without gradients, and is never saved.

Both models travel through megatron-core's schedules together. A :class:`TeacherStudentChunk`
pairs one student chunk (DDP-wrapped) with the teacher chunk of the same (virtual) stage:

- between stages it sends ``cat([h_student, h_teacher], -1)`` ``[s, b, h_s + h_t]``, and splits
  what it receives the same way; the schedules see it through a copy of the student's
  ``TransformerConfig`` whose ``hidden_size`` is ``h_s + h_t`` (the p2p tensor shape) and whose
  ``finalize_model_grads_func`` reduces the student's gradients alone. The teacher half carries
  no gradient (its slice of the received gradient is zero).
- on the last stage the teacher runs first; a hook on the student's output layer computes the
  per-token KD loss from both models' logits ``[s, b, v/tp]`` as the student's are produced
  (:func:`megashear.training.kd_loss.vocab_parallel_kd_loss`), and the loss function combines
  ``alpha * KD + (1 - alpha) * LM`` per token, the LM loss being the student's own
  ``vocab_parallel_cross_entropy``, exactly as in plain training.

This is how ModelOpt's megatron plugin moves a teacher through the pipeline, without its
restrictions: the teacher may be deeper and wider than the student, TP may be anything, and
virtual (interleaved) stages pair chunk by chunk.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from functools import partial

import torch

from megashear import platform
from megashear.checkpoint.format import fingerprint
from megashear.config import DistillConfig, ParallelConfig
from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)


class DistillError(ValueError):
    """A teacher that cannot distil into this student (one-line message)."""


def teacher_model_config(cfg: DistillConfig, student: ModelConfig, par: ParallelConfig, world: int):
    """The teacher's :class:`ModelConfig`, checked against the student and the layout."""
    from megashear.checkpoint.format import CheckpointError, read_meta, resolve
    from megashear.models.llama import validate_layout

    if not os.path.exists(cfg.teacher):
        raise DistillError(f"distill.teacher {cfg.teacher} does not exist")
    try:
        meta = read_meta(resolve(cfg.teacher))
    except CheckpointError as exc:
        raise DistillError(f"distill.teacher: {exc}") from exc
    if "pruning" in meta:
        raise DistillError(
            f"distill.teacher {cfg.teacher} is a pruning checkpoint (masked model); finalise it "
            "or use the source model"
        )
    teacher = ModelConfig.from_dict(meta["model"])
    if teacher.vocab_size != student.vocab_size:
        raise DistillError(
            f"distill.teacher {cfg.teacher} has vocab_size {teacher.vocab_size}, the student "
            f"{student.vocab_size}: teacher and student must share one tokenizer"
        )
    if teacher.padded_vocab_size != student.padded_vocab_size:
        raise DistillError(
            f"distill.teacher {cfg.teacher} pads its vocabulary to {teacher.padded_vocab_size} "
            f"rows, the student to {student.padded_vocab_size} (make_vocab_size_divisible_by "
            f"{teacher.make_vocab_size_divisible_by} vs {student.make_vocab_size_divisible_by})"
        )
    # the teacher reads the student's sequences
    teacher = dataclasses.replace(teacher, seq_length=student.seq_length)
    try:
        validate_layout(teacher, par, world)
    except ValueError as exc:
        raise DistillError(f"distill.teacher {cfg.teacher} at this layout: {exc}") from exc
    return teacher


class Teacher:
    """This rank's frozen teacher chunks, one per (virtual) pipeline stage, loaded from
    ``cfg.teacher`` at the current parallel layout."""

    def __init__(self, cfg: DistillConfig, student: ModelConfig, par: ParallelConfig, dtype):
        import torch.distributed as dist
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        from megashear.checkpoint.model_state import load_model_weights
        from megashear.models.llama import build_model, build_transformer_config

        self.cfg = cfg
        self.model_cfg = teacher_model_config(cfg, student, par, dist.get_world_size())
        self.tconfig = build_transformer_config(self.model_cfg, par, dtype)
        self.tconfig.perform_initialization = False  # the checkpoint supplies every weight
        # Building must not move the student's random streams (bit-identical alpha = 0 runs).
        cpu_state, tracker_states = torch.get_rng_state(), get_cuda_rng_tracker().get_states()
        try:
            self.chunks = build_model(self.model_cfg, self.tconfig)
        finally:
            torch.set_rng_state(cpu_state)
            get_cuda_rng_tracker().set_states(tracker_states)
        load_model_weights(self.chunks, self.model_cfg, cfg.teacher)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.fingerprint = fingerprint(cfg.teacher)
        logger.info(
            "teacher %s: %d layers, hidden %d, %d parameters (fingerprint %s)",
            cfg.teacher,
            self.model_cfg.num_layers,
            self.model_cfg.hidden_size,
            self.model_cfg.num_parameters(),
            self.fingerprint,
        )

    def record(self) -> dict:
        """What a checkpoint records of the teacher (never its weights)."""
        return {
            "teacher": os.path.abspath(self.cfg.teacher),
            "fingerprint": self.fingerprint,
            "alpha": self.cfg.alpha,
            "temperature": self.cfg.temperature,
            "top_k": self.cfg.top_k,
        }


class _KDTap:
    """Forward hook on the student's output layer: the per-token KD loss ``[s, b]`` of its
    logits ``[s, b, v/tp]`` against the teacher's, computed as they are produced.

    It has to be computed there: megatron-core's ``vocab_parallel_cross_entropy``, which turns
    the same logits into the LM loss right after, overwrites them in place with the softmax.
    """

    def __init__(self, output_layer: torch.nn.Module, cfg: DistillConfig, vocab_size: int) -> None:
        self.cfg, self.vocab_size = cfg, vocab_size
        self.teacher_logits: torch.Tensor | None = None
        self.kd: torch.Tensor | None = None
        output_layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.teacher_logits is None:  # a plain forward of the student (evaluation)
            return
        from megashear.training.kd_loss import vocab_parallel_kd_loss

        teacher, self.teacher_logits = self.teacher_logits, None
        self.kd = vocab_parallel_kd_loss(
            output[0], teacher, self.cfg.temperature, self.cfg.top_k, self.vocab_size
        )

    def take(self) -> torch.Tensor:
        kd, self.kd = self.kd, None
        return kd


class _LogitsTap:
    """Forward hook on the teacher's output layer that keeps its logits ``[s, b, v/tp]``."""

    def __init__(self, output_layer: torch.nn.Module) -> None:
        self.logits: torch.Tensor | None = None
        output_layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.logits = output[0]

    def take(self) -> torch.Tensor:
        logits, self.logits = self.logits, None
        return logits


class TeacherStudentChunk(torch.nn.Module):
    """One (virtual) pipeline stage of student and teacher, as one model for the schedules.

    ``module`` is the student chunk (DDP-wrapped), so megatron-core's attribute lookups
    (``model_type``, ``decoder``, ...) reach the student; ``config`` is the schedule's view
    (``hidden_size`` = student + teacher width).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        config,
        cfg: DistillConfig,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        from megatron.core.utils import get_attr_wrapped_model

        self.module = student
        self.teacher = teacher
        self.config = config
        self.distill_cfg = cfg
        self.student_model = get_attr_wrapped_model(student, "decoder", return_model_obj=True)
        self.student_width = self.student_model.config.hidden_size
        self.post_process = self.student_model.post_process
        self.pre_process = self.student_model.pre_process
        self.kd_tap = self.teacher_tap = None
        if self.post_process:
            vocab = self.student_model.vocab_size if vocab_size is None else vocab_size
            self.kd_tap = _KDTap(self.student_model.output_layer, cfg, vocab)
            self.teacher_tap = _LogitsTap(teacher.output_layer)

    def train(self, mode: bool = True):
        """Train / eval the student; the teacher stays in eval mode."""
        self.training = mode
        self.module.train(mode)
        self.teacher.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received ``[s, b, h_s + h_t]`` into the two models' inputs."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        if input_tensor is None:
            student_in = teacher_in = None
        else:
            student_in = input_tensor[..., : self.student_width].contiguous()
            teacher_in = input_tensor[..., self.student_width :].detach().contiguous()
        self.student_model.set_input_tensor(student_in)
        self.teacher.set_input_tensor(teacher_in)

    def forward(self, tokens, position_ids, attention_mask, labels=None):
        """Non-last stages: ``[s, b, h_s + h_t]``; the last stage: the student's per-token LM
        loss ``[b, s]`` (its KD loss against the teacher is kept by the tap)."""
        with torch.no_grad():  # first: the student's output layer needs the teacher's logits
            teacher_out = self.teacher(tokens, position_ids, attention_mask)
        if self.post_process:
            self.kd_tap.teacher_logits = self.teacher_tap.take()
        out = self.module(tokens, position_ids, attention_mask, labels=labels)
        if self.post_process:
            return out
        return torch.cat([out, teacher_out.to(out.dtype)], dim=-1)


def _kd_loss_func(
    loss_mask: torch.Tensor,
    domain_id: torch.Tensor | None,
    num_domains: int,
    cfg: DistillConfig,
    kd_per_token: torch.Tensor,
    lm_per_token: torch.Tensor,
):
    """``[s, b]`` KD and ``[b, s]`` LM losses -> (objective sum, token count, reports).

    Reports ``objective``, ``lm loss`` and ``kd loss`` as [sum, count]; with domain ids
    ``domain loss`` (LM) and ``domain kd loss`` as [per-domain sums (k), counts (k)].
    """
    mask = loss_mask.to(torch.float32)  # [b, s]
    kd = kd_per_token.t()  # [s, b] -> [b, s]
    lm = lm_per_token.float()
    objective = ((1.0 - cfg.alpha) * lm + cfg.alpha * kd) * mask
    count = mask.sum()
    lm_sum = (lm * mask).sum()
    kd_sum = (kd * mask).sum()
    reports = {
        "objective": torch.stack([objective.sum().detach().clone(), count.detach()]),
        "lm loss": torch.stack([lm_sum.detach(), count.detach()]),
        "kd loss": torch.stack([kd_sum.detach(), count.detach()]),
    }
    if domain_id is not None and num_domains:
        counts = torch.zeros(num_domains, dtype=torch.float32, device=mask.device)
        counts.index_add_(0, domain_id, mask.sum(1))
        for key, per_token in (("domain loss", lm), ("domain kd loss", kd)):
            sums = torch.zeros_like(counts)
            sums.index_add_(0, domain_id, (per_token.detach() * mask).sum(1))
            reports[key] = torch.cat([sums, counts])
    return objective.sum(), count.to(torch.int), reports


def distill_forward_batch(batch: dict, model: TeacherStudentChunk):
    """One micro-batch ``[b, s]`` through student and teacher; returns (output, loss_func)."""
    device = platform.default_device()
    tokens = batch["tokens"].to(device)
    # [b, s]
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=batch["labels"].to(device))
    if not model.post_process:
        return output, None
    domain_id = batch.get("domain_id")
    return output, partial(
        _kd_loss_func,
        batch["loss_mask"].to(device),
        None if domain_id is None else domain_id.to(device),
        int(batch.get("num_domains", 0)),
        model.distill_cfg,
        model.kd_tap.take(),
    )


def pair_with_teacher(
    student_chunks: list[torch.nn.Module], teacher: Teacher, student_tconfig
) -> list[TeacherStudentChunk]:
    """The schedule's model chunks: each student chunk with the teacher chunk of its stage.

    Call after DDP wrapping (the student's config then holds ``finalize_model_grads_func``).
    """
    schedule_config = copy.copy(student_tconfig)
    schedule_config.hidden_size = student_tconfig.hidden_size + teacher.tconfig.hidden_size
    finalize = student_tconfig.finalize_model_grads_func
    if finalize is not None:

        def finalize_student(models, *args, **kwargs):
            return finalize([m.module for m in models], *args, **kwargs)

        schedule_config.finalize_model_grads_func = finalize_student
    return [
        TeacherStudentChunk(s, t, schedule_config, teacher.cfg, teacher.model_cfg.vocab_size)
        for s, t in zip(student_chunks, teacher.chunks)
    ]
