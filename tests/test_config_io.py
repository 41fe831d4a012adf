"""YAML + dotted overrides into the config dataclasses, strictly checked."""

from __future__ import annotations

import argparse

import pytest

from megashear import config_io
from megashear.config import RunConfig
from megashear.config_io import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config_io.add_arguments(parser, RunConfig)
    return parser.parse_args(argv)


def _another_value(tp, default):
    """A value of annotation ``tp`` that differs from ``default``, and its flag spelling."""
    import typing

    inner, _ = config_io._optional(tp)
    allowed = config_io.choices(inner)
    if typing.get_origin(inner) in (tuple, list):
        pick = next(c for c in allowed if (c,) != tuple(default or ()))
        return (pick,), pick
    if allowed is not None:
        pick = next(c for c in allowed if c != default)
        return pick, str(pick)
    if inner is bool:
        return (not default), "false" if default else "true"
    if inner is int:
        return (default or 0) + 128, str((default or 0) + 128)
    if inner is float:
        return (default or 0.0) + 0.5, repr((default or 0.0) + 0.5)
    return "some/value", "some/value"


def test_every_flag_sets_its_own_field_and_nothing_else():
    """Each ``--section.field=value`` flag lands in that field (typed), all else at default."""
    defaults = config_io.to_dict(RunConfig())
    for key, tp in config_io.leaf_keys(RunConfig):
        section, _, name = key.rpartition(".")
        default = defaults[section][name] if section else defaults[name]
        value, text = _another_value(tp, default)
        cfg = config_io.resolve(RunConfig, [], parse([f"--{key}={text}"]))
        got = config_io.to_dict(cfg)
        assert (got[section][name] if section else got[name]) == (
            list(value) if isinstance(value, tuple) else value
        ), key
        changed = {
            f"{s}.{n}" if isinstance(v, dict) else s
            for s, v in got.items()
            for n in (v if isinstance(v, dict) else [None])
            if (got[s][n] if n is not None else got[s])
            != (defaults[s][n] if n is not None else defaults[s])
        }
        assert changed - DERIVED.get(key, set()) == {key}, key


# model fields whose null default means "derived from this one" (MHA: a group per head)
DERIVED = {"model.num_attention_heads": {"model.num_query_groups"}}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  train_iters: 7\npruning:\n  kinds: [head, layer]\n")
    cfg = config_io.resolve(
        RunConfig, [str(path)], parse(["--train.lr=2e-4", "--pruning.lagrangian_warmup_steps=640"])
    )
    assert cfg.train.lr == 2e-4 and cfg.train.train_iters == 7
    assert cfg.pruning.kinds == ("head", "layer")
    assert cfg.pruning.lagrangian_warmup_steps == 640
    # round trip through YAML
    out = tmp_path / "resolved.yaml"
    config_io.dump_yaml(cfg, str(out))
    assert config_io.resolve(RunConfig, [str(out)], parse([])) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.lr=fast"], "config key 'train.lr': expected a number, got 'fast'"),
        (["--train.train_iters=1.5"], "config key 'train.train_iters': expected an integer"),
        (["--parallel.sequence_parallel=maybe"], "expected true or false"),
    ],
)
def test_wrong_types_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        config_io.resolve(RunConfig, [], parse(argv))


def test_unknown_key_lists_allowed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError) as info:
        config_io.resolve(RunConfig, [str(path)], parse([]))
    msg = str(info.value)
    assert "unknown config key 'train.learning_rate'" in msg and "lr" in msg and "\n" not in msg


def test_unknown_flag_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse(["--train.nope=1"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        config_io.resolve(RunConfig, ["/nonexistent.yaml"], parse([]))


def test_every_field_is_documented_and_help_shows_it():
    leaves = {k for k, _ in config_io.leaf_keys(RunConfig)}
    undocumented = []
    for key in leaves:
        *path, name = key.split(".")
        cls = RunConfig
        for part in path:
            cls = config_io._hints(cls)[part]
        if not config_io.field_docs(cls).get(name):
            undocumented.append(key)
    assert undocumented == []
    from megashear.cli import build_parser

    text = " ".join(
        build_parser()._subparsers._group_actions[0].choices["prune"].format_help().split()
    )
    assert "Peak learning rate of the model weights" in text
    assert "one of paper, reference_code, constant" in text


def test_literal_choices_match_the_code_that_consumes_them():
    import typing

    from megashear.config import MaskKind, UpdateRule
    from megashear.data.update_rules import RULES
    from megashear.pruning.hard_concrete import ALL_KINDS

    assert set(typing.get_args(UpdateRule)) == set(RULES)
    assert set(typing.get_args(MaskKind)) == set(ALL_KINDS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train.lr_decay_style=bogus"], "train.lr_decay_style"),
        (["--data.update_rule=papr"], "one of paper, reference_code, constant"),
        (["--pruning.kinds=[head,heads]"], "pruning.kinds"),
    ],
)
def test_literal_fields_refuse_other_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_io.resolve(RunConfig, [], parse(argv))


def test_subcommands_offer_only_their_sections():
    from megashear.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finalize", "--pruning.target=sheared-llama-1.3b"])
    args = build_parser().parse_args(["prune", "--pruning.target=sheared-llama-1.3b"])
    assert getattr(args, "cfg:pruning.target") == "sheared-llama-1.3b"
