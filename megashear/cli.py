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
from collections.abc import Callable
from typing import NoReturn

from megashear import config_io
from megashear.config import OneShotConfig, RunConfig
from megashear.config_io import ConfigError
from megashear.jobs.common import is_rank0
from megashear.jobs.common import pruning_target as pruning_target  # re-exported for callers
from megashear.jobs.convert import ConvertConfig
from megashear.jobs.fit_reference import FitReferenceConfig
from megashear.jobs.preprocess import PreprocessConfig
from megashear.model_config import WEIGHT_FIELDS, ModelConfig, get_preset, model_differences
from megashear.pipeline.recipe import Recipe
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
    argument: str = ""
    """A positional YAML file read like ``--config`` (``RECIPE.yaml``); "": none."""
    word: str = ""
    """A config field also given as the first word after the command (``megashear convert
    hf-to-megatron ...`` is ``--direction=hf-to-megatron``); "": none."""
    aliases: tuple[tuple[str, str], ...] = ()
    """Other spellings of config fields, ``(flag, key)``: ``("--pruning.target", "target")``
    lets ``megashear plan`` take prune's flags."""

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
        if command.argument:
            p.add_argument("config", metavar=command.argument, action="append", help="YAML file")
        if command.word:
            p.add_argument(
                f"word:{command.word}",
                nargs="?",
                default=argparse.SUPPRESS,
                metavar=command.word.upper(),
                help=f"the {command.word} (the same as --{command.word}=...)",
            )
        config_io.add_arguments(p, command.config, command.sections)
        for flag, key in command.aliases:
            p.add_argument(
                flag,
                dest=f"cfg:{key}",
                metavar="VALUE",
                default=argparse.SUPPRESS,
                help=f"the same as --{key}",
            )
    return parser


def take_word(args: argparse.Namespace, command: Command) -> None:
    """The command's positional word (``megashear convert reshard``) as its config field; the
    word and the field's flag naming two values is a :class:`ConfigError`."""
    word = vars(args).pop(f"word:{command.word}", None) if command.word else None
    if word is None:
        return
    flag = getattr(args, f"cfg:{command.word}", None)
    if flag is not None and flag != word:
        raise ConfigError(f"{word} and --{command.word}={flag} disagree: give one")
    setattr(args, f"cfg:{command.word}", word)


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


def report_error(exc: BaseException) -> int:
    """The one-line error rule of every command and tool: print ``error: ...`` for ``exc`` on
    stderr, one line, and return the exit code.

    Bad input (``ValueError``: ``ConfigError``, ``UsageError``, ``CheckpointError`` and the
    library's validation errors; a missing file; a ``KeyError`` a tool raises for a missing
    key) is exit code 2. A write that failed (a read-only or full disk) is ``error: cannot write
    PATH: reason`` and exit code 1, and so is a diverged run (:class:`NonFiniteLossError`:
    nothing was saved after the last good checkpoint).
    """
    if isinstance(exc, KeyError):
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        from megashear.checkpoint.publish import WRITE_ERRNOS

        writing = exc.errno in WRITE_ERRNOS
        what = " ".join(filter(None, ("cannot write" if writing else "", exc.filename or "")))
        reason = exc.strerror or one_line(exc)
        print(f"error: {what}: {reason}" if what else f"error: {reason}", file=sys.stderr)
        return 1
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return 1 if isinstance(exc, NonFiniteLossError) else 2


def run_tool(body: Callable[[], object]) -> int:
    """A tool's work under the command's error contract (:func:`report_error`): a bad input
    (``ValueError``, ``KeyError``, ``OSError``) is one ``error:`` line and a non-zero exit code;
    otherwise the result is printed as one JSON line and the exit code is 0. The process group,
    if any, is torn down."""
    try:
        result = body()
    except (ValueError, KeyError, OSError) as exc:
        return report_error(exc)
    finally:
        from megashear.parallel import destroy

        destroy()
    print(json.dumps(result))
    return 0


# megashear plan takes prune's spelling of the target and the mask kinds
# (--pruning.target_num_layers), as well as its own (--target_num_layers).
PLAN_ALIASES = tuple(
    (f"--pruning.{f.name}", f.name)
    for f in dataclasses.fields(PlanConfig)
    if f.name.startswith("target") or f.name == "kinds"
)

# The RunConfig sections each training-side command reads; its --help and flags offer only
# these (a YAML file may still hold the whole tree, e.g. one prune.yaml for prune, finalize and
# evaluate).
_RUN = ("model_preset", "model", "parallel", "train", "checkpoint")

COMMANDS: dict[str, Command] = {
    "train": Command(
        "megashear.jobs.train:run",
        "continued pre-training of a (pruned) model",
        sections=(*_RUN, "distill", "data", "logging"),
    ),
    "prune": Command(
        "megashear.jobs.prune:run",
        "targeted structured pruning with hard-concrete masks",
        sections=(*_RUN, "pruning", "importance", "distill", "data", "logging"),
    ),
    "finalize": Command(
        "megashear.jobs.finalize:run",
        "turn a pruning checkpoint into a dense model of the target",
        sections=("checkpoint", "logging"),
    ),
    "evaluate": Command(
        "megashear.jobs.evaluate:run",
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
        word="direction",
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
        aliases=PLAN_ALIASES,
    ),
    "shear": Command(
        "megashear.pipeline.shear:run",
        "the whole job from one recipe: convert, prune, continue, export; resumable by stage",
        config=Recipe,
        argument="RECIPE.yaml",
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
        take_word(args, command)
        cfg = resolve_config(args, command.config)
        if isinstance(cfg, RunConfig):
            new_dirs = missing_dirs(cfg.logging.dir, cfg.checkpoint.save)
            from megashear import platform
            from megashear.config_checks import check_run_config

            check_run_config(cfg, args.command, platform.cuda_available())
        code = command.function()(cfg)
        if isinstance(code, dict):
            if is_rank0():
                print(json.dumps(code), flush=True)
            code = None
    except (ValueError, OSError, NonFiniteLossError) as exc:
        # What this run created before it failed (config.yaml, index_cache/) goes with it;
        # a diverged run keeps its directories (its last good checkpoint is there).
        if not isinstance(exc, NonFiniteLossError):
            remove_failed_start(new_dirs)
        return report_error(exc)
    finally:
        from megashear.parallel import destroy

        destroy()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
