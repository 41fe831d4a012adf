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
        max_position_embeddings=512,  # lm-eval's contexts are about 420 characters
        rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_experiment_miniature(tmp_path):
    """Four arms, one seed, then a second seed of one arm: the first run's results are cached
    and skipped, the aggregate counts both seeds."""
    source = tiny_source(tmp_path / "source_hf")
    out = tmp_path / "exp"
    steps = dict(prune=2, cont=2)
    batch, seq = 2, 32
    arms = ["sheared-importance", "importance-oneshot-kd", "leading-oneshot", "scratch"]
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
        "--prune-pp", "1",
        "--continue-steps", str(steps["cont"]),
        "--continue-updates", "1",
        "--importance-samples", "4",
        "--pin-hidden", "1.5",
        "--downstream-limit", "6",
        "--target-num-layers", "2",
        "--target-hidden-size", "48",
        "--target-num-attention-heads", "2",
        "--target-num-query-groups", "1",
        "--target-ffn-hidden-size", "64",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    run = [*cmd, "--arms", ",".join(arms), "--seeds", "1"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tokens = (steps["prune"] + steps["cont"]) * batch * seq
    assert results["settings"]["tokens_per_arm"] == tokens
    domains = set(results["reference"])
    assert len(domains) == 6 and set(results["reference_valid"]) == domains
    assert set(results["arms"]) == set(arms)
    assert 0 <= results["source_downstream"]["acc"] <= 1
    for arm in arms:
        r = results["runs"][arm]["1"]
        assert set(r["test"]) == domains and all(math.isfinite(v) for v in r["test"].values())
        assert r["excess"] == pytest.approx(
            {d: r["test"][d] - results["reference"][d] for d in domains}
        )
        # every arm trained on the same number of tokens, the last step at the budget
        assert r["curve"]["tokens"][-1] == tokens, arm
        assert r["downstream"]["items"] == 6 and 0 <= r["downstream"]["acc"] <= 1
        assert not (out / "ckpt" / f"{arm}-s1").exists()  # removed when done
    from megashear.training.run_log import read_events

    # the importance-initialised pruning run started at the importance cut and pinned channels
    prune_cfg = (out / "runs" / "prune-importance-paper-pin1.5-s1" / "config.yaml").read_text()
    assert "init: importance" in prune_cfg and "pin_hidden: 1.5" in prune_cfg
    assert results["runs"]["sheared-importance"]["1"]["pruning_loss"]["steps"] == steps["prune"]
    # the KD arm distilled from the source: KD alone, per step
    kd_steps = read_events(str(out / "runs" / "importance-oneshot-kd-s1"), "train")
    assert len(kd_steps) == steps["prune"] + steps["cont"]
    assert all(e["loss"] == pytest.approx(e["kd_loss"]) for e in kd_steps)
    # the two one-shot cuts differ; both were measured right after the cut
    cuts = [results["runs"][a]["1"]["after_cut_mean"] for a in arms[1:3]]
    assert cuts[0] != cuts[1]

    # a second seed of one arm: everything else is cached and not run again
    again = [*cmd, "--arms", "leading-oneshot", "--seeds", "1,2"]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "leading-oneshot seed 1: cached" in proc.stdout
    assert "[exp] convert" not in proc.stdout and "[exp] cut-leading" not in proc.stdout
    results = json.loads((out / "results.json").read_text())
    agg = results["arms"]["leading-oneshot"]
    assert agg["seeds"] == [1, 2] and agg["mean"]["n"] == 2
    seeds = results["runs"]["leading-oneshot"]
    assert seeds["1"]["mean"] != seeds["2"]["mean"]  # another data order
    md = (out / "results.md").read_text()
    assert "| leading-oneshot | 1,2 |" in md
    for png in ("loss_vs_tokens.png", "excess_by_domain.png"):
        assert (out / "plots" / png).stat().st_size > 1000
