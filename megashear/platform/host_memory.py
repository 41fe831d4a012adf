"""Host memory: glibc allocator tuning (``mallopt``), the same with or without CUDA.

``host_allocator``
    On CPU every activation comes from glibc's ``malloc``, which serves blocks above its
    (dynamic, at most 32 MiB) mmap threshold with a fresh ``mmap`` and returns freed memory at
    the top of the heap to the kernel. A training step then page-faults its whole working set
    back in every step (about 110k faults, 430 MiB zero-filled, per SmolLM2-135M step at 4 x 256
    tokens), and the faults land inside the matmuls that write fresh outputs. The patch keeps
    blocks up to 1 GiB on the heap and the heap's freed memory in the process
    (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD, -1)``): about 3k faults per
    step. The peak RSS of a training step is unchanged, but the process no longer gives memory
    back below its peak. So only the trainers apply it (``install("training")``), and
    ``megashear finalize`` (``install("streaming")``: :func:`keep_freed_host_memory` with one
    malloc arena: its
    7B -> 1.3B run took 5.8M page faults and 21 s of system time without it, 0.4M and 6 s with
    it, for a peak RSS of 1.7 GB instead of 1.3 GB; with one arena per thread it kept 1.9 GB and
    still took 4M faults). Where the C library is not glibc, it does nothing (and says so at
    debug level).
"""

from __future__ import annotations

import logging

from megashear.platform.patch import Patch

logger = logging.getLogger(__name__)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt (malloc.h)
HEAP_BLOCK_LIMIT = 1 << 30  # blocks up to this size come from the heap, not a fresh mmap


def _glibc():
    """glibc, or None where the C library is another (musl, macOS) or lacks ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_host_memory(single_arena: bool = False) -> bool:
    """Make glibc's ``malloc`` serve blocks up to :data:`HEAP_BLOCK_LIMIT` from the heap and
    keep freed heap memory in the process (the ``host_allocator`` patch; see the module
    docstring), so that host tensors reuse pages instead of faulting fresh ones in. With
    ``single_arena`` every thread shares the main arena (``M_ARENA_MAX`` 1): a process whose
    helper threads allocate tensors would otherwise keep freed memory once per thread's arena.
    Call it before those threads start. Host memory is the same with or without CUDA, so this
    is not a CPU-mode patch by itself. Returns False where the C library is not glibc (then
    nothing changes) or glibc refuses a setting (the ones before it stay)."""
    libc = _glibc()
    if libc is None:
        logger.debug("host_allocator: not glibc, malloc left as it is")
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) and libc.mallopt(_M_TRIM_THRESHOLD, -1)
    if ok and single_arena:
        ok = libc.mallopt(_M_ARENA_MAX, 1)
    if not ok:
        logger.debug("host_allocator: glibc refused mallopt, malloc left as it is")
    return bool(ok)


def _patch_host_allocator() -> None:
    keep_freed_host_memory()


HOST_MEMORY: tuple[Patch, ...] = (
    Patch(
        "host_allocator",
        "speed",
        _patch_host_allocator,
        "page faults over the whole working set in every step: malloc's mmap and trim (speed)",
        training_only=True,
    ),
)
"""The host-memory patches of CPU mode (the trainers' allocator tuning)."""
