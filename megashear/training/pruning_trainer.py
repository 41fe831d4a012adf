"""The pruning run: the masked model trains on LM loss + Lagrangian under any TP/PP/DP.

On top of :class:`Trainer` this adds, per step:

1. masks sampled per micro-batch from keyed noise (identical for every layout);
2. after the schedule's backward, the Lagrangian term: the expected sparsity of every pruned
   kind is made global (TP partial sums all-reduced, per-layer rows all-gathered over PP) with
   gradients flowing only into this rank's own log α, and its gradient is added to the mask
   gradients; the hidden mask's gradient is then summed over pipeline stages;
3. λ takes a gradient-ascent step with its own AdamW (``maximize=True``), and the model and log α
   take their step in megatron's optimizer (log α in its own parameter group, no weight decay).

Evaluation uses the deterministic masks (docs/method.md §2), computed from the gathered full log α.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megashear.checkpoint.pruning_record import PruningRecord
from megashear.config import (
    CheckpointConfig,
    DistillConfig,
    ParallelConfig,
    PruningConfig,
    TrainConfig,
)
from megashear.model_config import ModelConfig
from megashear.models import mask_collectives
from megashear.models.masked import MaskBank, attach_mask_bank, masked_block_spec
from megashear.pruning import hard_concrete as hc
from megashear.pruning.lagrangian import Lagrangian, expected_num_parameters
from megashear.training.batches import BatchSource
from megashear.training.trainer import Trainer, forward_batch

logger = logging.getLogger(__name__)


def masked_forward_step(data_iterator, model):
    """``forward_step_func`` of the pruning run: sample (training) masks, then forward."""
    from megatron.core.utils import get_attr_wrapped_model

    batch = next(data_iterator)
    bank = get_attr_wrapped_model(model, "mask_bank")
    if model.training:
        bank.sample(int(batch["iteration"]), int(batch["microbatch"]))
    return forward_batch(batch, model)


class PruningTrainer(Trainer):
    """Trainer for the masked model. ``target_cfg`` is the shape to prune toward; ``distill``
    adds a teacher's KD loss to the LM loss (the Lagrangian is unchanged).

    ``init_log_alpha`` (full tensors per pruned kind, e.g.
    :func:`megashear.pruning.importance.importance_log_alpha`) replaces the N(mean, 0.01)
    initialisation, and the target sparsity then holds from step 0 (no warm-up: the masks start
    at the target). ``pinned_hidden`` channels are never sampled (z = 1) and always kept
    (docs/method.md §8). A resumed run takes its log α from the checkpoint.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        target_cfg: ModelConfig,
        pruning_cfg: PruningConfig,
        par: ParallelConfig,
        train_cfg: TrainConfig,
        batches: BatchSource,
        ckpt_cfg: CheckpointConfig | None = None,
        distill: DistillConfig | None = None,
        init_log_alpha: dict[str, torch.Tensor] | None = None,
        pinned_hidden: list[int] | tuple[int, ...] = (),
    ) -> None:
        from megashear.pruning.targets import target_sparsities, validate_target

        if par.vpp is not None:
            raise ValueError("pruning does not support virtual pipeline stages (vpp)")
        validate_target(model_cfg, target_cfg)
        self.target_cfg, self.pcfg = target_cfg, pruning_cfg
        targets = target_sparsities(model_cfg, target_cfg, tuple(pruning_cfg.kinds))
        # A kind whose dimension the target keeps whole has nothing to prune: without this its
        # lambda would climb for ever against the ~0.002 floor of the expected sparsity.
        self.targets = {k: t for k, t in targets.items() if t > 0}
        self.kinds = tuple(self.targets)
        if not self.kinds:
            raise ValueError("the target is the source shape: nothing to prune")
        dropped = sorted(set(targets) - set(self.targets))
        if dropped:
            logger.info("not pruning %s: the target keeps those dimensions whole", dropped)
        if init_log_alpha is not None and not set(self.kinds) <= set(init_log_alpha):
            missing = sorted(set(self.kinds) - set(init_log_alpha))
            raise ValueError(f"initial log alpha lacks the pruned kinds {missing}")
        self.init_log_alpha = init_log_alpha
        self.pinned_hidden = sorted(pinned_hidden) if "hidden" in self.kinds else []
        # masks that start at the target hold it from step 0 (a resumed run too)
        at_target = init_log_alpha is not None or pruning_cfg.init == "importance"
        self.init_kind = "importance" if at_target else "paper"
        warmup = 0 if at_target else pruning_cfg.lagrangian_warmup_steps
        self.lagrangian = Lagrangian(self.targets, warmup)
        self.lambda_optimizer = self.lagrangian.make_optimizer(lr=pruning_cfg.lr_lambda)
        super().__init__(
            model_cfg,
            par,
            train_cfg,
            batches,
            ckpt_cfg,
            spec=lambda tconfig: masked_block_spec(tconfig, model_cfg.head_dim),
            forward_step_func=masked_forward_step,
            distill=distill,
        )

    # ---------------------------------------------------------------- construction

    def prepare_model(self, chunks: list[torch.nn.Module]) -> None:
        from megatron.core import parallel_state as ps

        cfg = self.model_cfg
        for chunk in chunks:
            layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
            bank = MaskBank(
                self.kinds,
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.ffn_hidden_size,
                cfg.num_layers,
                layers,
                tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=ps.get_tensor_model_parallel_world_size(),
                seed=self.pcfg.seed,
                init_mean=self.pcfg.log_alpha_init_mean,
                pinned_hidden=self.pinned_hidden,
                log_alpha_min=hc.log_alpha_floor(self.init_kind),
                sequence_parallel=self.par.sequence_parallel,
            ).to(next(chunk.parameters()).device)
            if self.init_log_alpha is not None:
                bank.load_full_log_alpha({k: self.init_log_alpha[k] for k in self.kinds})
            bank.hold_pinned()
            if ps.get_pipeline_model_parallel_rank() > 0 and "hidden" in self.kinds:
                # Replicated on every stage: megatron's grad norm counts "shared" params once.
                bank.hidden_log_alpha.shared = True
            attach_mask_bank(chunk, bank)
        self.banks = [c.mask_bank for c in chunks]

    def optimizer_overrides(self) -> dict:
        """log α in its own group: peak LR ``lr_log_alpha`` on the model's schedule, no decay.

        ``max_lr``/``min_lr`` set the group's schedule (min scaled like the model's). megatron
        matches checkpointed groups by ``(wd_mult, lr_mult, ...)``, and the scheduler of 0.16
        does not read ``lr_mult``; so ``lr_mult`` carries the LR ratio only to tell this group
        apart from the norms' (``wd_mult`` 0 too).
        """
        from megatron.core.optimizer import ParamKey, get_standard_config_overrides

        if self.cfg.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.cfg.lr}")
        ratio = self.pcfg.lr_log_alpha / self.cfg.lr
        overrides = get_standard_config_overrides(self.optimizer_config())
        overrides[ParamKey(attr="mask_kind")] = {
            "max_lr": self.pcfg.lr_log_alpha,
            "min_lr": self.cfg.min_lr * ratio,
            "lr_mult": ratio if ratio != 1.0 else 1.0 + 1e-9,
            "wd_mult": 0.0,
        }
        return overrides

    # ---------------------------------------------------------------- expected sparsity

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Global expected sparsity per kind (see :mod:`megashear.models.mask_collectives`)."""
        return mask_collectives.expected_sparsity(self.banks[0])

    # ---------------------------------------------------------------- stepping

    def after_backward(self) -> dict[str, float]:
        from megatron.core import parallel_state as ps

        sparsity = self.expected_sparsity()
        self.lambda_optimizer.zero_grad(set_to_none=True)
        lag_loss = self.lagrangian(sparsity, self.iteration)
        lag_loss.backward()
        bank = self.banks[0]
        if "hidden" in self.kinds and ps.get_pipeline_model_parallel_world_size() > 1:
            param = bank.hidden_log_alpha
            grad = param.main_grad  # [h]
            if self.par.use_distributed_optimizer:
                # The DP reduce-scatter left the DP-reduced gradient in this rank's shard of the
                # buffer only; rebuild the whole [h] from the owners before the sum over stages
                # (the shard boundaries differ between stages).
                owned = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
                for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                    where = getattr(opt, "model_param_gbuf_map", {}).get(param)
                    if where is None:
                        continue
                    buffer, dtype, bucket = where
                    ranges = opt.gbuf_ranges[buffer][dtype][bucket]["param_map"].get(param)
                    if ranges is not None:
                        owned[ranges["param"].start : ranges["param"].end] = True
                grad.view(-1).masked_fill_(~owned, 0.0)
                dist.all_reduce(grad, group=ps.get_data_parallel_group())
            dist.all_reduce(grad, group=ps.get_pipeline_model_parallel_group())
        self.lambda_optimizer.step()
        stats = {"lagrangian": float(lag_loss.detach())}
        for kind, value in sparsity.items():
            stats[f"expected_sparsity/{kind}"] = float(value.detach().mean())
            stats[f"target_sparsity/{kind}"] = float(
                self.lagrangian.target_at(kind, self.iteration)
            )
        for key, value in self.lagrangian.lambda_values().items():
            which, kind = key.split("/", 1)  # "lambda_1/head" -> "lambda/head_1"
            stats[f"lambda/{kind}_{which[-1]}"] = value
        keep = self.gather_full(
            lambda bank, kind: hc.keep_probability(bank.log_alpha(kind), bank.log_alpha_min)
        )
        stats["expected_params"] = float(
            expected_num_parameters(self.model_cfg, keep, include_embeddings=True)
        )
        return stats

    def pruning_record(self) -> PruningRecord:
        """This run's pruning record (source and target shapes, kinds, init, pinned channels)."""
        return PruningRecord(
            source=self.model_cfg,
            target=self.target_cfg,
            kinds=self.kinds,
            init=self.init_kind,
            pinned_hidden=tuple(self.pinned_hidden),
        )

    def extra_meta(self) -> dict:
        """What ``megashear finalize`` needs: the pruning record (:mod:`~megashear.checkpoint.
        pruning_record`: the pruned kinds, the target shape, the init, the pinned channels)."""
        return {**super().extra_meta(), **self.pruning_record().to_meta()}

    def extra_state(self) -> dict:
        return {
            **super().extra_state(),
            "lagrangian": self.lagrangian.state_dict(),
            "lambda_optimizer": self.lambda_optimizer.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "lagrangian" in state:
            self.lagrangian.load_state_dict(state["lagrangian"])
            self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])

    def after_optimizer_step(self) -> None:
        for bank in self.banks:
            for kind in bank.kinds:
                hc.clamp_log_alpha_(bank.log_alpha(kind), bank.log_alpha_min)
            bank.hold_pinned()

    # ---------------------------------------------------------------- deterministic masks

    def gather_full(self, getter) -> dict[str, torch.Tensor]:
        """Full per-kind tensors on every rank (see :mod:`megashear.models.mask_collectives`)."""
        return mask_collectives.gather_full(self.banks[0], getter)

    def gather_log_alpha(self) -> dict[str, torch.Tensor]:
        """Full log α per kind, on every rank."""
        return self.gather_full(lambda bank, kind: bank.log_alpha(kind))

    def target_sizes(self) -> dict[str, int]:
        """Entries kept per kind at the target shape (per layer for head/intermediate)."""
        from megashear.pruning.targets import target_sizes

        return target_sizes(self.target_cfg, self.kinds)

    def use_deterministic_masks(self, sizes: dict[str, int] | None = None) -> dict:
        """Switch every chunk to deterministic masks; returns the full masks per kind.

        Args:
            sizes: kept entries per kind (per layer for head/intermediate); ``None`` keeps the
                rounded expected number (evaluation during pruning).
        """
        full = hc.deterministic_masks(
            self.gather_log_alpha(),
            sizes,
            num_query_groups=self.model_cfg.num_query_groups,
            target_query_groups=self.target_cfg.num_query_groups if sizes else None,
            pinned_hidden=self.pinned_hidden,
            floor=hc.log_alpha_floor(self.init_kind),
        )
        for bank in self.banks:
            bank.set_masks(bank.local_slices(full))
        return full

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> float:
        """LM loss of a global batch under the current deterministic masks."""
        self.use_deterministic_masks()
        try:
            return super().evaluate(batch)
        finally:
            for bank in self.banks:
                bank.set_masks(None)
