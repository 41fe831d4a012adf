"""Greedy text and seq-rep-n (megashear.evaluation.greedy_text): the measure, the held-out
prompts, and the continuations of the real SmolLM2-135M against a hand-written argmax loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megashear.evaluation.downstream_task import build_task, load_items
from megashear.evaluation.greedy_text import heldout_prompts, report, seq_rep
from tests.test_downstream_task import SPEC, write_corpus


def test_seq_rep_counts_repeated_ngrams() -> None:
    assert seq_rep([1, 2, 3, 4, 5, 6], n=4) == 0.0
    # (1,2) (2,1) (1,2) (2,1) (1,2): 2 unique of 5
    assert seq_rep([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(0.6)
    assert seq_rep([7] * 10, n=4) == pytest.approx(1 - 1 / 7)
    assert seq_rep([1, 2, 3], n=4) == 0.0  # no 4-gram at all
    with pytest.raises(ValueError, match="at least 1"):
        seq_rep([1, 2], n=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("greedy")
    build_task(write_corpus(root / "corpus"), root / "task", SPEC)
    return root / "task"


def test_prompts_are_the_first_passages_of_each_domain(task: Path) -> None:
    items = load_items(task)
    prompts = heldout_prompts(task, per_domain=2)
    for domain in ("alpha", "beta"):
        first = [i for i in items if i["domain"] == domain][:2]
        assert [p["text"] for p in prompts if p["domain"] == domain] == [
            i["context"] for i in first
        ]
    with pytest.raises(ValueError, match="at least 1"):
        heldout_prompts(task, per_domain=0)


def test_continuations_are_greedy_and_new_tokens_only(task: Path, smollm2_hf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    got = report(smollm2_hf, task, per_domain=1, new_tokens=6, sample_tokens=3, threads=threads + 1)
    assert torch.get_num_threads() == threads  # the call's threads are its own
    assert got["parameters"] == 134_515_008
    assert got["sample"].startswith("The history of the Roman Empire")
    rows = got["continuations"]
    assert [r["domain"] for r in rows] == ["alpha", "beta"] and got["new_tokens"] == 6

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf).float().eval()
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    reps = []
    for row, prompt in zip(rows, heldout_prompts(task, per_domain=1), strict=True):
        ids = tok(prompt["text"], return_tensors="pt").input_ids
        new = []
        with torch.no_grad():
            for _ in range(6):  # argmax of the full forward, one token at a time
                nxt = model(ids).logits[0, -1].argmax()
                new.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert row["tokens"] == 6 and row["text"] == tok.decode(new, skip_special_tokens=True)
        assert row["seq_rep_4"] == round(seq_rep(new, 4), 4)
        reps.append(row["seq_rep_4"])
    assert got["seq_rep_4"] == pytest.approx(sum(reps) / len(reps), abs=1e-4)


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("demo.py", ["--greedy-prompts", "0"], "prompts per domain must be at least 1"),
        ("target_sizes.py", ["--greedy-tokens", "3"], "must be at least n (4)"),
    ],
)
def test_tools_refuse_bad_greedy_options_first(tool, argv, message, tmp_path) -> None:
    """One ``error:`` line before any stage runs: the output folder stays empty."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, f"tools/{tool}", "--out", str(out), *argv],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert not out.exists()
