"""Dynamic batch loading (docs/method.md §5) wired into a trainer.

Every ``interval`` steps: the per-domain validation loss (token-weighted mean over each domain's
fixed validation batch; computed on the last pipeline stage, summed over DP and broadcast, so
every rank holds the same numbers; a pruning trainer evaluates with its deterministic masks),
then the update rule (a pure function of weights, losses, reference losses, η and c), then the
sampler's new weights, which reach the next global batch. Every update is logged as a
``domain_update`` event (losses, reference, excess, weights) and as TensorBoard scalars.
"""

from __future__ import annotations

import logging

import numpy as np

from megashear.data.update_rules import get_rule

logger = logging.getLogger(__name__)


def domain_losses(trainer, valid: dict) -> dict[str, float]:
    """Per-domain validation loss (token-weighted), identical on every rank.

    Each domain's batch is cut to a multiple of dp x micro-batch rows.
    """
    unit = trainer.dp_size * trainer.cfg.micro_batch_size
    losses = {}
    for name, batch in valid.items():
        n = batch["tokens"].shape[0] // unit * unit
        if n == 0:
            raise ValueError(
                f"domain {name}: {batch['tokens'].shape[0]} validation sequences are fewer than "
                f"dp x micro_batch_size = {unit}"
            )
        losses[name] = trainer.evaluate({k: v[:n] for k, v in batch.items()})
    return losses


class DynamicBatchLoading:
    """Args:
    batches: the trainer's :class:`~megashear.data.loader.DomainBatches`.
    valid: domain -> fixed validation batch ``[n, s]``.
    reference: domain -> reference loss (required unless the rule is ``constant``).
    rule, eta, smoothing, interval: the update (``data.update_rule`` etc.).
    log: a :class:`~megashear.training.run_log.RunLog` (or None).
    p2_predict: ``(step, L0) -> predicted loss`` of a fitted P² law (or None): each update then
        also logs ``p2`` = {observed, predicted}, the unweighted mean of the domains' losses and
        the law's loss with L0 the mean of the reference losses.
    """

    def __init__(
        self,
        batches,
        valid,
        reference,
        rule="paper",
        eta=1.0,
        smoothing=1e-4,
        interval=50,
        log=None,
        p2_predict=None,
    ) -> None:
        self.batches, self.valid = batches, valid
        self.names = batches.names
        if rule != "constant" and reference is None:
            raise ValueError(
                f"update rule {rule!r} needs a reference loss for every domain: fill "
                "reference_loss in the manifest (tools/fit_reference_loss.py, or the source "
                "model's losses from megashear evaluate) or use data.update_rule=constant"
            )
        self.reference = reference
        self.rule_name, self.rule = rule, get_rule(rule)
        self.eta, self.smoothing, self.interval, self.log = eta, smoothing, interval, log
        if p2_predict is not None and reference is None:
            raise ValueError(
                "logging.p2_law needs the source's loss L0: fill reference_loss in the manifest "
                "(megashear evaluate --data.write_reference on the source)"
            )
        self.p2_predict = p2_predict

    def domain_losses(self, trainer) -> dict[str, float]:
        return domain_losses(trainer, self.valid)

    def update(self, trainer) -> dict:
        losses = self.domain_losses(trainer)
        old = self.batches.sampler.weights
        record = {"losses": losses, "weights_before": dict(zip(self.names, old.tolist()))}
        if self.reference is not None:
            ref = np.array([self.reference[n] for n in self.names])
            loss = np.array([losses[n] for n in self.names])
            new = self.rule(old, loss, ref, eta=self.eta, smoothing=self.smoothing)
            record["reference"] = dict(self.reference)
            record["excess"] = dict(zip(self.names, (loss - ref).tolist()))
            if self.p2_predict is not None:
                predicted = self.p2_predict(trainer.iteration, float(ref.mean()))
                if predicted is not None:
                    record["p2"] = {"observed": float(loss.mean()), "predicted": predicted}
                    logger.info(
                        "step %d: validation loss %.4f, P² law %.4f",
                        trainer.iteration,
                        record["p2"]["observed"],
                        predicted,
                    )
        else:
            new = old
        self.batches.sampler.set_weights(new)
        record["weights"] = dict(zip(self.names, self.batches.sampler.weights.tolist()))
        if self.log is not None:
            self.log.log("domain_update", trainer.iteration, record)
        logger.info("domain weights at step %d: %s", trainer.iteration, record["weights"])
        return record

    def __call__(self, trainer, stats: dict) -> None:
        if self.interval and trainer.iteration % self.interval == 0:
            self.update(trainer)
