#!/usr/bin/env python3
"""Build a held-out lm-eval task from the corpus, or score a Hugging Face model on it (offline).

    python tools/downstream_eval.py build --corpus ../shared/corpus --out runs/heldout_task \\
        [--items-per-domain 30] [--context-chars 256] [--min-continuation-chars 60] \\
        [--max-continuation-chars 100] [--seed 1234] [--min-skip-bytes 4000000] \\
        [--tail-bytes N] [--name megashear_heldout] [--overwrite]
    python tools/downstream_eval.py score --model HF_DIR --task runs/heldout_task \\
        [--batch-size 8] [--threads 2] [--limit N]
    python tools/downstream_eval.py greedy --model HF_DIR [--task runs/heldout_task] \\
        [--per-domain 2] [--new-tokens 48] [--n 4] [--prompt TEXT] [--threads 2]

``build`` writes a 4-way multiple-choice continuation task (an lm-eval YAML, its JSON Lines items,
a loader and the build metadata) from documents past each domain file's first
``--min-skip-bytes`` (``megashear.evaluation.downstream_task``). ``score`` runs lm-eval's ``hf``
model on the CPU in float32 with the hub and datasets offline
(``megashear.evaluation.lm_eval_score``; needs the ``eval`` extra). ``greedy`` continues the
task's held-out passages greedily with transformers and reports how much the text loops
(seq-rep-n, ``megashear.evaluation.greedy_text``), with a sample for ``--prompt``. Each prints
one JSON line; bad input is one ``error:`` line and exit code 2. See docs/downstream_eval.md.
"""

from __future__ import annotations

import logging
import sys


def build(args) -> dict:
    from megashear.evaluation.downstream_task import TaskSpec, build_task

    spec = TaskSpec(
        items_per_domain=args.items_per_domain,
        context_chars=args.context_chars,
        min_continuation_chars=args.min_continuation_chars,
        max_continuation_chars=args.max_continuation_chars,
        seed=args.seed,
        min_skip_bytes=args.min_skip_bytes,
        tail_bytes=args.tail_bytes,
        name=args.name,
    )
    return build_task(args.corpus, args.out, spec, overwrite=args.overwrite)


def score(args) -> dict:
    from megashear.evaluation.lm_eval_score import score as lm_eval_score

    return lm_eval_score(
        args.model, args.task, batch_size=args.batch_size, threads=args.threads, limit=args.limit
    )


def greedy(args) -> dict:
    from megashear.evaluation.greedy_text import report

    return report(
        args.model,
        args.task,
        per_domain=args.per_domain,
        new_tokens=args.new_tokens,
        n=args.n,
        prompt=args.prompt,
        sample_tokens=args.sample_tokens,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    from megashear.cli import OneLineArgumentParser
    from megashear.evaluation.downstream_task import DEFAULT_TASK_NAME, TaskSpec
    from megashear.evaluation.greedy_text import DEFAULT_PROMPT

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the held-out task from a corpus directory")
    d = TaskSpec()
    b.add_argument("--corpus", required=True, help="a directory of <domain>.jsonl[.xz] files")
    b.add_argument("--out", required=True, help="the task directory to write")
    b.add_argument("--items-per-domain", type=int, default=d.items_per_domain)
    b.add_argument("--context-chars", type=int, default=d.context_chars)
    b.add_argument("--min-continuation-chars", type=int, default=d.min_continuation_chars)
    b.add_argument("--max-continuation-chars", type=int, default=d.max_continuation_chars)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument(
        "--min-skip-bytes",
        type=int,
        default=d.min_skip_bytes,
        help="leading text of each domain file that runs may read; no item comes from it",
    )
    b.add_argument(
        "--tail-bytes",
        type=int,
        default=None,
        help="take items from each file's last N bytes only (refused if they reach the skip)",
    )
    b.add_argument("--name", default=DEFAULT_TASK_NAME, help="the lm-eval task name")
    b.add_argument("--overwrite", action="store_true", help="rebuild an existing task")
    s = sub.add_parser("score", help="score a Hugging Face model directory on a built task")
    s.add_argument("--model", required=True, help="a local Hugging Face model directory")
    s.add_argument("--task", required=True, help="a task directory written by build")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--limit", type=int, default=None, help="score only the first N items")
    g = sub.add_parser("greedy", help="greedy text on held-out passages, and how much it loops")
    g.add_argument("--model", required=True, help="a local Hugging Face model directory")
    g.add_argument("--task", default=None, help="a task directory (its passages are the prompts)")
    g.add_argument("--per-domain", type=int, default=2, help="prompts per domain")
    g.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt")
    g.add_argument("--n", type=int, default=4, help="the n of seq-rep-n")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of the shown sample")
    g.add_argument("--sample-tokens", type=int, default=20, help="new tokens of the sample")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megashear.cli import run_tool

    command = {"build": build, "score": score, "greedy": greedy}[args.command]
    return run_tool(lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
