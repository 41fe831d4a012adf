"""The ``dist_checkpointing`` files of one checkpoint directory, read and written with
megatron-core's and PyTorch DCP's own helpers.

A ``torch_dist`` checkpoint directory holds ``metadata.json`` (megatron-core's
:class:`~megatron.core.dist_checkpointing.core.CheckpointingConfig`: the backends), ``common.pt``
(the non-sharded state), DCP's ``.metadata`` (every tensor's global shape, dtype and where its
chunks are stored) and the ``*.distcp`` data files. Any failure to read them is a one-line
:class:`~megashear.checkpoint.format.CheckpointError` naming the damaged file.
"""

from __future__ import annotations

import os

import torch

from megashear.checkpoint.format import CheckpointError


def _first_line(exc: BaseException, default: str = "") -> str:
    return (str(exc).strip().splitlines() or [default])[0]


def damaged_file(ckpt_dir: str) -> str | None:
    """What is wrong with the files of the dist checkpoint ``ckpt_dir``, if anything can be
    seen without reading the tensors: an unreadable ``.metadata``, or a data file that is missing
    or shorter than the bytes the metadata places in it. None when every file looks complete."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(ckpt_dir, ".metadata")
    try:
        storage = FileSystemReader(ckpt_dir).read_metadata().storage_data
    except FileNotFoundError:
        return f"{path} is missing"
    except Exception as exc:  # a truncated or overwritten pickle raises anything
        return f"{path} is unreadable ({type(exc).__name__}: {_first_line(exc, 'truncated')})"
    need: dict[str, int] = {}
    for info in (storage or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        file = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        have = os.path.getsize(file)
        if have < size:
            return f"{file} is truncated ({have} of {size} bytes)"
    return None


def _load_error(ckpt_dir: str, exc: BaseException) -> CheckpointError:
    damage = damaged_file(ckpt_dir)
    if damage is not None:
        return CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded: {damage}")
    return CheckpointError(
        f"checkpoint {ckpt_dir} cannot be loaded ({type(exc).__name__}: {_first_line(exc)})"
    )


def dist_load(request: dict, ckpt_dir: str, **kwargs) -> dict:
    """``dist_checkpointing.load(request, ckpt_dir)``; any failure to read the files is a
    one-line :class:`CheckpointError` naming the damaged file (or the checkpoint and the
    first line of the underlying error)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(request, ckpt_dir, **kwargs)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise _load_error(ckpt_dir, exc) from exc


def tensor_metadata(ckpt_dir: str) -> dict:
    """Sharded key -> a data-less ``ShardedTensor`` (global shape and dtype) of every tensor of
    the checkpoint (``dist_checkpointing.load_tensors_metadata``), once the files are checked
    to be complete: a damaged checkpoint is refused before anything is read or written."""
    from megatron.core import dist_checkpointing

    try:
        stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    except Exception as exc:  # missing, truncated or not a DCP metadata pickle
        raise _load_error(ckpt_dir, exc) from None
    damage = damaged_file(ckpt_dir)
    if damage is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded: {damage}")
    return stored


def write_backend_files(ckpt_dir: str) -> None:
    """The files of a ``torch_dist`` checkpoint besides the tensors, for a writer that bypasses
    ``dist_checkpointing.save``: an empty common state and the backend config."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    torch.save({}, os.path.join(ckpt_dir, COMMON_STATE_FNAME))
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), ckpt_dir)
