"""megashear: shear a large LLaMA into a strong smaller one, every stage one sub-command.

Each sub-command (the table ``COMMANDS`` at the end of this module) takes ``--config FILE.yaml``
(repeatable; later files win) and one ``--section.field=value`` flag per field of its config
dataclass (see :mod:`megashear.config_io`). Launch it with torchrun for several ranks; a plain
``megashear ...`` is a world of one. Bad input (unknown key, wrong type, missing file, infeasible
target) ends with a one-line ``error:`` and exit code 2. A command that returns a result prints
it as the last line of stdout, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from megashear import config_io
from megashear.config import OneShotConfig, RunConfig
from megashear.config_io import ConfigError
from megashear.jobs.common import UsageError, make_batches, pruning_target
from megashear.jobs.convert import ConvertConfig
from megashear.jobs.fit_reference import FitReferenceConfig
from megashear.jobs.preprocess import PreprocessConfig
from megashear.model_config import WEIGHT_FIELDS, ModelConfig, get_preset, model_differences
from megashear.planning import PlanConfig
from megashear.scaling.p2_config import FitP2Config
from megashear.training.errors import NonFiniteLossError

logger = logging.getLogger("megashear")


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (unknown flag, bad choice, missing argument) are one
    ``error: ...`` line and exit code 2, as every other bad input, instead of a usage block.
    Sub-parsers inherit it; the tools use it too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a YAML or library message may span several)."""
    return " ".join(str(exc).split())


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``megashear`` sub-command.

    Args:
        target: ``"module:function"``, imported only when the command runs (``--help`` stays
            light); the function takes the resolved config and returns an exit code, ``None``
            (0), or a dict that rank 0 prints as the last line of stdout, one JSON object.
        help: the one-line description ``megashear --help`` lists.
        config: the command's config dataclass (``RunConfig`` or a subclass, or a class of its
            own); YAML files and ``--section.field=value`` flags fill it alike.
        sections: the config's top-level fields offered as flags (None: all of them).
    """

    target: str
    help: str
    config: type = RunConfig
    sections: tuple[str, ...] | None = None

    def function(self) -> Callable:
        import importlib

        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="megashear", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", action="append", default=[], help="YAML config file(s)")
        config_io.add_arguments(p, command.config, command.sections)
    return parser


def resolve_config(args: argparse.Namespace, cls: type = RunConfig):
    """YAML files and overrides -> the command's config (``RunConfig`` or a subclass of it;
    any other config class is filled from its files and flags alone).

    Without ``checkpoint.load``, ``model_preset`` supplies the model defaults. With it, the
    checkpoint's model (``megashear.json``) is the base of ``cfg.model``: a preset, a YAML
    ``model:`` section and ``--model.*`` flags may restate its fields but only change
    ``seq_length`` (which changes no weight); any other field given with another value is a
    :class:`ConfigError` naming every contradiction.
    """
    if not issubclass(cls, RunConfig):
        return config_io.resolve(cls, args.config, args)
    preset = None
    for path in args.config:
        preset = config_io.load_yaml(path).get("model_preset", preset)
    preset = getattr(args, "cfg:model_preset", preset)
    preset_model = None
    if preset:
        try:
            preset_model = get_preset(str(preset))
        except ValueError as exc:
            raise ConfigError(f"config key 'model_preset': {exc}") from exc
    base = {"model": preset_model.to_dict()} if preset_model else {}
    cfg = config_io.resolve(cls, args.config, args, base=base)
    _resolve_init(cfg)
    if _fresh_resumable_start(cfg):
        logger.info("no checkpoint in %s yet: starting from scratch", cfg.checkpoint.load)
        cfg.checkpoint.load = None
    if cfg.checkpoint.load or cfg.checkpoint.init:
        shape_from = cfg.checkpoint.load or cfg.checkpoint.init
        cfg.model = _checkpoint_model(shape_from, args, preset_model, str(preset))
    return cfg


def _resolve_init(cfg: RunConfig) -> None:
    """``checkpoint.init``: resume from ``checkpoint.save`` once it holds a checkpoint (``init``
    is then dropped), else keep ``init`` for the trainer to load its weights."""
    from megashear.checkpoint.format import TRACKER

    ck = cfg.checkpoint
    if not ck.init:
        return
    if ck.load:
        raise ConfigError(
            "give checkpoint.load (resume or start from it) or checkpoint.init (start from it "
            "until checkpoint.save holds a checkpoint), not both"
        )
    if not ck.save:
        raise ConfigError("checkpoint.init needs checkpoint.save (where a relaunch resumes from)")
    if os.path.isfile(os.path.join(ck.save, TRACKER)):
        logger.info("resuming from %s (checkpoint.init %s is not used)", ck.save, ck.init)
        ck.load, ck.init = ck.save, None
    else:
        logger.info("no checkpoint in %s yet: starting from the weights of %s", ck.save, ck.init)


def _fresh_resumable_start(cfg: RunConfig) -> bool:
    """``checkpoint.load`` equal to ``checkpoint.save`` with nothing saved there yet: the first
    launch of a command line that a relaunch (torchrun ``--max-restarts``, a requeued Slurm
    job) repeats to resume, as megatron does when ``--load`` holds no checkpoint."""
    from megashear.checkpoint.format import META, TRACKER

    load, save = cfg.checkpoint.load, cfg.checkpoint.save
    if not load or not save or os.path.realpath(load) != os.path.realpath(save):
        return False
    return not any(os.path.exists(os.path.join(load, f)) for f in (TRACKER, META))


def _checkpoint_model(
    load: str, args: argparse.Namespace, preset_model: ModelConfig | None, preset: str
) -> ModelConfig:
    """The model of checkpoint ``load``, with the explicitly given ``seq_length``, if any."""
    from megashear.checkpoint.format import read_meta, resolve

    saved = ModelConfig.from_dict(read_meta(resolve(load))["model"])
    # Where each model field was set explicitly (later sources win): preset < YAML < flags.
    given: dict[str, str] = {}
    if preset_model is not None:
        for name in preset_model.to_dict():
            given[name] = f"model_preset={preset}"
    for key, label in config_io.given_keys(args.config, args).items():
        if key.startswith("model."):
            given[key[len("model.") :]] = label
    if not given:
        return saved
    # The checkpoint's model under the explicit settings (None-valued fields, such as
    # num_query_groups or kv_channels, then take their meaning from the merged model).
    base = {
        "model": config_io.merge(saved.to_dict(), preset_model.to_dict() if preset_model else {})
    }
    merged = config_io.resolve(RunConfig, args.config, args, base=base).model
    differing = {d.split(":")[0] for d in model_differences(merged, saved)}
    contradictions = []
    for name in WEIGHT_FIELDS:
        name_shown = "head_dim" if name == "kv_channels" else name
        if name in given and name_shown in differing:
            theirs = getattr(saved, name_shown)
            contradictions.append((given[name], f"{name_shown} {config_io.format_value(theirs)}"))
    if contradictions:
        sources = list(dict.fromkeys(source for source, _ in contradictions))
        verb = "contradicts" if len(sources) == 1 else "contradict"
        raise ConfigError(
            f"{', '.join(sources)} {verb} checkpoint {load} "
            f"({', '.join(saved_value for _, saved_value in contradictions)})"
        )
    return dataclasses.replace(saved, seq_length=merged.seq_length)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def write_resolved_config(cfg: RunConfig) -> None:
    """Rank 0 writes the resolved config beside the logs and the checkpoints."""
    if not _is_rank0():
        return
    for directory in {cfg.logging.dir, cfg.checkpoint.save}:
        if directory:
            os.makedirs(directory, exist_ok=True)
            config_io.dump_yaml(cfg, os.path.join(directory, "config.yaml"))


def make_dynamic_loading(cfg: RunConfig, trainer, log, kind: str = "train"):
    """Dynamic batch loading for a manifest-driven run (None otherwise). With
    ``logging.p2_law``, a ``train`` run's updates also log the P² law's predicted loss."""
    p2_predict = None
    if cfg.logging.p2_law and kind == "train":
        if not cfg.data.manifest:
            raise UsageError("logging.p2_law needs validation losses: set data.manifest")
        from megashear.jobs.fit_p2 import train_predictor

        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        p2_predict = train_predictor(
            cfg.logging.p2_law, cfg.model.num_parameters(), tokens_per_step
        )
    if not cfg.data.manifest:
        return None
    from megashear.data.loader import data_cache_dir, validation_batches
    from megashear.training.dynamic_loading import DynamicBatchLoading

    manifest = trainer.batches.manifest
    valid = validation_batches(
        manifest,
        cfg.model.seq_length,
        cfg.data.eval_sequences_per_domain,
        data_cache_dir(cfg),
    )
    return DynamicBatchLoading(
        trainer.batches,
        valid,
        manifest.references(),
        cfg.data.update_rule,
        cfg.data.eta,
        cfg.data.smoothing,
        cfg.data.update_interval,
        log,
        p2_predict=p2_predict,
    )


def run_training(trainer, cfg: RunConfig, log, kind: str = "train") -> list[dict]:
    """Train to ``train.train_iters`` with a rank-0 progress bar, logging and checkpoints."""
    from tqdm import tqdm

    dynamic = make_dynamic_loading(cfg, trainer, log, kind)

    total = cfg.train.train_iters
    bar = tqdm(
        total=total, initial=trainer.iteration, disable=not _is_rank0(), desc=kind, unit="step"
    )

    def on_step(stats: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}")
        log.log(kind, stats["iteration"], stats)
        if dynamic is not None:
            dynamic(trainer, stats)

    from megashear.training.signals import ExitSignals

    try:
        with ExitSignals() as signals:
            return trainer.train(callback=on_step, signals=signals)
    finally:
        bar.close()
        close = getattr(trainer.batches, "close", None)  # stop DataLoader workers, if any
        if close is not None:
            close()


def run_tool(body: Callable[[], object]) -> int:
    """A tool's work under the command's error contract: a bad input (``ValueError``,
    ``KeyError``, ``OSError``) is one ``error:`` line and exit 2; otherwise the result is printed
    as one JSON line and the exit code is 0. The process group, if any, is torn down."""
    try:
        result = body()
    except (ValueError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        from megashear.parallel import destroy

        destroy()
    print(json.dumps(result))
    return 0


def run_to_end(trainer, cfg: RunConfig, kind: str = "train") -> int | None:
    """Record the resolved config, train to the end (or a signal), save the last step unless
    its interval save has, and log a summary; the exit code of a signal stop, else None."""
    from megashear.training.run_log import RunLog

    write_resolved_config(cfg)
    log = RunLog(
        cfg.logging.dir,
        enabled=_is_rank0(),
        tensorboard=cfg.logging.tensorboard,
        resume_from=trainer.iteration,
    )
    start = time.time()
    history = run_training(trainer, cfg, log, kind=kind)
    interval = cfg.checkpoint.save_interval
    if cfg.checkpoint.save and not (history and interval and trainer.iteration % interval == 0):
        trainer.save()
    log.log("summary", trainer.iteration, {"seconds": time.time() - start})
    log.close()
    return _interrupted(trainer, cfg)


def cmd_train(cfg: RunConfig) -> int | None:
    from megashear.training.trainer import Trainer

    trainer = Trainer(
        cfg.model,
        cfg.parallel,
        cfg.train,
        make_batches(cfg),
        cfg.checkpoint,
        distill=cfg.distill,
    )
    return run_to_end(trainer, cfg)


def _interrupted(trainer, cfg: RunConfig) -> int | None:
    """``train.signal_exit_code`` when a signal stopped the run (its checkpoint is saved), else
    None."""
    if not trainer.exit_signal:
        return None
    import signal

    where = f"saved at {cfg.checkpoint.save}" if cfg.checkpoint.save else "checkpoint.save unset"
    if _is_rank0():
        print(
            f"stopped by {signal.Signals(trainer.exit_signal).name} after step "
            f"{trainer.iteration} ({where})",
            file=sys.stderr,
        )
    return cfg.train.signal_exit_code


def cmd_prune(cfg: RunConfig) -> int | None:
    from megashear.jobs.importance import pruning_start
    from megashear.pruning.targets import validate_target
    from megashear.training.pruning_trainer import PruningTrainer

    target = pruning_target(cfg)
    validate_target(cfg.model, target, tp_sizes=(cfg.parallel.tp,), pp_sizes=(cfg.parallel.pp,))
    init_log_alpha, pinned = pruning_start(cfg, target)
    trainer = PruningTrainer(
        cfg.model,
        target,
        cfg.pruning,
        cfg.parallel,
        cfg.train,
        make_batches(cfg),
        cfg.checkpoint,
        distill=cfg.distill,
        init_log_alpha=init_log_alpha,
        pinned_hidden=pinned,
    )
    return run_to_end(trainer, cfg, kind="prune")


def cmd_finalize(cfg: RunConfig) -> None:
    from megashear import platform
    from megashear.finalize_run import finalize_checkpoint

    if not cfg.checkpoint.load or not cfg.checkpoint.save:
        raise UsageError("finalize needs checkpoint.load (pruning run) and checkpoint.save")
    platform.install("streaming")  # keep freed pages, one malloc arena for its threads
    out = finalize_checkpoint(cfg.checkpoint.load, cfg.checkpoint.save)
    if _is_rank0():
        print(
            json.dumps(
                {
                    "finalized": cfg.checkpoint.save,
                    "model": out.to_dict(),
                    "parameters": out.num_parameters(),
                }
            )
        )


def cmd_evaluate(cfg: RunConfig) -> None:
    """Per-domain validation loss of a checkpoint (a pruning one under its deterministic
    masks) as JSON; with ``data.write_reference`` also into the manifest (source reference)."""
    from megashear.checkpoint.format import read_meta, resolve
    from megashear.checkpoint.model_state import load_model_weights
    from megashear.data.loader import check_vocab, data_cache_dir, validation_batches
    from megashear.data.manifest import load_manifest, save_manifest
    from megashear.training.trainer import Trainer

    if not cfg.checkpoint.load or not cfg.data.manifest:
        raise UsageError("evaluate needs checkpoint.load and data.manifest")
    if cfg.data.write_reference and cfg.data.eval_split != "valid":
        raise UsageError(
            "data.write_reference needs data.eval_split=valid: dynamic batch loading compares "
            "the reference with validation-split losses"
        )
    manifest = load_manifest(cfg.data.manifest)
    check_vocab(manifest, cfg.model.vocab_size)
    meta = read_meta(resolve(cfg.checkpoint.load))
    if "pruning" in meta:
        from dataclasses import replace

        from megashear.training.pruning_trainer import PruningTrainer

        target = ModelConfig.from_dict(meta["pruning"]["target"])
        pcfg = replace(cfg.pruning, kinds=tuple(meta["pruning"]["kinds"]))
        pinned = meta["pruning"].get("pinned_hidden", [])
        trainer = PruningTrainer(
            cfg.model, target, pcfg, cfg.parallel, cfg.train, None, pinned_hidden=pinned
        )
    else:
        trainer = Trainer(cfg.model, cfg.parallel, cfg.train, None)
    load_model_weights(trainer.model, cfg.model, cfg.checkpoint.load)
    from megashear.training.dynamic_loading import domain_losses

    valid = validation_batches(
        manifest,
        cfg.model.seq_length,
        cfg.data.eval_sequences_per_domain,
        data_cache_dir(cfg),
        split=cfg.data.eval_split,
    )
    losses = domain_losses(trainer, valid)
    if _is_rank0():
        print(json.dumps(losses))
        if cfg.data.write_reference:
            manifest.set_reference_losses(losses)
            save_manifest(manifest, cfg.data.manifest)


# The RunConfig sections each training-side command reads; its --help and flags offer only
# these (a YAML file may still hold the whole tree, e.g. one prune.yaml for prune, finalize and
# evaluate).
_RUN = ("model_preset", "model", "parallel", "train", "checkpoint")

COMMANDS: dict[str, Command] = {
    "train": Command(
        "megashear.cli:cmd_train",
        "continued pre-training of a (pruned) model",
        sections=(*_RUN, "distill", "data", "logging"),
    ),
    "prune": Command(
        "megashear.cli:cmd_prune",
        "targeted structured pruning with hard-concrete masks",
        sections=(*_RUN, "pruning", "importance", "distill", "data", "logging"),
    ),
    "finalize": Command(
        "megashear.cli:cmd_finalize",
        "turn a pruning checkpoint into a dense model of the target",
        sections=("checkpoint", "logging"),
    ),
    "evaluate": Command(
        "megashear.cli:cmd_evaluate",
        "per-domain validation loss of a checkpoint, as JSON",
        sections=(*_RUN, "data", "logging"),
    ),
    "importance": Command(
        "megashear.jobs.importance:run",
        "activation importance of every head, FFN unit, hidden channel and layer (Minitron)",
        sections=(*_RUN, "importance", "data", "logging"),
    ),
    "one-shot": Command(
        "megashear.jobs.one_shot:run",
        "cut a checkpoint to a target shape by importance (or leading units), no training",
        config=OneShotConfig,
        sections=("method", "overwrite", "checkpoint", "pruning", "importance", "parallel"),
    ),
    "fit-p2": Command(
        "megashear.jobs.fit_p2:run",
        "fit the P² law of post-training after pruning to loss curves, and predict",
        config=FitP2Config,
    ),
    "convert": Command(
        "megashear.jobs.convert:run",
        "convert a checkpoint: hf-to-megatron, meta-to-megatron, megatron-to-hf (with a model "
        "card) or reshard",
        config=ConvertConfig,
    ),
    "preprocess": Command(
        "megashear.jobs.preprocess:run",
        "tokenize JSON Lines per domain into indexed datasets and a domain manifest",
        config=PreprocessConfig,
    ),
    "fit-reference": Command(
        "megashear.jobs.fit_reference:run",
        "per-domain reference losses at the target size from a scaling-law fit, as JSON",
        config=FitReferenceConfig,
    ),
    "plan": Command(
        "megashear.jobs.plan:run",
        "per-GPU memory of a prune or train job by parallel layout, and the layouts that fit",
        config=PlanConfig,
    ),
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from megashear.training.run_log import missing_dirs, remove_failed_start

    command = COMMANDS[args.command]
    new_dirs: list[str] = []
    try:
        cfg = resolve_config(args, command.config)
        if isinstance(cfg, RunConfig):
            new_dirs = missing_dirs(cfg.logging.dir, cfg.checkpoint.save)
            from megashear import platform
            from megashear.config_checks import check_run_config

            check_run_config(cfg, args.command, platform.cuda_available())
        code = command.function()(cfg)
        if isinstance(code, dict):
            if _is_rank0():
                print(json.dumps(code), flush=True)
            code = None
    except (ValueError, FileNotFoundError) as exc:
        # ConfigError, UsageError, CheckpointError and the library's validation errors
        # (shapes, layouts, targets) are all ValueErrors with one-line messages. What this
        # run created before it failed (config.yaml, index_cache/) goes with it.
        remove_failed_start(new_dirs)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a read-only or full disk under logging.dir
        from megashear.checkpoint.publish import WRITE_ERRNOS

        remove_failed_start(new_dirs)
        writing = exc.errno in WRITE_ERRNOS
        what = " ".join(filter(None, ("cannot write" if writing else "", exc.filename or "")))
        reason = exc.strerror or one_line(exc)
        print(f"error: {what}: {reason}" if what else f"error: {reason}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:
        # the run diverged: nothing was saved after the last good checkpoint
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        from megashear.parallel import destroy

        destroy()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
