"""The demo pipeline at micro scale: tokenizer -> preprocess -> source -> prune (TP2, dynamic
batch loading) -> finalize -> continue -> HF export that transformers loads and generates from ->
plots -> summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
pytestmark = pytest.mark.dist


@pytest.mark.skipif(not CORPUS.is_dir(), reason="needs ../shared/corpus")
def test_demo_pipeline_micro(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/demo.py"),
            "--out",
            str(out),
            "--bytes-per-domain",
            "150000",
            "--vocab-size",
            "1000",
            "--source-steps",
            "12",
            "--prune-steps",
            "8",
            "--continue-steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "per-domain validation loss" in text and "transformers sample:" in text
    for stage in ("source", "pruned (masked)", "finalized", "continued"):
        assert any(line.startswith(stage) for line in text.splitlines()), stage
    # the finalised model has exactly the target shape, and the export says so too
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert (
        hf_config["num_hidden_layers"],
        hf_config["hidden_size"],
        hf_config["num_attention_heads"],
        hf_config["intermediate_size"],
    ) == (2, 96, 2, 192)
    meta = json.loads(next((out / "ckpt" / "final").glob("iter_*/megashear.json")).read_text())
    assert meta["model"]["num_layers"] == 2 and meta["model"]["hidden_size"] == 96
    pngs = {p.name for p in out.glob("*/plots/*.png")}
    assert {"loss.png", "sparsity.png", "domain_weights.png", "excess_loss.png"} <= pngs
    events = [json.loads(x) for x in (out / "prune" / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "domain_update" for e in events)
    # per-domain training loss is logged with every step of a manifest-driven run
    cont = [json.loads(x) for x in (out / "continue" / "events.jsonl").read_text().splitlines()]
    train = [e for e in cont if e["kind"] == "train"]
    assert train and set(train[-1]["domain_loss"]) <= {
        "web",
        "github",
        "wikipedia",
        "books",
        "arxiv",
        "stackexchange",
    }
