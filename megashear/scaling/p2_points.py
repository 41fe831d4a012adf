"""The tables the P² law is fitted on and queried with, read from CSV or JSON and checked.

A fit table has one row per observation with the columns ``n0, n, tokens, l0, loss``:

- ``n0``: parameters of the model before pruning (the source);
- ``n``: parameters after pruning (``0 < n < n0``); the pruning rate is ``ρ = 1 − n/n0``;
- ``tokens``: post-training (continued pre-training) tokens seen so far (``> 0``);
- ``l0``: the source's loss before pruning;
- ``loss``: the pruned model's loss after ``tokens`` tokens of post-training.

A query table has the same columns without ``loss``. CSV files have a header row; JSON files
hold a list of row objects (or ``{"points": [...]}``). Every bad value is a :class:`ValueError`
with a one-line message naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass

import numpy as np

FIT_COLUMNS = ("n0", "n", "tokens", "l0", "loss")
QUERY_COLUMNS = ("n0", "n", "tokens", "l0")


@dataclass
class Points:
    """Rows of a fit or query table as float arrays (``loss`` is None for a query)."""

    n0: np.ndarray
    n: np.ndarray
    tokens: np.ndarray
    l0: np.ndarray
    loss: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.n0)

    @property
    def rho(self) -> np.ndarray:
        """The pruning rate, the fraction of parameters removed: ``1 − n/n0``."""
        return 1.0 - self.n / self.n0

    def subset(self, mask: np.ndarray) -> Points:
        """The rows where ``mask`` is true."""
        loss = None if self.loss is None else self.loss[mask]
        return Points(self.n0[mask], self.n[mask], self.tokens[mask], self.l0[mask], loss)

    def curves(self) -> list[np.ndarray]:
        """Row indices of each curve (rows sharing ``n0, n, l0``), each sorted by tokens, the
        curves in order of first appearance."""
        keys: dict[tuple[float, float, float], list[int]] = {}
        for i, key in enumerate(zip(self.n0.tolist(), self.n.tolist(), self.l0.tolist())):
            keys.setdefault(key, []).append(i)
        return [np.array(sorted(idx, key=lambda i: self.tokens[i])) for idx in keys.values()]

    def rows(self) -> list[dict]:
        """The rows as plain dicts (integers where a count is whole)."""
        out = []
        for i in range(len(self)):
            row = {
                "n0": _count(self.n0[i]),
                "n": _count(self.n[i]),
                "tokens": _count(self.tokens[i]),
                "l0": float(self.l0[i]),
            }
            if self.loss is not None:
                row["loss"] = float(self.loss[i])
            out.append(row)
        return out


def _count(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def points_from_rows(rows: list[dict], source: str = "rows", with_loss: bool = True) -> Points:
    """Check ``rows`` (dicts of the table's columns) and return them as :class:`Points`.

    Raises:
        ValueError: a missing or unknown column, a value that is not a finite number, a
            non-positive count, ``n >= n0``, or no rows at all.
    """
    columns = FIT_COLUMNS if with_loss else QUERY_COLUMNS
    if not rows:
        raise ValueError(f"{source} holds no rows (columns {', '.join(columns)})")
    values = {c: [] for c in columns}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{source} row {i} is not an object with columns {columns}")
        unknown = sorted(set(row) - set(columns))
        if unknown:
            raise ValueError(
                f"{source}: unknown column {unknown[0]!r}; expected {', '.join(columns)}"
            )
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{source} row {i} lacks column {missing[0]!r}")
        for c in columns:
            values[c].append(_number(row[c], source, i, c))
    arrays = {c: np.asarray(v, dtype=float) for c, v in values.items()}
    for i in range(len(rows)):
        where = f"{source} row {i + 1}"
        n0, n, tokens, l0 = (arrays[c][i] for c in QUERY_COLUMNS)
        if n0 <= 0:
            raise ValueError(f"{where}: n0 must be a positive parameter count, got {n0:g}")
        if n <= 0:
            raise ValueError(f"{where}: n must be a positive parameter count, got {n:g}")
        if n >= n0:
            raise ValueError(
                f"{where}: n ({n:g}) must be smaller than n0 ({n0:g}): a pruned model has "
                "fewer parameters than its source"
            )
        if tokens <= 0:
            raise ValueError(f"{where}: tokens must be positive, got {tokens:g}")
        if l0 <= 0:
            raise ValueError(f"{where}: l0 must be a positive loss, got {l0:g}")
        if with_loss and arrays["loss"][i] <= 0:
            raise ValueError(f"{where}: loss must be positive, got {arrays['loss'][i]:g}")
    return Points(
        arrays["n0"],
        arrays["n"],
        arrays["tokens"],
        arrays["l0"],
        arrays["loss"] if with_loss else None,
    )


def _number(value, source: str, row: int, column: str) -> float:
    """A finite float from a table cell, else a one-line ValueError."""
    if isinstance(value, bool):
        value = None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{source} row {row}: column {column!r} is not a number ({value!r})"
        ) from None
    if not math.isfinite(x):
        raise ValueError(f"{source} row {row}: column {column!r} is {value!r}, not a finite number")
    return x


def read_points(path: str, with_loss: bool = True) -> Points:
    """A fit table (``with_loss``) or a query table from ``path`` (``.json``: JSON, otherwise
    CSV with a header row)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and "points" in data:
            data = data["points"]
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of rows or {{'points': [...]}}")
        return points_from_rows(data, path, with_loss)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"{path} is empty (expected a CSV header row)")
            header = [h.strip() for h in reader.fieldnames]
            reader.fieldnames = header
            rows = []
            for raw in reader:
                if None in raw:
                    raise ValueError(
                        f"{path} line {reader.line_num} has more cells than the header"
                    )
                if all(v is None or not str(v).strip() for v in raw.values()):
                    continue  # a blank line
                rows.append({k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()})
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a UTF-8 CSV file ({exc.reason})") from None
    return points_from_rows(rows, path, with_loss)
