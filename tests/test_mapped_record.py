"""torch.save records memory-mapped from a byte range (checkpoint.mapped_record), and the
background ReadAhead of the streaming reader and writer (checkpoint.dist_stream)."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from megashear.checkpoint.dist_stream import ReadAhead
from megashear.checkpoint.mapped_record import map_tensor

TENSORS = {
    "bf16 matrix": torch.randn(5, 7).to(torch.bfloat16),
    "transposed view": torch.randn(3, 4, 5)[1:].transpose(1, 2),
    "int64 vector": torch.arange(10),
    "column slice (whole storage saved)": torch.randn(4, 6)[:, 1:3],
    "bool": torch.rand(3, 3) > 0.5,
}


def _saved_at_offsets(path, objects) -> list[tuple[int, int]]:
    ranges = []
    with open(path, "wb") as f:
        f.write(b"x" * 13)  # records start at odd offsets, as inside a .distcp file
        for obj in objects:
            start = f.tell()
            torch.save(obj, f)
            ranges.append((start, f.tell()))
    return ranges


def _view(path, start, end) -> io.BytesIO:
    with open(path, "rb") as f:
        f.seek(start)
        return io.BytesIO(f.read(end - start))


def test_a_mapped_record_equals_torch_load(tmp_path):
    path = str(tmp_path / "records")
    ranges = _saved_at_offsets(path, TENSORS.values())
    for (name, t), (start, end) in zip(TENSORS.items(), ranges):
        mapped = map_tensor(path, start, end - start)
        assert mapped is not None, name
        assert mapped.dtype == t.dtype and mapped.shape == t.shape and torch.equal(mapped, t)
        mapped.add_(1) if t.dtype != torch.bool else mapped.logical_not_()  # copy-on-write
    for (name, t), (start, end) in zip(TENSORS.items(), ranges):
        assert torch.equal(torch.load(_view(path, start, end), weights_only=True), t), name


@pytest.mark.parametrize(
    "obj",
    [{"a": torch.zeros(2)}, [torch.zeros(2), torch.ones(2)], torch.zeros(0, 3),
     torch.zeros(2, requires_grad=True)],
    ids=["dict", "two tensors", "empty", "requires_grad"],
)  # fmt: skip
def test_anything_but_one_plain_tensor_is_left_to_torch_load(tmp_path, obj):
    path = str(tmp_path / "records")
    ((start, end),) = _saved_at_offsets(path, [obj])
    assert map_tensor(path, start, end - start) is None


def test_read_ahead_runs_get_in_one_thread_in_order_and_raises_where_asked():
    calls, threads = [], set()

    def get(name):
        calls.append(name)
        threads.add(threading.get_ident())
        if name == "bad":
            raise ValueError("bad tensor")
        return torch.tensor(float(len(name)))

    ahead = ReadAhead(get, ["a", "bb", "bad", "cccc"], depth=1, name="test-ahead")
    try:
        assert ahead("a").item() == 1 and ahead("bb").item() == 2
        with pytest.raises(ValueError, match="bad tensor"):
            ahead("bad")
        assert ahead("cccc").item() == 4 and ahead("other").item() == 5  # outside the order
    finally:
        ahead.close()
    assert calls == ["a", "bb", "bad", "cccc", "other"]
    assert threads and threading.get_ident() not in threads and len(threads) == 1


def test_a_checkpoint_written_by_the_streaming_writer_is_read_mapped(tmp_path, monkeypatch):
    import megashear.checkpoint.dist_files as dist_files
    from megashear.checkpoint.dist_stream import full_shapes, write_checkpoint
    from megashear.checkpoint.format import iteration_dir
    from megashear.model_config import get_preset

    cfg = get_preset("tiny-gqa")
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=gen) for n, s in full_shapes(cfg).items()}
    write_checkpoint(str(tmp_path / "ck"), cfg, weights.__getitem__, torch.bfloat16, tp=2,
                     progress=False)  # fmt: skip
    mapped = []
    real = dist_files.map_tensor
    monkeypatch.setattr(
        dist_files, "map_tensor", lambda *a: mapped.append(real(*a) is not None) or real(*a)
    )
    ckpt = iteration_dir(str(tmp_path / "ck"), 0)
    on, off = dist_files.ChunkReader(ckpt), dist_files.ChunkReader(ckpt, mmap=False)
    for key, md in on.tensors.items():
        size = list(md.size)
        a, b = on.region(key, [0] * len(size), size), off.region(key, [0] * len(size), size)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert mapped and all(mapped)
