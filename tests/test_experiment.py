"""A miniature of ``tools/shear_experiment.py``: every arm, a few steps each, on a tiny random
LLaMA with a tokenizer built here, so that the experiment tool keeps working."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megashear.paths import corpus_dir

ROOT = Path(__file__).resolve().parents[1]
CORPUS = corpus_dir()
pytestmark = pytest.mark.dist


def tiny_source(d: Path) -> Path:
    """A tied GQA LlamaForCausalLM (random weights) with a byte-level BPE tokenizer of 384
    tokens trained on a little corpus text, saved as one HF directory."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import save_tiny_bpe

    d.mkdir()
    save_tiny_bpe(d, 384, ["<|endoftext|>"])
    vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_experiment_miniature(tmp_path):
    source = tiny_source(tmp_path / "source_hf")
    out = tmp_path / "exp"
    steps = dict(prune=2, cont=2)
    batch, seq = 2, 32
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "shear_experiment.py"),
        "--out", str(out),
        "--corpus", str(CORPUS),
        "--source-hf", str(source),
        "--bytes-per-domain", "20000",
        "--seq-length", str(seq),
        "--test-sequences", "2",
        "--eval-sequences", "2",
        "--batch", str(batch),
        "--micro-batch", "1",
        "--prune-steps", str(steps["prune"]),
        "--prune-updates", "1",
        "--continue-steps", str(steps["cont"]),
        "--continue-updates", "1",
        "--target-num-layers", "2",
        "--target-hidden-size", "48",
        "--target-num-attention-heads", "2",
        "--target-num-query-groups", "1",
        "--target-ffn-hidden-size", "64",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tokens = (steps["prune"] + steps["cont"]) * batch * seq
    assert results["settings"]["tokens_per_arm"] == tokens
    domains = set(results["reference"])
    assert len(domains) == 6 and set(results["reference_valid"]) == domains
    assert list(results["arms"]) == ["sheared", "static", "one-shot", "scratch", "distill"]
    means = []
    for arm, r in results["arms"].items():
        assert set(r["test"]) == domains and all(math.isfinite(v) for v in r["test"].values())
        assert r["excess"] == pytest.approx(
            {d: r["test"][d] - results["reference"][d] for d in domains}
        )
        # every arm trained on the same number of tokens, the last step at the budget
        assert r["curve"]["tokens"][-1] == tokens, arm
        means.append(r["mean"])
    # sheared and static differ only in their domain weights, which at this scale may pick the
    # same few samples; the one-shot cut and the scratch model differ from them and each other
    assert len({means[0], means[2], means[3]}) == 3
    # the static arm kept its uniform weights; the sheared arm's continued run started from the
    # final pruning weights
    from megashear.data.manifest import load_manifest
    from megashear.training.run_log import read_events

    static = read_events(str(out / "static" / "continue"), "domain_update")
    assert static and all(len(set(e["weights"].values())) == 1 for e in static)
    last_prune = read_events(str(out / "sheared" / "prune"), "domain_update")[-1]["weights"]
    start = load_manifest(str(out / "sheared" / "manifest.yaml"))
    assert dict(zip(start.names, start.weights())) == pytest.approx(last_prune)
    # every arm's final model has the target shape
    for arm in results["arms"]:
        meta = json.loads(next((out / "ckpt" / arm).glob("iter_*/megashear.json")).read_text())
        model = meta["model"]
        assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"]) == (2, 48, 64)
    # the distill arm continued the sheared arm's pruned model (pruned once) with KD from the
    # source: per-domain KD and LM losses every step, dynamic loading on validation LM loss
    assert not (out / "logs" / "distill-prune.log").exists()
    assert results["arms"]["distill"]["after_cut"] == results["arms"]["sheared"]["after_cut"]
    assert results["arms"]["distill"]["mean"] != results["arms"]["sheared"]["mean"]
    kd_steps = read_events(str(out / "distill" / "continue"), "train")
    assert len(kd_steps) == steps["cont"]
    for e in kd_steps:
        assert e["loss"] == pytest.approx(e["kd_loss"])  # distill.alpha = 1: KD alone
        assert e["lm_loss"] > 0 and set(e["domain_kd_loss"]) <= domains
    assert read_events(str(out / "distill" / "continue"), "domain_update")
    meta = json.loads(next((out / "ckpt" / "distill").glob("iter_*/megashear.json")).read_text())
    assert meta["distill"]["teacher"] == str(out / "ckpt" / "source")
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in results["arms"])
    for png in ("loss_vs_tokens.png", "excess_by_domain.png"):
        assert (out / "plots" / png).stat().st_size > 1000
