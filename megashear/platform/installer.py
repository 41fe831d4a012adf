"""The one installer of the platform patches: :func:`install`.

Every process that runs megatron-core goes through :func:`install` (``parallel`` when it sets up
torch.distributed and the model-parallel groups, ``models.llama`` when it builds a model, the
trainers once their DDP model and optimizer exist, ``megashear finalize`` for its host memory).
Which patches it applies depends on the role it is asked for, never on the caller:

``compute``
    the CPU patches of :data:`PATCHES` except the training-only ones; nothing with CUDA.
``training``
    every CPU patch (``host_allocator`` too); nothing with CUDA.
``streaming``
    no CPU patch; the host allocator keeps freed memory with one malloc arena
    (:func:`~megashear.platform.host_memory.keep_freed_host_memory`), with or without CUDA: a
    process that only streams tensors between files (``megashear finalize``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Literal

from megashear.platform.devices import cuda_available
from megashear.platform.host_memory import HOST_MEMORY, keep_freed_host_memory
from megashear.platform.patch import Patch
from megashear.platform.shims import SHIMS
from megashear.platform.speed import SPEED

logger = logging.getLogger(__name__)

PATCHES: tuple[Patch, ...] = (*SHIMS, *SPEED, *HOST_MEMORY)
"""Every CPU patch, in install order: correctness shims, speed patches, host memory."""

Role = Literal["compute", "training", "streaming"]
ROLES: tuple[str, ...] = ("compute", "training", "streaming")

_APPLIED: set[str] = set()

SKIP_ENV = "MEGASHEAR_SKIP_CPU_PATCHES"
"""Comma-separated patch names that every :func:`install` call in the process leaves out, e.g.
``fused_adam,wgrad_accumulation``: megatron-core's own CPU fallback then runs instead, to rule a
speed patch out when a number looks wrong."""


def applied_patches() -> list[str]:
    """The names of the CPU patches applied in this process so far, in :data:`PATCHES` order."""
    return [p.name for p in PATCHES if p.name in _APPLIED]


def wgrad_accumulation_fusion() -> bool:
    """Whether models should set ``gradient_accumulation_fusion``: on CPU once the
    ``wgrad_accumulation`` patch is in; never with CUDA (the GPU path is left as it was)."""
    return "wgrad_accumulation" in _APPLIED and not cuda_available()


def install(role: Role = "compute", skip: Iterable[str] = ()) -> list[str]:
    """Apply the platform patches for ``role`` (see the module docstring).

    Safe to call repeatedly: a patch is applied once, except ``cuda_namespace``
    (``reinstall``), which re-scans ``sys.modules`` so that megatron-core modules imported since
    the last call are covered too.

    Args:
        role: ``compute``, ``training`` or ``streaming``.
        skip: names of patches to leave out (tests use this to show what each one prevents);
            the names in the environment variable :data:`SKIP_ENV` are left out too.

    Returns:
        The names of the patches applied in this call.

    Raises:
        ValueError: an unknown role, or an unknown patch name in ``skip`` or :data:`SKIP_ENV`.
    """
    if role not in ROLES:
        raise ValueError(f"unknown platform role {role!r}; known: {list(ROLES)}")
    if role == "streaming":
        # this process only streams tensors: keep freed pages, one malloc arena for its threads
        return ["host_allocator"] if keep_freed_host_memory(single_arena=True) else []
    if cuda_available():
        return []
    from_env = {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",") if name.strip()}
    skip = set(skip) | from_env
    unknown = skip - {p.name for p in PATCHES}
    if unknown:
        where = f" (in {SKIP_ENV})" if unknown & from_env else ""
        raise ValueError(
            f"unknown CPU patches {sorted(unknown)}{where}; known: {[p.name for p in PATCHES]}"
        )
    applied = []
    for patch in PATCHES:
        if patch.name in skip or patch.training_only and role != "training":
            continue
        if patch.name in _APPLIED and not patch.reinstall:
            continue
        patch.install()
        _APPLIED.add(patch.name)
        applied.append(patch.name)
    logger.debug("CPU patches applied (%s): %s", role, applied)
    return applied


def install_cpu_support(skip: Iterable[str] = (), training: bool = False) -> list[str]:
    """:func:`install` with ``role="training"`` when ``training``, else ``"compute"`` (the name
    the installer had before it took a role)."""
    return install("training" if training else "compute", skip)
