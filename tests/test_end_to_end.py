"""``make demo`` at micro scale on the real SmolLM2-135M: the demo recipe run by ``megashear
shear`` (convert + tokenise with its own tokenizer -> source reference losses -> importance ->
learned masks from importance (PP2, pinned channels, dynamic batch loading) -> finalize -> KD
continuation -> HF export that transformers loads alone), then lm-eval on the held-out task
and the summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megashear.paths import corpus_dir

ROOT = Path(__file__).resolve().parents[1]
CORPUS = corpus_dir()
DOMAINS = {"web", "github", "wikipedia", "books", "arxiv", "stackexchange"}
pytestmark = pytest.mark.dist


def test_demo_pipeline_micro(tmp_path, smollm2_hf):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, str(ROOT / "tools/demo.py"),
        "--out", str(out),
        "--corpus", str(CORPUS),
        "--cache-dir", str(smollm2_hf.parents[1]),
        "--target", "44m",
        "--bytes-per-domain", "30000",
        "--seq-length", "32",
        "--eval-sequences", "2",
        "--importance-samples", "4",
        "--prune-steps", "2", "--prune-batch", "2", "--prune-micro-batch", "1",
        "--prune-updates", "1",
        "--continue-steps", "2", "--continue-batch", "2", "--continue-micro-batch", "1",
        "--continue-updates", "1",
        "--downstream-limit", "6",
        "--new-tokens", "4", "--greedy-prompts", "1", "--greedy-tokens", "5",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "per-domain validation loss" in text and "sheared: '" in text
    rows = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"source", "pruned", "cut", "sheared"} <= rows
    assert "downstream (lm-eval, 6 held-out 4-way continuations" in text
    # greedy text of both models on one held-out passage per domain, and how much it loops
    assert "greedy text on 6 held-out passages, 5 new tokens each" in text
    greedy = json.loads((out / "greedy.json").read_text())
    for model in ("source", "sheared"):
        rows = greedy[model]["continuations"]
        assert {r["domain"] for r in rows} == DOMAINS and all(1 <= r["tokens"] <= 5 for r in rows)
        assert 0.0 <= greedy[model]["seq_rep_4"] <= 1.0
    assert greedy["sheared"]["parameters"] == 44_052_864
    # every progress line names its stage once
    progress = [ln.split()[1] for ln in text.splitlines() if ln.startswith(f"[{out.name}] ")]
    assert len(progress) == len(set(progress)) and "continue" in progress, progress
    # the source row holds SmolLM2's own losses: written into the manifest as the reference
    manifest = (out / "data" / "manifest.yaml").read_text()
    assert manifest.count("reference_loss: ") == 6 and "reference_loss: null" not in manifest
    # the cut model has exactly the target shape, stays tied, and the export says so too
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")
    assert tuple(hf_config[k] for k in shape) == (16, 384, 6, 2)
    assert hf_config["intermediate_size"] == 1024 and hf_config["tie_word_embeddings"] is True
    assert hf_config["vocab_size"] == 49152
    meta = json.loads(next((out / "ckpt" / "cut").glob("iter_*/megashear.json")).read_text())
    assert meta["model"]["num_layers"] == 16 and meta["model"]["tie_word_embeddings"] is True
    assert (out / "hf" / "tokenizer.json").is_file()
    # pruning ran at PP2 from the importance scores, continued pre-training with KD
    prune_meta = json.loads(
        next((out / "ckpt" / "prune").glob("iter_*/megashear.json")).read_text()
    )
    cont_meta = json.loads(
        next((out / "ckpt" / "continue").glob("iter_*/megashear.json")).read_text()
    )
    assert prune_meta["layout"]["pp"] == 2
    assert prune_meta["pruning"]["init"] == "importance"
    assert cont_meta["distill"]["teacher"] == str(out / "ckpt" / "source")
    assert (out / "importance" / "importance.pt").is_file()
    pngs = {p.name for p in out.glob("runs/*/plots/*.png")}
    assert {"loss.png", "sparsity.png", "domain_weights.png", "excess_loss.png"} <= pngs
    cont = [
        json.loads(x) for x in (out / "runs" / "continue" / "events.jsonl").read_text().splitlines()
    ]
    train = [e for e in cont if e["kind"] == "train"]
    assert train and set(train[-1]["domain_loss"]) <= DOMAINS
