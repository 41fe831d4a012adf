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
from megashear.checkpoint.mapped_record import map_tensor


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


class ChunkReader:
    """Regions of the tensors of a ``torch_dist`` checkpoint, read straight from its files by
    DCP's own metadata (``.metadata``: each stored chunk's offsets, sizes, file, byte range), no
    process group needed. A region that one stored chunk covers is that chunk's tensor,
    narrowed, not copied into a destination as ``dist_checkpointing.load`` does. With ``mmap``
    (the default) the chunk is memory-mapped from its file (:mod:`.mapped_record`): no copy at
    all, and a consumer that keeps some rows reads only theirs; otherwise (or for a record that
    cannot be mapped) it is ``torch.load``'s copy. Other regions are assembled from their chunks.
    """

    def __init__(self, ckpt_dir: str, mmap: bool = True) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.mmap = mmap
        damage = damaged_file(ckpt_dir)  # also refuses an unreadable .metadata
        if damage is not None:
            raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded: {damage}")
        self.dir = ckpt_dir
        self._reader = FileSystemReader(ckpt_dir)
        md = self._reader.read_metadata()
        self._reader.set_up_storage_reader(md, is_coordinator=True)
        # sharded key -> TensorStorageMetadata (size, properties.dtype, chunks); no byte blobs
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}

    def _chunk(self, key: str, offsets) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._reader.storage_data[MetadataIndex(key, torch.Size(offsets))]
        path = os.path.join(self.dir, info.relative_path)
        try:
            if info.transform_descriptors:
                raise ValueError(f"stored with transforms {list(info.transform_descriptors)}")
            if self.mmap:
                mapped = map_tensor(path, int(info.offset), int(info.length))
                if mapped is not None:
                    return mapped
            with open(path, "rb") as f:
                return torch.load(self._reader._slice_file(f, info), map_location="cpu",
                                  weights_only=True)  # fmt: skip
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {self.dir} cannot be loaded: {key} in {path} "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from None

    def region(self, key: str, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """``global_tensor[offsets : offsets + sizes]`` of the sharded key ``key``."""
        md = self.tensors[key]
        parts = []
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [
                min(o + n, c + m) for o, n, c, m in zip(offsets, sizes, chunk.offsets, chunk.sizes)
            ]
            if all(a < b for a, b in zip(lo, hi)):
                parts.append((chunk, lo, hi))
        covered = sum(torch.Size([b - a for a, b in zip(lo, hi)]).numel() for _, lo, hi in parts)
        if covered < torch.Size(sizes).numel():  # replicas may overlap; gaps may not
            raise CheckpointError(f"checkpoint {self.dir}: the chunks of {key} do not cover it")

        def local(t: torch.Tensor, chunk, lo, hi) -> torch.Tensor:
            for dim, (a, b, c) in enumerate(zip(lo, hi, chunk.offsets)):
                t = t.narrow(dim, a - c, b - a)
            return t

        if len(parts) == 1:
            chunk, lo, hi = parts[0]
            t = local(self._chunk(key, chunk.offsets), chunk, lo, hi)
            # a small region of a large chunk is copied out, so that the chunk can go
            return t if t.numel() == torch.Size(chunk.sizes).numel() else t.clone()
        out = torch.empty(sizes, dtype=md.properties.dtype)
        for chunk, lo, hi in parts:
            dst = out
            for dim, (a, b, o) in enumerate(zip(lo, hi, offsets)):
                dst = dst.narrow(dim, a - o, b - a)
            dst.copy_(local(self._chunk(key, chunk.offsets), chunk, lo, hi))
        return out


def write_backend_files(ckpt_dir: str) -> None:
    """The files of a ``torch_dist`` checkpoint besides the tensors, for a writer that bypasses
    ``dist_checkpointing.save``: an empty common state and the backend config."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    torch.save({}, os.path.join(ckpt_dir, COMMON_STATE_FNAME))
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), ckpt_dir)
