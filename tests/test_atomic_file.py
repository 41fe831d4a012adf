"""Files are written whole or not at all: a failed write keeps the old file, leaves no temporary."""

from __future__ import annotations

import json

import pytest

from megashear.atomic_file import atomic_path, write_json_atomic, write_text_atomic


def test_writes_create_the_directory_and_replace_the_old_file(tmp_path):
    path = tmp_path / "new" / "dir" / "result.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    write_text_atomic(path, "replaced")
    assert path.read_text() == "replaced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "scores.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path, suffix=".png") as tmp:
            assert tmp.endswith(".png") and tmp != str(path)
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.pt"]


def test_an_unserialisable_value_writes_nothing(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert not path.exists() and list(tmp_path.iterdir()) == []
