"""The training loop on megatron-core itself: schedules, DDP, optimizer and LR schedule.

No global-args trainer: the model is built from a :class:`ModelConfig`, wrapped in megatron-core's
``DistributedDataParallel``, optimised by ``get_megatron_optimizer`` (AdamW; the distributed
optimizer on request) with ``OptimizerParamScheduler`` (cosine with linear warm-up), and driven by
``get_forward_backward_func()`` (no pipelining, 1F1B, or interleaved 1F1B with virtual stages).

Batches: every rank draws the same global batch ``[B, s]`` from its :class:`BatchSource` and keeps
its DP slice, cut into micro-batches ``[b, s]``. The reported loss is the token-weighted mean over
the whole global batch, identical on every rank and for every parallel layout.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from megashear import platform
from megashear.config import CheckpointConfig, DistillConfig, ParallelConfig, TrainConfig
from megashear.model_config import ModelConfig
from megashear.models.llama import build_model, build_transformer_config, layer_spec
from megashear.parallel import init_model_parallel
from megashear.training.batches import BatchSource, split_for_rank
from megashear.training.distill import TeacherStudentChunk, distill_forward_batch
from megashear.training.errors import NonFiniteLossError

logger = logging.getLogger(__name__)


def _loss_func(
    loss_mask: torch.Tensor,
    domain_id: torch.Tensor | None,
    num_domains: int,
    output: torch.Tensor,
):
    """Per-token losses ``[b, s]`` -> (sum, token count, reports).

    Reports: ``lm loss`` = [sum, count]; with domain ids ``[b]``, ``domain loss`` =
    [per-domain sums (k), per-domain counts (k)].
    """
    mask = loss_mask.to(output.dtype)
    per_token = output.float() * mask  # [b, s]
    loss_sum = per_token.sum()
    num_tokens = mask.sum().to(torch.int)
    reports = {"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum().detach().float()])}
    if domain_id is not None and num_domains:
        sums = torch.zeros(num_domains, dtype=torch.float32, device=output.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, domain_id, per_token.detach().sum(1))
        counts.index_add_(0, domain_id, mask.detach().float().sum(1))
        reports["domain loss"] = torch.cat([sums, counts])
    return loss_sum, num_tokens, reports


def recompute_config(tconfig, par: ParallelConfig):
    """``tconfig`` with the layout's activation recomputation (megatron-core's own fields,
    validated by its ``TransformerConfig``): ``selective`` checkpoints core attention, ``full``
    whole layers by ``recompute_method`` / ``recompute_num_layers``.

    The pruning masks are sampled once per micro-batch before the forward (``MaskBank.sample``)
    and held as tensors; a recomputed forward reads the same ``z`` (it draws no noise). Those
    ``z`` carry the graph back to log α, which megatron-core's reentrant checkpoint would
    traverse once per recomputed region and free (:func:`use_non_reentrant_checkpoint`)."""
    import dataclasses

    if par.recompute_granularity == "none":
        return tconfig
    use_non_reentrant_checkpoint()
    return dataclasses.replace(
        tconfig,
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
    )


# Weak references to the bound ``recompute_state`` of the live trainers that recompute: the
# checkpoint captures their per-forward state at the forward and restores it for the recompute.
_RECOMPUTE_STATES: list[weakref.WeakMethod] = []


def use_non_reentrant_checkpoint() -> None:
    """Recompute through ``torch.utils.checkpoint`` (non-reentrant) instead of megatron-core's
    ``CheckpointFunction``.

    megatron's reentrant checkpoint runs its own ``torch.autograd.backward`` over each
    recomputed region. A tensor the region reads without taking it as an input, and whose
    graph reaches outside the region (the pruning masks ``z``, sampled from log α once per
    micro-batch), is then backpropagated through once per region, and the second time its
    saved values are gone: "Trying to backward through the graph a second time". The
    non-reentrant checkpoint recomputes inside the one backward, so ``z``'s graph is traversed
    once, with every region's gradient. Megatron's RNG tracker states are restored for the
    recomputation as its checkpoint does (torch's restores the default generators), and so is
    every live trainer's :meth:`Trainer.recompute_state` (the masks of the micro-batch being
    recomputed: under 1F1B the next micro-batches have sampled theirs before its backward).
    Applied once per process, with CUDA too; ``distribute_saved_activations`` is refused.
    """
    from megatron.core import tensor_parallel

    if getattr(tensor_parallel.checkpoint, "_megashear_non_reentrant", False):
        return

    def checkpoint(function, distribute_saved_activations, *args):
        from torch.utils.checkpoint import checkpoint as torch_checkpoint

        if distribute_saved_activations:
            raise ValueError("distribute_saved_activations is not supported by megashear")
        tracker = tensor_parallel.get_cuda_rng_tracker()
        saved = tracker.get_states()
        holders = [h for h in (ref() for ref in _RECOMPUTE_STATES) if h is not None]
        forward_states = [swap(None) for swap in holders]
        calls = [0]

        def run(*inputs):
            calls[0] += 1
            if calls[0] == 1:  # the forward
                return function(*inputs)
            # the recomputation, in the backward: the forward's RNG and per-forward state (under
            # 1F1B later micro-batches have sampled their own masks since)
            current = tracker.get_states()
            tracker.set_states(saved)
            now = [swap(state) for swap, state in zip(holders, forward_states)]
            try:
                return function(*inputs)
            finally:
                tracker.set_states(current)
                for swap, state in zip(holders, now):
                    swap(state)

        return torch_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

    checkpoint._megashear_non_reentrant = True
    tensor_parallel.checkpoint = checkpoint


def forward_step(data_iterator, model):
    """megatron-core ``forward_step_func``: one micro-batch through one model chunk."""
    return forward_batch(next(data_iterator), model)


def forward_batch(batch: dict, model):
    """Run one micro-batch ``[b, s]`` through ``model``; returns (output, loss_func)."""
    if isinstance(model, TeacherStudentChunk):
        return distill_forward_batch(batch, model)
    tokens = batch["tokens"]
    device = platform.default_device()
    # [b, s]
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(
        tokens.to(device),
        position_ids,
        None,
        labels=batch["labels"].to(device),
    )
    domain_id = batch.get("domain_id")
    return output, partial(
        _loss_func,
        batch["loss_mask"].to(device),
        None if domain_id is None else domain_id.to(device),
        int(batch.get("num_domains", 0)),
    )


class Trainer:
    """Builds model, optimizer and scheduler for this rank and runs training steps.

    Args:
        model_cfg: the LLaMA shape.
        par: the parallel layout (dp is derived from the world size).
        train_cfg: optimisation settings.
        batches: the global-batch source (identical on every rank).
        ckpt_cfg: checkpoint settings; ``load`` resumes, ``init`` (without ``load``) gives the
            initial weights alone, ``save`` + ``save_interval`` saves.
        spec: a megatron-core layer spec, or a function of the ``TransformerConfig`` that
            returns one; ``None`` for the plain LLaMA spec.
        forward_step_func: replaces :func:`forward_step` (the pruning run adds masks).
        distill: distil from ``distill.teacher`` (None or an empty teacher: no distillation).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        par: ParallelConfig,
        train_cfg: TrainConfig,
        batches: BatchSource,
        ckpt_cfg: CheckpointConfig | None = None,
        spec=None,
        forward_step_func: Callable = forward_step,
        distill: DistillConfig | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.model_cfg, self.par, self.cfg = model_cfg, par, train_cfg
        self.ckpt_cfg = ckpt_cfg or CheckpointConfig()
        self.batches = batches
        self.forward_step_func = forward_step_func
        self.dp_size = init_model_parallel(model_cfg, par, seed=train_cfg.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        per_step = self.dp_size * train_cfg.micro_batch_size
        if train_cfg.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={train_cfg.global_batch_size} is not divisible by "
                f"dp={self.dp_size} x micro_batch_size={train_cfg.micro_batch_size}"
            )
        self.num_microbatches = train_cfg.global_batch_size // per_step
        bf16 = train_cfg.bf16 if train_cfg.bf16 is not None else platform.cuda_available()
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.tconfig = recompute_config(build_transformer_config(model_cfg, par, self.dtype), par)
        if callable(spec):
            spec = spec(self.tconfig)
        self.spec = spec if spec is not None else layer_spec()
        chunks = build_model(model_cfg, self.tconfig, self.spec)
        self.prepare_model(chunks)
        self.model = self._wrap_ddp(chunks)
        if par.recompute_granularity != "none":
            _RECOMPUTE_STATES[:] = [r for r in _RECOMPUTE_STATES if r() is not None]
            _RECOMPUTE_STATES.append(weakref.WeakMethod(self.recompute_state))
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.iteration = 0
        # The chunks the training schedule runs: the student's, or student + teacher pairs.
        self.teacher = None
        self.schedule_model = self.model
        if distill is not None and distill.teacher:
            from megashear.training.distill import Teacher, pair_with_teacher

            self.teacher = Teacher(distill, model_cfg, par, self.dtype)
            self.schedule_model = pair_with_teacher(self.model, self.teacher, self.tconfig)
        self.loss_key = "lm loss" if self.teacher is None else "objective"
        if self.ckpt_cfg.save:
            from megashear.checkpoint.publish import remove_stale_saves

            remove_stale_saves(self.ckpt_cfg.save)  # an interrupted save's iter_N.tmp
        if self.ckpt_cfg.load:
            from megashear.training.checkpointing import load_checkpoint

            load_checkpoint(self, self.ckpt_cfg.load)
        elif self.ckpt_cfg.init:
            from megashear.checkpoint.model_state import load_model_weights

            load_model_weights(self.model, model_cfg, self.ckpt_cfg.init)

    # ---------------------------------------------------------------- construction

    def prepare_model(self, chunks: list[torch.nn.Module]) -> None:
        """Hook: change the bare model chunks before DDP wrapping and optimizer creation."""

    def recompute_state(self, state: list | None) -> list:
        """The state a forward sets up before it runs and a recomputation must see again: each
        chunk's pruning masks (``mask_bank.z``, sampled per micro-batch); returns the current
        one and, when ``state`` is not None, puts ``state`` in its place."""
        banks = [getattr(getattr(c, "module", c), "mask_bank", None) for c in self.model]
        current = [None if bank is None else bank.z for bank in banks]
        if state is not None:
            for bank, z in zip(banks, state):
                if bank is not None:
                    bank.z = z
        return current

    def optimizer_overrides(self) -> dict | None:
        """Hook: megatron-core ``config_overrides`` (per-parameter-group LR / weight decay)."""
        return None

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.par.use_distributed_optimizer,
        )
        wrapped = []
        for i, chunk in enumerate(chunks):
            wrapped.append(
                DistributedDataParallel(
                    config=self.tconfig,
                    ddp_config=ddp_config,
                    module=chunk,
                    disable_bucketing=i > 0,
                )
            )
        from megatron.core.distributed import finalize_model_grads

        # The schedules call this after the last backward: DP all-reduce of the grad buffers
        # (and the PP / SP reductions megatron-core needs).
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = (
            wrapped[0].no_sync if len(wrapped) == 1 else [m.no_sync for m in wrapped]
        )
        platform.install("training")
        return wrapped

    def optimizer_config(self):
        from megatron.core.optimizer import OptimizerConfig

        c = self.cfg
        return OptimizerConfig(
            optimizer="adam",
            lr=c.lr,
            min_lr=c.min_lr,
            weight_decay=c.weight_decay,
            adam_beta1=c.adam_beta1,
            adam_beta2=c.adam_beta2,
            adam_eps=c.adam_eps,
            clip_grad=c.clip_grad,
            bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype,
            use_distributed_optimizer=self.par.use_distributed_optimizer,
        )

    def _build_optimizer(self):
        from megatron.core.optimizer import get_megatron_optimizer

        optimizer = get_megatron_optimizer(
            self.optimizer_config(), self.model, config_overrides=self.optimizer_overrides()
        )
        platform.install("training")
        return optimizer

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c = self.cfg
        gbs = c.global_batch_size
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=c.lr,
            min_lr=c.min_lr,
            lr_warmup_steps=c.lr_warmup_iters * gbs,
            lr_decay_steps=max(c.train_iters, c.lr_warmup_iters + 1) * gbs,
            lr_decay_style=c.lr_decay_style,
            start_wd=c.weight_decay,
            end_wd=c.weight_decay,
            wd_incr_steps=max(c.train_iters, 1) * gbs,
            wd_incr_style="constant",
            # On resume the config's schedule wins and only the step count comes from the
            # checkpoint (megatron --override-opt_param-scheduler): a resumed run trains at the
            # lr / min_lr / warm-up / decay / train_iters it is given and records in config.yaml.
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
        )

    # ---------------------------------------------------------------- stepping

    def _data_iterators(self, microbatches: list[dict]):
        if len(self.model) == 1:
            return iter(microbatches)
        # Interleaved schedule: one iterator per model chunk over the same micro-batches.
        return [iter(list(microbatches)) for _ in self.model]

    def run_schedule(
        self, microbatches: list[dict], forward_only: bool, with_teacher: bool = False
    ) -> list[dict]:
        """Run megatron-core's forward(-backward) schedule over this rank's micro-batches
        (through student and teacher when ``with_teacher`` and distilling)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=self.forward_step_func,
            data_iterator=self._data_iterators(microbatches),
            model=self.schedule_model if with_teacher else self.model,
            num_microbatches=len(microbatches),
            seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    def reduce_sums(self, reports: list[dict], key: str) -> torch.Tensor:
        """``key`` summed over micro-batches and DP ranks, broadcast from the last stage."""
        from megatron.core import parallel_state as ps

        totals = None
        for report in reports:
            value = report[key].double().cpu()
            totals = value if totals is None else totals + value
        width = 0 if totals is None else totals.numel()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # stages other than the last have no reports: agree on the width first
            w = torch.tensor([width], device=platform.default_device())
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(w, src=last, group=ps.get_pipeline_model_parallel_group())
            width = int(w.item())
        if totals is None:
            totals = torch.zeros(width, dtype=torch.float64)
        totals = totals.to(platform.default_device())
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(totals, src=last, group=ps.get_pipeline_model_parallel_group())
        return totals.cpu()

    def reduce_loss(self, reports: list[dict], key: str = "lm loss") -> float:
        """Token-weighted mean of ``key`` over micro-batches, DP ranks and (broadcast) stages."""
        totals = self.reduce_sums(reports, key)
        return float(totals[0] / totals[1].clamp(min=1))

    def domain_train_losses(
        self, reports: list[dict], key: str = "domain loss"
    ) -> dict[str, float]:
        """Per-domain training loss of the step (token-weighted), when batches carry domains."""
        names = getattr(self.batches, "names", None)
        if not names:
            return {}
        totals = self.reduce_sums(reports, key)
        k = len(names)
        return {
            n: float(totals[i] / totals[k + i]) for i, n in enumerate(names) if totals[k + i] > 0
        }

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch. Returns loss, lr, grad_norm, tokens/s."""
        start = time.perf_counter()
        batch = self.batches.next_global_batch(self.cfg.global_batch_size)
        microbatches = split_for_rank(batch, self.dp_rank, self.dp_size, self.cfg.micro_batch_size)
        num_domains = len(getattr(self.batches, "names", None) or [])
        for i, mb in enumerate(microbatches):
            mb["iteration"] = self.iteration
            mb["microbatch"] = self.dp_rank * len(microbatches) + i  # global index
            mb["num_domains"] = num_domains
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.run_schedule(microbatches, forward_only=False, with_teacher=True)
        loss = self.reduce_loss(reports, self.loss_key)  # the same on every rank
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss of step {self.iteration + 1} is {loss}; stopping before its update "
                f"(lower train.lr = {self.cfg.lr:g} or set train.clip_grad)"
            )
        extra = self.after_backward()
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise FloatingPointError(f"optimizer step {self.iteration + 1} was skipped")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteLossError(
                f"the gradient norm of step {self.iteration + 1} is {float(grad_norm)}; stopping "
                f"without saving it (lower train.lr = {self.cfg.lr:g})"
            )
        self.after_optimizer_step()
        self.scheduler.step(increment=self.cfg.global_batch_size)
        self.iteration += 1
        if num_domains:
            extra["domain_loss"] = self.domain_train_losses(reports)
        if self.teacher is not None:
            extra["lm_loss"] = self.reduce_loss(reports, "lm loss")
            extra["kd_loss"] = self.reduce_loss(reports, "kd loss")
            if num_domains:
                extra["domain_kd_loss"] = self.domain_train_losses(reports, "domain kd loss")
        elapsed = time.perf_counter() - start
        tokens = batch["loss_mask"].numel()
        return {
            **extra,
            "iteration": self.iteration,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed,
        }

    def extra_meta(self) -> dict:
        """More entries for the checkpoint's ``megashear.json``: the teacher's path and
        fingerprint when distilling (subclasses add theirs)."""
        return {} if self.teacher is None else {"distill": self.teacher.record()}

    def extra_state(self) -> dict:
        """More state for the checkpoint (identical on every rank; saved once)."""
        return {} if self.teacher is None else {"distill": self.teacher.record()}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved; a distillation run refuses to resume with
        another teacher than the one it was trained with."""
        saved = state.get("distill")
        if saved is None or self.teacher is None:
            return
        if saved["fingerprint"] != self.teacher.fingerprint:
            from megashear.checkpoint.format import CheckpointError

            raise CheckpointError(
                f"distill.teacher {self.teacher.cfg.teacher} is not the teacher this checkpoint "
                f"was trained with ({saved['teacher']}, fingerprint {saved['fingerprint']} != "
                f"{self.teacher.fingerprint})"
            )

    def after_optimizer_step(self) -> None:
        """Hook: right after a successful optimizer step."""

    def after_backward(self) -> dict[str, float]:
        """Hook between the schedule's backward and the optimizer step; returns extra stats."""
        return {}

    @torch.no_grad()
    def run_schedule_eval(self, batch: dict[str, torch.Tensor]) -> list[dict]:
        """Forward-only schedule over this rank's slice of ``batch`` in eval mode."""
        for chunk in self.model:
            chunk.eval()
        try:
            microbatches = split_for_rank(
                batch, self.dp_rank, self.dp_size, self.cfg.micro_batch_size
            )
            return self.run_schedule(microbatches, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()

    def evaluate(self, batch: dict[str, torch.Tensor]) -> float:
        """Token-weighted mean loss of a global batch, forward only."""
        return self.reduce_loss(self.run_schedule_eval(batch))

    @torch.no_grad()
    def gather_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full logits ``[B, s, v]`` of a global batch on every rank (for tests and tools)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        vocab = self.model_cfg.vocab_size

        def step(data_iterator, model):
            mb = next(data_iterator)
            tokens = mb["tokens"].to(platform.default_device())
            pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            out = model(tokens, pos, None)

            def collect(output, non_loss_data=False):
                # [b, s, v_pad/tp] -> [b, s, v] (the vocabulary padding dropped)
                full = gather_from_tensor_model_parallel_region(output)
                return full[..., :vocab].float()

            return out, collect

        for chunk in self.model:
            chunk.eval()
        microbatches = split_for_rank(batch, self.dp_rank, self.dp_size, self.cfg.micro_batch_size)
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=self._data_iterators(microbatches),
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=batch["tokens"].shape[1],
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
        for chunk in self.model:
            chunk.train()
        b, s = batch["tokens"].shape
        local = torch.zeros(b // self.dp_size, s, self.model_cfg.vocab_size)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            local = torch.cat(list(outputs), dim=0).cpu()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(local, src=last, group=ps.get_pipeline_model_parallel_group())
        if self.dp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.dp_size)]
        dist.all_gather(parts, local, group=ps.get_data_parallel_group())
        return torch.cat(parts, dim=0)

    def train(
        self,
        iterations: int | None = None,
        callback: Callable[[dict], None] | None = None,
        signals=None,
    ) -> list[dict]:
        """Run until ``train_iters`` (or ``iterations`` more steps); checkpoint on schedule.

        With ``signals`` (an :class:`~megashear.training.signals.ExitSignals`), stop after the
        first step at which any rank has received SIGTERM / SIGINT; ``self.exit_signal`` is
        then that signal's number (else 0).
        """
        end = self.cfg.train_iters if iterations is None else self.iteration + iterations
        history = []
        self.exit_signal = 0
        while self.iteration < end:
            stats = self.train_step()
            history.append(stats)
            if callback is not None:
                callback(stats)
            if self.iteration % self.cfg.log_interval == 0 and dist.get_rank() == 0:
                logger.info(
                    "iter %d | loss %.6f | lr %.3e | grad norm %.3f | %.0f tokens/s",
                    stats["iteration"],
                    stats["loss"],
                    stats["lr"],
                    stats["grad_norm"],
                    stats["tokens_per_s"],
                )
            interval = self.ckpt_cfg.save_interval
            if self.ckpt_cfg.save and interval and self.iteration % interval == 0:
                self.save()
            if signals is not None and self.iteration < end:
                self.exit_signal = signals.agreed()
                if self.exit_signal:
                    break
        return history

    def save(self) -> str:
        """Checkpoint everything to ``ckpt_cfg.save``; returns the checkpoint directory."""
        from megashear.training.checkpointing import save_checkpoint

        if not self.ckpt_cfg.save:
            raise ValueError("no checkpoint directory configured (checkpoint.save)")
        return save_checkpoint(self, self.ckpt_cfg.save, keep_last=self.ckpt_cfg.keep_last)
