"""One tensor saved by ``torch.save``, memory-mapped from a byte range of a file.

DCP (and megatron-core's ``torch_dist`` writer) store every chunk of a checkpoint as a
``torch.save`` zip archive inside a ``*.distcp`` file: ``<prefix>/data.pkl`` (the pickled
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`` call), the raw
bytes of the storage in an uncompressed record ``<prefix>/data/<key>``, and small records
(``byteorder``, ``version``). ``torch.load`` copies every storage into fresh memory; mapping the
record instead costs no copy, and a reader that keeps some rows of a matrix touches only their
pages (finalisation keeps about half of every weight's rows).

:func:`map_tensor` reads the zip directory and the pickle with stdlib ``zipfile`` and a
restricted ``pickle.Unpickler`` (only the rebuild call, storage classes and ``OrderedDict``: at
least as strict as ``torch.load(weights_only=True)``), then maps the storage record
(``numpy.memmap``, copy-on-write, so a consumer that writes in place changes nothing on disk)
and views it with the pickled size, stride and offset. Anything else (several tensors,
compression, a big-endian archive, ``requires_grad``, hooks, an empty storage) is not mapped:
the function returns None and the caller uses ``torch.load``.

The mapping holds the file's inode: replacing or unlinking the file (what megashear's atomic
publish and rotation do) leaves a mapped tensor valid. Truncating it in place would not.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import zipfile
from typing import IO, Any

import numpy as np
import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


class _NotMappable(Exception):
    """The record is not one plain tensor; ``torch.load`` reads it instead."""


class _Rebuild(tuple):
    """The arguments of the pickled ``_rebuild_tensor_v2`` call."""


def _rebuild_tensor_v2(*args: Any) -> _Rebuild:
    return _Rebuild(args)


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _NotMappable(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotMappable(f"persistent id {pid!r}")
        return pid  # ("storage", dtype, key, location, numel)


def _plan(view: IO[bytes]) -> tuple[int, torch.dtype, int, tuple, tuple, int]:
    """(record data offset in ``view``, dtype, storage numel, size, stride, storage offset)."""
    with zipfile.ZipFile(view) as archive:
        names = {info.filename: info for info in archive.infolist()}
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise _NotMappable("no single data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        order = names.get(prefix + "byteorder")
        if order is not None and archive.read(order).decode() != "little":
            raise _NotMappable("big-endian archive")
        call = _RecordUnpickler(io.BytesIO(archive.read(pkl[0]))).load()
    if not isinstance(call, _Rebuild) or len(call) < 6:
        raise _NotMappable("not a single tensor")
    (_, dtype, key, _location, numel), offset, size, stride, requires_grad, hooks = call[:6]
    if requires_grad or hooks or (len(call) > 6 and call[6]):
        raise _NotMappable("requires_grad, hooks or metadata")
    record = names.get(f"{prefix}data/{key}")
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != nbytes:
        raise _NotMappable("storage record missing, compressed or of another size")
    if nbytes == 0:
        raise _NotMappable("empty storage")
    view.seek(record.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(view.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise _NotMappable("bad local header")
    data = record.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return data, dtype, numel, tuple(size), tuple(stride), int(offset)


class _Range(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable stream of their own."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(base + offset, 0), self._len)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        n = self._len - self._pos if size is None or size < 0 else min(size, self._len - self._pos)
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data


def map_tensor(path: str, start: int, length: int) -> torch.Tensor | None:
    """The tensor ``torch.save`` wrote at bytes ``[start, start + length)`` of ``path``,
    memory-mapped; None when that archive is not one plain tensor (then ``torch.load`` reads
    it)."""
    try:
        with open(path, "rb") as f:
            data, dtype, numel, size, stride, offset = _plan(_Range(f, start, length))
    except Exception:  # not a plain tensor, or damaged: torch.load reads it, or says why not
        return None
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if any(n == 0 for n in size) or extent > numel:
        return None
    elem = torch.empty((), dtype=dtype).element_size()
    if start + data + numel * elem > os.path.getsize(path):
        return None  # a short file would fault (SIGBUS) where the mapping passes its end
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=start + data, shape=(numel * elem,))
    mapping = getattr(raw, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)  # a cold file starts reading now
    flat = torch.from_numpy(raw).view(dtype)  # [numel]
    return flat.as_strided(size, stride, offset)
