"""Publishing checkpoints atomically, rotating old ones, and refusing outputs that must not be
written.

Two ways a checkpoint appears, both all or nothing:

* :func:`save_iteration` adds ``iter_N`` to a run's root: every rank saves into ``iter_N.tmp``,
  which is renamed to ``iter_N`` once all have finished; the tracker is moved after that. A
  crash mid-save leaves the previous checkpoint and tracker untouched; the stale ``.tmp``
  directories it leaves are removed when the next run starts (:func:`remove_stale_saves`) and
  by every save.
* :func:`publish_dir` writes a whole new output directory (a converted or finalised checkpoint,
  a Hugging Face directory) under ``PATH.tmp-save`` and renames it to ``PATH`` at the end; a
  failure removes the temporary directory and leaves no partial output.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megashear.checkpoint.format import (
    CheckpointError,
    iteration_dir,
    write_meta,
    write_tracker,
)

logger = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rotate(root: str, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` ``iter_N`` directories of ``root`` (0: keep
    all)."""
    if keep_last <= 0:
        return
    iters = sorted(
        int(n[len("iter_") :])
        for n in os.listdir(root)
        if n.startswith("iter_") and n[len("iter_") :].isdigit()
    )
    for it in iters[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def write_failure(path: str, exc: BaseException) -> CheckpointError | None:
    """A one-line :class:`CheckpointError` for a failed write of ``path``, or None when the
    error is not the file system's. torch's writers report a full disk as ``RuntimeError: ...
    unexpected pos``, so the file system is asked why: read only or (nearly) full."""
    where = _existing_parent(path)
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and exc.strerror:
        reason = exc.strerror
    elif not os.access(where, os.W_OK):
        reason = "Read-only file system (or no write permission)"
    elif shutil.disk_usage(where).free < 16 << 20:
        reason = f"No space left on device ({shutil.disk_usage(where).free} bytes free)"
    else:
        return None
    return CheckpointError(f"cannot write {path}: {reason}")


def _remove_tmp_entries(root: str) -> list[str]:
    removed = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def remove_stale_saves(root: str) -> None:
    """Remove the ``iter_N.tmp`` directories an interrupted save left under ``root`` (rank 0;
    collective over every rank). Called when a run that saves into ``root`` starts."""
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isdir(root):
        removed = _remove_tmp_entries(root)
        if removed:
            logger.warning("removed %s left in %s by an interrupted save", ", ".join(removed), root)
    _barrier()


def save_iteration(root: str, iteration: int, state: dict, meta: dict, keep_last: int) -> str:
    """``dist_checkpointing.save(state)`` as ``root/iter_N`` (collective over every rank): into
    ``iter_N.tmp``, then ``megashear.json``, the rename, the tracker and the rotation.

    Returns:
        The final checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            _remove_tmp_entries(root)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(state, tmp)
        _barrier()
        if rank == 0:
            write_meta(tmp, meta)
    except (OSError, RuntimeError, CheckpointException) as exc:  # e.g. a full or read-only disk
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the last good checkpoint stays the latest
        failure = write_failure(final, exc)
        if failure is None:
            raise
        raise failure from exc
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_tracker(root, iteration)
        rotate(root, keep_last)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def check_new_output(save: str, overwrite: bool) -> None:
    """Refuse (:class:`CheckpointError`, one line) to replace an existing ``save`` without
    ``overwrite``."""
    if os.path.exists(save) and not overwrite:
        raise CheckpointError(f"output {save} exists (pass --overwrite to replace it)")


def check_output_path(load: str, save: str, overwrite: bool) -> None:
    """Refuse (:class:`CheckpointError`, one line) an output that would destroy the input
    (``save`` equal to, inside or containing ``load``, even with ``overwrite``) or replace an
    existing one without ``overwrite``."""
    src, dst = os.path.realpath(load), os.path.realpath(save)
    if src == dst or src.startswith(dst + os.sep) or dst.startswith(src + os.sep):
        raise CheckpointError(
            f"--save {save} overlaps --load {load}: writing it would destroy the input "
            "(save to another directory)"
        )
    check_new_output(save, overwrite)


def publish_dir(path: str, fill: Callable[[str], None], suffix: str = ".tmp-save") -> None:
    """Create the directory ``path`` all at once: ``fill(tmp)`` writes it under ``path +
    suffix``, which then replaces ``path`` (a failure removes ``tmp`` and re-raises). Single
    process; the caller has checked whether ``path`` may be replaced."""
    tmp = path.rstrip("/") + suffix
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
    except (OSError, RuntimeError, CheckpointException) as exc:  # a full or read-only disk
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output
        failure = write_failure(path, exc)
        if failure is None:
            raise
        raise failure from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
