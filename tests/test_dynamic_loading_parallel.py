"""Dynamic batch loading under torchrun: after every update all ranks hold the same weights,
and the per-domain losses and new weights equal the single-process run's (TP2PP2 and DP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dbl")
    texts = {
        "prose": ["The quick brown fox jumps over the lazy dog near the river bank."] * 60,
        "code": ["for i in range(10):\n    print(i * i)  # squares\n"] * 60,
        "digits": ["3.14159 2.71828 1.41421 1.73205 0.57721 1.61803 2.50290"] * 60,
    }
    for name, docs in texts.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for cmd in (
        [
            str(ROOT / "tools/train_tokenizer.py"),
            "--input",
            str(d),
            "--vocab-size",
            "320",
            "--output-prefix",
            str(d / "tok"),
        ],
        [
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(d),
            "--tokenizer",
            str(d / "tok.model"),
            "--output-dir",
            str(d / "data"),
            "--valid-tokens-per-domain",
            "600",
            "--workers",
            "1",
        ],
    ):
        proc = subprocess.run(
            [sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    job = {
        "mode": "dynamic_loading",
        "model": "tiny-gqa",
        "steps": 4,
        "manifest": str(d / "data" / "manifest.yaml"),
        "reference": {"prose": 4.0, "code": 5.5, "digits": 5.0},
    }
    init = str(d / "init")
    out = torchrun(4, [{**job, "name": "tp2pp2", "tp": 2, "pp": 2, "save_init": init}], d)
    out.update(torchrun(2, [{**job, "name": "dp2", "init": init}], d))
    out.update(torchrun(1, [{**job, "name": "single", "init": init}], d))
    return out


@pytest.mark.parametrize("layout", ["tp2pp2", "dp2"])
def test_weights_identical_on_every_rank_and_equal_to_single_process(runs, layout):
    ref = runs["single"]["updates"]
    got = runs[layout]["updates"]
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got):
        weights = g["weights"]  # [world, k]
        assert (weights == weights[0]).all(), "ranks disagree on the domain weights"
        torch.testing.assert_close(weights[0], r["weights"][0], rtol=1e-5, atol=1e-7)
        for name, loss in r["losses"].items():
            assert abs(g["losses"][name] - loss) < 1e-5 * abs(loss), (name, g["losses"], loss)
    # the update really moved the weights away from uniform
    assert (ref[-1]["weights"][0] - 1 / 3).abs().max() > 1e-3
