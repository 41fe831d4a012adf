"""Per-run logs: a JSON Lines event log and TensorBoard scalars, written by rank 0 only.

``RUN_DIR/events.jsonl`` holds one JSON object per line with a ``kind`` (``train``, ``eval``,
``domain_weights``, ...), the ``step`` and the values; ``tools/plot_run.py`` reads it.
TensorBoard scalars go to ``RUN_DIR/tensorboard`` when the tensorboard package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger(__name__)


class RunLog:
    """Event log + TensorBoard writer; every method is a no-op on ranks other than 0."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._events = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._events = open(os.path.join(run_dir, "events.jsonl"), "a")
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


def read_events(run_dir: str, kind: str | None = None) -> list[dict]:
    """The events of a run (optionally of one kind), in order."""
    path = os.path.join(run_dir, "events.jsonl")
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return [e for e in events if kind is None or e["kind"] == kind]
