"""The record of one platform patch: its name, its kind, what it prevents, how to install it.

Every patch of :mod:`megashear.platform` is a :class:`Patch`; :data:`megashear.platform.PATCHES`
lists them in install order and :func:`megashear.platform.install` is the one place that applies
them. ``tests/test_platform.py`` reads the list (names and kinds) from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

PatchKind = Literal["correctness", "process", "speed"]
"""``correctness``: without it megatron-core fails on CPU (it reaches CUDA, or its CUDA type
checks refuse CPU tensors); ``process``: without it megatron-core starts processes that can
outlive a killed rank; ``speed``: without it megatron-core runs, on its slow CPU fallback."""

KINDS: tuple[str, ...] = ("correctness", "process", "speed")


@dataclass(frozen=True)
class Patch:
    """A named CPU patch, its kind and the failure (or slow path) it prevents.

    Attributes:
        name: the patch's name (``MEGASHEAR_SKIP_CPU_PATCHES`` and the tests use it).
        kind: one of :data:`KINDS`.
        install: applies the patch (idempotent).
        prevents: the failure, or the slow path, that megatron-core shows without it.
        training_only: applied by the trainers only (``install("training")``), not by every
            process on CPU.
        reinstall: applied again on every :func:`~megashear.platform.install` call (the
            ``cuda_namespace`` proxy covers megatron-core modules imported since the last one).
    """

    name: str
    kind: PatchKind
    install: Callable[[], None]
    prevents: str
    training_only: bool = False
    reinstall: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"patch {self.name}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def apply(self) -> Callable[[], None]:
        """The install function (the name this record had before it declared its kind)."""
        return self.install

    @property
    def probe(self) -> str:
        """The probe that fails without this patch: ``tests/platform_probe.py::probe_<name>``."""
        return f"probe_{self.name}"
