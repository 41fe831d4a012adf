"""Greedy text from a Hugging Face model directory, and how much it loops.

A model that keeps knowledge can still write text that repeats itself; the degenerate samples
of an undertrained sheared model ("...of the state of the state of the state...") are what a
user sees first. This module measures it the way Welleck et al. (arXiv 1908.04319,
"Neural Text Generation with Unlikelihood Training") do, with **seq-rep-n**: over one greedy
continuation of ``T`` new tokens ``y_1..y_T``, the share of its next-token n-grams that repeat
an n-gram earlier in the same continuation,

    seq-rep-n = 1 - |unique n-grams of y| / |n-grams of y|      (T - n + 1 n-grams)

0 for text that never repeats four tokens in a row (with ``n = 4``), near 1 for a loop. The
prompts are the passages of the held-out lm-eval task (:mod:`downstream_task`: documents past
everything that any run reads), the first ``per_domain`` items of each domain, so source and
sheared model are compared on the same unseen text. Decoding is greedy (``do_sample=False``),
one prompt at a time (no padding), float32 on the CPU; only the new tokens are scored.

``tools/downstream_eval.py greedy --model HF_DIR --task DIR`` prints :func:`report` as one JSON
line (the model's parameters, its sample for ``--prompt``, the mean seq-rep-n over the held-out
prompts and each continuation).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from megashear.evaluation.downstream_task import load_items
from megashear.evaluation.lm_eval_score import OFFLINE_ENV, check_model_dir, cpu_threads

DEFAULT_PROMPT = "The history of the Roman Empire"


def seq_rep(tokens: Sequence[int], n: int = 4) -> float:
    """seq-rep-n of one continuation: 1 - unique n-grams / n-grams (0.0 when it is shorter
    than ``n`` tokens)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _check_per_domain(per_domain: int) -> None:
    if per_domain < 1:
        raise ValueError(f"prompts per domain must be at least 1, got {per_domain}")


def check_options(per_domain: int, new_tokens: int, n: int = 4) -> None:
    """Raise a one-line ``ValueError`` for options :func:`report` cannot use (a tool checks
    them before it spends minutes on the model it will continue)."""
    _check_per_domain(per_domain)
    if n < 1 or new_tokens < n:
        raise ValueError(f"new tokens ({new_tokens}) must be at least n ({n}), and n at least 1")


def heldout_prompts(task_dir: str | os.PathLike, per_domain: int) -> list[dict[str, str]]:
    """The passages of the first ``per_domain`` items of each domain of the task in
    ``task_dir``, as ``{"domain", "id", "text"}``, in the task's domain order."""
    _check_per_domain(per_domain)
    taken: dict[str, int] = {}
    prompts = []
    for item in load_items(task_dir):
        domain = item["domain"]
        if taken.get(domain, 0) < per_domain:
            taken[domain] = taken.get(domain, 0) + 1
            prompts.append({"domain": domain, "id": item["id"], "text": item["context"]})
    return prompts


class GreedyWriter:
    """One HF model directory, loaded once, continued greedily.

    Args:
        hf_dir: a local Hugging Face LLaMA directory (hub names are refused).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        path = check_model_dir(hf_dir)
        os.environ.update(OFFLINE_ENV)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path).float().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def continue_text(self, prompt: str, new_tokens: int) -> list[int]:
        """The ``new_tokens`` (fewer where the model ends the text) greedy tokens after
        ``prompt``; the prompt's own tokens are not returned."""
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids  # [1, s]
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with self._torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=self._torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )  # [1, s + new]
        return out[0, ids.shape[1] :].tolist()

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def report(
    hf_dir: str | os.PathLike,
    task_dir: str | os.PathLike | None = None,
    per_domain: int = 2,
    new_tokens: int = 48,
    n: int = 4,
    prompt: str = DEFAULT_PROMPT,
    sample_tokens: int = 20,
    threads: int | None = None,
) -> dict[str, Any]:
    """The model's parameters, its greedy sample for ``prompt`` (``sample_tokens`` new tokens,
    decoded with the prompt), and with a task: the mean and each held-out continuation's
    seq-rep-``n`` over ``new_tokens`` greedy tokens. ``threads`` sets torch's CPU threads for
    the call (None: leave them)."""
    check_options(per_domain, new_tokens, n)
    prompts = heldout_prompts(task_dir, per_domain) if task_dir is not None else []
    with cpu_threads(threads):
        writer = GreedyWriter(hf_dir)
        sample = prompt + writer.decode(writer.continue_text(prompt, sample_tokens))
        out: dict[str, Any] = {"model": str(hf_dir), "parameters": writer.parameters,
                               "sample": sample}  # fmt: skip
        rows = []
        for p in prompts:
            tokens = writer.continue_text(p["text"], new_tokens)
            rows.append({"id": p["id"], "domain": p["domain"], "tokens": len(tokens),
                         f"seq_rep_{n}": round(seq_rep(tokens, n), 4),
                         "text": writer.decode(tokens)})  # fmt: skip
    if rows:
        out[f"seq_rep_{n}"] = round(statistics.fmean(r[f"seq_rep_{n}"] for r in rows), 4)
        out["new_tokens"] = new_tokens
        out["continuations"] = rows
    return out
