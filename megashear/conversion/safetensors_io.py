"""Tensor-at-a-time safetensors reading and writing, with no memory map.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) + the
tensor bytes, offsets relative to the end of the header. Reading seeks to one tensor and reads
its bytes into a fresh buffer; writing lays out the header from shapes alone and then streams
each tensor's bytes as a callback produces it. Peak memory is one tensor either way, whatever
the file size (a memory map would leave every page it touched resident).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    __slots__ = ("path", "dtype", "shape", "begin", "end")

    def __init__(self, path: str, dtype: torch.dtype, shape: tuple, begin: int, end: int):
        self.path, self.dtype, self.shape, self.begin, self.end = path, dtype, shape, begin, end


def read_header(path: str) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` for every tensor of ``path`` (reads the header only)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header size {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (header is not a JSON object)")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if base + end > size:
            # checked here, before any output is written, rather than when the tensor is read
            raise ValueError(
                f"{path} is truncated ({size} bytes; tensor {name} ends at byte {base + end})"
            )
        out[name] = TensorInfo(
            path, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end
        )
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` describes, read into its own memory."""
    n = info.end - info.begin
    buf = torch.empty(n, dtype=torch.uint8)
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(buf.numpy())
    if got != n:
        raise ValueError(f"{info.path} is truncated ({got} of {n} bytes of a tensor)")
    if n == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf.view(info.dtype).reshape(info.shape)


def write_file(
    path: str,
    entries: Iterable[tuple[str, torch.dtype, tuple]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor; returns the number of data bytes.

    Args:
        entries: ``(name, dtype, shape)`` in file order.
        produce: called once per name, in that order; must return that dtype and shape.
        on_tensor: called with each tensor's byte count after it is written (progress).
    """
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    order = []
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        order.append((name, dtype, tuple(shape)))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in order:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}: produced {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
                )
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            if on_tensor is not None:
                on_tensor(t.numel() * t.element_size())
    return offset
