"""Files written whole or not at all: a temporary name in the same directory, then a rename.

Every file megashear writes for a user (configs, manifests, run logs, scores, results, plots)
goes through here, so that an interrupted or failed write leaves the previous file (or none),
never half of one. Checkpoint directories have their own staging (``checkpoint.publish``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary name beside ``path``; when the block ends without an exception the
    temporary file is renamed onto ``path``, otherwise it is removed. The parent directory is
    created if needed. ``suffix`` ends the temporary name (e.g. ``.png`` for writers that infer
    the format from the name)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary name, flushed to disk, and a
    rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int = 1) -> None:
    """Write ``value`` as JSON to ``path`` (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(value, indent=indent))
