"""CPU mode: the small, named set of patches that let megatron-core 0.16 run without CUDA.

This is the only package in megashear that knows the difference between CPU and GPU. On a
machine with CUDA, :func:`install` applies no CPU patch. Without CUDA it applies the patches of
:data:`PATCHES`, each a :class:`Patch` that declares its name, its kind, the failure (or slow
path) it prevents and its install function. The modules, by concept:

:mod:`~megashear.platform.devices`
    device queries: :func:`cuda_available`, :func:`default_device`,
    :func:`distributed_backend`.
:mod:`~megashear.platform.shims`
    correctness shims (kind ``correctness``: CUDA namespaces, type names, RNG, optimizer state;
    kind ``process``: the checkpoint writer's child processes).
:mod:`~megashear.platform.speed`
    speed patches: rewrites of megatron-core internals (grad norm, fused AdamW, wgrad
    accumulation, RoPE tables, tied-embedding wgrad, aligned gradient buffer).
:mod:`~megashear.platform.host_memory`
    glibc allocator tuning (``host_allocator``, and :func:`keep_freed_host_memory`).
:mod:`~megashear.platform.installer`
    :data:`PATCHES` and :func:`install`, the one place that applies them.

Model configs must also set ``use_cpu_initialization=True`` and ``batch_p2p_sync=False`` on
CPU; :func:`megashear.models.llama.build_transformer_config` does that.
"""

from __future__ import annotations

from megashear.platform.devices import cuda_available, default_device, distributed_backend
from megashear.platform.host_memory import HEAP_BLOCK_LIMIT, keep_freed_host_memory
from megashear.platform.installer import (
    PATCHES,
    ROLES,
    SKIP_ENV,
    applied_patches,
    install,
    install_cpu_support,
    wgrad_accumulation_fusion,
)
from megashear.platform.patch import KINDS, Patch
from megashear.platform.speed import GRAD_ALIGN

__all__ = [
    "GRAD_ALIGN",
    "HEAP_BLOCK_LIMIT",
    "KINDS",
    "PATCHES",
    "ROLES",
    "SKIP_ENV",
    "Patch",
    "applied_patches",
    "cuda_available",
    "default_device",
    "distributed_backend",
    "install",
    "install_cpu_support",
    "keep_freed_host_memory",
    "wgrad_accumulation_fusion",
]
