"""``megashear one-shot``: cut a checkpoint to a target shape without learned masks.

``method=importance`` cuts the least important units by the activation importance of
``megashear importance`` (:func:`megashear.pruning.importance.importance_masks`: GQA-aware,
KV groups may go); ``method=leading`` keeps the leading units
(:func:`megashear.pruning.one_shot.leading_masks`), a floor that uses no information. Either
way the survivors' masks are exactly 1, so the weights are only sliced; the dense result is
streamed from the source one tensor at a time, like finalisation
(:func:`megashear.jobs.finalize.write_plan`), chunked for ``parallel.tp`` × ``parallel.pp``, and
is a plain model checkpoint that ``megashear train`` continues.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from megashear.config import OneShotConfig, PruningConfig
from megashear.jobs.common import UsageError, pruning_target

logger = logging.getLogger(__name__)

# pruning fields a one-shot cut reads; any other one given is refused (it would do nothing)
_TARGET_KEYS = {"target"} | {
    f.name for f in dataclasses.fields(PruningConfig) if f.name.startswith("target_")
}


def _refuse_unused(cfg: OneShotConfig) -> None:
    defaults = PruningConfig()
    for f in dataclasses.fields(PruningConfig):
        if f.name not in _TARGET_KEYS and getattr(cfg.pruning, f.name) != getattr(defaults, f.name):
            raise UsageError(f"pruning.{f.name} does not apply to a one-shot cut")


def run(cfg: OneShotConfig) -> dict:
    from megashear.checkpoint.dist_stream import CheckpointReader
    from megashear.checkpoint.format import fingerprint
    from megashear.checkpoint.publish import check_output_path
    from megashear.jobs.finalize import write_plan
    from megashear.jobs.importance import scores_path
    from megashear.models.llama import validate_layout
    from megashear.pruning.finalize import plan_finalization
    from megashear.pruning.importance import importance_masks, load_scores
    from megashear.pruning.one_shot import leading_masks
    from megashear.pruning.targets import validate_target

    if not cfg.checkpoint.load or not cfg.checkpoint.save:
        raise UsageError("one-shot needs checkpoint.load (the source) and checkpoint.save")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UsageError("one-shot runs in a single process (launch it without torchrun)")
    _refuse_unused(cfg)
    check_output_path(cfg.checkpoint.load, cfg.checkpoint.save, cfg.overwrite)
    source = cfg.model
    target = pruning_target(cfg)
    validate_target(source, target)
    validate_layout(target, cfg.parallel, cfg.parallel.tp * cfg.parallel.pp)
    record = {"method": cfg.method, "source": os.path.abspath(cfg.checkpoint.load)}
    if cfg.method == "importance":
        path = scores_path(cfg)
        scores = load_scores(path, source, fingerprint(cfg.checkpoint.load))["scores"]
        masks = importance_masks(scores, source, target)
        record["importance"] = os.path.abspath(path)
    else:
        masks = leading_masks(source, target)
    plan = plan_finalization(source, masks, target)
    reader = CheckpointReader(cfg.checkpoint.load)
    write_plan(
        reader,
        plan,
        cfg.checkpoint.save,
        overwrite=cfg.overwrite,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        extra_meta={"one_shot": {**record, "source_model": source.to_dict()}},
    )
    logger.info("one-shot (%s) cut written to %s", cfg.method, cfg.checkpoint.save)
    return {
        "saved": cfg.checkpoint.save,
        "method": cfg.method,
        "model": plan.config.to_dict(),
        "parameters": plan.config.num_parameters(),
        "source_parameters": source.num_parameters(),
    }
