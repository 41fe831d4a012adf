"""The pruning record of a pruning checkpoint: written and read here, nowhere else.

A pruning checkpoint's ``megashear.json`` holds, besides the model (the source shape, under
``model``), a ``pruning`` entry::

    "pruning": {"kinds": [...], "target": {ModelConfig}, "init": "paper" | "importance",
                "pinned_hidden": [...]}

:class:`PruningRecord` is that entry, typed: the pruning trainer writes it
(:meth:`PruningRecord.to_meta`); ``megashear finalize``, ``evaluate``, a resumed importance
start and the benchmarks read it (:func:`read_pruning_record`). Checkpoints written before
``init`` and ``pinned_hidden`` existed still load: their masks started from the paper's
initialisation and pinned no channel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megashear.checkpoint.format import CheckpointError
from megashear.model_config import ModelConfig

PRUNING_KEY = "pruning"
"""The key of the record in ``megashear.json``."""

INITS = ("paper", "importance")
"""How the masks started: the paper's N(mean, 0.01) log α, or log α from activation importance
at the target (:func:`megashear.pruning.importance.importance_log_alpha`)."""


@dataclass(frozen=True)
class PruningRecord:
    """What a pruning checkpoint says about its pruning.

    Attributes:
        source: the shape being pruned (the checkpoint's own model, ``megashear.json``'s
            ``model``; not repeated in the ``pruning`` entry).
        target: the target shape (a full :class:`ModelConfig`: its
            :data:`megashear.pruning.targets.TARGET_FIELDS` differ from the source, the rest is
            inherited).
        kinds: the mask kinds pruned (those with a nonzero target sparsity).
        init: one of :data:`INITS`.
        pinned_hidden: hidden channels never masked (``pruning.pin_hidden``), sorted.
    """

    source: ModelConfig
    target: ModelConfig
    kinds: tuple[str, ...]
    init: str = "paper"
    pinned_hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"pruning init {self.init!r} is not one of {INITS}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "pinned_hidden", tuple(sorted(int(c) for c in self.pinned_hidden)))

    def to_dict(self) -> dict:
        """The ``pruning`` entry of ``megashear.json`` (JSON types; the source is not in it)."""
        return {
            "kinds": list(self.kinds),
            "target": self.target.to_dict(),
            "init": self.init,
            "pinned_hidden": list(self.pinned_hidden),
        }

    def to_meta(self) -> dict:
        """The entries this record adds to ``megashear.json``: ``{"pruning": ...}``."""
        return {PRUNING_KEY: self.to_dict()}

    def replace(self, **changes) -> PruningRecord:
        """A copy with ``changes`` (dataclass fields)."""
        return dataclasses.replace(self, **changes)


def is_pruning_checkpoint(meta: dict) -> bool:
    """Whether ``megashear.json``'s content ``meta`` is a pruning checkpoint's."""
    return PRUNING_KEY in meta


def read_pruning_record(meta: dict, where: str = "checkpoint") -> PruningRecord | None:
    """The pruning record of ``megashear.json``'s content ``meta`` (None: not a pruning
    checkpoint). Old checkpoints without ``init`` / ``pinned_hidden`` read as ``paper`` / none.

    Raises:
        CheckpointError: the entry is not a record (missing kinds or target, a bad value).
    """
    if not is_pruning_checkpoint(meta):
        return None
    entry = meta[PRUNING_KEY]
    try:
        if not isinstance(entry, dict):
            raise TypeError(f"'{PRUNING_KEY}' is {type(entry).__name__}, not an object")
        return PruningRecord(
            source=ModelConfig.from_dict(meta["model"]),
            target=ModelConfig.from_dict(entry["target"]),
            kinds=tuple(str(k) for k in entry["kinds"]),
            init=str(entry.get("init", "paper")),
            pinned_hidden=tuple(entry.get("pinned_hidden", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        what = f"lacks {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{where}: megashear.json's pruning record {what}") from None
