"""The megashear command refuses bad input with one line and exit code 2."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch import megashear_cli


def megashear(*args: str) -> subprocess.CompletedProcess:
    return megashear_cli(*args, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "prune",
                "--model_preset=tiny-gqa",
                "--data.synthetic=true",
                "--pruning.target_hidden_size=128",
            ],
            "error: target hidden size 128 is larger than the source's 64",
        ),
        (
            ["train", "--model_preset=tiny-gqa", "--train.lr=fast"],
            "error: config key 'train.lr': expected a number, got 'fast'",
        ),
        (["train", "--model_preset=llama9"], "error: config key 'model_preset': unknown model"),
        (["train", "--model_preset=tiny-gqa"], "error: no training data"),
        (
            ["train", "--model_preset=tiny-gqa", "--data.synthetic=true", "--parallel.tp=3"],
            "error: tp*pp=3 (tp=3, pp=1) does not divide the world size 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = megashear(*args)
    assert proc.returncode == 2, proc.stderr[-1000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
