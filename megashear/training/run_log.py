"""Per-run logs: a JSON Lines event log and TensorBoard scalars, written by rank 0 only.

``RUN_DIR/events.jsonl`` holds one JSON object per line with a ``kind`` (``train``, ``eval``,
``domain_weights``, ...), the ``step`` and the values; ``tools/plot_run.py`` reads it.
TensorBoard scalars go to ``RUN_DIR/tensorboard`` when the tensorboard package is installed.

A resumed run continues the log of the run it resumes: the records of steps after the resumed
iteration (steps the interrupted run took after its last checkpoint, which the resumed run
takes again) are dropped first, so that every step is logged once. A run whose start-up fails
removes the directories it created (:func:`missing_dirs`, :func:`remove_failed_start`).
"""

from __future__ import annotations

import json
import logging
import math
import os

from megashear.atomic_file import write_text_atomic

logger = logging.getLogger(__name__)


class RunLog:
    """Event log + TensorBoard writer; every method is a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_from: int | None = None,
    ) -> None:
        """Open (append to) ``run_dir/events.jsonl``.

        Args:
            resume_from: the iteration the run continues from (the loaded checkpoint's); the
                records of later steps are dropped from the log first. 0 or None: a fresh run,
                the log is appended to as it is.
        """
        self.enabled = enabled
        self.run_dir = run_dir
        self._events = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "events.jsonl")
        if resume_from and os.path.isfile(path):
            drop_after(path, resume_from)
        self._events = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as exc:  # tensorboard is optional
                logger.warning("TensorBoard logging is off (%s)", exc)

    def log(self, kind: str, step: int, values: dict) -> None:
        """Append one event and mirror its numeric values as ``kind/name`` scalars."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._events.write(json.dumps(record, default=float) + "\n")
        self._events.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            self._tb.add_scalar(f"{kind}/{name}/{sub}", v, step)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._tb is not None:
            self._tb.close()


def drop_after(path: str, step: int) -> int:
    """Rewrite the event log ``path`` without the records of steps after ``step`` (and without
    lines that are not JSON, such as a last line cut off by a crash); atomic (temporary file,
    then rename). Returns the number of lines dropped."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                later = isinstance(record, dict) and int(record.get("step", 0)) > step
            except (json.JSONDecodeError, TypeError, ValueError):
                later = True
            if later:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
        logger.info("resuming at step %d: dropped %d later records from %s", step, dropped, path)
    return dropped


def missing_dirs(*paths: str | None) -> list[str]:
    """For each directory given (None and "" skipped) that does not exist yet, the outermost of
    its ancestors that does not exist either: what creating it would create."""
    out = []
    for path in filter(None, paths):
        path = os.path.abspath(path)
        if os.path.exists(path):
            continue
        while not os.path.exists(os.path.dirname(path)):
            path = os.path.dirname(path)
        if path not in out:
            out.append(path)
    return out


def remove_failed_start(dirs: list[str]) -> None:
    """After a run failed at start-up, remove the directories of ``dirs`` (from
    :func:`missing_dirs` before it started) that it created: its ``config.yaml``, index cache and
    event log. Nothing is removed once any of them holds a saved checkpoint (the run got past
    start-up), and only rank 0 (``RANK``, default 0) removes anything."""
    import shutil

    from megashear.checkpoint.format import TRACKER

    if int(os.environ.get("RANK", "0")) != 0:
        return
    existing = [d for d in dirs if os.path.isdir(d)]
    for d in existing:
        for _, _, files in os.walk(d):
            if TRACKER in files:
                return
    for d in existing:
        shutil.rmtree(d, ignore_errors=True)
        logger.info("removed %s (created by this failed run)", d)


def read_events(run_dir: str, kind: str | None = None) -> list[dict]:
    """The events of a run (optionally of one kind), in order."""
    path = os.path.join(run_dir, "events.jsonl")
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return [e for e in events if kind is None or e["kind"] == kind]
