"""Score a Hugging Face model directory on a local lm-eval task, offline, in-process.

lm-eval (EleutherAI's lm-evaluation-harness, the ``eval`` extra) is imported only here and only
when :func:`score` runs. The model is loaded from a local directory by lm-eval's ``hf`` model
(transformers ``AutoModelForCausalLM``) on the CPU in float32; the task is read from its own
directory through ``TaskManager(include_path=...)``, and the hub and datasets offline switches are
set before lm-eval is imported, so nothing is fetched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megashear.evaluation.downstream_task import find_task

log = logging.getLogger(__name__)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def check_model_dir(hf_dir: str | os.PathLike) -> Path:
    """``hf_dir`` as a path, or a one-line ``ValueError`` when it is no local HF model directory
    (a hub name is refused: nothing may be downloaded)."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise ValueError(f"model {hf_dir} is not a local directory (hub names are not fetched)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model {hf_dir} is not a Hugging Face model directory (no config.json)")
    return path.resolve()


def check_threads(threads: int | None) -> None:
    """A one-line ``ValueError`` for a thread count torch cannot use (None: leave torch's)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """torch's CPU threads set to ``threads`` inside the block and restored after it (None:
    left as they are); yields the count in effect."""
    check_threads(threads)
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _domain_scores(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """acc and acc_norm per domain from lm-eval's logged samples."""
    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        domain = s.get("doc", {}).get("domain", "?")
        d = out.setdefault(domain, {"items": 0, "acc": 0.0, "acc_norm": 0.0})
        d["items"] += 1
        d["acc"] += float(s["acc"])
        d["acc_norm"] += float(s["acc_norm"])
    for d in out.values():
        d["acc"] = round(d["acc"] / d["items"], 4)
        d["acc_norm"] = round(d["acc_norm"] / d["items"], 4)
    return dict(sorted(out.items()))


def score(
    hf_dir: str | os.PathLike,
    task_dir: str | os.PathLike,
    batch_size: int = 8,
    threads: int | None = None,
    limit: int | None = None,
    max_length: int = 2048,
) -> dict[str, Any]:
    """Score ``hf_dir`` on the task built in ``task_dir`` with ``lm_eval.simple_evaluate``.

    Args:
        hf_dir: a local Hugging Face model directory (``config.json``, weights, tokenizer).
        task_dir: a directory written by ``downstream_task.build_task``.
        batch_size: lm-eval's batch size (requests per forward pass).
        threads: torch's CPU threads for the run (None: leave torch's setting); restored after.
        limit: score only the first ``limit`` items (a smoke test; None: all).
        max_length: the tokens lm-eval may feed the model per request (the items need about
            110 of SmolLM2's tokens).

    Returns:
        task, model, items, acc, acc_stderr, acc_norm, acc_norm_stderr, chance, per-domain
        acc / acc_norm, seconds (model load and scoring) and the lm-eval version.

    Any failure is a one-line ``ValueError``: a missing lm-eval, a bad model or task directory,
    or an error inside lm-eval.
    """
    model = check_model_dir(hf_dir)
    name, meta = find_task(task_dir)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    check_threads(threads)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    os.environ.update(OFFLINE_ENV)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ValueError(
            f"lm-eval is not installed ({_one_line(exc)}); pip install 'megashear[eval]'"
        ) from None
    start = time.time()
    with cpu_threads(threads) as used_threads:
        try:
            manager = TaskManager(
                include_path=str(Path(task_dir).resolve()), include_defaults=False
            )
            out = lm_eval.simple_evaluate(
                model="hf",
                # an export's max_position_embeddings is its training run's sequence length
                # (e.g. 128), not a limit of RoPE: without max_length lm-eval would cut contexts
                # to it
                model_args={"pretrained": str(model), "dtype": "float32", "max_length": max_length},
                tasks=[name],
                task_manager=manager,
                batch_size=batch_size,
                device="cpu",
                limit=limit,
                log_samples=True,
                # acc is a mean: its stderr is closed-form, not bootstrapped
                bootstrap_iters=1000,
            )
            res = out["results"][name]
            samples = out.get("samples", {}).get(name, [])
        except Exception as exc:  # lm-eval and transformers raise many kinds; keep the contract
            raise ValueError(
                f"lm-eval could not score {hf_dir} on {name}: {_one_line(exc)}"
            ) from None
    seconds = time.time() - start
    result = {
        "task": name,
        "task_dir": str(task_dir),
        "model": str(hf_dir),
        "items": len(samples) if samples else (limit or meta.get("items")),
        "acc": res["acc,none"],
        "acc_stderr": res.get("acc_stderr,none"),
        "acc_norm": res["acc_norm,none"],
        "acc_norm_stderr": res.get("acc_norm_stderr,none"),
        "chance": meta.get("chance", 0.25),
        "domains": _domain_scores(samples),
        "seconds": round(seconds, 1),
        "batch_size": batch_size,
        "threads": used_threads,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
    }
    log.info(
        "%s on %s: acc %.3f ± %.3f, acc_norm %.3f ± %.3f (%s items, %.0f s)",
        hf_dir,
        name,
        result["acc"],
        result["acc_stderr"] or 0.0,
        result["acc_norm"],
        result["acc_norm_stderr"] or 0.0,
        result["items"],
        seconds,
    )
    return result
