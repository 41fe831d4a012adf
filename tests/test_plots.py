"""Plots are written from a run's events, each with the series it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from megashear import plots
from megashear.training.run_log import RunLog, read_events

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["web", "github", "books"]


def make_run(run_dir: Path) -> None:
    log = RunLog(str(run_dir), tensorboard=False)
    w = {"web": 0.6, "github": 0.2, "books": 0.2}
    for step in range(1, 11):
        log.log(
            "prune",
            step,
            {
                "loss": 5.0 - 0.1 * step,
                "expected_sparsity/head": 0.05 * step,
                "target_sparsity/head": 0.05 * step,
                "expected_sparsity/layer": 0.02 * step,
                "target_sparsity/layer": 0.025 * step,
                "lambda/head_1": 0.01 * step,
                "lambda/head_2": 0.002 * step,
            },
        )
        if step % 5 == 0:
            log.log("eval", step, {"loss": 5.0 - 0.09 * step})
            w = {"web": w["web"] - 0.1, "github": w["github"] + 0.05, "books": w["books"] + 0.05}
            log.log(
                "domain_update",
                step,
                {
                    "weights": w,
                    "losses": {"web": 2.0, "github": 1.0, "books": 2.5},
                    "reference": {"web": 1.8, "github": 1.1, "books": 2.0},
                },
            )
    log.close()


def labels(fig) -> list[list[str]]:
    return [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]


def test_each_plot_has_its_series(tmp_path):
    make_run(tmp_path)
    events = read_events(str(tmp_path))
    assert labels(plots.plot_domain_weights(events)) == [DOMAINS]
    fig = plots.plot_excess_loss(events)
    assert labels(fig) == [DOMAINS]
    ys = {
        line.get_label(): list(line.get_ydata())
        for line in fig.axes[0].lines
        if line.get_label() in DOMAINS
    }
    assert abs(ys["web"][0] - 0.2) < 1e-9 and abs(ys["github"][0] + 0.1) < 1e-9
    assert labels(plots.plot_sparsity(events)) == [
        ["head", "head target", "layer", "layer target"],
        ["head_1", "head_2"],
    ]
    assert labels(plots.plot_loss(events)) == [["prune", "eval"]]
    plt.close("all")


def test_tool_writes_pngs(tmp_path):
    make_run(tmp_path)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/plot_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    names = sorted(Path(p).name for p in out)
    assert names == ["domain_weights.png", "excess_loss.png", "loss.png", "sparsity.png"]
    for p in out:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tool_refuses_a_dir_without_events(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/plot_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "has no events.jsonl" in proc.stderr
