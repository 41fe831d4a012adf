"""Out-of-range config values fail at start-up in one line; a diverging run stops with exit 1 and
saves nothing after its last good checkpoint."""

from __future__ import annotations

import argparse

import pytest

from megashear import config_io
from megashear.config import RunConfig
from megashear.config_checks import check_run_config
from megashear.config_io import ConfigError
from tests.launch import megashear_cli


def resolved(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    config_io.add_arguments(parser, RunConfig)
    return config_io.resolve(RunConfig, [], parser.parse_args(argv))


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["--train.micro_batch_size=0"], "'train.micro_batch_size': must be at least 1"),
        ("train", ["--train.train_iters=0"], "'train.train_iters': must be at least 1"),
        ("prune", ["--train.train_iters=-3"], "'train.train_iters': must be at least 1"),
        ("train", ["--train.lr=.nan"], "'train.lr': must be a finite number above 0"),
        ("train", ["--train.lr=0"], "'train.lr': must be a finite number above 0"),
        ("prune", ["--pruning.lr_log_alpha=.nan"], "'pruning.lr_log_alpha': must be a finite"),
        ("train", ["--train.clip_grad=-1"], "'train.clip_grad': must be a finite number, 0 or"),
        ("train", ["--train.min_lr=1"], "'train.min_lr': must not exceed train.lr"),
        ("train", ["--train.bf16=true"], "'train.bf16': needs CUDA"),
        ("prune", ["--parallel.sequence_parallel=true"], "'parallel.sequence_parallel': needs"),
        (
            "train",
            ["--parallel.sequence_parallel=true", "--parallel.tp=1"],
            "'parallel.sequence_parallel': needs parallel.tp >= 2",
        ),
        (
            "evaluate",
            ["--data.manifest=m.yaml", "--data.eval_sequences_per_domain=0"],
            "'data.eval_sequences_per_domain': must be at least 1",
        ),
    ],
)
def test_out_of_range_values_are_refused(command, argv, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        check_run_config(resolved(argv), command, cuda=False)


def test_defaults_pass_and_evaluate_needs_no_training_budget():
    check_run_config(resolved([]), "train", cuda=False)
    check_run_config(resolved(["--train.train_iters=0"]), "evaluate", cuda=False)
    check_run_config(resolved(["--train.bf16=true"]), "train", cuda=True)
    # the mask learning rates matter only when pruning
    check_run_config(resolved(["--pruning.lr_log_alpha=0"]), "train", cuda=False)


def test_cli_refuses_at_start_up():
    proc = megashear_cli(
        "train", "--model_preset=tiny-gqa", "--data.synthetic=true", "--train.micro_batch_size=0"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config key 'train.micro_batch_size': must be at least 1, got 0"
    )


def test_diverging_run_stops_with_exit_1_and_saves_nothing(tmp_path):
    save = tmp_path / "ckpt"
    proc = megashear_cli(
        "train",
        "--model_preset=tiny-gqa",
        "--data.synthetic=true",
        "--train.lr=1e4",
        "--train.clip_grad=0",
        "--train.train_iters=12",
        f"--checkpoint.save={save}",
        f"--logging.dir={tmp_path / 'log'}",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the ") and (" is nan" in last or " is inf" in last), last
    assert (
        not list(save.glob("iter_*")) and not (save / "latest_checkpointed_iteration.txt").exists()
    )
